"""DVMSRModel: SRModel's training, and the same training recorded as a CUDA graph (``train.cuda_graph``)."""
import logging
import os
import shutil

import pytest
import torch

import dvmsr_arch  # noqa: F401  (registers the networks and models)
from basicsr.models.sr_model import SRModel
from dvmsr_arch.archs.dvmsr_arch import DVMSR
from dvmsr_arch.models.distill_model import DistillSRModel
from dvmsr_arch.models.dvmsr_model import WARMUP_ITERATIONS, DVMSRModel

SCALE = 4
TINY = {'upscale': SCALE, 'embed_dim': 8, 'depths': [1, 1], 'd_state': 4, 'drop_path_rate': 0.0}
# On the GPU the fused path's own widths (d_state 16), still small.
GPU_NET = {'upscale': SCALE, 'embed_dim': 24, 'depths': [1, 1], 'd_state': 16, 'drop_path_rate': 0.0}
GPU_TEACHER = {'upscale': SCALE, 'embed_dim': 32, 'depths': [1, 1], 'd_state': 16, 'drop_path_rate': 0.0,
               'upsampler': 'pixelshuffle', 'num_feat': 16}


def make_opt(tmp_path, *, model_type='DVMSRModel', net=TINY, cuda_graph=None, ema_decay=0.5,
             num_gpu=0, teacher=None, teacher_precision='fp32'):
    train = {
        'ema_decay': ema_decay,
        'optim_g': {'type': 'Adam', 'lr': 1e-3, 'weight_decay': 0, 'betas': [0.9, 0.99]},
        'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5},
        'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'},
    }
    if cuda_graph is not None:
        train['cuda_graph'] = cuda_graph
    opt = {
        'name': 'unit', 'model_type': model_type, 'scale': SCALE, 'num_gpu': num_gpu, 'is_train': True,
        'dist': False, 'rank': 0, 'world_size': 1, 'network_g': {'type': 'DVMSR', **net},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'models': str(tmp_path / 'models'),
                 'training_states': str(tmp_path / 'training_states')},
        'train': train,
    }
    if teacher is not None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(7)
        torch.save({'params_ema': DVMSR(**teacher).state_dict()}, tmp_path / 'teacher.pth')
        opt.update(network_t={'type': 'DVMSR', **teacher})
        opt['path']['pretrain_network_t'] = str(tmp_path / 'teacher.pth')
        opt['train']['teacher_precision'] = teacher_precision
    return opt


def batches(count, lq_side=8, device='cpu', seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{'lq': torch.rand(2, 3, lq_side, lq_side, generator=g).to(device),
             'gt': torch.rand(2, 3, lq_side * SCALE, lq_side * SCALE, generator=g).to(device)}
            for _ in range(count)]


def build(model_class, opt, seed=0):
    torch.manual_seed(seed)
    return model_class(opt)


def train(model, data, first_iter=1):
    logs = []
    for step, batch in enumerate(data, first_iter):
        model.feed_data(batch)
        model.optimize_parameters(step)
        logs.append(dict(model.log_dict))
    return logs


@pytest.mark.parametrize('cuda_graph', [None, False, True])
def test_trains_as_srmodel_on_a_cpu(tmp_path, cuda_graph, caplog):
    """Without a GPU (and with the graph off) an iteration is SRModel's to the bit; asking for the
    graph on a CPU says so in the log."""
    data = batches(3)
    reference = build(SRModel, make_opt(tmp_path, model_type='SRModel'))
    with caplog.at_level(logging.INFO, logger='basicsr'):
        model = build(DVMSRModel, make_opt(tmp_path, cuda_graph=cuda_graph))
    assert model.training_graph is None
    assert ('no CUDA device' in caplog.text) == bool(cuda_graph)
    assert train(model, data) == train(reference, data)
    for ours, theirs in ((model.net_g, reference.net_g), (model.net_g_ema, reference.net_g_ema)):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name


