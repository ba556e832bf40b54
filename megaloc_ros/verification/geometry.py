"""Two-view geometric verification: local features, matching, RANSAC, relative pose.

Local features (extracted by ``features.extract``) are SIFT (descriptors stored as uint8, which loses nothing:
OpenCV's SIFT values are integers 0..255) or ORB. Matching keeps pairs that pass Lowe's ratio
test in the query->match direction AND are mutual nearest neighbours. RANSAC fits an essential
matrix when the intrinsics are known (then the relative rotation and the translation direction
follow from ``cv2.recoverPose``), else a fundamental matrix (inliers only, no pose).
Both use OpenCV's USAC (RANSAC with local optimisation), falling back to plain RANSAC.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from megaloc_ros.types import RelativePose


@dataclass
class LocalFeatures:
    """Keypoints (x, y) in pixels of the image they came from, and their descriptors."""
    keypoints: np.ndarray    # float32 [N, 2]
    descriptors: np.ndarray  # uint8 [N, 128] (SIFT) or [N, 32] (ORB, binary)
    image_size: tuple[int, int]  # (width, height) of the image the keypoints refer to

    @property
    def nbytes(self) -> int:
        return self.keypoints.nbytes + self.descriptors.nbytes


def _rootsift(d: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman 2012): L1-normalise, sqrt; Euclidean = Hellinger."""
    d = d.astype(np.float32)
    d /= np.maximum(d.sum(axis=1, keepdims=True), 1e-6)
    return np.sqrt(d)


def match(a: LocalFeatures, b: LocalFeatures, ratio: float = 0.8,
          mutual: bool = True) -> np.ndarray:
    """Index pairs int [M, 2] (into a, into b) passing the ratio test (a->b) and mutual check."""
    if len(a.descriptors) < 2 or len(b.descriptors) < 2:
        return np.zeros((0, 2), np.int64)
    if a.descriptors.shape[1] == 32:  # ORB: Hamming distances
        m = cv2.BFMatcher(cv2.NORM_HAMMING)
        da, db = a.descriptors, b.descriptors
    else:
        m = cv2.BFMatcher(cv2.NORM_L2)
        da, db = _rootsift(a.descriptors), _rootsift(b.descriptors)
    fwd = m.knnMatch(da, db, k=2)
    pairs = [(x[0].queryIdx, x[0].trainIdx) for x in fwd
             if len(x) == 2 and x[0].distance < ratio * x[1].distance]
    if not pairs:
        return np.zeros((0, 2), np.int64)
    pairs = np.array(pairs, np.int64)
    if mutual:
        back = m.match(db, da)
        best_a = np.full(len(db), -1, np.int64)
        for x in back:
            best_a[x.queryIdx] = x.trainIdx
        pairs = pairs[best_a[pairs[:, 1]] == pairs[:, 0]]
    return pairs


@dataclass
class TwoViewResult:
    inliers: int
    matches: int
    pose: Optional[RelativePose]  # None without intrinsics or when RANSAC failed


# sensor_msgs/CameraInfo distortion models this package undistorts keypoints for, and how many
# coefficients each takes (OpenCV's order: k1 k2 p1 p2 k3 [k4 k5 k6]; fisheye k1 k2 k3 k4)
DISTORTION_MODELS = {"plumb_bob": (4, 5), "rational_polynomial": (8,), "equidistant": (4,)}


