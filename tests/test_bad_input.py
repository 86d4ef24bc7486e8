"""Bad input ends a run early with one line naming the file or key, and loses nothing on disk.

Most cases call the checks in-process on options parsed exactly as ``dvmsr_arch/train.py`` parses
them (fast); a few run the real CLI to see the exit status, the single stderr line, the absence of a
traceback, and what happens inside data-loader workers and the training loop.
"""
import copy
import logging
import sys
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
import torch

import tiny_training as tiny
from dvmsr_arch import checks

REPO = tiny.REPO


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('bad_input')
    lmdbs = tiny.write_lmdbs(root / 'lmdb', count=4, gt_side=48)
    folders = tiny.write_pairs(root / 'folders', count=4, gt_side=48)
    return {'root': root, 'lmdb': lmdbs, 'folder': folders}


@pytest.fixture
def experiment():
    name = tiny.unique_name('badinput')
    yield name
    tiny.remove_experiment(name)


def copy_tree(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def problem(tmp_path, monkeypatch, opt: dict, *args: str, is_train: bool = True) -> str:
    """The one-line InputError the checks raise for ``opt``, run as train.py would run them."""
    opt_path = tiny.write_options(tmp_path / 'opt.yml', opt)
    monkeypatch.setattr(sys, 'argv', ['train.py', '-opt', str(opt_path), *args])
    opt = checks.preview_options(str(REPO), is_train=is_train)
    with pytest.raises(checks.InputError) as caught:
        checks.check_options(opt)
    message = str(caught.value)
    assert '\n' not in message
    return message


def options_for_test_run(experiment: str, pairs: dict, path: dict) -> dict:
    """A test.py option file: one paired folder, the tiny network, ``path`` as given."""
    return {'name': experiment, 'model_type': 'SRModel', 'scale': tiny.SCALE, 'num_gpu': 0,
            'datasets': {'test_1': {'name': 'pairs', 'type': 'PairedImageDataset', 'io_backend': {'type': 'disk'},
                                    'dataroot_gt': str(pairs['gt']), 'dataroot_lq': str(pairs['lq'])}},
            'network_g': dict(tiny.TINY_NET), 'path': path,
            'val': {'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4}}}}


def test_good_options_pass(tmp_path, monkeypatch, data, experiment):
    opt_path = tiny.write_options(tmp_path / 'opt.yml', tiny.training_options(experiment, **data['lmdb']))
    monkeypatch.setattr(sys, 'argv', ['train.py', '-opt', str(opt_path)])
    checks.check_options(checks.preview_options(str(REPO), is_train=True))


def test_missing_dataroot(tmp_path, monkeypatch, data, experiment):
    missing = tmp_path / 'nowhere' / 'train_GT.lmdb'
    message = problem(tmp_path, monkeypatch, tiny.training_options(experiment, missing, data['lmdb']['lq']))
    assert message.startswith('datasets.train.dataroot_gt: ') and str(missing) in message
    assert 'does not exist' in message


def test_folder_that_is_not_an_lmdb(tmp_path, monkeypatch, data, experiment):
    not_lmdb = tmp_path / 'plain.lmdb'
    not_lmdb.mkdir()
    message = problem(tmp_path, monkeypatch, tiny.training_options(experiment, data['lmdb']['gt'], not_lmdb))
    assert message.startswith('datasets.train.dataroot_lq: ') and 'data.mdb is missing' in message


def test_meta_info_names_keys_the_lmdb_lacks(tmp_path, monkeypatch, data, experiment):
    gt = copy_tree(data['lmdb']['gt'], tmp_path / 'gt.lmdb')
    with open(gt / 'meta_info.txt', 'a') as meta:
        meta.write('ghost_1.png (48,48,3) 1\nghost_2.png (48,48,3) 1\n')
    message = problem(tmp_path, monkeypatch, tiny.training_options(experiment, gt, data['lmdb']['lq']))
    assert message.startswith('datasets.train.dataroot_gt: ')
    assert str(gt / 'meta_info.txt') in message and '2 keys' in message
    assert 'ghost_1' in message and 'ghost_2' in message


def test_gt_and_lq_with_different_names(tmp_path, monkeypatch, data, experiment):
    lq = copy_tree(data['folder']['lq'], tmp_path / 'LQ')
    (lq / 'img_002.png').rename(lq / 'img_002_x4.png')
    opt = tiny.training_options(experiment, data['folder']['gt'], lq, io_backend='disk')
    message = problem(tmp_path, monkeypatch, opt)
    assert message.startswith('datasets.train: GT and LQ hold different names')
    assert 'img_002.png' in message and 'img_002_x4.png' in message


def test_file_that_is_not_an_image_in_a_folder(tmp_path, monkeypatch, data, experiment):
    # BasicSR pairs every file of the folders: without the check, notes.txt failed in a data-loader
    # worker at the first validation, without its name. Hidden files are skipped, as BasicSR does.
    gt = copy_tree(data['folder']['gt'], tmp_path / 'GT')
    (gt / 'notes.txt').write_text('where these images come from')
    (gt / '.DS_Store').write_bytes(b'\0')
    weights = tiny.save_tiny_teacher(tmp_path / 'net.pth')
    opt = options_for_test_run(experiment, {'gt': gt, 'lq': data['folder']['lq']}, {'pretrain_network_g': str(weights)})
    assert problem(tmp_path, monkeypatch, opt, is_train=False) == (
        f'datasets.test_1.dataroot_gt: {gt} holds files that are not images (1 file: notes.txt); BasicSR reads '
        'every file of the folder, so move them out')
    (gt / 'notes.txt').unlink()
    opt_path = tiny.write_options(tmp_path / 'opt.yml', opt)
    monkeypatch.setattr(sys, 'argv', ['test.py', '-opt', str(opt_path)])
    checks.check_options(checks.preview_options(str(REPO), is_train=False))


def test_training_set_smaller_than_one_batch(tmp_path, monkeypatch, data, experiment):
    # An epoch would be empty (the loader drops a partial batch): the run would count its epochs
    # through without a step.
    opt = tiny.training_options(experiment, **data['lmdb'], batch=5)
    assert problem(tmp_path, monkeypatch, opt) == (
        'datasets.train: 4 pairs give no whole batch of batch_size_per_gpu 5; lower it or raise dataset_enlarge_ratio')
    opt['datasets']['train']['dataset_enlarge_ratio'] = 2
    opt_path = tiny.write_options(tmp_path / 'opt.yml', opt)
    monkeypatch.setattr(sys, 'argv', ['train.py', '-opt', str(opt_path)])
    checks.check_options(checks.preview_options(str(REPO), is_train=True))


def test_size_ratio_other_than_scale(tmp_path, monkeypatch, data, experiment):
    lq = copy_tree(data['folder']['lq'], tmp_path / 'LQ')
    cv2.imwrite(str(lq / 'img_001.png'), np.zeros((16, 16, 3), np.uint8))  # x3, not x4, of 48
    opt = tiny.training_options(experiment, data['folder']['gt'], lq, io_backend='disk')
    message = problem(tmp_path, monkeypatch, opt)
    assert 'size ratio other than scale 4' in message and 'img_001.png GT 48x48 vs LQ 16x16' in message


def test_image_smaller_than_gt_size(tmp_path, monkeypatch, data, experiment):
    message = problem(tmp_path, monkeypatch, tiny.training_options(experiment, **data['lmdb'], gt_size=64))
    assert message.startswith('datasets.train: 4 GT images smaller than gt_size 64')
    assert 'img_000 (48x48)' in message


def test_unreadable_image_header_error_or_skip(tmp_path, monkeypatch, data, experiment):
    gt = copy_tree(data['folder']['gt'], tmp_path / 'GT')
    (gt / 'img_003.png').write_bytes(b'not an image at all')
    opt = tiny.training_options(experiment, gt, data['folder']['lq'], io_backend='disk')
    message = problem(tmp_path, monkeypatch, opt)
    assert 'img_003.png' in message and 'cannot be read' in message and 'on_corrupt: skip' in message

    opt['datasets']['train']['on_corrupt'] = 'skip'
    monkeypatch.setattr(sys, 'argv', ['train.py', '-opt', str(tiny.write_options(tmp_path / 'opt.yml', opt))])
    checks.check_options(checks.preview_options(str(REPO), is_train=True))  # a warning, not an error

    opt['datasets']['train']['on_corrupt'] = 'ignore'
    assert problem(tmp_path, monkeypatch, opt).startswith("datasets.train.on_corrupt: 'ignore'")


def test_meta_info_size_disagrees_with_stored_image(tmp_path, monkeypatch, data, experiment):
    gt = copy_tree(data['lmdb']['gt'], tmp_path / 'gt.lmdb')
    meta = (gt / 'meta_info.txt').read_text().replace('img_001.png (48,48,3)', 'img_001.png (96,96,3)')
    (gt / 'meta_info.txt').write_text(meta)
    message = problem(tmp_path, monkeypatch, tiny.training_options(experiment, gt, data['lmdb']['lq']))
    assert 'img_001' in message and 'meta_info.txt says 96x96 but the stored image is 48x48' in message


def test_network_key_the_architecture_does_not_take(tmp_path, monkeypatch, data, experiment):
    opt = tiny.training_options(experiment, **data['lmdb'])
    opt['network_g']['window_size'] = 8
    message = problem(tmp_path, monkeypatch, opt)
    assert message.startswith('network_g.window_size: DVMSR takes no such key (it takes: upscale, embed_dim')


def test_unknown_scan_backend(tmp_path, monkeypatch, data, experiment):
    opt = tiny.training_options(experiment, **data['lmdb'])
    opt['network_g']['scan_backend'] = 'cuda_magic'
    message = problem(tmp_path, monkeypatch, opt)
    assert message.startswith('network_g: ') and "'cuda_magic' is not a selective-scan backend" in message


def test_scan_backend_that_cannot_run_on_the_device(tmp_path, monkeypatch, data, experiment):
    opt = tiny.training_options(experiment, **data['lmdb'])
    opt['network_g']['scan_backend'] = 'mamba_ssm'  # CUDA only; this run is on the CPU (num_gpu: 0)
    message = problem(tmp_path, monkeypatch, opt)
    assert message.startswith('network_g.scan_backend: ') and 'cannot run here' in message


def test_unknown_scan_backend_in_the_environment(tmp_path, monkeypatch, data, experiment):
    monkeypatch.setenv('DVMSR_SCAN_BACKEND', 'bogus')
    message = problem(tmp_path, monkeypatch, tiny.training_options(experiment, **data['lmdb']))
    assert message.startswith("network_g.scan_backend: DVMSR_SCAN_BACKEND='bogus' is not a selective-scan backend")


def test_teacher_checkpoint_that_does_not_match(tmp_path, monkeypatch, data, experiment):
    wider = dict(tiny.TINY_NET, embed_dim=12)
    teacher = tiny.save_tiny_teacher(tmp_path / 'teacher.pth', wider)
    opt = tiny.training_options(experiment, **data['lmdb'], teacher=teacher)  # network_t: 8 channels
    message = problem(tmp_path, monkeypatch, opt)
    assert message.startswith(f'path.pretrain_network_t: {teacher} does not match network_t (')
    assert 'shape mismatches: ' in message and 'missing' not in message and 'unexpected' not in message
    assert 'conv_after_body.weight: checkpoint (12, 12, 3, 3) vs network (8, 8, 3, 3)' in message

    deeper = dict(tiny.TINY_NET, depths=[1, 1])
    teacher = tiny.save_tiny_teacher(tmp_path / 'teacher.pth', deeper)
    message = problem(tmp_path, monkeypatch, opt)
    assert 'unexpected keys: layers.1.' in message and 'missing' not in message

    torch.save({'params_ema': {}}, teacher)
    opt['path']['param_key_t'] = 'params_ema'
    message = problem(tmp_path, monkeypatch, opt)
    assert 'missing keys: ' in message


def test_teacher_checkpoint_that_is_truncated(tmp_path, monkeypatch, data, experiment):
    teacher = tiny.save_tiny_teacher(tmp_path / 'teacher.pth')
    teacher.write_bytes(teacher.read_bytes()[:200])
    message = problem(tmp_path, monkeypatch, tiny.training_options(experiment, **data['lmdb'], teacher=teacher))
    assert message.startswith(f'path.pretrain_network_t: {teacher} cannot be loaded')


def test_checkpoint_without_the_param_key_names_the_key_to_set(tmp_path, monkeypatch, data, experiment):
    teacher = tmp_path / 'teacher.pth'
    torch.save({'weights': {'conv_first.weight': torch.zeros(1)}}, teacher)
    opt = tiny.training_options(experiment, **data['lmdb'], teacher=teacher)
    opt['path']['param_key_t'] = 'params_ema'
    message = problem(tmp_path, monkeypatch, opt)
    assert message.startswith(f"path.pretrain_network_t: {teacher} has no 'params_ema' or 'params' entry "
                              '(its top-level keys: weights); set path.param_key_t to the right entry')


def test_test_run_without_weights_or_with_a_misspelt_path_key(tmp_path, monkeypatch, data, experiment):
    # BasicSR skips keys it does not know: a test run would score a network of random weights.
    weights = tiny.save_tiny_teacher(tmp_path / 'net.pth')
    opt = options_for_test_run(experiment, data['folder'], {'pretrain_network_gg': str(weights)})
    assert problem(tmp_path, monkeypatch, opt, is_train=False) == (
        'path.pretrain_network_gg: the file has no network_gg (its keys of this kind: pretrain_network_g)')
    opt['path'] = {'pretrain_network_g': str(weights), 'strict_load_G': True}
    assert problem(tmp_path, monkeypatch, opt, is_train=False) == (
        'path.strict_load_G: the file has no network_G (its keys of this kind: strict_load_g)')
    opt['path'] = {}
    assert problem(tmp_path, monkeypatch, opt, is_train=False).endswith(
        'opt.yml: path.pretrain_network_g is missing; a test run needs the weights to evaluate')
    # A training run may start from random weights; its misspelt keys are refused all the same.
    opt = tiny.training_options(experiment, **data['lmdb'])
    opt['path']['param_key_gg'] = 'params'
    assert problem(tmp_path, monkeypatch, opt).startswith('path.param_key_gg: the file has no network_gg')


def test_force_yml_entry_without_one_equals_sign(tmp_path, monkeypatch, data, experiment):
    opt_path = tiny.write_options(tmp_path / 'opt.yml', tiny.training_options(experiment, **data['lmdb']))
    monkeypatch.setattr(sys, 'argv', ['train.py', '-opt', str(opt_path), '--force_yml', 'train:ema_decay=0.9',
                                      'path:param_key_g', '--auto_resume'])
    with pytest.raises(checks.InputError) as caught:
        checks.preview_options(str(REPO), is_train=True)
    assert str(caught.value) == ('--force_yml path:param_key_g: write one key path and one value, as '
                                 'train:ema_decay=0.999')


def test_keys_basicsr_would_miss_only_later(tmp_path, monkeypatch, data, experiment):
    # Each of these failed with a traceback: after the networks were built (no loss), at the first
    # validation (no val_freq), at the first image scored (a metric without crop_border).
    opt = tiny.training_options(experiment, **data['lmdb'], val=data['folder'])
    opt['train']['pixel_optt'] = opt['train'].pop('pixel_opt')
    assert problem(tmp_path, monkeypatch, opt).endswith(
        'opt.yml: train has neither pixel_opt nor perceptual_opt; set the loss (paper Eq. 5: pixel_opt, L1Loss)')
    opt['train']['pixel_opt'] = opt['train'].pop('pixel_optt')
    opt['val']['val_frq'] = opt['val'].pop('val_freq')
    assert problem(tmp_path, monkeypatch, opt).endswith('opt.yml: the key val.val_freq is missing')
    opt['val']['val_freq'] = opt['val'].pop('val_frq')
    opt['val']['metrics']['psnr']['crop_boder'] = opt['val']['metrics']['psnr'].pop('crop_border')
    assert problem(tmp_path, monkeypatch, opt) == 'val.metrics.psnr.crop_border is missing (calculate_psnr needs it)'
    opt['val']['metrics']['psnr'] = {'type': 'calculate_psnrr', 'crop_border': 4}
    assert problem(tmp_path, monkeypatch, opt) == (
        "val.metrics.psnr.type: no metric named 'calculate_psnrr' is registered")


def test_force_yml_number_written_as_string(tmp_path, monkeypatch, data, experiment):
    message = problem(tmp_path, monkeypatch, tiny.training_options(experiment, **data['lmdb']),
                      '--force_yml', 'train:optim_g:lr=1e-4')
    assert message.startswith("train.optim_g.lr: '1e-4' is not a number")


@pytest.mark.parametrize('value', ['yes', 1])
def test_tf32_that_is_not_a_boolean(tmp_path, monkeypatch, data, experiment, value):
    opt = dict(tiny.training_options(experiment, **data['lmdb']), tf32=value)
    assert problem(tmp_path, monkeypatch, opt).endswith(f'opt.yml: tf32 must be true or false, not {value!r}')


@pytest.mark.parametrize('value', ['yes', 1])
def test_cuda_graph_that_is_not_a_boolean(tmp_path, monkeypatch, data, experiment, value):
    opt = tiny.training_options(experiment, model='DVMSRModel', **data['lmdb'])
    opt['train']['cuda_graph'] = value
    assert problem(tmp_path, monkeypatch, opt).endswith(
        f'opt.yml: train.cuda_graph must be true or false, not {value!r}')


def test_cuda_graph_for_a_model_that_ignores_it(tmp_path, monkeypatch, data, experiment):
    opt = tiny.training_options(experiment, **data['lmdb'])  # basicsr's SRModel
    opt['train']['cuda_graph'] = True
    assert problem(tmp_path, monkeypatch, opt).endswith(
        'opt.yml: train.cuda_graph needs model_type DVMSRModel (SRModel with the graph) or DistillSRModel, not SRModel')


def test_teacher_precision_that_is_not_one_or_without_a_teacher(tmp_path, monkeypatch, data, experiment):
    opt = tiny.training_options(experiment, **data['lmdb'])
    opt['train']['teacher_precision'] = 'fp16'
    assert problem(tmp_path, monkeypatch, opt).endswith(
        'opt.yml: train.teacher_precision is set, but there is no teacher (network_t)')
    opt['train']['teacher_precision'] = 'half'
    assert problem(tmp_path, monkeypatch, opt).endswith(
        "opt.yml: train.teacher_precision must be one of fp32, fp16, bf16, not 'half'")


@pytest.mark.parametrize('value', [True, False, None])
def test_tf32_sets_both_switches_or_leaves_them(value, torch_tf32_defaults):
    checks.apply_tf32({} if value is None else {'tf32': value})
    switches = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    assert switches == ((False, True) if value is None else (value, value))


def test_one_line_keeps_the_worker_message_only():
    worker_style = checks.InputError('Caught InputError in DataLoader worker process 0.\nOriginal Traceback (most '
                                     'recent call last):\n  File "x.py", line 1, in f\n'
                                     'dvmsr_arch.checks.InputError: datasets.train: GT image broken')
    assert checks.one_line(worker_style) == 'datasets.train: GT image broken'


# --- through the real command line --------------------------------------------------------------


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_cli_bad_input_exits_before_touching_the_experiment(tmp_path, data, experiment):
    # An earlier run's folder must survive a run that stops on bad input (BasicSR would otherwise
    # archive it under a new name when it starts a fresh run).
    earlier = tiny.experiment_dir(experiment)
    earlier.mkdir(parents=True)
    (earlier / 'precious.txt').write_text('kept')
    missing = tmp_path / 'absent_LQ.lmdb'
    opt_path = tiny.write_options(tmp_path / 'opt.yml', tiny.training_options(experiment, data['lmdb']['gt'], missing))
    result = tiny.run_cli('train.py', opt_path)
    assert_one_line_error(result, 'datasets.train.dataroot_lq', str(missing), 'does not exist')
    assert sorted(p.name for p in earlier.iterdir()) == ['precious.txt']
    assert not list(earlier.parent.glob(f'{experiment}_archived_*'))


def test_missing_option_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['train.py', '-opt', str(tmp_path / 'no_such.yml')])
    with pytest.raises(checks.InputError, match='no_such.yml: no such option file'):
        checks.preview_options(str(REPO), is_train=True)


def corrupt_lmdb_value(lmdb_path: Path, key: str) -> None:
    """Keep the PNG header (so the start-up check passes) and replace the pixel data with junk."""
    env = lmdb.open(str(lmdb_path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        head = bytes(txn.get(key.encode()))[:33]
        txn.put(key.encode(), head + b'\x00junk' * 40)
    env.close()


def test_cli_corrupt_image_body_in_a_worker(tmp_path, data, experiment):
    gt = copy_tree(data['lmdb']['gt'], tmp_path / 'gt.lmdb')
    corrupt_lmdb_value(gt, 'img_002')
    opt = tiny.training_options(experiment, gt, data['lmdb']['lq'], total_iter=6, save_freq=100)
    opt['datasets']['train']['num_worker_per_gpu'] = 1  # decoding happens in a worker process
    result = tiny.run_cli('train.py', tiny.write_options(tmp_path / 'opt.yml', opt))
    assert_one_line_error(result, "datasets.train: GT image 'img_002'", str(gt), 'cannot be decoded',
                          'on_corrupt: skip')


def test_corrupt_image_skipped_or_reported_by_the_guard(tmp_path, data, caplog):
    from basicsr.data.paired_image_dataset import PairedImageDataset

    gt = copy_tree(data['lmdb']['gt'], tmp_path / 'gt.lmdb')
    corrupt_lmdb_value(gt, 'img_002')
    dataset_opt = tiny.training_options('unused', gt, data['lmdb']['lq'])['datasets']['train']
    dataset_opt.update({'phase': 'train', 'scale': tiny.SCALE})
    # One data set under both guards: LMDB refuses to open the same files twice in a process.
    inner = PairedImageDataset(copy.deepcopy(dataset_opt))
    skipping = checks.CorruptImageGuard(inner, 'datasets.train', 'skip')
    assert len(skipping) == 4
    basicsr_logger = logging.getLogger('basicsr')  # BasicSR's logger does not propagate to the root
    basicsr_logger.addHandler(caplog.handler)
    try:
        sample = skipping[2]
    finally:
        basicsr_logger.removeHandler(caplog.handler)
    assert sample['gt_path'] == 'img_003' and tuple(sample['gt'].shape) == (3, 32, 32)
    assert skipping.skipped == 1 and "skipped GT image 'img_002'" in caplog.text
    assert skipping[1]['gt_path'] == 'img_001' and skipping.skipped == 1

    stopping = checks.CorruptImageGuard(inner, 'datasets.train', 'error')
    with pytest.raises(checks.InputError, match=r"GT image 'img_002' in .*gt.lmdb cannot be decoded"):
        stopping[2]


def test_cli_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, data, experiment):
    # An absurd learning rate blows the weights up after the first step, so iteration 2's loss is NaN.
    opt = tiny.training_options(experiment, **data['lmdb'], total_iter=6, save_freq=1)
    opt['train']['optim_g']['lr'] = 1e30
    result = tiny.run_cli('train.py', tiny.write_options(tmp_path / 'opt.yml', opt))
    line = assert_one_line_error(result, 'non-finite loss at iteration 2', 'stopped without saving',
                                 'training_states/1.state')
    exp = tiny.experiment_dir(experiment)
    assert sorted(p.name for p in (exp / 'training_states').iterdir()) == ['1.state']
    assert sorted(p.name for p in (exp / 'models').iterdir()) == ['net_g_1.pth']
    assert torch.load(exp / 'training_states' / '1.state', map_location='cpu')['iter'] == 1
    assert line in next(exp.glob('train_*.log')).read_text()  # the log file says why it stopped


@pytest.fixture(scope='module')
def odd_images(tmp_path_factory, set5_dir):
    """One Set5 pair as plain RGB, grayscale, RGBA and 16-bit PNGs, each in its own test set."""
    root = tmp_path_factory.mktemp('odd_images')
    # A 32x32 LR corner (128x128 HR) of butterfly keeps four network runs short.
    hr = cv2.imread(str(set5_dir / 'HR' / 'butterfly.png'))[:128, :128]
    lr = cv2.imread(str(set5_dir / 'LR_bicubic' / 'X4' / 'butterfly.png'))[:32, :32]
    variants = {
        'rgb': lambda im: im,
        'gray': lambda im: cv2.cvtColor(im, cv2.COLOR_BGR2GRAY),
        'rgba': lambda im: cv2.cvtColor(im, cv2.COLOR_BGR2BGRA),
        'sixteen': lambda im: im.astype(np.uint16) * 257,
    }
    for name, convert in variants.items():
        for side, image in (('HR', hr), ('LR', lr)):
            folder = root / name / side
            folder.mkdir(parents=True)
            cv2.imwrite(str(folder / 'butterfly.png'), convert(image))
    assert cv2.imread(str(root / 'sixteen' / 'HR' / 'butterfly.png'), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert cv2.imread(str(root / 'gray' / 'HR' / 'butterfly.png'), cv2.IMREAD_UNCHANGED).ndim == 2
    assert cv2.imread(str(root / 'rgba' / 'HR' / 'butterfly.png'), cv2.IMREAD_UNCHANGED).shape[2] == 4
    return root


def test_cli_test_on_grayscale_rgba_and_16bit_images(tmp_path, odd_images, weights_dir, experiment):
    import yaml
    from basicsr.metrics import calculate_psnr

    names = ['rgb', 'gray', 'rgba', 'sixteen']
    opt = {
        'name': experiment, 'model_type': 'SRModel', 'scale': 4, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {f'test_{i}': {'name': name, 'type': 'PairedImageDataset', 'io_backend': {'type': 'disk'},
                                   'dataroot_gt': str(odd_images / name / 'HR'),
                                   'dataroot_lq': str(odd_images / name / 'LR')}
                     for i, name in enumerate(names, 1)},
        'network_g': {'type': 'DVMSR'},
        'path': {'pretrain_network_g': str(weights_dir / 'dvmsr_ntire2024_official.pth'), 'param_key_g': None,
                 'strict_load_g': True},
        'val': {'save_img': False, 'suffix': None,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 4, 'test_y_channel': True}}},
    }
    opt_path = tmp_path / 'test.yml'
    opt_path.write_text(yaml.safe_dump(opt, sort_keys=False))
    result = tiny.run_cli('test.py', opt_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = next((REPO / 'results' / experiment).glob('test_*.log')).read_text()
    psnr = {}
    for name in names:
        block = log.split(f'Validation {name}\n', 1)[1]
        psnr[name] = float(block.split('# psnr: ', 1)[1].split()[0])
    # RGBA with an opaque alpha and 16-bit (8-bit x 257) hold the same colours as the RGB file.
    assert psnr['rgba'] == pytest.approx(psnr['rgb'], abs=1e-3)
    assert psnr['sixteen'] == pytest.approx(psnr['rgb'], abs=1e-3)
    # Grayscale has other pixels; the network must still beat bicubic upscaling on them.
    hr = cv2.imread(str(odd_images / 'gray' / 'HR' / 'butterfly.png'), cv2.IMREAD_COLOR)
    lr = cv2.imread(str(odd_images / 'gray' / 'LR' / 'butterfly.png'), cv2.IMREAD_COLOR)
    bicubic = cv2.resize(lr, (hr.shape[1], hr.shape[0]), interpolation=cv2.INTER_CUBIC)
    bicubic_psnr = calculate_psnr(bicubic, hr, crop_border=4, test_y_channel=True)
    assert psnr['gray'] > bicubic_psnr + 1.0, (psnr, bicubic_psnr)
    assert psnr['rgb'] > 26.0, psnr
