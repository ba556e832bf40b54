"""Image segmentation for SegVLAD: a label map of non-overlapping regions per image.

Default: training-free superpixels (SLIC or Felzenszwalb from scikit-image), computed at a
reduced resolution so that they cost a few ms and need no weights. Optional: SAM / MobileSAM
"automatic masks" from ONNX models the user provides (``SamSegmenter``), turned into the same
kind of label map (each pixel takes the smallest confident mask covering it; uncovered pixels
form their own connected regions), so everything downstream is the same.

A label map is int32 [H, W] with labels 0..S-1, every label present.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from megaloc_ros.errors import ImageDecodeError, WeightsError
from megaloc_ros.io.images import downscale
from megaloc_ros.settings import setting, validate

METHODS = ("slic", "felzenszwalb", "sam")


@dataclass
class SegmentParams:
    """How images are segmented. Defaults suit 640x480-class indoor/outdoor camera images."""
    method: str = setting("slic", "segmentation: slic, felzenszwalb or sam (needs sam_encoder and sam_decoder)",
                          choices=METHODS)
    max_side: int = setting(160, "segment at this longest side (speed: ~5 ms for SLIC)", range=(16, 8192))
    n_segments: int = setting(48, "SLIC target segment count", range=(1, 10000))
    compactness: float = setting(10.0, "SLIC colour/space trade-off", range=(0.0, None))
    fz_scale: float = setting(100.0, "Felzenszwalb scale (larger: larger regions)", range=(0.0, None))
    fz_sigma: float = setting(0.8, "Felzenszwalb Gaussian smoothing sigma", range=(0.0, None))
    min_size_frac: float = setting(0.004, "regions smaller than this fraction of the image are merged",
                                   range=(0.0, 1.0))
    sam_encoder: str = setting("", "SAM/MobileSAM image-encoder ONNX model (method sam)")
    sam_decoder: str = setting("", "the matching SAM/MobileSAM prompt-decoder ONNX model")
    sam_points_per_side: int = setting(12, "SAM prompt grid: points per side", range=(1, 64))

    def __post_init__(self) -> None:
        validate(self, "verifier.segments")


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Make labels 0..S-1 contiguous."""
    _, inv = np.unique(labels, return_inverse=True)
    return inv.reshape(labels.shape).astype(np.int32)


