"""dvmsr_arch.ops.launch: which calls reach the compiled kernel directly, and with what arguments.

A fake kernel stands in for Triton's (CI has no GPU): it records the calls that go through
``kernel[grid](...)`` and those that reach the compiled kernel's launcher.
"""
from types import SimpleNamespace

import pytest
import torch

from dvmsr_arch.ops import launch as launch_module


class OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA, so ``launch`` takes its CUDA path."""
    is_cuda = True


def on_cuda(tensor):
    return torch.Tensor._make_subclass(OnCuda, tensor)


def kernel_body(x_ptr, n, BLOCK, FLAG=7):
    pass


class FakeCompiled:
    function, packed_metadata = 'function', 'metadata'

    def __init__(self, log, name='kernel_body', registers=40, spilled=0, warps=4):
        self.log = log
        self.name, self.n_regs, self.n_spills = name, registers, spilled
        self.metadata = SimpleNamespace(num_warps=warps)

    def _init_handles(self):
        pass

    def run(self, *call):
        self.log.append(('direct', call))


class FakeKernel:
    fn = staticmethod(kernel_body)

    def __init__(self, **resources):
        self.log = []
        self.resources = resources  # what its compiled kernel reports (FakeCompiled's keywords)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(('triton', grid, args, kwargs))
            return FakeCompiled(self.log, **self.resources)
        return run


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(launch_module, '_direct', {})
    monkeypatch.setattr(launch_module, '_leading_tensors', {})
    monkeypatch.setattr(launch_module, '_supported', True)
    monkeypatch.setattr(launch_module, '_no_launch_hooks', lambda: True)
    monkeypatch.setattr(torch._C, '_cuda_getDevice', lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, '_cuda_getCurrentRawStream', lambda device: 1234, raising=False)


def test_direct_call_after_the_first_launch(fake_cuda):
    kernel = FakeKernel()
    x = on_cuda(torch.zeros(64))
    launch_module.launch(kernel, (5,), x, 64, BLOCK=32, num_warps=4)
    launch_module.launch(kernel, (5,), x, 64, BLOCK=32, num_warps=4)
    assert kernel.log[0] == ('triton', (5,), (x, 64), {'BLOCK': 32, 'num_warps': 4})
    # grid padded to three axes, the current stream, no launch metadata or hooks, then every
    # parameter in order: the runtime arguments (the tensor as its address), BLOCK from the keywords,
    # FLAG's default; num_warps is a launch option, not a parameter.
    assert kernel.log[1] == ('direct', (5, 1, 1, 1234, 'function', 'metadata', None, None, None, x.data_ptr(), 64,
                                        32, 7))
    assert len(kernel.log) == 2


def test_whatever_triton_specialises_on_goes_through_triton_again(fake_cuda):
    kernel = FakeKernel()
    storage = torch.zeros(64)
    aligned, unaligned = on_cuda(storage[:32]), on_cuda(storage[1:33])  # 16-byte aligned, and 4 bytes past
    calls = [((aligned, 64), {'BLOCK': 32}),
             ((aligned, 64), {'BLOCK': 32}),  # the same: direct
             ((aligned, 65), {'BLOCK': 32}),  # another integer value
             ((unaligned, 64), {'BLOCK': 32}),  # another alignment
             ((on_cuda(torch.zeros(64, dtype=torch.float16)), 64), {'BLOCK': 32}),  # another dtype
             ((aligned, 64), {'BLOCK': 64}),  # another constexpr
             ((aligned, 64), {'BLOCK': 32, 'FLAG': 1})]  # a default overridden
    for args, kwargs in calls:
        launch_module.launch(kernel, (1,), *args, **kwargs)
    assert [entry[0] for entry in kernel.log] == ['triton', 'direct'] + ['triton'] * 5


def kernel_body_two(x_ptr, y_ptr, n, BLOCK):
    pass


def test_calls_that_break_tensors_then_scalars_take_tritons_path(fake_cuda):
    """The key reads the leading tensors and takes the rest as scalars: a call where a tensor comes
    after a scalar is never keyed (a key must hold no tensor), and one with a scalar where the
    kernel had a tensor is keyed anew."""
    kernel = FakeKernel()
    kernel.fn = kernel_body_two
    x, y = on_cuda(torch.zeros(4)), on_cuda(torch.zeros(4))
    for _ in range(2):
        launch_module.launch(kernel, (1,), x, 4, y, BLOCK=4)
    assert not launch_module._direct
    for args in [(x, y, 4)] * 2 + [(x, 0, 4)] * 2 + [(x, y, 4)] * 2:
        launch_module.launch(kernel, (1,), *args, BLOCK=4)
    assert [entry[0] for entry in kernel.log] == ['triton'] * 3 + ['direct'] + ['triton', 'direct'] * 2
    assert kernel.log[-1][1][9:] == (x.data_ptr(), y.data_ptr(), 4, 4)
    assert not any(isinstance(part, torch.Tensor) for key in launch_module._direct for part in key)


def test_a_tensor_off_cuda_goes_through_tritons_checks(fake_cuda):
    """Direct calls pass addresses, which the launcher does not check: a tensor that is not on CUDA
    must make another key, so that Triton's path sees it."""
    kernel = FakeKernel()
    kernel.fn = kernel_body_two
    x, y = on_cuda(torch.zeros(4)), on_cuda(torch.zeros(4))
    for second in (y, y, torch.zeros(4)):
        launch_module.launch(kernel, (1,), x, second, 4, BLOCK=4)
    assert [entry[0] for entry in kernel.log] == ['triton', 'direct', 'triton']


