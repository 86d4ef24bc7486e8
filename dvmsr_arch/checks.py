"""Early, cheap checks of an option file and its data, and the one-line form of every input error.

``dvmsr_arch/train.py`` and ``dvmsr_arch/test.py`` run :func:`run_checked`: it reads the option file
the way BasicSR does (``--force_yml`` included) but without starting the process group, checks it,
and only then hands over to BasicSR's pipeline. So a wrong path, a mismatched checkpoint or a broken
data set ends the run with one line on stderr and exit status 2, before any data-loader worker starts,
before any GPU memory is taken and before anything in ``experiments/`` is touched.

What is checked (see ``docs/robustness.md``):

* the keys every run needs, numbers that are numbers, ``tf32`` (if given) true or false,
  ``train.cuda_graph`` (if given) true or false, for a model that reads it, and
  ``train.teacher_precision`` (if given) a precision, for a run with a teacher;
* every ``network_*``: a registered ``type``, only keys its constructor takes, a constructor that
  accepts the values (an unknown ``scan_backend`` included) and a scan backend that can run on the
  device the run will use;
* every ``path.pretrain_network_*`` (with ``param_key_*`` and ``strict_load_*``): the file exists and
  its tensors match the network (missing and unexpected keys, shape mismatches);
* ``path.resume_state``: the file loads;
* every data set: its dataroots exist; an LMDB has ``data.mdb`` and ``meta_info.txt`` and holds every
  key its ``meta_info.txt`` names; GT and LQ hold the same names; GT is ``scale`` times LQ; training
  GT is at least ``gt_size``; image headers can be read.

Images are never decoded at start-up: only their headers are read (PNG: 33 bytes; other formats:
what Pillow needs to learn the size), so the check stays cheap on DF2K-sized sets. A corrupt image
body is found when a data-loader worker decodes it; ``datasets.<phase>.on_corrupt`` then decides:
``error`` (default) stops with one line naming the image, ``skip`` logs a warning, counts it and
trains on the next image instead (:class:`CorruptImageGuard`).
"""
import inspect
import io
import logging
import math
import os
import re
import sys
from contextlib import redirect_stdout
from os import path as osp
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

ON_CORRUPT_CHOICES = ('error', 'skip')
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
# A run of undecodable images this long means the data set itself is broken, not a few files.
MAX_CONSECUTIVE_CORRUPT = 16
# How many names an error message lists before it says "and N more".
EXAMPLES = 3


class InputError(Exception):
    """Bad input: an option, a file or data. Its message is one line naming the file or key."""


class CorruptImageError(ValueError):
    """Image bytes that OpenCV cannot decode (raised by the patched ``imfrombytes``)."""


# ---------------------------------------------------------------------------------------------
# The command-line wrapper
# ---------------------------------------------------------------------------------------------


def run_checked(pipeline: Callable[[str], None], root_path: str, is_train: bool) -> None:
    """Check the option file named on the command line, set its ``tf32`` switch (:func:`apply_tf32`),
    then run ``pipeline(root_path)``.

    An :class:`InputError`, whether found here or raised later inside the pipeline (a non-finite
    loss, a corrupt image with ``on_corrupt: error``), ends the process with one line on stderr and
    exit status 2. Any other exception is a bug and keeps its traceback.
    """
    try:
        opt = preview_options(root_path, is_train)
    except InputError as error:
        _exit_with(error, print_it=_is_first_rank())
    try:
        check_options(opt)
    except InputError as error:
        # Every rank runs the same checks on the same files; one copy of the line is enough.
        _exit_with(error, print_it=_is_first_rank())
    apply_tf32(opt)
    try:
        pipeline(root_path)
    except InputError as error:
        # At run time the ranks can differ (a corrupt image in one rank's share): each says its own.
        _exit_with(error, print_it=True, prefix=_rank_prefix())


def apply_tf32(opt: dict) -> None:
    """The option file's top-level ``tf32`` key on PyTorch's switches, for the whole process.

    ``true`` lets matmuls and convolutions use TF32 on GPUs that have it; ``false`` lets neither (true
    fp32); no key keeps PyTorch's defaults, which allow TF32 for convolutions but not for matmuls.
    BasicSR sets neither, so without the key DVMSR's projections run in true fp32: on an H100 the
    student's training step then takes about a tenth longer, a distillation step a third longer and
    an evaluation forward two thirds longer (docs/performance.md, version 14).
    """
    if 'tf32' in opt:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = opt['tf32']


