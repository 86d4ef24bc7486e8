"""Inference replayed from CUDA graphs, one per input shape.

An eager DVMSR forward issues about 70 kernels, each launched from Python; for small inputs the CPU
takes longer to launch them than the GPU takes to run them (docs/benchmarks.md: 4.06 ms eager against
2.43 ms replayed at LR 256x256 on an H100). A CUDA graph issues the whole forward at once. Capturing
one costs about three forwards, so it pays where input shapes repeat: the tiles of tiled inference,
frames of a video, a benchmark's repeated runs.
"""
from collections import OrderedDict
from typing import Callable, Hashable, Tuple

import torch
from torch import Tensor

from dvmsr_arch.archs.dvmsr_arch import _autocast_dtype
from dvmsr_arch.ops.fused_triton import low_memory_enabled


class CudaGraphInference:
    """``model(x)`` for CUDA inputs, replayed from a CUDA graph captured the first time each input
    shape (and dtype, device, precision settings) comes; other inputs, and calls under autograd, run
    the model eagerly.

    Each call copies ``x`` into the graph's own input and returns a copy of its output, so a result
    stays valid after later calls. All graphs share one memory pool: their intermediate buffers
    overlap, which is safe because replays run one after another on the current stream and each
    output is copied before the next replay.

    Args:
        model: The network, in eval mode; it must not change between calls (its weights are read in
            place by the graphs).
        max_graphs: Shapes kept at once; the one used longest ago is dropped first.
    """

    def __init__(self, model: Callable[[Tensor], Tensor], *, max_graphs: int = 32) -> None:
        if max_graphs < 1:
            raise ValueError(f'max_graphs={max_graphs} must be at least 1')
        self.model = model
        self.max_graphs = max_graphs
        self._graphs: 'OrderedDict[Hashable, Tuple[torch.cuda.CUDAGraph, Tensor, Tensor]]' = OrderedDict()
        self._pool = None

    def __call__(self, x: Tensor) -> Tensor:
        if x.device.type != 'cuda' or torch.is_grad_enabled():
            return self.model(x)
        key = (tuple(x.shape), x.stride(), x.dtype, x.device, _autocast_dtype('cuda'),
               torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, low_memory_enabled())
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(x)
            self._graphs[key] = entry
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, static_input, static_output = entry
        static_input.copy_(x)
        graph.replay()
        return static_output.clone()

    def _capture(self, x: Tensor) -> Tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        # The input lives outside the pool, so no other graph's buffers overlap it.
        static_input = x.clone()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, static_output = capture_graph(self.model, static_input, self._pool)
        return graph, static_input, static_output


def capture_graph(model: Callable[[Tensor], Tensor], x: Tensor, pool=None) -> Tuple[torch.cuda.CUDAGraph, Tensor]:
    """One forward ``model(x)`` without autograd, captured as a CUDA graph (its memory from ``pool``
    if given), and the output tensor the graph writes. Two warm-up forwards run first, on a side
    stream: Triton compiles, cuBLAS and cuDNN pick their kernels, and the model builds the tensors it
    keeps (padded weights) before the graph records."""
    with torch.no_grad():
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                model(x)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = model(x)
    return graph, output
