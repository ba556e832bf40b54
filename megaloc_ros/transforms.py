"""Rotations and poses: quaternion (x, y, z, w) <-> 3x3 matrix, and 4x4 pose matrices.

One implementation for the trajectory files, the bags and the ROS messages. Poses are 4x4
float64 world-from-body matrices, as everywhere in the package.
"""
from __future__ import annotations

import numpy as np


def skew(v) -> np.ndarray:
    """[v]x: skew(a) @ b == cross(a, b)."""
    x, y, z = (float(a) for a in v)
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])


def quaternion_to_matrix(x: float, y: float, z: float, w: float) -> np.ndarray:
    """Quaternion (x, y, z, w) -> 3x3 rotation; normalised first. A zero or non-finite
    quaternion is a ValueError (it names no rotation)."""
    q = np.array([x, y, z, w], dtype=np.float64)
    n = np.linalg.norm(q)
    if not np.isfinite(n) or n < 1e-9:
        raise ValueError(f"invalid quaternion {q.tolist()}")
    x, y, z, w = q / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def matrix_to_quaternion(r: np.ndarray) -> np.ndarray:
    """3x3 rotation -> unit quaternion (x, y, z, w) with w >= 0."""
    m = np.asarray(r, dtype=np.float64)
    # Shepperd's method: pick the largest diagonal term for numerical stability.
    tr = np.trace(m)
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s]
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + m[i, i] - m[j, j] - m[k, k])
        q = [0.0, 0.0, 0.0, (m[k, j] - m[j, k]) / s]
        q[i] = 0.25 * s
        q[j] = (m[j, i] + m[i, j]) / s
        q[k] = (m[k, i] + m[i, k]) / s
    q = np.array(q)
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q


def pose_matrix(position, quaternion_xyzw) -> np.ndarray:
    """4x4 pose from a position (3) and a quaternion (x, y, z, w)."""
    out = np.eye(4)
    out[:3, :3] = quaternion_to_matrix(*quaternion_xyzw)
    out[:3, 3] = position
    return out
