"""Image preprocessing identical to the official MegaLoc evaluation.

RGB uint8 -> float in [0, 1] -> bilinear antialiased resize to the model input size (what
torchvision's ``Resize(antialias=True)`` does on tensors) -> ImageNet mean/std, NCHW float32.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

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


def preprocess(images: Sequence[np.ndarray], size: tuple[int, int],
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """RGB uint8 images of any sizes -> [B, 3, size[0], size[1]] float32, normalised."""
    h, w = size
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    out = np.empty((len(images), 3, h, w), np.float32)
    with torch.no_grad():
        for i, img in enumerate(images):
            x = torch.from_numpy(np.ascontiguousarray(check_rgb(img))).permute(2, 0, 1).float().div_(255.0)
            if x.shape[1:] != (h, w):
                x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
            out[i] = ((x - m) / s).numpy()
    return out