def _exit_with(error: BaseException, print_it: bool, prefix: str = '') -> None:
    line = f'error: {prefix}{one_line(error)}'
    if print_it:
        print(line, file=sys.stderr, flush=True)
    logger = logging.getLogger('basicsr')
    if any(isinstance(h, logging.FileHandler) for h in logger.handlers):
        # Once the run's log file exists, it says why the run ended too (quietly: stderr has it).
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, line, None, None))
    sys.exit(2)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line.

    A DataLoader worker's exception reaches the main process re-raised with the worker's traceback
    folded into its message ("Caught X in DataLoader worker process 0. Original Traceback ...
    module.X: message"); the message is then its last line, without the "module.X: " prefix.
    """
    text = str(error).strip()
    lines = text.splitlines()
    if len(lines) > 1 and 'Original Traceback' in text:
        last = lines[-1]
        qualified = f'{type(error).__module__}.{type(error).__qualname__}: '
        text = last[len(qualified):] if last.startswith(qualified) else last
    return ' '.join(part.strip() for part in text.splitlines())


def _rank_from_env() -> int:
    for name in ('RANK', 'SLURM_PROCID'):
        if os.environ.get(name, '').isdigit():
            return int(os.environ[name])
    return 0


def _is_first_rank() -> bool:
    return _rank_from_env() == 0


def _rank_prefix() -> str:
    world = os.environ.get('WORLD_SIZE') or os.environ.get('SLURM_NTASKS') or '1'
    return f'rank {_rank_from_env()}: ' if world.isdigit() and int(world) > 1 else ''


# ---------------------------------------------------------------------------------------------
# Reading the options without starting the process group
# ---------------------------------------------------------------------------------------------


def preview_options(root_path: str, is_train: bool) -> dict:
    """BasicSR's ``parse_options`` on ``sys.argv``, with ``init_dist`` held back.

    The checks must run before ``init_dist`` (which takes a GPU with ``torch.cuda.set_device``) yet
    see exactly the options the run will use, ``--force_yml`` and ``--debug`` included, so this calls
    BasicSR's own parser with its process-group start replaced by a no-op. Its stdout (the
    "Disable distributed." line) is dropped: the real parse prints it again.
    """
    import yaml
    from basicsr.utils import options as basicsr_options

    opt_file = _option_file_from_argv()
    if opt_file is not None and not osp.isfile(opt_file):
        raise InputError(f'-opt {opt_file}: no such option file')
    start = basicsr_options.init_dist
    basicsr_options.init_dist = lambda *args, **kwargs: None
    try:
        with redirect_stdout(io.StringIO()):
            opt, args = basicsr_options.parse_options(root_path, is_train=is_train)
    except yaml.YAMLError as error:
        raise InputError(f'{opt_file}: not valid YAML ({" ".join(str(error).split())})') from None
    except KeyError as error:
        raise InputError(f'{opt_file}: the key {error} is missing (or --force_yml names a key the file lacks)') from None
    except (TypeError, AttributeError) as error:
        raise InputError(f'{opt_file}: not a BasicSR option file ({error})') from None
    except ValueError:  # BasicSR splits each --force_yml entry at its one '='
        entry = next((a for a in _force_yml_entries() if a.count('=') != 1), None)
        if entry is None:
            raise
        raise InputError(f'--force_yml {entry}: write one key path and one value, as train:ema_decay=0.999') from None
    finally:
        basicsr_options.init_dist = start
    opt['opt_file'] = args.opt
    opt['launcher'] = args.launcher
    return opt


def _force_yml_entries() -> List[str]:
    """The arguments after --force_yml, up to the next option."""
    argv = sys.argv[1:]
    if '--force_yml' not in argv:
        return []
    entries = []
    for arg in argv[argv.index('--force_yml') + 1:]:
        if arg.startswith('-'):
            break
        entries.append(arg)
    return entries


def _option_file_from_argv() -> Optional[str]:
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg == '-opt' and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith('-opt='):
            return arg[len('-opt='):]
    return None


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


def check_options(opt: dict) -> None:
    """Every check of this module, in the order a user would fix things."""
    _check_required_keys(opt)
    _check_metrics(opt)
    _check_network_path_keys(opt)
    networks = check_networks(opt)
    check_pretrained_networks(opt, networks)
    check_resume_state(opt)
    check_datasets(opt)


def _check_required_keys(opt: dict) -> None:
    required = ['name', 'path', 'datasets']
    if opt['is_train']:
        required += ['train', 'train.total_iter', 'train.optim_g', 'train.scheduler', 'logger', 'logger.print_freq',
                     'logger.save_checkpoint_freq', 'datasets.train']
    for dotted in required:
        node = opt
        for part in dotted.split('.'):
            if not isinstance(node, dict) or node.get(part) is None:
                raise InputError(f'{opt["opt_file"]}: the key {dotted} is missing')
            node = node[part]
    if opt['is_train']:
        # BasicSR's --force_yml reads "1e-4" as a string (it wants "!!float 1e-4"); Adam would then
        # fail with a bare TypeError.
        for dotted, value in (('train.total_iter', opt['train']['total_iter']),
                              ('train.optim_g.lr', opt['train']['optim_g'].get('lr'))):
            if value is not None and not isinstance(value, (int, float)):
                raise InputError(f'{dotted}: {value!r} is not a number (in --force_yml write "!!float 1e-4")')
    if not opt['is_train'] and not opt['datasets']:
        raise InputError(f'{opt["opt_file"]}: datasets is empty; name at least one test set')
    if opt['is_train']:
        # BasicSR would fail only later: at the first validation without val_freq, and after
        # building the networks without a loss.
        if isinstance(opt.get('val'), dict) and opt['val'].get('val_freq') is None:
            raise InputError(f'{opt["opt_file"]}: the key val.val_freq is missing')
        if not (opt['train'].get('pixel_opt') or opt['train'].get('perceptual_opt')):
            raise InputError(f'{opt["opt_file"]}: train has neither pixel_opt nor perceptual_opt; set the loss '
                             '(paper Eq. 5: pixel_opt, L1Loss)')
    if 'tf32' in opt and not isinstance(opt['tf32'], bool):
        raise InputError(f'{opt["opt_file"]}: tf32 must be true or false, not {opt["tf32"]!r}')
    if opt['is_train'] and 'cuda_graph' in opt['train']:
        _check_cuda_graph(opt)
    if opt['is_train'] and 'teacher_precision' in opt['train']:
        _check_teacher_precision(opt)


def _check_teacher_precision(opt: dict) -> None:
    """``train.teacher_precision`` names a precision, for a model with a teacher."""
    from dvmsr_arch.models.distill_model import TEACHER_PRECISIONS
    precision = opt['train']['teacher_precision']
    if precision not in TEACHER_PRECISIONS:
        raise InputError(f'{opt["opt_file"]}: train.teacher_precision must be one of '
                         f'{", ".join(TEACHER_PRECISIONS)}, not {precision!r}')
    if 'network_t' not in opt:
        raise InputError(f'{opt["opt_file"]}: train.teacher_precision is set, but there is no teacher (network_t)')


def _check_cuda_graph(opt: dict) -> None:
    """``train.cuda_graph`` is true or false, and the model is one that reads it: basicsr's SRModel
    would silently train without the graph."""
    from basicsr.utils.registry import MODEL_REGISTRY

    from dvmsr_arch.models.dvmsr_model import DVMSRModel
    wanted = opt['train']['cuda_graph']
    if not isinstance(wanted, bool):
        raise InputError(f'{opt["opt_file"]}: train.cuda_graph must be true or false, not {wanted!r}')
    model_type = opt.get('model_type', 'SRModel')
    model = MODEL_REGISTRY.get(model_type) if model_type in MODEL_REGISTRY else None
    if wanted and not (isinstance(model, type) and issubclass(model, DVMSRModel)):
        raise InputError(f'{opt["opt_file"]}: train.cuda_graph needs model_type DVMSRModel (SRModel with the '
                         f'graph) or DistillSRModel, not {model_type}')


NETWORK_PATH_KEYS = ('pretrain_network_', 'strict_load_', 'param_key_')


def _check_network_path_keys(opt: dict) -> None:
    """``path``'s per-network keys name a network of the file, and a test run loads weights into
    ``network_g``. BasicSR skips a key it does not know: a misspelt ``pretrain_network_g`` made
    test.py score a network of random weights (about 10 dB on Set5) and exit 0."""
    networks = sorted(_suffix(k) for k in opt if k.startswith('network_'))
    for key in opt['path']:
        prefix = next((p for p in NETWORK_PATH_KEYS if key.startswith(p)), None)
        if prefix is not None and key[len(prefix):] not in networks:
            known = ', '.join(f'{prefix}{n}' for n in networks)
            raise InputError(f'path.{key}: the file has no network_{key[len(prefix):]} '
                             f'(its keys of this kind: {known})')
    if not opt['is_train'] and 'g' in networks and not opt['path'].get('pretrain_network_g'):
        raise InputError(f'{opt["opt_file"]}: path.pretrain_network_g is missing; a test run needs the weights to '
                         'evaluate')


def _check_metrics(opt: dict) -> None:
    """Each ``val.metrics`` entry names a registered metric and sets its required arguments: a
    metric without ``crop_border`` failed at the first image it scored, after the inference."""
    from basicsr.utils.registry import METRIC_REGISTRY

    metrics = (opt.get('val') or {}).get('metrics') or {}
    for name, metric in metrics.items():
        where = f'val.metrics.{name}'
        if not isinstance(metric, dict) or 'type' not in metric:
            raise InputError(f'{where}.type is missing')
        if metric['type'] not in METRIC_REGISTRY:
            raise InputError(f'{where}.type: no metric named {metric["type"]!r} is registered')
        for parameter in inspect.signature(METRIC_REGISTRY.get(metric['type'])).parameters.values():
            # BasicSR's models pass the images as img and img2, and the rest from these options.
            required = parameter.default is inspect.Parameter.empty and parameter.kind in (
                inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            if required and parameter.name not in metric and parameter.name not in ('img', 'img2'):
                raise InputError(f'{where}.{parameter.name} is missing ({metric["type"]} needs it)')


def _run_device(opt: dict) -> torch.device:
    """The device BasicSR's model will use, decided without touching the GPU."""
    return torch.device('cuda' if opt.get('num_gpu', 0) != 0 and torch.cuda.is_available() else 'cpu')


