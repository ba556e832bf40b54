"""A viewpoint-heavy verification pair set, generated from the shipped TUM fr3/cabinet frames.

Positives: pairs of TUM frames whose optical axes are at least ``min_angle_deg`` (30) apart and
that see each other: covisibility (``megaloc_ros.evaluation.covisibility``) >= 0.25 in BOTH
directions (the minimum, stricter than the sequence ground truth's maximum, so that every
positive is a clear one). Negatives: pairs with zero covisibility, i.e. a TUM frame and a frame
of another shipped scene (rtabmap: a different building, so nothing is covisible).

The set is regenerated from the data each time (nothing stored): ``pairs()`` sorts the
qualifying positives by angle and takes ``n`` evenly spread over that order (so wide angles are
represented), and pairs every ``k``-th TUM frame with rtabmap frames for as many negatives.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_ANGLE_DEG = 30.0
MIN_COVISIBILITY = 0.25


@dataclass(frozen=True)
class Pair:
    query: tuple[str, int]   # (set name, frame index)
    match: tuple[str, int]
    positive: bool
    angle_deg: float         # between optical axes (nan for cross-scene pairs)
    covisibility: float      # min of both directions (0 for cross-scene pairs)


def positives(tum_seq, covis: np.ndarray, min_angle_deg: float = MIN_ANGLE_DEG,
              min_covisibility: float = MIN_COVISIBILITY) -> list[Pair]:
    """All qualifying TUM pairs (i > j), sorted by angle."""
    from megaloc_ros.evaluation.covisibility import viewing_angle_deg
    both = np.minimum(covis, covis.T)
    out = []
    for i in range(len(tum_seq)):
        for j in range(i):
            if both[i, j] < min_covisibility:
                continue
            a = viewing_angle_deg(tum_seq.poses[i], tum_seq.poses[j])
            if a >= min_angle_deg:
                out.append(Pair(("tum", i), ("tum", j), True, a, float(both[i, j])))
    return sorted(out, key=lambda p: (p.angle_deg, p.query, p.match))


def pairs(n: int = 60, tum_seq=None, covis=None, n_other: int = 84) -> list[Pair]:
    """``n`` positives evenly spread over the angle-sorted qualifying pairs, and ``n``
    cross-scene negatives (TUM frame i vs rtabmap frame (7 i + 3) mod ``n_other``, spread so
    that each TUM frame and many rtabmap frames appear)."""
    from megaloc_ros.evaluation import covisibility as cv
    from megaloc_ros.io import tum
    tum_seq = tum_seq or tum.tum_fr3_cabinet()
    covis = cv.covisibility_matrix(tum_seq) if covis is None else covis
    pos = positives(tum_seq, covis)
    if len(pos) > n:
        pos = [pos[k] for k in np.unique(np.round(np.linspace(0, len(pos) - 1, n)).astype(int))]
    neg = []
    m = len(tum_seq)
    for k in range(len(pos)):
        i = (k * 5) % m
        neg.append(Pair(("tum", i), ("rtabmap", (7 * k + 3) % n_other), False, float("nan"), 0.0))
    return pos + neg
