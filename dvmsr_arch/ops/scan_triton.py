"""Triton backend: a fused, sequence-parallel selective scan for CUDA GPUs (not written yet)."""
from typing import Optional

import torch


def why_unavailable(device: torch.device) -> Optional[str]:
    return 'the triton backend is not implemented yet'


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    raise NotImplementedError(why_unavailable(u.device))