def check_networks(opt: dict) -> Dict[str, torch.nn.Module]:
    """Build every ``network_*`` on the CPU; returns them for the checkpoint checks."""
    from basicsr.utils.registry import ARCH_REGISTRY

    networks = {}
    for key in sorted(k for k in opt if k.startswith('network_')):
        net_opt = dict(opt[key] or {})
        arch_type = net_opt.pop('type', None)
        if arch_type is None:
            raise InputError(f'{opt["opt_file"]}: {key}.type is missing')
        if arch_type not in ARCH_REGISTRY:
            raise InputError(f'{key}.type: no architecture named {arch_type!r} is registered')
        arch = ARCH_REGISTRY.get(arch_type)
        parameters = inspect.signature(arch).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        unknown = [name for name in net_opt if name not in parameters]
        if unknown and not takes_any:
            accepted = ', '.join(p for p in parameters if parameters[p].kind is not inspect.Parameter.VAR_POSITIONAL)
            raise InputError(f'{key}.{unknown[0]}: {arch_type} takes no such key (it takes: {accepted})')
        try:
            net = arch(**net_opt)
        except (ValueError, TypeError) as error:
            raise InputError(f'{key}: {error}') from None
        if 'scan_backend' in parameters:  # also checks DVMSR_SCAN_BACKEND, which 'auto' defers to
            _check_scan_backend(key, net_opt.get('scan_backend', 'auto'), _run_device(opt))
        networks[key] = net
    return networks


