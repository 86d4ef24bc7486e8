"""A qualitative comparison figure: the same crop from bicubic, each model and the ground truth.

    python scripts/compare.py --hr Set5/HR/baby.png --crop 180 120 96 96 -o compare.png \\
        --model "DVMSR" dvmsr_ntire2024_official.pth \\
        --model "RLFN" rlfn_ntire2024.pth RLFN

Each --model is LABEL CHECKPOINT [NETWORK], NETWORK being a name in the registry or an option file
(default: DVMSR with its default arguments). The input is --lr, or else --hr cropped to a multiple of
the scale and downscaled with MATLAB-style bicubic. With --hr, each crop is captioned with PSNR/SSIM
of the whole image on the Y channel (BasicSR's metrics, border of <scale> pixels cropped).
"""
import argparse
import sys
from os import path as osp
from pathlib import Path

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
sys.path.insert(0, ROOT)  # so a fresh clone runs without `pip install -e .`

import numpy as np  # noqa: E402

import dvmsr_arch  # noqa: E402,F401  (first: it fits basicsr to this torchvision and registers the networks)
from basicsr.metrics import calculate_psnr, calculate_ssim  # noqa: E402
from basicsr.utils.matlab_functions import imresize  # noqa: E402
from dvmsr_arch.utils import imageio, tiling  # noqa: E402
from dvmsr_arch.utils.network import load_model, network_scale, parse_model_spec, resolve_device  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--hr', default=None, help='ground-truth image (adds the HR crop and the metrics)')
    parser.add_argument('--lr', default=None, help='low-resolution input (default: bicubic downscale of --hr)')
    parser.add_argument('--model', nargs='+', action='append', required=True, metavar='LABEL CHECKPOINT [NETWORK]',
                        help='a model to show; repeat for more')
    parser.add_argument('--crop', type=int, nargs=4, required=True, metavar=('X', 'Y', 'W', 'H'),
                        help='the crop, in output (high-resolution) pixels')
    parser.add_argument('-o', '--output', required=True, help='PNG to write')
    parser.add_argument('--device', default='auto', help='cpu, cuda or cuda:N (default: cuda when available)')
    parser.add_argument('--tile', type=int, default=0, help='tile size in input pixels, 0 for whole images')
    parser.add_argument('--tile-pad', type=int, default=16, help='context around each tile (default 16)')
    parser.add_argument('--panel-inches', type=float, default=2.0, help='width of one panel (default 2.0)')
    parser.add_argument('--dpi', type=int, default=100, help='resolution of the PNG (default 100)')
    return parser.parse_args(argv)


def load_images(args, scale: int):
    """(LR, HR or None) as float RGB; HR cropped to scale * LR."""
    hr = imageio.read_image(args.hr).rgb if args.hr else None
    if args.lr:
        lr = imageio.read_image(args.lr).rgb
        if hr is not None:
            hr = hr[:lr.shape[0] * scale, :lr.shape[1] * scale]
            if hr.shape[:2] != (lr.shape[0] * scale, lr.shape[1] * scale):
                raise ValueError(f'{args.hr}: smaller than {args.lr} times {scale}')
        return lr, hr
    if hr is None:
        raise ValueError('give --hr, --lr or both')
    hr = hr[:hr.shape[0] - hr.shape[0] % scale, :hr.shape[1] - hr.shape[1] % scale]
    return np.clip(imresize(hr.astype(np.float64), 1 / scale), 0, 1).astype(np.float32), hr


def metrics(image: np.ndarray, hr: np.ndarray, scale: int) -> str:
    a, b = imageio.rgb_to_uint8_bgr(image), imageio.rgb_to_uint8_bgr(hr)
    return f'{calculate_psnr(a, b, scale, test_y_channel=True):.2f} dB / {calculate_ssim(a, b, scale, test_y_channel=True):.4f}'


def write_figure(path: Path, overview: np.ndarray, crop, panels, *, panel_inches: float, dpi: int) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    x, y, width, height = crop
    ratio = height / width
    overview_inches = panel_inches * ratio * overview.shape[1] / overview.shape[0]
    widths = [overview_inches] + [panel_inches] * len(panels)
    figure, axes = plt.subplots(1, 1 + len(panels), figsize=(sum(widths), panel_inches * ratio + 0.7),
                                gridspec_kw={'width_ratios': widths})
    axes[0].imshow(np.clip(overview, 0, 1))
    axes[0].add_patch(Rectangle((x - 0.5, y - 0.5), width, height, fill=False, edgecolor='red', linewidth=1.5))
    axes[0].axis('off')
    for axis, (label, image, caption) in zip(axes[1:], panels):
        axis.imshow(np.clip(image[y:y + height, x:x + width], 0, 1), interpolation='nearest')
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_xlabel(f'{label}\n{caption}' if caption else label, fontsize=8)
    figure.tight_layout(pad=0.3, w_pad=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        specs = [parse_model_spec(values) for values in args.model]
        models = []
        for label, checkpoint, arch, opt_path in specs:
            model, _ = load_model(arch=arch, opt_path=opt_path, checkpoint=checkpoint)
            model = model.to(device)
            models.append((label, model, network_scale(model, device)))
        scales = {scale for _, _, scale in models}
        if len(scales) != 1:
            raise ValueError(f'the models do not share one scale: {sorted(scales)}')
        scale = scales.pop()
        lr, hr = load_images(args, scale)
        out_h, out_w = lr.shape[0] * scale, lr.shape[1] * scale
        x, y, width, height = args.crop
        if width < 1 or height < 1 or x < 0 or y < 0 or x + width > out_w or y + height > out_h:
            raise ValueError(f'--crop {x} {y} {width} {height} does not fit the {out_w}x{out_h} output')
    except (ValueError, imageio.ImageReadError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2

    bicubic = np.clip(imresize(lr.astype(np.float64), scale), 0, 1).astype(np.float32)
    panels = [('Bicubic', bicubic)]
    for label, model, _ in models:
        sr = tiling.upscale(model, imageio.image_to_tensor(lr), scale=scale, tile=args.tile, tile_pad=args.tile_pad,
                            device=device)
        panels.append((label, np.clip(imageio.tensor_to_image(sr), 0, 1)))
    captioned = [(label, image, metrics(image, hr, scale) if hr is not None else '') for label, image in panels]
    if hr is not None:
        captioned.append(('HR', hr, 'PSNR-Y / SSIM-Y, whole image'))
    write_figure(Path(args.output), hr if hr is not None else panels[-1][1], args.crop, captioned,
                 panel_inches=args.panel_inches, dpi=args.dpi)
    for label, _, caption in captioned:
        print(f'{label}: {caption}')
    print(f'-> {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
