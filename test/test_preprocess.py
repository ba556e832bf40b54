"""The numpy preprocessing equals PyTorch's antialiased bilinear resize (the official evaluation's)."""
from __future__ import annotations

import numpy as np
import pytest

from megaloc_ros.encoding.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess, resize_weights
from megaloc_ros.io.images import read_image_file


def torch_preprocess(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """What the encoder computed with torch before (and torchvision's Resize(antialias=True))."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    x = torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)
    if x.shape[1:] != size:
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    m = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - m) / s).numpy()


# the model sizes (downscale), 480x640 and 700x900 (upscale), and one axis each way
SIZES = [(322, 322), (224, 224), (480, 640), (700, 900), (123, 457), (384, 1000), (384, 512)]


@pytest.mark.parametrize("name", ["1.jpg", "42.jpg"])
def test_matches_torch_on_real_images(name):
    img = read_image_file(f"data/rtabmap/{name}")
    assert img.shape[:2] == (384, 512)
    for size in SIZES:
        got = preprocess([img], size)[0]
        ref = torch_preprocess(img, size)
        assert got.shape == ref.shape == (3, *size) and got.dtype == np.float32
        assert np.abs(got - ref).max() < 1e-5, size


def test_weights_are_a_normalised_triangle_filter():
    w = resize_weights(512, 322)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
    assert (w >= 0).all() and (np.count_nonzero(w[1:-1], axis=1) >= 3).all()  # wider than bilinear: no aliasing
    up = resize_weights(322, 700)
    assert (np.count_nonzero(up, axis=1) <= 2).all()  # upscaling: plain bilinear
    np.testing.assert_array_equal(resize_weights(5, 5), np.eye(5, dtype=np.float32))


def test_batch_of_mixed_sizes():
    imgs = [np.full((30, 40, 3), 255, np.uint8), np.zeros((64, 64, 3), np.uint8)]
    out = preprocess(imgs, (64, 64))
    assert out.shape == (2, 3, 64, 64)
    np.testing.assert_allclose(out[0], ((1 - np.array(IMAGENET_MEAN)) / IMAGENET_STD)[:, None, None]
                               * np.ones((3, 64, 64)), atol=1e-5)
    np.testing.assert_allclose(out[1], (-np.array(IMAGENET_MEAN) / IMAGENET_STD)[:, None, None]
                               * np.ones((3, 64, 64)), atol=1e-6)
