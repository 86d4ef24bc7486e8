"""Triton kernel launches with less CPU time per launch.

``kernel[grid](*args)`` binds and specialises every argument, looks the compiled kernel up and reads
Triton's settings on each call, in Python. An eager DVMSR forward makes 48 such launches, and at LR
339x510 and below the CPU needed about as long to issue a forward as the GPU needs to run it
(docs/performance.md, version 9: ``benchmark.py report --triton-launch jit`` measures that path).

:func:`launch` goes through Triton the first time a call's arguments come, then calls the compiled
kernel directly for calls that Triton would specialise the same way. What Triton specialises on is
a function of the integer arguments' values and the tensors' dtypes and 16-byte alignment, so those
(with the keyword arguments and the device) make the key. Every kernel here takes its tensors first
and its scalars after them, so the key takes the scalars as one slice and looks only at the leading
tensors, which keeps building it cheap; a call that breaks that order takes Triton's path.

The direct call depends on Triton's internal calling convention, so it is used only with the Triton
versions it was checked with (``DIRECT_TRITON_VERSIONS``), for CUDA tensors, and for calls that
first came while no Triton launch hook was installed (a profiler that adds one later does not see
them); everything else takes Triton's own path.
"""
import inspect
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

DIRECT_TRITON_VERSIONS = ('3.6',)
MAX_KEYS = 4096  # one per kernel, image size and call site in use; forgotten all at once past this

_direct: Dict[Hashable, Optional[Tuple[Any, tuple]]] = {}  # None: this call goes through Triton each time
_leading_tensors: Dict[int, int] = {}  # id(kernel) -> how many of its positional arguments are tensors
_UNSEEN = object()
_supported: Optional[bool] = None
_enabled = True


def set_direct_launches(enabled: bool) -> None:
    """Allow the direct calls (the default) or send every launch through Triton's own path, as
    ``benchmark.py report --triton-launch jit`` does to measure what they save."""
    global _enabled
    _enabled = enabled


def launch(kernel, grid: Sequence[int], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``: positional arguments are the kernel's runtime arguments
    (in order, first), keyword arguments its constexprs and launch options (``num_warps``...)."""
    first = args[0]
    if not (_enabled and isinstance(first, Tensor) and first.is_cuda and _direct_supported()):
        kernel[grid](*args, **kwargs)
        return
    device = torch._C._cuda_getDevice()  # where Triton launches (CUDA is initialised: a tensor is on it)
    try:
        key, pointers = _key(kernel, device, args, kwargs)
        entry = _direct.get(key, _UNSEEN)
    except AttributeError:  # a scalar where this kernel had a tensor
        entry = _UNSEEN
    if entry is _UNSEEN:
        compiled = kernel[grid](*args, **kwargs)
        leading = _count_leading_tensors(args)
        if any(isinstance(a, Tensor) for a in args[leading:]):
            return  # tensors after a scalar: never keyed (a key must not hold a tensor), Triton's path each time
        _leading_tensors[id(kernel)] = leading
        constexprs = _trailing_arguments(kernel, len(args), kwargs)
        entry = None
        if constexprs is not None and _no_launch_hooks() and hasattr(compiled, '_init_handles'):
            compiled._init_handles()
            entry = (compiled, constexprs)
        if len(_direct) >= MAX_KEYS:
            _direct.clear()
        _direct[_key(kernel, device, args, kwargs)[0]] = entry
    elif entry is None:
        kernel[grid](*args, **kwargs)
    else:
        compiled, constexprs = entry
        grid_x, grid_y, grid_z = (*grid, 1, 1)[:3]
        # No launch metadata and no hooks: what Triton's launcher gets to do with empty hook chains.
        # The tensors go as their addresses, which the launcher takes as they are; given a tensor it
        # would ask for its address and have the driver check it, which the first call with this key
        # (on CUDA tensors, as the key says) did.
        compiled.run(grid_x, grid_y, grid_z, torch._C._cuda_getCurrentRawStream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *pointers, *args[len(pointers):], *constexprs)


def compiled_kernels() -> List[Tuple[str, int, int, int]]:
    """(name, registers a thread, spilled 4-byte words a thread, warps) of every compiled kernel that
    :func:`launch` now calls directly, each combination once, sorted: what a report shows of the
    kernels that ran (``benchmark.py profile``). Empty where no call took the direct path."""
    found = set()
    for entry in _direct.values():
        if entry is not None:
            compiled = entry[0]
            found.add((compiled.name, compiled.n_regs, compiled.n_spills, compiled.metadata.num_warps))
    return sorted(found)


def _key(kernel, device: int, args: tuple, kwargs: Dict[str, Any]) -> Tuple[tuple, List[int]]:
    """What Triton's specialisation depends on: the scalars as they are, and each leading tensor's
    dtype and 16-byte alignment (and that it is on CUDA); with the leading tensors' addresses. Raises
    AttributeError where a leading position holds no tensor."""
    leading = _leading_tensors.get(id(kernel), 0)
    tensors = args[:leading]
    pointers = [t.data_ptr() for t in tensors]
    key = (id(kernel), device, leading, tuple(kwargs.items()), args[leading:],
           *[(t.dtype, t.is_cuda) for t in tensors], *[p % 16 == 0 for p in pointers])
    return key, pointers


def _count_leading_tensors(args: tuple) -> int:
    for index, arg in enumerate(args):
        if not isinstance(arg, Tensor):
            return index
    return len(args)


def _trailing_arguments(kernel, given: int, kwargs: Dict[str, Any]) -> Optional[tuple]:
    """The values of the kernel's parameters after the ``given`` positional ones (its constexprs),
    in order, from ``kwargs`` or their defaults; None where one has neither."""
    try:
        parameters = list(inspect.signature(kernel.fn).parameters.values())[given:]
    except (AttributeError, TypeError, ValueError):
        return None
    values = []
    for parameter in parameters:
        if parameter.name in kwargs:
            values.append(kwargs[parameter.name])
        elif parameter.default is not inspect.Parameter.empty:
            values.append(parameter.default)
        else:
            return None
    return tuple(values)


def _direct_supported() -> bool:
    global _supported
    if _supported is None:
        try:
            import triton
            _supported = '.'.join(triton.__version__.split('.')[:2]) in DIRECT_TRITON_VERSIONS
        except ImportError:
            _supported = False
    return _supported


def _no_launch_hooks() -> bool:
    """Whether Triton would call no hook around a launch: none set, or empty hook chains (Triton 3.6
    keeps its hooks in chains that start empty)."""
    try:
        from triton import knobs
        hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    except (ImportError, AttributeError):
        return False
    return all(hook is None or not getattr(hook, 'calls', True) for hook in hooks)