@dataclass(frozen=True)
class Distortion:
    """Lens distortion as sensor_msgs/CameraInfo gives it: ``model`` (``DISTORTION_MODELS``) and
    its coefficients ``d``. They act on normalised image coordinates, so they hold for the camera
    at any image size (only the intrinsics are rescaled)."""
    model: str
    d: tuple

    def __post_init__(self) -> None:
        if self.model not in DISTORTION_MODELS:
            raise ValueError(f"distortion model {self.model!r} is not supported (supported: "
                             f"{', '.join(DISTORTION_MODELS)})")
        if len(self.d) not in DISTORTION_MODELS[self.model]:
            raise ValueError(f"distortion model {self.model} takes "
                             f"{' or '.join(map(str, DISTORTION_MODELS[self.model]))} coefficients, got {len(self.d)}")
        object.__setattr__(self, "d", tuple(float(x) for x in self.d))

    @classmethod
    def from_camera_info(cls, model: str, d) -> Optional["Distortion"]:
        """None when there is none to undo (no model, or all coefficients zero); ValueError for a
        model this package does not undistort."""
        d = [float(x) for x in d]
        if not any(d):
            return None
        if not model:
            raise ValueError(f"distortion coefficients {d} without a distortion model")
        return cls(model, tuple(d))

    def saved(self) -> list:
        """[model, coefficients], for JSON (``from_saved`` reads it back)."""
        return [self.model, list(self.d)]

    @classmethod
    def from_saved(cls, saved) -> Optional["Distortion"]:
        return None if not saved else cls(saved[0], tuple(saved[1]))

    def undistort(self, xy: np.ndarray, K: np.ndarray) -> np.ndarray:
        """Pixel positions [N, 2] of the distorted image -> where an ideal pinhole camera with the
        same ``K`` would see them (NaN where the model has no inverse, beyond a fisheye's 90 deg)."""
        pts = np.asarray(xy, np.float64).reshape(-1, 1, 2)
        if not len(pts):
            return np.zeros((0, 2), np.float64)
        K = np.asarray(K, np.float64)
        D = np.asarray(self.d, np.float64)
        if self.model == "equidistant":
            out = cv2.fisheye.undistortPoints(pts, K, D, P=K)
        else:  # OpenCV's default 5 iterations leave pixels of error at a wide lens's edge
            out = cv2.undistortPoints(pts, K, D, P=K, criteria=_UNDISTORT_CRITERIA)
        return out.reshape(-1, 2)


_UNDISTORT_CRITERIA = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-9)


@dataclass(frozen=True, eq=False)
class Camera:
    """One camera as sensor_msgs/CameraInfo describes it: intrinsics ``K`` (3x3) calibrated for
    images of ``size`` (w, h; None: valid for the images as they are given) and its lens
    ``distortion`` (None: an ideal pinhole)."""
    K: np.ndarray
    size: Optional[tuple[int, int]] = None
    distortion: Optional[Distortion] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "K", np.asarray(self.K, np.float64).reshape(3, 3).copy())
        if self.size is not None:
            object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))

    def intrinsics(self, size: tuple[int, int]) -> np.ndarray:
        """``K`` for an image of (w, h) ``size`` (the same camera, resized)."""
        if self.size is None or tuple(size) == self.size:
            return self.K
        return scale_intrinsics(self.K, self.size, size)

    def __eq__(self, other) -> bool:
        return (isinstance(other, Camera) and np.array_equal(self.K, other.K) and self.size == other.size
                and self.distortion == other.distortion)

    def __str__(self) -> str:
        size = "" if self.size is None else f" for {self.size[0]}x{self.size[1]} images"
        return (f"fx {self.K[0, 0]:.1f} fy {self.K[1, 1]:.1f}{size}, distortion "
                f"{'none' if self.distortion is None else self.distortion.model}")


def camera_from_info(k, width: int, height: int, distortion_model: str = "", d=()) -> Optional[Camera]:
    """The ``Camera`` of sensor_msgs/CameraInfo's fields; None when the message carries no
    intrinsics (K or size zero); ValueError for a distortion model this package cannot undo."""
    K = np.asarray(k, np.float64).reshape(3, 3)
    if K[0, 0] <= 0 or K[1, 1] <= 0 or not width or not height:
        return None
    return Camera(K, (int(width), int(height)), Distortion.from_camera_info(distortion_model, d))


