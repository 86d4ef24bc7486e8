"""Backend that calls the compiled CUDA kernels of mamba-ssm (and causal-conv1d when present)."""
from typing import Optional

import torch


def why_unavailable(device: torch.device) -> Optional[str]:
    if device.type != 'cuda':
        return f'mamba_ssm runs on CUDA tensors only, these are on {device.type}'
    try:
        import selective_scan_cuda  # noqa: F401  (the compiled extension mamba_ssm ships)
    except ImportError as error:
        return f'mamba_ssm is not installed or not built for this machine ({error}); try `pip install -e .[mamba]`'
    return None


def selective_scan_mamba(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def causal_conv1d_cuda(x, weight, bias, activation):
    """causal-conv1d's kernel, or None when that package is absent."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        return None
    return causal_conv1d_fn(x, weight.squeeze(1), bias, activation=activation)
