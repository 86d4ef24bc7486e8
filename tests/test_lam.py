"""LAM: the blurring path against OpenCV, answers known in advance, and the CLI on a small network."""
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import dvmsr_arch  # noqa: F401  (first: it fits basicsr to this torchvision and registers the networks)
from basicsr.utils.registry import ARCH_REGISTRY
from dvmsr_arch.analysis import lam
from dvmsr_arch.archs.dvmsr_arch import DVMSR
from dvmsr_arch.utils.network import RangeAdapter

SCRIPTS = Path(__file__).resolve().parents[1] / 'scripts'


def conv_stack(depth: int, scale: int, *, linear: bool = False, seed: int = 0) -> nn.Module:
    """``depth`` 3x3 convs then PixelShuffle: output (Y, X) sees input within ``depth`` of (Y // s, X // s)."""
    torch.manual_seed(seed)
    layers = []
    for i in range(depth):
        out = 3 * scale * scale if i == depth - 1 else 8
        layers.append(nn.Conv2d(3 if i == 0 else 8, out, 3, padding=1))
        if not linear and i < depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers, nn.PixelShuffle(scale)).double()


def test_blur_path_matches_opencv_and_ends_at_the_image():
    rng = np.random.default_rng(0)
    image = rng.random((21, 26, 3))
    kernel = lam.isotropic_gaussian_kernel(9, 0.8).numpy()
    ours = lam.filter_image(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(kernel)[None])[0]
    np.testing.assert_allclose(ours.permute(1, 2, 0).numpy(), cv2.filter2D(image, -1, kernel), atol=1e-12)

    tensor = torch.from_numpy(image).permute(2, 0, 1)
    points, derivatives = lam.gaussian_blur_path(tensor, sigma=1.2, steps=7, kernel_size=9)
    assert points.shape == derivatives.shape == (7, 3, 21, 26)
    torch.testing.assert_close(points[-1], tensor, atol=1e-12, rtol=0)  # sigma 0 is the image itself
    baseline = cv2.filter2D(image, -1, lam.isotropic_gaussian_kernel(9, 1.2).numpy())
    # The derivatives integrate (mean over steps) to the whole path: image - baseline.
    np.testing.assert_allclose((derivatives.sum(0) / 7).permute(1, 2, 0).numpy(), image - baseline, atol=1e-12)


