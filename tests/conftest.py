"""Shared test settings.

The real Set5 images and the released weights live outside the repository, in ``../shared`` by
default; point ``--shared-dir`` or the environment variable ``DVMSR_SHARED`` elsewhere. Tests that
need them are skipped, with the path they looked at, when they are absent.
"""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def pytest_addoption(parser):
    parser.addoption('--shared-dir', default=None,
                     help='folder holding data/Set5 and weights/ (default: $DVMSR_SHARED or ../shared)')


@pytest.fixture(scope='session')
def shared_dir(request) -> Path:
    value = request.config.getoption('--shared-dir') or os.environ.get('DVMSR_SHARED') or str(REPO.parent / 'shared')
    return Path(value).resolve()


@pytest.fixture(scope='session')
def set5_dir(shared_dir) -> Path:
    path = shared_dir / 'data' / 'Set5'
    if not (path / 'HR').is_dir() or not (path / 'LR_bicubic' / 'X4').is_dir():
        pytest.skip(f'Set5 not found at {path} (set --shared-dir or DVMSR_SHARED)')
    return path


@pytest.fixture(scope='session')
def weights_dir(shared_dir) -> Path:
    path = shared_dir / 'weights'
    if not (path / 'dvmsr_ntire2024_official.pth').is_file():
        pytest.skip(f'released weights not found in {path} (set --shared-dir or DVMSR_SHARED)')
    return path


@pytest.fixture
def torch_tf32_defaults():
    """PyTorch's own TF32 switches (convolutions on, matmuls off) for the test, then whatever they were:
    the benchmark's ``tf32-conv`` precision mode, which sets and restores them."""
    import torch
    if str(REPO / 'scripts') not in sys.path:
        sys.path.insert(0, str(REPO / 'scripts'))
    from benchmark import precision
    with precision('tf32-conv', torch.device('cpu')):
        yield
