"""Local Attribution Maps (Gu and Dong, "Interpreting Super-Resolution Networks with Local Attribution
Maps", CVPR 2021): which input pixels a super-resolution network uses to reconstruct one output patch.

The quantities follow the authors' public demo code (X-Lowlevel-Vision/LAM_Demo, ``SaliencyModel``):

* Path: progressive Gaussian blurring. Step i of ``steps`` feeds the image blurred with sigma_i, where
  sigma runs linearly from ``sigma`` (the baseline, nearly featureless) down to 0 (the image itself);
  kernels are ``kernel_size`` x ``kernel_size`` isotropic Gaussians (``GaussianBlurPath``).
* Objective: the gradient detector, the sum over the output window of the per-pixel gradient
  magnitude sqrt(dy^2 + dx^2) of forward differences, summed over channels (``attr_grad``).
* Attribution: path-integrated gradients, the mean over steps of grad(objective)(path_i) times the
  path's derivative at step i (``Path_gradient`` then ``saliency_map_PG``); NaN gradients (from
  sqrt at exactly 0) count as 0, as there.
* Map: |sum over colour channels| divided by its maximum (``grad_abs_norm``).
* Diffusion Index: DI = (1 - Gini(map)) * 100, higher meaning more pixels take part (``gini`` and the
  demo's ``diffusion_index``).

Images are RGB in [0, 1]; a network with another input range is wrapped by
:class:`dvmsr_arch.utils.network.RangeAdapter` first.
"""
from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The demo's settings, used for the paper's figures.
DEFAULT_SIGMA = 1.2
DEFAULT_STEPS = 50
DEFAULT_KERNEL_SIZE = 9

Window = Tuple[int, int, int, int]  # x, y, width, height in output pixels


