"""The few places where basicsr 1.4.2 does not fit today's PyTorch; imported before any basicsr module.

Each fix is a small patch on basicsr or torchvision as installed, never a copy of their code.
"""
import sys

import torchvision.transforms.functional as _tv_functional

# basicsr.data.degradations imports `torchvision.transforms.functional_tensor`, which torchvision
# 0.17 removed; the one function basicsr takes from it (rgb_to_grayscale) lives on in `functional`.
sys.modules.setdefault('torchvision.transforms.functional_tensor', _tv_functional)

# --- On resume, a distillation teacher keeps its own checkpoint --------------------------------
import os  # noqa: E402

from basicsr.utils import misc as _misc  # noqa: E402

TEACHER_PATH_KEYS = ('pretrain_network_t', 'param_key_t')
_check_resume = _misc.check_resume


def check_resume_keeping_teacher(opt, resume_iter):
    """basicsr's ``check_resume``, leaving the frozen teacher's checkpoint as the option file names it.

    ``check_resume`` points every ``pretrain_network_*`` at the run's own ``net_*_<iter>.pth`` and
    turns ``params_ema`` keys into ``params``; a teacher (``network_t``) is never saved by the run, so
    that would send it looking for a file that does not exist.
    """
    kept = {key: opt['path'][key] for key in TEACHER_PATH_KEYS if key in opt['path']}
    _check_resume(opt, resume_iter)
    for key in TEACHER_PATH_KEYS:
        if key in kept:
            opt['path'][key] = kept[key]
        else:
            opt['path'].pop(key, None)


# --- Multi-GPU, crash-safe checkpoints and input errors ---------------------------------------
# Each patch below wraps or replaces one basicsr 1.4.2 function, imported after the shim above.
import functools  # noqa: E402
import tempfile  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402
import torch.distributed as _dist  # noqa: E402
from basicsr import train as _basicsr_train  # noqa: E402
from basicsr.models import base_model as _base_model  # noqa: E402
from basicsr.utils import dist_util as _dist_util  # noqa: E402
from basicsr.utils import img_util as _img_util  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as _DDP  # noqa: E402

from dvmsr_arch import checks as _checks  # noqa: E402


def _init_dist_pytorch(backend, **kwargs):
    """basicsr's torchrun launcher, also without CUDA.

    basicsr calls ``torch.cuda.set_device(RANK % device_count())``, which divides by zero on a CPU
    machine and picks the wrong GPU on the second node of a multi-node run. This binds the process to
    its LOCAL_RANK's GPU with NCCL when there are GPUs, else uses gloo on the CPU.
    """
    if torch.cuda.is_available():
        local_rank = int(os.environ.get('LOCAL_RANK', os.environ['RANK']))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    else:
        backend = 'gloo'
    _dist.init_process_group(backend=backend, **kwargs)


def _init_dist_slurm_needs_gpus(init_dist_slurm):
    @functools.wraps(init_dist_slurm)
    def init(backend, port=None):
        if not torch.cuda.is_available():  # basicsr would divide by a device count of zero
            raise _checks.InputError('--launcher slurm needs CUDA GPUs on every node; on CPUs use torchrun and '
                                     '--launcher pytorch')
        init_dist_slurm(backend, port=port)
    return init


_dist_util._init_dist_pytorch = _init_dist_pytorch
_dist_util._init_dist_slurm = _init_dist_slurm_needs_gpus(_dist_util._init_dist_slurm)

_model_to_device = _base_model.BaseModel.model_to_device


def _model_to_device_anywhere(self, net):
    """basicsr's DDP wrapping, on CPU too, and never around a network with nothing to train.

    basicsr passes ``device_ids=[torch.cuda.current_device()]`` (CUDA only) and wraps every network
    it is given; DDP refuses a frozen one such as a distillation teacher, which each rank keeps as
    a plain module.
    """
    trainable = any(p.requires_grad for p in net.parameters())
    if not self.opt['dist'] or (self.device.type == 'cuda' and trainable):
        return _model_to_device(self, net)
    net = net.to(self.device)
    if not trainable:
        return net
    return _DDP(net, find_unused_parameters=self.opt.get('find_unused_parameters', False))


