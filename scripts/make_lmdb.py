"""Pack a folder of images into an LMDB that BasicSR's datasets read (``io_backend: lmdb``).

    python scripts/make_lmdb.py --input datasets/DF2K/DF2K_train_HR_sub \
        --output datasets/DF2K/DF2K_train_HR_sub.lmdb

The layout is BasicSR's: ``data.mdb`` and ``lock.mdb`` hold each image PNG-encoded under its file
name without the extension, and ``meta_info.txt`` has one line per image,
``<key>.png (<h>,<w>,<c>) <compress_level>``. Images are encoded by worker processes and written in
file-name order as they come, so memory stays flat however large the folder. The LMDB is built in a
temporary folder next to --output and renamed to it once complete: an unreadable image, met only
when its turn comes, leaves no half-made LMDB and does not touch the one --overwrite would replace.
"""
import argparse
import os
import shutil
import sys
import tempfile
from multiprocessing import Pool
from os import path as osp
from typing import List, Sequence, Tuple

import cv2
import lmdb
from tqdm import tqdm

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm')
COMMIT_EVERY = 1000  # images per LMDB transaction
MAP_FILL = 0.75  # share of the map the values may fill before it grows: B-tree pages need the rest


class UsageError(Exception):
    """Bad input; the message is one line naming the file or option."""


def list_images(folder: str) -> List[str]:
    """Image file names directly inside ``folder``, sorted; their stems must be unique (they are the keys)."""
    if not osp.isdir(folder):
        raise UsageError(f'--input {folder}: not a folder')
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise UsageError(f'--input {folder}: holds no images ({", ".join(IMAGE_SUFFIXES)})')
    stems = [osp.splitext(n)[0] for n in names]
    unfit = [s for s in stems if not s.isascii() or any(ch.isspace() for ch in s)]
    if unfit:  # BasicSR looks keys up as ASCII and splits meta_info.txt lines at spaces
        raise UsageError(f'--input {folder}: file name {unfit[0]!r} is not ASCII without spaces; rename it')
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise UsageError(f'--input {folder}: several files share the key {duplicates[0]!r} (keys drop the extension)')
    return names


def encode_image(task: Tuple[str, int]) -> Tuple[str, bytes, Tuple[int, int, int]]:
    """(path, compress_level) -> (path, PNG bytes, (h, w, c)); keeps the image's own channels and depth."""
    path, compress_level = task
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UsageError(f'{path}: not a readable image')
    ok, png = cv2.imencode('.png', image, [cv2.IMWRITE_PNG_COMPRESSION, compress_level])
    if not ok:
        raise UsageError(f'{path}: could not be PNG-encoded')
    h, w = image.shape[:2]
    return path, png.tobytes(), (h, w, 1 if image.ndim == 2 else image.shape[2])


def check_output(output: str, overwrite: bool) -> None:
    """Refuse an --output that cannot be written, before any image is read."""
    if not output.endswith('.lmdb'):
        raise UsageError(f'--output {output}: the name must end with .lmdb')
    if osp.exists(output):
        if not overwrite:
            raise UsageError(f'--output {output}: already exists (pass --overwrite to replace it)')
        if not osp.isdir(output):
            raise UsageError(f'--output {output}: is a file, not an LMDB folder; remove it or choose another name')


def write_lmdb(folder: str, output: str, *, compress_level: int = 1, workers: int = 1, overwrite: bool = False,
               names: Sequence[str] = (), desc: str = '') -> int:
    """Write the images of ``folder`` (or just ``names`` in it) to ``output``; returns how many.

    The LMDB is built in a temporary folder next to ``output`` and takes its name only once every
    image is in: an unreadable image (found only when its turn comes) or an interruption leaves
    nothing half-made, and an LMDB that ``overwrite`` replaces stays as it was until then."""
    names = list(names) or list_images(folder)
    check_output(output, overwrite)
    parent = osp.dirname(osp.abspath(output))
    os.makedirs(parent, exist_ok=True)
    building = tempfile.mkdtemp(prefix=osp.basename(output) + '.', suffix='.partial', dir=parent)
    try:
        count = _write_images(folder, names, building, compress_level, workers, desc or osp.basename(output))
        if osp.exists(output):
            old = building + '.old'
            os.rename(output, old)
            os.rename(building, output)
            shutil.rmtree(old)
        else:
            os.rename(building, output)
    finally:
        if osp.exists(building):
            shutil.rmtree(building)
    return count


def _write_images(folder: str, names: Sequence[str], output: str, compress_level: int, workers: int,
                  desc: str) -> int:
    sizes = sum(osp.getsize(osp.join(folder, n)) for n in names)
    # The map is a sparse file, so a generous start costs no disk; it doubles whenever the images need more.
    map_size = 2 * sizes + (64 << 20)
    env = lmdb.open(output, map_size=map_size)
    tasks = [(osp.join(folder, n), compress_level) for n in names]
    meta_lines = []
    written = 0
    try:
        with Pool(workers) if workers > 1 else _Serial() as pool:
            txn = env.begin(write=True)
            for count, (path, png, (h, w, c)) in enumerate(
                    tqdm(pool.imap(encode_image, tasks, chunksize=4), total=len(tasks), unit='img', desc=desc), 1):
                if written + len(png) > MAP_FILL * map_size:  # grow the map between transactions
                    txn.commit()
                    map_size *= 2
                    env.set_mapsize(map_size)
                    txn = env.begin(write=True)
                key = osp.splitext(osp.basename(path))[0]
                txn.put(key.encode('ascii'), png)
                written += len(png)
                meta_lines.append(f'{key}.png ({h},{w},{c}) {compress_level}')
                if count % COMMIT_EVERY == 0:
                    txn.commit()
                    txn = env.begin(write=True)
            txn.commit()
    finally:
        env.close()
    with open(osp.join(output, 'meta_info.txt'), 'w') as f:
        f.write('\n'.join(meta_lines) + '\n')
    return len(meta_lines)


class _Serial:
    """The part of ``multiprocessing.Pool`` used here, in this process (for --workers 1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(func, iterable, chunksize=1):
        return map(func, iterable)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--input', required=True, help='folder of images (not searched recursively)')
    parser.add_argument('--output', required=True, help='LMDB folder to create, NAME.lmdb')
    parser.add_argument('--compress-level', type=int, default=1, choices=range(10), metavar='0-9',
                        help='PNG compression inside the LMDB (default 1, as BasicSR: fast to decode)')
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='encoding processes')
    parser.add_argument('--overwrite', action='store_true', help='replace --output if it exists')
    args = parser.parse_args(argv)
    try:
        count = write_lmdb(args.input, args.output, compress_level=args.compress_level, workers=args.workers,
                           overwrite=args.overwrite)
    except UsageError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    print(f'{args.output}: {count} images')
    return 0


if __name__ == '__main__':
    sys.exit(main())
