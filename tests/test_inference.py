"""scripts/inference.py and its helpers: image kinds, per-file errors, tiling, checkpoints, input ranges."""
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import dvmsr_arch  # noqa: F401  (first: it fits basicsr to this torchvision and registers the networks)
from basicsr.metrics import calculate_psnr
from basicsr.utils.registry import ARCH_REGISTRY
from dvmsr_arch.archs.dvmsr_arch import DVMSR
from dvmsr_arch.utils import imageio, tiling
from dvmsr_arch.utils.graphs import CudaGraphInference
from dvmsr_arch.utils.network import load_model, load_weights

SCRIPTS = Path(__file__).resolve().parents[1] / 'scripts'
TINY = {'embed_dim': 8, 'depths': (1,), 'd_state': 4, 'drop_path_rate': 0.0}


def inference_cli():
    spec = importlib.util.spec_from_file_location('inference_cli', SCRIPTS / 'inference.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
    """A small random DVMSR, its option file and checkpoint (BasicSR layout)."""
    folder = tmp_path_factory.mktemp('tiny')
    torch.manual_seed(0)
    net = DVMSR(**TINY).eval()
    torch.save({'params': net.state_dict()}, folder / 'net.pth')
    (folder / 'net.yml').write_text('network_g:\n  type: DVMSR\n  embed_dim: 8\n  depths: [1]\n  d_state: 4\n')
    return net, folder / 'net.yml', folder / 'net.pth'


def test_folder_of_mixed_images(tiny_model, tmp_path, capsys):
    net, options, checkpoint = tiny_model
    rng = np.random.default_rng(0)
    inputs, outputs = tmp_path / 'in', tmp_path / 'out'
    inputs.mkdir()
    rgb8 = (rng.random((10, 12, 3)) * 255).astype(np.uint8)
    gray8 = (rng.random((9, 11)) * 255).astype(np.uint8)
    rgba16 = (rng.random((8, 10, 4)) * 65535).astype(np.uint16)
    cv2.imwrite(str(inputs / 'colour.png'), rgb8)
    cv2.imwrite(str(inputs / 'gray.png'), gray8)
    cv2.imwrite(str(inputs / 'gray_as_rgb.png'), cv2.cvtColor(gray8, cv2.COLOR_GRAY2BGR))
    cv2.imwrite(str(inputs / 'rgba16.png'), rgba16)
    cv2.imwrite(str(inputs / 'colour16.png'), rgb8.astype(np.uint16) * 257)  # same values as colour.png
    (inputs / 'broken.png').write_bytes((inputs / 'colour.png').read_bytes()[:60])
    (inputs / 'notes.txt').write_text('not an image, not looked at')

    code = inference_cli().main(['-i', str(inputs), '-o', str(outputs), '--opt', str(options),
                                 '--model-path', str(checkpoint), '--device', 'cpu'])
    captured = capsys.readouterr()
    assert code == 1  # one unreadable file
    assert f'{inputs / "broken.png"}: not a readable image' in captured.err
    assert '5 images in' in captured.out and 'ms per input megapixel' in captured.out and '1 failed' in captured.out
    assert 'colour.png: 10x12 -> 40x48, ' in captured.out  # height x width
    assert sorted(p.name for p in outputs.iterdir()) == [
        'colour16_x4.png', 'colour_x4.png', 'gray_as_rgb_x4.png', 'gray_x4.png', 'rgba16_x4.png']

    def read(name):
        return cv2.imread(str(outputs / name), cv2.IMREAD_UNCHANGED)

    colour = read('colour_x4.png')
    with torch.no_grad():
        expected = net(imageio.image_to_tensor(cv2.cvtColor(rgb8, cv2.COLOR_BGR2RGB) / 255.0))
    np.testing.assert_array_equal(colour, imageio.rgb_to_uint8_bgr(imageio.tensor_to_image(expected)))
    assert colour.shape == (40, 48, 3) and colour.dtype == np.uint8

    gray = read('gray_x4.png')
    assert gray.shape == (36, 44) and gray.dtype == np.uint8  # grayscale in, grayscale out
    # ... and it is the luma of what the network makes of the same image stored as RGB.
    luma = cv2.cvtColor(read('gray_as_rgb_x4.png'), cv2.COLOR_BGR2GRAY).astype(int)
    assert np.abs(gray.astype(int) - luma).max() <= 1

    rgba = read('rgba16_x4.png')
    assert rgba.shape == (32, 40, 4) and rgba.dtype == np.uint16
    alpha = cv2.resize(rgba16[..., 3].astype(np.float32) / 65535, (40, 32), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_allclose(rgba[..., 3] / 65535, np.clip(alpha, 0, 1), atol=1 / 65535)

    colour16 = read('colour16_x4.png')
    assert colour16.dtype == np.uint16
    assert np.abs(colour16 / 257.0 - colour).max() <= 0.51  # the 8-bit result, with 16-bit precision
    assert np.any(colour16 % 257)  # not merely 8-bit values stretched


def test_empty_folder_and_bad_arguments_are_one_line_errors(tiny_model, tmp_path, capsys):
    _, options, checkpoint = tiny_model
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'readme.txt').write_text('no images here')
    cli = inference_cli()
    assert cli.main(['-i', str(empty), '-o', str(tmp_path / 'out'), '--opt', str(options),
                     '--model-path', str(checkpoint), '--device', 'cpu']) == 2
    assert f'error: {empty}: no images in this folder' in capsys.readouterr().err

    wrong = tmp_path / 'wrong.pth'
    torch.save(DVMSR(embed_dim=12, depths=(1,), d_state=4).state_dict(), wrong)
    assert cli.main(['-i', str(empty), '-o', str(tmp_path / 'out'), '--opt', str(options),
                     '--model-path', str(wrong), '--device', 'cpu']) == 2
    error = capsys.readouterr().err
    assert error.startswith(f'error: {wrong}: does not fit DVMSR:') and 'shape mismatches' in error
    assert error.count('\n') == 1

    assert cli.main(['-i', str(empty), '-o', str(tmp_path / 'out'), '--opt', str(options),
                     '--model-path', str(checkpoint), '--device', 'cpu', '--cuda-graph']) == 2
    assert capsys.readouterr().err == 'error: --cuda-graph needs a CUDA device\n'


@pytest.mark.parametrize('fp32', [False, True])
def test_tf32_by_default_and_true_fp32_on_request(tiny_model, tmp_path, fp32, torch_tf32_defaults):
    _, options, checkpoint = tiny_model
    image = tmp_path / 'in.png'
    cv2.imwrite(str(image), (np.random.default_rng(0).random((10, 12, 3)) * 255).astype(np.uint8))
    code = inference_cli().main(['-i', str(image), '-o', str(tmp_path / 'out'), '--opt', str(options),
                                 '--model-path', str(checkpoint), '--device', 'cpu'] + ['--fp32'] * fp32)
    switches = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    assert code == 0 and (tmp_path / 'out' / 'in_x4.png').is_file()
    assert switches == (not fp32, not fp32)


def test_params_ema_is_preferred(tiny_model, tmp_path):
    net, _, _ = tiny_model
    other = DVMSR(**TINY)
    checkpoint = tmp_path / 'both.pth'
    torch.save({'params': net.state_dict(), 'params_ema': other.state_dict()}, checkpoint)
    fresh = DVMSR(**TINY)
    assert load_weights(fresh, str(checkpoint)) == 'params_ema'
    torch.testing.assert_close(fresh.conv_first.weight, other.conv_first.weight)


def test_split_1d_covers_without_slivers():
    for length in (1, 7, 64, 65, 130):
        for tile in (1, 16, 64):
            pieces = tiling.split_1d(length, tile)
            assert pieces[0][0] == 0 and pieces[-1][1] == length
            assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
            sizes = [stop - start for start, stop in pieces]
            assert max(sizes) <= tile and max(sizes) - min(sizes) <= 1


def test_tiles_are_exact_when_the_pad_covers_the_receptive_field():
    torch.manual_seed(0)
    radius = 3  # three 3x3 convs
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 12, 3, padding=1), nn.PixelShuffle(2))
    image = torch.rand(1, 3, 37, 29)
    whole = tiling.upscale(model, image, scale=2)
    exact = tiling.upscale(model, image, scale=2, tile=10, tile_pad=radius)
    short = tiling.upscale(model, image, scale=2, tile=10, tile_pad=radius - 1)
    torch.testing.assert_close(exact, whole, atol=1e-6, rtol=1e-6)
    assert (short - whole).abs().max() > 1e-4  # a pad short of the receptive field shows at the seams


