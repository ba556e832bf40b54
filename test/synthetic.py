"""Synthetic descriptors for map and map-file tests (real-data tests use the conftest fixtures)."""
import numpy as np


def trajectory(n, dim, seed=0, rho=0.9):
    """Keyframes along a smooth walk: neighbours are similar, like a robot's."""
    rng = np.random.default_rng(seed)
    scale = (np.arange(dim) + 1.0) ** -0.75
    p = rng.standard_normal(dim)
    out = np.zeros((n, dim), np.float32)
    for t in range(n):
        p = rho * p + np.sqrt(1 - rho ** 2) * rng.standard_normal(dim)
        out[t] = scale * p
    return out / np.linalg.norm(out, axis=1, keepdims=True)