def isotropic_gaussian_kernel(size: int, sigma: float, epsilon: float = 1e-5) -> Tensor:
    """A normalised ``size`` x ``size`` Gaussian; ``epsilon`` keeps sigma = 0 finite (then a unit impulse)."""
    axis = torch.arange(-size // 2 + 1.0, size // 2 + 1.0, dtype=torch.float64)
    yy, xx = torch.meshgrid(axis, axis, indexing='ij')
    kernel = torch.exp(-(xx**2 + yy**2) / (2.0 * (sigma + epsilon)**2))
    return kernel / kernel.sum()


def filter_image(image: Tensor, kernels: Tensor) -> Tensor:
    """Correlate (C, H, W) with each of ``kernels`` (K, k, k): (K, C, H, W), mirrored borders like cv2.filter2D."""
    pad = kernels.shape[-1] // 2
    # 'reflect' mirrors without repeating the edge pixel, OpenCV's default BORDER_REFLECT_101.
    padded = F.pad(image[:, None], (pad, pad, pad, pad), mode='reflect')  # channels as the batch
    return F.conv2d(padded, kernels[:, None].to(image.dtype)).transpose(0, 1)


def gaussian_blur_path(image: Tensor, *, sigma: float = DEFAULT_SIGMA, steps: int = DEFAULT_STEPS,
                       kernel_size: int = DEFAULT_KERNEL_SIZE) -> Tuple[Tensor, Tensor]:
    """Points of the progressive-blurring path and the path's derivative there, each (steps, C, H, W).

    With sigma_j = sigma * (1 - j / steps) and kernel K_j, step i is the image blurred by K_{i+1} (so
    the last step is the image) and its derivative d/d(alpha) is steps * (K_{i+1} - K_i) applied to
    the image; the steps sum exactly to (image - baseline), the baseline being the image blurred by K_0.
    """
    if steps < 1 or kernel_size < 1 or kernel_size % 2 == 0 or sigma <= 0:
        raise ValueError(f'need steps >= 1, an odd kernel_size and sigma > 0; got {steps}, {kernel_size}, {sigma}')
    sigmas = np.linspace(sigma, 0.0, steps + 1)
    kernels = torch.stack([isotropic_gaussian_kernel(kernel_size, s) for s in sigmas])
    image64 = image.to(torch.float64)
    points = filter_image(image64, kernels[1:])
    derivatives = filter_image(image64, (kernels[1:] - kernels[:-1]) * steps)
    return points.to(image.dtype), derivatives.to(image.dtype)


def gradient_detector(output: Tensor, window: Window) -> Tensor:
    """(B,) sum over ``window`` and channels of sqrt(dy^2 + dx^2), forward differences of (B, C, H, W)."""
    x, y, width, height = window
    dy = output[:, :, :-1, :-1] - output[:, :, 1:, :-1]
    dx = output[:, :, :-1, :-1] - output[:, :, :-1, 1:]
    magnitude = torch.sqrt(dy**2 + dx**2)
    return magnitude[:, :, y:y + height, x:x + width].sum(dim=(1, 2, 3))


def check_window(window: Window, output_size: Tuple[int, int]) -> None:
    x, y, width, height = window
    out_h, out_w = output_size
    # The gradient detector reads one pixel past the window, so the window must stop one short of the edge.
    if width < 1 or height < 1 or x < 0 or y < 0 or x + width > out_w - 1 or y + height > out_h - 1:
        raise ValueError(f'window x={x} y={y} w={width} h={height} must lie inside the {out_w - 1}x{out_h - 1} '
                         f'gradient map of the {out_w}x{out_h} output')


def path_attribution(model: Callable[[Tensor], Tensor], image: Tensor, window: Window, *,
                     objective: Callable[[Tensor, Window], Tensor] = gradient_detector,
                     sigma: float = DEFAULT_SIGMA, steps: int = DEFAULT_STEPS,
                     kernel_size: int = DEFAULT_KERNEL_SIZE, batch_size: int = 1,
                     device: torch.device = torch.device('cpu')) -> Tuple[Tensor, Tensor]:
    """Attribution (C, H, W) of ``objective(model(.), window)`` to each input pixel, and the output for ``image``.

    ``image`` is (C, H, W) in [0, 1] on the CPU; ``batch_size`` path steps go through the network together
    (the results do not depend on it).
    """
    points, derivatives = gaussian_blur_path(image.cpu(), sigma=sigma, steps=steps, kernel_size=kernel_size)
    total = torch.zeros_like(image, dtype=torch.float64)
    output = None
    for start in range(0, steps, batch_size):
        batch = points[start:start + batch_size].to(device).requires_grad_(True)
        result = model(batch)
        if start == 0:
            check_window(window, result.shape[-2:])
        (grad,) = torch.autograd.grad(objective(result, window).sum(), batch)
        grad = torch.nan_to_num(grad.detach().cpu().double(), nan=0.0)
        total += (grad * derivatives[start:start + batch_size].double()).sum(dim=0)
        output = result[-1].detach().cpu()  # the last step is the image itself
    return (total / steps).to(image.dtype), output


def attribution_map(attribution: Tensor) -> Tensor:
    """(H, W) map in [0, 1]: |sum over channels| over its maximum (all zeros stays all zeros)."""
    summed = attribution.sum(dim=0).abs()
    peak = summed.max()
    return summed / peak if peak > 0 else summed


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values (shifted up if any is negative; 1e-7 added so none is 0)."""
    array = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if array[0] < 0:
        array = array - array[0]
    array = array + 1e-7
    n = array.size
    index = np.arange(1, n + 1)
    return float(np.sum((2 * index - n - 1) * array) / (n * np.sum(array)))


def diffusion_index(attribution_map_: np.ndarray) -> float:
    """DI = (1 - Gini) * 100: near 0 when a few pixels carry the attribution, larger when many share it."""
    return (1.0 - gini(attribution_map_)) * 100.0


@dataclass
class LocalAttribution:
    """What :func:`local_attribution_map` finds.

    Attributes:
        attribution: (C, H, W) path-integrated gradients on the input.
        map: (H, W) |attribution summed over channels|, scaled to [0, 1].
        diffusion_index: (1 - Gini(map)) * 100.
        output: (C, sH, sW) the network's output for the input itself.
    """
    attribution: Tensor
    map: Tensor
    diffusion_index: float
    output: Tensor


def local_attribution_map(model: Callable[[Tensor], Tensor], image: Tensor, window: Window, *,
                          sigma: float = DEFAULT_SIGMA, steps: int = DEFAULT_STEPS,
                          kernel_size: int = DEFAULT_KERNEL_SIZE, batch_size: int = 1,
                          device: torch.device = torch.device('cpu')) -> LocalAttribution:
    """LAM of ``model`` for ``image`` (C, H, W) in [0, 1] and an output ``window`` (x, y, w, h)."""
    attribution, output = path_attribution(model, image, window, sigma=sigma, steps=steps, kernel_size=kernel_size,
                                           batch_size=batch_size, device=device)
    heat = attribution_map(attribution)
    return LocalAttribution(attribution, heat, diffusion_index(heat.numpy()), output)
