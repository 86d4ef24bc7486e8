"""Parameters, FLOPs and activations of the networks in BasicSR option files.

    python scripts/model_stats.py options/train/ntire2024/student_x4.yml options/train/ablation/*.yml

For every ``network_*`` entry of each file (``network_g``, and ``network_t`` for distillation runs):
the parameter count, FLOPs at a 256x256 LR input (``--size``), counted two ways, and activations.

One FLOP is one multiply-add in a convolution or a matrix product, as fvcore counts it (biases are
free); a LayerNorm costs 5 per element, again as fvcore counts it.

* ``FLOPs fvcore``: the NTIRE 2024 Efficient SR convention. The challenge ran fvcore's
  ``FlopCountAnalysis`` on networks built on mamba_ssm, whose ``Mamba`` block runs everything after
  ``in_proj`` as one fused autograd function (``mamba_inner_fn``): conv1d, x_proj, dt_proj, the
  selective scan, the gate and out_proj. fvcore traces it as a single opaque op and counts none of
  it. This script reproduces that view: during counting, each mixer's work after ``in_proj`` is
  one opaque autograd function too. Counted: every Conv2d, every LayerNorm, each ViMM's ``in_proj``,
  and, for the bidirectional SSM, ``out_proj`` (Vision Mamba's bidirectional block applies it
  outside its two fused scans). For the released student this is 20.1680 G (paper Tables 2 and 9).
* ``FLOPs full``: the above plus all the work inside the mixer, counted analytically (see
  :func:`dvmsr_flops`): conv1d, x_proj, dt_proj, out_proj, and the selective scan with its gate.
* ``activations``: the NTIRE convention, the number of elements of all Conv2d outputs.
"""
import argparse
import inspect
import math
import sys
import warnings
from os import path as osp
from typing import Dict, List, Optional, Tuple

ROOT = osp.abspath(osp.join(__file__, osp.pardir, osp.pardir))
sys.path.insert(0, ROOT)  # so a fresh clone runs without `pip install -e .`

import torch  # noqa: E402
import yaml  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import dvmsr_arch  # noqa: E402,F401  (registers the networks)
from basicsr.archs import build_network  # noqa: E402
from basicsr.utils.options import ordered_yaml  # noqa: E402
from dvmsr_arch.archs.dvmsr_arch import DVMSR, MambaMixer, scaled_per_sample  # noqa: E402

try:
    with warnings.catch_warnings():  # fvcore 0.1.5 scripts a loss function at import time
        warnings.simplefilter('ignore', FutureWarning)
        from fvcore.nn import FlopCountAnalysis
except ImportError:
    FlopCountAnalysis = None

# Operation groups that fvcore sees when the mixer runs mamba_ssm's fused kernel.
FVCORE_VISIBLE = ('conv2d', 'layer_norm', 'in_proj')
# fvcore's LayerNorm cost per element (affine); see fvcore.nn.jit_handles.norm_flop_counter.
LAYER_NORM_FLOPS = 5


