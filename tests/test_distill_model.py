"""DistillSRModel's loss, teacher handling, adapter and EMA, checked against hand computations."""
import copy
import types

import pytest
import torch
import torch.nn.functional as F

import dvmsr_arch  # noqa: F401  (registers the networks and models)
from dvmsr_arch.archs.dvmsr_arch import DVMSR, derived_tensor
from dvmsr_arch.models.distill_model import DistillSRModel

SCALE = 4
STUDENT = {'upscale': SCALE, 'embed_dim': 8, 'depths': [1, 1], 'd_state': 4, 'drop_path_rate': 0.0}
TEACHER = {'upscale': SCALE, 'embed_dim': 12, 'depths': [1, 1, 1], 'd_state': 4, 'drop_path_rate': 0.0,
           'upsampler': 'pixelshuffle', 'num_feat': 8}
PIXEL_WEIGHT, DISTILL_WEIGHT = 0.7, 2.5


@pytest.fixture(autouse=True)
def one_thread():
    # Tensors this small gain nothing from a second thread, and lose much when the cores are busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_teacher(path, layout='params_ema', net_opt=TEACHER, seed=1):
    torch.manual_seed(seed)
    state = DVMSR(**net_opt).state_dict()
    torch.save(state if layout == 'plain' else {layout: state}, path)
    return path


def make_opt(tmp_path, teacher_path, *, position='output', layers=None, teacher_net=TEACHER, ema_decay=0.0,
             param_key_t='params_ema', distill_type='L1Loss'):
    train = {
        'ema_decay': ema_decay,
        'optim_g': {'type': 'Adam', 'lr': 1e-3, 'weight_decay': 0, 'betas': [0.9, 0.99]},
        'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5},
        'pixel_opt': {'type': 'L1Loss', 'loss_weight': PIXEL_WEIGHT, 'reduction': 'mean'},
        'distill_opt': {'type': distill_type, 'loss_weight': DISTILL_WEIGHT, 'reduction': 'mean'},
        'distill_position': position,
    }
    if layers is not None:
        train['distill_layers'] = layers
    return {
        'name': 'unit', 'model_type': 'DistillSRModel', 'scale': SCALE, 'num_gpu': 0, 'is_train': True,
        'dist': False, 'rank': 0, 'world_size': 1,
        'network_g': {'type': 'DVMSR', **STUDENT}, 'network_t': {'type': 'DVMSR', **teacher_net},
        'path': {'pretrain_network_g': None, 'pretrain_network_t': str(teacher_path), 'param_key_t': param_key_t,
                 'strict_load_t': True, 'models': str(tmp_path / 'models'),
                 'training_states': str(tmp_path / 'training_states')},
        'train': train,
    }


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {'lq': torch.rand(2, 3, 8, 8, generator=g), 'gt': torch.rand(2, 3, 32, 32, generator=g)}


def by_hand(model, data, position, layers):
    """The loss terms of paper Eq. 5, computed from copies of the networks before the step."""
    student, teacher = copy.deepcopy(model.net_g), copy.deepcopy(model.net_t)
    adapter = copy.deepcopy(model.adapter)
    with torch.no_grad():
        s_out, s_feat = student.forward_with_features(data['lq'])
        t_out, t_feat = teacher.forward_with_features(data['lq'])
        if position == 'output':
            s, t = s_out, t_out
        elif position == 'body':
            s, t = s_feat['body'], t_feat['body']
        else:
            s, t = s_feat['rssb'][layers[0]], t_feat['rssb'][layers[1]]
        if adapter is not None:
            s = adapter(s)
        return (PIXEL_WEIGHT * F.l1_loss(s_out, data['gt']).item(), DISTILL_WEIGHT * F.l1_loss(s, t).item())


@pytest.mark.parametrize('position, layers', [('output', None), ('body', None), ('mid', [1, 0]), ('mid', [0, 2])])
def test_loss_is_the_weighted_sum_and_the_teacher_stays_frozen(tmp_path, position, layers):
    torch.manual_seed(0)
    model = DistillSRModel(make_opt(tmp_path, save_teacher(tmp_path / 't.pth'), position=position, layers=layers))
    data = batch()
    expected_pix, expected_distill = by_hand(model, data, position, layers)
    teacher_before = copy.deepcopy(model.net_t.state_dict())
    student_before = copy.deepcopy(model.net_g.state_dict())

    for it in (1, 2):
        model.feed_data(data)
        model.optimize_parameters(it)
        if it == 1:
            assert model.log_dict['l_pix'] == pytest.approx(expected_pix, rel=1e-5)
            assert model.log_dict['l_distill'] == pytest.approx(expected_distill, rel=1e-5)
            assert set(model.log_dict) == {'l_pix', 'l_distill'}

    # The teacher: untouched, without gradients, in eval mode, and not among the optimised tensors.
    for key, value in model.net_t.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert all(p.grad is None and not p.requires_grad for p in model.net_t.parameters())
    assert not model.net_t.training
    optimised = {id(p) for group in model.optimizer_g.param_groups for p in group['params']}
    assert not optimised & {id(p) for p in model.net_t.parameters()}
    # The student did learn.
    assert any(not torch.equal(v, student_before[k]) for k, v in model.net_g.state_dict().items())

    # Widths 8 -> 12 need the 1x1 adapter for features, not for images; it trains with the student.
    if position == 'output':
        assert model.adapter is None
    else:
        assert model.adapter.weight.shape == (12, 8, 1, 1)
        assert {id(p) for p in model.adapter.parameters()} <= optimised


