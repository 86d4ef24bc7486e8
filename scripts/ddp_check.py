"""Measure DVMSR training on GPUs: a teacher run, a distillation run, and 1-vs-N-GPU scaling.

    python scripts/ddp_check.py --hr HR_FOLDER --val-gt Set5/HR --val-lq Set5/LR_bicubic/X4 \\
        --work /tmp/ddp_check --out ddp_check_results --gpus 1 2

Everything goes through the real entry points (``dvmsr_arch/train.py``, alone or under torchrun
with ``--launcher pytorch``) and the real option files ``options/train/teacher_x4.yml`` and
``options/train/student_x4.yml``, changed only where a run of minutes needs it (data paths, batch,
run length, logging, validation and checkpoint frequencies, EMA decay). In order:

1. data: ``scripts/prepare_trainset.py`` turns ``--hr`` into x4 sub-image LMDBs under ``--work``.
2. probe: peak GPU memory and step time of a teacher step and of a distillation step at two batch
   sizes, on one GPU, give the largest batch (a power of two, at most the paper's 128) that fits one
   GPU for each.
3. teacher: the paper's teacher on one GPU for ``--teacher-seconds``, validated on the Set5 given.
4. student: the paper's student distilled from the teacher's newest checkpoint on one GPU for
   ``--student-seconds``. This is also the one-GPU point of the scaling check.
5. scaling: the same distillation for each N > 1 in ``--gpus`` under torchrun, at the same total
   batch (``batch_size_per_gpu`` = total / N), for ``--scaling-seconds``.

Runs stop at their time limit (SIGTERM to the process group). Throughput comes from the time stamps
of BasicSR's log lines after warm-up, leaving out intervals with a validation or a checkpoint, and
data-loader waiting from BasicSR's ``data_time`` over the same intervals; GPU memory per rank from
``nvidia-smi`` sampled every half second (all of the process: CUDA context, cache and all) and, for
one step, from PyTorch's allocator in the probe. Writes ``summary.json``, ``summary.md`` and
``logs.tar.gz`` under ``--out`` and prints the summary last.
``python scripts/ddp_check.py parse-log LOG TOTAL_BATCH ...`` reads saved training logs again.
"""
import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from os import path as osp
from typing import Dict, List, Optional

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
sys.path.insert(0, ROOT)  # so a fresh clone runs without `pip install -e .`

import yaml  # noqa: E402

PAPER_TOTAL_BATCH = 128
LR_PATCH = 64  # gt_size 256 at x4
MEMORY_SHARE = 0.75  # of a GPU's memory that the chosen batch may fill, by the probe's estimate
TINY_TEACHER = {'type': 'DVMSR', 'upscale': 4, 'embed_dim': 16, 'depths': [1, 1], 'd_state': 4,
                'upsampler': 'pixelshuffle', 'num_feat': 16}
TINY_STUDENT = {'type': 'DVMSR', 'upscale': 4, 'embed_dim': 8, 'depths': [1], 'd_state': 4}


def log(message: str) -> None:
    print(f'[ddp_check {time.strftime("%H:%M:%S")}] {message}', flush=True)


# --- environment ---------------------------------------------------------------------------------


def child_env(visible_gpus: Optional[List[int]]) -> Dict[str, str]:
    env = dict(os.environ)
    # NVLink multicast stays off on shared hosts; torchrun's children inherit these.
    env.setdefault('NCCL_NVLS_ENABLE', '0')
    env.setdefault('TORCH_SYMM_MEM_DISABLE_MULTICAST', '1')
    env.setdefault('NVSHMEM_DISABLE_NVLS', '1')
    env['PYTHONUNBUFFERED'] = '1'
    env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p)
    if visible_gpus is not None:
        env['CUDA_VISIBLE_DEVICES'] = ','.join(map(str, visible_gpus))
    return env


def gpu_inventory() -> List[dict]:
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=index,name,memory.total,driver_version',
                              '--format=csv,noheader,nounits'], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.strip().splitlines():
        index, name, total, driver = [part.strip() for part in line.split(',')]
        gpus.append({'index': int(index), 'name': name, 'memory_total_mib': int(total), 'driver': driver})
    return gpus