@pytest.mark.parametrize('value', ['yes', 1, None])
def test_a_cuda_graph_setting_other_than_true_or_false_names_the_key(tmp_path, value):
    opt = make_opt(tmp_path)
    opt['train']['cuda_graph'] = value
    with pytest.raises(ValueError, match=r'train\.cuda_graph: ' + repr(value)):
        build(DVMSRModel, opt)


@pytest.fixture
def fp32_and_fixed_algorithms():
    """True fp32 and cuDNN's deterministic algorithms for the test, then the switches as they were."""
    switches = ((torch.backends.cuda.matmul, 'allow_tf32', False), (torch.backends.cudnn, 'allow_tf32', False),
                (torch.backends.cudnn, 'benchmark', False), (torch.backends.cudnn, 'deterministic', True))
    saved = [getattr(module, name) for module, name, _ in switches]
    for module, name, value in switches:
        setattr(module, name, value)
    yield
    for (module, name, _), value in zip(switches, saved):
        setattr(module, name, value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a CUDA GPU')
@pytest.mark.parametrize('model_class, teacher, teacher_precision',
                         [(DVMSRModel, None, None), (DistillSRModel, GPU_TEACHER, 'fp32'),
                          (DistillSRModel, GPU_TEACHER, 'fp16')], ids=['sr', 'distill', 'distill_fp16_teacher'])
def test_cuda_graph_training_on_gpu_follows_the_eager_steps(tmp_path, model_class, teacher, teacher_precision,
                                                            fp32_and_fixed_algorithms):
    """Graph replays give the eager iterations' weights, EMA weights and losses; they take the
    schedule's learning rate, train a batch of another shape eagerly, and leave the EMA network's
    fused inference on its current weights, not the ones it saw at an earlier validation."""
    steps = WARMUP_ITERATIONS + 4
    data = batches(steps + 2, lq_side=16, device='cuda')
    eager = build(model_class, make_opt(tmp_path / 'e', net=GPU_NET, num_gpu=1, teacher=teacher,
                                        teacher_precision=teacher_precision))
    graphed = build(model_class, make_opt(tmp_path / 'g', net=GPU_NET, num_gpu=1, cuda_graph=True, teacher=teacher,
                                          teacher_precision=teacher_precision))
    assert graphed.training_graph is not None and eager.training_graph is None

    def both(batches_, first_iter):
        return train(eager, batches_, first_iter), train(graphed, batches_, first_iter)

    probe = batches(1, lq_side=12, device='cuda', seed=3)[0]['lq']

    def validate(model):
        model.net_g_ema.eval()
        with torch.no_grad():
            return model.net_g_ema(probe)

    def validate_against_a_fresh_copy():
        fresh = DVMSR(**GPU_NET).cuda().eval()
        fresh.load_state_dict(graphed.net_g_ema.state_dict())
        with torch.no_grad():
            expected = fresh(probe)
        out = validate(graphed)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        return out

    logs = [both(data[:WARMUP_ITERATIONS], 1)]  # eager in both
    logs.append(both(data[WARMUP_ITERATIONS:WARMUP_ITERATIONS + 2], WARMUP_ITERATIONS + 1))  # recorded, replayed
    assert graphed.training_graph.graph is not None
    # A validation between replays: only the replays themselves can tell it the weights moved.
    before = validate_against_a_fresh_copy()
    logs.append(both(data[WARMUP_ITERATIONS + 2:steps], WARMUP_ITERATIONS + 3))
    assert not torch.equal(validate_against_a_fresh_copy(), before)
    for model in (eager, graphed):  # the schedule halves the rate
        for group in model.optimizer_g.param_groups:
            group['lr'] *= 0.5
    logs.append(both(data[steps:], steps + 1))
    logs.append(both(batches(1, lq_side=12, device='cuda', seed=5), steps + 3))  # another shape: an eager step
    logs.append(both(data[:1], steps + 4))  # and back on the graph
    for eager_logs, graphed_logs in logs:
        for a, b in zip(eager_logs, graphed_logs):
            assert a.keys() == b.keys()
            for key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for name in ('net_g', 'net_g_ema'):
        ours = getattr(graphed, name).state_dict()
        for key, value in getattr(eager, name).state_dict().items():
            torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-6, msg=f'{name}.{key}')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA graphs need a CUDA GPU')