@pytest.mark.parametrize('position', ['output', 'body'])
def test_teacher_precision_runs_the_teacher_under_autocast(tmp_path, position):
    """train.teacher_precision bf16: the distillation term is the one of a bf16-autocast teacher (the
    student and the pixel term as in fp32), and not the fp32 teacher's."""
    torch.manual_seed(0)
    opt = make_opt(tmp_path, save_teacher(tmp_path / 't.pth'), position=position)
    opt['train']['teacher_precision'] = 'bf16'
    model = DistillSRModel(opt)
    data = batch()
    student, teacher, adapter = (copy.deepcopy(m) for m in (model.net_g, model.net_t, model.adapter))
    with torch.no_grad():
        s_out, s_feat = student.forward_with_features(data['lq'])
        with torch.autocast('cpu', dtype=torch.bfloat16):
            t_out, t_feat = teacher.forward_with_features(data['lq'])
        t_fp32 = teacher.forward_with_features(data['lq'])
        s, t, t32 = ((s_out, t_out, t_fp32[0]) if position == 'output'
                     else (adapter(s_feat['body']), t_feat['body'].float(), t_fp32[1]['body']))
    model.feed_data(data)
    model.optimize_parameters(1)
    assert model.log_dict['l_pix'] == pytest.approx(PIXEL_WEIGHT * F.l1_loss(s_out, data['gt']).item(), rel=1e-5)
    assert model.log_dict['l_distill'] == pytest.approx(DISTILL_WEIGHT * F.l1_loss(s, t).item(), rel=1e-5)
    assert model.log_dict['l_distill'] != pytest.approx(DISTILL_WEIGHT * F.l1_loss(s, t32).item(), rel=1e-5)


def test_teacher_precision_that_is_not_one_names_the_key(tmp_path):
    opt = make_opt(tmp_path, save_teacher(tmp_path / 't.pth'))
    opt['train']['teacher_precision'] = 'half'
    with pytest.raises(ValueError, match=r"train\.teacher_precision: 'half' is not one of"):
        DistillSRModel(opt)


def test_equal_widths_need_no_adapter_and_l2_is_mse(tmp_path):
    same_width = dict(TEACHER, embed_dim=8)
    teacher = save_teacher(tmp_path / 't.pth', net_opt=same_width)
    model = DistillSRModel(make_opt(tmp_path, teacher, position='body', teacher_net=same_width, distill_type='MSELoss'))
    assert model.adapter is None
    data = batch(1)
    with torch.no_grad():
        expected = DISTILL_WEIGHT * F.mse_loss(model.net_g.forward_with_features(data['lq'])[1]['body'],
                                               model.net_t.forward_with_features(data['lq'])[1]['body']).item()
    model.feed_data(data)
    model.optimize_parameters(1)
    assert model.log_dict['l_distill'] == pytest.approx(expected, rel=1e-5)


def test_ema_follows_the_student(tmp_path):
    torch.manual_seed(0)
    model = DistillSRModel(make_opt(tmp_path, save_teacher(tmp_path / 't.pth'), ema_decay=0.5))
    ema_before = {k: v.clone() for k, v in model.net_g_ema.named_parameters()}
    assert all(torch.equal(v, dict(model.net_g.named_parameters())[k]) for k, v in ema_before.items())
    model.feed_data(batch())
    model.optimize_parameters(1)
    student = dict(model.net_g.named_parameters())
    changed = 0
    for key, value in model.net_g_ema.named_parameters():
        torch.testing.assert_close(value, 0.5 * ema_before[key] + 0.5 * student[key])
        changed += not torch.equal(value, ema_before[key])
    assert changed > 0


def test_ema_update_renews_what_inference_derived_from_the_ema_weights(tmp_path):
    """The fused inference path keeps tensors derived from a parameter until its version counter
    moves; an EMA update must move it, or the EMA network's validation on a GPU keeps old weights."""
    torch.manual_seed(0)
    model = DistillSRModel(make_opt(tmp_path, save_teacher(tmp_path / 't.pth'), ema_decay=0.5))
    weights = [p for p in model.net_g_ema.parameters() if p.dim() > 1]
    before = [derived_tensor(w, 'test_copy', w.detach().clone) for w in weights]
    model.feed_data(batch())
    model.optimize_parameters(1)
    after = [derived_tensor(w, 'test_copy', w.detach().clone) for w in weights]
    assert all(torch.equal(derived, w) for derived, w in zip(after, weights))
    assert any(not torch.equal(old, new) for old, new in zip(before, after))


