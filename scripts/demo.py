"""The main job end to end on a CPU in minutes, with nothing to download (what ``make demo`` runs).

1. builds a small training set of real photographs from the images that ship inside scikit-image
   (``scripts/prepare_trainset.py``) and a validation set from two more (``scripts/make_benchmark.py``);
2. trains a small DVMSR teacher (``dvmsr_arch/train.py -opt options/demo/train_teacher.yml``) and,
   side by side on the other core, a small student without distillation
   (``options/demo/train_student_nodistill.yml``), which does not need the teacher;
3. distils the same student from the teacher for as many iterations (``train_student.yml``), while
   the other core evaluates the teacher and the plain student;
4. evaluates the distilled student (``dvmsr_arch/test.py`` with ``options/demo/test_*.yml``) and
   bicubic upscaling, and prints PSNR / SSIM on the Y channel.

Everything it writes goes to ``datasets/demo/``, ``experiments/demo_*`` and ``results/demo_*``; a new
run replaces what the previous one left there.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from os import path as osp
from typing import Optional

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
sys.path.insert(0, ROOT)  # so a fresh clone runs without `pip install -e .`

TRAIN_IMAGES = ('astronaut', 'rocket', 'motorcycle_left', 'motorcycle_right', 'hubble_deep_field', 'immunohistochemistry')
VAL_IMAGES = ('chelsea', 'coffee')
DATA = osp.join('datasets', 'demo')
TEACHER = ('teacher', 'demo_teacher', 'train_teacher.yml', 'test_teacher.yml')
STUDENT = ('student, distilled', 'demo_student', 'train_student.yml', 'test_student.yml')
PLAIN_STUDENT = ('student without distillation', 'demo_student_nodistill', 'train_student_nodistill.yml',
                 'test_student_nodistill.yml')
RUNS = (TEACHER, STUDENT, PLAIN_STUDENT)  # the order of the table
# Lines of BasicSR's log worth showing while a step runs: training progress, the teacher, metrics.
SHOWN = re.compile(r'epoch:\s*\d+, iter:|Validation|# psnr|# ssim|Teacher \w+ loaded|Error|error:')


def skimage_photo(name: str):
    from skimage import data
    if name.startswith('motorcycle_'):
        left, right, _ = data.stereo_motorcycle()
        return left if name.endswith('left') else right
    return getattr(data, name)()


def step(number: int, text: str) -> None:
    print(f'\n[{number}/4] {text}', flush=True)


def start(args, log_name: str, threads: int) -> 'Job':
    """Start a command from the repository root; its output goes to datasets/demo/<log_name>.log."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED='1')
    process = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    return Job(process, args, osp.join(ROOT, DATA, f'{log_name}.log'), log_name)


class Job:
    """A running command whose progress lines are echoed (tagged with its name) as they come."""

    def __init__(self, process: subprocess.Popen, args, log_path: str, tag: str) -> None:
        self.process, self.args, self.log_path, self.tag, self.lines = process, args, log_path, tag, []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.log_path, 'w') as log:
            for line in self.process.stdout:
                log.write(line)
                self.lines.append(line)
                if SHOWN.search(line):
                    print(f'    {self.tag}: {line.split(" INFO: ", 1)[-1].rstrip()}', flush=True)

    def wait(self) -> str:
        self.process.wait()
        self.reader.join()
        if self.process.returncode != 0:
            sys.stdout.write(''.join(self.lines[-40:]))
            raise SystemExit(f'demo: `{" ".join(map(str, self.args))}` failed (exit {self.process.returncode}); '
                             f'full output in {self.log_path}')
        return ''.join(self.lines)


def run(args, log_name: str, threads: int) -> str:
    return start(args, log_name, threads).wait()