def dvmsr_flops(network_opt: Dict, height: int, width: int) -> Dict[str, int]:
    """FLOPs of a DVMSR network at an LR input of ``height`` x ``width``, per operation group.

    ``network_opt`` holds the constructor arguments (a ``network_g`` entry; ``type`` is ignored).
    One multiply-add is one FLOP. Per token, per ViMM and per scan direction, with E inner channels,
    N states, R = dt_rank, K = conv kernel:

    ==================  ==================================================================
    ``conv1d``          E * K (depthwise)
    ``x_proj``          E * (R + 2N)
    ``dt_proj``         R * E
    ``selective_scan``  5 * E * N: per state, delta*A, its exp, (delta*u)*B, the state update
                        h = A_bar*h + B_bar*u (one multiply-add) and the read-out C*h (one
                        multiply-add); plus 6 * E: softplus(delta), delta*u, the D*u skip
                        (one multiply-add), SiLU after conv1d, SiLU(z) and the gate product
    ``combine``         bidirectional only: 2 * E (sum of the two directions, halving)
    ==================  ==================================================================

    ``in_proj`` (C * 2E) and ``out_proj`` (E * C) run once per ViMM; ``layer_norm`` is 5 per
    element; ``conv2d`` is C_out * C_in * k * k per output pixel. Residual additions, activations
    outside the mixer, the mean shift and PixelShuffle are free, as in fvcore.
    """
    opt = {key: value for key, value in network_opt.items() if key != 'type'}
    try:
        args = inspect.signature(DVMSR).bind(**opt)
    except TypeError as error:
        raise ValueError(f'not a DVMSR network_g: {error}') from None
    args.apply_defaults()
    a = args.arguments
    dim, depths, scale = a['embed_dim'], list(a['depths']), a['upscale']
    inner = a['expand'] * dim
    dt_rank = a['dt_rank'] or math.ceil(dim / 16)
    state, kernel = a['d_state'], a['d_conv']
    directions = 2 if a['bidirectional'] else 1
    tokens = height * width
    vimms = sum(depths)

    # Conv2d multiply-adds per LR pixel: conv_first, one conv per RSSB, conv_after_body ...
    conv2d = 3 * dim * 9 + (len(depths) + 1) * dim * dim * 9
    if a['upsampler'] == 'pixelshuffle':
        feat = a['num_feat']
        conv2d += dim * feat * 9  # conv_before_upsample
        pixels = 1  # pixels per LR pixel at the current stage of the upsampler
        for factor in [2] * int(math.log2(scale)) if scale in (2, 4) else [3]:
            conv2d += pixels * feat * factor**2 * feat * 9
            pixels *= factor**2
        conv2d += pixels * feat * 3 * 9  # conv_last, at the output resolution
    else:
        conv2d += dim * 3 * scale**2 * 9
    per_direction = {
        'conv1d': inner * kernel,
        'x_proj': inner * (dt_rank + 2 * state),
        'dt_proj': dt_rank * inner,
        'selective_scan': 5 * inner * state + 6 * inner,
    }
    counts = {
        'conv2d': conv2d * tokens,
        # patch_embed.norm, norm_f and one LayerNorm per ViMM
        'layer_norm': (vimms + 2) * LAYER_NORM_FLOPS * dim * tokens,
        'in_proj': vimms * dim * 2 * inner * tokens,
        'out_proj': vimms * inner * dim * tokens,
    }
    for name, flops in per_direction.items():
        counts[name] = directions * vimms * flops * tokens
    if directions == 2:
        counts['combine'] = vimms * 2 * inner * tokens
    return counts


def fvcore_visible_groups(network_opt: Dict) -> Tuple[str, ...]:
    """The groups of :func:`dvmsr_flops` that fvcore counts under the NTIRE 2024 convention."""
    if network_opt.get('bidirectional', False):
        return FVCORE_VISIBLE + ('out_proj',)
    return FVCORE_VISIBLE


class _FusedMixerKernel(torch.autograd.Function):
    """Stands in for mamba_ssm's fused kernel while counting: traced as one ``prim::PythonOp``.

    Only the output shape matters to a FLOP count, so it returns zeros instead of computing the
    scan; the rest of the network does not branch on values.
    """

    @staticmethod
    def forward(ctx, xz: Tensor, width: int) -> Tensor:
        return xz.new_zeros(*xz.shape[:-1], width)


def _fused_mixer_forward(mixer: MambaMixer):

    def forward(tokens: Tensor, norm: Optional[nn.LayerNorm] = None, out_width: Optional[int] = None,
                release_input: bool = False, sample_scale: Optional[Tensor] = None) -> Tensor:
        # out_width (padded rows for a convolution on the Triton path) and release_input (the
        # Triton path freeing a spent input) do not change a count; sample_scale (stochastic
        # depth) is None in eval mode, where the counts are taken.
        if sample_scale is not None:
            tokens = scaled_per_sample(tokens, sample_scale)
        xz = mixer.in_proj(norm(tokens) if norm is not None else tokens)
        if mixer.bidirectional:  # Vision Mamba: two fused scans, then out_proj in plain PyTorch
            return mixer.out_proj(_FusedMixerKernel.apply(xz, mixer.out_proj.in_features))
        return _FusedMixerKernel.apply(xz, mixer.out_proj.out_features)  # out_proj is fused too

    return forward


def as_fused_mamba(net: nn.Module) -> nn.Module:
    """Make every Mamba mixer of ``net`` look to a tracer as it does when run by mamba_ssm."""
    for module in net.modules():
        if isinstance(module, MambaMixer):
            module.forward = _fused_mixer_forward(module)
    return net


def fvcore_flops(net: nn.Module, height: int, width: int) -> int:
    if FlopCountAnalysis is None:
        raise RuntimeError('fvcore is not installed: pip install -e ".[flops]"')
    with torch.no_grad():
        analysis = FlopCountAnalysis(net.eval(), torch.rand(1, 3, height, width))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return int(analysis.total())


