"""Evaluate with BasicSR: ``python dvmsr_arch/test.py -opt options/test/benchmarks.yml``.

The option file, the weights and the test sets are checked first (:mod:`dvmsr_arch.checks`): bad
input ends the run with one line and exit status 2.
"""
import sys
from os import path as osp

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
sys.path.insert(0, ROOT)  # so a fresh clone runs without `pip install -e .`

from dvmsr_arch.checks import run_checked  # noqa: E402  (also registers the networks and models)
from basicsr.test import test_pipeline  # noqa: E402

if __name__ == '__main__':
    run_checked(test_pipeline, ROOT, is_train=False)
