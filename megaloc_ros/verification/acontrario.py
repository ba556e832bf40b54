"""A-contrario significance of a two-view epipolar fit: is the inlier count explained by chance?

A raw inlier count does not transfer between cameras and scenes: 15 inliers are noise among 200
tentative matches on a 160x120 image (a wide epipolar band covers much of it) and strong evidence
among 20 matches on a 640x480 one. The number of false alarms (NFA) of the a-contrario RANSAC
literature (Moisan & Stival, IJCV 2004; Moisan, Moulon & Monasse, IPOL 2012 "ORSA") asks how
often a model this good would appear if the tentative matches were random:

    NFA(k, r) = (n - s) * C(n, k) * C(k, s) * alpha(r) ** (k - s)

n tentative matches, s the minimal sample (5 for an essential matrix, 7 for a fundamental one),
k of the matches within distance r of their epipolar line, and alpha(r) the probability that a
point placed uniformly at random falls within r of a given line. We take

    alpha(r) = min(1, 2 r L / A)

with A the area and L the diagonal of the box the matched points of that image occupy (not the
whole image: when the matches crowd into a corner, chance agreement is likelier, and alpha says
so), computed in both images and the larger taken; r is each match's symmetric epipolar
distance (the larger of its two point-to-line distances, pixels). ``significance`` sorts the
residuals and returns the best -log10 NFA over k (and the k and r it was reached at), up to
``max_threshold_px``. Large values are evidence: -log10 NFA >= 0 means fewer than one such
model expected by chance, and each further unit is a factor 10.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import lgamma, log
from typing import Optional

import numpy as np

_LN10 = log(10.0)


def log10_binom(n: int, k: int) -> float:
    return (lgamma(n + 1) - lgamma(k + 1) - lgamma(n - k + 1)) / _LN10


def log10_nfa(n: int, k: int, s: int, alpha: float) -> float:
    """log10 of (n - s) C(n, k) C(k, s) alpha^(k - s) (module doc); +inf-like when k <= s."""
    if k <= s or n <= s:
        return float(np.log10(max(n - s, 1))) + log10_binom(max(n, 0), max(min(k, n), 0))
    a = min(max(alpha, 1e-300), 1.0)
    return (np.log10(n - s) + log10_binom(n, k) + log10_binom(k, s) + (k - s) * np.log10(a))


def band_fraction(points: np.ndarray, r: np.ndarray | float, image_size: tuple[int, int],
                  min_box_frac: float = 0.1) -> np.ndarray:
    """alpha(r) = 2 r L / A of the box the ``points`` [N, 2] occupy in an image of (w, h)
    ``image_size`` (the box is at least ``min_box_frac`` of each side: a handful of points
    cannot make the box vanish)."""
    w, h = image_size
    if len(points):
        bw = max(float(np.ptp(points[:, 0])), min_box_frac * w)
        bh = max(float(np.ptp(points[:, 1])), min_box_frac * h)
    else:
        bw, bh = float(w), float(h)
    return np.minimum(1.0, 2.0 * np.asarray(r, np.float64) * np.hypot(bw, bh) / (bw * bh))


def epipolar_distances(F: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """Symmetric epipolar distance in pixels of matches pa [N, 2] (image a) <-> pb (image b)
    for ``F`` with pb^T F pa = 0: the larger of the two point-to-epipolar-line distances."""
    ha = np.c_[pa, np.ones(len(pa))]
    hb = np.c_[pb, np.ones(len(pb))]
    lb = ha @ F.T          # lines in image b
    la = hb @ F            # lines in image a
    e = np.abs(np.sum(hb * lb, axis=1))
    db = e / np.maximum(np.hypot(lb[:, 0], lb[:, 1]), 1e-12)
    da = e / np.maximum(np.hypot(la[:, 0], la[:, 1]), 1e-12)
    return np.maximum(da, db)


@dataclass
class Significance:
    log10_nfa: float   # best over k; negative = meaningful
    inliers: int       # k at the best NFA
    threshold_px: float  # r at the best NFA
    matches: int       # n
    alpha: float       # alpha(r) at the best NFA

    @property
    def score(self) -> float:
        """-log10 NFA: the evidence, in decades."""
        return -self.log10_nfa


THRESHOLDS_PX = np.geomspace(0.5, 8.0, 13)  # distances r tried (pixels of a ~640 px image)
REFERENCE_SIDE = 640.0


def epipolar_distance_matrix(F: np.ndarray, pa: np.ndarray, pb: np.ndarray) -> np.ndarray:
    """[n, n]: symmetric epipolar distance of every pairing (pa[i], pb[j]) under ``F``."""
    ha = np.c_[pa, np.ones(len(pa))]
    hb = np.c_[pb, np.ones(len(pb))]
    lb = ha @ F.T                      # [n, 3] line of a_i in image b
    la = hb @ F                        # [n, 3] line of b_j in image a
    e = np.abs(lb @ hb.T)              # [i, j] = |b_j^T F a_i|
    db = e / np.maximum(np.hypot(lb[:, 0], lb[:, 1]), 1e-12)[:, None]
    da = e / np.maximum(np.hypot(la[:, 0], la[:, 1]), 1e-12)[None, :]
    return np.maximum(da, db)


def significance(F: np.ndarray, pa: np.ndarray, pb: np.ndarray, s: int,
                 size_a: tuple[int, int], size_b: tuple[int, int],
                 thresholds_px=THRESHOLDS_PX) -> Significance:
    """Best NFA of the fit ``F`` (pb^T F pa = 0) over the distances ``thresholds_px``.

    The chance that match i is an inlier at distance r is taken per match:
    alpha_i(r) = max(band_fraction(r), c_i(r) / (n - 1)), with c_i(r) the number of the other
    matches' points b_j (j != i) that a_i's epipolar line passes within r of (a permutation null:
    how often a wrong partner would fit as well; the band fraction bounds it from below). Where the scene makes chance agreement
    likely (points near the epipole, matches along the lines through a corridor's vanishing
    point, which every epipolar line of a forward motion follows), alpha_i is large and the match
    brings little evidence; a uniform band fraction alone would call such fits certain.
    The probability of the inlier set is the product of its alpha_i (the ``s`` largest
    excluded: the minimal sample fits by construction):
    log10 NFA = log10((n - s) C(n, k) C(k, s)) + sum log10 alpha_i.
    """
    n = len(pa)
    worst = Significance(log10_nfa(n, 0, s, 1.0), 0, 0.0, n, 1.0)
    if n <= s + 1:
        return worst
    D = epipolar_distance_matrix(F, pa, pb)
    res = np.diag(D)
    lg = np.array([lgamma(x + 1) for x in range(n + 1)]) / _LN10
    best = worst
    for r in thresholds_px:
        inl = res <= r
        k = int(inl.sum())
        if k <= s + 1:
            continue
        geo = max(float(band_fraction(pa, r, size_a)), float(band_fraction(pb, r, size_b)))
        c = (D[inl] <= r).sum(axis=1) - 1          # wrong partners within r (itself excluded)
        alpha = np.maximum(geo, c / (n - 1.0))
        la = np.sort(np.log10(np.minimum(alpha, 1.0)))[: k - s]   # drop the s weakest
        nfa = np.log10(n - s) + (lg[n] - lg[k] - lg[n - k]) + (lg[k] - lg[s] - lg[k - s]) + la.sum()
        if nfa < best.log10_nfa:
            best = Significance(float(nfa), k, float(r), n, float(np.exp(np.mean(la) * _LN10)))
    return best


@dataclass
class PairCheck:
    """A fitted epipolar geometry and its significance."""
    significance: Significance
    pose: object  # megaloc_ros.types.RelativePose or None (no intrinsics / no model)
    fit_inliers: int  # inliers of the RANSAC fit at its own threshold
    inlier_mask: Optional[np.ndarray] = None  # bool [M] over the tentative matches: within the
                                              # distance the a-contrario test settled on

    @property
    def inliers(self) -> int:
        return self.significance.inliers

    @property
    def matches(self) -> int:
        return self.significance.matches


def check_pair(query, match_, K_query=None, K_match=None, ratio: float = 0.8, mutual: bool = True,
               threshold_px: float = 2.0, max_threshold_px: float = 8.0, confidence: float = 0.999,
               max_iters: int = 2000, pairs: np.ndarray | None = None) -> PairCheck:
    """Match two ``geometry.LocalFeatures``, fit an essential (intrinsics known) or fundamental
    matrix by USAC at ``threshold_px``, then score the fit a contrario (``significance`` over
    all tentative matches' symmetric epipolar distances, up to ``max_threshold_px``). Both
    distances are for ~640 px images and shrink in proportion for smaller ones (down to 1/4).
    ``pairs``: tentative matches already found (index pairs), e.g. by a learned matcher."""
    import cv2
    from megaloc_ros.verification import geometry
    if pairs is None:
        pairs = geometry.match(query, match_, ratio, mutual)
    n = len(pairs)
    essential = K_query is not None and K_match is not None
    s = 5 if essential else 7
    none = PairCheck(Significance(log10_nfa(n, 0, s, 1.0), 0, 0.0, n, 1.0), None, 0)
    if n < max(8, s + 2):
        return none
    pq = query.keypoints[pairs[:, 0]].astype(np.float64)
    pm = match_.keypoints[pairs[:, 1]].astype(np.float64)
    # distances are given for ~640 px images; smaller images localise in proportionally fewer
    # pixels (their keypoints come from an upsampled detection), so the distances shrink with them
    scale = float(np.clip(max(*query.image_size, *match_.image_size) / REFERENCE_SIDE, 0.25, 1.0))
    threshold_px *= scale
    thresholds = THRESHOLDS_PX * scale
    thresholds = thresholds[thresholds <= max_threshold_px * scale + 1e-9]
    if essential:
        Kq, Km = np.asarray(K_query, np.float64), np.asarray(K_match, np.float64)
        nq = cv2.undistortPoints(pq.reshape(-1, 1, 2), Kq, None).reshape(-1, 2)
        nm = cv2.undistortPoints(pm.reshape(-1, 1, 2), Km, None).reshape(-1, 2)
        f = 0.5 * (Kq[0, 0] + Km[0, 0])
        E, mask = geometry._robust(lambda a, b, *r: cv2.findEssentialMat(a, b, np.eye(3), *r), nq, nm,
                                   threshold_px / f, confidence, max_iters, fallback=cv2.RANSAC)
        if E is None or mask is None or E.shape != (3, 3):
            return none
        F = np.linalg.inv(Km).T @ E @ np.linalg.inv(Kq)
    else:
        F, mask = geometry._robust(cv2.findFundamentalMat, pq, pm, threshold_px, confidence, max_iters,
                                   fallback=cv2.FM_RANSAC, ransac_first=True)
        if F is None or mask is None or F.shape != (3, 3):
            return none
    sig = significance(F, pq, pm, s, query.image_size, match_.image_size, thresholds)
    res = epipolar_distances(F, pq, pm)
    pose = None
    if essential and sig.inliers > s:
        pose = geometry.essential_pose(E, nq, nm, res <= sig.threshold_px, f)
    return PairCheck(sig, pose, int(mask.sum()), res <= sig.threshold_px)
