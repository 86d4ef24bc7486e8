"""Build a network for inference and analysis: from an option file or the registry, with its weights.

Networks in the registry do not agree on the range of their input: DVMSR and BasicSR's own networks
take RGB in [0, 1], RLFN (as released for NTIRE) takes [0, 255]. :data:`INPUT_RANGES` names the
exceptions by architecture; :class:`RangeAdapter` wraps any of them so that the scripts always feed
[0, 1] and get [0, 1] back. ``--input-range`` overrides the table, for any network.
"""
import argparse
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import yaml
from basicsr.utils.registry import ARCH_REGISTRY
from torch import Tensor, nn

import dvmsr_arch  # noqa: F401  (registers this package's networks)
from dvmsr_arch.checks import describe_state_dict_mismatch

DEFAULT_ARCH = 'DVMSR'
# Input range by architecture name; every other network is taken to follow BasicSR's [0, 1].
INPUT_RANGES: Dict[str, float] = {'DVMSR': 1.0, 'RLFN': 255.0}


class RangeAdapter(nn.Module):
    """Calls ``net`` on ``x * input_range`` and scales its output back, so callers speak [0, 1]."""

    def __init__(self, net: nn.Module, input_range: float) -> None:
        super().__init__()
        self.net = net
        self.input_range = input_range

    def forward(self, x: Tensor) -> Tensor:
        if self.input_range == 1.0:
            return self.net(x)
        return self.net(x * self.input_range) / self.input_range


def build_network(*, arch: Optional[str] = None, opt_path: Optional[str] = None) -> Tuple[nn.Module, str]:
    """(network, architecture name) from the ``network_g`` section of an option file, or from the
    registry with the architecture's default constructor (the released student when neither is given)."""
    if arch is not None and opt_path is not None:
        raise ValueError('give either --arch or --opt, not both')
    if opt_path is not None:
        path = Path(opt_path)
        if not path.is_file():
            raise ValueError(f'{path}: no such option file')
        with open(path, encoding='utf-8') as handle:
            opt = yaml.safe_load(handle)
        section = opt.get('network_g') if isinstance(opt, dict) else None
        if not isinstance(section, dict) or 'type' not in section:
            raise ValueError(f'{path}: needs a network_g section with a type')
        kwargs = dict(section)
        arch = kwargs.pop('type')
    else:
        arch = arch or DEFAULT_ARCH
        kwargs = {}
    # BasicSR registers some of its own networks under NAME_basicsr and looks that up as a fallback.
    registered = next((name for name in (arch, f'{arch}_basicsr') if name in ARCH_REGISTRY), None)
    if registered is None:
        raise ValueError(f'network {arch!r} is not in the registry (is its *_arch.py imported?)')
    try:
        return ARCH_REGISTRY.get(registered)(**kwargs), arch
    except TypeError as error:
        raise ValueError(f'{opt_path or arch}: cannot build {arch}: {error}') from None


def load_weights(net: nn.Module, checkpoint: str) -> str:
    """Load a plain state_dict or BasicSR's ``{'params', 'params_ema'}`` (params_ema preferred) strictly.

    Returns the key that was used ('params_ema', 'params' or '' for a plain state_dict).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise ValueError(f'{path}: no such checkpoint')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # torch raises many types for a file that is not a checkpoint
        raise ValueError(f'{path}: not a readable PyTorch checkpoint ({type(error).__name__})') from None
    key = next((k for k in ('params_ema', 'params') if isinstance(state, dict) and k in state), '')
    if key:
        state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f'{path}: holds no state_dict')
    # DataParallel / DistributedDataParallel save their keys under 'module.'.
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    problems = describe_state_dict_mismatch(net.state_dict(), state)
    if problems:
        raise ValueError(f'{path}: does not fit {type(net).__name__}: {problems}')
    net.load_state_dict(state, strict=True)
    return key


@torch.no_grad()
def network_scale(model: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32) -> int:
    """The scale factor, read off one forward pass on a small image: no attribute naming convention needed."""
    probe = torch.zeros(1, 3, 16, 16, device=device, dtype=dtype)
    out = model(probe)
    if out.shape[-1] % 16 or out.shape[-2] != out.shape[-1]:
        raise ValueError(f'cannot tell the scale of {type(model).__name__}: 16x16 gave {tuple(out.shape[-2:])}')
    return out.shape[-1] // 16


def resolve_device(name: str) -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {name}: CUDA is not available on this machine')
    return device


def add_network_arguments(parser: argparse.ArgumentParser, *, with_model_path: bool = True) -> None:
    """The options every script uses to pick a network: --opt/--arch, --model-path, --input-range."""
    group = parser.add_argument_group('network')
    choice = group.add_mutually_exclusive_group()
    choice.add_argument('--opt', help='option file whose network_g section builds the network '
                        f'(default: {DEFAULT_ARCH} with its default arguments, the released x4 student)')
    choice.add_argument('--arch', help='a network in the registry, built with its default arguments (e.g. RLFN)')
    if with_model_path:
        group.add_argument('--model-path', required=True,
                           help='checkpoint: a plain state_dict or BasicSR {params, params_ema} (params_ema preferred)')
    group.add_argument('--input-range', type=float, default=None,
                       help='the network takes RGB in [0, R]; default by architecture: '
                       + ', '.join(f'{k} {v:g}' for k, v in INPUT_RANGES.items()) + ', others 1')


def parse_model_spec(values) -> Tuple[str, str, Optional[str], Optional[str]]:
    """(label, checkpoint, arch, option file) from the CLI form LABEL CHECKPOINT [NETWORK], NETWORK
    being a registry name or an option file (.yml/.yaml); neither means the default network."""
    if len(values) not in (2, 3):
        raise ValueError(f'a model is LABEL CHECKPOINT [NETWORK], got {len(values)} values: {" ".join(values)}')
    label, checkpoint = values[0], values[1]
    network = values[2] if len(values) == 3 else None
    if network is not None and network.endswith(('.yml', '.yaml')):
        return label, checkpoint, None, network
    return label, checkpoint, network, None


def load_model(*, arch: Optional[str], opt_path: Optional[str], checkpoint: str,
               input_range: Optional[float] = None) -> Tuple[RangeAdapter, str]:
    """A network with its weights, in eval mode, wrapped to take and give [0, 1]; and its arch name."""
    net, arch_name = build_network(arch=arch, opt_path=opt_path)
    load_weights(net, checkpoint)
    if input_range is None:
        input_range = INPUT_RANGES.get(arch_name, 1.0)
    if input_range <= 0:
        raise ValueError(f'--input-range must be positive, got {input_range:g}')
    return RangeAdapter(net, input_range).eval(), arch_name
