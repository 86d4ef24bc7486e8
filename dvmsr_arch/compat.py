"""The few places where basicsr 1.4.2 does not fit today's PyTorch; imported before any basicsr module.

Each fix is a small patch on basicsr or torchvision as installed, never a copy of their code.
"""
import sys

import torchvision.transforms.functional as _tv_functional

# basicsr.data.degradations imports `torchvision.transforms.functional_tensor`, which torchvision
# 0.17 removed; the one function basicsr takes from it (rgb_to_grayscale) lives on in `functional`.
sys.modules.setdefault('torchvision.transforms.functional_tensor', _tv_functional)

# --- Resume on any device, keeping a distillation teacher's own weights ------------------------
# (Placed before later patches, which wrap basicsr's load_resume_state as left here.)
import os  # noqa: E402
from os import path as _osp  # noqa: E402

import torch as _torch  # noqa: E402
from basicsr import train as _train_module  # noqa: E402
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


def load_resume_state_on_any_device(opt):
    """basicsr's ``load_resume_state``, also without CUDA and from any working folder.

    basicsr maps the state onto ``torch.cuda.current_device()``, which fails on a CPU-only machine,
    and looks for ``--auto_resume`` states under ``./experiments`` instead of the run's own folder.
    The state is read onto the CPU: ``Optimizer.load_state_dict`` moves each tensor to its
    parameter's device anyway.
    """
    state_path = opt['path'].get('resume_state')
    if opt['auto_resume']:
        folder = opt['path']['training_states']
        iters = [int(name[:-len('.state')]) for name in (os.listdir(folder) if _osp.isdir(folder) else [])
                 if name.endswith('.state') and name[:-len('.state')].isdigit()]
        if iters:
            state_path = opt['path']['resume_state'] = _osp.join(folder, f'{max(iters)}.state')
    if not state_path:
        return None
    resume_state = _torch.load(state_path, map_location='cpu', weights_only=True)
    check_resume_keeping_teacher(opt, resume_state['iter'])
    return resume_state


_train_module.load_resume_state = load_resume_state_on_any_device

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

_load_resume_state = _basicsr_train.load_resume_state


def _load_newest_intact_state(opt):
    """``--auto_resume`` from the newest training state that loads, not just the newest file.

    basicsr takes the highest ``<iter>.state`` under the *current folder's* ``experiments/``; a
    state torn by a crash (or by a full disk) then stops every later resume. This looks in the
    experiment's own ``training_states`` folder, skips (and reports) states that fail to load or
    whose network files do, and hands the chosen one to basicsr as an explicit ``resume_state``.
    Temporary files left by a kill during an atomic save are removed.
    """
    if not opt['auto_resume']:
        return _load_resume_state(opt)
    if opt['rank'] == 0:
        for key in ('models', 'training_states'):
            folder = opt['path'][key]
            for name in os.listdir(folder) if os.path.isdir(folder) else []:
                if name.startswith('.') and name.endswith('.tmp'):
                    os.unlink(os.path.join(folder, name))
    opt['path']['resume_state'] = _checks.newest_intact_state(opt, report=lambda line: print(line, flush=True))
    opt['auto_resume'] = False
    try:
        return _load_resume_state(opt)
    finally:
        opt['auto_resume'] = True


_basicsr_train.load_resume_state = _load_newest_intact_state

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