class GpuSampler:
    """Peak memory and mean utilisation per GPU while a run lasts, from nvidia-smi every 0.5 s."""

    def __init__(self, period: float = 0.5) -> None:
        self.period, self.peak_mib, self.util = period, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(['nvidia-smi', '--query-gpu=index,memory.used,utilization.gpu',
                                      '--format=csv,noheader,nounits'], capture_output=True, text=True,
                                     timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            for line in out.strip().splitlines():
                index, used, util = [int(part.strip()) for part in line.split(',')]
                self.peak_mib[index] = max(self.peak_mib.get(index, 0), used)
                if used > 1024:  # only while a run holds the GPU
                    self.util.setdefault(index, []).append(util)
            self._stop.wait(self.period)

    def summary(self, gpus: List[int]) -> dict:
        return {'peak_memory_mib': {g: self.peak_mib.get(g) for g in gpus},
                'mean_utilization_pct': {g: round(sum(self.util[g]) / len(self.util[g]), 1) if self.util.get(g) else None
                                         for g in gpus}}


# --- phase 1: data ---------------------------------------------------------------------------------


def prepare_data(hr: str, work: str) -> Dict[str, str]:
    out = osp.join(work, 'data')
    gt, lq = osp.join(out, 'demo_train_HR_sub.lmdb'), osp.join(out, 'demo_train_LR_bicubic_X4_sub.lmdb')
    if not (osp.isdir(gt) and osp.isdir(lq)):
        subprocess.run([sys.executable, osp.join(ROOT, 'scripts', 'prepare_trainset.py'), '--input', hr, '--output',
                        out, '--name', 'demo', '--scales', '4', '--compress-level', '1', '--overwrite'], check=True,
                       env=child_env(None))
    with open(osp.join(gt, 'meta_info.txt')) as meta:
        count = sum(1 for line in meta if line.strip())
    return {'gt': gt, 'lq': lq, 'count': count}


# --- phase 2: probe --------------------------------------------------------------------------------


def probe(args) -> None:
    """(Runs in its own process.) Memory and time of a training step: at two small batches, then at
    the largest batch that the memory they take says fits one GPU."""
    import torch
    import torch.nn.functional as F

    import dvmsr_arch  # noqa: F401
    from basicsr.archs import build_network
    from dvmsr_arch.checks import apply_tf32
    from dvmsr_arch.ops import resolve_backend

    apply_tf32(json.loads(args.switches))  # the precision the runs will use, as train.py sets it
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    memory = torch.cuda.get_device_properties(device).total_memory / 2**20 if device.type == 'cuda' else None
    nets = json.loads(args.nets)
    result = {'device': torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu',
              'scan_backend': resolve_backend('auto', device), 'torch': torch.__version__}
    for label in ('teacher', 'distill'):
        student = build_network(dict(nets['teacher' if label == 'teacher' else 'student'])).to(device)
        teacher = build_network(dict(nets['teacher'])).to(device).eval().requires_grad_(False) \
            if label == 'distill' else None
        optimizer = torch.optim.Adam(student.parameters(), lr=2e-4, betas=(0.9, 0.99))

        def measure(batch: int, student=student, teacher=teacher, optimizer=optimizer) -> dict:
            if device.type == 'cuda':
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            lq = torch.rand(batch, 3, LR_PATCH, LR_PATCH, device=device)
            gt = torch.rand(batch, 3, LR_PATCH * 4, LR_PATCH * 4, device=device)
            times = []
            for _ in range(3):
                start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                out = student(lq)
                loss = F.l1_loss(out, gt)
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(lq)
                    loss = loss + F.l1_loss(out, target)
                loss.backward()
                optimizer.step()
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_reserved() / 2**20 if device.type == 'cuda' else None
            return {'step_s': min(times[1:]), 'peak_reserved_mib': peak}

        points = {batch: measure(batch) for batch in args.batches}
        fit = fitting_batch(points, memory)
        fit.update(measure(fit['batch']))  # the real step time and memory at that batch
        result[label] = {'points': points, 'fit': fit}
        del student, teacher, optimizer
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)


