"""The data preparation CLIs: make_lmdb.py, prepare_trainset.py, make_benchmark.py."""
import os
import subprocess
import sys
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest

import dvmsr_arch  # noqa: F401  (basicsr needs the compatibility patches first)
from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.utils.matlab_functions import imresize

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / 'scripts'
sys.path.insert(0, str(SCRIPTS))

import make_benchmark  # noqa: E402
import make_lmdb  # noqa: E402
import prepare_trainset  # noqa: E402


def cli(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    result = subprocess.run([sys.executable, str(SCRIPTS / script), *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def refused(capsys, main, *args):
    """Bad input, in-process (the same ``main`` the command runs): exit status 2 and one line."""
    assert main([str(a) for a in args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def random_image(rng, h, w, channels=3):
    coarse = rng.random((max(h // 6, 2), max(w // 6, 2), channels)).astype(np.float32)
    image = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(image * 255, 0, 255).astype(np.uint8).reshape(h, w, channels).squeeze()


def lmdb_image(path, key):
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        data = txn.get(key.encode('ascii'))
    env.close()
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def matlab_bicubic(image, scale):
    return np.clip(np.round(imresize(image.astype(np.float32) / 255, 1 / scale) * 255), 0, 255).astype(np.uint8)


def test_make_lmdb_layout_round_trip_and_overwrite(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = {'a': random_image(rng, 40, 52), 'b': random_image(rng, 33, 20, 1), 'c': random_image(rng, 16, 16)}
    folder = tmp_path / 'imgs'
    folder.mkdir()
    for name, image in images.items():
        cv2.imwrite(str(folder / f'{name}.png'), image)
    (folder / 'notes.txt').write_text('not an image')
    out = tmp_path / 'set.lmdb'

    cli('make_lmdb.py', '--input', folder, '--output', out, '--workers', '2')
    assert sorted(p.name for p in out.iterdir()) == ['data.mdb', 'lock.mdb', 'meta_info.txt']
    assert (out / 'meta_info.txt').read_text().splitlines() == [
        'a.png (40,52,3) 1', 'b.png (33,20,1) 1', 'c.png (16,16,3) 1']
    for name, image in images.items():
        assert np.array_equal(lmdb_image(out, name), image)

    assert refused(capsys, make_lmdb.main, '--input', folder, '--output', out) == (
        f'error: --output {out}: already exists (pass --overwrite to replace it)')
    os.remove(folder / 'c.png')
    cli('make_lmdb.py', '--input', folder, '--output', out, '--overwrite', '--compress-level', '5', '--workers', '1')
    assert (out / 'meta_info.txt').read_text().splitlines() == ['a.png (40,52,3) 5', 'b.png (33,20,1) 5']

    # An unreadable image is found only when its turn comes: the LMDB it would have replaced stays
    # whole, and no half-made folder is left behind, with --overwrite or without.
    (folder / 'zz.png').write_bytes(b'not a png')
    for output, extra in ((out, ['--overwrite']), (tmp_path / 'new.lmdb', [])):
        assert make_lmdb.main([str(a) for a in ('--input', folder, '--output', output, '--workers', '1', *extra)]) == 2
        # after the progress bar's lines
        assert capsys.readouterr().err.strip().splitlines()[-1] == f'error: {folder / "zz.png"}: not a readable image'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['imgs', 'set.lmdb']
    assert (out / 'meta_info.txt').read_text().splitlines() == ['a.png (40,52,3) 5', 'b.png (33,20,1) 5']
    assert np.array_equal(lmdb_image(out, 'a'), images['a'])
    os.remove(folder / 'zz.png')
    (tmp_path / 'file.lmdb').write_text('')
    assert refused(capsys, make_lmdb.main, '--input', folder, '--output', tmp_path / 'file.lmdb', '--overwrite') == (
        f'error: --output {tmp_path / "file.lmdb"}: is a file, not an LMDB folder; remove it or choose another name')

    assert refused(capsys, make_lmdb.main, '--input', tmp_path / 'nowhere', '--output', tmp_path / 'x.lmdb') == (
        f'error: --input {tmp_path / "nowhere"}: not a folder')
    assert refused(capsys, make_lmdb.main, '--input', folder, '--output', tmp_path / 'x.db') == (
        f'error: --output {tmp_path / "x.db"}: the name must end with .lmdb')


def test_prepare_trainset_sub_images_lr_and_lmdbs(tmp_path, capsys):
    rng = np.random.default_rng(1)
    hr_dir = tmp_path / 'Toy_train_HR'
    hr_dir.mkdir()
    originals = {'0001': random_image(rng, 110, 130), '0002': random_image(rng, 40, 75)}
    for name, image in originals.items():
        cv2.imwrite(str(hr_dir / f'{name}.png'), image)

    cli('prepare_trainset.py', '--input', hr_dir, '--output', tmp_path / 'out', '--crop-size', '48', '--step', '24',
        '--workers', '2')
    out = tmp_path / 'out'
    hr_sub, lr_sub = out / 'Toy_train_HR_sub', out / 'Toy_train_LR_bicubic'
    # Scales 2, 3, 4 -> sides cropped to multiples of 12. 0001: 108 x 120 -> rows at 0, 24, 48, 60
    # (the last flush with the edge), columns at 0, 24, 48, 72; 0002: 36 x 72 is shorter than the crop,
    # so whole rows of 36 at columns 0 and 24.
    assert len(list(hr_sub.glob('0001_s*.png'))) == 16 and len(list(hr_sub.glob('0002_s*.png'))) == 2
    hr = originals['0001'][:108, :120]
    expected = {'0001_s001.png': (0, 0), '0001_s004.png': (0, 72), '0001_s016.png': (60, 72)}
    for name, (top, left) in expected.items():
        assert np.array_equal(cv2.imread(str(hr_sub / name)), hr[top:top + 48, left:left + 48])
        for scale in (2, 3, 4):
            lr = matlab_bicubic(hr, scale)  # the whole image first, then the crop: no border effects
            t, l, c = top // scale, left // scale, 48 // scale
            assert np.array_equal(cv2.imread(str(lr_sub / f'X{scale}_sub' / name)), lr[t:t + c, l:l + c]), (name, scale)
    assert cv2.imread(str(hr_sub / '0002_s002.png')).shape == (36, 48, 3)

    keys = (out / 'Toy_train_HR_sub.lmdb' / 'meta_info.txt').read_text().split('\n')
    names = [line.split(' ')[0] for line in keys if line]
    assert len(names) == 18
    for scale in (2, 3, 4):
        lines = (out / f'Toy_train_LR_bicubic_X{scale}_sub.lmdb' / 'meta_info.txt').read_text().split('\n')
        assert [line.split(' ')[0] for line in lines if line] == names

    dataset = PairedImageDataset({
        'phase': 'train', 'scale': 4, 'gt_size': 32, 'use_hflip': True, 'use_rot': True, 'filename_tmpl': '{}',
        'dataroot_gt': str(out / 'Toy_train_HR_sub.lmdb'), 'dataroot_lq': str(out / 'Toy_train_LR_bicubic_X4_sub.lmdb'),
        'io_backend': {'type': 'lmdb'}})
    sample = dataset[0]
    assert len(dataset) == 18 and sample['gt'].shape == (3, 32, 32) and sample['lq'].shape == (3, 8, 8)

    assert 'is not empty (pass --overwrite' in refused(capsys, prepare_trainset.main, '--input', hr_dir, '--output',
                                                       out, '--crop-size', '48', '--step', '24')
    assert refused(capsys, prepare_trainset.main, '--input', hr_dir, '--output', tmp_path / 'odd', '--crop-size',
                   '50').startswith('error: --crop-size 50: must be a positive multiple of 12')


def test_make_benchmark_matches_the_matlab_set5(tmp_path, set5_dir):
    cli('make_benchmark.py', '--input', set5_dir / 'HR', '--output', tmp_path / 'Set5', '--workers', '2')
    names = sorted(p.name for p in (set5_dir / 'HR').iterdir())
    assert sorted(p.name for p in (tmp_path / 'Set5' / 'HR').iterdir()) == names
    for name in names:
        assert np.array_equal(cv2.imread(str(tmp_path / 'Set5' / 'HR' / name)), cv2.imread(str(set5_dir / 'HR' / name)))
        ours = cv2.imread(str(tmp_path / 'Set5' / 'LR_bicubic' / 'X4' / name)).astype(np.float64)
        matlab = cv2.imread(str(set5_dir / 'LR_bicubic' / 'X4' / name)).astype(np.float64)
        assert ours.shape == matlab.shape
        # BasicSR's imresize rounds once at the end; MATLAB on uint8 input also rounds between its
        # row and column passes. That leaves differences of a level or two on a tenth of the pixels.
        psnr = 10 * np.log10(255**2 / np.mean((ours - matlab)**2))
        assert psnr > 50, (name, psnr)
        assert np.mean(ours == matlab) > 0.85, name


def test_make_benchmark_crops_to_every_scale(tmp_path, capsys):
    rng = np.random.default_rng(2)
    (tmp_path / 'in').mkdir()
    cv2.imwrite(str(tmp_path / 'in' / 'x.png'), random_image(rng, 50, 77, 1))  # grey: read as three channels
    cli('make_benchmark.py', '--input', tmp_path / 'in', '--output', tmp_path / 'set', '--scales', '3', '4')
    assert cv2.imread(str(tmp_path / 'set' / 'HR' / 'x.png'), cv2.IMREAD_UNCHANGED).shape == (48, 72, 3)
    assert cv2.imread(str(tmp_path / 'set' / 'LR_bicubic' / 'X3' / 'x.png')).shape == (16, 24, 3)
    assert cv2.imread(str(tmp_path / 'set' / 'LR_bicubic' / 'X4' / 'x.png')).shape == (12, 18, 3)
    assert 'its HR folder is the --input folder' in refused(capsys, make_benchmark.main, '--input',
                                                            tmp_path / 'set' / 'HR', '--output', tmp_path / 'set')
