"""Decisions that transfer across cameras and scenes: each signal judged against chance.

Geometry: the a-contrario significance of the epipolar fit (``acontrario.significance``,
-log10 NFA, in decades): the inlier count weighed against the number of tentative matches, the
image area the matches cover and how often a wrong partner fits as well. It needs no threshold
per camera or scene: NFA < 10^-T means fewer than 10^-T fits this good are expected by chance.

SegVLAD: the query's score on the candidate, as a z-score against its scores on a sample of the
map's other keyframes (not the candidates nor their neighbours, not the recent past): how far
this candidate stands out from "somewhere else in this map" for this query. Absolute SegVLAD
scores depend on backbone, scene and image (0.00-0.28 on wide-baseline true pairs, 0.7 on every
corridor pair), the z-score much less so. It is evidence, never a veto: a candidate with strong
geometry is accepted whatever its SegVLAD z; one with weaker, still meaningful geometry
(-log10 NFA >= ``min_significance_segvlad``) is accepted when SegVLAD also singles it out
(z >= ``min_segvlad_z``). Among a query's accepted candidates the one kept
(``max_accepted_per_query``) is the one with the most evidence, -log10 NFA + max(z, 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from megaloc_ros.verification.acontrario import Significance


@dataclass
class Evidence:
    significance: Optional[Significance]   # None: geometry not run
    segvlad: Optional[float] = None         # vote score on the candidate
    segvlad_z: Optional[float] = None       # against the background sample
    background: int = 0                     # keyframes in that sample
    segvlad_note: str = ""                  # why there is no z, when there is none

    @property
    def geometry(self) -> float:
        return -np.inf if self.significance is None else self.significance.score

    @property
    def rank(self) -> float:
        """What orders a query's accepted candidates."""
        return self.geometry + max(self.segvlad_z or 0.0, 0.0)


def background_ids(ids: Sequence[int], query_id: int, candidate_ids: Sequence[int], size: int,
                   exclude_recent: int, exclude_radius: int) -> list[int]:
    """Up to ``size`` keyframe ids, evenly spread over ``ids`` (sorted), leaving out the query,
    the ``exclude_recent`` ids before it (its recent past: the same place by construction) and
    ids within ``exclude_radius`` of a candidate (the candidates' own neighbourhood)."""
    c = np.asarray(sorted(candidate_ids), np.int64)
    out = []
    for i in ids:
        if i == query_id or query_id - exclude_recent <= i <= query_id + exclude_recent:
            continue
        if c.size and np.min(np.abs(c - i)) <= exclude_radius:
            continue
        out.append(i)
    if len(out) > size:
        pick = np.unique(np.round(np.linspace(0, len(out) - 1, size)).astype(np.int64))
        out = [out[k] for k in pick]
    return out


def segvlad_scores(query: np.ndarray, others: Sequence[np.ndarray], top_k: int) -> np.ndarray:
    """The vote score of ``query`` on each of ``others`` separately (``segvlad.vote`` with one
    image at a time), float32 [len(others)]."""
    q = np.asarray(query, np.float32)
    out = np.zeros(len(others), np.float32)
    if len(q) == 0:
        return out
    for n, o in enumerate(others):
        o = np.asarray(o, np.float32)
        if len(o) == 0:
            continue
        sim = q @ o.T
        k = min(top_k, o.shape[0])
        top = -np.partition(-sim, k - 1, axis=1)[:, :k]
        out[n] = np.maximum(top, 0).sum() / (len(q) * k)
    return out


def zscore(score: float, background: np.ndarray, min_count: int = 8,
           min_std: float = 0.02) -> tuple[Optional[float], str]:
    """(z, note): (score - mean) / max(std, ``min_std``) of ``background``; None (and why) when it
    has fewer than ``min_count`` scores."""
    b = np.asarray(background, np.float64)
    if len(b) < min_count:
        return None, f"no segvlad z (background of {len(b)} keyframes < {min_count})"
    return float((score - b.mean()) / max(b.std(), min_std)), ""


def decide(ev: Evidence, min_significance: float, min_significance_segvlad: float,
           min_segvlad_z: float, min_inliers: int = 0) -> tuple[bool, str]:
    """(accepted, reason) for one candidate's evidence (module doc for the rule)."""
    s = ev.significance
    geo = (f"{s.inliers}/{s.matches} inliers within {s.threshold_px:.2g} px, -log10 NFA {s.score:.1f}"
           if s is not None else "no geometry")
    if ev.segvlad_z is not None:
        sv = f"segvlad {ev.segvlad:.2f} z {ev.segvlad_z:.1f} (over {ev.background} keyframes)"
    elif ev.segvlad is not None:
        sv = f"segvlad {ev.segvlad:.2f}, {ev.segvlad_note}"
    else:
        sv = ev.segvlad_note or "no segvlad"
    if s is None:
        return False, f"rejected: {geo}; {sv}"
    if s.inliers < min_inliers:
        return False, f"rejected: {geo}, {s.inliers} < {min_inliers} inliers; {sv}"
    g = s.score
    if g >= min_significance:
        return True, f"accepted: {geo} >= {min_significance:g}; {sv}"
    if ev.segvlad_z is not None and g >= min_significance_segvlad and ev.segvlad_z >= min_segvlad_z:
        return True, (f"accepted: {geo} >= {min_significance_segvlad:g} with segvlad z "
                      f"{ev.segvlad_z:.1f} >= {min_segvlad_z:g}; {sv}")
    need = (f"< {min_significance:g}" if ev.segvlad_z is None or ev.segvlad_z < min_segvlad_z
            or g < min_significance_segvlad else "")
    if ev.segvlad_z is not None and ev.segvlad_z < min_segvlad_z and g >= min_significance_segvlad:
        need = f"< {min_significance:g} and segvlad z {ev.segvlad_z:.1f} < {min_segvlad_z:g}"
    return False, f"rejected: {geo} {need}; {sv}".replace("  ", " ")
