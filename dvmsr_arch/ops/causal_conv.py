"""Depthwise causal Conv1d + SiLU, as the Mamba mixer uses it."""
import torch.nn.functional as F
from torch import Tensor

from . import scan_mamba


def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor, backend: str) -> Tensor:
    """x (batch, E, L), weight (E, 1, K): each output token sees itself and the K-1 tokens before it."""
    if backend == 'mamba_ssm':
        out = scan_mamba.causal_conv1d_cuda(x, weight, bias, activation='silu')
        if out is not None:
            return out
    out = F.conv1d(F.pad(x, (weight.shape[-1] - 1, 0)), weight, bias, groups=x.shape[1])
    return F.silu(out, inplace=not out.requires_grad)
