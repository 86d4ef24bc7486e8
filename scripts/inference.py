"""Super-resolve your own images with a released or trained checkpoint.

    python scripts/inference.py -i photo.png -o results/ --model-path dvmsr_ntire2024_official.pth
    python scripts/inference.py -i folder/ -o results/ --model-path net_g_latest.pth --tile 64
    python scripts/inference.py -i big.png -o results/ --model-path net_g_latest.pth --tile 128 --cuda-graph

Outputs are PNG, named like their input plus a suffix. Grayscale images come back grayscale, an
alpha channel is upscaled bicubically and kept, 16-bit images stay 16-bit. A file that cannot be
read is reported and skipped; the exit status is then 1.
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
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import dvmsr_arch  # noqa: E402,F401  (first: it fits basicsr to this torchvision and registers the networks)
from basicsr.metrics import calculate_psnr, calculate_ssim  # noqa: E402
from dvmsr_arch.checks import apply_tf32  # noqa: E402
from dvmsr_arch.ops import low_memory_inference  # noqa: E402
from dvmsr_arch.utils import imageio, tiling  # noqa: E402
from dvmsr_arch.utils.graphs import CudaGraphInference  # noqa: E402
from dvmsr_arch.utils.network import add_network_arguments, load_model, network_scale, resolve_device  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-i', '--input', required=True, help='an image, or a folder of images (not recursive)')
    parser.add_argument('-o', '--output', required=True, help='folder for the results (created if missing)')
    add_network_arguments(parser)
    parser.add_argument('--scale', type=float, default=None,
                        help="output scale (default: the network's); another value resizes the network's "
                        'output with Lanczos')
    parser.add_argument('--tile', type=int, default=0,
                        help='run tiles of at most N x N input pixels, one at a time (default 0: whole image); '
                        '64 or more keeps PSNR within 0.05 dB on Set5, see docs/usage.md')
    parser.add_argument('--tile-pad', type=int, default=16, help='context around each tile, input pixels (default 16)')
    parser.add_argument('--half', action='store_true', help='run in float16 (CUDA only)')
    parser.add_argument('--fp32', action='store_true',
                        help='true fp32 matmuls and convolutions on GPUs (default: TF32 for both, which moves Set5 '
                        'PSNR by about 0.0001 dB; see docs/usage.md)')
    parser.add_argument('--cuda-graph', action='store_true',
                        help='replay the network from a CUDA graph captured per input size (CUDA only): faster '
                        'where sizes repeat, as the tiles of --tile do; see docs/usage.md')
    parser.add_argument('--low-memory', action='store_true',
                        help='DVMSR on CUDA: in_proj in halves (less GPU memory, a little slower)')
    parser.add_argument('--device', default='auto', help='cpu, cuda or cuda:N (default: cuda when available)')
    parser.add_argument('--suffix', default=None, help='added to each output name (default: _x<scale>)')
    parser.add_argument('--hr', default=None,
                        help='ground truth (a file, or a folder with the same file names): print PSNR/SSIM on the '
                        "Y channel with BasicSR's metrics, border of <scale> pixels cropped")
    return parser.parse_args(argv)


def super_resolve(model, image: imageio.LoadedImage, *, net_scale: int, out_scale: float, tile: int, tile_pad: int,
                  device: torch.device, dtype: torch.dtype):
    """The network's output as float RGB (H', W', 3) and the alpha channel resized to match (or None)."""
    lr = imageio.image_to_tensor(image.rgb)
    sr = imageio.tensor_to_image(
        tiling.upscale(model, lr, scale=net_scale, tile=tile, tile_pad=tile_pad, device=device, dtype=dtype))
    height, width = image.rgb.shape[:2]
    size = (round(height * out_scale), round(width * out_scale))
    if size != sr.shape[:2]:
        sr = cv2.resize(sr, (size[1], size[0]), interpolation=cv2.INTER_LANCZOS4)
    alpha = None if image.alpha is None else imageio.upscale_alpha(image.alpha, size)
    return sr, alpha


def find_ground_truth(hr: Path, image_path: Path) -> Path:
    if hr.is_file():
        return hr
    matches = [p for p in imageio.list_images(hr) if p.stem == image_path.stem]
    if not matches:
        raise imageio.ImageReadError(f'{image_path}: no ground truth named {image_path.stem}.* in {hr}')
    return matches[0]