def test_train_py_with_a_cuda_graph_on_gpu_validates_its_current_weights_and_resumes(tmp_path):
    """``dvmsr_arch/train.py`` with ``train.cuda_graph`` on a GPU: the graph is recorded, the logged
    validation PSNR is that of the saved EMA weights (which test.py measures afresh), and a resumed
    run records its graph again from the saved optimizer state."""
    import re
    import subprocess
    import sys

    import yaml

    import tiny_training as tiny

    name = tiny.unique_name('cuda_graph_gpu')
    train_set = tiny.write_pairs(tmp_path / 'train', count=6, gt_side=64)
    val_set = tiny.write_pairs(tmp_path / 'val', count=2, gt_side=48, seed=1)
    opt = tiny.training_options(name, train_set['gt'], train_set['lq'], total_iter=8, save_freq=4, val=val_set,
                                io_backend='disk', model='DVMSRModel', milestones=(6,))
    opt.update(num_gpu=1, network_g={'type': 'DVMSR', **GPU_NET})
    opt['train']['optim_g']['lr'] = 2e-3  # weights that move between the two validations
    opt['train']['cuda_graph'] = True
    train_yml = tiny.write_options(tmp_path / 'train.yml', opt)
    env = dict(tiny.cli_env(), CUDA_VISIBLE_DEVICES=os.environ.get('CUDA_VISIBLE_DEVICES', '0'))

    def run(script, yml, *extra):
        result = subprocess.run([sys.executable, str(tiny.REPO / 'dvmsr_arch' / script), '-opt', str(yml), *extra],
                                cwd=tiny.REPO, env=env, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    try:
        run('train.py', train_yml)
        experiment = tiny.experiment_dir(name)
        log = '\n'.join(p.read_text() for p in sorted(experiment.glob('train_*.log')))
        assert log.count('recorded as one CUDA graph') == 1
        # Validations at 4 and 8, and BasicSR's final one, again on the weights of 8.
        logged = [float(v) for v in re.findall(r'# psnr: ([0-9.]+)', log)]
        assert len(logged) == 3 and logged[0] != logged[1]
        test_opt = {'name': f'{name}_test', 'model_type': 'SRModel', 'scale': SCALE, 'num_gpu': 1,
                    'datasets': {'test_1': opt['datasets']['val']}, 'network_g': opt['network_g'],
                    'path': {'pretrain_network_g': str(experiment / 'models' / 'net_g_8.pth'),
                             'param_key_g': 'params_ema', 'strict_load_g': True},
                    'val': {'save_img': False, 'suffix': None, 'metrics': opt['val']['metrics']}}
        out = run('test.py', tiny.write_options(tmp_path / 'test.yml', test_opt))
        assert float(re.search(r'# psnr: ([0-9.]+)', out).group(1)) == pytest.approx(logged[1], abs=1e-4)

        run('train.py', train_yml, '--auto_resume', '--force_yml', 'train:total_iter=12')
        log = '\n'.join(p.read_text() for p in sorted(experiment.glob('train_*.log')))
        assert 'Resuming training from epoch' in log and log.count('recorded as one CUDA graph') == 2
        assert re.search(r'iter:\s+12,', log) and (experiment / 'training_states' / '12.state').is_file()
    finally:
        tiny.remove_experiment(name)
        for folder in ('results', 'tb_logger'):
            for path in (tiny.REPO / folder).glob(f'{name}*'):
                shutil.rmtree(path, ignore_errors=True)
