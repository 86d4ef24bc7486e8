"""The paper's experiments as option files: parameter counts, shared settings, and model statistics.

The parameter counts are the paper's (Tables 3 to 9) to the last printed digit; the exact integers
are those of the released architecture. The FLOP and activation counts are the NTIRE 2024
convention of paper Tables 2, 6 and 9 at a 256x256 input.
"""
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import dvmsr_arch  # noqa: F401  (first: it fits basicsr to this torchvision, and registers DVMSR)
from basicsr.archs import build_network  # noqa: E402
from basicsr.utils.options import ordered_yaml  # noqa: E402
from dvmsr_arch.archs import dvmsr_arch as dvmsr_module  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OPTIONS = REPO / 'options' / 'train'

# file -> (parameters of network_g, the paper's value as printed in millions, where)
PAPER_PARAMETERS = {
    'ablation/vimm_6666.yml': (7_222_359, '7.222', 'Table 3, exp. 1'),
    'ablation/vimm_2292.yml': (5_213_559, '5.214', 'Table 3, exp. 2'),
    'ablation/vimm_2222.yml': (3_651_159, '3.651', 'Table 3, exp. 3'),
    'ablation/vimm_1111.yml': (2_758_359, '2.758', 'Table 3, exp. 4'),
    'ablation/rssb_2.yml': (2_174_799, '2.175', 'Table 4, exp. 1'),
    'ablation/rssb_4.yml': (3_651_159, '3.651', 'Table 4, exp. 2'),
    'ablation/rssb_6.yml': (5_127_519, '5.128', 'Table 4, exp. 3'),
    'ablation/rssb_10.yml': (8_080_239, '8.080', 'Table 4, exp. 4'),
    'ablation/channels_150.yml': (2_664_069, '2.664', 'Table 5, exp. 1'),
    'ablation/channels_180.yml': (3_651_159, '3.651', 'Table 5, exp. 2'),
    'ablation/channels_192.yml': (4_089_027, '4.089', 'Table 5, exp. 3'),
    'ablation/channels_210.yml': (4_809_489, '4.809', 'Table 5, exp. 4'),
    'ablation/ssm_unidirectional.yml': (424_428, '0.4244', 'Table 6, row 1'),
    'ablation/ssm_bidirectional.yml': (484_908, '0.4849', 'Table 6, row 2'),
    'ablation/distill_none.yml': (424_428, '0.424', 'Table 7, row 1'),
    'ablation/distill_mid_l1_1to1.yml': (424_428, '0.424', 'Table 7, row 2'),
    'ablation/distill_mid_l1_5to1.yml': (424_428, '0.424', 'Table 7, row 3'),
    'ablation/distill_mid_l2_1to1.yml': (424_428, '0.424', 'Table 7, row 4'),
    'ablation/distill_end_l1_1to1.yml': (424_428, '0.424', 'Table 7, row 5'),
    'ablation/distill_end_l1_5to1.yml': (424_428, '0.424', 'Table 7, row 6'),
    'ablation/teacher_4089k.yml': (4_089_027, '4.089', 'Table 8, row 2'),
    'ablation/teacher_7432k.yml': (7_432_131, '7.432', 'Table 8, row 3'),
    'ablation/student_from_4089k.yml': (424_428, '0.424', 'Table 8, row 2'),
    'ablation/student_from_7432k.yml': (424_428, '0.424', 'Table 8, row 3'),
    'ntire2024/teacher_x4.yml': (5_127_519, None, 'paper 4.4.4: 6 RSSBs x 2 ViMMs x 180 channels'),
    'ntire2024/student_x4.yml': (424_428, '0.424', 'Table 9'),
}
# The teacher of each distillation file (Table 7's runs use the 4.089M teacher).
TEACHERS = {
    'ablation/distill_mid_l1_1to1.yml': 'ablation/teacher_4089k.yml',
    'ablation/distill_mid_l1_5to1.yml': 'ablation/teacher_4089k.yml',
    'ablation/distill_mid_l2_1to1.yml': 'ablation/teacher_4089k.yml',
    'ablation/distill_end_l1_1to1.yml': 'ablation/teacher_4089k.yml',
    'ablation/distill_end_l1_5to1.yml': 'ablation/teacher_4089k.yml',
    'ablation/student_from_4089k.yml': 'ablation/teacher_4089k.yml',
    'ablation/student_from_7432k.yml': 'ablation/teacher_7432k.yml',
    'ntire2024/student_x4.yml': 'ntire2024/teacher_x4.yml',
}
# Table 7: (distill_position, distillation loss, lambda_dis with lambda_1 = 1)
TABLE_7 = {
    'ablation/distill_mid_l1_1to1.yml': ('mid', 'L1Loss', 1.0),
    'ablation/distill_mid_l1_5to1.yml': ('mid', 'L1Loss', 5.0),
    'ablation/distill_mid_l2_1to1.yml': ('mid', 'MSELoss', 1.0),
    'ablation/distill_end_l1_1to1.yml': ('output', 'L1Loss', 1.0),
    'ablation/distill_end_l1_5to1.yml': ('output', 'L1Loss', 5.0),
}
# Keys that exist only in some files by design: the second validation set's file-name template,
# the classical upsampler's width, and everything distillation adds.
OPTIONAL_KEYS = re.compile(r'^(datasets\.val_2\.filename_tmpl|network_[gt]\.num_feat|network_t\..*|path\..*_t|'
                           r'train\.distill_.*)$')
