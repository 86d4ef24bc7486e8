"""Train with BasicSR: ``python dvmsr_arch/train.py -opt options/train/student_x4.yml``."""
import sys
from os import path as osp

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
sys.path.insert(0, ROOT)  # so a fresh clone runs without `pip install -e .`

import dvmsr_arch  # noqa: E402,F401  (registers the networks and models)
from basicsr.train import train_pipeline  # noqa: E402

if __name__ == '__main__':
    train_pipeline(ROOT)
