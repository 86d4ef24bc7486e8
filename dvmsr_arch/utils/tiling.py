"""Super-resolve an image of any size one tile at a time.

The image stays on the CPU; each tile, grown by ``tile_pad`` pixels of context on every side (less
at the image border), goes to the device alone, and only its centre is kept in the output. Every
output pixel comes from exactly one tile.

DVMSR scans each tile's pixels as one sequence, so a tile sees less context than the whole image and
the tiled output is close to, not equal to, the whole-image output (see docs/usage.md for measured
PSNR).
"""
import math
from typing import Callable, List, Tuple

import torch
from torch import Tensor


def split_1d(length: int, tile: int) -> List[Tuple[int, int]]:
    """Cut [0, length) into ceil(length / tile) near-equal pieces of at most ``tile`` (no sliver at the end)."""
    count = math.ceil(length / tile)
    bounds = [round(i * length / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


@torch.no_grad()
def upscale(model: Callable[[Tensor], Tensor], image: Tensor, *, scale: int, tile: int = 0, tile_pad: int = 16,
            device: torch.device = torch.device('cpu'), dtype: torch.dtype = torch.float32) -> Tensor:
    """Run ``model`` on ``image`` (1, C, H, W) whole or by tiles; returns (1, C_out, sH, sW) float32 on the CPU.

    Args:
        model: Maps (1, C, h, w) to (1, C_out, scale*h, scale*w) on ``device``.
        image: The input, on the CPU.
        scale: The model's scale factor.
        tile: Largest tile side in input pixels; 0 runs the whole image at once.
        tile_pad: Context added around each tile, in input pixels, cut away from its output.
        device: Where the model runs.
        dtype: The precision the model runs in.
    """
    if tile < 0 or tile_pad < 0:
        raise ValueError(f'tile={tile} and tile_pad={tile_pad} must not be negative')
    height, width = image.shape[-2:]
    if tile == 0 or (height <= tile and width <= tile):
        return model(image.to(device, dtype)).float().cpu()
    output = None
    for top, bottom in split_1d(height, tile):
        for left, right in split_1d(width, tile):
            in_top, in_left = max(top - tile_pad, 0), max(left - tile_pad, 0)
            in_bottom, in_right = min(bottom + tile_pad, height), min(right + tile_pad, width)
            piece = model(image[..., in_top:in_bottom, in_left:in_right].to(device, dtype)).float().cpu()
            if output is None:
                output = image.new_empty(1, piece.shape[1], height * scale, width * scale, dtype=torch.float32)
            crop_top, crop_left = (top - in_top) * scale, (left - in_left) * scale
            output[..., top * scale:bottom * scale, left * scale:right * scale] = piece[
                ..., crop_top:crop_top + (bottom - top) * scale, crop_left:crop_left + (right - left) * scale]
    return output
