"""Turn a folder of HR images (DIV2K, Flickr2K, your own) into a BasicSR training set in one command.

    python scripts/prepare_trainset.py --input datasets/DF2K/DF2K_train_HR --output datasets/DF2K

For each HR image, cropped at its bottom and right edges to a multiple of every scale, it writes
overlapping sub-images (``--crop-size`` 480, ``--step`` 240, as BasicSR's DIV2K recipe) and, from
the MATLAB-bicubic downscaled whole image (BasicSR's ``imresize``), the LR sub-images that cover the
same area, under the same names. Then it packs each folder into an LMDB (``scripts/make_lmdb.py``).
With ``--name DF2K`` the output is::

    <output>/DF2K_train_HR_sub/                   <output>/DF2K_train_HR_sub.lmdb
    <output>/DF2K_train_LR_bicubic/X4_sub/        <output>/DF2K_train_LR_bicubic_X4_sub.lmdb

the paths ``options/train/*.yml`` read. Images are processed in parallel, one per process.
"""
import argparse
import os
import sys
from multiprocessing import Pool
from os import path as osp
from typing import List, Sequence, Tuple

SCRIPTS = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, osp.dirname(SCRIPTS))  # the repository root, so a fresh clone runs without `pip install -e .`
sys.path.insert(0, SCRIPTS)

import cv2  # noqa: E402
from tqdm import tqdm  # noqa: E402

from make_benchmark import (UsageError, bicubic_downscale, common_multiple, list_images, load_imresize,  # noqa: E402
                            modcrop, read_color)
from make_lmdb import write_lmdb  # noqa: E402


def crop_starts(length: int, crop: int, step: int, thresh: int) -> List[int]:
    """Where the crops along one side start: every ``step``, plus one flush with the far edge when
    more than ``thresh`` pixels would be left over. A side shorter than ``crop`` gives one crop of it all."""
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop + 1, step))
    if length - (starts[-1] + crop) > thresh:
        starts.append(length - crop)
    return starts


def output_folders(output: str, name: str, scales: Sequence[int]) -> dict:
    folders = {'HR': osp.join(output, f'{name}_train_HR_sub')}
    for scale in scales:
        folders[scale] = osp.join(output, f'{name}_train_LR_bicubic', f'X{scale}_sub')
    return folders


def lmdb_path(output: str, name: str, key) -> str:
    if key == 'HR':
        return osp.join(output, f'{name}_train_HR_sub.lmdb')
    return osp.join(output, f'{name}_train_LR_bicubic_X{key}_sub.lmdb')


def _split_one(task: Tuple[str, dict, Tuple[int, ...], int, int, int, int]) -> int:
    import torch  # here, in the workers: a bad argument should not wait seconds for torch to load

    path, folders, scales, crop, step, thresh, compress_level = task
    torch.set_num_threads(1)  # one image per process; threads would only fight over the cores
    multiple = common_multiple(scales)
    hr = modcrop(read_color(path), multiple)
    h, w = hr.shape[:2]
    if min(h, w) == 0:
        raise UsageError(f'{path}: smaller than the scale {multiple}')
    # Sides shorter than the crop are taken whole (cropped to the common multiple of the scales).
    crop_h, crop_w = min(crop, h), min(crop, w)
    tops, lefts = crop_starts(h, crop_h, step, thresh), crop_starts(w, crop_w, step, thresh)
    lr = {scale: bicubic_downscale(hr, scale) for scale in scales}
    stem = osp.splitext(osp.basename(path))[0]
    png = [cv2.IMWRITE_PNG_COMPRESSION, compress_level]
    index = 0
    for top in tops:
        for left in lefts:
            index += 1
            name = f'{stem}_s{index:03d}.png'
            cv2.imwrite(osp.join(folders['HR'], name), hr[top:top + crop_h, left:left + crop_w], png)
            for scale in scales:  # starts and sizes are multiples of every scale, so LR crops are exact
                t, l, ch, cw = top // scale, left // scale, crop_h // scale, crop_w // scale
                cv2.imwrite(osp.join(folders[scale], name), lr[scale][t:t + ch, l:l + cw], png)
    return index


def prepare(input_dir: str, output: str, name: str, scales: Sequence[int], crop: int, step: int, thresh: int,
            workers: int, compress_level: int, make_lmdbs: bool, overwrite: bool) -> int:
    names = list_images(input_dir)
    multiple = common_multiple(scales)
    for option, value in (('--crop-size', crop), ('--step', step)):
        if value <= 0 or value % multiple:
            raise UsageError(f'{option} {value}: must be a positive multiple of {multiple} (the scales {list(scales)}), '
                             'so that LR sub-images cover exactly the HR ones')
    folders = output_folders(output, name, scales)
    for key, folder in folders.items():
        if osp.isdir(folder) and os.listdir(folder) and not overwrite:
            raise UsageError(f'--output {output}: {folder} is not empty (pass --overwrite to write into it)')
        target = lmdb_path(output, name, key)
        if make_lmdbs and osp.exists(target) and not overwrite:
            raise UsageError(f'--output {output}: {target} exists (pass --overwrite to replace it)')
        os.makedirs(folder, exist_ok=True)

    tasks = [(osp.join(input_dir, n), folders, tuple(scales), crop, step, thresh, compress_level) for n in names]
    count = 0
    load_imresize()  # once, before the workers fork, so that each need not import basicsr again
    with Pool(max(1, min(workers, len(tasks)))) as pool:
        progress = tqdm(pool.imap_unordered(_split_one, tasks), total=len(tasks), unit='img', desc='sub-images')
        for made in progress:
            count += made
    print(f'{count} sub-images from {len(names)} images in {folders["HR"]}')
    if make_lmdbs:
        for key, folder in folders.items():
            target = lmdb_path(output, name, key)
            write_lmdb(folder, target, workers=workers, overwrite=overwrite, desc=osp.basename(target))
            print(f'wrote {target}')
    return count


def default_name(input_dir: str) -> str:
    base = osp.basename(osp.normpath(input_dir))
    return base[:-len('_train_HR')] if base.endswith('_train_HR') else base


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--input', required=True, help='folder of HR images')
    parser.add_argument('--output', required=True, help='folder for the sub-image folders and LMDBs')
    parser.add_argument('--name', help='prefix of everything written (default: the input folder name without '
                        '"_train_HR", e.g. DF2K for DF2K_train_HR)')
    parser.add_argument('--scales', type=int, nargs='+', default=[2, 3, 4], choices=(2, 3, 4),
                        help='LR scales to make (default: 2 3 4)')
    parser.add_argument('--crop-size', type=int, default=480, help='HR sub-image side (default 480)')
    parser.add_argument('--step', type=int, default=240, help='HR distance between sub-images (default 240)')
    parser.add_argument('--thresh-size', type=int, default=0,
                        help='add a last crop flush with the edge when more than this many pixels remain (default 0)')
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='processes (default: all cores)')
    parser.add_argument('--compress-level', type=int, default=3, choices=range(10), metavar='0-9',
                        help='PNG compression of the sub-image files (default 3; the LMDBs use 1)')
    parser.add_argument('--no-lmdb', action='store_true', help='only write the sub-image folders')
    parser.add_argument('--overwrite', action='store_true', help='write into existing output')
    args = parser.parse_args(argv)
    try:
        prepare(args.input, args.output, args.name or default_name(args.input), sorted(set(args.scales)),
                args.crop_size, args.step, args.thresh_size, args.workers, args.compress_level, not args.no_lmdb,
                args.overwrite)
    except UsageError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
