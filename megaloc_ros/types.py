"""The vocabulary shared by the core, the nodes, the CLI and the evaluation.

One type per idea:
  KeyframeId    int, unique within a map (uint64 on the wire)
  Descriptor    float32 [D] L2-normalised global descriptor (``as_descriptor`` checks one)
  Keyframe      metadata of one map entry
  ImageFeatures what the encoder returns for one image
  Candidate     a putative loop from global retrieval
  RelativePose  query camera pose in the match camera frame
  VerifiedLoop  a candidate after verification (accepted or not, and why)
Stamps are integer nanoseconds (``stamp_ns``, ``SECOND_NS`` to a second) everywhere; poses are
4x4 float64 matrices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from megaloc_ros.errors import DescriptorSizeError

KeyframeId = int
Descriptor = np.ndarray
SECOND_NS = 1_000_000_000  # stamps are integer nanoseconds


def as_descriptor(x, dim: int) -> Descriptor:
    """Return ``x`` as a contiguous float32 [dim] unit vector, or raise DescriptorSizeError."""
    d = np.asarray(x, dtype=np.float32).reshape(-1)
    if d.shape[0] != dim:
        raise DescriptorSizeError(f"descriptor has {d.shape[0]} values, this map holds {dim}-D descriptors")
    if not np.all(np.isfinite(d)):
        raise DescriptorSizeError("descriptor contains NaN or Inf")
    n = float(np.linalg.norm(d))
    if n == 0.0:
        raise DescriptorSizeError("descriptor is all zeros")
    return np.ascontiguousarray(d / n, dtype=np.float32)


@dataclass
class Keyframe:
    id: KeyframeId
    stamp_ns: int
    session: int = 0
    frame_id: str = ""
    pose: Optional[np.ndarray] = None  # 4x4 world-from-camera, when odometry is known


@dataclass
class ImageFeatures:
    descriptor: Descriptor                       # [D]
    patch_features: Optional[np.ndarray] = None  # [h, w, C] dense backbone tokens, if exported


@dataclass
class Candidate:
    query: Keyframe
    match: Keyframe
    score: float  # global-descriptor cosine similarity
    rank: int     # 0 = best match of this query


@dataclass
class RelativePose:
    rotation: np.ndarray      # 3x3, query camera orientation in the match camera frame
    translation: np.ndarray   # (3,), unit direction unless metric_scale
    metric_scale: bool = False
    covariance: np.ndarray = field(default_factory=lambda: np.zeros((6, 6)))


@dataclass
class VerifiedLoop:
    candidate: Candidate
    accepted: bool
    verification_score: float = 0.0  # SegVLAD similarity-weighted vote
    inliers: int = 0
    transform: Optional[RelativePose] = None
    reason: str = ""                 # why accepted or rejected, for logs and ~/rejected
