"""Make a benchmark set from HR images alone: HR cropped to a multiple of the scale, MATLAB-bicubic LR.

    python scripts/make_benchmark.py --input path/to/Manga109 --output datasets/benchmarks/Manga109

writes ``<output>/HR/<name>.png`` and ``<output>/LR_bicubic/X<s>/<name>.png`` (same names in both),
the layout ``options/test/benchmarks.yml`` reads. HR is cropped at its bottom and right edges to a
multiple of every requested scale (``--scales 2 3 4`` gives BasicSR's "GTmod12"); LR is BasicSR's
``imresize``, which reproduces MATLAB's ``imresize(..., 'bicubic')`` with antialiasing, rounded to
8 bits. Images are read as 8-bit colour, as BasicSR's datasets read them (grey ones get three equal
channels).
"""
import argparse
import math
import os
import sys
from functools import reduce
from multiprocessing import Pool
from os import path as osp
from typing import List, Sequence, Tuple

import cv2
import numpy as np
from tqdm import tqdm

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
sys.path.insert(0, ROOT)  # so a fresh clone runs without `pip install -e .`

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm')


class UsageError(Exception):
    """Bad input; the message is one line naming the file or option."""


def common_multiple(scales: Sequence[int]) -> int:
    return reduce(lambda a, b: a * b // math.gcd(a, b), scales, 1)


def modcrop(image: np.ndarray, multiple: int) -> np.ndarray:
    h, w = image.shape[:2]
    return image[:h - h % multiple, :w - w % multiple]


def load_imresize():
    """basicsr's ``imresize``, imported on first use: basicsr (and torch) take seconds to load, which a
    command that stops at a bad argument should not wait for."""
    import dvmsr_arch  # noqa: F401  (basicsr needs the compatibility patches first)
    from basicsr.utils.matlab_functions import imresize
    return imresize


def bicubic_downscale(image: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB's bicubic downscaling (with antialiasing) of a uint8 HxWxC image whose sides divide by ``scale``."""
    small = load_imresize()(image.astype(np.float32) / 255.0, 1 / scale)
    return np.clip(np.round(small * 255.0), 0, 255).astype(np.uint8)


def read_color(path: str) -> np.ndarray:
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise UsageError(f'{path}: not a readable image')
    return image


def list_images(folder: str, option: str = '--input') -> List[str]:
    if not osp.isdir(folder):
        raise UsageError(f'{option} {folder}: not a folder')
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise UsageError(f'{option} {folder}: holds no images ({", ".join(IMAGE_SUFFIXES)})')
    return names


def _make_one(task: Tuple[str, str, Tuple[int, ...]]) -> str:
    import torch

    path, output, scales = task
    torch.set_num_threads(1)  # one image per process; threads would only fight over the cores
    hr = modcrop(read_color(path), common_multiple(scales))
    if min(hr.shape[:2]) == 0:
        raise UsageError(f'{path}: smaller than the scale {common_multiple(scales)}')
    name = osp.splitext(osp.basename(path))[0] + '.png'
    cv2.imwrite(osp.join(output, 'HR', name), hr)
    for scale in scales:
        cv2.imwrite(osp.join(output, 'LR_bicubic', f'X{scale}', name), bicubic_downscale(hr, scale))
    return name


def make_benchmark(input_dir: str, output: str, scales: Sequence[int], workers: int, overwrite: bool) -> int:
    names = list_images(input_dir)
    if osp.abspath(input_dir) == osp.abspath(osp.join(output, 'HR')):
        raise UsageError(f'--output {output}: its HR folder is the --input folder; write the set elsewhere')
    stems = [osp.splitext(n)[0] for n in names]
    if len(set(stems)) != len(stems):
        raise UsageError(f'--input {input_dir}: two images share a name apart from the extension')
    folders = [osp.join(output, 'HR')] + [osp.join(output, 'LR_bicubic', f'X{s}') for s in scales]
    for folder in folders:
        if osp.isdir(folder) and os.listdir(folder) and not overwrite:
            raise UsageError(f'--output {output}: {folder} is not empty (pass --overwrite to write into it)')
        os.makedirs(folder, exist_ok=True)
    tasks = [(osp.join(input_dir, n), output, tuple(scales)) for n in names]
    load_imresize()  # once, before the workers fork, so that each need not import basicsr again
    with Pool(max(1, min(workers, len(tasks)))) as pool:
        for _ in tqdm(pool.imap_unordered(_make_one, tasks), total=len(tasks), unit='img', desc=osp.basename(output)):
            pass
    return len(tasks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--input', required=True, help='folder of HR images')
    parser.add_argument('--output', required=True, help='set folder to write (HR/ and LR_bicubic/X<s>/ inside)')
    parser.add_argument('--scales', type=int, nargs='+', default=[4], choices=(2, 3, 4), help='default: 4')
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1)
    parser.add_argument('--overwrite', action='store_true', help='write into non-empty output folders')
    args = parser.parse_args(argv)
    try:
        count = make_benchmark(args.input, args.output, sorted(set(args.scales)), args.workers, args.overwrite)
    except UsageError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    print(f'{args.output}: {count} images, HR cropped to a multiple of {common_multiple(args.scales)}, '
          f'LR x{", x".join(map(str, sorted(set(args.scales))))}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