def score(sr: np.ndarray, hr_path: Path, crop: int):
    """(PSNR, SSIM) of the uint8-rounded output against the ground truth, Y channel."""
    hr = imageio.read_image(hr_path).rgb
    if hr.shape != sr.shape:
        raise imageio.ImageReadError(f'{hr_path}: ground truth is {hr.shape[0]}x{hr.shape[1]}, '
                                     f'the output {sr.shape[0]}x{sr.shape[1]}')
    sr8, hr8 = imageio.rgb_to_uint8_bgr(sr), imageio.rgb_to_uint8_bgr(hr)
    return (calculate_psnr(sr8, hr8, crop, test_y_channel=True), calculate_ssim(sr8, hr8, crop, test_y_channel=True))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        # PyTorch by itself allows TF32 for convolutions only; DVMSR's projections are matmuls, and
        # with them in true fp32 a forward at 339x510 takes 10.0 instead of 6.0 ms on an H100.
        apply_tf32({'tf32': not args.fp32})
        if args.half and device.type != 'cuda':
            raise ValueError('--half needs a CUDA device')
        if args.cuda_graph and device.type != 'cuda':
            raise ValueError('--cuda-graph needs a CUDA device')
        if args.tile < 0 or args.tile_pad < 0:
            raise ValueError('--tile and --tile-pad must not be negative')
        model, arch = load_model(arch=args.arch, opt_path=args.opt, checkpoint=args.model_path,
                                 input_range=args.input_range)
        dtype = torch.float16 if args.half else torch.float32
        model = model.to(device, dtype)
        net_scale = network_scale(model, device, dtype)
        if args.cuda_graph:
            model = CudaGraphInference(model)
        out_scale = args.scale or net_scale
        if out_scale <= 0:
            raise ValueError(f'--scale must be positive, got {out_scale:g}')
        source = Path(args.input)
        if source.is_dir():
            paths = imageio.list_images(source)
            if not paths:
                raise ValueError(f'{source}: no images in this folder (looked for {", ".join(imageio.IMAGE_SUFFIXES)})')
        elif source.is_file():
            paths = [source]
        else:
            raise ValueError(f'{source}: no such file or folder')
        hr = Path(args.hr) if args.hr else None
        if hr is not None and not hr.exists():
            raise ValueError(f'{hr}: no such ground-truth file or folder')
    except ValueError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2

    suffix = args.suffix if args.suffix is not None else f'_x{out_scale:g}'
    output_dir = Path(args.output)
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f'{arch} x{net_scale} from {args.model_path} on {device}'
          + (f', outputs resized to x{out_scale:g}' if out_scale != net_scale else '')
          + (f', tiles of {args.tile} + {args.tile_pad} px' if args.tile else ', whole images'))
    failed, done, model_seconds, megapixels, scores = [], 0, 0.0, 0.0, []
    start = time.perf_counter()
    bar = tqdm(paths, unit='img', dynamic_ncols=True)
    for path in bar:
        try:
            image = imageio.read_image(path)
        except imageio.ImageReadError as error:
            tqdm.write(f'error: {error}', file=sys.stderr)
            failed.append(path)
            continue
        target = output_dir / f'{path.stem}{suffix}.png'
        if target.resolve() == path.resolve():
            tqdm.write(f'error: {path}: the output would overwrite the input; choose another --output or --suffix',
                       file=sys.stderr)
            failed.append(path)
            continue
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        with low_memory_inference(args.low_memory):
            sr, alpha = super_resolve(model, image, net_scale=net_scale, out_scale=out_scale, tile=args.tile,
                                      tile_pad=args.tile_pad, device=device, dtype=dtype)
        seconds = time.perf_counter() - tic  # the result is already on the CPU, so the device is done
        imageio.write_image(target, sr, alpha=alpha, grayscale=image.grayscale, bit_depth=image.bit_depth)
        height, width = image.rgb.shape[:2]
        done += 1
        model_seconds += seconds
        megapixels += height * width / 1e6
        bar.set_postfix_str(f'{path.name} {seconds * 1000:.0f} ms')
        quality = ''
        score_error = None
        if hr is not None:
            try:
                scores.append(score(sr, find_ground_truth(hr, path), net_scale))
                quality = f', PSNR-Y {scores[-1][0]:.3f} dB, SSIM-Y {scores[-1][1]:.4f}'
            except imageio.ImageReadError as error:
                score_error = error
                failed.append(path)
        # Sizes as height x width, as everywhere else in the project.
        tqdm.write(f'{path.name}: {height}x{width} -> {sr.shape[0]}x{sr.shape[1]}, {seconds * 1000:.0f} ms'
                   f'{quality} -> {target}')
        if score_error is not None:  # after the image's own line: the image was written, its score failed
            tqdm.write(f'error: {score_error}', file=sys.stderr)
    bar.close()
    total = time.perf_counter() - start
    per_mp = f'{model_seconds * 1000 / megapixels:.0f} ms per input megapixel' if megapixels else 'no timing'
    mean_score = (f', mean PSNR-Y {np.mean([p for p, _ in scores]):.3f} dB, SSIM-Y {np.mean([q for _, q in scores]):.4f}'
                  if scores else '')
    print(f'{done} image{"" if done == 1 else "s"} in {total:.1f} s, {per_mp}{mean_score}' + (f'; {len(failed)} failed' if failed else ''))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