_base_model.BaseModel.model_to_device = _model_to_device_anywhere

_torch_save = torch.save


def atomic_torch_save(obj, path, *args, **kwargs):
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the old file or the complete new one, never a torn file; the
    rename is made durable by an fsync of the folder. Temporary names start with '.', which basicsr's
    scans and the resume logic skip.
    """
    if not isinstance(path, (str, os.PathLike)):
        return _torch_save(obj, path, *args, **kwargs)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            _torch_save(obj, f, *args, **kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, 'O_DIRECTORY'):
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class _TorchWithAtomicSave(types.ModuleType):
    """``torch`` as basicsr's base_model sees it: the same module, with an atomic ``save``.

    BaseModel.save_network and save_training_state call ``torch.save(obj, path)`` directly; giving
    that one module this view changes those two call sites and nothing else in the process.
    """
    save = staticmethod(atomic_torch_save)

    def __getattr__(self, name):
        return getattr(torch, name)


_base_model.torch = _TorchWithAtomicSave('torch')


# --- The EMA update in a few launches -------------------------------------------------------
_model_ema = _base_model.BaseModel.model_ema  # basicsr's own, which the tests compare with


def model_ema_in_few_launches(self, decay=0.999):
    """basicsr's ``model_ema``: each EMA parameter becomes ``ema * decay + param * (1 - decay)`` by
    the same two operations (multiply, then add with alpha), over all parameters at once.

    basicsr issues the two as two GPU kernels per parameter, 212 for the DVMSR student, after the
    iteration's loss logging has waited for the GPU, which then idles while the host issues them;
    multi-tensor operations do the same arithmetic in a few launches (docs/performance.md, version 22).

    The EMA parameters are updated as themselves, not through ``.data`` as basicsr does: writes
    through ``.data`` leave a parameter's version counter where it was, and DVMSR's fused inference
    keeps tensors derived from its parameters until that counter moves (``derived_tensor``), so
    the validation of ``net_g_ema`` on a GPU would go on using the first validation's weights.
    """
    net_g = self.get_bare_model(self.net_g)
    net_g_params = dict(net_g.named_parameters())
    net_g_ema_params = dict(self.net_g_ema.named_parameters())
    keys = list(net_g_ema_params)
    ema = [net_g_ema_params[k] for k in keys]
    with torch.no_grad():
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, [net_g_params[k] for k in keys], alpha=1 - decay)


_base_model.BaseModel.model_ema = model_ema_in_few_launches


def load_resume_state(opt):
    """basicsr's ``load_resume_state``, on any device, from the run's own folder, past torn files.

    basicsr maps the state onto ``torch.cuda.current_device()`` (which fails without CUDA), looks for
    ``--auto_resume`` states under the *current folder's* ``experiments/``, and takes the highest
    ``<iter>.state`` even when a crash or a full disk tore it, which then stops every later resume.
    Here ``--auto_resume`` takes the newest state of the run's own ``training_states`` whose files
    load (reporting those it skips, and removing temporary files a kill left behind); the state is
    read onto the CPU, since ``Optimizer.load_state_dict`` moves each tensor to its parameter's
    device anyway; and a distillation teacher keeps its own checkpoint.
    """
    if opt['auto_resume']:
        if opt['rank'] == 0:
            for key in ('models', 'training_states'):
                folder = opt['path'][key]
                for name in os.listdir(folder) if os.path.isdir(folder) else []:
                    if name.startswith('.') and name.endswith('.tmp'):
                        os.unlink(os.path.join(folder, name))
        opt['path']['resume_state'] = _checks.newest_intact_state(opt, report=lambda line: print(line, flush=True))
    state_path = opt['path'].get('resume_state')
    if not state_path:
        return None
    resume_state = torch.load(state_path, map_location='cpu', weights_only=True)
    check_resume_keeping_teacher(opt, resume_state['iter'])
    return resume_state


_basicsr_train.load_resume_state = load_resume_state

_build_model = _basicsr_train.build_model


def _build_model_stopping_on_non_finite_loss(opt):
    """The training model, made to stop at the first NaN or infinite loss term.

    basicsr would train on and keep saving checkpoints of a diverged network. The check reads the
    logged loss terms (already on the CPU, so it costs no extra synchronisation) and stops before
    the iteration's checkpoint is written, so the last one on disk is the last good one.
    """
    model = _build_model(opt)
    optimize_parameters = model.optimize_parameters

    @functools.wraps(optimize_parameters)
    def optimize_and_check(current_iter):
        optimize_parameters(current_iter)
        bad = _checks.non_finite_losses(getattr(model, 'log_dict', {}))
        if bad:
            terms = ', '.join(f'{name}={value}' for name, value in bad.items())
            raise _checks.InputError(f'non-finite loss at iteration {current_iter} ({terms}): stopped without '
                                     f'saving; {_checks.last_checkpoint_note(opt)}')

    model.optimize_parameters = optimize_and_check
    return model


_basicsr_train.build_model = _build_model_stopping_on_non_finite_loss

_create_train_val_dataloader = _basicsr_train.create_train_val_dataloader


def _create_train_val_dataloader_reaching_total_iter(opt, logger):
    """basicsr's, with enough epochs to reach ``train.total_iter``.

    basicsr counts ceil(images x enlarge ratio / (batch x world size)) iterations an epoch, but its
    training DataLoader drops the last partial batch, so an epoch gives the floor of that, and a run
    whose sizes do not divide ended short of total_iter without a word (3 images at batch 2: 3 of 4
    iterations). Here the epochs are counted from the loader's own length.
    """
    train_loader, train_sampler, val_loaders, total_epochs, total_iters = _create_train_val_dataloader(opt, logger)
    if train_loader is not None:
        per_epoch = len(train_loader)
        if per_epoch == 0:
            raise _checks.InputError(f'datasets.train: {len(train_loader.dataset)} images give no whole batch of '
                                     f'batch_size_per_gpu x {opt["world_size"]} GPUs; lower the batch size or set '
                                     'dataset_enlarge_ratio')
        needed = -(-total_iters // per_epoch)
        if needed != total_epochs:
            batches = f'{per_epoch} whole batch{"" if per_epoch == 1 else "es"}'
            logger.info(f'Total epochs: {needed}, not {total_epochs}: {batches} an epoch (the data loader drops a '
                        f'partial one) to reach {total_iters} iterations.')
            total_epochs = needed
    return train_loader, train_sampler, val_loaders, total_epochs, total_iters


_basicsr_train.create_train_val_dataloader = _create_train_val_dataloader_reaching_total_iter

_build_dataset = _basicsr_train.build_dataset


def _build_dataset_guarding_corrupt_images(dataset_opt):
    """Training sets meet undecodable images by ``on_corrupt`` instead of crashing a worker."""
    dataset = _build_dataset(dataset_opt)
    if dataset_opt['phase'] != 'train':
        return dataset
    return _checks.CorruptImageGuard(dataset, 'datasets.train', dataset_opt.get('on_corrupt', 'error'))


_basicsr_train.build_dataset = _build_dataset_guarding_corrupt_images

# basicsr's imfrombytes returns None for bytes OpenCV cannot decode and then crashes on None.astype;
# every basicsr module that imported it by name gets the version that raises CorruptImageError.
_imfrombytes = _img_util.imfrombytes
_checked_imfrombytes = _checks.checked_imfrombytes(_imfrombytes)
for _module in list(sys.modules.values()):
    if getattr(_module, '__name__', '').startswith('basicsr') and getattr(_module, 'imfrombytes', None) is _imfrombytes:
        _module.imfrombytes = _checked_imfrombytes