def _check_scan_backend(key: str, backend: str, device: torch.device) -> None:
    from dvmsr_arch.ops import resolve_backend

    try:
        resolve_backend(backend, device)
    except (ValueError, RuntimeError) as error:
        raise InputError(f'{key}.scan_backend: {error}') from None


def _suffix(network_key: str) -> str:
    return network_key[len('network_'):]


def _resuming_networks(opt: dict) -> List[str]:
    """The networks whose pretrained path BasicSR's ``check_resume`` replaces on resume."""
    ignored = opt['path'].get('ignore_resume_networks') or []
    return [k for k in opt if k.startswith('network_') and k not in ignored and k != 'network_t']


def check_pretrained_networks(opt: dict, networks: Dict[str, torch.nn.Module]) -> None:
    """Each ``path.pretrain_network_X`` exists and, with ``strict_load_X``, matches ``network_X``."""
    replaced_on_resume = _resuming_networks(opt) if (opt.get('auto_resume') and _training_states(opt)) else []
    for key, net in networks.items():
        suffix = _suffix(key)
        path = opt['path'].get(f'pretrain_{key}')
        if path is None or key in replaced_on_resume:
            continue
        where = f'path.pretrain_{key}'
        if not osp.isfile(path):
            raise InputError(f'{where}: {path} does not exist')
        # The teacher (network_t) reads params_ema first, like BasicSR's EMA weights; the others
        # read BasicSR's default 'params'. Both fall back to 'params', the teacher also to a plain
        # state_dict, as the models that load them do.
        default_key = 'params_ema' if key == 'network_t' else 'params'
        param_key = opt['path'].get(f'param_key_{suffix}', default_key)
        state = _load_state_dict(path, param_key, allow_plain=(key == 'network_t' or param_key is None), where=where)
        if opt['path'].get(f'strict_load_{suffix}', True):
            mismatch = describe_state_dict_mismatch(net.state_dict(), state)
            if mismatch:
                raise InputError(f'{where}: {path} does not match {key} ({mismatch})')


def _load_state_dict(path: str, param_key: Optional[str], allow_plain: bool, where: str) -> Dict[str, torch.Tensor]:
    try:
        checkpoint = torch.load(path, map_location='cpu')
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise InputError(f'{where}: {path} cannot be loaded ({type(error).__name__}: {one_line(error)})') from None
    if not isinstance(checkpoint, dict):
        raise InputError(f'{where}: {path} holds a {type(checkpoint).__name__}, not a state_dict')
    if param_key is not None and isinstance(checkpoint.get(param_key), dict):
        state = checkpoint[param_key]
    elif param_key is not None and isinstance(checkpoint.get('params'), dict):
        state = checkpoint['params']
    elif allow_plain and all(torch.is_tensor(v) for v in checkpoint.values()):
        state = checkpoint
    else:
        keys = ', '.join(map(str, list(checkpoint)[:EXAMPLES]))
        raise InputError(f'{where}: {path} has no {param_key!r} or \'params\' entry (its top-level keys: {keys}); '
                         f'set {where.replace("pretrain_network_", "param_key_")} to the right entry, or ~ for a '
                         'plain state_dict')
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}


