"""Local Attribution Map of a super-resolution network for one output patch, with its Diffusion Index.

    python scripts/lam.py --model-path dvmsr_ntire2024_official.pth --image Set5/HR/baby.png \\
        --window 240 200 16 16 -o lam_baby.png
    python scripts/lam.py --model-path dvmsr_ntire2024_official.pth --label DVMSR --image Set5/HR/baby.png \\
        --window 240 200 16 16 --also RLFN rlfn_ntire2024.pth RLFN -o lam_baby_both.png

The window (x, y, width, height) is in pixels of the high-resolution image. The input is the image
cropped to a multiple of the scale and downscaled with MATLAB-style bicubic (as the benchmark LR
images are made), unless --lr gives it. --also adds models (LABEL CHECKPOINT [NETWORK], NETWORK a
registry name or an option file), one row each, as in DVMSR's Figure 2. Writes a figure (per model:
the patch, the attribution map over the input, the two blended, and a zoom on the patch's
neighbourhood) and prints each Diffusion Index. See dvmsr_arch/analysis/lam.py for the method.
"""
import argparse
import sys
import time
from os import path as osp
from pathlib import Path

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
sys.path.insert(0, ROOT)  # so a fresh clone runs without `pip install -e .`

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import dvmsr_arch  # noqa: E402,F401  (first: it fits basicsr to this torchvision and registers the networks)
from basicsr.utils.matlab_functions import imresize  # noqa: E402
from dvmsr_arch.analysis import lam  # noqa: E402
from dvmsr_arch.utils import imageio  # noqa: E402
from dvmsr_arch.utils.network import (add_network_arguments, load_model, network_scale, parse_model_spec,  # noqa: E402
                                      resolve_device)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_network_arguments(parser)
    parser.add_argument('--image', required=True, help='the high-resolution image')
    parser.add_argument('--lr', default=None, help='its low-resolution input (default: bicubic downscale of --image)')
    parser.add_argument('--window', type=int, nargs=4, required=True, metavar=('X', 'Y', 'W', 'H'),
                        help='the output patch, in high-resolution pixels')
    parser.add_argument('-o', '--output', required=True, help='figure to write (PNG)')
    parser.add_argument('--label', default=None, help='name shown in the figure (default: the architecture)')
    parser.add_argument('--also', nargs='+', action='append', default=[], metavar='LABEL CHECKPOINT [NETWORK]',
                        help='another model to explain, one figure row each; repeat for more')
    parser.add_argument('--sigma', type=float, default=lam.DEFAULT_SIGMA,
                        help=f'blur of the path baseline (default {lam.DEFAULT_SIGMA})')
    parser.add_argument('--steps', type=int, default=lam.DEFAULT_STEPS,
                        help=f'points on the blurring path (default {lam.DEFAULT_STEPS})')
    parser.add_argument('--kernel-size', type=int, default=lam.DEFAULT_KERNEL_SIZE,
                        help=f'side of the Gaussian kernels (default {lam.DEFAULT_KERNEL_SIZE})')
    parser.add_argument('--batch-size', type=int, default=1, help='path steps per forward pass (default 1)')
    parser.add_argument('--device', default='auto', help='cpu, cuda or cuda:N (default: cuda when available)')
    parser.add_argument('--save-maps', default=None,
                        help='also save the (H, W) attribution maps, one array per label, to this .npz')
    parser.add_argument('--dpi', type=int, default=80, help='resolution of the figure (default 80)')
    return parser.parse_args(argv)


def heat_colours(heat: np.ndarray) -> np.ndarray:
    """The demo's colouring: 'seismic' over [0.5, 1], white for no attribution, dark red for the most."""
    from matplotlib import colormaps
    return colormaps['seismic'](heat * 0.5 + 0.5)[..., :3].astype(np.float32)


def draw_box(rgb: np.ndarray, window, colour=(1.0, 0.0, 0.0), thickness: int = 0) -> np.ndarray:
    x, y, width, height = window
    boxed = np.ascontiguousarray(rgb.copy())
    thickness = thickness or max(1, round(max(rgb.shape[:2]) / 200))
    cv2.rectangle(boxed, (x, y), (x + width - 1, y + height - 1), colour, thickness)
    return boxed