def test_attribution_is_zero_exactly_outside_a_known_receptive_field():
    depth, scale = 3, 2
    model = conv_stack(depth, scale)
    image = torch.rand(3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    window = (20, 14, 6, 4)  # x, y, w, h in output pixels
    attribution, _ = lam.path_attribution(model, image, window, steps=6, batch_size=4)
    nonzero = attribution.abs().sum(0) > 0
    rows, cols = torch.nonzero(nonzero, as_tuple=True)
    x, y, width, height = window
    # The detector reads output rows y .. y+h and columns x .. x+w (one past the window);
    # output row Y depends on input rows Y // scale - depth .. Y // scale + depth.
    assert rows.min().item() == y // scale - depth and rows.max().item() == (y + height) // scale + depth
    assert cols.min().item() == x // scale - depth and cols.max().item() == (x + width) // scale + depth


def test_completeness_is_exact_for_a_linear_network_and_objective():
    model = conv_stack(2, 2, linear=True)
    image = torch.rand(3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    window = (5, 7, 8, 6)

    def window_sum(output, win):
        x, y, w, h = win
        return output[:, :, y:y + h, x:x + w].sum(dim=(1, 2, 3))

    attribution, _ = lam.path_attribution(model, image, window, objective=window_sum, steps=5, sigma=1.5)
    baseline = lam.filter_image(image, lam.isotropic_gaussian_kernel(9, 1.5)[None])
    with torch.no_grad():
        expected = window_sum(model(image[None]), window) - window_sum(model(baseline), window)
    torch.testing.assert_close(attribution.sum(), expected[0], atol=1e-9, rtol=1e-9)


def test_completeness_holds_in_the_limit_for_the_gradient_detector():
    """The path sum converges to objective(image) - objective(baseline) as the steps grow (error ~ 1/steps)."""
    model = conv_stack(3, 2)
    image = torch.rand(3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    window = (8, 8, 8, 8)
    baseline = lam.filter_image(image, lam.isotropic_gaussian_kernel(9, lam.DEFAULT_SIGMA)[None])
    with torch.no_grad():
        change = (lam.gradient_detector(model(image[None]), window)
                  - lam.gradient_detector(model(baseline), window)).item()
    errors = {steps: abs(lam.path_attribution(model, image, window, steps=steps, batch_size=250)[0].sum().item() - change)
              for steps in (50, 1000)}
    assert errors[1000] < 0.02 * abs(change)
    assert errors[1000] < errors[50] / 10


def test_gini_and_diffusion_index_closed_forms():
    assert lam.diffusion_index(np.ones((8, 8))) == pytest.approx(100.0, abs=1e-6)  # every pixel the same
    one_hot = np.zeros(50)
    one_hot[7] = 1.0
    # One pixel of n carries everything: Gini = (n - 1) / n, so DI = 100 / n.
    assert lam.diffusion_index(one_hot) == pytest.approx(100 / 50, abs=1e-3)
    half = np.r_[np.zeros(10), np.ones(10)]
    assert lam.gini(half) == pytest.approx(0.5, abs=1e-6)


def test_input_range_does_not_change_the_attribution():
    """A [0, 255] network, wrapped, must explain the same function as its [0, 1] twin."""
    unit = conv_stack(2, 2)

    class Times255(nn.Module):  # the same function, asking for [0, 255] in and giving [0, 255] out
        def forward(self, x):
            return unit(x / 255.0) * 255.0

    image = torch.rand(3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    window = (4, 4, 8, 8)
    expected, _ = lam.path_attribution(unit, image, window, steps=4)
    wrapped, _ = lam.path_attribution(RangeAdapter(Times255(), 255.0), image, window, steps=4)
    torch.testing.assert_close(wrapped, expected, atol=1e-10, rtol=1e-7)


def test_lam_of_a_small_dvmsr_and_the_cli(tmp_path, capsys):
    torch.manual_seed(0)
    net = DVMSR(embed_dim=8, depths=(1,), d_state=4, drop_path_rate=0.0).eval()
    image = torch.rand(3, 12, 12)
    result = lam.local_attribution_map(net, image, (16, 16, 8, 8), steps=3, batch_size=3)
    assert result.map.shape == (12, 12) and result.map.max() == 1.0
    assert 0.0 < result.diffusion_index <= 100.0
    with torch.no_grad():
        torch.testing.assert_close(result.output, net(image[None])[0], atol=1e-5, rtol=1e-5)

    checkpoint, options = tmp_path / 'tiny.pth', tmp_path / 'tiny.yml'
    torch.save({'params_ema': net.state_dict()}, checkpoint)
    torch.save(ARCH_REGISTRY.get('SRVGGNetCompact')().state_dict(), tmp_path / 'vgg.pth')  # BasicSR's own network
    options.write_text('network_g:\n  type: DVMSR\n  embed_dim: 8\n  depths: [1]\n  d_state: 4\n')
    hr = (np.random.default_rng(5).random((48, 40, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / 'hr.png'), hr)
    spec = importlib.util.spec_from_file_location('lam_cli', SCRIPTS / 'lam.py')
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    figure, maps = tmp_path / 'lam.png', tmp_path / 'maps.npz'
    code = cli.main(['--opt', str(options), '--model-path', str(checkpoint), '--label', 'tiny',
                     '--also', 'vgg', str(tmp_path / 'vgg.pth'), 'SRVGGNetCompact',
                     '--image', str(tmp_path / 'hr.png'), '--window', '12', '20', '8', '8', '--steps', '2',
                     '--device', 'cpu', '-o', str(figure), '--save-maps', str(maps)])
    assert code == 0
    out = capsys.readouterr().out
    assert 'tiny (DVMSR x4) window (12, 20, 8, 8)' in out and 'vgg (SRVGGNetCompact x4)' in out
    saved = np.load(maps)
    assert sorted(saved.files) == ['tiny', 'vgg'] and saved['tiny'].shape == (12, 10)
    # Two rows of four panels of 3.2 in, each row 3.2 * 48 / 40 + 0.6 in high, at 80 dpi.
    assert cv2.imread(str(figure)).shape[:2] == (round(2 * (3.2 * 48 / 40 + 0.6) * 80), round(4 * 3.2 * 80))

    code = cli.main(['--opt', str(options), '--model-path', str(checkpoint), '--image', str(tmp_path / 'hr.png'),
                     '--window', '30', '20', '16', '8', '--device', 'cpu', '-o', str(figure)])
    assert code == 2
    assert 'window x=30 y=20 w=16 h=8' in capsys.readouterr().err
