"""Train with BasicSR: ``python dvmsr_arch/train.py -opt options/train/student_x4.yml``.

On N GPUs: ``torchrun --nproc_per_node=N dvmsr_arch/train.py -opt ... --launcher pytorch``. The
option file and its data are checked first (:mod:`dvmsr_arch.checks`): bad input ends the run with
one line and exit status 2 before any data loader or GPU is touched.
"""
import sys
from os import path as osp

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
sys.path.insert(0, ROOT)  # so a fresh clone runs without `pip install -e .`

from dvmsr_arch.checks import run_checked  # noqa: E402  (also registers the networks and models)
from basicsr.train import train_pipeline  # noqa: E402

if __name__ == '__main__':
    run_checked(train_pipeline, ROOT, is_train=True)
