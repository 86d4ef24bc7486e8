"""BasicSR's SRModel with a training step that can run as one CUDA graph (``train.cuda_graph``)."""
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY
from torch import Tensor
from torch.nn import DataParallel

# Eager iterations before the capture: Triton compiles its kernels, cuDNN's benchmark mode picks its
# algorithms and Adam makes its state, none of which may happen while a graph is being recorded.
WARMUP_ITERATIONS = 3
# The batch tensors feed_data sets; the graph reads them from buffers of its own.
GRAPH_INPUTS = ('lq', 'gt')


class TrainingGraph:
    """A model's training step, captured once as a CUDA graph and replayed for every later batch.

    The step is the model's ``training_step``: forward, losses, backward, the optimizer's step and
    the EMA update, all on the GPU. Around the replay the host only copies the batch into the
    graph's input buffers, hands the learning rate over when the schedule has changed it, and reads
    the losses for the log. Replays write the weights without PyTorch seeing it, so each one moves
    the weights' version counters itself: DVMSR's fused inference keeps tensors derived from its
    weights until those move (``derived_tensor``), and a validation would otherwise use stale ones.
    """

    def __init__(self, model: SRModel) -> None:
        self.model = model
        self.side_stream = torch.cuda.Stream(model.device)
        self.iterations = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.inputs: Dict[str, Tensor] = {}
        self.losses: Dict[str, Tensor] = OrderedDict()
        self.learning_rates: List[Tuple[dict, Tensor, float]] = []
        self.shapes_warned = set()
        self.weights = [p for net in model.trained_networks() for p in net.parameters()]

    def run(self, current_iter: int) -> None:
        model = self.model
        if self.graph is None and self.iterations < WARMUP_ITERATIONS:
            self.iterations += 1
            self._eager_on_side_stream(current_iter)
            return
        if self.graph is None:
            self._capture(current_iter)
        elif not self._copy_inputs():
            model.training_step(current_iter)
            return
        for i, (group, rate, value) in enumerate(self.learning_rates):
            if group['lr'] != value:
                rate.fill_(group['lr'])
                self.learning_rates[i] = (group, rate, group['lr'])
        self.graph.replay()
        for weight in self.weights:
            torch.autograd.graph.increment_version(weight)
        model.log_dict = model.reduce_loss_dict(self.losses)

    def _eager_on_side_stream(self, current_iter: int) -> None:
        # As PyTorch's whole-network capture does its warm-up: away from the stream the capture
        # will branch from, so that nothing the warm-up leaves queued is recorded.
        self.side_stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(self.side_stream):
            self.model.training_step(current_iter)
        torch.cuda.current_stream(self.model.device).wait_stream(self.side_stream)

    def _copy_inputs(self) -> bool:
        """Copy the batch into the graph's buffers; False (and an eager step) for a batch of
        another shape, which a graph cannot take."""
        batch = {name: getattr(self.model, name) for name in self.inputs}
        if any(batch[name].shape != buffer.shape for name, buffer in self.inputs.items()):
            shapes = tuple((name, tuple(batch[name].shape)) for name in self.inputs)
            if shapes not in self.shapes_warned:
                self.shapes_warned.add(shapes)
                get_root_logger().warning(
                    f'train.cuda_graph: a batch of {dict(shapes)}, where the graph was recorded for '
                    f'{ {name: tuple(b.shape) for name, b in self.inputs.items()} }; such batches train '
                    'eagerly (fix gt_size and keep whole batches to stay on the graph)')
            return False
        for name, buffer in self.inputs.items():
            buffer.copy_(batch[name])
            setattr(self.model, name, buffer)
        return True

    def _capture(self, current_iter: int) -> None:
        model = self.model
        self.inputs = {name: getattr(model, name).clone() for name in GRAPH_INPUTS if hasattr(model, name)}
        for name, buffer in self.inputs.items():
            setattr(model, name, buffer)
        # The recorded optimizer reads its learning rate from a tensor, which the schedule's float
        # is copied into before a replay; the schedule itself keeps seeing floats.
        self.learning_rates = [(group, torch.tensor(float(group['lr']), device=model.device), group['lr'])
                               for optimizer in model.optimizers for group in optimizer.param_groups]
        for group, rate, _ in self.learning_rates:
            group['lr'] = rate
        # The losses stay on the GPU inside the graph; run() reads them after each replay. Detached,
        # so that they do not keep the recording's autograd graph alive (see below).
        model.reduce_loss_dict = lambda loss_dict: self.losses.update(
            (name, value.detach()) for name, value in loss_dict.items())
        # The last warm-up's SR image holds its autograd graph, and with it the weights' gradient
        # accumulators, which belong to the warm-up's stream; the capture makes its own.
        model.output = None
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                model.training_step(current_iter)
        finally:
            del model.reduce_loss_dict  # back to the class's
            for group, _, value in self.learning_rates:
                group['lr'] = value
        # The recorded SR image (rewritten by each replay) without the recording's autograd graph,
        # whose gradient accumulators an eager step on another stream would otherwise meet.
        model.output = model.output.detach()
        get_root_logger().info(f'train.cuda_graph: the training step is recorded as one CUDA graph '
                               f'(batch {dict((n, tuple(b.shape)) for n, b in self.inputs.items())})')


