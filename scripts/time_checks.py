"""Time the start-up checks of ``dvmsr_arch/train.py`` on a synthetic GT/LQ LMDB pair of N images.

    python scripts/time_checks.py --images 20000 --work /tmp/time_checks

The checks read ``meta_info.txt``, look every key up in the LMDB and parse the first bytes of every
stored image (its PNG header); they never decode an image. This script writes N small PNG pairs
(``--gt-side`` pixels, x4) into BasicSR-layout LMDBs once, then times the checks on them, first
with the LMDB files just written (in the page cache) and then after asking the kernel to drop
the files' cached pages (``posix_fadvise``), which approximates a first read from disk.
"""
import argparse
import os
import sys
import time
from os import path as osp

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
sys.path.insert(0, ROOT)  # so a fresh clone runs without `pip install -e .`

import cv2  # noqa: E402
import lmdb  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from dvmsr_arch import checks  # noqa: E402


def write_lmdb(path: str, images: int, side: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tile = cv2.imencode('.png', rng.integers(0, 255, (side, side, 3), dtype=np.uint8))[1].tobytes()
    env = lmdb.open(path, map_size=max(1 << 30, images * len(tile) * 3))
    with env.begin(write=True) as txn, open(osp.join(path, 'meta_info.txt'), 'w') as meta:
        for i in range(images):
            key = f'{i:07d}'
            txn.put(key.encode(), tile)
            meta.write(f'{key}.png ({side},{side},3) 1\n')
    env.close()


def drop_cache(folder: str) -> None:
    for name in os.listdir(folder):
        fd = os.open(osp.join(folder, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--images', type=int, default=20000)
    parser.add_argument('--gt-side', type=int, default=64)
    parser.add_argument('--work', default='/tmp/time_checks')
    args = parser.parse_args()
    gt, lq = osp.join(args.work, 'gt.lmdb'), osp.join(args.work, 'lq.lmdb')
    if not (osp.isdir(gt) and osp.isdir(lq)):
        os.makedirs(gt)
        os.makedirs(lq)
        write_lmdb(gt, args.images, args.gt_side, 0)
        write_lmdb(lq, args.images, args.gt_side // 4, 1)
    opt = {'name': 'time_checks', 'scale': 4, 'is_train': True, 'opt_file': 'time_checks', 'path': {},
           'datasets': {'train': {'name': 'synthetic', 'type': 'PairedImageDataset', 'phase': 'train', 'scale': 4,
                                  'dataroot_gt': gt, 'dataroot_lq': lq, 'io_backend': {'type': 'lmdb'},
                                  'gt_size': args.gt_side, 'use_hflip': True, 'use_rot': True,
                                  'batch_size_per_gpu': 16, 'num_worker_per_gpu': 4}}}
    for label in ('page cache warm', 'page cache dropped'):
        if label == 'page cache dropped':
            drop_cache(gt)
            drop_cache(lq)
        start = time.perf_counter()
        checks.check_datasets(yaml.safe_load(yaml.safe_dump(opt)))
        elapsed = time.perf_counter() - start
        print(f'{args.images} GT/LQ pairs, {label}: {elapsed:.2f} s ({elapsed / args.images * 1e6:.0f} us a pair)')


if __name__ == '__main__':
    main()
