"""Reading and writing the images a user brings: 8- or 16-bit, grayscale, RGB or RGBA.

Networks see RGB float images in [0, 1]. :func:`read_image` keeps what is needed to give the result
back in the input's own form: a grayscale image comes back grayscale, an alpha channel is kept, and
16-bit input gives 16-bit output.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import cv2
import numpy as np
import torch
from torch import Tensor

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
_MAX_VALUE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


class ImageReadError(ValueError):
    """The file is missing, not an image, corrupt, or of a pixel type this tool does not handle."""


@dataclass
class LoadedImage:
    """An image as the network needs it, plus what it takes to write the result back alike.

    Attributes:
        rgb: (H, W, 3) float32 RGB in [0, 1]; a grayscale image is replicated to three channels.
        alpha: (H, W) float32 in [0, 1], or None when the file has no alpha channel.
        grayscale: The file stores one colour channel.
        bit_depth: 8 or 16, the bits per channel in the file.
    """
    rgb: np.ndarray
    alpha: Optional[np.ndarray]
    grayscale: bool
    bit_depth: int


def list_images(folder: Path) -> list:
    """Files in ``folder`` (not recursive) whose suffix is an image format, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: Union[str, Path]) -> LoadedImage:
    path = Path(path)
    try:
        data = np.fromfile(str(path), dtype=np.uint8)  # unlike cv2.imread, any path on any OS
    except OSError as error:
        raise ImageReadError(f'{path}: cannot open ({error.strerror})') from None
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ImageReadError(f'{path}: not a readable image (corrupt or unknown format)')
    if image.dtype not in _MAX_VALUE:
        raise ImageReadError(f'{path}: pixel type {image.dtype} is not supported (use 8- or 16-bit)')
    values = image.astype(np.float32) / _MAX_VALUE[image.dtype]
    bit_depth = 16 if image.dtype == np.uint16 else 8
    if values.ndim == 2:
        return LoadedImage(np.repeat(values[..., None], 3, axis=2), None, True, bit_depth)
    channels = values.shape[2]
    if channels == 1:
        return LoadedImage(np.repeat(values, 3, axis=2), None, True, bit_depth)
    if channels == 3:
        return LoadedImage(cv2.cvtColor(values, cv2.COLOR_BGR2RGB), None, False, bit_depth)
    if channels == 4:
        return LoadedImage(cv2.cvtColor(values[..., :3], cv2.COLOR_BGR2RGB), values[..., 3], False, bit_depth)
    raise ImageReadError(f'{path}: {channels} channels are not supported (use 1, 3 or 4)')


def upscale_alpha(alpha: np.ndarray, size: tuple) -> np.ndarray:
    """Alpha is not a colour: it is resized by bicubic interpolation, not by the network."""
    height, width = size
    return np.clip(cv2.resize(alpha, (width, height), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


def write_image(path: Union[str, Path], rgb: np.ndarray, *, alpha: Optional[np.ndarray] = None,
                grayscale: bool = False, bit_depth: int = 8) -> None:
    """Write (H, W, 3) float RGB in [0, 1] (plus optional alpha) as PNG, JPEG, ... by the suffix.

    A grayscale result is the BT.601 luma of the RGB output, so the three channels that the network
    made from one are folded back into one.
    """
    path = Path(path)
    rgb = np.clip(rgb, 0.0, 1.0).astype(np.float32)
    if grayscale:
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if alpha is not None:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    else:
        pixels = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if alpha is not None:
        pixels = np.dstack([pixels, np.clip(alpha, 0.0, 1.0)])
    dtype = np.uint16 if bit_depth == 16 else np.uint8
    pixels = np.round(pixels * _MAX_VALUE[np.dtype(dtype)]).astype(dtype)
    ok, encoded = cv2.imencode(path.suffix or '.png', pixels)
    if not ok:
        raise OSError(f'{path}: could not encode the image')
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded.tofile(str(path))


def image_to_tensor(rgb: np.ndarray) -> Tensor:
    """(H, W, 3) float RGB -> (1, 3, H, W) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float().unsqueeze(0)


def tensor_to_image(tensor: Tensor) -> np.ndarray:
    """(1, 3, H, W) tensor -> (H, W, 3) float32 RGB, not clipped."""
    return tensor.detach().squeeze(0).float().cpu().numpy().transpose(1, 2, 0)


def rgb_to_uint8_bgr(rgb: np.ndarray) -> np.ndarray:
    """The layout BasicSR's metrics expect: (H, W, 3) uint8 BGR, rounded as BasicSR's tensor2img rounds."""
    return cv2.cvtColor(np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8), cv2.COLOR_RGB2BGR)