def test_tiles_keep_set5_psnr_within_0_05_db(set5_dir, weights_dir):
    """Tiling a Set5 crop (small enough for a CPU test) with less context than the default pad of 16."""
    model, _ = load_model(arch=None, opt_path=None, checkpoint=str(weights_dir / 'dvmsr_ntire2024_official.pth'))
    top, left, side = 16, 16, 32
    lr = imageio.read_image(set5_dir / 'LR_bicubic' / 'X4' / 'butterfly.png').rgb[top:top + side, left:left + side]
    hr = imageio.read_image(set5_dir / 'HR' / 'butterfly.png').rgb[4 * top:4 * (top + side), 4 * left:4 * (left + side)]
    psnr = {}
    for tile in (0, 16):
        sr = tiling.upscale(model, imageio.image_to_tensor(lr), scale=4, tile=tile, tile_pad=8)
        psnr[tile] = calculate_psnr(imageio.rgb_to_uint8_bgr(imageio.tensor_to_image(sr)),
                                    imageio.rgb_to_uint8_bgr(hr), 4, test_y_channel=True)
    assert psnr[0] > 25  # the released weights really ran
    assert psnr[16] != psnr[0]  # four tiles that each see part of the image: not the same numbers
    assert abs(psnr[16] - psnr[0]) < 0.05, psnr


