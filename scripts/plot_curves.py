"""Plot training curves (losses, validation metrics) from a BasicSR experiment folder.

    python scripts/plot_curves.py experiments/DVMSR_x4 -o curves.png

Reads the newest train_*.log in the folder (or the log file given). Losses are drawn on a log scale,
one line each; each validation metric of each dataset gets its own panel.
"""
import argparse
import sys
from os import path as osp
from pathlib import Path

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
sys.path.insert(0, ROOT)  # so a fresh clone runs without `pip install -e .`

from dvmsr_arch.utils.training_log import read_training_log  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('experiment', help='a BasicSR experiment folder, or one train_*.log')
    parser.add_argument('-o', '--output', default=None, help='PNG to write (default: EXPERIMENT/curves.png)')
    parser.add_argument('--dpi', type=int, default=100, help='resolution of the PNG (default 100)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        log_path, log = read_training_log(args.experiment)
    except (ValueError, OSError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    if not log.losses and not log.validation:
        print(f'error: {log_path}: no training or validation messages in this log', file=sys.stderr)
        return 2

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    panels = (1 if log.losses else 0) + len(log.validation)
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    axes = list(axes[0])
    if log.losses:
        axis = axes.pop(0)
        for name, series in sorted(log.losses.items()):
            iterations, values = zip(*series)
            axis.plot(iterations, values, label=name, linewidth=1)
        if all(v > 0 for series in log.losses.values() for _, v in series):
            axis.set_yscale('log')
        axis.set_title('training losses')
        axis.set_xlabel('iteration')
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    for axis, ((dataset, metric), series) in zip(axes, sorted(log.validation.items())):
        iterations, values = zip(*series)
        axis.plot(iterations, values, marker='o', markersize=3, linewidth=1)
        # NIQE is the one BasicSR metric where lower is better.
        best = (min if metric == 'niqe' else max)(series, key=lambda item: item[1])
        axis.set_title(f'{dataset} {metric} (best {best[1]:.4f} @ {best[0]})')
        axis.set_xlabel('iteration')
        axis.grid(alpha=0.3)
    figure.suptitle(log_path.name, fontsize=9)
    figure.tight_layout()
    output = Path(args.output) if args.output else log_path.parent / 'curves.png'
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=args.dpi)
    plt.close(figure)
    counts = ', '.join(f'{name} x{len(series)}' for name, series in sorted(log.losses.items()))
    print(f'{log_path}: {counts or "no losses"}; {len(log.validation)} validation curves -> {output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