def run_probe(nets: dict, switches: dict, work: str, batches=(2, 4)) -> dict:
    out = osp.join(work, 'probe.json')
    subprocess.run([sys.executable, osp.abspath(__file__), 'probe', '--out', out, '--nets', json.dumps(nets),
                    '--switches', json.dumps(switches), '--batches', *map(str, batches)], check=True,
                   env=child_env([0] if gpu_inventory() else None))
    with open(out) as f:
        return json.load(f)


def fitting_batch(points: dict, memory_mib: Optional[float], cap: int = PAPER_TOTAL_BATCH) -> dict:
    """The largest power of two <= cap whose linear memory estimate fits MEMORY_SHARE of one GPU."""
    (b1, p1), (b2, p2) = sorted(((int(b), p) for b, p in points.items()))[:2]
    if memory_mib is None or p1['peak_reserved_mib'] is None:
        return {'batch': 4, 'per_image_mib': None, 'base_mib': None}
    per_image = max((p2['peak_reserved_mib'] - p1['peak_reserved_mib']) / (b2 - b1), 1.0)
    base = p1['peak_reserved_mib'] - b1 * per_image
    batch = 1
    while batch * 2 <= cap and base + batch * 2 * per_image <= MEMORY_SHARE * memory_mib:
        batch *= 2
    return {'batch': batch, 'per_image_mib': per_image, 'base_mib': base}


# --- phases 3-5: training runs ----------------------------------------------------------------------


def load_options(name: str) -> dict:
    with open(osp.join(ROOT, 'options', 'train', name)) as f:
        return yaml.safe_load(f)


def adapt_options(opt: dict, name: str, data: dict, val: dict, batch_per_gpu: int, step_s: float,
                  seconds: float, workers: int, num_gpu) -> dict:
    """The paper's option file, changed only where a run of minutes on this data needs it."""
    its = max(1.0 / step_s, 1e-3)
    print_freq = max(1, int(round(its * 2)))  # a log line every ~2 s
    val_freq = print_freq * max(1, int(round(seconds / 6 / (print_freq / its))))  # ~6 validations a run
    opt.update({'name': name, 'num_gpu': num_gpu})
    train_set = opt['datasets']['train']
    train_set.update({'dataroot_gt': data['gt'], 'dataroot_lq': data['lq'], 'batch_size_per_gpu': batch_per_gpu,
                      'num_worker_per_gpu': workers,
                      # A small set: a long epoch so the loader's workers are not restarted every few steps.
                      'dataset_enlarge_ratio': max(1, math.ceil(2000 * batch_per_gpu / data['count']))})
    opt['datasets']['val'].update({'dataroot_gt': val['gt'], 'dataroot_lq': val['lq']})
    opt['train']['total_iter'] = 10**7  # stopped by the time limit instead
    # 0.999 (the paper's, for 500k iterations) would leave the EMA weights that validation and the
    # teacher checkpoint use mostly at their initial values after a few hundred iterations.
    opt['train']['ema_decay'] = 0.99
    opt['logger'].update({'print_freq': print_freq, 'save_checkpoint_freq': val_freq, 'use_tb_logger': False})
    opt['logger'].setdefault('wandb', {})['project'] = None
    opt['val']['val_freq'] = val_freq
    return opt