class Conv2dOutputs:
    """Counts, while active, the elements of every Conv2d/ConvTranspose2d output: NTIRE's activations.

    Forward hooks also run while fvcore traces, so one forward pass gives both counts.
    """

    def __init__(self, net: nn.Module) -> None:
        self.net, self.elements, self.layers, self._handles = net, 0, 0, []

    def _hook(self, module, inputs, output) -> None:
        self.elements += int(output.numel())
        self.layers += 1

    def __enter__(self) -> 'Conv2dOutputs':
        self._handles = [m.register_forward_hook(self._hook) for m in self.net.modules()
                         if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def load_option_file(path: str) -> Dict:
    try:
        with open(path, encoding='utf-8') as f:
            opt = yaml.load(f, Loader=ordered_yaml()[0])
    except OSError as error:
        raise SystemExit(f'{path}: cannot read ({error.strerror})')
    except yaml.YAMLError as error:
        raise SystemExit(f'{path}: not valid YAML ({" ".join(str(error).split())})')
    if not isinstance(opt, dict) or not any(key.startswith('network_') for key in opt):
        raise SystemExit(f'{path}: no network_g (or other network_*) entry')
    return opt


def network_stats(network_opt: Dict, height: int, width: int, with_fvcore: bool) -> Dict:
    """Everything printed for one network entry."""
    try:
        net = build_network(network_opt)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f'cannot build {network_opt.get("type")!r}: {error}') from None
    stats = {'type': network_opt['type'], 'parameters': sum(p.numel() for p in net.parameters())}
    if isinstance(net, DVMSR):
        groups = dvmsr_flops(network_opt, height, width)
        stats['flops_by_group'] = groups
        stats['flops_full'] = sum(groups.values())
        stats['flops_fvcore_analytic'] = sum(groups[name] for name in fvcore_visible_groups(network_opt))
    as_fused_mamba(net)
    with Conv2dOutputs(net) as outputs:
        if with_fvcore:
            stats['flops_fvcore'] = fvcore_flops(net, height, width)
        else:
            with torch.no_grad():
                net.eval()(torch.rand(1, 3, height, width))
    stats['activations'], stats['conv2d_layers'] = outputs.elements, outputs.layers
    return stats


def _giga(value) -> str:
    return 'n/a' if value is None else f'{value / 1e9:.4f}'


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('options', nargs='+', metavar='OPTION_FILE', help='BasicSR option files (YAML)')
    parser.add_argument('--size', type=int, nargs=2, default=(256, 256), metavar=('H', 'W'),
                        help='LR input size for FLOPs and activations (default: 256 256, the NTIRE convention)')
    parser.add_argument('--networks', nargs='+', metavar='KEY',
                        help='only these entries, e.g. network_g (default: every network_* of each file)')
    parser.add_argument('--by-group', action='store_true', help='also print the full count per operation group')
    args = parser.parse_args(argv)
    height, width = args.size
    with_fvcore = FlopCountAnalysis is not None
    if not with_fvcore:
        print('fvcore is not installed (pip install -e ".[flops]"): its column is left out', file=sys.stderr)

    header = ('file', 'network', 'type', 'parameters', 'FLOPs fvcore [G]', 'FLOPs full [G]', 'activations [M]',
              'conv2d')
    rows = []
    for path in args.options:
        opt = load_option_file(path)
        for key in (k for k in opt if k.startswith('network_') and (not args.networks or k in args.networks)):
            try:
                stats = network_stats(opt[key], height, width, with_fvcore)
            except ValueError as error:
                raise SystemExit(f'{path}: {key}: {error}')
            if 'flops_fvcore' in stats and 'flops_fvcore_analytic' in stats \
                    and stats['flops_fvcore'] != stats['flops_fvcore_analytic']:
                print(f'{path}: {key}: fvcore counted {stats["flops_fvcore"]}, the analytic count of the same ops '
                      f'is {stats["flops_fvcore_analytic"]}', file=sys.stderr)
            rows.append((path, key, stats['type'], f'{stats["parameters"]:,}', _giga(stats.get('flops_fvcore')),
                         _giga(stats.get('flops_full')), f'{stats["activations"] / 1e6:.4f}',
                         str(stats['conv2d_layers'])))
            if args.by_group and 'flops_by_group' in stats:
                for name, flops in stats['flops_by_group'].items():
                    rows.append(('', f'  {name}', '', '', '', _giga(flops), '', ''))
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    print(f'LR input {height}x{width}; one FLOP = one multiply-add')
    for row in [header] + rows:
        print('  '.join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    return 0


if __name__ == '__main__':
    sys.exit(main())
