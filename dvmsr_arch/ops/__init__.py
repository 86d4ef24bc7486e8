from .causal_conv import causal_conv1d_silu
from .fused_triton import low_memory_inference
from .selective_scan import (BACKENDS, ENV_VAR, available_backends, check_backend_name, resolve_backend,
                             selective_scan)

__all__ = ['BACKENDS', 'ENV_VAR', 'available_backends', 'causal_conv1d_silu', 'check_backend_name',
           'low_memory_inference', 'resolve_backend', 'selective_scan']