def build_data(threads: int) -> None:
    import cv2

    for part, names in (('train_HR', TRAIN_IMAGES), ('val_HR', VAL_IMAGES)):
        folder = osp.join(ROOT, DATA, part)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for name in names:
            cv2.imwrite(osp.join(folder, f'{name}.png'), cv2.cvtColor(skimage_photo(name), cv2.COLOR_RGB2BGR))
    print(f'    training photographs: {", ".join(TRAIN_IMAGES)}; validation: {", ".join(VAL_IMAGES)}')
    run(['scripts/prepare_trainset.py', '--input', osp.join(DATA, 'train_HR'), '--output', DATA, '--name', 'demo',
         '--scales', '4', '--crop-size', '192', '--step', '96', '--overwrite'], 'prepare_trainset', threads)
    run(['scripts/make_benchmark.py', '--input', osp.join(DATA, 'val_HR'), '--output', osp.join(DATA, 'val'),
         '--scales', '4', '--overwrite'], 'make_benchmark', threads)


def bicubic_scores() -> tuple:
    """Bicubic (MATLAB imresize) upscaling of the validation LR images, scored like test.py does."""

    import cv2
    import numpy as np

    import dvmsr_arch  # noqa: F401  (basicsr needs the compatibility patches first)
    from basicsr.metrics import calculate_psnr, calculate_ssim
    from basicsr.utils.matlab_functions import imresize

    psnrs, ssims = [], []
    for name in sorted(os.listdir(osp.join(ROOT, DATA, 'val', 'HR'))):
        hr = cv2.imread(osp.join(ROOT, DATA, 'val', 'HR', name))
        lr = cv2.imread(osp.join(ROOT, DATA, 'val', 'LR_bicubic', 'X4', name))
        sr = np.clip(np.round(imresize(lr.astype(np.float32) / 255, 4) * 255), 0, 255)
        psnrs.append(calculate_psnr(sr, hr, crop_border=4, test_y_channel=True))
        ssims.append(calculate_ssim(sr, hr, crop_border=4, test_y_channel=True))
    return float(np.mean(psnrs)), float(np.mean(ssims))


def option(file_name: str) -> str:
    return f'options/demo/{file_name}'


def train(run: tuple, threads: int, seed: Optional[int]) -> 'Job':
    _, name, train_file, _ = run
    return start(['dvmsr_arch/train.py', '-opt', seeded(train_file, seed)], name, threads)


def seeded(train_file: str, seed: Optional[int]) -> str:
    """The option file, or a copy of it in datasets/demo/options/ with another ``manual_seed``.

    A copy, not ``--force_yml manual_seed=N``: BasicSR seeds its generators before it applies
    ``--force_yml``, so that would change the logged option and nothing else.
    """
    if seed is None:
        return option(train_file)
    with open(osp.join(ROOT, option(train_file))) as f:
        text, found = re.subn(r'^manual_seed: .*$', f'manual_seed: {seed}', f.read(), flags=re.MULTILINE)
    if found != 1:
        raise SystemExit(f'demo: {option(train_file)} has no top-level manual_seed line to change')
    copy = osp.join(DATA, 'options', train_file)
    os.makedirs(osp.join(ROOT, DATA, 'options'), exist_ok=True)
    with open(osp.join(ROOT, copy), 'w') as f:
        f.write(text)
    return copy


def evaluate(run: tuple, threads: int) -> 'Job':
    _, name, _, test_file = run
    return start(['dvmsr_arch/test.py', '-opt', option(test_file)], f'{name}_eval', threads)


def scores(output: str) -> tuple:
    """The last PSNR and SSIM that test.py logged."""
    return (float(re.findall(r'# psnr: ([0-9.]+)', output)[-1]), float(re.findall(r'# ssim: ([0-9.]+)', output)[-1]))


