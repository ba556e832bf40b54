"""The a-contrario test of a two-view fit on synthetic correspondences: chance is rejected,
planted geometry accepted, at any image size, with and without intrinsics."""
import numpy as np
import pytest

from megaloc_ros.verification import acontrario as AC
from megaloc_ros.verification.geometry import LocalFeatures


def two_view(n_inliers, n_random, size=(640, 480), f=500.0, seed=0, noise_px=0.5):
    """Features of two views: ``n_inliers`` projections of 3-D points (camera 2 moved 0.5 m
    sideways and turned 20 deg) plus ``n_random`` uniform nonsense pairs; matched 1:1 by index."""
    rng = np.random.default_rng(seed)
    w, h = size
    K = np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]])
    X = np.c_[rng.uniform(-2, 2, n_inliers), rng.uniform(-1.5, 1.5, n_inliers), rng.uniform(3, 8, n_inliers)]
    a = np.radians(20)
    R = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    t = np.array([-0.5, 0.05, 0.1])

    def proj(P):
        p = (K @ P.T).T
        return p[:, :2] / p[:, 2:]
    p1 = proj(X) + rng.normal(0, noise_px, (n_inliers, 2))
    p2 = proj(X @ R.T + t) + rng.normal(0, noise_px, (n_inliers, 2))
    r1 = rng.uniform([0, 0], [w, h], (n_random, 2))
    r2 = rng.uniform([0, 0], [w, h], (n_random, 2))
    q = np.r_[p1, r1].astype(np.float32)
    m = np.r_[p2, r2].astype(np.float32)
    d = np.zeros((len(q), 128), np.uint8)
    pairs = np.stack([np.arange(len(q)), np.arange(len(q))], axis=1)
    return LocalFeatures(q, d, size), LocalFeatures(m, d, size), pairs, K


@pytest.mark.parametrize("size,f", [((640, 480), 500.0), ((160, 120), 90.0)])
@pytest.mark.parametrize("intrinsics", [True, False])
def test_random_correspondences_are_not_significant(size, f, intrinsics):
    worst = -np.inf
    for seed in range(5):
        q, m, pairs, K = two_view(0, 150, size, f, seed)
        r = AC.check_pair(q, m, K if intrinsics else None, K if intrinsics else None, pairs=pairs)
        worst = max(worst, r.significance.score)
    assert worst < 0.0, worst          # NFA >= 1: no more than chance


@pytest.mark.parametrize("size,f", [((640, 480), 500.0), ((160, 120), 90.0)])
@pytest.mark.parametrize("intrinsics", [True, False])
def test_planted_geometry_is_significant_among_outliers(size, f, intrinsics):
    q, m, pairs, K = two_view(40, 110, size, f, seed=1, noise_px=0.5 * size[0] / 640)
    r = AC.check_pair(q, m, K if intrinsics else None, K if intrinsics else None, pairs=pairs)
    assert r.significance.score > 10.0
    assert 30 <= r.inliers <= 45
    assert (r.pose is not None) == intrinsics


def test_few_inliers_among_many_matches_count_less_than_among_few():
    # the same 12 planted inliers: meaningful among 20 tentative matches, chance among 400
    q, m, pairs, _ = two_view(12, 8, seed=2)
    few = AC.check_pair(q, m, pairs=pairs)
    q, m, pairs, _ = two_view(12, 388, seed=2)
    many = AC.check_pair(q, m, pairs=pairs)
    assert few.significance.score > 0 > many.significance.score


def test_nfa_formula():
    # (n - s) C(n, k) C(k, s) alpha^(k - s) for n=20, k=10, s=7, alpha=0.01
    from math import comb, log10
    assert AC.log10_nfa(20, 10, 7, 0.01) == pytest.approx(log10(13 * comb(20, 10) * comb(10, 7) * 1e-6))