def scale_intrinsics(K: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """``K`` calibrated at (w, h) ``from_size`` -> the same camera at ``to_size``."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return np.diag([sx, sy, 1.0]) @ np.asarray(K, np.float64)


# m^2 on each translation axis of a loop whose translation is a unit direction: a two-view pose
# has no scale, so a back end that reads the covariance and not ``metric_scale`` must give the
# translation no weight (a tight one would pull the two keyframes 1 m apart).
UNKNOWN_SCALE_VARIANCE = 1e6


def pose_covariance(inliers: int, focal_px: float, pixel_sigma: float = 1.0) -> np.ndarray:
    """Rough 6x6 covariance (x y z rx ry rz) of a two-view pose from ``inliers`` correspondences:
    angular std ~ pixel_sigma / focal / sqrt(inliers) on each rotation axis, and
    ``UNKNOWN_SCALE_VARIANCE`` on each translation axis (a unit direction has no scale)."""
    var = (pixel_sigma / max(focal_px, 1e-6)) ** 2 / max(inliers, 1)
    return scale_unknown(np.diag([0.0] * 3 + [var] * 3))


def scale_unknown(covariance: np.ndarray) -> np.ndarray:
    """A 6x6 pose covariance (x y z rx ry rz) for a translation that is only a direction: the
    rotation block kept, ``UNKNOWN_SCALE_VARIANCE`` on each translation axis, no cross terms."""
    cov = np.array(covariance, np.float64)
    cov[:3, :] = 0.0
    cov[:, :3] = 0.0
    cov[:3, :3] = np.eye(3) * UNKNOWN_SCALE_VARIANCE
    return cov


def _robust(fit, a, b, threshold, confidence, max_iters, fallback, ransac_first=False):
    """OpenCV's USAC (local optimisation: several times more accurate than plain RANSAC on the
    synthetic two-view test) with plain RANSAC as the fallback when USAC fails on degenerate
    data. ``ransac_first`` swaps the argument order to findFundamentalMat's."""
    for method in (cv2.USAC_DEFAULT, fallback):
        try:
            if ransac_first:
                return fit(a, b, method, threshold, confidence, max_iters)
            return fit(a, b, method, confidence, threshold, max_iters)
        except cv2.error:
            continue
    return None, None


def verify_pair(query: LocalFeatures, match_: LocalFeatures, K_query: Optional[np.ndarray] = None,
                K_match: Optional[np.ndarray] = None, ratio: float = 0.8, mutual: bool = True,
                threshold_px: float = 2.0, confidence: float = 0.999,
                max_iters: int = 2000) -> TwoViewResult:
    """Match, then RANSAC. With intrinsics (pixels of each image's keypoint frame): essential
    matrix + pose of the query camera in the match camera frame; without: fundamental matrix."""
    pairs = match(query, match_, ratio, mutual)
    n = len(pairs)
    if n < 8:
        return TwoViewResult(0, n, None)
    pq = query.keypoints[pairs[:, 0]].astype(np.float64)
    pm = match_.keypoints[pairs[:, 1]].astype(np.float64)
    if K_query is None or K_match is None:
        F, mask = _robust(cv2.findFundamentalMat, pq, pm, threshold_px, confidence, max_iters,
                          fallback=cv2.FM_RANSAC, ransac_first=True)
        return TwoViewResult(int(mask.sum()) if F is not None and mask is not None else 0, n, None)
    # Normalised coordinates let one essential-matrix fit serve two different cameras.
    nq = cv2.undistortPoints(pq.reshape(-1, 1, 2), K_query, None).reshape(-1, 2)
    nm = cv2.undistortPoints(pm.reshape(-1, 1, 2), K_match, None).reshape(-1, 2)
    f = 0.5 * (K_query[0, 0] + K_match[0, 0])
    E, mask = _robust(lambda a, b, *r: cv2.findEssentialMat(a, b, np.eye(3), *r), nq, nm,
                      threshold_px / f, confidence, max_iters, fallback=cv2.RANSAC)
    if E is None or mask is None or E.shape != (3, 3):
        return TwoViewResult(0, n, None)
    inl = int(mask.sum())
    # recoverPose with points (query, match): X_match = R X_query + t, i.e. R and t are the
    # orientation and position of the query camera in the match camera frame.
    _, R, t, pose_mask = cv2.recoverPose(E, nq, nm, np.eye(3), mask=mask.copy())
    t = t.reshape(3)
    t = t / max(np.linalg.norm(t), 1e-12)
    pose = RelativePose(rotation=R, translation=t, metric_scale=False,
                        covariance=pose_covariance(inl, f))
    return TwoViewResult(inl, n, pose)
