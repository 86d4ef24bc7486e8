"""CPU check of the released student: Set5 time and PSNR, or the memory of one large input.

    python scripts/cpu_benchmark.py --set5 ../shared/data/Set5 --weights ../shared/weights/dvmsr_ntire2024_official.pth
    /usr/bin/time -v python scripts/cpu_benchmark.py --size 339x510    # peak resident memory

Times the forward pass only (images already decoded), after one warm-up image.
"""
import argparse
import sys
import time
from os import path as osp
from pathlib import Path

sys.path.insert(0, osp.abspath(osp.join(__file__, osp.pardir, osp.pardir)))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import dvmsr_arch  # noqa: E402,F401
from basicsr.metrics import calculate_psnr  # noqa: E402
from basicsr.utils import img2tensor, tensor2img  # noqa: E402
from dvmsr_arch.archs.dvmsr_arch import DVMSR  # noqa: E402
from dvmsr_arch.utils.network import load_weights  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--set5', type=Path, help='Set5 folder with HR/ and LR_bicubic/X4/')
    parser.add_argument('--weights', type=Path, help='released checkpoint (plain or params/params_ema)')
    parser.add_argument('--size', help='HxW of one random LR input instead of Set5, e.g. 339x510')
    parser.add_argument('--backend', default='torch', help='selective-scan backend (default: torch)')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (default: torch decides)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    net = DVMSR(scan_backend=args.backend).eval()
    if args.weights:
        load_weights(net, args.weights)
    print(f'backend {args.backend}, {torch.get_num_threads()} threads')

    if args.size:
        height, width = (int(v) for v in args.size.lower().split('x'))
        start = time.perf_counter()
        out = net(torch.rand(1, 3, height, width))
        print(f'{height}x{width} -> {tuple(out.shape[2:])}: {time.perf_counter() - start:.2f} s')
        return 0
    if args.set5 is None:
        parser.error('give --set5 or --size')
    hr_paths = sorted((args.set5 / 'HR').glob('*.png'))
    if not hr_paths:
        parser.error(f'no PNG images in {args.set5 / "HR"}')
    pairs = []
    for hr_path in hr_paths:
        lr = cv2.imread(str(args.set5 / 'LR_bicubic' / 'X4' / hr_path.name), cv2.IMREAD_COLOR)
        pairs.append((hr_path.stem, img2tensor(lr.astype(np.float32) / 255.0)[None], cv2.imread(str(hr_path))))
    net(pairs[-1][1])  # warm-up
    total, psnrs = 0.0, []
    for name, lr, hr in pairs:
        start = time.perf_counter()
        sr = net(lr)
        elapsed = time.perf_counter() - start
        total += elapsed
        psnrs.append(calculate_psnr(tensor2img(sr), hr, crop_border=4, test_y_channel=True))
        print(f'{name:10s} {lr.shape[2]}x{lr.shape[3]}  {elapsed:6.2f} s  PSNR-Y {psnrs[-1]:.3f} dB')
    print(f'Set5: {len(pairs)} images in {total:.2f} s, mean PSNR-Y {np.mean(psnrs):.3f} dB')
    return 0


if __name__ == '__main__':
    sys.exit(main())
