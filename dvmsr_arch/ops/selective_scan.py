"""One door to the selective scan: the network calls :func:`selective_scan`, a backend does the work.

Backends (all take mamba_ssm's argument layout and return the same numbers):

``ref``        the sequential recurrence, the definition; tests only.
``torch``      chunked pure PyTorch, any device, autograd; the CPU default.
``mamba_ssm``  mamba-ssm's compiled CUDA kernel (``pip install -e .[mamba]``).
``triton``     a fused Triton kernel for CUDA.

Which one runs: a value other than ``auto`` passed by the caller wins; otherwise the environment
variable ``DVMSR_SCAN_BACKEND`` (if set to something other than ``auto``); otherwise ``auto``,
the fastest backend available on the tensors' device.
"""
import os
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from . import scan_mamba, scan_triton
from .scan_ref import selective_scan_ref
from .scan_torch import selective_scan_torch

BACKENDS = ('auto', 'ref', 'torch', 'mamba_ssm', 'triton')
ENV_VAR = 'DVMSR_SCAN_BACKEND'
# Fastest first: what ``auto`` tries on a CUDA device.
CUDA_PREFERENCE = ('triton', 'mamba_ssm', 'torch')

_IMPLEMENTATIONS: Dict[str, Callable[..., Tensor]] = {
    'ref': selective_scan_ref,
    'torch': selective_scan_torch,
    'mamba_ssm': scan_mamba.selective_scan_mamba,
    'triton': scan_triton.selective_scan_triton,
}


def check_backend_name(name: str, source: str = 'scan_backend') -> str:
    if name not in BACKENDS:
        raise ValueError(f'{source}={name!r} is not a selective-scan backend; choose one of {", ".join(BACKENDS)}')
    return name


def why_unavailable(name: str, device: torch.device) -> Optional[str]:
    """None when backend ``name`` can run on ``device``, else the reason it cannot."""
    if name in ('ref', 'torch'):
        return None
    if name == 'mamba_ssm':
        return scan_mamba.why_unavailable(device)
    return scan_triton.why_unavailable(device)


def available_backends(device) -> list:
    device = torch.device(device)
    return [name for name in BACKENDS[1:] if why_unavailable(name, device) is None]


_resolved: Dict[tuple, str] = {}


def resolve_backend(requested: str = 'auto', device='cpu') -> str:
    """The concrete backend that :func:`selective_scan` would use for tensors on ``device``.

    Asked once per mixer in every forward: an answer is kept for the same request, device and
    environment (the variables it reads), since what is installed does not change mid-run."""
    key = (requested, device, os.environ.get(ENV_VAR), os.environ.get('TRITON_INTERPRET'))
    name = _resolved.get(key)
    if name is None:
        name = _resolved[key] = _resolve_backend(requested, torch.device(device))
    return name


def _resolve_backend(requested: str, device: torch.device) -> str:
    name = check_backend_name(requested)
    if name == 'auto':
        name = check_backend_name(os.environ.get(ENV_VAR, 'auto') or 'auto', source=ENV_VAR)
    if name == 'auto':
        if device.type != 'cuda':
            return 'torch'
        return next(n for n in CUDA_PREFERENCE if why_unavailable(n, device) is None)
    reason = why_unavailable(name, device)
    if reason is not None:
        raise RuntimeError(f'selective-scan backend {name!r} cannot run here: {reason}')
    return name


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   backend: str = 'auto') -> Tensor:
    """y = selective scan of ``u`` (see :mod:`dvmsr_arch.ops.scan_ref` for the exact definition).

    u, delta, z: (batch, E, L); A: (E, N); B, C: (batch, N, L); D, delta_bias: (E,).
    """
    name = resolve_backend(backend, u.device)
    return _IMPLEMENTATIONS[name](u, delta, A, B, C, D, z, delta_bias, delta_softplus)