def test_cpu_tensors_and_other_triton_versions_take_tritons_path(fake_cuda, monkeypatch):
    kernel = FakeKernel()
    for _ in range(2):
        launch_module.launch(kernel, (1,), torch.zeros(4), 4, BLOCK=4)
    monkeypatch.setattr(launch_module, '_supported', False)
    for _ in range(2):
        launch_module.launch(kernel, (1,), on_cuda(torch.zeros(4)), 4, BLOCK=4)
    assert [entry[0] for entry in kernel.log] == ['triton'] * 4


def test_a_parameter_without_value_or_default_is_never_called_directly(fake_cuda):
    kernel = FakeKernel()
    x = on_cuda(torch.zeros(4))
    for _ in range(2):
        launch_module.launch(kernel, (1,), x, 4)  # BLOCK missing: Triton itself would refuse it
    assert [entry[0] for entry in kernel.log] == ['triton', 'triton']


def test_hooks_are_empty_chains_or_none(monkeypatch):
    from types import SimpleNamespace
    triton = pytest.importorskip('triton')
    runtime = SimpleNamespace(launch_enter_hook=None, launch_exit_hook=SimpleNamespace(calls=[]))
    monkeypatch.setattr(triton, 'knobs', SimpleNamespace(runtime=runtime), raising=False)
    assert launch_module._no_launch_hooks()
    runtime.launch_exit_hook.calls.append(print)
    assert not launch_module._no_launch_hooks()
    runtime.launch_exit_hook = print  # a plain callable
    assert not launch_module._no_launch_hooks()


def test_compiled_kernels_lists_each_directly_called_kernel_once(fake_cuda):
    x = on_cuda(torch.zeros(64))
    assert launch_module.compiled_kernels() == []
    scan, norm = FakeKernel(name='scan', registers=128, spilled=0, warps=2), FakeKernel(name='norm', registers=255,
                                                                                        spilled=24, warps=1)
    for n in (64, 32, 64):  # two keys for the scan, one compiled kernel each
        launch_module.launch(scan, (1,), x, n, BLOCK=32)
    launch_module.launch(norm, (1,), x, 64, BLOCK=32)
    assert launch_module.compiled_kernels() == [('norm', 255, 24, 1), ('scan', 128, 0, 2)]


def test_direct_launches_can_be_turned_off(fake_cuda):
    kernel = FakeKernel()
    x = on_cuda(torch.zeros(4))
    try:
        launch_module.set_direct_launches(False)
        for _ in range(2):
            launch_module.launch(kernel, (1,), x, 4, BLOCK=4)
        launch_module.set_direct_launches(True)
        for _ in range(2):
            launch_module.launch(kernel, (1,), x, 4, BLOCK=4)
    finally:
        launch_module.set_direct_launches(True)
    assert [entry[0] for entry in kernel.log] == ['triton', 'triton', 'triton', 'direct']


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (Triton compiles the real kernels)')
def test_direct_launches_give_what_tritons_path_gives():
    """A small DVMSR on the GPU: forwards at two sizes and a training step's gradients, through
    Triton's own path and then, from the second call of each size on, straight to the compiled
    kernels. The same kernels on the same inputs: the results must be bit-identical."""
    from dvmsr_arch.archs.dvmsr_arch import DVMSR
    torch.manual_seed(0)
    net = DVMSR(embed_dim=12, depths=(1, 1), d_state=8, drop_path_rate=0.0).cuda()
    images = [torch.rand(2, 3, 17, 23, device='cuda'), torch.rand(1, 3, 40, 31, device='cuda')]

    def run():
        with torch.no_grad():
            outputs = [net.eval()(x) for x in images for _ in range(2)]
        net.train().zero_grad()
        net(images[0]).abs().mean().backward()
        net(images[0]).abs().mean().backward()  # the second step's launches are direct
        return outputs + [p.grad.clone() for p in net.parameters() if p.grad is not None]

    try:
        launch_module.set_direct_launches(False)
        through_triton = run()
        launch_module.set_direct_launches(True)
        direct = run()
    finally:
        launch_module.set_direct_launches(True)
    assert launch_module._direct_supported() is False or any(v is not None for v in launch_module._direct.values())
    for a, b in zip(through_triton, direct):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
