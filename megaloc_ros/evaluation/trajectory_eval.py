"""What loops buy a back end: ATE / RPE of drifted odometry vs the pose graph closed by our loops.

``python -m megaloc_ros.evaluation.trajectory_eval --sequence tum_fr3_cabinet``

1. Odometry = ground truth with a seeded random-walk drift (``DriftModel``; its description is
   printed): the odometry integrates the ground-truth increments with a yaw error about the
   vertical and a translation error added at every keyframe step, so heading and position
   drift as random walks.
2. Loops = what ``megaloc_ros.pipeline`` (``build()`` + ``LoopClosurePipeline.process``, the code
   path of the nodes) accepts on the sequence's colour and depth frames, with the metric
   transform the verifier gave them (PnP on the keyframes' depth, ``verification.metric_pose``).
   A loop without one (a unit direction) is skipped and counted, as the pose-graph node skips it.
3. Pose graph (``megaloc_ros.backend.pose_graph``, GTSAM iSAM2) fed in stamp order: one node per
   frame, each loop when its query frame arrives.
4. ATE (RMSE of positions after a rigid SE(3) Umeyama alignment, no scale) and RPE (RMSE of the
   translation of frame-to-next-frame relative poses) against the ground truth, for the odometry
   and the optimised trajectory; then once more with one deliberately wrong loop edge added
   (each of ``WRONG_EDGES`` in turn).

ATE/RPE are computed with ``evo`` (``evo.core.metrics`` APE/RPE, translation part, SE(3)
alignment) when it is installed, else with this module's own Umeyama alignment; ``ate_rpe``
says which it used, and the tests check both agree.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from scipy.spatial.transform import Rotation

from megaloc_ros.io import tum
from megaloc_ros.verification.geometry import Camera
from megaloc_ros.io.tum import TumSequence


# ----------------------------------------------------------------------------- data
def load_rgbd_sequence(name: str = "tum_fr3_cabinet") -> TumSequence:
    """The shipped TUM RGB-D keyframes (``megaloc_ros.io.tum``): colour, registered depth,
    camera-to-world mocap poses, intrinsics."""
    if name != "tum_fr3_cabinet":
        raise ValueError(f"unknown RGB-D sequence {name!r} (known: tum_fr3_cabinet)")
    return tum.tum_fr3_cabinet()


# ----------------------------------------------------------------------------- metrics
def umeyama_se3(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """4x4 rigid transform T minimising sum |dst_i - T src_i|^2 (Umeyama 1991, no scale)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    ms, md = src.mean(0), dst.mean(0)
    C = (dst - md).T @ (src - ms) / len(src)
    U, _, Vt = np.linalg.svd(C)
    S = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[2, 2] = -1
    R = U @ S @ Vt
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, md - R @ ms
    return T


def _ate_rpe_own(gt: np.ndarray, est: np.ndarray) -> tuple[float, float]:
    A = umeyama_se3(est[:, :3, 3], gt[:, :3, 3])
    aligned = np.einsum("ij,njk->nik", A, est)
    ate = float(np.sqrt(np.mean(np.sum((aligned[:, :3, 3] - gt[:, :3, 3]) ** 2, axis=1))))
    e = []
    for i in range(len(gt) - 1):
        dg = np.linalg.inv(gt[i]) @ gt[i + 1]
        de = np.linalg.inv(est[i]) @ est[i + 1]
        e.append(np.linalg.norm((np.linalg.inv(dg) @ de)[:3, 3]))
    return ate, float(np.sqrt(np.mean(np.square(e)))) if e else 0.0


def _ate_rpe_evo(gt: np.ndarray, est: np.ndarray) -> tuple[float, float]:
    import copy
    from evo.core import metrics
    from evo.core.trajectory import PosePath3D
    ref = PosePath3D(poses_se3=[np.array(p) for p in gt])
    e = PosePath3D(poses_se3=[np.array(p) for p in est])
    aligned = copy.deepcopy(e)
    aligned.align(ref, correct_scale=False)
    ape = metrics.APE(metrics.PoseRelation.translation_part)
    ape.process_data((ref, aligned))
    rpe = metrics.RPE(metrics.PoseRelation.translation_part, delta=1, delta_unit=metrics.Unit.frames,
                      all_pairs=False)
    rpe.process_data((ref, e))
    return (float(ape.get_statistic(metrics.StatisticsType.rmse)),
            float(rpe.get_statistic(metrics.StatisticsType.rmse)))