def run_training(opt: dict, gpus: List[int], seconds: float, work: str, torchrun: bool) -> dict:
    opt_path = osp.join(work, f'{opt["name"]}.yml')
    with open(opt_path, 'w') as f:
        yaml.safe_dump(opt, f, sort_keys=False)
    train = osp.join(ROOT, 'dvmsr_arch', 'train.py')
    if torchrun:
        command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={len(gpus)}',
                   train, '-opt', opt_path, '--launcher', 'pytorch']
    else:
        command = [sys.executable, train, '-opt', opt_path]
    console = osp.join(work, f'{opt["name"]}.console.txt')
    log(f'{opt["name"]}: {" ".join(command[1:])} on GPUs {gpus} for {seconds:.0f} s')
    with open(console, 'w') as out, GpuSampler() as sampler:
        start = time.time()
        process = subprocess.Popen(command, cwd=ROOT, env=child_env(gpus if gpu_inventory() else None), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=seconds)
            stopped = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            returncode, stopped = None, True
        wall = time.time() - start
    exp = osp.join(ROOT, 'experiments', opt['name'])
    logs = sorted(f for f in os.listdir(exp) if f.startswith('train_') and f.endswith('.log')) if osp.isdir(exp) else []
    result = {'name': opt['name'], 'gpus': len(gpus), 'batch_per_gpu': opt['datasets']['train']['batch_size_per_gpu'],
              'total_batch': opt['datasets']['train']['batch_size_per_gpu'] * len(gpus), 'wall_s': round(wall, 1),
              'stopped_at_time_limit': stopped, 'returncode': returncode, 'console': console,
              'log': osp.join(exp, logs[-1]) if logs else None, **sampler.summary(gpus)}
    if not stopped and returncode != 0:
        with open(console) as f:
            result['console_tail'] = f.read()[-3000:]
    if result['log']:
        with open(result['log']) as f:
            result.update(parse_log(f.read(), result['total_batch']))
    return result