@pytest.mark.skipif('RLFN' not in ARCH_REGISTRY, reason='the RLFN network is not in this checkout')
def test_rlfn_gets_its_0_255_range_from_the_table(set5_dir, weights_dir):
    checkpoint = str(weights_dir / 'rlfn_ntire2024.pth')
    lr = imageio.image_to_tensor(imageio.read_image(set5_dir / 'LR_bicubic' / 'X4' / 'bird.png').rgb)
    hr8 = imageio.rgb_to_uint8_bgr(imageio.read_image(set5_dir / 'HR' / 'bird.png').rgb)
    psnr = {}
    for forced in (None, 1.0):
        model, arch = load_model(arch='RLFN', opt_path=None, checkpoint=checkpoint, input_range=forced)
        assert arch == 'RLFN'
        sr = tiling.upscale(model, lr, scale=4)
        psnr[forced] = calculate_psnr(imageio.rgb_to_uint8_bgr(imageio.tensor_to_image(sr)), hr8, 4,
                                      test_y_channel=True)
    assert psnr[None] > 33  # RLFN's bird is well above 33 dB; the wrong range is far below
    assert psnr[1.0] < psnr[None] - 3


def test_exported_student_matches_eager():
    """torch.export traces the network with the torch scan (for a fixed input size, see docs/usage.md)."""
    torch.manual_seed(0)
    net = DVMSR(**TINY, scan_backend='torch').eval()
    image = torch.rand(1, 3, 12, 16)
    exported = torch.export.export(net, (image,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(image), net(image), atol=1e-5, rtol=1e-5)


def test_cuda_graph_inference_runs_cpu_inputs_eagerly(tiny_model):
    net, _, _ = tiny_model
    image = torch.rand(1, 3, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(CudaGraphInference(net)(image), net(image), rtol=0, atol=0)
    with pytest.raises(ValueError, match='max_graphs=0'):
        CudaGraphInference(net, max_graphs=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a CUDA GPU')
def test_cuda_graph_tiles_match_eager(tiny_model):
    """Tiles of three shapes replayed out of capture order through one shared pool, with one graph
    dropped and captured again (max_graphs=2): every result equals the eager forward's, and an
    earlier result is untouched by later replays."""
    net, _, _ = tiny_model
    net = net.cuda()
    graphed = CudaGraphInference(net, max_graphs=2)
    torch.manual_seed(0)
    image = torch.rand(1, 3, 45, 38)
    with torch.no_grad():
        eager = tiling.upscale(net, image, scale=4, tile=16, tile_pad=4, device=torch.device('cuda'))
        first = tiling.upscale(graphed, image, scale=4, tile=16, tile_pad=4, device=torch.device('cuda'))
        kept = graphed(image[..., :20, :20].cuda())
        again = tiling.upscale(graphed, image, scale=4, tile=16, tile_pad=4, device=torch.device('cuda'))
        torch.testing.assert_close(kept, net(image[..., :20, :20].cuda()), rtol=0, atol=0)
    assert len(graphed._graphs) == 2
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)
