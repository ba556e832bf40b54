"""Loop transforms between camera frames -> between base frames, with their covariance (numpy).

A loop carries Z = T_match_query between *camera* frames and a 6x6 covariance ordered
(x y z rx ry rz) for a right perturbation Z * Exp(d). Back ends keep poses of the *base* (the
odometry child frame); with the camera's pose in the base, X = base_T_camera, the base loop is
X Z X^-1, and a right perturbation d of Z is Ad(X) d of it. These helpers do that, and the
inverse RTAB-Map wants (the pose of the match base in the query base).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from megaloc_ros.transforms import skew


def adjoint(T: np.ndarray) -> np.ndarray:
    """6x6 adjoint of a 4x4 rigid transform in (x y z rx ry rz) order: T Exp(d) = Exp(Ad d) T."""
    R, t = T[:3, :3], T[:3, 3]
    A = np.zeros((6, 6))
    A[:3, :3] = R
    A[:3, 3:] = skew(t) @ R
    A[3:, 3:] = R
    return A


def inverse(T: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = T[:3, :3].T
    out[:3, 3] = -T[:3, :3].T @ T[:3, 3]
    return out


def usable_covariance(cov: Optional[np.ndarray], default_sigma_t: float, default_sigma_r: float,
                      min_sigma_t: float = 0.0, min_sigma_r: float = 0.0) -> np.ndarray:
    """The loop covariance, or the defaults when it is missing/zero/not finite, plus the floors
    (added in quadrature on the diagonal)."""
    c = None if cov is None else np.asarray(cov, np.float64).reshape(6, 6)
    if c is None or not np.any(c) or not np.all(np.isfinite(c)):
        c = np.diag([default_sigma_t ** 2] * 3 + [default_sigma_r ** 2] * 3)
    return c + np.diag([min_sigma_t ** 2] * 3 + [min_sigma_r ** 2] * 3)


def base_loop(Z: np.ndarray, cov: np.ndarray,
              base_T_camera: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(T_match_query between base frames, its covariance) from the camera loop ``Z``."""
    X = np.eye(4) if base_T_camera is None else np.asarray(base_T_camera, np.float64).reshape(4, 4)
    M = X @ np.asarray(Z, np.float64) @ inverse(X)
    A = adjoint(X)
    return M, A @ cov @ A.T


def inverted(M: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M^-1, its covariance): inv(M Exp(d)) = M^-1 Exp(-Ad(M) d)."""
    A = adjoint(M)
    return inverse(M), A @ cov @ A.T