def ate_rpe(gt: np.ndarray, est: np.ndarray, backend: str = "auto") -> tuple[float, float, str]:
    """(ATE RMSE m, RPE RMSE m per frame, "evo" | "umeyama") of ``est`` [N,4,4] against ``gt``."""
    gt, est = np.asarray(gt, np.float64), np.asarray(est, np.float64)
    if backend in ("auto", "evo"):
        try:
            return (*_ate_rpe_evo(gt, est), "evo")
        except ImportError:
            if backend == "evo":
                raise
    return (*_ate_rpe_own(gt, est), "umeyama")


# ----------------------------------------------------------------------------- drift
@dataclass
class DriftModel:
    """Odometry that integrates noisy increments: every keyframe step adds a yaw error (about the
    world vertical) and a translation error, so heading and position drift as random walks and
    the heading error also bends every later step (the way wheel or visual odometry drifts)."""
    sigma_t: float = 0.005         # m per keyframe step, each axis
    sigma_yaw_deg: float = 1.0     # degrees per keyframe step
    seed: int = 0
    up: tuple = (0.0, 0.0, 1.0)    # vertical axis of the ground-truth world frame (TUM: z)

    def describe(self) -> str:
        return (f"odom_0 = T_gt_0; odom_k: R_k = Rz(e_k) R_(k-1) dR_k, p_k = p_(k-1) + Rz(e_k) R_(k-1) dp_k + u_k, "
                f"with (dR_k, dp_k) the ground-truth increment, Rz a rotation about the vertical {list(self.up)}, "
                f"e_k ~ N(0, ({self.sigma_yaw_deg} deg)^2), u_k ~ N(0, ({self.sigma_t} m)^2 I3) per keyframe step, "
                f"seed {self.seed} (heading and position error are random walks)")

    def apply(self, gt: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        n = len(gt)
        yaw = np.radians(rng.normal(0.0, self.sigma_yaw_deg, n))
        u = rng.normal(0.0, self.sigma_t, (n, 3))
        up = np.asarray(self.up, np.float64)
        out = np.empty_like(gt)
        out[0] = gt[0]
        for k in range(1, n):
            inc = np.linalg.inv(gt[k - 1]) @ gt[k]
            Rz = Rotation.from_rotvec(yaw[k] * up).as_matrix()
            out[k] = np.eye(4)
            out[k][:3, :3] = Rz @ out[k - 1][:3, :3] @ inc[:3, :3]
            out[k][:3, 3] = out[k - 1][:3, 3] + Rz @ out[k - 1][:3, :3] @ inc[:3, 3] + u[k]
        return out


# ----------------------------------------------------------------------------- loops
@dataclass
class Loop:
    query: int          # frame indices
    match: int
    T_match_query: np.ndarray
    covariance: np.ndarray
    source: str         # "verifier" (its metric transform) | "wrong" (``wrong_loop``)
    t_err_m: float = float("nan")    # against the ground truth
    r_err_deg: float = float("nan")


def pipeline_loops(seq: TumSequence, settings=None, encoder=None, log=print,
                   sessions: Optional[list[int]] = None) -> tuple[list[Loop], dict]:
    """Accepted loops of the pipeline on the sequence, each with a metric transform (see module doc).
    ``sessions``: per frame, the session (robot) it belongs to (default all 0)."""
    from megaloc_ros import pipeline as P
    from megaloc_ros.verification.metric_pose import pose_error
    first = seq.load_rgb(0)
    pipe = P.build(settings, encoder=encoder, camera=Camera(seq.K, (first.shape[1], first.shape[0])))
    index = {int(s): i for i, s in enumerate(seq.stamps_ns)}
    loops: list[Loop] = []
    counts = {"frames": len(seq), "accepted": 0, "metric": 0, "no_metric_transform": 0}
    for i in range(len(seq)):
        depth = seq.depth_m(i)
        res = pipe.process(seq.load_rgb(i), int(seq.stamps_ns[i]), session=sessions[i] if sessions else 0,
                           depth_m=depth)
        for v in res.loops:
            if not v.accepted:
                continue
            counts["accepted"] += 1
            q, m = index[v.candidate.query.stamp_ns], index[v.candidate.match.stamp_ns]
            if v.transform is None or not v.transform.metric_scale:
                counts["no_metric_transform"] += 1
                log(f"  loop {q} -> {m}: no metric transform ({v.reason}), skipped")
                continue
            T = np.eye(4)
            T[:3, :3], T[:3, 3] = v.transform.rotation, v.transform.translation
            loop = Loop(q, m, T, np.asarray(v.transform.covariance), "verifier")
            counts["metric"] += 1
            truth = np.linalg.inv(seq.poses[m]) @ seq.poses[q]
            loop.t_err_m, loop.r_err_deg = pose_error(loop.T_match_query, truth)
            loops.append(loop)
    return loops, counts


# ----------------------------------------------------------------------------- pose graph run
def optimise(seq: TumSequence, odom: np.ndarray, loops: list[Loop], params=None) -> np.ndarray:
    """Feed nodes and loops in stamp order (a loop once its query frame has arrived); optimised poses."""
    from megaloc_ros.backend.pose_graph import PoseGraph
    g = PoseGraph(params or graph_params())
    by_query: dict[int, list[Loop]] = {}
    for lp in loops:
        by_query.setdefault(max(lp.query, lp.match), []).append(lp)
    for i in range(len(seq)):
        g.add_keyframe(int(seq.stamps_ns[i]), odom[i])
        for lp in by_query.get(i, []):
            r = g.add_loop(int(seq.stamps_ns[lp.query]), int(seq.stamps_ns[lp.match]), lp.T_match_query,
                           lp.covariance, metric_scale=True)
            if r.status != "added":
                raise RuntimeError(f"loop {lp.query}->{lp.match} not added: {r.status} {r.reason}")
        g.update()
    return g.poses()


def graph_params(drift: Optional[DriftModel] = None, step_m: float = 0.15, robust: str = "cauchy"):
    """Pose-graph settings whose odometry noise matches ``drift`` for keyframe steps of about
    ``step_m`` (the yaw error also moves the step's end by yaw * step)."""
    from megaloc_ros.backend.pose_graph import PoseGraphParams
    d = drift or DriftModel()
    yaw = np.radians(d.sigma_yaw_deg)
    return PoseGraphParams(odom_translation_noise=0.0, odom_rotation_noise=0.0,
                           odom_min_sigma_t=float(np.hypot(d.sigma_t, yaw * step_m)),
                           odom_min_sigma_r=float(max(yaw, 1e-3)), robust=robust)


def wrong_loop(seq: TumSequence, loops: list[Loop], query: int = 40, match: int = 15) -> Loop:
    """A deliberately wrong edge: frames ``query`` and ``match`` are far apart, but the edge claims
    the transform (and the confident covariance) of the best true loop."""
    best = min(loops, key=lambda lp: np.trace(lp.covariance[:3, :3])) if loops else None
    T = best.T_match_query.copy() if best is not None else np.eye(4)
    cov = best.covariance.copy() if best is not None else np.diag([1e-4] * 3 + [1e-5] * 3)
    truth = np.linalg.inv(seq.poses[match]) @ seq.poses[query]
    from megaloc_ros.verification.metric_pose import pose_error
    te, re = pose_error(T, truth)
    return Loop(query, match, T, cov, "wrong", te, re)


WRONG_EDGES = ((40, 15), (45, 40))   # far apart (2.65 m, 164 deg), and nearer (0.68 m, 23 deg) on TUM fr3/cabinet


@dataclass
class SeedResult:
    seed: int
    ate_odom: float
    rpe_odom: float
    ate_opt: float
    rpe_opt: float
    ate_opt_wrong: list = field(default_factory=list)   # ATE with each wrong edge added (alone)

    @property
    def gain(self) -> float:
        return self.ate_opt / self.ate_odom

    @property
    def wrong_changes(self) -> list:
        return [abs(a - self.ate_opt) / self.ate_opt for a in self.ate_opt_wrong]

    @property
    def wrong_change(self) -> float:
        return max(self.wrong_changes, default=0.0)


@dataclass
class EvalResult:
    sequence: str
    drift: str                  # the model, for the first seed (the others differ in the seed only)
    metric_backend: str
    loops: list = field(default_factory=list)   # (query, match, source, t_err_cm, r_err_deg)
    counts: dict = field(default_factory=dict)
    wrong_edges: list = field(default_factory=list)   # (query, match, t_err_m, r_err_deg)
    seeds: list = field(default_factory=list)   # SeedResult per drift seed
    robust: str = "cauchy"

    @property
    def median_gain(self) -> float:
        return float(np.median([s.gain for s in self.seeds]))

    @property
    def max_wrong_change(self) -> float:
        return float(max(s.wrong_change for s in self.seeds))

    def meets_goals(self) -> bool:
        return self.median_gain <= 0.5 and self.max_wrong_change <= 0.10


def run(sequence: str = "tum_fr3_cabinet", drift: Optional[DriftModel] = None, seeds: int = 10, settings=None,
        encoder=None, loops: Optional[list[Loop]] = None, wrong_edges=WRONG_EDGES, robust: str = "cauchy",
        log=print) -> EvalResult:
    """Loops once (the pipeline on the frames), then the drift of ``seeds`` seeds from ``drift.seed``
    on, each optimised with the loops and once more per wrong edge added to them."""
    seq = load_rgbd_sequence(sequence)
    drift = drift or DriftModel()
    gt = seq.poses
    counts = {}
    if loops is None:
        loops, counts = pipeline_loops(seq, settings, encoder, log=log)
    bad = [wrong_loop(seq, loops, q, m) for q, m in wrong_edges]
    out = EvalResult(seq.name, drift.describe(), "",
                     [(lp.query, lp.match, lp.source, round(lp.t_err_m * 100, 2), round(lp.r_err_deg, 2))
                      for lp in loops], counts,
                     [(b.query, b.match, round(b.t_err_m, 3), round(b.r_err_deg, 1)) for b in bad], robust=robust)
    for k in range(seeds):
        d = DriftModel(drift.sigma_t, drift.sigma_yaw_deg, drift.seed + k, drift.up)
        odom = d.apply(gt)
        gp = graph_params(d, robust=robust)
        est = optimise(seq, odom, loops, gp)
        a_o, r_o, out.metric_backend = ate_rpe(gt, odom)
        a_e, r_e, _ = ate_rpe(gt, est)
        wrong = [ate_rpe(gt, optimise(seq, odom, loops + [b], gp))[0] for b in bad]
        out.seeds.append(SeedResult(d.seed, a_o, r_o, a_e, r_e, wrong))
    return out


def report(r: EvalResult) -> str:
    lines = [f"sequence {r.sequence}; pose graph robust loss: {r.robust}", f"drift model: {r.drift}",
             f"loops: {r.counts}" if r.counts else f"loops given: {len(r.loops)}"]
    for q, m, src, te, re in r.loops:
        lines.append(f"  loop query {q:2d} -> match {m:2d} ({src}): error vs ground truth {te:.1f} cm {re:.2f} deg")
    for k, (q, m, te, re) in enumerate(r.wrong_edges):
        lines.append(f"wrong edge W{k + 1} (added alone, with the transform and covariance of the most confident "
                     f"true loop): query {q} -> match {m}, {te} m / {re} deg from the truth")
    head = " | ".join(f"+W{k + 1} ATE (change)" for k in range(len(r.wrong_edges)))
    lines += [f"ATE / RPE in cm ({r.metric_backend}; ATE = position RMSE after SE(3) alignment, "
              f"RPE = translation RMSE frame to frame):",
              f"  seed | odometry ATE  RPE | optimised ATE  RPE | optimised/odometry | {head}"]
    for s in r.seeds:
        wrong = " | ".join(f"{a * 100:8.2f} ({c * 100:4.1f}%)" for a, c in zip(s.ate_opt_wrong, s.wrong_changes))
        lines.append(f"  {s.seed:4d} | {s.ate_odom * 100:12.2f} {s.rpe_odom * 100:4.2f} | {s.ate_opt * 100:13.2f} "
                     f"{s.rpe_opt * 100:4.2f} | {s.gain:18.2f} | {wrong}")
    lines.append(f"median optimised/odometry ATE {r.median_gain:.2f} (goal <= 0.5); largest change from a wrong "
                 f"loop {r.max_wrong_change * 100:.1f}% (goal <= 10%): {'met' if r.meets_goals() else 'NOT met'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="ATE/RPE of drifted odometry vs the pose graph closed by our loops")
    ap.add_argument("--sequence", default="tum_fr3_cabinet")
    ap.add_argument("--seed", type=int, default=0, help="first drift seed")
    ap.add_argument("--seeds", type=int, default=10, help="drift seeds to run")
    ap.add_argument("--sigma-t", type=float, default=DriftModel.sigma_t)
    ap.add_argument("--sigma-yaw-deg", type=float, default=DriftModel.sigma_yaw_deg)
    ap.add_argument("--robust", default="cauchy", choices=["cauchy", "huber", "gnc", "none"],
                    help="robust loss of the loop factors (PoseGraphParams.robust)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    r = run(a.sequence, DriftModel(a.sigma_t, a.sigma_yaw_deg, a.seed), seeds=a.seeds, robust=a.robust)
    print(report(r))
    if a.json:
        d = asdict(r)
        d.update(median_gain=r.median_gain, max_wrong_change=r.max_wrong_change)
        Path(a.json).write_text(json.dumps(d, indent=1))
    return 0 if r.meets_goals() else 1


if __name__ == "__main__":
    sys.exit(main())
