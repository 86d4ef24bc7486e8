"""Every option file under options/ (those added later included) reads as BasicSR reads it and builds.

Each file is found at collection time, so a new file in any folder under options/ is tested as soon
as it exists.
"""
from pathlib import Path

import pytest
import yaml

import dvmsr_arch  # noqa: F401  (registers the networks and models)
from basicsr.archs import build_network
from basicsr.utils.options import ordered_yaml
from basicsr.utils.registry import DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY
from dvmsr_arch.models.distill_model import DISTILL_POSITIONS

REPO = Path(__file__).resolve().parents[1]
OPTION_FILES = sorted((REPO / 'options').rglob('*.yml'))


def plain(value):
    """OrderedDicts (BasicSR's loader) as dicts, for comparing with plain YAML."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def test_the_main_option_files_exist():
    names = {str(p.relative_to(REPO / 'options')) for p in OPTION_FILES}
    assert {'train/teacher_x4.yml', 'train/student_x4.yml', 'train/student_x4_nodistill.yml',
            'test/benchmarks.yml'} <= names


@pytest.mark.parametrize('path', OPTION_FILES, ids=lambda p: str(p.relative_to(REPO / 'options')))
def test_option_file_reads_and_builds(path):
    text = path.read_text()
    opt = yaml.load(text, Loader=ordered_yaml()[0])
    # Numbers are numbers for BasicSR's loader and for plain YAML alike (`!!float 2e-4`, not `2e-4`).
    assert plain(opt) == yaml.safe_load(text)
    assert opt['model_type'] in MODEL_REGISTRY._obj_map

    for phase, dataset in opt['datasets'].items():
        assert phase.split('_')[0] in ('train', 'val', 'test'), phase
        assert dataset['type'] in DATASET_REGISTRY._obj_map, phase
        for key in ('dataroot_gt', 'dataroot_lq'):
            # Relative to the repository root, where the commands run: no machine's own paths.
            assert dataset[key].startswith('datasets/'), (phase, key, dataset[key])
    for key, value in opt['path'].items():
        if key.startswith('pretrain_network') and value is not None:
            assert value.startswith('experiments/'), (key, value)

    networks = {key: build_network(dict(spec)) for key, spec in opt.items() if key.startswith('network_')}
    assert 'network_g' in networks

    if 'train' in opt:
        train = opt['train']
        assert isinstance(train['optim_g']['lr'], float) and isinstance(train['total_iter'], int)
        for key in ('pixel_opt', 'distill_opt'):
            if key in train:
                assert train[key]['type'] in LOSS_REGISTRY._obj_map, key
                assert isinstance(train[key]['loss_weight'], float), key
        assert opt['scale'] == opt['network_g']['upscale']
    for metric in (opt.get('val') or {}).get('metrics', {}).values():
        assert metric['type'] in METRIC_REGISTRY._obj_map

    if opt['model_type'] == 'DistillSRModel':
        assert 'network_t' in networks and opt['path']['pretrain_network_t']
        assert opt['network_t']['upscale'] == opt['scale']
        position = opt['train'].get('distill_position', 'output')
        assert position in DISTILL_POSITIONS
        if position == 'mid':
            student_block, teacher_block = opt['train']['distill_layers']
            assert 0 <= student_block < len(networks['network_g'].layers)
            assert 0 <= teacher_block < len(networks['network_t'].layers)
