"""RLFN: Residual Local Feature Network (Kong et al., CVPRW 2022), the NTIRE 2024 Efficient SR baseline.

Defaults are the pruned x4 network the NTIRE 2024 challenge ships as its baseline (46 feature and
48 middle channels, 317,218 parameters); parameter names follow that release, so its checkpoint
loads strictly. Input and output pixels are in [0, 255].
"""
import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import Tensor, nn
from torch.nn import functional as F


def _conv(in_channels: int, out_channels: int, kernel_size: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2)


class ESA(nn.Module):
    """Enhanced Spatial Attention as RLFN uses it: a sigmoid mask from a strided, pooled branch.

    Args:
        channels: Width of the input and of the mask.
        esa_channels: Width inside the attention branch.
    """

    def __init__(self, *, channels: int, esa_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, esa_channels, 1)
        self.conv_f = nn.Conv2d(esa_channels, esa_channels, 1)
        self.conv2 = nn.Conv2d(esa_channels, esa_channels, 3, stride=2)
        self.conv3 = nn.Conv2d(esa_channels, esa_channels, 3, padding=1)
        self.conv4 = nn.Conv2d(esa_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        reduced = self.conv1(x)
        coarse = F.max_pool2d(self.conv2(reduced), kernel_size=7, stride=3)
        coarse = F.interpolate(self.conv3(coarse), size=x.shape[2:], mode='bilinear', align_corners=False)
        return x * torch.sigmoid(self.conv4(coarse + self.conv_f(reduced)))


class RLFB(nn.Module):
    """Residual Local Feature Block: three 3x3 convs with a skip, a 1x1 conv, then ESA.

    Args:
        channels: Block input and output width.
        mid_channels: Width between the 3x3 convs.
        esa_channels: Width inside ESA.
    """

    def __init__(self, *, channels: int, mid_channels: int, esa_channels: int) -> None:
        super().__init__()
        self.c1_r = _conv(channels, mid_channels, 3)
        self.c2_r = _conv(mid_channels, mid_channels, 3)
        self.c3_r = _conv(mid_channels, channels, 3)
        self.c5 = _conv(channels, channels, 1)
        self.esa = ESA(channels=channels, esa_channels=esa_channels)
        self.act = nn.LeakyReLU(0.05, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.c1_r(x))
        out = self.act(self.c2_r(out))
        out = self.act(self.c3_r(out))
        return self.esa(self.c5(out + x))


@ARCH_REGISTRY.register()
class RLFN(nn.Module):
    """RLFN super-resolution network (pixels in [0, 255]).

    Args:
        in_channels: Input image channels.
        out_channels: Output image channels.
        feature_channels: Width of the trunk.
        mid_channels: Width inside each block.
        esa_channels: Width inside each attention branch.
        num_blocks: Number of RLFBs (named ``block_1`` ... in the checkpoint).
        upscale: Scale factor of the PixelShuffle upsampler.
    """

    def __init__(self, *, in_channels: int = 3, out_channels: int = 3, feature_channels: int = 46,
                 mid_channels: int = 48, esa_channels: int = 16, num_blocks: int = 4, upscale: int = 4) -> None:
        super().__init__()
        self.upscale = upscale
        self.conv_1 = _conv(in_channels, feature_channels, 3)
        self.num_blocks = num_blocks
        for index in range(1, num_blocks + 1):
            self.add_module(f'block_{index}', RLFB(channels=feature_channels, mid_channels=mid_channels,
                                                   esa_channels=esa_channels))
        self.conv_2 = _conv(feature_channels, feature_channels, 3)
        self.upsampler = nn.Sequential(_conv(feature_channels, out_channels * upscale**2, 3), nn.PixelShuffle(upscale))

    def forward(self, x: Tensor) -> Tensor:
        shallow = self.conv_1(x)
        features = shallow
        for index in range(1, self.num_blocks + 1):
            features = getattr(self, f'block_{index}')(features)
        return self.upsampler(self.conv_2(features) + shallow)
