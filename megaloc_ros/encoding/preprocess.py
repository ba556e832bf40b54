"""Image preprocessing identical to the official MegaLoc evaluation, in numpy (no torch).

RGB uint8 -> float in [0, 1] -> bilinear antialiased resize to the model input size (what
torchvision's ``Resize(antialias=True)``, i.e. ``F.interpolate(mode="bilinear",
align_corners=False, antialias=True)``, computes on tensors) -> ImageNet mean/std, NCHW float32.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from megaloc_ros.errors import ImageDecodeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_rgb(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ImageDecodeError(f"expected an RGB image HxWx3, got {shape}")
    if image.dtype != np.uint8:
        raise ImageDecodeError(f"expected a uint8 RGB image, got dtype {image.dtype}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ImageDecodeError(f"image of {image.shape[1]}x{image.shape[0]} px is too small")
    return image


@lru_cache(maxsize=32)
def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 matrix of PyTorch's antialiased bilinear resize along one axis.

    As PIL and ``upsample_bilinear2d_aa``: output pixel i, centred at ``scale * (i + 0.5)`` in the
    input (``scale = in/out``), takes a triangle filter whose support widens by ``scale`` when
    downscaling (every input pixel contributes: no aliasing), clipped at the borders and
    normalised to sum 1; upscaling is plain bilinear with renormalised borders. Computed in
    float32 as PyTorch does, so the weights agree to the last bit or two."""
    f = np.float32
    scale = f(in_size) / f(out_size)
    support = scale if scale >= 1.0 else f(1.0)  # bilinear: half-width 1, stretched by the scale
    inv = f(1.0) / scale if scale >= 1.0 else f(1.0)
    w = np.zeros((out_size, in_size), f)
    for i in range(out_size):
        center = scale * f(i + 0.5)
        lo = max(int(center - support + f(0.5)), 0)
        hi = min(int(center + support + f(0.5)), in_size)
        k = np.maximum(f(0.0), f(1.0) - np.abs((np.arange(lo, hi, dtype=f) - center + f(0.5)) * inv))
        total = k.sum(dtype=f)
        w[i, lo:hi] = k / total if total else k
    return w


def resize_bilinear_aa(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Float [H, W, C] -> [C, h, w] float32, antialiased bilinear (``resize_weights``): two
    matrix products, along the width first as PyTorch does."""
    wy = resize_weights(image.shape[0], size[0])
    wx = resize_weights(image.shape[1], size[1])
    chw = np.ascontiguousarray(np.asarray(image, np.float32).transpose(2, 0, 1))
    return np.matmul(wy, np.matmul(chw, wx.T))


def preprocess(images: Sequence[np.ndarray], size: tuple[int, int],
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """RGB uint8 images of any sizes -> [B, 3, size[0], size[1]] float32, normalised."""
    h, w = size
    m = np.asarray(mean, np.float32).reshape(3, 1, 1)
    s = np.asarray(std, np.float32).reshape(3, 1, 1)
    out = np.empty((len(images), 3, h, w), np.float32)
    for i, img in enumerate(images):
        x = check_rgb(img).astype(np.float32) / np.float32(255.0)
        chw = resize_bilinear_aa(x, size) if x.shape[:2] != (h, w) else x.transpose(2, 0, 1)
        out[i] = (chw - m) / s
    return out
