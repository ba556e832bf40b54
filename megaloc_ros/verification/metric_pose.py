"""Metric relative pose of a loop from the match keyframe's depth (RGB-D or stereo depth).

Two-view geometry alone gives the query camera's rotation and the *direction* of its
translation. With a depth image of the match keyframe the matched keypoints become 3D points in
the match camera frame, and the query's keypoints that see them fix the metric pose:

  1. ``depth_to_metres``: 16UC1 (millimetres by default) or 32FC1 (metres), or any other unit
     through ``depth_scale`` = raw units per metre (TUM RGB-D PNGs: 5000).
  2. ``backproject``: match keypoints + depth (nearest pixel, or the median of a small window
     when ``depth_window`` > 1, with invalid depth and depth edges rejected) -> 3D points.
  3. ``cv2.solvePnPRansac`` (EPnP hypotheses, reprojection threshold in query pixels), then
     Levenberg-Marquardt on the inliers (``cv2.solvePnPRefineLM``), inliers re-selected once at the
     refined pose and refined again.
  4. Covariance from the fit: J = d(reprojection residuals)/d(pose) at the solution,
     sigma^2 = sum(r^2) / (2N - 6), Cov = sigma^2 (J^T J)^-1.

Conventions (those of ``megaloc_ros.types.RelativePose`` and ``LoopClosure``): the result is the
pose of the query camera in the match camera frame, T_match_query; its 6x6 covariance is ordered
(x y z rx ry rz) and is that of a right perturbation T = T_hat * Exp(delta), i.e. translation and
rotation increments expressed in the query camera frame (what GTSAM's Pose3 local coordinates and
a between-factor on (match, query) use, up to the rotation/translation order).

The covariance only reflects what the residuals show (keypoint noise and the depth error that
becomes reprojection error in the query view); a systematic depth bias is not visible in it.

Usage::

    res = estimate_metric_pose(match_xy, query_xy, match_depth, K_match, K_query,
                               MetricPoseParams(depth_scale=5000.0))
    if res is not None:
        loop.transform = res.pose          # RelativePose, metric_scale=True

A verifier that stores keyframes without their images keeps ``backproject(keypoints, depth_m, K)``
per keyframe (3 floats + a flag per keypoint) and calls ``pose_from_points`` at verification.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

from megaloc_ros.types import RelativePose
from megaloc_ros.verification.geometry import residual_covariance, scale_unknown


@dataclass
class MetricPoseParams:
    depth_scale: Optional[float] = None   # raw depth units per metre; None: 1000 for uint16, 1 for float
    min_depth: float = 0.1                 # metres; nearer or farther depth is treated as invalid
    max_depth: float = 8.0
    depth_window: int = 3                  # odd window (pixels) whose median depth a keypoint takes
    max_depth_spread: float = 0.05         # relative spread within the window above which a keypoint
                                           # sits on a depth edge and is dropped (0: keep all)
    ransac_threshold_px: float = 3.0       # reprojection error (query pixels) of a PnP inlier
    ransac_confidence: float = 0.999
    ransac_iterations: int = 10000         # AP3P hypotheses at most (stops early once confident)
    min_inliers: int = 15                  # fewer: no metric pose
    min_inlier_ratio: float = 0.0          # inliers / points with depth; below: no metric pose
    seed: int = 0                          # RNG seed of OpenCV's RANSAC (reproducible results)


@dataclass
class MetricPoseResult:
    pose: RelativePose            # T_match_query, metric_scale=True, covariance (x y z rx ry rz)
    inliers: np.ndarray           # int indices into the correspondences given
    points_with_depth: int        # correspondences whose match keypoint had valid depth
    rms_px: float                 # reprojection RMS of the inliers at the refined pose
    matrix: np.ndarray = field(default_factory=lambda: np.eye(4))  # the same pose as a 4x4

    @property
    def num_inliers(self) -> int:
        return int(len(self.inliers))


def camera_matrix(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], np.float64)


def depth_to_metres(depth: np.ndarray, depth_scale: Optional[float] = None) -> np.ndarray:
    """float32 metres, NaN where there is no measurement (0, NaN, Inf).

    ``depth_scale``: raw units per metre; default 1000 for integer images (16UC1 millimetres,
    the ROS REP 118 convention) and 1 for float images (32FC1 metres)."""
    d = np.asarray(depth)
    if d.ndim != 2:
        raise ValueError(f"depth image must be 2-D, got shape {d.shape}")
    if depth_scale is None:
        depth_scale = 1000.0 if np.issubdtype(d.dtype, np.integer) else 1.0
    if not depth_scale > 0:
        raise ValueError(f"depth_scale must be positive, got {depth_scale}")
    m = d.astype(np.float32) / np.float32(depth_scale)
    m[~np.isfinite(m) | (m <= 0)] = np.nan
    return m


def backproject(keypoints_xy: np.ndarray, depth_m: np.ndarray, K: np.ndarray,
                params: MetricPoseParams = MetricPoseParams()) -> tuple[np.ndarray, np.ndarray]:
    """(points [N, 3] float64 in the camera frame, valid bool [N]) for pixel keypoints (x, y)
    on a depth image in metres registered to the keypoints' image (same size and intrinsics)."""
    xy = np.asarray(keypoints_xy, np.float64).reshape(-1, 2)
    h, w = depth_m.shape
    u = np.rint(xy[:, 0]).astype(np.int64)
    v = np.rint(xy[:, 1]).astype(np.int64)
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    z = np.full(len(xy), np.nan)
    r = max(0, int(params.depth_window) // 2)
    idx = np.flatnonzero(inside)
    if r == 0:
        z[idx] = depth_m[v[idx], u[idx]]
    elif len(idx):
        # every keypoint's window at once: [n, (2r+1)^2] depths, NaN outside the image
        d = np.arange(-r, r + 1)
        vv = v[idx, None, None] + d[None, :, None]
        uu = u[idx, None, None] + d[None, None, :]
        in_img = ((vv >= 0) & (vv < h) & (uu >= 0) & (uu < w)).reshape(len(idx), -1)
        win = np.where(in_img, depth_m[np.clip(vv, 0, h - 1), np.clip(uu, 0, w - 1)].reshape(len(idx), -1),
                       np.nan)
        measured = np.isfinite(win)
        n_ok = measured.sum(axis=1)
        ok = (n_ok > 0) & (2 * n_ok >= in_img.sum(axis=1))  # at least half the window measured
        win, idx = win[ok], idx[ok]
        med = np.nanmedian(win, axis=1) if len(idx) else np.zeros(0)
        if params.max_depth_spread > 0 and len(idx):
            # a depth discontinuity: the keypoint may belong to either side
            flat = (np.nanmax(win, axis=1) - np.nanmin(win, axis=1)) <= params.max_depth_spread * med
            idx, med = idx[flat], med[flat]
        z[idx] = med
    valid = np.isfinite(z) & (z >= params.min_depth) & (z <= params.max_depth)
    K = np.asarray(K, np.float64)
    x = (xy[:, 0] - K[0, 2]) / K[0, 0] * z
    y = (xy[:, 1] - K[1, 2]) / K[1, 1] * z
    pts = np.stack([x, y, z], axis=1)
    pts[~valid] = 0.0
    return pts, valid


def _project(K: np.ndarray, R_qm: np.ndarray, t_qm: np.ndarray, X_m: np.ndarray) -> np.ndarray:
    Xq = X_m @ R_qm.T + t_qm
    return np.stack([K[0, 0] * Xq[:, 0] / Xq[:, 2] + K[0, 2], K[1, 1] * Xq[:, 1] / Xq[:, 2] + K[1, 2]], axis=1)


def _perturbed(T_mq: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """T_mq * Exp(delta), delta = (x y z rx ry rz), first order in translation (exact in rotation)."""
    T = T_mq.copy()
    T[:3, :3] = T_mq[:3, :3] @ Rotation.from_rotvec(delta[3:]).as_matrix()
    T[:3, 3] = T_mq[:3, 3] + T_mq[:3, :3] @ delta[:3]
    return T


def _residuals(T_mq: np.ndarray, X_m: np.ndarray, xy_q: np.ndarray, K_q: np.ndarray) -> np.ndarray:
    R_qm = T_mq[:3, :3].T
    t_qm = -R_qm @ T_mq[:3, 3]
    return (_project(K_q, R_qm, t_qm, X_m) - xy_q).reshape(-1)


def pose_covariance_from_fit(T_mq: np.ndarray, X_m: np.ndarray, xy_q: np.ndarray, K_q: np.ndarray,
                             eps: float = 1e-6) -> tuple[np.ndarray, float]:
    """(6x6 covariance (x y z rx ry rz) of T_match_query, reprojection RMS in pixels) from the
    Jacobian of the inliers' reprojection residuals at the solution (``geometry.residual_covariance``)."""
    cov, r0 = residual_covariance(lambda d: _residuals(_perturbed(T_mq, d), X_m, xy_q, K_q), 6, eps)
    rms = float(np.sqrt(np.mean(r0 ** 2))) if r0.size else float("nan")
    return cov, rms


def estimate_metric_pose(match_keypoints_xy: np.ndarray, query_keypoints_xy: np.ndarray,
                         match_depth: np.ndarray, K_match: np.ndarray,
                         K_query: Optional[np.ndarray] = None,
                         params: MetricPoseParams = MetricPoseParams()) -> Optional[MetricPoseResult]:
    """Pose of the query camera in the match camera frame, metric, from N correspondences
    (``match_keypoints_xy[i]`` <-> ``query_keypoints_xy[i]``, pixels of the two images) and the
    raw depth image of the match keyframe, registered to its colour image (``K_match``).
    ``K_query`` defaults to ``K_match`` (same camera). None when too few inliers support a pose."""
    mxy = np.asarray(match_keypoints_xy, np.float64).reshape(-1, 2)
    qxy = np.asarray(query_keypoints_xy, np.float64).reshape(-1, 2)
    if len(mxy) != len(qxy):
        raise ValueError(f"{len(mxy)} match keypoints but {len(qxy)} query keypoints")
    K_m = np.asarray(K_match, np.float64)
    K_q = K_m if K_query is None else np.asarray(K_query, np.float64)
    X, valid = backproject(mxy, depth_to_metres(match_depth, params.depth_scale), K_m, params)
    return pose_from_points(X, valid, qxy, K_q, params)


def pose_from_points(match_points: np.ndarray, valid: np.ndarray, query_keypoints_xy: np.ndarray,
                     K_query: np.ndarray, params: MetricPoseParams = MetricPoseParams()) -> Optional[MetricPoseResult]:
    """The same from 3D points already in the match camera frame (``backproject`` of the match
    keyframe's keypoints, e.g. computed once when the keyframe was stored, so that no depth image
    needs keeping): ``match_points[i]`` (valid where ``valid[i]``) <-> ``query_keypoints_xy[i]``."""
    X = np.asarray(match_points, np.float64).reshape(-1, 3)
    qxy = np.asarray(query_keypoints_xy, np.float64).reshape(-1, 2)
    valid = np.asarray(valid, bool).reshape(-1)
    if not len(X) == len(qxy) == len(valid):
        raise ValueError(f"{len(X)} points, {len(valid)} valid flags and {len(qxy)} query keypoints")
    K_q = np.asarray(K_query, np.float64)
    idx = np.flatnonzero(valid)
    if len(idx) < max(params.min_inliers, 6):
        return None
    X_v, q_v = X[idx], qxy[idx]
    cv2.setRNGSeed(int(params.seed))
    ok, rvec, tvec, inl = cv2.solvePnPRansac(
        X_v.reshape(-1, 1, 3), q_v.reshape(-1, 1, 2), K_q, None,
        iterationsCount=int(params.ransac_iterations), reprojectionError=float(params.ransac_threshold_px),
        confidence=float(params.ransac_confidence), flags=cv2.SOLVEPNP_AP3P)
    if not ok or inl is None or len(inl) < params.min_inliers:
        return None
    inl = inl.reshape(-1)
    for _ in range(2):  # refine on the inliers, re-select them at the refined pose, refine again
        rvec, tvec = cv2.solvePnPRefineLM(X_v[inl].reshape(-1, 1, 3), q_v[inl].reshape(-1, 1, 2), K_q, None,
                                          rvec, tvec)
        R_qm = cv2.Rodrigues(rvec)[0]
        err = np.linalg.norm(_project(K_q, R_qm, tvec.reshape(3), X_v) - q_v, axis=1)
        in_front = (X_v @ R_qm.T + tvec.reshape(3))[:, 2] > 0
        new = np.flatnonzero((err < params.ransac_threshold_px) & in_front)
        if len(new) < params.min_inliers:
            return None
        if np.array_equal(new, inl):
            break
        inl = new
    if len(inl) < params.min_inliers or len(inl) < params.min_inlier_ratio * len(idx):
        return None
    R_qm = cv2.Rodrigues(rvec)[0]
    t_qm = tvec.reshape(3)
    T_mq = np.eye(4)
    T_mq[:3, :3] = R_qm.T
    T_mq[:3, 3] = -R_qm.T @ t_qm
    cov, rms = pose_covariance_from_fit(T_mq, X_v[inl], q_v[inl], K_q)
    pose = RelativePose(rotation=T_mq[:3, :3].copy(), translation=T_mq[:3, 3].copy(), metric_scale=True,
                        covariance=cov)
    return MetricPoseResult(pose=pose, inliers=idx[inl], points_with_depth=int(len(idx)), rms_px=rms,
                            matrix=T_mq)


# ORB for metric transforms: on TUM fr3/cabinet's plain frames (0, 20, 40, 56) FAST threshold 5
# finds 663-1586 corners, OpenCV's default 20 only 67-784; PnP needs the many, RANSAC drops the bad
DENSE_ORB_FAST_THRESHOLD = 5


def orb_features(grey: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(xy float32 [N, 2], descriptors uint8 [N, 32]): at most ``n`` ORB keypoints of a grey image
    at its own resolution (the depth image's), FAST threshold ``DENSE_ORB_FAST_THRESHOLD``."""
    kps, desc = cv2.ORB_create(int(n), fastThreshold=DENSE_ORB_FAST_THRESHOLD).detectAndCompute(grey, None)
    if desc is None or not kps:
        return np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
    return np.array([k.pt for k in kps], np.float32).reshape(-1, 2), desc


def mutual_pairs(desc_q: np.ndarray, desc_m: np.ndarray) -> np.ndarray:
    """int64 [M, 2] (query index, match index): mutual nearest neighbours of binary descriptors
    (Hamming, cross-check, no ratio test: PnP-RANSAC sorts out the wrong ones)."""
    if len(desc_q) == 0 or len(desc_m) == 0:
        return np.zeros((0, 2), np.int64)
    ms = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(desc_q, desc_m)
    return np.array([(x.queryIdx, x.trainIdx) for x in ms], np.int64).reshape(-1, 2)


def mutual_matches(grey_q: np.ndarray, grey_m: np.ndarray, features: str = "orb") -> tuple[np.ndarray, np.ndarray]:
    """(query xy [M, 2], match xy [M, 2]): mutual nearest neighbours (cross-check, no ratio test)
    of ORB (``orb_features``, 5000) or SIFT (all keypoints, contrast threshold 0.004) on two
    grey images: what ``bench.metric_pose`` compares the verifier's own correspondences with."""
    if features == "orb":
        (q, dq), (m, dm) = orb_features(grey_q, 5000), orb_features(grey_m, 5000)
        pairs = mutual_pairs(dq, dm)
        return q[pairs[:, 0]].astype(np.float64), m[pairs[:, 1]].astype(np.float64)
    if features != "sift":
        raise ValueError(f"unknown features {features!r}: orb or sift")
    det = cv2.SIFT_create(0, contrastThreshold=0.004)
    kq, dq = det.detectAndCompute(grey_q, None)
    km, dm = det.detectAndCompute(grey_m, None)
    if dq is None or dm is None:
        return np.zeros((0, 2)), np.zeros((0, 2))
    ms = cv2.BFMatcher(cv2.NORM_L2, crossCheck=True).match(dq, dm)
    q = np.array([kq[x.queryIdx].pt for x in ms], np.float64).reshape(-1, 2)
    m = np.array([km[x.trainIdx].pt for x in ms], np.float64).reshape(-1, 2)
    return q, m


def pose_error(T_est: np.ndarray, T_true: np.ndarray) -> tuple[float, float]:
    """(translation error in metres, rotation error in degrees) between two 4x4 poses."""
    D = np.linalg.inv(T_true) @ T_est
    ang = np.degrees(np.linalg.norm(Rotation.from_matrix(D[:3, :3]).as_rotvec()))
    return float(np.linalg.norm(T_est[:3, 3] - T_true[:3, 3])), float(ang)


# --- what the verifier keeps and uses -----------------------------------------------------------

def keypoint_depths(keypoints_xy: np.ndarray, depth_m: np.ndarray, image_size: tuple[int, int],
                    params: MetricPoseParams = MetricPoseParams()) -> np.ndarray:
    """float32 [N] depth in metres of each keypoint (NaN: none, or unreliable), from a depth image
    registered to the keypoints' image of ``image_size`` (w, h); a depth image of another size
    (the same camera, rescaled) is resampled nearest-neighbour first."""
    d = np.asarray(depth_m, np.float32)
    w, h = image_size
    if d.shape != (h, w):
        d = cv2.resize(d, (w, h), interpolation=cv2.INTER_NEAREST)
    pts, valid = backproject(keypoints_xy, d, np.eye(3), params)  # z does not depend on K
    z = pts[:, 2].astype(np.float32)
    z[~valid] = np.nan
    return z


def without_scale(pose: RelativePose) -> RelativePose:
    """``pose`` with its translation cut to a unit direction (``metric_scale`` False) and
    the translation covariance of an unknown scale (``geometry.scale_unknown``); rotation and
    its covariance kept."""
    t = np.asarray(pose.translation, np.float64)
    return RelativePose(rotation=pose.rotation, translation=t / max(np.linalg.norm(t), 1e-12),
                        metric_scale=False, covariance=scale_unknown(pose.covariance))


def pose_from_keypoint_depths(match_keypoints_xy: np.ndarray, match_depth: np.ndarray, K_match: np.ndarray,
                              query_keypoints_xy: np.ndarray, K_query: np.ndarray, pairs: np.ndarray,
                              params: MetricPoseParams = MetricPoseParams()) -> Optional[MetricPoseResult]:
    """PnP over tentative matches ``pairs`` [M, 2] (query index, match index): the match
    keypoints lifted with their stored depth, the query keypoints as pixels."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    if not len(pairs):
        return None
    mxy = np.asarray(match_keypoints_xy, np.float64)[pairs[:, 1]]
    z = np.asarray(match_depth, np.float64)[pairs[:, 1]]
    K = np.asarray(K_match, np.float64)
    valid = np.isfinite(z) & (z > 0)
    X = np.stack([(mxy[:, 0] - K[0, 2]) / K[0, 0] * z, (mxy[:, 1] - K[1, 2]) / K[1, 1] * z, z], axis=1)
    X[~valid] = 0.0
    return pose_from_points(X, valid, np.asarray(query_keypoints_xy, np.float64)[pairs[:, 0]], K_query, params)