@pytest.mark.parametrize('decay', [0.999, 0.5])
def test_ema_update_is_basicsrs_to_the_bit(tmp_path, decay):
    """The multi-tensor EMA update (dvmsr_arch.compat) gives exactly the numbers of basicsr's
    per-parameter loop, starting from an EMA that the steps have moved away from the student."""
    from dvmsr_arch.compat import _model_ema
    torch.manual_seed(0)
    model = DistillSRModel(make_opt(tmp_path, save_teacher(tmp_path / 't.pth'), ema_decay=decay))
    for step in range(2):
        model.feed_data(batch(step))
        model.optimize_parameters(step + 1)  # its own EMA update: the patched one
    loop = types.SimpleNamespace(net_g=model.net_g, net_g_ema=copy.deepcopy(model.net_g_ema),
                                 get_bare_model=model.get_bare_model)
    model.model_ema(decay)
    _model_ema(loop, decay)
    pairs = list(zip(model.net_g_ema.parameters(), loop.net_g_ema.parameters()))
    assert len(pairs) == len(list(model.net_g.parameters()))
    assert all(torch.equal(patched, looped) for patched, looped in pairs)
    assert not all(torch.equal(ema, student) for ema, student in zip(model.net_g_ema.parameters(),
                                                                      model.net_g.parameters()))


@pytest.mark.parametrize('layout, param_key', [('params_ema', 'params_ema'), ('params', 'params_ema'),
                                               ('plain', 'params_ema'), ('plain', None)])
def test_teacher_checkpoint_layouts(tmp_path, layout, param_key):
    path = save_teacher(tmp_path / 't.pth', layout=layout, seed=5)
    model = DistillSRModel(make_opt(tmp_path, path, param_key_t=param_key))
    torch.manual_seed(5)
    reference = DVMSR(**TEACHER).state_dict()
    for key, value in model.net_t.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_teacher_errors_name_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match='path.pretrain_network_t'):
        DistillSRModel(make_opt(tmp_path, tmp_path / 'missing.pth'))
    wrong = save_teacher(tmp_path / 'wrong.pth', net_opt=dict(TEACHER, embed_dim=16))
    with pytest.raises(ValueError, match=r'path.pretrain_network_t: .* does not match network_t'):
        DistillSRModel(make_opt(tmp_path, wrong))
    teacher = save_teacher(tmp_path / 't.pth')
    with pytest.raises(ValueError, match='train.distill_position'):
        DistillSRModel(make_opt(tmp_path, teacher, position='head'))
    with pytest.raises(ValueError, match='student block 2 does not exist'):
        DistillSRModel(make_opt(tmp_path, teacher, position='mid', layers=[2, 0]))
    with pytest.raises(ValueError, match='train.distill_layers'):
        DistillSRModel(make_opt(tmp_path, teacher, position='mid'))


def test_saves_the_student_and_adapter_never_the_teacher(tmp_path):
    (tmp_path / 'models').mkdir()
    (tmp_path / 'training_states').mkdir()
    model = DistillSRModel(make_opt(tmp_path, save_teacher(tmp_path / 't.pth'), position='body', ema_decay=0.9))
    model.feed_data(batch())
    model.optimize_parameters(1)
    model.save(epoch=0, current_iter=1)
    assert sorted(p.name for p in (tmp_path / 'models').iterdir()) == ['net_adapter_1.pth', 'net_g_1.pth']
    student = torch.load(tmp_path / 'models' / 'net_g_1.pth')
    assert set(student) == {'params', 'params_ema'}
    assert set(student['params']) == set(DVMSR(**STUDENT).state_dict())  # no adapter or teacher keys

    # A resumed model gets the adapter and the optimizer state (both param groups) back.
    state = torch.load(tmp_path / 'training_states' / '1.state', weights_only=False)
    resumed = DistillSRModel(make_opt(tmp_path, tmp_path / 't.pth', position='body', ema_decay=0.9))
    resumed.resume_training(state)
    torch.testing.assert_close(resumed.adapter.weight, model.adapter.weight, rtol=0, atol=0)
    assert len(resumed.optimizer_g.param_groups) == 2
    assert resumed.optimizer_g.state_dict()['state'].keys() == model.optimizer_g.state_dict()['state'].keys()


def test_testing_needs_no_teacher(tmp_path):
    opt = make_opt(tmp_path, tmp_path / 'missing.pth')
    opt['is_train'] = False
    model = DistillSRModel(opt)
    assert not hasattr(model, 'net_t')
    model.feed_data(batch())
    model.test()
    assert model.output.shape == (2, 3, 32, 32)