ITER_LINE = re.compile(r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO: \[.*?\]\[epoch:\s*\d+, iter:\s*([\d,]+), '
                       r'lr:\(.*?\)\] \[eta: .*?, time \(data\): ([\d.]+) \(([\d.]+)\)\] (.*)$')
TIMER_BLOCK = 201  # BasicSR's AvgTimer restarts its mean after 201 records (window 200)
STAMP = re.compile(r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO: (.*)$')


def _seconds(stamp: str) -> float:
    day, clock = stamp.split(' ')
    hms, ms = clock.split(',')
    h, m, s = map(int, hms.split(':'))
    return time.mktime(time.strptime(day, '%Y-%m-%d')) + h * 3600 + m * 60 + s + int(ms) / 1000


def parse_log(text: str, total_batch: int) -> dict:
    """Throughput, data waiting, loss terms and validation curve from a BasicSR training log."""
    iters, validations, interrupted = [], [], set()
    lines = text.splitlines()
    for n, line in enumerate(lines):
        match = ITER_LINE.match(line)
        if match:
            losses = dict(re.findall(r'(l_\w+): ([\d.e+-]+)', match[5]))
            iters.append({'t': _seconds(match[1]), 'iter': int(match[2].replace(',', '')), 'time': float(match[3]),
                          'data_time': float(match[4]), **{k: float(v) for k, v in losses.items()}})
            continue
        stamped = STAMP.match(line)
        if stamped and iters and (stamped[2].startswith('Validation') or stamped[2].startswith('Saving')):
            interrupted.add(len(iters) - 1)  # the interval after this iteration line holds it
        if stamped and stamped[2].startswith('Validation') and iters:
            block = '\n'.join(lines[n:n + 4])
            point = {'iter': iters[-1]['iter']}
            for metric in ('psnr', 'ssim'):
                found = re.search(rf'# {metric}: ([\d.]+)', block)
                if found:
                    point[metric] = float(found[1])
            validations.append(point)
    summary = {'iterations_logged': iters[-1]['iter'] if iters else 0, 'validation': validations,
               'loss_curve': [{k: v for k, v in row.items() if k.startswith('l_') or k == 'iter'} for row in iters]}
    warm = len(iters) // 4  # leave out the first quarter: cudnn autotuning, allocator growth, workers starting
    clean = [(iters[i], iters[i + 1]) for i in range(warm, len(iters) - 1) if i not in interrupted]
    if clean:
        done = sum(b['iter'] - a['iter'] for a, b in clean)
        spent = sum(b['t'] - a['t'] for a, b in clean)
        if spent > 0:
            summary.update({'iterations_per_s': round(done / spent, 3),
                            'images_per_s': round(done * total_batch / spent, 1),
                            'measured_iterations': done, 'measured_s': round(spent, 1)})
        # BasicSR logs running means of the data and iteration times over blocks of 201 iterations;
        # mean x count gives running totals, whose differences between two lines of one block are
        # the time spent in between, so the start-up (workers spawning) stays out.
        def total(row, key):
            return row[key] * ((row['iter'] - 1) % TIMER_BLOCK + 1)

        same_block = [(a, b) for a, b in clean if (a['iter'] - 1) // TIMER_BLOCK == (b['iter'] - 1) // TIMER_BLOCK]
        waited = sum(total(b, 'data_time') - total(a, 'data_time') for a, b in same_block)
        stepped = sum(total(b, 'time') - total(a, 'time') for a, b in same_block)
        if stepped > 0:
            summary['data_wait_share'] = round(waited / stepped, 3)
            summary['data_wait_s_per_iter'] = round(waited / sum(b['iter'] - a['iter'] for a, b in same_block), 4)
    return summary


def compare_losses(one: dict, other: dict) -> dict:
    """Mean of each loss term over the second half of the iterations both runs logged."""
    common = min(one.get('iterations_logged', 0), other.get('iterations_logged', 0))
    means = {}
    for label, run in (('1 GPU', one), ('N GPUs', other)):
        rows = [r for r in run.get('loss_curve', []) if common / 2 < r['iter'] <= common]
        terms = sorted({k for r in rows for k in r if k.startswith('l_')})
        means[label] = {k: sum(r[k] for r in rows) / len(rows) for k in terms} if rows else {}
    return {'iterations': [common // 2 + 1, common], **means}


def newest_checkpoint(name: str) -> Optional[str]:
    models = osp.join(ROOT, 'experiments', name, 'models')
    found = [(int(f[len('net_g_'):-4]), f) for f in os.listdir(models)
             if f.startswith('net_g_') and f[len('net_g_'):-4].isdigit()] if osp.isdir(models) else []
    return osp.join(models, max(found)[1]) if found else None


# --- report -------------------------------------------------------------------------------------------


def fmt(losses: dict) -> str:
    return ', '.join(f'{k} {v:.4f}' for k, v in losses.items()) or '-'


def markdown(summary: dict) -> str:
    rows = ['| run | GPUs | batch/GPU | total batch | iterations | it/s | images/s | data wait | peak memory per GPU '
            '(MiB, nvidia-smi) | last Set5 PSNR / SSIM (Y) |', '|' + '---|' * 10]
    for run in summary['runs']:
        memory = ', '.join(str(v) for v in run.get('peak_memory_mib', {}).values() if v is not None) or '-'
        last = run['validation'][-1] if run.get('validation') else {}
        val = f"{last.get('psnr', float('nan')):.2f} / {last.get('ssim', float('nan')):.4f} @ {last.get('iter')}" \
            if last else '-'
        wait = run.get('data_wait_share')
        rows.append(f"| {run['phase']} | {run['gpus']} | {run['batch_per_gpu']} | {run['total_batch']} | "
                    f"{run.get('iterations_logged', 0)} | {run.get('iterations_per_s', '-')} | "
                    f"{run.get('images_per_s', '-')} | {'-' if wait is None else f'{wait:.0%}'} | {memory} | {val} |")
    lines = ['\n'.join(rows)]
    for n, eff in summary.get('scaling', {}).items():
        lines.append(f'scaling to {n} GPUs: {eff["speedup"]:.2f}x images/s, efficiency {eff["efficiency"]:.0%} '
                     f'(same total batch {eff["total_batch"]}); mean losses over iterations '
                     f'{eff["losses"]["iterations"]}: 1 GPU {fmt(eff["losses"]["1 GPU"])}, '
                     f'{n} GPUs {fmt(eff["losses"]["N GPUs"])}')
    return '\n\n'.join(lines)


def main() -> None:
    if sys.argv[1:2] == ['parse-log']:  # re-read saved logs: python scripts/ddp_check.py parse-log LOG BATCH
        for log_path, total_batch in zip(sys.argv[2::2], sys.argv[3::2]):
            with open(log_path) as f:
                parsed = parse_log(f.read(), int(total_batch))
            parsed.pop('loss_curve')
            print(osp.basename(log_path), json.dumps(parsed))
        return
    if sys.argv[1:2] == ['probe']:  # the probe's own process, started by run_probe
        probe_parser = argparse.ArgumentParser(prog='ddp_check.py probe')
        probe_parser.add_argument('--out', required=True)
        probe_parser.add_argument('--nets', required=True)
        probe_parser.add_argument('--switches', default='{}', help="the option file's tf32 key, as JSON")
        probe_parser.add_argument('--batches', type=int, nargs=2, required=True)
        probe(probe_parser.parse_args(sys.argv[2:]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--hr', help='folder of HR training images')
    parser.add_argument('--val-gt', help='validation HR folder (Set5/HR)')
    parser.add_argument('--val-lq', help='validation LR folder (Set5/LR_bicubic/X4)')
    parser.add_argument('--work', default='/tmp/ddp_check', help='scratch folder on local disk (data, option files)')
    parser.add_argument('--out', default='ddp_check_results', help='folder for summary.json, summary.md, logs.tar.gz')
    parser.add_argument('--gpus', type=int, nargs='+', default=[1, 2], help='GPU counts of the scaling check')
    parser.add_argument('--teacher-seconds', type=float, default=120)
    parser.add_argument('--student-seconds', type=float, default=120)
    parser.add_argument('--scaling-seconds', type=float, default=100)
    parser.add_argument('--total-batch', type=int, help='total batch of the distillation runs (default: the '
                        'largest power of two up to 128 that fits one GPU by the probe)')
    parser.add_argument('--teacher-batch', type=int, help='batch of the teacher run (default: from the probe)')
    parser.add_argument('--workers', type=int, default=8, help='data-loader workers per GPU')
    parser.add_argument('--scan-backend', choices=('auto', 'ref', 'torch', 'mamba_ssm', 'triton'),
                        help='selective-scan backend of every run (sets DVMSR_SCAN_BACKEND; default: auto)')
    parser.add_argument('--tiny', action='store_true', help='tiny networks: to try this script on a CPU')
    args = parser.parse_args()
    for key in ('hr', 'val_gt', 'val_lq'):
        if not getattr(args, key) or not osp.isdir(getattr(args, key)):
            parser.error(f'--{key.replace("_", "-")}: {getattr(args, key)} is not a folder')

    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    inventory = gpu_inventory()
    if inventory and max(args.gpus) > len(inventory):
        parser.error(f'--gpus {max(args.gpus)}: this machine has {len(inventory)} GPUs')
    summary = {'machine': inventory, 'runs': [], 'started': time.strftime('%Y-%m-%d %H:%M:%S')}
    tag = time.strftime('%H%M%S')

    def save() -> None:
        with open(osp.join(args.out, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=1)

    teacher_opt, student_opt = load_options('teacher_x4.yml'), load_options('student_x4.yml')
    if args.tiny:
        teacher_opt['network_g'] = dict(TINY_TEACHER)
        student_opt['network_g'], student_opt['network_t'] = dict(TINY_STUDENT), dict(TINY_TEACHER)
    nets = {'teacher': teacher_opt['network_g'], 'student': student_opt['network_g']}
    switches = {key: teacher_opt[key] for key in ('tf32',) if key in teacher_opt}

    log('data')
    data = prepare_data(args.hr, args.work)
    summary['data'] = data
    val = {'gt': args.val_gt, 'lq': args.val_lq}
    if args.scan_backend:
        os.environ['DVMSR_SCAN_BACKEND'] = args.scan_backend  # every child inherits it
    log(f'{data["count"]} training sub-images; probe')
    try:
        summary['probe'] = run_probe(nets, switches, args.work)
    except subprocess.CalledProcessError:
        if os.environ.get('DVMSR_SCAN_BACKEND', 'auto') == 'torch':
            raise
        # A failing compiled backend should not cost the whole measurement: fall back to the
        # plain PyTorch scan and say so in the summary.
        log('probe failed with the automatic scan backend; retrying with DVMSR_SCAN_BACKEND=torch')
        summary['scan_backend_fallback'] = 'torch'
        os.environ['DVMSR_SCAN_BACKEND'] = 'torch'
        summary['probe'] = run_probe(nets, switches, args.work)
    teacher_fit, distill_fit = summary['probe']['teacher']['fit'], summary['probe']['distill']['fit']
    # The step time scales the log, validation and checkpoint intervals only; a batch given on the
    # command line keeps the probe's per-image time.
    teacher_batch = args.teacher_batch or teacher_fit['batch']
    total = args.total_batch or distill_fit['batch']
    teacher_fit['estimated_step_s'] = teacher_fit['step_s'] * teacher_batch / teacher_fit['batch']
    distill_fit['estimated_step_s'] = distill_fit['step_s'] * total / distill_fit['batch']
    log(f'probe: teacher batch {teacher_batch}, distillation total batch {total}; {summary["probe"]}')
    save()

    num_gpu = 1 if inventory else 0
    opt = adapt_options(teacher_opt, f'gpucheck_teacher_{tag}', data, val, teacher_batch,
                        teacher_fit['estimated_step_s'], args.teacher_seconds, args.workers, num_gpu)
    summary['runs'].append({'phase': 'teacher', **run_training(opt, [0], args.teacher_seconds, args.work, False)})
    save()

    teacher_ckpt = newest_checkpoint(opt['name'])
    summary['teacher_checkpoint'] = teacher_ckpt
    if teacher_ckpt is None:
        log('the teacher saved no checkpoint: distillation runs skipped')
    else:
        student_runs = {}
        for n in sorted(set([1] + args.gpus)):
            if total % n:
                log(f'total batch {total} does not split over {n} GPUs: skipped')
                continue
            opt = adapt_options(yaml.safe_load(yaml.safe_dump(student_opt)), f'gpucheck_student_{n}gpu_{tag}', data,
                                val, total // n, distill_fit['estimated_step_s'] / n,
                                args.student_seconds if n == 1 else args.scaling_seconds, args.workers,
                                num_gpu if n == 1 else 'auto')
            opt['path'].update({'pretrain_network_t': teacher_ckpt, 'param_key_t': 'params_ema'})
            seconds = args.student_seconds if n == 1 else args.scaling_seconds
            student_runs[n] = run_training(opt, list(range(n)), seconds, args.work, torchrun=n > 1)
            summary['runs'].append({'phase': f'student distillation, {n} GPU' + ('s' if n > 1 else ''),
                                    **student_runs[n]})
            save()
        one = student_runs.get(1, {}).get('images_per_s')
        summary['scaling'] = {}
        for n, run in student_runs.items():
            if n > 1 and one and run.get('images_per_s'):
                speedup = run['images_per_s'] / one
                summary['scaling'][n] = {'speedup': speedup, 'efficiency': speedup / n, 'total_batch': total,
                                         'losses': compare_losses(student_runs[1], run)}
    save()

    with tarfile.open(osp.join(args.out, 'logs.tar.gz'), 'w:gz') as tar:
        for run in summary['runs']:
            for key in ('log', 'console'):
                if run.get(key) and osp.isfile(run[key]):
                    tar.add(run[key], arcname=osp.basename(run[key]))
        for name in os.listdir(args.work):
            if name.endswith('.yml') or name == 'probe.json':
                tar.add(osp.join(args.work, name), arcname=name)
    report = markdown(summary)
    with open(osp.join(args.out, 'summary.md'), 'w') as f:
        f.write(report + '\n')
    print(report, flush=True)


if __name__ == '__main__':
    main()
