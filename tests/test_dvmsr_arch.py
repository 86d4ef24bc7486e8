"""The DVMSR network: shapes, parameter counts, checkpoint layout, options."""
import itertools
import math

import pytest
import torch

from dvmsr_arch.archs.dvmsr_arch import DVMSR, DropPath, PixelShuffle, zero_padded


def count(net):
    return sum(p.numel() for p in net.parameters())


def formula(d, n, k):
    """Parameters of x4 pixelshuffledirect DVMSR with n RSSBs of k ViMMs at width d."""
    r = math.ceil(d / 16)
    return n * (k * (6 * d * d + 4 * d * r + 112 * d) + 9 * d * d + d) + 9 * d * d + 465 * d + 48


def test_default_is_the_released_student():
    assert count(DVMSR()) == 424_428


@pytest.mark.parametrize('d,n,k', list(itertools.product([8, 20, 60, 96], [1, 2, 4], [1, 2, 3])))
def test_parameter_count_formula(d, n, k):
    assert count(DVMSR(embed_dim=d, depths=[k] * n)) == formula(d, n, k)


@pytest.mark.parametrize('upscale', [2, 3, 4])
@pytest.mark.parametrize('upsampler', ['pixelshuffledirect', 'pixelshuffle'])
@pytest.mark.parametrize('size', [(23, 17), (8, 8), (1, 5)])
def test_output_shape(upscale, upsampler, size):
    net = DVMSR(upscale=upscale, upsampler=upsampler, embed_dim=12, depths=[1, 1], num_feat=8).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, *size))
    assert out.shape == (2, 3, size[0] * upscale, size[1] * upscale)
    assert torch.isfinite(out).all()


def test_checkpoint_keys_follow_the_released_layout():
    keys = set(DVMSR().state_dict())
    assert 'layers.3.residual_group.blocks.1.mixer.A_log' in keys
    assert 'layers.0.residual_group.blocks.0.norm.weight' in keys
    assert {'conv_first.weight', 'patch_embed.norm.weight', 'norm_f.bias', 'conv_after_body.weight',
            'upsample.0.weight', 'layers.2.conv.bias'} <= keys
    assert not any('mean' in k for k in keys)  # the RGB mean is a constant, not a weight
    mixer = {k.split('mixer.')[1] for k in keys if 'layers.0.residual_group.blocks.0.mixer.' in k}
    assert mixer == {'in_proj.weight', 'conv1d.weight', 'conv1d.bias', 'x_proj.weight', 'dt_proj.weight',
                     'dt_proj.bias', 'A_log', 'D', 'out_proj.weight'}


def test_pixelshuffle_upsampler_layout():
    keys = set(DVMSR(upsampler='pixelshuffle', embed_dim=192, depths=[2] * 8).state_dict())
    assert {'conv_before_upsample.0.weight', 'upsample.0.weight', 'upsample.2.weight', 'conv_last.weight'} <= keys
    assert count(DVMSR(upsampler='pixelshuffle', embed_dim=192, depths=[2] * 8)) == 7_432_131


