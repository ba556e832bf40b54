"""Two robots, one map: the TUM fr3/cabinet keyframes split between robot A (the first half) and
robot B (the second half), merged by the fleet pose graph once an inter-robot loop exists.

``megaloc-ros eval --pose-graph tum_fr3_cabinet --robots 2``

1. Odometry: each robot's own, from its own origin, drifted as in ``trajectory_eval.DriftModel``
   (seeded; B's seed is A's + 1000). A's odometry frame is the ground truth's world frame (its
   first pose is the true one); B's starts at the identity where B starts, so where B's odometry
   frame sits in A's (the truth is B's first ground-truth pose) is unknown to the graph.
2. Loops: ``trajectory_eval.pipeline_loops`` (the nodes' pipeline stages) with each frame's
   session = its robot, so B's keyframes are searched against A's the way a peer's shared
   keyframes are (another session: no temporal exclusion), each loop with a metric transform.
3. ``backend.fleet_graph.FleetPoseGraph`` fed in stamp order, a loop when its later frame arrives,
   solved after each loop. B joins A's map at the first inter-robot loop.
4. Printed per seed: the frame at which B joined, the error of B's odometry origin in the map
   (T_map_odom_B against the truth, after the ATE's alignment), the ATE of the merged trajectory (both robots' keyframes in
   the one map frame, one SE(3) alignment for all) and, for reference, each robot's odometry ATE
   aligned on its own (no common frame) and the single-robot pose graph over the whole sequence
   with the same loops (``trajectory_eval.optimise``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from megaloc_ros.evaluation import trajectory_eval as TE
from megaloc_ros.verification.metric_pose import pose_error

ROBOTS = ("robot_a", "robot_b")


def split_odometry(gt: np.ndarray, split: int, drift: TE.DriftModel) -> tuple[np.ndarray, np.ndarray]:
    """(A's odometry [split, 4, 4], B's [N - split, 4, 4]) per the module doc."""
    a = drift.apply(gt[:split])
    rel = np.einsum("ij,njk->nik", np.linalg.inv(gt[split]), gt[split:])
    b = TE.DriftModel(drift.sigma_t, drift.sigma_yaw_deg, drift.seed + 1000, drift.up).apply(rel)
    return a, b


@dataclass
class FleetSeed:
    seed: int
    merged_at_frame: int          # B's frame whose loop merged it (-1: never)
    origin_error: tuple           # (m, deg) of T_map_odom_B
    ate_merged: float             # m, both robots in the map frame
    ate_odom_a: float             # m, each robot's odometry aligned on its own
    ate_odom_b: float
    ate_single_robot: float       # m, one robot, whole sequence, same loops


@dataclass
class FleetResult:
    sequence: str
    frames: int
    split: int
    drift: str
    loops: list                   # (query frame, match frame, robots, source)
    counts: dict
    seeds: list = field(default_factory=list)

    @property
    def inter_robot_loops(self) -> int:
        return sum(1 for lp in self.loops if lp[2] == "B->A" or lp[2] == "A->B")

    def median(self, name: str) -> float:
        return float(np.median([getattr(s, name) for s in self.seeds]))


def robot_of(i: int, split: int) -> str:
    return ROBOTS[0] if i < split else ROBOTS[1]


def merge(seq, split: int, odom_a: np.ndarray, odom_b: np.ndarray, loops: list, params):
    """The fleet graph over both robots (module doc, step 3): (graph, B's frame that merged it or -1)."""
    from megaloc_ros.backend.fleet_graph import FleetPoseGraph
    g = FleetPoseGraph(params)
    by_frame: dict[int, list] = {}
    for lp in loops:
        by_frame.setdefault(max(lp.query, lp.match), []).append(lp)
    merged_at = -1
    for i in range(len(seq)):
        robot = robot_of(i, split)
        g.add_keyframe(robot, int(seq.stamps_ns[i]), odom_a[i] if i < split else odom_b[i - split])
        new = by_frame.get(i, [])
        for lp in new:
            r = g.add_loop(robot_of(lp.query, split), int(seq.stamps_ns[lp.query]), robot_of(lp.match, split),
                           int(seq.stamps_ns[lp.match]), lp.T_match_query, lp.covariance)
            if r.status != "added":
                raise RuntimeError(f"loop {lp.query}->{lp.match} not added: {r.status} {r.reason}")
        if new:
            g.update()
            if merged_at < 0 and g.merged(ROBOTS[1]):
                merged_at = i
    g.update()
    return g, merged_at


def run(drift: Optional[TE.DriftModel] = None, seeds: int = 10, split: Optional[int] = None, settings=None,
        encoder=None, loops=None, log=print) -> FleetResult:
    seq = TE.load_rgbd_sequence("tum_fr3_cabinet")
    n = len(seq)
    split = n // 2 if split is None else split
    drift = drift or TE.DriftModel()
    gt = seq.poses
    counts = {}
    if loops is None:
        loops, counts = TE.pipeline_loops(seq, settings, encoder, log=log,
                                          sessions=[0 if i < split else 1 for i in range(n)])
    names = {(True, True): "A->A", (False, False): "B->B", (False, True): "B->A", (True, False): "A->B"}
    out = FleetResult(seq.name, n, split, drift.describe(),
                      [(lp.query, lp.match, names[(lp.query < split, lp.match < split)], lp.source) for lp in loops],
                      counts)
    for k in range(seeds):
        d = TE.DriftModel(drift.sigma_t, drift.sigma_yaw_deg, drift.seed + k, drift.up)
        odom_a, odom_b = split_odometry(gt, split, d)
        gp = TE.graph_params(d)
        g, merged_at = merge(seq, split, odom_a, odom_b, loops, gp)
        if g.merged(ROBOTS[1]):
            est = np.concatenate([g.poses(ROBOTS[0]), g.poses(ROBOTS[1])])
            ate = TE.ate_rpe(gt, est)[0]
            # B's origin in the map after the alignment the ATE uses (the map frame itself is A's
            # odometry frame, which drifts from the world with nothing to correct it absolutely)
            align = TE.umeyama_se3(est[:, :3, 3], gt[:, :3, 3])
            origin = pose_error(align @ g.origin(ROBOTS[1]), gt[split])
        else:
            ate, origin = float("nan"), (float("nan"), float("nan"))
        single = TE.optimise(seq, d.apply(gt), loops, gp)
        out.seeds.append(FleetSeed(d.seed, merged_at, origin, ate, TE.ate_rpe(gt[:split], odom_a)[0],
                                   TE.ate_rpe(gt[split:], odom_b)[0], TE.ate_rpe(gt, single)[0]))
    return out


def report(r: FleetResult) -> str:
    lines = [f"sequence {r.sequence} split between two robots: A = frames 0-{r.split - 1}, "
             f"B = frames {r.split}-{r.frames - 1}, each with its own odometry origin",
             f"drift model (per robot, B's seed = A's + 1000): {r.drift}",
             f"loops: {r.counts}" if r.counts else f"loops given: {len(r.loops)}"]
    for q, m, kind, src in r.loops:
        lines.append(f"  loop query {q:2d} -> match {m:2d} ({kind}, {src})")
    lines.append(f"inter-robot loops: {r.inter_robot_loops}")
    lines += ["ATE in cm (position RMSE after one SE(3) alignment of both robots); B's origin = T_map_odom_B "
              "against the truth, after that alignment:",
              "  seed | B joined at frame | B origin error cm / deg | merged ATE (A+B, one frame) | "
              "odometry ATE A / B (each aligned alone) | one robot, whole sequence"]
    for s in r.seeds:
        lines.append(f"  {s.seed:4d} | {s.merged_at_frame:17d} | {s.origin_error[0] * 100:10.2f} / "
                     f"{s.origin_error[1]:5.2f} | {s.ate_merged * 100:27.2f} | "
                     f"{s.ate_odom_a * 100:18.2f} / {s.ate_odom_b * 100:6.2f} | {s.ate_single_robot * 100:10.2f}")
    if r.seeds:
        lines.append(f"median merged ATE {r.median('ate_merged') * 100:.2f} cm (one robot over the whole "
                     f"sequence with the same loops: {r.median('ate_single_robot') * 100:.2f} cm); B joined the map "
                     f"in {sum(s.merged_at_frame >= 0 for s in r.seeds)} of {len(r.seeds)} seeds")
    return "\n".join(lines)
