"""Metric loop transforms from depth, measured against motion-capture ground truth.

``python -m megaloc_ros.bench.metric_pose [--features orb|sift|xfeat] [--json out.json]``
``python -m megaloc_ros.bench.metric_pose --rotation``: ``rotation_sources``.

On TUM RGB-D fr3/cabinet (58 keyframes; 52-57 come back to 0-3) it matches local features
between the loop pairs (queries 52..57 x matches 0..3) and neighbouring pairs (i+1, i), estimates
the query pose in the match camera frame with ``megaloc_ros.verification.metric_pose`` from the
match frame's depth, and prints the translation / rotation error of each returned pose against
the ground-truth relative pose, their medians, and how many pairs gave no pose.

Correspondences: mutual nearest neighbours (cross-check, no ratio test) of OpenCV ORB (5000,
FAST threshold 5) or SIFT (all keypoints, contrast threshold 0.004); or the verifier's own local
features (``megaloc_ros.verification.features``, "xfeat": 2000 XFeat keypoints, ratio 0.9 and
mutual), what the verifier would hand over once it computes metric transforms. The scene is a
plain cabinet on a plain floor: the ratio test leaves almost no correct SIFT matches, mutual
neighbours and PnP-RANSAC sort them out.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import numpy as np

from megaloc_ros.verification.metric_pose import MetricPoseParams, estimate_metric_pose, mutual_matches, pose_error

LOOP_PAIRS = [(q, m) for q in range(52, 58) for m in range(0, 4)]
NEIGHBOUR_PAIRS = [(i + 1, i) for i in range(0, 57, 3)]


@dataclass
class PairResult:
    query: int
    match: int
    matches: int
    inliers: int = 0
    rms_px: float = float("nan")
    t_err_m: Optional[float] = None   # None: no pose returned
    r_err_deg: Optional[float] = None
    t_sigma_m: Optional[float] = None  # sqrt(trace) of the translation covariance


@dataclass
class BenchResult:
    features: str
    pairs: list[PairResult] = field(default_factory=list)

    def errors(self, which: str = "all") -> np.ndarray:
        keep = {"all": lambda p: True, "loop": lambda p: p.query - p.match > 1,
                "neighbour": lambda p: p.query - p.match == 1}[which]
        e = [(p.t_err_m, p.r_err_deg) for p in self.pairs if keep(p) and p.t_err_m is not None]
        return np.array(e, np.float64).reshape(-1, 2)

    def summary(self) -> dict:
        out = {"features": self.features}
        for which in ("loop", "neighbour", "all"):
            e = self.errors(which)
            n = sum(1 for p in self.pairs if which == "all" or (which == "loop") == (p.query - p.match > 1))
            out[which] = {"pairs": n, "with_pose": int(len(e)),
                          "median_t_cm": float(np.median(e[:, 0]) * 100) if len(e) else None,
                          "median_r_deg": float(np.median(e[:, 1])) if len(e) else None,
                          "over_10cm": int((e[:, 0] > 0.10).sum()) if len(e) else 0,
                          # how far the fit covariance is from the errors seen (1: calibrated)
                          "median_t_err_over_sigma": float(np.median(
                              [p.t_err_m / p.t_sigma_m for p in self.pairs if p.t_err_m is not None and
                               (which == "all" or (which == "loop") == (p.query - p.match > 1))]))
                          if len(e) else None}
        return out


def run(features: str = "orb", pairs=None, seq=None, params: Optional[MetricPoseParams] = None) -> BenchResult:
    import cv2
    from megaloc_ros.evaluation.trajectory_eval import load_rgbd_sequence
    seq = seq or load_rgbd_sequence("tum_fr3_cabinet")
    params = params or MetricPoseParams(depth_scale=seq.depth_scale)
    pairs = pairs if pairs is not None else LOOP_PAIRS + NEIGHBOUR_PAIRS
    grey = {}

    def g(i):
        if i not in grey:
            grey[i] = cv2.cvtColor(seq.load_rgb(i), cv2.COLOR_RGB2GRAY)
        return grey[i]

    local = {}

    def verifier_matches(q, m):
        from megaloc_ros.verification import features as F
        for i in (q, m):
            if i not in local:
                local[i] = F.extract(seq.load_rgb(i), features, max_keypoints=2000)
        pr = F.match(local[q], local[m], ratio=0.9, mutual=True)
        return local[q].keypoints[pr[:, 0]], local[m].keypoints[pr[:, 1]]

    out = BenchResult(features)
    for q, m in pairs:
        qxy, mxy = verifier_matches(q, m) if features == "xfeat" else mutual_matches(g(q), g(m), features)
        r = PairResult(q, m, len(qxy))
        res = estimate_metric_pose(mxy, qxy, seq.load_depth(m), seq.K, seq.K, params)
        if res is not None:
            truth = np.linalg.inv(seq.poses[m]) @ seq.poses[q]
            r.t_err_m, r.r_err_deg = pose_error(res.matrix, truth)
            r.inliers, r.rms_px = res.num_inliers, res.rms_px
            r.t_sigma_m = float(np.sqrt(np.trace(res.pose.covariance[:3, :3])))
        out.pairs.append(r)
    return out


def rotation_sources(max_angle_deg: float = 60.0, min_significance: float = 6.0, seq=None) -> list[dict]:
    """The verifier's own matches (default ``VerifierParams``) on every TUM fr3/cabinet frame pair
    at most ``max_angle_deg`` apart whose epipolar fit reaches ``min_significance``: the rotation
    error against motion capture of the essential matrix and of PnP on the match frame's depth
    (``verifier.ROTATION_POSE``, at least 10 inliers), with PnP's inlier count and translation
    error. What chose the verifier's ``ROTATION_POSE`` and ``METRIC_MIN_INLIERS`` thresholds."""
    from itertools import combinations
    from megaloc_ros.io import tum
    from megaloc_ros.verification import acontrario, features as F
    from megaloc_ros.verification.metric_pose import keypoint_depths, pose_from_keypoint_depths
    from megaloc_ros.verification.verifier import ROTATION_POSE, VerifierParams, extract_local_features
    seq = seq or tum.tum_fr3_cabinet()
    vp = VerifierParams()
    feats = [extract_local_features(vp, seq.load_rgb(i)) for i in range(len(seq))]
    depth = [keypoint_depths(f.keypoints, seq.depth_m(i), f.image_size) for i, f in enumerate(feats)]
    pnp_params = replace(ROTATION_POSE, min_inliers=6)  # below the verifier's 10, to show why 10
    out = []
    for q, m in combinations(range(len(seq)), 2):
        truth = np.linalg.inv(seq.poses[m]) @ seq.poses[q]
        apart = pose_error(np.eye(4), truth)[1]
        if apart > max_angle_deg:
            continue
        pairs = F.match(feats[q], feats[m], vp.ratio, vp.mutual)
        chk = acontrario.check_pair(feats[q], feats[m], seq.K, seq.K, threshold_px=vp.ransac_threshold_px,
                                    max_threshold_px=vp.max_threshold_px, pairs=pairs)
        if chk.pose is None or chk.significance.score < min_significance:
            continue
        T = np.eye(4)
        T[:3, :3] = chk.pose.rotation
        row = {"query": q, "match": m, "apart_deg": apart, "significance": chk.significance.score,
               "e_inliers": chk.significance.inliers, "e_rot_err_deg": pose_error(T, truth)[1],
               "e_rot_std_deg": float(np.degrees(np.sqrt(chk.pose.covariance[3, 3]))),
               "pnp_inliers": 0, "pnp_rot_err_deg": None, "pnp_t_err_m": None}
        pnp = pose_from_keypoint_depths(feats[m].keypoints, depth[m], seq.K, feats[q].keypoints, seq.K,
                                        pairs, pnp_params)
        if pnp is not None:
            row["pnp_inliers"] = len(pnp.inliers)
            row["pnp_t_err_m"], row["pnp_rot_err_deg"] = pose_error(pnp.matrix, truth)
        out.append(row)
    return out