def size(run: tuple, log: str) -> tuple:
    """(parameters, iterations) of a finished training run: its weights, and the last iteration its log shows."""
    import torch

    _, name, _, _ = run
    weights = torch.load(osp.join(ROOT, 'experiments', name, 'models', 'net_g_latest.pth'), map_location='cpu')
    iterations = int(re.findall(r'iter:\s*([\d,]+)', log)[-1].replace(',', ''))
    return sum(t.numel() for t in weights['params_ema'].values()), iterations


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads of each training or test process (default 1: two processes run '
                             'side by side, one per core, and a busy machine does not stall them)')
    parser.add_argument('--seed', type=int, default=None,
                        help="random seed of the three training runs (default: the option files' manual_seed, 0; "
                             'another one runs copies of them written to datasets/demo/options/): it shows how '
                             'much the table moves from run to run')
    args = parser.parse_args(argv)
    start_time = time.time()
    os.makedirs(osp.join(ROOT, DATA), exist_ok=True)
    shutil.rmtree(osp.join(ROOT, DATA, 'options'), ignore_errors=True)  # a previous --seed run's copies
    for _, name, _, _ in RUNS:  # BasicSR would archive, not replace, a previous demo run's folders
        for folder in ('experiments', 'results'):
            for suffix in ('', '_eval'):
                shutil.rmtree(osp.join(ROOT, folder, name + suffix), ignore_errors=True)

    def elapsed() -> str:
        return f'{time.time() - start_time:.0f} s so far'

    step(1, 'Building the training and validation sets from scikit-image photographs')
    build_data(args.threads)
    if args.seed is not None:
        print(f'    seed {args.seed}: training from copies of the option files in {osp.join(DATA, "options")}/')

    # The student without distillation needs no teacher: it trains beside the teacher, so that each
    # of the two cores has one process for the whole run.
    # The option files the runs read: the shipped ones, or their reseeded copies.
    used = option if args.seed is None else (lambda file_name: osp.join(DATA, 'options', file_name))
    step(2, f'Training the teacher ({used(TEACHER[2])}) and, beside it, the student without distillation '
         f'({used(PLAIN_STUDENT[2])}) ({elapsed()})')
    jobs = {run: train(run, args.threads, args.seed) for run in (TEACHER, PLAIN_STUDENT)}
    logs = {run: job.wait() for run, job in jobs.items()}

    step(3, f'Distilling the student from the teacher ({used(STUDENT[2])}) and, beside it, evaluating '
         f'the teacher and the plain student ({elapsed()})')
    distillation = train(STUDENT, args.threads, args.seed)
    results = {run: scores(evaluate(run, args.threads).wait()) for run in (TEACHER, PLAIN_STUDENT)}
    logs[STUDENT] = distillation.wait()

    step(4, f'Evaluating the distilled student and bicubic upscaling on {", ".join(VAL_IMAGES)} ({elapsed()})')
    results[STUDENT] = scores(evaluate(STUDENT, args.threads).wait())
    rows = [('bicubic', '-', '-', *bicubic_scores())]
    for run in RUNS:
        parameters, iterations = size(run, logs[run])
        rows.append((run[0], f'{parameters:,d}', f'{iterations:,d}', *results[run]))

    print(f'\nDemo results, x4 on {" and ".join(VAL_IMAGES)} (Y channel, 4-pixel border cropped), '
          f'{time.time() - start_time:.0f} s in all:\n')
    print(f'| {"model":<28} | {"parameters":>10} | {"iterations":>10} | {"PSNR (dB)":>9} | {"SSIM":>6} |')
    print(f'|{"-" * 30}|{"-" * 12}|{"-" * 12}|{"-" * 11}|{"-" * 8}|')
    for label, parameters, iterations, psnr, ssim in rows:
        print(f'| {label:<28} | {parameters:>10} | {iterations:>10} | {psnr:9.2f} | {ssim:6.4f} |')
    print('\nWeights: experiments/demo_*/models/net_g_latest.pth; logs: datasets/demo/*.log and experiments/demo_*/')
    return 0


if __name__ == '__main__':
    sys.exit(main())