def merge_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Merge every region smaller than ``min_size`` pixels into its most-bordering neighbour."""
    labels = _relabel(labels)
    for _ in range(8):  # a few passes suffice: merged regions only grow
        sizes = np.bincount(labels.ravel())
        small = np.flatnonzero(sizes < min_size)
        if small.size == 0 or sizes.size <= 1:
            break
        # Count 4-neighbour borders between label pairs once per pass.
        a = np.concatenate([labels[:, :-1].ravel(), labels[:-1, :].ravel()])
        b = np.concatenate([labels[:, 1:].ravel(), labels[1:, :].ravel()])
        diff = a != b
        a, b = a[diff], b[diff]
        s = sizes.size
        border = np.bincount(np.concatenate([a * s + b, b * s + a]), minlength=s * s).reshape(s, s)
        target = np.arange(s)
        for r in small[np.argsort(sizes[small])]:
            if border[r].any():
                target[r] = int(np.argmax(border[r]))
        # Resolve chains (r -> t -> u) so each small region lands on a final label.
        for _ in range(s):
            nxt = target[target]
            if np.array_equal(nxt, target):
                break
            target = nxt
        labels = _relabel(target[labels])
    return labels


def segment_image(image_rgb: np.ndarray, params: SegmentParams = SegmentParams(),
                  sam: Optional["SamSegmenter"] = None) -> np.ndarray:
    """Label map of ``image_rgb`` at reduced resolution (longest side ``params.max_side``).

    Returns int32 [h, w] with contiguous labels; scale it to other grids by its shape.
    """
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ImageDecodeError(f"segment_image needs an RGB uint8 HxWx3 image, got "
                               f"{image_rgb.dtype} {image_rgb.shape}")
    small = downscale(image_rgb, params.max_side)
    if params.method == "slic":
        from skimage.segmentation import slic
        labels = slic(small, n_segments=params.n_segments, compactness=params.compactness,
                      start_label=0, enforce_connectivity=True)
    elif params.method == "felzenszwalb":
        from skimage.segmentation import felzenszwalb
        labels = felzenszwalb(small, scale=params.fz_scale, sigma=params.fz_sigma,
                              min_size=max(4, int(params.min_size_frac * small.shape[0] * small.shape[1])))
    elif params.method == "sam":
        if sam is None:
            sam = SamSegmenter(params.sam_encoder, params.sam_decoder, params.sam_points_per_side)
        # SAM resizes to 1024 itself: give it the full image, then bring the labels down
        labels = cv2.resize(sam.labels(image_rgb).astype(np.int32), (small.shape[1], small.shape[0]),
                            interpolation=cv2.INTER_NEAREST)
    else:
        raise ValueError(f"unknown segmentation method {params.method!r}; use one of {METHODS}")
    return merge_small(labels, max(1, int(params.min_size_frac * labels.size)))


class SamSegmenter:
    """SAM / MobileSAM automatic masks from the two ONNX models of the official export.

    ``encoder``: image [1, 3, 1024, 1024] float32 (normalised, longest side resized to 1024,
    zero-padded) -> image embeddings [1, 256, 64, 64]. ``decoder``: the ``segment_anything``
    ONNX export (inputs image_embeddings, point_coords, point_labels, mask_input,
    has_mask_input, orig_im_size; outputs masks, iou_predictions, low_res_masks).
    One positive point per grid cell is decoded; masks with predicted IoU below
    ``min_iou`` or stability below ``min_stability`` are dropped.
    """

    INPUT = 1024
    MEAN = np.array([123.675, 116.28, 103.53], np.float32)
    STD = np.array([58.395, 57.12, 57.375], np.float32)

    def __init__(self, encoder: str, decoder: str, points_per_side: int = 12,
                 min_iou: float = 0.8, min_stability: float = 0.85):
        import onnxruntime as ort
        for p in (encoder, decoder):
            if not p or not Path(p).is_file():
                raise WeightsError(f"SAM ONNX model {p!r} not found: export the SAM/MobileSAM "
                                   "encoder and decoder to ONNX and set sam_encoder/sam_decoder")
        providers = ["CPUExecutionProvider"]
        self.enc = ort.InferenceSession(str(encoder), providers=providers)
        self.dec = ort.InferenceSession(str(decoder), providers=providers)
        names = {i.name for i in self.dec.get_inputs()}
        need = {"image_embeddings", "point_coords", "point_labels", "mask_input",
                "has_mask_input", "orig_im_size"}
        if not need <= names:
            raise WeightsError(f"{decoder} is not a SAM prompt decoder export: inputs {sorted(names)}, "
                               f"expected {sorted(need)}")
        self.points_per_side = points_per_side
        self.min_iou = min_iou
        self.min_stability = min_stability

    def masks(self, image_rgb: np.ndarray) -> list[np.ndarray]:
        """Confident boolean masks [H, W] of ``image_rgb``."""
        h, w = image_rgb.shape[:2]
        s = self.INPUT / max(h, w)
        nh, nw = round(h * s), round(w * s)
        x = (cv2.resize(image_rgb, (nw, nh)).astype(np.float32) - self.MEAN) / self.STD
        pad = np.zeros((self.INPUT, self.INPUT, 3), np.float32)
        pad[:nh, :nw] = x
        emb = self.enc.run(None, {self.enc.get_inputs()[0].name: pad.transpose(2, 0, 1)[None]})[0]
        n = self.points_per_side
        g = (np.arange(n) + 0.5) / n
        out = []
        for py in g:
            for px in g:
                # A positive point plus the padding point (label -1) the export expects.
                coords = np.array([[[px * w * s, py * h * s], [0.0, 0.0]]], np.float32)
                feed = {"image_embeddings": emb, "point_coords": coords,
                        "point_labels": np.array([[1, -1]], np.float32),
                        "mask_input": np.zeros((1, 1, 256, 256), np.float32),
                        "has_mask_input": np.zeros(1, np.float32),
                        "orig_im_size": np.array([h, w], np.float32)}
                logits, iou = self.dec.run(["masks", "iou_predictions"], feed)[:2]
                best = int(np.argmax(iou[0]))
                lg = logits[0, best]
                hi, lo = np.count_nonzero(lg > 1.0), np.count_nonzero(lg > -1.0)
                stability = hi / lo if lo else 0.0
                if iou[0, best] >= self.min_iou and stability >= self.min_stability:
                    out.append(lg > 0.0)
        return out

    def labels(self, image_rgb: np.ndarray) -> np.ndarray:
        """Label map: smallest covering mask wins; uncovered pixels form connected regions."""
        h, w = image_rgb.shape[:2]
        masks = sorted(self.masks(image_rgb), key=lambda m: -int(m.sum()))
        labels = np.full((h, w), -1, np.int64)
        for i, m in enumerate(masks):  # largest first, so smaller masks overwrite
            labels[m] = i
        rest = (labels < 0).astype(np.uint8)
        if rest.any():
            n, cc = cv2.connectedComponents(rest, connectivity=4)
            labels[rest > 0] = len(masks) + cc[rest > 0]
        return _relabel(labels)
