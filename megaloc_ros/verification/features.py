"""Local features at a detection scale that adapts to the image size.

``extract`` detects on a grey image whose longest side is brought into
[``min_side``, ``max_side``]: large images are downscaled (speed), small ones upsampled by
bicubic interpolation, because SIFT/ORB find only a handful of keypoints on a 160x120 frame
(median 5 tentative matches on the corridor set) and XFeat's 8x8 cells leave 300 of them at that
size. Interpolation lowers local contrast (the upsampled image is smoother), so SIFT's contrast
threshold is scaled by the detection scale's shrink of the difference-of-Gaussians response,
``1 / upscale`` (at most down to ``contrast / 4``). Keypoints are always returned in the pixel
frame of the image as given, so the intrinsics and the RANSAC residuals stay in those pixels.

Kinds: "sift" (128 B uint8 descriptors), "orb" (32 B binary), "xfeat" (64-D float descriptors
from XFeat, Potje et al. CVPR 2024, run by ONNX Runtime: ``megaloc_ros.verification.xfeat``,
stored as int8: 64 B).
"""
from __future__ import annotations

import cv2
import numpy as np

from megaloc_ros.verification.geometry import LocalFeatures

KINDS = ("sift", "orb", "xfeat")
DESCRIPTOR_BYTES = {"sift": 128, "orb": 32, "xfeat": 64}

_DETECTORS: dict = {}


def detection_scale(image_size: tuple[int, int], max_side: int, min_side: int) -> float:
    """Factor from the image's pixels to the detection image's (w, h) -> s."""
    longest = max(image_size)
    if longest > max_side:
        return max_side / longest
    if longest < min_side:
        return min_side / longest
    return 1.0


def _grey(image_rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY) if image_rgb.ndim == 3 else image_rgb


def resize_for_detection(grey: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return grey
    h, w = grey.shape[:2]
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_CUBIC
    return cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)


def empty(kind: str, size: tuple[int, int]) -> LocalFeatures:
    dt = np.int8 if kind == "xfeat" else np.uint8
    return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, DESCRIPTOR_BYTES[kind]), dt), size)


def extract(image_rgb: np.ndarray, kind: str = "sift", max_keypoints: int = 500,
            max_side: int = 640, contrast: float = 0.02, min_side: int = 480,
            xfeat_model=None) -> LocalFeatures:
    """The ``max_keypoints`` strongest keypoints (module doc for the detection scale)."""
    size = (int(image_rgb.shape[1]), int(image_rgb.shape[0]))
    scale = detection_scale(size, max_side, min_side)
    if kind == "xfeat":
        from megaloc_ros.verification import xfeat
        model = xfeat_model or xfeat.default_model()
        img = image_rgb if scale == 1.0 else cv2.resize(
            image_rgb, (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))),
            interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        pts, desc = model.detect(img, max_keypoints)
        sx, sy = size[0] / img.shape[1], size[1] / img.shape[0]
        pts = (pts * np.array([sx, sy], np.float32)).astype(np.float32)
        return LocalFeatures(pts, xfeat.quantize(desc), size)
    grey = resize_for_detection(_grey(image_rgb), scale)
    c = contrast / min(scale, 4.0) if scale > 1.0 else contrast
    key = (kind, max_keypoints, round(c, 6))
    if key not in _DETECTORS:
        if kind == "sift":
            _DETECTORS[key] = cv2.SIFT_create(nfeatures=max_keypoints, contrastThreshold=c)
        elif kind == "orb":
            _DETECTORS[key] = cv2.ORB_create(nfeatures=max_keypoints, fastThreshold=10)
        else:
            raise ValueError(f"unknown local feature {kind!r}; use one of {KINDS}")
    kps, desc = _DETECTORS[key].detectAndCompute(grey, None)
    if desc is None or len(kps) == 0:
        return empty(kind, size)
    order = np.argsort([-k.response for k in kps], kind="stable")[:max_keypoints]
    sx, sy = size[0] / grey.shape[1], size[1] / grey.shape[0]
    # OpenCV keypoints: pixel centres at integer coordinates in both frames
    pts = np.array([kps[i].pt for i in order], np.float64)
    pts = ((pts + 0.5) * np.array([sx, sy]) - 0.5).astype(np.float32)
    d = desc[order]
    if kind == "sift":
        d = np.clip(np.rint(d), 0, 255).astype(np.uint8)
    return LocalFeatures(pts, np.ascontiguousarray(d), size)


def match(a: LocalFeatures, b: LocalFeatures, ratio: float = 0.8, mutual: bool = True) -> np.ndarray:
    """Tentative matches int [M, 2]: ratio test (a -> b) and mutual nearest neighbours.
    SIFT / ORB: ``geometry.match``; XFeat (int8 descriptors): cosine similarity, the ratio taken
    on Euclidean distances of the unit vectors."""
    from megaloc_ros.verification import geometry
    if a.descriptors.dtype != np.int8 or b.descriptors.dtype != np.int8:
        return geometry.match(a, b, ratio, mutual)
    if len(a.descriptors) < 2 or len(b.descriptors) < 2:
        return np.zeros((0, 2), np.int64)
    sim = (a.descriptors.astype(np.float32) @ b.descriptors.astype(np.float32).T) / (127.0 * 127.0)
    top2 = np.argpartition(-sim, 1, axis=1)[:, :2]
    s2 = np.take_along_axis(sim, top2, axis=1)
    first = np.argmax(s2, axis=1)
    best = top2[np.arange(len(sim)), first]
    d1 = np.sqrt(np.maximum(2 - 2 * s2.max(axis=1), 0))
    d2 = np.sqrt(np.maximum(2 - 2 * s2.min(axis=1), 0))
    keep = d1 < ratio * d2
    if mutual:
        keep &= np.argmax(sim, axis=0)[best] == np.arange(len(sim))
    idx = np.flatnonzero(keep)
    return np.stack([idx, best[idx]], axis=1).astype(np.int64)