def describe_state_dict_mismatch(expected: Dict[str, torch.Tensor], loaded: Dict[str, torch.Tensor]) -> str:
    """'' when ``loaded`` fits ``expected`` exactly, else a one-line summary of what does not."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    shapes = [f'{k}: checkpoint {tuple(loaded[k].shape)} vs network {tuple(expected[k].shape)}'
              for k in sorted(set(expected) & set(loaded)) if tuple(loaded[k].shape) != tuple(expected[k].shape)]
    parts = []
    for label, items in (('missing key', missing), ('unexpected key', unexpected), ('shape mismatch', shapes)):
        if items:
            parts.append(f'{_count(len(items), label)}: {_examples(items)}')
    return '; '.join(parts)


def _count(n: int, noun: str) -> str:
    if n == 1:
        return f'1 {noun}'
    return f'{n} {noun}es' if noun.endswith('ch') else f'{n} {noun}s'


def _examples(items: Sequence[str]) -> str:
    shown = ', '.join(str(item) for item in items[:EXAMPLES])
    return shown + (f' and {len(items) - EXAMPLES} more' if len(items) > EXAMPLES else '')


def check_resume_state(opt: dict) -> None:
    """An explicit ``path.resume_state`` must load; ``--auto_resume`` falls back by itself."""
    path = opt['path'].get('resume_state')
    if not path or opt.get('auto_resume'):
        return
    if not osp.isfile(path):
        raise InputError(f'path.resume_state: {path} does not exist')
    problem = training_state_problem(path, opt['path'].get('models'))
    if problem:
        raise InputError(f'path.resume_state: {path} {problem}')


# ---------------------------------------------------------------------------------------------
# Training states: which one to resume from
# ---------------------------------------------------------------------------------------------


def _training_states(opt: dict) -> List[Tuple[int, str]]:
    """(iteration, path) of every ``<iter>.state`` of this experiment, newest first."""
    folder = opt['path'].get('training_states')
    if not folder or not osp.isdir(folder):
        return []
    states = []
    for name in os.listdir(folder):
        stem, ext = osp.splitext(name)
        if ext == '.state' and stem.isdigit():
            states.append((int(stem), osp.join(folder, name)))
    return sorted(states, reverse=True)


def training_state_problem(path: str, models_dir: Optional[str]) -> Optional[str]:
    """None when ``path`` and the network files saved with it load, else what is wrong with them."""
    try:
        state = torch.load(path, map_location='cpu')
    except Exception as error:  # a truncated zip, a foreign pickle, an empty file...
        return f'is truncated or corrupt ({type(error).__name__}: {one_line(error)[:200]})'
    if not isinstance(state, dict) or not {'iter', 'optimizers', 'schedulers'} <= set(state):
        return 'is not a BasicSR training state (it lacks iter/optimizers/schedulers)'
    if models_dir is None:
        return None
    suffix = f'_{state["iter"]}.pth'
    nets = [n for n in (os.listdir(models_dir) if osp.isdir(models_dir) else []) if n.startswith('net_') and
            n.endswith(suffix)]
    if not nets:
        return f'has no network file net_*{suffix} in {models_dir}'
    for name in nets:
        try:
            torch.load(osp.join(models_dir, name), map_location='cpu')
        except Exception as error:
            return f'belongs with {name}, which is truncated or corrupt ({type(error).__name__})'
    return None


def newest_intact_state(opt: dict, report: Callable[[str], None]) -> Optional[str]:
    """The newest training state that loads, with its network files; ``report`` hears of each skipped."""
    for _, path in _training_states(opt):
        problem = training_state_problem(path, opt['path'].get('models'))
        if problem is None:
            return path
        report(f'warning: training state {path} {problem}; trying the one before it')
    return None


# ---------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------


def check_datasets(opt: dict) -> None:
    for phase_key, dataset_opt in opt['datasets'].items():
        where = f'datasets.{phase_key}'
        if not isinstance(dataset_opt, dict):
            raise InputError(f'{where}: expected a mapping of dataset options')
        _check_dataset(where, dataset_opt, opt)


def _check_dataset(where: str, ds: dict, opt: dict) -> None:
    from basicsr.utils.registry import DATASET_REGISTRY

    dataset_type = ds.get('type')
    if dataset_type is None:
        raise InputError(f'{where}.type is missing')
    if dataset_type not in DATASET_REGISTRY:
        raise InputError(f'{where}.type: no dataset named {dataset_type!r} is registered')
    on_corrupt = ds.get('on_corrupt', 'error')
    if on_corrupt not in ON_CORRUPT_CHOICES:
        raise InputError(f'{where}.on_corrupt: {on_corrupt!r}; use one of {", ".join(ON_CORRUPT_CHOICES)}')
    io_backend = (ds.get('io_backend') or {}).get('type')
    if io_backend is None:
        raise InputError(f'{where}.io_backend.type is missing')
    training = ds.get('phase') == 'train'
    if training:
        for key in ('batch_size_per_gpu', 'num_worker_per_gpu'):
            if ds.get(key) is None:
                raise InputError(f'{where}.{key} is missing')

    roots = {key: ds[key] for key in ('dataroot_gt', 'dataroot_lq') if ds.get(key) is not None}
    if not roots:
        raise InputError(f'{where}: neither dataroot_gt nor dataroot_lq is set')
    for key, root in roots.items():
        _check_root(f'{where}.{key}', root, io_backend)

    if dataset_type != 'PairedImageDataset':
        return  # other types read their data their own way; their roots exist, that is all we know
    if 'dataroot_gt' not in roots or 'dataroot_lq' not in roots:
        raise InputError(f'{where}: PairedImageDataset needs both dataroot_gt and dataroot_lq')
    scale = ds.get('scale')
    if scale is None:
        raise InputError(f'{opt["opt_file"]}: scale is missing')
    if training:
        for key in ('gt_size', 'use_hflip', 'use_rot'):
            if ds.get(key) is None:
                raise InputError(f'{where}.{key} is missing')

    if io_backend == 'lmdb':
        gt = _lmdb_entries(f'{where}.dataroot_gt', roots['dataroot_gt'])
        lq = _lmdb_entries(f'{where}.dataroot_lq', roots['dataroot_lq'])
        names_gt, names_lq = {k: k for k in gt}, {k: k for k in lq}
    elif ds.get('meta_info_file'):
        gt, lq, names_gt, names_lq = _meta_file_entries(where, ds)
    else:
        tmpl = ds.get('filename_tmpl', '{}')
        gt = _folder_entries(f'{where}.dataroot_gt', roots['dataroot_gt'])
        lq = _folder_entries(f'{where}.dataroot_lq', roots['dataroot_lq'])
        # PairedImageDataset pairs GT "name.ext" with LQ "<filename_tmpl.format(name)>.ext".
        names_gt = {f'{tmpl.format(osp.splitext(n)[0])}{osp.splitext(n)[1]}': n for n in gt}
        names_lq = {n: n for n in lq}
    _check_pairs(where, ds, roots, gt, lq, names_gt, names_lq, scale, training)
    if training:
        # The loader drops a partial batch: with no whole one an epoch is empty, and the run would
        # count its epochs through without a step. Under torchrun each rank samples 1/WORLD_SIZE.
        world = int(os.environ.get('WORLD_SIZE', '1')) if opt.get('launcher', 'none') == 'pytorch' else 1
        samples = math.ceil(len(names_gt) * ds.get('dataset_enlarge_ratio', 1) / world)
        if samples < ds['batch_size_per_gpu']:
            raise InputError(f'{where}: {_count(len(names_gt), "pair")} give no whole batch of batch_size_per_gpu '
                             f'{ds["batch_size_per_gpu"]}{f" on each of {world} GPUs" if world > 1 else ""}; lower '
                             'it or raise dataset_enlarge_ratio')


def _check_root(where: str, root: str, io_backend: str) -> None:
    shown = root if osp.isabs(root) else f'{root} (relative to {os.getcwd()})'
    if not osp.exists(root):
        raise InputError(f'{where}: {shown} does not exist')
    if io_backend == 'lmdb':
        if not root.endswith('.lmdb'):
            raise InputError(f'{where}: {root} must be an LMDB folder ending in .lmdb for io_backend lmdb')
        for name in ('data.mdb', 'meta_info.txt'):
            if not osp.isfile(osp.join(root, name)):
                raise InputError(f'{where}: {root} is not an LMDB: {name} is missing')
    elif not osp.isdir(root):
        raise InputError(f'{where}: {root} is not a folder')


META_LINE = re.compile(r'^(?P<name>\S+)\s+\((?P<h>\d+),\s*(?P<w>\d+),\s*(?P<c>\d+)\)')

# One entry per image: (height, width) or None when its header cannot be read, and a note on why.
Entry = Tuple[Optional[Tuple[int, int]], Optional[str]]


def _lmdb_entries(where: str, root: str) -> Dict[str, Entry]:
    """Key -> entry for an LMDB: its meta_info.txt, checked against the stored keys and headers.

    Reads only each value's first bytes through LMDB's zero-copy buffers, so a DF2K-sized LMDB
    takes seconds, not the minutes a full decode would.
    """
    import lmdb

    meta_path = osp.join(root, 'meta_info.txt')
    sizes = {}
    with open(meta_path) as meta:
        for number, line in enumerate(meta, 1):
            if not line.strip():
                continue
            match = META_LINE.match(line)
            if match is None:
                raise InputError(f'{where}: {meta_path} line {number} is not "name.png (h,w,c) level": {line.strip()!r}')
            key = match['name'].split('.')[0]  # BasicSR's lmdb key: the name up to its first dot
            sizes[key] = (int(match['h']), int(match['w']))
    if not sizes:
        raise InputError(f'{where}: {meta_path} lists no images')
    env = lmdb.open(root, readonly=True, lock=False, readahead=False, meminit=False)
    entries, absent = {}, []
    try:
        with env.begin(buffers=True) as txn:
            for key, size in sizes.items():
                value = txn.get(key.encode('ascii'))
                if value is None:
                    absent.append(key)
                    continue
                header, note = image_header_size(value)
                if header is not None and header != size:
                    note = f'meta_info.txt says {size[0]}x{size[1]} but the stored image is {header[0]}x{header[1]}'
                    header = None
                entries[key] = (header, note)
    finally:
        env.close()
    if absent:
        raise InputError(f'{where}: {meta_path} names {_count(len(absent), "key")} that {root} does not hold: '
                         f'{_examples(absent)}')
    return entries


def _folder_entries(where: str, root: str) -> Dict[str, Entry]:
    # BasicSR's paired_paths_from_folder takes every file of the folder but hidden ones: a notes.txt
    # beside the images would fail only when a worker decodes it, at the first validation or test.
    files = sorted(n for n in os.listdir(root) if not n.startswith('.') and osp.isfile(osp.join(root, n)))
    others = [n for n in files if not n.lower().endswith(IMAGE_SUFFIXES)]
    if others:
        raise InputError(f'{where}: {root} holds files that are not images ({_count(len(others), "file")}: '
                         f'{_examples(others)}); BasicSR reads every file of the folder, so move them out')
    if not files:
        raise InputError(f'{where}: {root} holds no images ({", ".join(IMAGE_SUFFIXES)})')
    return {name: _file_header_size(osp.join(root, name)) for name in files}


def _meta_file_entries(where: str, ds: dict):
    meta_file = ds['meta_info_file']
    if not osp.isfile(meta_file):
        raise InputError(f'{where}.meta_info_file: {meta_file} does not exist')
    tmpl = ds.get('filename_tmpl', '{}')
    gt, lq, names_gt, names_lq = {}, {}, {}, {}
    with open(meta_file) as meta:
        for line in meta:
            if not line.strip():
                continue
            gt_name = line.strip().split(' ')[0]
            base, ext = osp.splitext(osp.basename(gt_name))
            lq_name = f'{tmpl.format(base)}{ext}'
            for entries, names, root, name in ((gt, names_gt, ds['dataroot_gt'], gt_name),
                                               (lq, names_lq, ds['dataroot_lq'], lq_name)):
                file_path = osp.join(root, name)
                if not osp.isfile(file_path):
                    raise InputError(f'{where}.meta_info_file: {meta_file} names {name}, which is not in {root}')
                entries[name] = _file_header_size(file_path)
            names_gt[lq_name], names_lq[lq_name] = gt_name, lq_name
    return gt, lq, names_gt, names_lq


def _check_pairs(where: str, ds: dict, roots: dict, gt: Dict[str, Entry], lq: Dict[str, Entry],
                 names_gt: Dict[str, str], names_lq: Dict[str, str], scale: int, training: bool) -> None:
    """``names_*`` map the shared pair name to each side's own name."""
    only_gt = sorted(names_gt[n] for n in set(names_gt) - set(names_lq))
    only_lq = sorted(names_lq[n] for n in set(names_lq) - set(names_gt))
    if only_gt or only_lq:
        parts = []
        if only_gt:
            parts.append(f'{_count(len(only_gt), "image")} only in GT {roots["dataroot_gt"]}: {_examples(only_gt)}')
        if only_lq:
            parts.append(f'{_count(len(only_lq), "image")} only in LQ {roots["dataroot_lq"]}: {_examples(only_lq)}')
        raise InputError(f'{where}: GT and LQ hold different names ({"; ".join(parts)})')

    corrupt, ratio, small = [], [], []
    gt_size = ds.get('gt_size') if training else None
    for pair in sorted(names_gt):
        gt_name, lq_name = names_gt[pair], names_lq[pair]
        (gt_hw, gt_note), (lq_hw, lq_note) = gt[gt_name], lq[lq_name]
        if gt_hw is None or lq_hw is None:
            corrupt.append(f'{gt_name if gt_hw is None else lq_name} ({gt_note if gt_hw is None else lq_note})')
            continue
        if training:
            fits = gt_hw == (lq_hw[0] * scale, lq_hw[1] * scale)
        else:  # PairedImageDataset crops GT to scale x LQ for testing: allow what a modcrop removes
            fits = all(lq_side * scale <= gt_side < (lq_side + 1) * scale for gt_side, lq_side in zip(gt_hw, lq_hw))
        if not fits:
            ratio.append(f'{gt_name} GT {gt_hw[0]}x{gt_hw[1]} vs LQ {lq_hw[0]}x{lq_hw[1]}')
        elif gt_size is not None and min(gt_hw) < gt_size:
            small.append(f'{gt_name} ({gt_hw[0]}x{gt_hw[1]})')
    if ratio:
        raise InputError(f'{where}: {_count(len(ratio), "pair")} with a GT/LQ size ratio other than scale {scale}: '
                         f'{_examples(ratio)}')
    if small:
        raise InputError(f'{where}: {_count(len(small), "GT image")} smaller than gt_size {gt_size}: '
                         f'{_examples(small)} in {roots["dataroot_gt"]}')
    if corrupt:
        summary = f'{_count(len(corrupt), "image")} cannot be read: {_examples(corrupt)}'
        if ds.get('on_corrupt', 'error') == 'error':
            raise InputError(f'{where}: {summary}; fix them, or set {where}.on_corrupt: skip')
        print(f'warning: {where}: {summary}; they will be skipped (on_corrupt: skip)', file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Image headers
# ---------------------------------------------------------------------------------------------

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def image_header_size(data) -> Entry:
    """((height, width), None) from the first bytes of an encoded image, or (None, why not)."""
    head = bytes(data[:33])
    if head[:8] == PNG_SIGNATURE:
        if len(head) < 24 or head[12:16] != b'IHDR':
            return None, 'PNG header is truncated'
        width, height = int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big')
        return ((height, width), None) if width and height else (None, 'PNG header gives a zero size')
    return _pillow_size(io.BytesIO(bytes(data)))


def _file_header_size(path: str) -> Entry:
    try:
        with open(path, 'rb') as f:
            head = f.read(33)
            if head[:8] == PNG_SIGNATURE:
                return image_header_size(head)
            f.seek(0)
            return _pillow_size(f)
    except OSError as error:
        return None, f'cannot be opened: {error.strerror}'


def _pillow_size(stream) -> Entry:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(stream) as image:  # reads the header only
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        return None, f'not a readable image ({type(error).__name__})'
    return ((height, width), None) if width and height else (None, 'header gives a zero size')


# ---------------------------------------------------------------------------------------------
# Corrupt images met while training
# ---------------------------------------------------------------------------------------------


def checked_imfrombytes(imfrombytes: Callable) -> Callable:
    """BasicSR's ``imfrombytes``, raising :class:`CorruptImageError` where it would return None or crash."""

    def decode(content, flag='color', float32=False):
        if content is None:
            raise CorruptImageError('no bytes (the key is missing from the LMDB)')
        try:
            img = imfrombytes(content, flag=flag, float32=False)
        except cv2.error as error:
            raise CorruptImageError(f'OpenCV cannot decode it ({one_line(error)[:120]})') from None
        if img is None:
            raise CorruptImageError('OpenCV cannot decode it')
        # BasicSR scales by 255 whatever the depth; done the same here to change nothing else.
        return img.astype(np.float32) / 255. if float32 else img

    decode.__doc__ = imfrombytes.__doc__
    return decode


class CorruptImageGuard(Dataset):
    """A training set that meets undecodable images the way ``on_corrupt`` says.

    ``error``: stop with one line naming the image. ``skip``: log a warning with the running count
    (kept per data-loader worker) and return the next decodable sample instead, so the batch keeps
    its size and the sampler its length.

    Args:
        dataset: The data set BasicSR built.
        where: Its option key, for messages (``datasets.train``).
        on_corrupt: ``'error'`` or ``'skip'``.
    """

    def __init__(self, dataset: Dataset, where: str, on_corrupt: str) -> None:
        self.dataset, self.where, self.on_corrupt = dataset, where, on_corrupt
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):
        # BasicSR reads attributes such as ``opt`` off the data set; pass them through. ``dataset``
        # itself is looked up here only while unpickling in a worker, before it is set.
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int):
        for attempt in range(MAX_CONSECUTIVE_CORRUPT):
            current = (index + attempt) % len(self.dataset)
            try:
                return self.dataset[current]
            except CorruptImageError as error:
                culprit = self._culprit(current, error)
                if self.on_corrupt == 'error':
                    raise InputError(f'{self.where}: {culprit}; remove it, or set {self.where}.on_corrupt: skip') from None
                self.skipped += 1
                from basicsr.utils import get_root_logger
                get_root_logger().warning(f'{self.where}: skipped {culprit} ({self.skipped} skipped so far '
                                          f'in this data-loader worker)')
        raise InputError(f'{self.where}: {MAX_CONSECUTIVE_CORRUPT} images in a row from index {index} cannot be '
                         'decoded; the data set looks broken')

    def _culprit(self, index: int, error: CorruptImageError) -> str:
        """Which image of the pair at ``index`` failed, found by decoding each again."""
        paths = getattr(self.dataset, 'paths', None)
        client = getattr(self.dataset, 'file_client', None)
        opt = getattr(self.dataset, 'opt', {})
        if not isinstance(paths, list) or not isinstance(paths[index], dict) or client is None:
            return f'sample {index} cannot be decoded: {error}'
        for side in ('gt', 'lq'):
            path = paths[index].get(f'{side}_path')
            if path is None:
                continue
            try:
                content = client.get(path, side)
                bad = content is None or cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_UNCHANGED) is None
            except (cv2.error, OSError):
                bad = True
            if bad:
                return f'{side.upper()} image {path!r} in {opt.get(f"dataroot_{side}", "?")} cannot be decoded'
        return f'sample {index} ({paths[index]}) cannot be decoded: {error}'


def non_finite_losses(log: Dict[str, float]) -> Dict[str, float]:
    return {name: value for name, value in log.items() if isinstance(value, float) and not math.isfinite(value)}


def last_checkpoint_note(opt: dict) -> str:
    states = _training_states(opt)
    if not states:
        return 'no checkpoint had been saved yet'
    return f'the last good checkpoint is {states[0][1]} with its networks in {opt["path"]["models"]}'