def zoom_box(window, size, side: int):
    """A ``side`` x ``side`` square around the window's centre, moved inside an image of ``size`` (h, w)."""
    x, y, width, height = window
    side = min(side, *size)
    left = min(max(x + width // 2 - side // 2, 0), size[1] - side)
    top = min(max(y + height // 2 - side // 2, 0), size[0] - side)
    return left, top, side


def figure_row(hr: np.ndarray, lr: np.ndarray, heat: np.ndarray, scale: int, window):
    """(title, picture) panels for one model."""
    size = (hr.shape[1], hr.shape[0])
    heat_big = cv2.resize(heat_colours(heat), size, interpolation=cv2.INTER_NEAREST)
    lr_big = np.clip(cv2.resize(lr, size, interpolation=cv2.INTER_NEAREST), 0, 1)
    blended = 0.5 * heat_big + 0.5 * lr_big
    # The attribution of a small window is often a few input pixels wide: show their neighbourhood too,
    # with the window outlined thinly in blue so that it hides no red.
    left, top, side = zoom_box(window, hr.shape[:2], 32 * scale)
    x, y, width, height = window
    zoom = draw_box(blended[top:top + side, left:left + side], (x - left, y - top, width, height), (0.0, 0.3, 1.0), 1)
    return [('patch', draw_box(hr, window)), ('attribution on the input', heat_big),
            ('blended with the input', draw_box(blended, window, (0.0, 0.3, 1.0))), ('blended, zoomed', zoom)]


def write_figure(path: Path, rows, *, dpi: int) -> None:
    """``rows``: [(row title, [(panel title, picture)])]."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    columns = len(rows[0][1])
    aspect = rows[0][1][0][1].shape[0] / rows[0][1][0][1].shape[1]
    figure, axes = plt.subplots(len(rows), columns, squeeze=False,
                                figsize=(3.2 * columns, (3.2 * aspect + 0.6) * len(rows)))
    for row_axes, (row_title, panels) in zip(axes, rows):
        for axis, (name, picture) in zip(row_axes, panels):
            axis.imshow(np.clip(picture, 0, 1), interpolation='nearest')
            axis.set_title(name, fontsize=10)
            axis.axis('off')
        # The first panel, the patch itself, is titled with the model and its Diffusion Index.
        row_axes[0].set_title(row_title, fontsize=10, fontweight='bold')
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)


def load_models(args, device):
    """[(label, arch, model)] for the main model and each --also, all of one scale; and that scale."""
    specs = [(args.label, args.model_path, args.arch, args.opt, args.input_range)]
    specs += [(*parse_model_spec(values), None) for values in args.also]
    models = []
    for label, checkpoint, arch, opt_path, input_range in specs:
        model, arch_name = load_model(arch=arch, opt_path=opt_path, checkpoint=checkpoint, input_range=input_range)
        model = model.to(device)
        for parameter in model.parameters():
            parameter.requires_grad_(False)  # gradients are taken with respect to the input only
        models.append((label or arch_name, arch_name, model, network_scale(model, device)))
    scales = {scale for *_, scale in models}
    if len(scales) != 1:
        raise ValueError(f'the models do not share one scale: {sorted(scales)}')
    return [(label, arch, model) for label, arch, model, _ in models], scales.pop()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        models, scale = load_models(args, device)
        hr = imageio.read_image(args.image).rgb
        hr = hr[:hr.shape[0] - hr.shape[0] % scale, :hr.shape[1] - hr.shape[1] % scale]
        if args.lr:
            lr = imageio.read_image(args.lr).rgb
            if lr.shape[0] * scale != hr.shape[0] or lr.shape[1] * scale != hr.shape[1]:
                raise ValueError(f'{args.lr}: {lr.shape[0]}x{lr.shape[1]} is not {args.image} divided by {scale}')
        else:
            lr = np.clip(imresize(hr.astype(np.float64), 1 / scale), 0, 1).astype(np.float32)
        if args.batch_size < 1:
            raise ValueError('--batch-size must be at least 1')
        lam.check_window(tuple(args.window), hr.shape[:2])
    except (ValueError, imageio.ImageReadError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2

    rows, maps = [], {}
    for label, arch, model in models:
        tic = time.perf_counter()
        result = lam.local_attribution_map(model, imageio.image_to_tensor(lr)[0], tuple(args.window),
                                           sigma=args.sigma, steps=args.steps, kernel_size=args.kernel_size,
                                           batch_size=args.batch_size, device=device)
        seconds = time.perf_counter() - tic
        maps[label] = result.map.numpy()
        rows.append((f'{label}: DI {result.diffusion_index:.2f}', figure_row(hr, lr, maps[label], scale, args.window)))
        print(f'{label} ({arch} x{scale}) window {tuple(args.window)} of {args.image}: '
              f'DI = {result.diffusion_index:.2f} ({args.steps} steps, sigma {args.sigma:g}, kernel {args.kernel_size}, '
              f'{seconds:.1f} s on {device})')
    write_figure(Path(args.output), rows, dpi=args.dpi)
    if args.save_maps:
        np.savez(args.save_maps, **maps)
    print(f'-> {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
