"""Every selective-scan backend that can run here computes what the ``ref`` recurrence computes."""
import pytest
import torch

from dvmsr_arch import ops
from dvmsr_arch.ops import scan_torch
from dvmsr_arch.ops.scan_ref import selective_scan_ref

INPUTS = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')


def random_inputs(batch, inner, state, length, *, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return {
        'u': randn(batch, inner, length),
        'delta': randn(batch, inner, length) * 0.5,
        'A': -torch.exp(randn(inner, state)),
        'B': randn(batch, state, length),
        'C': randn(batch, state, length),
        'D': randn(inner),
        'z': randn(batch, inner, length),
        'delta_bias': randn(inner) * 0.5,
    }


BACKENDS_HERE = [name for name in ops.available_backends('cpu') if name != 'ref']


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few chunks, so short test sequences still cross block boundaries."""
    monkeypatch.setattr(scan_torch, 'STEP_ELEMENTS', 2 * 3 * 5 * 2)
    monkeypatch.setattr(scan_torch, 'STEP_ELEMENTS_WITH_GRAD', 2 * 3 * 5 * 3)


@pytest.mark.parametrize('backend', BACKENDS_HERE)
@pytest.mark.parametrize('length', [1, 15, 16, 17, 100, 333])  # around and away from the chunk size 16
@pytest.mark.parametrize('options', [
    dict(delta_softplus=True),
    dict(delta_softplus=False, drop=('z', 'D', 'delta_bias')),
    dict(delta_softplus=True, drop=('z',)),
    dict(delta_softplus=True, drop=('D', 'delta_bias')),
])
def test_backend_matches_ref_forward_and_gradients(backend, length, options, small_blocks):
    inputs = random_inputs(2, 3, 5, length, seed=length)
    if not options['delta_softplus']:
        inputs['delta'] = inputs['delta'].abs()  # without softplus the caller must pass delta >= 0
    for name in options.get('drop', ()):
        inputs[name] = None
    for tensor in inputs.values():
        if tensor is not None:
            tensor.requires_grad_(True)
    present = [name for name in INPUTS if inputs[name] is not None]

    expected = selective_scan_ref(**inputs, delta_softplus=options['delta_softplus'])
    actual = ops.selective_scan(**inputs, delta_softplus=options['delta_softplus'], backend=backend)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)

    grad_out = torch.randn_like(expected)
    grads_expected = torch.autograd.grad(expected, [inputs[n] for n in present], grad_out)
    grads_actual = torch.autograd.grad(actual, [inputs[n] for n in present], grad_out)
    for name, want, got in zip(present, grads_expected, grads_actual):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=f'gradient of {name}')


@pytest.mark.parametrize('length', [1, 31, 32, 33, 100, 333])  # around the chunk size without autograd
@pytest.mark.parametrize('drop', [(), ('z', 'D', 'delta_bias')])
def test_torch_backend_without_autograd_matches_ref(length, drop, small_blocks):
    inputs = random_inputs(2, 3, 5, length, seed=length)
    for name in drop:
        inputs[name] = None
    with torch.no_grad():
        actual = ops.selective_scan(**inputs, delta_softplus=True, backend='torch')
    expected = selective_scan_ref(**inputs, delta_softplus=True)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_torch_backend_is_stable_over_long_strongly_decaying_sequences():
    """Decays of exp(-1e3) per token stay small factors (2**-64) instead of overflowing a running inverse."""
    inputs = random_inputs(1, 2, 4, 3000, seed=1, dtype=torch.float32)
    inputs['A'] = inputs['A'] * 1000
    inputs['delta'] = inputs['delta'].abs() + 1
    out = ops.selective_scan(**inputs, backend='torch')
    assert torch.isfinite(out).all()
    short = {k: (v[..., :500] if v.dim() == 3 else v) for k, v in inputs.items()}
    ref = selective_scan_ref(**short)
    torch.testing.assert_close(out[..., :500], ref, rtol=1e-4, atol=1e-4)


def test_torch_backend_decay_floor_is_below_float64_resolution():
    """Decays of exp(-1e3) per token, which the torch backend takes as 2**-64, leave the float64
    output where the exact recurrence puts it (it fails for a floor of 2**-30)."""
    inputs = random_inputs(2, 3, 5, 200, seed=3)
    inputs['A'] = inputs['A'] * torch.tensor([1.0, 1.0, 1000.0, 1000.0, 1.0], dtype=torch.float64)
    inputs['delta'] = inputs['delta'].abs() + 1
    out = ops.selective_scan(**inputs, backend='torch')
    torch.testing.assert_close(out, selective_scan_ref(**inputs), rtol=1e-12, atol=1e-12)


def test_torch_backend_never_builds_whole_sequence_state(monkeypatch):
    """No tensor the scan makes (of those addcmul returns: the states and the output) is larger than
    the output, batch * E * L elements, where the whole sequence's states would be N times that."""
    inputs = random_inputs(1, 8, 16, 4096, seed=2, dtype=torch.float32)
    largest = 0
    original = torch.addcmul

    def spy(*args, **kwargs):
        nonlocal largest
        out = original(*args, **kwargs)
        largest = max(largest, out.numel())
        return out

    monkeypatch.setattr(scan_torch.torch, 'addcmul', spy)
    with torch.no_grad():
        ops.selective_scan(**inputs, backend='torch')
    assert 0 < largest <= 8 * 4096


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert ops.resolve_backend('auto', 'cpu') == 'torch'
    assert ops.resolve_backend('ref', 'cpu') == 'ref'
    monkeypatch.setenv(ops.ENV_VAR, 'ref')
    assert ops.resolve_backend('auto', 'cpu') == 'ref'  # the variable overrides auto ...
    assert ops.resolve_backend('torch', 'cpu') == 'torch'  # ... but not an explicit choice
    monkeypatch.setenv(ops.ENV_VAR, 'fastest')
    with pytest.raises(ValueError, match='DVMSR_SCAN_BACKEND'):
        ops.resolve_backend('auto', 'cpu')
    with pytest.raises(ValueError, match="'cuda_fast' is not a selective-scan backend"):
        ops.resolve_backend('cuda_fast', 'cpu')
    monkeypatch.delenv(ops.ENV_VAR)
    with pytest.raises(RuntimeError, match='mamba_ssm.*CUDA'):
        ops.resolve_backend('mamba_ssm', 'cpu')