def print_rotation_sources(rows: list[dict]) -> None:
    print(f"{len(rows)} TUM fr3/cabinet pairs <= 60 deg apart with -log10 NFA >= 6 (verifier defaults)")
    print("PnP inliers  pairs  essential matrix: rot err median / > 10 deg   PnP: rot err median / max"
          "   PnP translation err max")
    for lo, hi in ((0, 6), (6, 10), (10, 20), (20, 10 ** 6)):
        b = [r for r in rows if lo <= r["pnp_inliers"] < hi]
        if not b:
            continue
        e = np.array([r["e_rot_err_deg"] for r in b])
        p = np.array([r["pnp_rot_err_deg"] for r in b if r["pnp_rot_err_deg"] is not None])
        t = np.array([r["pnp_t_err_m"] for r in b if r["pnp_t_err_m"] is not None])
        name = "no pose" if lo == 0 else (f"{lo}-{hi - 1}" if hi < 10 ** 6 else f">= {lo}")
        pnp = f"{np.median(p):5.1f} / {p.max():5.1f} deg" if len(p) else "      -"
        tr = f"{t.max():.2f} m" if len(t) else "-"
        print(f"{name:>11s}  {len(b):5d}  {np.median(e):19.1f} deg / {int((e > 10).sum()):3d}"
              f"           {pnp:>18s}   {tr:>10s}")
    # a 3-D rotation error of per-axis std 1 has median 1.54 and 95th percentile 2.80
    print("essential matrix rotation error / its std (geometry.essential_pose), 3-D Gaussian: median 1.54, "
          "95% below 2.80")
    for name, part in (("even query", 0), ("odd query", 1)):
        z = np.array([r["e_rot_err_deg"] / r["e_rot_std_deg"] for r in rows if r["query"] % 2 == part])
        if len(z):
            print(f"  {name:10s} {len(z):3d} pairs: median {np.median(z):.2f}, {np.mean(z < 2.80):.0%} below 2.80")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", choices=["orb", "sift", "xfeat"], default="orb")
    ap.add_argument("--json", default="")
    ap.add_argument("--rotation", action="store_true", help="instead: where a loop's rotation should come "
                    "from, the essential matrix or PnP, by PnP inlier count (rotation_sources)")
    a = ap.parse_args(argv)
    if a.rotation:
        rows = rotation_sources()
        print_rotation_sources(rows)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    res = run(a.features)
    for p in res.pairs:
        s = ("no pose" if p.t_err_m is None else
             f"{p.inliers:4d} inliers {p.rms_px:.2f} px  error {p.t_err_m * 100:5.1f} cm {p.r_err_deg:5.2f} deg"
             f"  (sigma_t {p.t_sigma_m * 100:.1f} cm)")
        print(f"  query {p.query:2d} match {p.match:2d}  {p.matches:4d} matches  {s}")
    summ = res.summary()
    for which in ("loop", "neighbour", "all"):
        s = summ[which]
        med = (f"median error {s['median_t_cm']:.1f} cm, {s['median_r_deg']:.2f} deg"
               if s["with_pose"] else "no pose")
        ratio = f", error / fit sigma median {s['median_t_err_over_sigma']:.1f}" if s["with_pose"] else ""
        print(f"{which:9s} pairs: {s['with_pose']}/{s['pairs']} with a metric pose, {med}, "
              f"{s['over_10cm']} over 10 cm{ratio}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": summ, "pairs": [asdict(p) for p in res.pairs]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