@pytest.mark.parametrize('factor', [2, 3])
@pytest.mark.parametrize('channels_last', [True, False])
def test_pixel_shuffle_keeps_channels_last_and_the_values(factor, channels_last):
    """The upsampler's PixelShuffle: PyTorch's values and gradients exactly, and a channels-last
    image stays channels-last (the convolution after it then reads it without a conversion)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5 * factor**2, 7, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn(2, 5, 7 * factor, 6 * factor)
    out = PixelShuffle(factor)(x)
    (out * grad).sum().backward()
    expected = torch.nn.functional.pixel_shuffle(x.detach(), factor)
    assert torch.equal(out, expected)
    assert torch.equal(x.grad, torch.nn.functional.pixel_unshuffle(grad, factor))
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_bidirectional_adds_a_second_scan_per_vimm():
    net = DVMSR(bidirectional=True)
    assert count(net) - count(DVMSR()) == 8 * 7_560
    mixer = net.layers[0].residual_group.blocks[0].mixer
    for name in ('conv1d_b', 'x_proj_b', 'dt_proj_b', 'A_b_log', 'D_b'):
        assert hasattr(mixer, name)


def test_bidirectional_output_depends_on_later_tokens():
    torch.manual_seed(0)
    for bidirectional, expect_change in ((False, False), (True, True)):
        net = DVMSR(embed_dim=8, depths=[1], bidirectional=bidirectional).double().eval()
        mixer = net.layers[0].residual_group.blocks[0].mixer
        tokens = torch.randn(1, 6, 8, dtype=torch.float64)
        changed = tokens.clone()
        changed[:, -1] += 1.0
        with torch.no_grad():
            first = mixer(tokens)[:, 0]
            again = mixer(changed)[:, 0]
        assert (not torch.equal(first, again)) == expect_change


def test_vimm_residual_option_adds_the_input():
    torch.manual_seed(0)
    plain = DVMSR(embed_dim=8, depths=[1]).eval()
    residual = DVMSR(embed_dim=8, depths=[1], vimm_residual=True).eval()
    residual.load_state_dict(plain.state_dict())
    tokens = torch.randn(1, 6, 8)
    with torch.no_grad():
        torch.testing.assert_close(residual.layers[0].residual_group.blocks[0](tokens),
                                   plain.layers[0].residual_group.blocks[0](tokens) + tokens)


def test_drop_path_zeroes_or_rescales_whole_samples():
    drop = DropPath(0.25).train()
    torch.manual_seed(0)
    out = drop(torch.ones(256, 3, 5))
    per_sample = out.flatten(1)
    assert torch.equal(per_sample, per_sample[:, :1].expand_as(per_sample))  # one factor per sample
    assert set(per_sample[:, 0].tolist()) == {0.0, torch.tensor(1 / 0.75).item()}  # 1 / (1 - p) in fp32
    assert 0.15 < (per_sample[:, 0] == 0).float().mean().item() < 0.35
    assert drop.eval().sample_scale(out) is None and DropPath(0.0).train().sample_scale(out) is None


def test_released_vimm_drops_its_input_per_sample():
    """Without the Eq. 4 skip, stochastic depth scales the ViMM's input (the released model): the
    mixer sees each sample times its factor, drawn as DropPath draws it."""
    torch.manual_seed(0)
    net = DVMSR(embed_dim=8, depths=[2], drop_path_rate=0.5).train()
    vimm = net.layers[0].residual_group.blocks[1]
    tokens = torch.randn(6, 7, 8)
    torch.manual_seed(3)
    scale = vimm.drop_path.sample_scale(tokens)
    assert 0 < (scale == 0).sum() < 6  # this draw drops some samples and keeps others
    torch.manual_seed(3)
    torch.testing.assert_close(vimm(tokens), vimm.mixer(tokens * scale.view(-1, 1, 1), norm=vimm.norm))


def test_initialisation():
    torch.manual_seed(0)
    released = DVMSR()
    mixer = released.layers[0].residual_group.blocks[0].mixer
    assert torch.all(mixer.dt_proj.bias == 0)  # what the released code's init loop leaves
    assert mixer.in_proj.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.allclose(mixer.A_log[5], torch.log(torch.arange(1, 17.0)))
    assert torch.all(mixer.D == 1)
    mamba = DVMSR(dt_init='mamba').layers[0].residual_group.blocks[0].mixer
    dt = torch.nn.functional.softplus(mamba.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6


def test_bad_arguments_are_rejected_with_their_name():
    with pytest.raises(ValueError, match='scan_backend'):
        DVMSR(scan_backend='fast')
    with pytest.raises(ValueError, match='upscale=5'):
        DVMSR(upscale=5)
    with pytest.raises(ValueError, match='upsampler'):
        DVMSR(upsampler='nearest+conv')
    with pytest.raises(TypeError):
        DVMSR(embed_dim=60, img_size=64)  # a key the architecture does not take


def test_backends_agree_inside_the_network():
    torch.manual_seed(0)
    net = DVMSR(embed_dim=16, depths=[2, 1]).double().eval()
    x = torch.rand(1, 3, 9, 13, dtype=torch.float64)
    with torch.no_grad():
        for mixer in (m for m in net.modules() if hasattr(m, 'scan_backend')):
            mixer.scan_backend = 'ref'
        expected = net(x)
        for mixer in (m for m in net.modules() if hasattr(m, 'scan_backend')):
            mixer.scan_backend = 'torch'
        torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)


def test_registered_in_basicsr():
    from basicsr.archs import build_network
    net = build_network({'type': 'DVMSR', 'embed_dim': 12, 'depths': [1]})
    assert isinstance(net, DVMSR)


@torch.no_grad()
def test_padded_weights_are_kept_until_the_weight_changes():
    # The fused inference path pads convolution and out_proj weights once per weight version.
    weight = torch.nn.Parameter(torch.randn(3, 2, 3, 3))
    first = zero_padded(weight, (3, 8, 3, 3))
    assert torch.equal(first[:, :2], weight) and not first[:, 2:].any()
    assert first.is_contiguous(memory_format=torch.channels_last)
    assert zero_padded(weight, (3, 8, 3, 3)) is first
    assert zero_padded(weight, (3, 2, 3, 3)) is weight
    weight.mul_(2)  # as an optimizer step does
    second = zero_padded(weight, (3, 8, 3, 3))
    assert second is not first and torch.equal(second[:, :2], weight)


def test_padded_weights_pass_gradients_while_recording():
    # The fused training path pads convolution inputs and out_proj's output the same way.
    weight = torch.nn.Parameter(torch.randn(3, 2))
    padded = zero_padded(weight, (5, 2))
    assert padded.requires_grad and not padded[3:].any()
    assert zero_padded(weight, (5, 2)) is not padded  # a new graph each call, never a kept copy
    (padded * torch.arange(10.0).view(5, 2)).sum().backward()
    assert torch.equal(weight.grad, torch.arange(6.0).view(3, 2))