def set_capturable(optimizers: List[torch.optim.Optimizer], capturable: bool) -> None:
    """Adam's ``capturable`` mode keeps its step counts on the GPU, so a graph can record its step.

    A resumed state brings the mode it was saved with; the counts move to where the mode wants them.
    """
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group['capturable'] = capturable
            for param in group['params']:
                state = optimizer.state.get(param, {})
                if 'step' in state:
                    state['step'] = state['step'].to(param.device if capturable else 'cpu', torch.float32)


@MODEL_REGISTRY.register()
class DVMSRModel(SRModel):
    """SRModel whose training step can be recorded once as a CUDA graph and replayed.

    ``train.cuda_graph: true`` (default false) takes the host out of the training step: after
    ``WARMUP_ITERATIONS`` eager iterations the forward, losses, backward, optimizer step and EMA
    update are recorded and then replayed for each batch, so the GPU does not wait for Python to
    issue some hundreds of kernels per iteration. It needs fixed batch shapes (BasicSR's training
    loader keeps whole batches of ``gt_size`` patches); Adam, the optimizer BasicSR builds, runs in
    its ``capturable`` mode. The losses are still logged and the schedule still sets the learning
    rate. Without a CUDA device, and on several GPUs (DDP or DataParallel), the step runs eagerly.
    A subclass's ``training_step`` must not depend on ``current_iter`` or on host-side values other
    than the learning rate, which a replay would not see. Everything else is SRModel's.
    """

    def init_training_settings(self) -> None:
        super().init_training_settings()
        self.training_graph = self._build_training_graph()

    def _build_training_graph(self) -> Optional[TrainingGraph]:
        wanted = self.opt['train'].get('cuda_graph', False)
        if not isinstance(wanted, bool):
            raise ValueError(f'train.cuda_graph: {wanted!r}; it is true or false')
        if not wanted:
            return None
        logger = get_root_logger()
        if self.device.type != 'cuda':
            logger.info('train.cuda_graph: no CUDA device, so the training step runs eagerly')
            return None
        if self.opt['dist'] or isinstance(self.net_g, DataParallel):
            logger.info('train.cuda_graph: not with several GPUs; the training step runs eagerly')
            return None
        set_capturable(self.optimizers, True)
        return TrainingGraph(self)

    def trained_networks(self) -> List[torch.nn.Module]:
        """The networks whose weights a training step writes."""
        return [self.net_g] + ([self.net_g_ema] if self.ema_decay > 0 else [])

    def training_step(self, current_iter: int) -> None:
        """One eager iteration: SRModel's ``optimize_parameters``."""
        super().optimize_parameters(current_iter)

    def optimize_parameters(self, current_iter: int) -> None:
        if self.training_graph is None:
            self.training_step(current_iter)
        else:
            self.training_graph.run(current_iter)

    def resume_training(self, resume_state: dict) -> None:
        super().resume_training(resume_state)
        set_capturable(self.optimizers, self.training_graph is not None)
