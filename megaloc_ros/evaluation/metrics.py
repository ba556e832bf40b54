"""Loop-closure metrics (pure numpy). Definitions, used everywhere in the report:

* Frames are in bag order. ``gt`` is the symmetric same-place matrix (evaluation.ground_truth).
* A *valid* true match of query ``q`` is a frame ``m`` with ``gt[q, m]``, ``m < q`` and
  ``stamp[q] - stamp[m] >= exclude_s`` (``valid_pairs``): an online detector only searches the
  past and excludes its most recent frames. A retrieved match inside the exclusion window counts
  as false.
* Recall denominator (``n_positive``): query *frames* (every image on the topic, keyframe or
  not) with at least one valid true match (``ground_truth.has_true_match``); ``RECALL_UNIT``.
  Only keyframes query the map, so a frame that is not a keyframe counts as a miss.
* Unreachable (``unreachable``): positive frames the detector could not report whatever its
  thresholds, because keyframe selection skipped the frame or all its true matches, or its
  exclusion windows (``exclude_recent_keyframes``, ``exclude_recent_s``) hide every true match
  that is a keyframe. Recall cannot exceed (n_positive - unreachable) / n_positive.
* Each query predicts its best retrieved match (rank 0) with its global cosine score. At
  threshold ``t`` the prediction is positive if score >= t; a positive is a TP if it is a valid
  true match, else an FP. precision = TP / positives (1 when there are none), recall =
  TP / n_positive.
* PR curve: one point per distinct score, thresholds descending. AUC: trapezoid rule over
  recall, starting from (recall 0, precision of the first point) — the area under the step-free
  interpolation between points.
* Max recall at 100% precision: the largest recall over thresholds with no FP (0 if none).
* Recall@K: among the ``n_positive`` queries, the share whose top-K retrieved frames contain a
  valid true match.
* *With verification*: the same, using per query only the candidates the verifier accepted;
  the query's prediction is its accepted candidate with the highest global score, swept over
  that global score (so a rejected candidate is simply not a prediction).
* Unlabelled pairs (``labeled``, a set that labels only some pairs, e.g. query-reference): a
  match on a pair the set does not label is neither true nor false; it is left out of the curve
  and the precision, and the operating point counts it as ``unlabeled_loops`` (only when
  ``labeled`` is given).
* Operating point: what the system publishes at its configured thresholds, counted per loop
  (precision = true loops / published loops; None, shown "-", when nothing was published) and
  per query (recall = queries with at least one true loop / n_positive; None when n_positive is
  0, as are recall@K).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from megaloc_ros.evaluation.ground_truth import valid_pairs
from megaloc_ros.types import SECOND_NS

RECALL_UNIT = "frames"  # what n_positive counts: images on the topic, keyframes or not

# per query frame: [(match frame index, score), ...] in rank order (best first)
Matches = Sequence[tuple[int, float]]


@dataclass
class PRCurve:
    thresholds: np.ndarray  # descending
    precision: np.ndarray
    recall: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_positive: int

    @property
    def auc(self) -> float:
        if len(self.recall) == 0:
            return 0.0
        r = np.concatenate([[0.0], self.recall])
        p = np.concatenate([[self.precision[0]], self.precision])
        return float(np.sum(np.diff(r) * (p[1:] + p[:-1]) / 2.0))

    @property
    def max_recall_at_full_precision(self) -> float:
        ok = self.fp == 0
        return float(self.recall[ok].max()) if np.any(ok) else 0.0

    @property
    def threshold_at_full_precision(self) -> float | None:
        """Lowest threshold with no false positive (None if every threshold has one)."""
        ok = self.fp == 0
        return float(self.thresholds[ok].min()) if np.any(ok) else None

    def to_dict(self) -> dict:
        return {"thresholds": self.thresholds.tolist(), "precision": self.precision.tolist(),
                "recall": self.recall.tolist(), "tp": self.tp.tolist(), "fp": self.fp.tolist(),
                "n_positive": self.n_positive}


def pr_curve(scores, correct, n_positive: int) -> PRCurve:
    """PR curve of one prediction per query. ``scores`` float [Q] (NaN or -inf = no prediction),
    ``correct`` bool [Q]."""
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct, bool)
    has = np.isfinite(s)
    s, c = s[has], c[has]
    order = np.argsort(-s, kind="stable")
    s, c = s[order], c[order]
    tp_cum = np.cumsum(c)
    fp_cum = np.cumsum(~c)
    # one point per distinct score: the last prediction of each group of ties
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1] if len(s) else np.array([], int)
    tp, fp = tp_cum[last], fp_cum[last]
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    recall = tp / n_positive if n_positive > 0 else np.zeros(len(tp))
    return PRCurve(s[last], precision.astype(float), recall.astype(float),
                   tp.astype(int), fp.astype(int), int(n_positive))


def best_prediction(matches: Sequence[Matches]) -> tuple[np.ndarray, np.ndarray]:
    """(match frame int [Q] (-1 = none), score float [Q] (-inf = none)) from rank-0 entries."""
    match = np.full(len(matches), -1, dtype=np.int64)
    score = np.full(len(matches), -np.inf)
    for q, ms in enumerate(matches):
        if ms:
            m, s = max(ms, key=lambda x: x[1])
            match[q], score[q] = m, s
    return match, score


def _labelled(matches: Sequence[Matches], labeled) -> Sequence[Matches]:
    if labeled is None:
        return matches
    return [[(m, s) for m, s in ms if labeled[q, m]] for q, ms in enumerate(matches)]


def curve_from_matches(matches: Sequence[Matches], valid: np.ndarray, labeled=None) -> PRCurve:
    """PR curve over the best match of each query; ``valid`` from ``valid_pairs``; ``labeled``:
    the pairs the ground truth labels (None: all)."""
    match, score = best_prediction(_labelled(matches, labeled))
    q = np.arange(len(matches))
    correct = np.zeros(len(matches), bool)
    has = match >= 0
    correct[has] = valid[q[has], match[has]]
    return pr_curve(score, correct, int(valid.any(axis=1).sum()))


def recall_at_k(matches: Sequence[Matches], valid: np.ndarray, k: int) -> float | None:
    """Share of queries with a valid true match whose top-``k`` (by score) contain one (None
    when no query has one)."""
    positive = np.any(valid, axis=1)
    n = int(positive.sum())
    if n == 0:
        return None  # no true loop to find: recall is undefined
    hit = 0
    for q in np.nonzero(positive)[0]:
        top = sorted(matches[q], key=lambda x: -x[1])[:k]
        hit += any(valid[q, m] for m, _ in top)
    return hit / n


def operating_point(published: Sequence[Matches], valid: np.ndarray, labeled=None) -> dict:
    """Precision per published loop, recall per query, for what the system actually output;
    loops on pairs ``labeled`` leaves out are counted apart (module doc)."""
    tp = fp = unlabeled = 0
    found = np.zeros(len(published), bool)
    for q, ms in enumerate(published):
        for m, _ in ms:
            if labeled is not None and not labeled[q, m]:
                unlabeled += 1
            elif valid[q, m]:
                tp += 1
                found[q] = True
            else:
                fp += 1
    n_pos = int(valid.any(axis=1).sum())
    out = {"loops": tp + fp, "true_loops": tp, "false_loops": fp,
           "precision": tp / (tp + fp) if tp + fp else None,
           "recall": float(found.sum() / n_pos) if n_pos else None,
           "queries_with_true_loop": int(found.sum()), "n_positive": n_pos}
    if labeled is not None:
        out["unlabeled_loops"] = unlabeled
    return out


KEYFRAME_SELECTION = ("keyframe selection (detector.min_keyframe_interval_s, max_similarity_to_last, "
                      "min_travel_m / min_rotation_deg)")


def unreachable(valid: np.ndarray, keyframe_ids, stamps_ns, exclude_recent_s: float,
                exclude_recent_keyframes: int, skipped=()) -> dict:
    """Which frames with a valid true match (``valid`` from ``valid_pairs``) the detector could
    not report with these settings, and the setting responsible.

    ``keyframe_ids``: per frame its keyframe id, or None / -1 when it was not a keyframe;
    ``skipped``: frames that could not be decoded (not keyframes either). A
    query keyframe ``q`` retrieves map keyframe ``m`` only when ``id(q) - id(m) >
    exclude_recent_keyframes`` and ``stamp(q) - stamp(m) > exclude_recent_s`` (the detector
    excludes both windows inclusively, ``LoopDetector._exclusions``).

    Returns ``{"n": hidden frames, "n_positive", "n_positive_keyframes": positive frames that are
    keyframes, "max_recall": the recall ceiling, "by_setting": {setting: count},
    "frames": {setting: [frame index, ...]}}``; settings are named as ``--set`` takes them, with
    their value.
    """
    valid = np.asarray(valid, bool)
    kf = np.array([-1 if k is None else int(k) for k in keyframe_ids], np.int64)
    t = np.asarray(stamps_ns, np.int64)
    ex_ns = int(round(exclude_recent_s * SECOND_NS))
    k_name = f"detector.exclude_recent_keyframes={exclude_recent_keyframes}"
    s_name = f"detector.exclude_recent_s={exclude_recent_s:g}"
    positives = np.flatnonzero(valid.any(axis=1))
    skipped = {int(x) for x in skipped}
    frames: dict[str, list[int]] = {}
    for q in positives:
        why = None
        ms = np.flatnonzero(valid[q])
        km = ms[kf[ms] >= 0]
        if q in skipped:
            why = "the frame could not be decoded (skipped)"
        elif kf[q] < 0:
            why = KEYFRAME_SELECTION + ": the frame was not a keyframe"
        elif not len(km) and all(int(x) in skipped for x in ms):
            why = "its true matches could not be decoded (skipped)"
        elif not len(km):
            why = KEYFRAME_SELECTION + ": none of its true matches was a keyframe"
        else:
            by_k = (kf[q] - kf[km] <= exclude_recent_keyframes) if exclude_recent_keyframes > 0 \
                else np.zeros(len(km), bool)
            by_s = (t[q] - t[km] <= ex_ns) if exclude_recent_s > 0 else np.zeros(len(km), bool)
            if np.all(by_k | by_s):
                if by_k.all() and by_s.all():
                    why = f"{k_name} and {s_name} (each hides every true match)"
                elif by_k.all():
                    why = k_name
                elif by_s.all():
                    why = s_name
                else:
                    why = f"{k_name} and {s_name} together"
        if why is not None:
            frames.setdefault(why, []).append(int(q))
    n_hidden = sum(len(v) for v in frames.values())
    n_pos = len(positives)
    return {"n": n_hidden, "n_positive": n_pos, "n_positive_keyframes": int((kf[positives] >= 0).sum()),
            "max_recall": (n_pos - n_hidden) / n_pos if n_pos else None,
            "by_setting": {k: len(v) for k, v in sorted(frames.items(), key=lambda x: -len(x[1]))},
            "frames": frames}


def frame_ranges(frames) -> str:
    """'3-7, 12, 15-16' for sorted frame indices."""
    out, run = [], []
    for f in sorted(frames):
        if run and f == run[-1] + 1:
            run.append(f)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [f]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def latency_summary(samples: dict[str, Sequence[float]]) -> dict[str, dict]:
    """Per stage: median, p99 (linear interpolation), mean, max, count, in milliseconds."""
    out = {}
    for stage, xs in samples.items():
        a = np.asarray(xs, dtype=np.float64)
        if a.size == 0:
            continue
        out[stage] = {"median_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)),
                      "mean_ms": float(a.mean()), "max_ms": float(a.max()), "n": int(a.size)}
    return out


def summarize(retrieved: Sequence[Matches], published: Sequence[Matches],
              accepted: Sequence[Matches], gt: np.ndarray, stamps_ns, exclude_s: float,
              ks: Sequence[int] = (1, 5)) -> tuple[dict, dict[str, PRCurve]]:
    """All retrieval metrics of one replay. ``retrieved``: raw top-k per frame (for the sweep);
    ``published``: the detector's candidates; ``accepted``: candidates the verifier accepted
    (empty lists when no verifier ran). Returns (metrics dict, curves by name)."""
    valid = valid_pairs(gt, stamps_ns, exclude_s)
    curves = {"retrieval": curve_from_matches(retrieved, valid),
              "verified": curve_from_matches(accepted, valid)}
    m: dict = {"n_frames": len(retrieved), "n_positive": int(valid.any(axis=1).sum()), "recall_unit": RECALL_UNIT,
               "gt_pairs": int(np.triu(np.asarray(gt, bool)).sum()), "exclude_s": exclude_s}
    defined = m["n_positive"] > 0  # without a true loop there is no recall, so no curve to speak of
    for name, c in curves.items():
        m[name] = {"auc": c.auc if defined else None,
                   "max_recall_at_100_precision": c.max_recall_at_full_precision if defined else None,
                   "threshold_at_100_precision": c.threshold_at_full_precision if defined else None}
    for k in ks:
        m["retrieval"][f"recall@{k}"] = recall_at_k(retrieved, valid, k)
        m["verified"][f"recall@{k}"] = recall_at_k(accepted, valid, k)
    m["published"] = operating_point(published, valid)
    m["verified"]["operating_point"] = operating_point(accepted, valid)
    return m, curves
