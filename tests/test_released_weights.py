"""Snapshot checks against the released checkpoints on the real Set5 images."""
import cv2
import numpy as np
import pytest
import torch

import dvmsr_arch  # noqa: F401  (before basicsr: registers the networks, patches basicsr's imports)
from basicsr.metrics import calculate_psnr
from basicsr.utils import img2tensor, tensor2img
from dvmsr_arch.archs.dvmsr_arch import DVMSR
from dvmsr_arch.utils.network import load_weights


def set5_psnr(net, set5_dir):
    values = []
    for hr_path in sorted((set5_dir / 'HR').glob('*.png')):
        lr = cv2.imread(str(set5_dir / 'LR_bicubic' / 'X4' / hr_path.name), cv2.IMREAD_COLOR)
        with torch.no_grad():
            sr = net(img2tensor(lr.astype(np.float32) / 255.0)[None])
        values.append(calculate_psnr(tensor2img(sr), cv2.imread(str(hr_path)), crop_border=4, test_y_channel=True))
    assert len(values) == 5
    return float(np.mean(values))


@pytest.mark.parametrize('checkpoint,expected_key,psnr', [
    ('dvmsr_ntire2024_official.pth', '', 32.184),
    ('dvmsr_official.pth', 'params_ema', 32.215),
])
def test_released_checkpoint_reproduces_set5_psnr(weights_dir, set5_dir, checkpoint, expected_key, psnr):
    net = DVMSR().eval()
    assert load_weights(net, weights_dir / checkpoint) == expected_key
    assert set5_psnr(net, set5_dir) == pytest.approx(psnr, abs=0.005)


def test_both_formats_load_strictly_with_torch(weights_dir):
    net = DVMSR()
    net.load_state_dict(torch.load(weights_dir / 'dvmsr_ntire2024_official.pth', map_location='cpu'), strict=True)
    both = torch.load(weights_dir / 'dvmsr_official.pth', map_location='cpu')
    for key in ('params', 'params_ema'):
        net.load_state_dict(both[key], strict=True)


def test_torch_backend_matches_ref_in_float64_on_a_real_image(weights_dir, set5_dir):
    """The released student on a crop of a real LR image: torch backend vs the definition."""
    net = DVMSR().double().eval()
    load_weights(net, weights_dir / 'dvmsr_ntire2024_official.pth')
    lr = cv2.imread(str(set5_dir / 'LR_bicubic' / 'X4' / 'butterfly.png'), cv2.IMREAD_COLOR)[:20, :24]
    x = img2tensor(lr.astype(np.float64) / 255.0, float32=False)[None].double()
    mixers = [m for m in net.modules() if hasattr(m, 'scan_backend')]
    with torch.no_grad():
        outs = {}
        for backend in ('ref', 'torch'):
            for mixer in mixers:
                mixer.scan_backend = backend
            outs[backend] = net(x)
    torch.testing.assert_close(outs['torch'], outs['ref'], rtol=0, atol=1e-10)
