"""Ground truth from covisibility: do two RGB-D frames see the same surfaces?

``covisibility(depth_i, T_wi, depth_j, T_wj, K)`` is the fraction of frame i's valid-depth pixels
whose 3-D point, moved into camera j (camera-to-world poses ``T_w*``), lands inside j's image in
front of the camera AND agrees with j's own depth there (a z-buffer test: |z_in_j - depth_j| <=
``abs_tol_m`` + ``rel_tol`` * depth_j). A point that lands on a pixel of j without depth, behind
a nearer surface (occluded) or in front of j's surface counts as not seen. Directional: a close-up
of a wall seen whole by a wide view has covisibility ~1 into it, the wide view a small one back.

Same place (``SAME_PLACE``): the larger of the two directions (``symmetric``) >= 0.25, i.e. at
least a quarter of one view is seen, consistently, in the other. The maximum (not the minimum)
because a close-up and the wide view containing it are the same place for a pose graph: their
geometry is verifiable from the close-up's side.

Pixels are sampled on a regular grid (``stride``, default every 4th pixel in x and y), which
changes fractions by well under 1% at 640x480 and makes a 58 x 58 matrix take about a second.
"""
from __future__ import annotations

import numpy as np

SAME_PLACE = 0.25


def backproject(depth_m: np.ndarray, K: np.ndarray, stride: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame 3-D points [M, 3] of the valid (> 0) depth pixels on a ``stride`` grid,
    and their (u, v) pixel coordinates [M, 2]."""
    h, w = depth_m.shape
    v, u = np.mgrid[0:h:stride, 0:w:stride]
    z = depth_m[v, u]
    ok = np.isfinite(z) & (z > 0)
    u, v, z = u[ok].astype(np.float64), v[ok].astype(np.float64), z[ok].astype(np.float64)
    x = (u - K[0, 2]) / K[0, 0] * z
    y = (v - K[1, 2]) / K[1, 1] * z
    return np.stack([x, y, z], axis=1), np.stack([u, v], axis=1)


def covisibility(depth_i: np.ndarray, T_wi: np.ndarray, depth_j: np.ndarray, T_wj: np.ndarray,
                 K: np.ndarray, K_j: np.ndarray | None = None, stride: int = 4,
                 abs_tol_m: float = 0.03, rel_tol: float = 0.05,
                 points_i: np.ndarray | None = None) -> float:
    """Fraction of frame i's valid-depth pixels seen consistently by frame j (module doc).

    Depths are metres (0 = none); ``K`` is i's intrinsics (and j's unless ``K_j``);
    ``points_i``: i's backprojected points, when the caller reuses them over many j."""
    K_j = K if K_j is None else K_j
    if points_i is None:
        points_i = backproject(depth_i, K, stride)[0]
    if len(points_i) == 0:
        return 0.0
    T_ji = np.linalg.inv(np.asarray(T_wj, np.float64)) @ np.asarray(T_wi, np.float64)
    p = points_i @ T_ji[:3, :3].T + T_ji[:3, 3]
    z = p[:, 2]
    front = z > 1e-6
    zs = np.where(front, z, 1.0)
    u = K_j[0, 0] * p[:, 0] / zs + K_j[0, 2]
    v = K_j[1, 1] * p[:, 1] / zs + K_j[1, 2]
    h, w = depth_j.shape
    ui, vi = np.floor(u + 0.5).astype(np.int64), np.floor(v + 0.5).astype(np.int64)
    inside = front & (ui >= 0) & (ui < w) & (vi >= 0) & (vi < h)
    dj = np.zeros(len(z))
    dj[inside] = depth_j[vi[inside], ui[inside]]
    seen = inside & (dj > 0) & (np.abs(z - dj) <= abs_tol_m + rel_tol * dj)
    return float(np.count_nonzero(seen)) / len(points_i)


def covisibility_matrix(seq, stride: int = 4, **tol) -> np.ndarray:
    """float [N, N]: ``c[i, j]`` = covisibility of frame i into frame j for a sequence with
    ``depth_m(i)``, ``poses`` (camera-to-world) and ``K`` (``megaloc_ros.io.tum.TumSequence``);
    1 on the diagonal."""
    n = len(seq)
    depths = [seq.depth_m(i) for i in range(n)]
    pts = [backproject(d, seq.K, stride)[0] for d in depths]
    c = np.eye(n)
    for i in range(n):
        for j in range(n):
            if i != j:
                c[i, j] = covisibility(depths[i], seq.poses[i], depths[j], seq.poses[j], seq.K,
                                       stride=stride, points_i=pts[i], **tol)
    return c


def symmetric(c: np.ndarray) -> np.ndarray:
    """The larger of the two directions, ``max(c[i, j], c[j, i])`` (see the module doc)."""
    return np.maximum(c, c.T)


def viewing_angle_deg(T_wi: np.ndarray, T_wj: np.ndarray) -> float:
    """Angle between the two cameras' optical axes (their +z in the world), degrees."""
    a, b = np.asarray(T_wi)[:3, 2], np.asarray(T_wj)[:3, 2]
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def as_image_sequence(seq, min_covisibility: float | None = None):
    """The ``ImageSequence`` of a ``megaloc_ros.io.tum.TumSequence`` with ``gt`` = covisibility
    >= ``min_covisibility`` (default ``SAME_PLACE``) in both directions' maximum (``symmetric``)."""
    from megaloc_ros.io.datasets import ImageSequence
    thr = SAME_PLACE if min_covisibility is None else min_covisibility
    gt = symmetric(covisibility_matrix(seq)) >= thr
    np.fill_diagonal(gt, False)
    return ImageSequence(seq.name, list(seq.rgb_paths), seq.stamps_ns.copy(),
                         np.zeros(len(seq), np.int32), gt)