# Values that differ between files by design (the rest must be the same in every file).
VARYING_KEYS = re.compile(r'^(name|model_type|datasets\.train\.(name|dataroot_gt|dataroot_lq)|datasets\.val_2\..*|'
                          r'network_[gt]\..*|path\..*_t|train\.distill_.*)$')


def load(relative: str, loader=None) -> dict:
    with open(OPTIONS / relative, encoding='utf-8') as f:
        return yaml.load(f, Loader=loader or ordered_yaml()[0])


def flatten(tree, prefix=''):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from flatten(value, f'{prefix}{key}.')
    else:
        yield prefix[:-1], tree


_COUNTS = {}


def parameters(spec: dict) -> int:
    """Parameters of the network an option entry builds (each distinct spec built once)."""
    key = yaml.safe_dump(dict(spec), sort_keys=True)
    if key not in _COUNTS:
        _COUNTS[key] = sum(p.numel() for p in build_network(dict(spec)).parameters())
    return _COUNTS[key]


def load_model_stats():
    spec = importlib.util.spec_from_file_location('model_stats', REPO / 'scripts' / 'model_stats.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_option_file_is_in_the_table():
    found = {str(p.relative_to(OPTIONS)) for folder in ('ablation', 'ntire2024') for p in (OPTIONS / folder).glob('*.yml')}
    assert found == set(PAPER_PARAMETERS)


@pytest.mark.parametrize('relative', sorted(PAPER_PARAMETERS))
def test_network_g_has_the_papers_parameter_count(relative):
    expected, paper, where = PAPER_PARAMETERS[relative]
    count = parameters(load(relative)['network_g'])
    assert count == expected, f'{relative} ({where})'
    if paper is not None:  # the paper prints millions, rounded to its own number of decimals
        assert f'{count / 1e6:.{len(paper.split(".")[1])}f}' == paper, f'{relative} ({where})'


@pytest.mark.parametrize('relative', sorted(TEACHERS))
def test_teacher_is_the_teacher_run_of_its_table(relative):
    opt, teacher_file = load(relative), TEACHERS[relative]
    teacher_opt = load(teacher_file)
    assert opt['model_type'] == 'DistillSRModel'
    # network_t is exactly the teacher run's network_g, and points at that run's EMA weights.
    assert dict(opt['network_t']) == dict(teacher_opt['network_g'])
    assert parameters(opt['network_t']) == PAPER_PARAMETERS[teacher_file][0]
    assert opt['path']['pretrain_network_t'] == f'experiments/{teacher_opt["name"]}/models/net_g_latest.pth'
    assert opt['path']['param_key_t'] == 'params_ema'
    assert opt['path']['strict_load_t'] is True


@pytest.mark.parametrize('relative', sorted(TABLE_7))
def test_table_7_distillation_settings(relative):
    position, loss, weight = TABLE_7[relative]
    train = load(relative)['train']
    assert train['distill_position'] == position
    assert train['distill_opt']['type'] == loss
    assert train['distill_opt']['loss_weight'] == weight
    assert train['pixel_opt'] == {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'}
    if position == 'mid':  # both networks have 4 RSSBs; the index must exist in each
        student_block, teacher_block = train['distill_layers']
        assert 0 <= student_block < 4 and 0 <= teacher_block < 4


def test_files_share_one_shape_and_the_papers_schedule():
    files = sorted(PAPER_PARAMETERS)
    flat = {relative: dict(flatten(load(relative))) for relative in files}
    reference = flat['ablation/vimm_2222.yml']
    for relative in files:
        keys = {k for k in flat[relative] if not OPTIONAL_KEYS.match(k)}
        assert keys == {k for k in reference if not OPTIONAL_KEYS.match(k)}, relative
        for key, value in flat[relative].items():
            if not VARYING_KEYS.match(key):
                assert value == reference[key], f'{relative}: {key}'
        assert flat[relative]['name'] == f'{relative.split("/")[0]}_{Path(relative).stem}', relative
    # Paper 4.2, as the reference (hence every file) states it.
    assert reference['datasets.train.gt_size'] == 256
    assert reference['datasets.train.use_hflip'] and reference['datasets.train.use_rot']
    assert reference['datasets.train.io_backend.type'] == 'lmdb'
    assert reference['train.total_iter'] == 500_000
    assert reference['train.optim_g.type'] == 'Adam'
    assert reference['train.optim_g.lr'] == 2e-4 and reference['train.optim_g.betas'] == [0.9, 0.99]
    assert reference['train.scheduler.milestones'] == [250_000, 400_000, 450_000, 475_000]
    assert reference['train.scheduler.gamma'] == 0.5
    assert reference['train.ema_decay'] > 0
    assert reference['val.val_freq'] == 5000
    assert reference['datasets.val.dataroot_gt'] == 'datasets/benchmarks/Set5/HR'
    for metric in ('psnr', 'ssim'):  # paper 4.1: Y channel, 4-pixel border
        assert reference[f'val.metrics.{metric}.test_y_channel'] is True
        assert reference[f'val.metrics.{metric}.crop_border'] == 4
    # Paper 4.4.1: the ablations train on DIV2K (4.4.2 and 4.4.3 name no data set); only relative paths
    # under datasets/.
    for relative in files:
        paths = [v for k, v in flat[relative].items() if k.startswith('datasets.') and 'dataroot' in k]
        assert all(p.startswith('datasets/') for p in paths), relative
        if relative.startswith('ablation/'):
            assert flat[relative]['datasets.train.dataroot_gt'] == 'datasets/DIV2K/DIV2K_train_HR_sub.lmdb'


@pytest.mark.parametrize('relative', sorted(PAPER_PARAMETERS))
def test_numbers_are_numbers_for_plain_yaml_too(relative):
    """BasicSR's loader and yaml.safe_load must agree, and no number may be left as a string."""
    basicsr_view = dict(flatten(load(relative)))
    plain_view = dict(flatten(load(relative, yaml.SafeLoader)))
    assert basicsr_view == plain_view
    number = re.compile(r'^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$')
    assert not [k for k, v in plain_view.items() if isinstance(v, str) and number.match(v)], relative


def test_ntire_student_is_the_released_network(weights_dir):
    opt = load('ntire2024/student_x4.yml')
    net = build_network(dict(opt['network_g']))
    state = torch.load(weights_dir / 'dvmsr_ntire2024_official.pth', map_location='cpu', weights_only=True)
    net.load_state_dict(state, strict=True)
    # The text of paper 4.4.4 says 2 RSSBs: that network has 242,388 parameters, which is neither the
    # released one nor Table 9's 0.424M.
    two_rssb = parameters(dict(opt['network_g'], depths=[2, 2]))
    assert two_rssb == 242_388 and f'{two_rssb / 1e6:.3f}' != PAPER_PARAMETERS['ntire2024/student_x4.yml'][1]


# --- model statistics -------------------------------------------------------------------------

VARIANTS = [  # small networks covering both upsamplers, x2/x3/x4 and both scan directions
    dict(type='DVMSR', embed_dim=24, depths=[1, 2]),
    dict(type='DVMSR', embed_dim=24, depths=[2], bidirectional=True, dt_rank=3, d_state=8),
    dict(type='DVMSR', embed_dim=20, depths=[1], upsampler='pixelshuffle', num_feat=8, upscale=3),
    dict(type='DVMSR', embed_dim=20, depths=[1, 1], upsampler='pixelshuffle', num_feat=8, upscale=2, expand=1),
]


class _OpaqueScan(torch.autograd.Function):
    """A selective scan fvcore cannot see into; it takes every input so tracing keeps their producers."""

    @staticmethod
    def forward(ctx, u, *other_inputs):
        return torch.zeros_like(u)


@pytest.mark.parametrize('spec', VARIANTS, ids=lambda s: f'{s.get("upsampler", "direct")}-x{s.get("upscale", 4)}'
                         f'{"-bi" if s.get("bidirectional") else ""}')
def test_analytic_counts_match_fvcore(spec, monkeypatch):
    pytest.importorskip('fvcore', reason='fvcore is the FLOP counter under test (pip install -e ".[flops]")')
    stats = load_model_stats()
    height, width = 6, 10
    groups = stats.dvmsr_flops(spec, height, width)
    # Only the scan hidden: fvcore itself counts conv1d and the x/dt/out projections.
    monkeypatch.setattr(dvmsr_module, 'selective_scan',
                        lambda u, delta, A, B, C, D, z, delta_bias, **kw: _OpaqueScan.apply(u, delta, A, B, C, D, z,
                                                                                          delta_bias))
    net = build_network(dict(spec))
    assert stats.fvcore_flops(net, height, width) == sum(
        v for k, v in groups.items() if k not in ('selective_scan', 'combine'))
    # The NTIRE convention: the whole mixer after in_proj fused, as mamba_ssm runs it.
    fused = stats.fvcore_flops(stats.as_fused_mamba(net), height, width)
    assert fused == sum(groups[k] for k in stats.fvcore_visible_groups(spec))


def test_model_stats_reproduces_the_papers_counts():
    """Paper Table 2/6/9: 20.1680 G FLOPs and 26.7387 M activations for the released student at 256x256,
    23.9429 G for the bidirectional student (Table 6)."""
    pytest.importorskip('fvcore', reason='the NTIRE convention is fvcore\'s count (pip install -e ".[flops]")')
    files = ['options/train/ntire2024/student_x4.yml', 'options/train/ablation/ssm_bidirectional.yml']
    result = subprocess.run([sys.executable, 'scripts/model_stats.py', *files, '--networks', 'network_g'], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith('options/')}
    student, bidirectional = rows[files[0]], rows[files[1]]
    # file, network, type, parameters, FLOPs fvcore [G], FLOPs full [G], activations [M], conv2d
    assert student[1:4] == ['network_g', 'DVMSR', '424,428']
    assert student[4] == '20.1680' and abs(float(student[4]) - 20.17) <= 0.01  # Table 2; Table 9: 20.17
    assert student[6] == '26.7387'  # Table 2
    assert bidirectional[3] == '484,908' and bidirectional[4] == '23.9429'  # Table 6
    assert bidirectional[6] == '26.7387'  # Table 6
    # The full count adds what the fused kernel hides, most of all the scan.
    stats = load_model_stats()
    for row, file in ((student, files[0]), (bidirectional, files[1])):
        spec = yaml.safe_load((REPO / file).read_text())['network_g']
        hidden = sum(v for k, v in stats.dvmsr_flops(spec, 256, 256).items()
                     if k not in stats.fvcore_visible_groups(spec))
        assert float(row[5]) == pytest.approx(float(row[4]) + hidden / 1e9, abs=1e-4)
    assert 'fvcore counted' not in result.stderr  # the measured and the analytic convention agree


@pytest.mark.parametrize('content, message', [('name: x\n', 'no network_g'), ('network_g: [\n', 'not valid YAML'),
                                              ('network_g:\n  type: DVMSR\n  depth: [2]\n', "network_g: cannot build")])
def test_model_stats_names_the_bad_file(tmp_path, content, message):
    bad = tmp_path / 'bad.yml'
    bad.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        load_model_stats().main([str(bad)])
    text = str(exit_info.value.code)
    assert text.startswith(f'{bad}: ') and message in text and '\n' not in text


# --- the evaluation commands of docs/experiments.md --------------------------------------------

def _documented_test_commands():
    text = (REPO / 'docs' / 'experiments.md').read_text(encoding='utf-8').replace('\\\n', ' ')
    return [shlex.split(line) for line in text.splitlines()
            if line.startswith('python dvmsr_arch/test.py -opt options/test/benchmarks.yml --force_yml')]


def test_every_run_has_a_documented_evaluation_command():
    names = {load(relative)['name'] for relative in PAPER_PARAMETERS}
    documented = {arg.split('=', 1)[1][:-len('_benchmarks')] for command in _documented_test_commands()
                  for arg in command if arg.startswith('name=')}
    assert names <= documented


def test_documented_evaluation_commands_build_the_trained_network(monkeypatch):
    """Each command, parsed by BasicSR itself, tests the run's own network with the run's weights."""
    from basicsr.utils.options import parse_options

    runs = {}
    for path in OPTIONS.rglob('*.yml'):
        opt = load(str(path.relative_to(OPTIONS)))
        runs[opt['name']] = opt
    commands = _documented_test_commands()
    assert commands
    for command in commands:
        monkeypatch.setattr(sys, 'argv', ['test.py', *command[2:]])
        opt, _ = parse_options(str(REPO), is_train=False)
        run = runs[opt['name'][:-len('_benchmarks')]]
        assert dict(opt['network_g']) == dict(run['network_g']), opt['name']
        assert opt['path']['pretrain_network_g'] == f'experiments/{run["name"]}/models/net_g_latest.pth'
        assert opt['path']['param_key_g'] == 'params_ema'  # the EMA weights, as BasicSR validates them
