"""Knowledge distillation from a frozen teacher (paper Section 3.3, Eq. 5) as a BasicSR model."""
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from os import path as osp
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY
from torch import Tensor, nn

from dvmsr_arch.checks import describe_state_dict_mismatch
from dvmsr_arch.models.dvmsr_model import DVMSRModel

DISTILL_POSITIONS = ('output', 'body', 'mid')
# Paper Eq. 5 with lambda_dis = 1: what `train.distill_opt` means when it is left out.
DEFAULT_DISTILL_OPT = {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'}
PARAM_KEY_T = 'params_ema'
# train.teacher_precision: the teacher's forward as trained (fp32), or under autocast.
TEACHER_PRECISIONS = {'fp32': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def select_teacher_state(checkpoint: object, param_key: Optional[str], path: str) -> Tuple[Dict[str, Tensor], str]:
    """The teacher's state_dict inside a checkpoint, and where it was found.

    ``param_key`` is tried first, then ``params`` (as BasicSR's ``load_network`` does), then the file
    itself when it is a plain state_dict (every value a tensor), as the released checkpoints are.
    ``param_key=None`` asks for the plain state_dict directly.
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(f'path.pretrain_network_t: {path} holds a {type(checkpoint).__name__}, not a state_dict')
    for key in (param_key, 'params'):
        if key is not None and isinstance(checkpoint.get(key), dict):
            state, found = checkpoint[key], key
            break
    else:
        if not checkpoint or not all(isinstance(value, Tensor) for value in checkpoint.values()):
            raise ValueError(f'path.pretrain_network_t: {path} has neither {param_key!r} nor "params" and is no plain '
                             f'state_dict (top-level keys: {sorted(checkpoint)[:5]})')
        state, found = checkpoint, 'plain state_dict'
    # Checkpoints written from a DataParallel / DDP wrapper prefix every key with 'module.'.
    return {key[len('module.'):] if key.startswith('module.') else key: value for key, value in state.items()}, found


def load_teacher(net: nn.Module, path: str, param_key: Optional[str], strict: bool) -> str:
    """Load the teacher's weights; with ``strict``, any missing, unexpected or reshaped key is an error."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'path.pretrain_network_t: {path} does not exist (train the teacher first, or point '
                                'it at a teacher checkpoint)')
    state, found = select_teacher_state(torch.load(path, map_location='cpu', weights_only=True), param_key, path)
    if strict:
        problems = describe_state_dict_mismatch(net.state_dict(), state)
        if problems:
            raise ValueError(f'path.pretrain_network_t: {path} does not match network_t: {problems}')
    net.load_state_dict(state, strict=strict)
    return found


@contextmanager
def features_on_call(net: nn.Module, bare: nn.Module) -> Iterator[None]:
    """Make ``net(x)`` return ``bare.forward_with_features(x)`` for the duration of the block.

    Calling the (possibly DistributedDataParallel-wrapped) ``net`` rather than the bare network's
    method keeps DDP's forward bookkeeping, on which its gradient synchronisation depends.
    """
    bare.forward = bare.forward_with_features
    try:
        yield
    finally:
        del bare.forward  # back to the class's forward


@MODEL_REGISTRY.register()
class DistillSRModel(DVMSRModel):
    """DVMSRModel whose student ``network_g`` also learns from a frozen teacher ``network_t``.

    The loss is ``pixel_opt(S(x), HR) + distill_opt(S, T)`` (paper Eq. 5; each term's ``loss_weight``
    is its lambda). What is matched depends on ``train.distill_position``:

    * ``output`` (default): the SR images, as in the paper's end-level distillation;
    * ``body``: the deep features that enter the upsampler;
    * ``mid``: the output of one RSSB of each network, ``train.distill_layers: [student, teacher]``
      (zero-based).

    ``body`` and ``mid`` need networks with ``forward_with_features`` (DVMSR has it). Where the two
    feature widths differ, a learnable 1x1 convolution maps the student's features to the teacher's
    width; it trains with the student, is saved as ``net_adapter_<iter>.pth`` for resuming, and is
    never part of the student's own checkpoints.

    The teacher is built from ``network_t`` and loaded from ``path.pretrain_network_t`` (key
    ``path.param_key_t``, default ``params_ema``; ``strict_load_t``, default true). It stays in eval
    mode without gradients, outside the optimizer, unwrapped by DDP, and is never saved or resumed.
    Only training needs it: for testing this model behaves as SRModel. ``train.cuda_graph`` records
    the teacher's forward in the step's graph too (see DVMSRModel).

    ``train.teacher_precision`` (``fp32``, the default and the paper's; ``fp16`` or ``bf16``) runs the
    teacher's forward under autocast: its matmuls and convolutions in half precision, the scan's
    state and the SR image's last convolutions in fp32. The targets then move by the half
    precision's rounding (docs/training.md gives the measured size and the time it saves).
    """

    def init_training_settings(self) -> None:
        train_opt = self.opt['train']
        self.distill_position = train_opt.get('distill_position', 'output')
        precision = train_opt.get('teacher_precision', 'fp32')
        if precision not in TEACHER_PRECISIONS:
            raise ValueError(f'train.teacher_precision: {precision!r} is not one of {tuple(TEACHER_PRECISIONS)}')
        self.teacher_dtype = TEACHER_PRECISIONS[precision]
        if self.distill_position not in DISTILL_POSITIONS:
            raise ValueError(f'train.distill_position: {self.distill_position!r} is not one of {DISTILL_POSITIONS}')
        if self.distill_position == 'mid':
            layers = train_opt.get('distill_layers')
            if not (isinstance(layers, (list, tuple)) and len(layers) == 2 and all(isinstance(i, int) for i in layers)):
                raise ValueError(f'train.distill_layers: {layers!r}; distill_position mid needs [student_block, '
                                 'teacher_block] (zero-based RSSB indices)')
            self.distill_layers = tuple(layers)
        self.net_t = self._build_teacher()
        self.cri_distill = build_loss(train_opt.get('distill_opt') or DEFAULT_DISTILL_OPT).to(self.device)
        self.adapter = self._build_adapter()
        super().init_training_settings()

    def _build_teacher(self) -> nn.Module:
        path_opt = self.opt['path']
        if 'network_t' not in self.opt:
            raise ValueError('network_t: missing; DistillSRModel needs the teacher network')
        load_path = path_opt.get('pretrain_network_t')
        if load_path is None:
            raise ValueError('path.pretrain_network_t: missing; DistillSRModel needs trained teacher weights')
        # Moved, never model_to_device: DDP must not wrap a network that has nothing to train.
        net_t = build_network(self.opt['network_t']).to(self.device)
        found = load_teacher(net_t, load_path, path_opt.get('param_key_t', PARAM_KEY_T),
                             path_opt.get('strict_load_t', True))
        net_t.eval()
        net_t.requires_grad_(False)
        logger = get_root_logger()
        logger.info(f'Teacher {net_t.__class__.__name__} loaded from {load_path} ({found}), '
                    f'{sum(p.numel() for p in net_t.parameters()):,d} parameters, frozen')
        return net_t

    def _pair(self, student: Tuple[Tensor, dict], teacher: Tuple[Tensor, dict]) -> Tuple[Tensor, Tensor]:
        """The (student, teacher) tensors that ``distill_position`` compares."""
        if self.distill_position == 'output':
            return student[0], teacher[0]
        if self.distill_position == 'body':
            return student[1]['body'], teacher[1]['body']
        student_block, teacher_block = self.distill_layers
        return student[1]['rssb'][student_block], teacher[1]['rssb'][teacher_block]

    def _build_adapter(self) -> Optional[nn.Module]:
        """Check on a tiny input that the chosen tensors line up; a 1x1 conv if only widths differ."""
        if self.distill_position == 'output':
            return None
        bare_g = self.get_bare_model(self.net_g)
        for key, net in (('network_g', bare_g), ('network_t', self.net_t)):
            if not hasattr(net, 'forward_with_features'):
                raise ValueError(f'{key}: {net.__class__.__name__} has no forward_with_features, which '
                                 f'distill_position {self.distill_position} needs')
        probe = torch.zeros(1, 3, 8, 8, device=self.device)
        with torch.no_grad():
            student, teacher = bare_g.forward_with_features(probe), self.net_t.forward_with_features(probe)
        if self.distill_position == 'mid':
            for name, blocks, index in (('student', student[1]['rssb'], self.distill_layers[0]),
                                        ('teacher', teacher[1]['rssb'], self.distill_layers[1])):
                if not 0 <= index < len(blocks):
                    raise ValueError(f'train.distill_layers: {name} block {index} does not exist '
                                     f'(the {name} has {len(blocks)} RSSBs, numbered from 0)')
        s, t = self._pair(student, teacher)
        if s.shape[2:] != t.shape[2:]:
            raise ValueError(f'train.distill_position {self.distill_position}: student {tuple(s.shape[2:])} and '
                             f'teacher {tuple(t.shape[2:])} features differ in size')
        if s.shape[1] == t.shape[1]:
            return None
        get_root_logger().info(f'Distillation adapter: 1x1 conv {s.shape[1]} -> {t.shape[1]} channels')
        return self.model_to_device(nn.Conv2d(s.shape[1], t.shape[1], 1))

    def setup_optimizers(self) -> None:
        super().setup_optimizers()
        if self.adapter is not None:  # one optimizer, so the LR schedule and resume cover both
            self.optimizer_g.add_param_group({'params': list(self.adapter.parameters())})

    def trained_networks(self) -> List[nn.Module]:
        return super().trained_networks() + ([self.adapter] if self.adapter is not None else [])

    def training_step(self, current_iter: int) -> None:
        self.optimizer_g.zero_grad()
        autocast = (torch.autocast(self.device.type, dtype=self.teacher_dtype) if self.teacher_dtype is not None
                    else nullcontext())
        with torch.no_grad(), autocast:
            if self.distill_position == 'output':
                teacher = (self.net_t(self.lq), {})
            else:
                teacher = self.net_t.forward_with_features(self.lq)
        if self.distill_position == 'output':
            student = (self.net_g(self.lq), {})
        else:
            with features_on_call(self.net_g, self.get_bare_model(self.net_g)):
                student = self.net_g(self.lq)
        self.output = student[0]
        student_feature, teacher_feature = self._pair(student, teacher)
        teacher_feature = teacher_feature.float()  # features may leave an autocast teacher in half precision
        if self.adapter is not None:
            student_feature = self.adapter(student_feature)

        loss_dict = OrderedDict()
        l_total = 0
        if self.cri_pix:
            loss_dict['l_pix'] = self.cri_pix(self.output, self.gt)
            l_total += loss_dict['l_pix']
        if self.cri_perceptual:
            l_percep, l_style = self.cri_perceptual(self.output, self.gt)
            for name, term in (('l_percep', l_percep), ('l_style', l_style)):
                if term is not None:
                    loss_dict[name] = term
                    l_total += term
        loss_dict['l_distill'] = self.cri_distill(student_feature, teacher_feature)
        l_total += loss_dict['l_distill']

        l_total.backward()
        self.optimizer_g.step()
        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    def save(self, epoch: int, current_iter: int) -> None:
        # The adapter first: a training state on disk then always has its adapter beside it.
        if self.adapter is not None:
            self.save_network(self.adapter, 'net_adapter', current_iter)
        super().save(epoch, current_iter)  # the student (params, params_ema) and training state only

    def resume_training(self, resume_state: dict) -> None:
        super().resume_training(resume_state)
        if self.adapter is not None:
            path = osp.join(self.opt['path']['models'], f"net_adapter_{resume_state['iter']}.pth")
            self.load_network(self.adapter, path, strict=True, param_key='params')
