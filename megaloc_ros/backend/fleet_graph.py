"""Several robots' pose graphs merged into one map frame once loops connect them (GTSAM).

Each robot keeps its own odometry frame: its keyframes ``x_r(i)`` form a chain of odometry
factors exactly as in ``PoseGraph`` (same noise model, ``pose_graph.odometry_covariance``).
Where a robot's odometry frame sits in the map is a variable of its own, ``o_r`` = T_map_odom_r
(the relative frame of the robots' odometry origins), tied to the robot's first node by that
node's odometry pose (a tight factor, ``prior_sigma``). The reference robot, the first one added,
defines the map: a tight prior holds its ``o`` at the identity, so the map frame is its odometry
frame. Loops within a robot and between robots are the same robust ``BetweenFactorPose3`` as in
``PoseGraph`` (``pose_graph.loop_edge``: camera extrinsic, default and minimum sigmas).

A robot joins the map ("merged") when a loop connects it to a merged robot: before that its
``o_r`` is unobservable, so its nodes stay out of the solve and it has no map-frame pose
(``poses`` returns None), and its intra-robot loops wait. At the loop that merges it, ``o_r`` is
initialised from that loop and the merged robot's current estimate, its nodes from ``o_r`` and
their odometry; every later solve moves ``o_r`` with the rest. ``update`` solves the merged robots'
factors from the current estimate: Levenberg-Marquardt with a Huber loss on the loops, then the
Cauchy loss from there (``robust`` "cauchy"; "huber" or "none" as in ``PoseGraph``, "gnc" is not
offered here).

Nodes come from ``add_keyframe`` (a peer's shared nodes, or keyframes chosen by the caller) or
from ``add_odometry`` (dense odometry, a node by ``PoseGraph``'s distance / angle / time rule). A
loop end between two nodes of its robot is attached to the nearer one through the pose
interpolated between them (``PoseGraph`` uses its dense odometry there; a peer's nodes are all a
fleet graph knows of it); a loop with an end after its robot's last node waits until that robot's
nodes reach it; one farther than ``max_stamp_gap`` from every node is refused.

``save`` / ``load``: numpy .npz (no pickle): robots, their nodes, the loops, the estimate.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import gtsam
import numpy as np

from megaloc_ros import fleet
from megaloc_ros.backend.pose_graph import (LoopResult, PoseGraphParams, interpolate_pose, is_new_node, loop_edge,
                                            noise_model, odometry_covariance, to_matrix, to_pose3)
from megaloc_ros.errors import MapFileError, MegalocError
from megaloc_ros.io.files import atomic_write

FORMAT = "megaloc_ros.fleet_graph/1"


@dataclass
class _Robot:
    index: int
    stamps: list = field(default_factory=list)   # node stamps (ns), increasing
    odom: list = field(default_factory=list)     # node odometry poses (odom_r <- base)


class FleetPoseGraph:
    """See the module docstring. Not thread-safe: one caller at a time."""

    def __init__(self, params: Optional[PoseGraphParams] = None, reference: Optional[str] = None):
        """``reference``: the robot whose odometry frame is the map (default: the first one added)."""
        self.params = params or PoseGraphParams()
        if self.params.robust == "gnc":
            raise MegalocError("the fleet graph offers robust cauchy, huber or none (not gnc)")
        self.robots: dict[str, _Robot] = {}
        self.reference: Optional[str] = reference
        # loops: (match robot, match node, query robot, query node, measurement, GTSAM covariance)
        self.loops: list[tuple[str, int, str, int, np.ndarray, np.ndarray]] = []
        self._merged: set[str] = set()
        self._estimate: dict[int, np.ndarray] = {}   # key -> 4x4, merged robots only
        self.merge_events: list[tuple[str, int]] = []  # (robot, loop count when it joined)
        self._pending: list[tuple] = []   # add_loop arguments of loops waiting for their nodes
        self.needs_update = False         # loops added since the last ``update``
        self.stats = {"nodes": 0, "loops": 0, "inter_robot_loops": 0, "refused": 0, "skipped_unit": 0,
                      "pending": 0}

    # ------------------------------------------------------------------ keys
    def _x(self, robot: str, i: int) -> int:
        return gtsam.symbol("x", self.robots[robot].index * 1_000_000 + i)

    def _o(self, robot: str) -> int:
        return gtsam.symbol("o", self.robots[robot].index)

    # ------------------------------------------------------------------ input
    def add_keyframe(self, robot: str, stamp_ns: int, T_odom_base: np.ndarray) -> int:
        """A node of ``robot`` at its odometry pose; returns its index in that robot's chain."""
        r = self.robots.get(robot)
        if r is None:
            r = self.robots[robot] = _Robot(len(self.robots))
            if self.reference is None:
                self.reference = robot
            if robot == self.reference:
                self._merged.add(robot)
                self._estimate[self._o(robot)] = np.eye(4)
        stamp_ns = int(stamp_ns)
        if r.stamps and stamp_ns <= r.stamps[-1]:
            raise ValueError(f"{robot}: keyframe stamp {stamp_ns} is not after the last node's {r.stamps[-1]}")
        T = np.asarray(T_odom_base, np.float64)
        r.stamps.append(stamp_ns)
        r.odom.append(T)
        if robot in self._merged:
            i = len(r.stamps) - 1
            prev = self._estimate.get(self._x(robot, i - 1)) if i else None
            self._estimate[self._x(robot, i)] = (self._estimate[self._o(robot)] @ T if prev is None
                                                 else prev @ np.linalg.inv(r.odom[i - 1]) @ T)
        self.stats["nodes"] += 1
        self._retry_pending()
        return len(r.stamps) - 1

    def add_odometry(self, robot: str, stamp_ns: int, T_odom_base: np.ndarray) -> Optional[int]:
        """A dense odometry sample of ``robot``: a node when it moved, turned or waited enough since
        its last one (``PoseGraph``'s rule); returns the node's index, else None."""
        r = self.robots.get(robot)
        if r is not None and r.stamps:
            if int(stamp_ns) <= r.stamps[-1] or not is_new_node(self.params, r.stamps[-1], r.odom[-1],
                                                                int(stamp_ns), np.asarray(T_odom_base)):
                return None
        return self.add_keyframe(robot, stamp_ns, T_odom_base)

    def add_nodes(self, robot: str, stamps, poses) -> int:
        """A robot's shared nodes (stamps ns, odometry poses 4x4), of which those after its last
        node are added (a peer resends its whole chain); returns how many were."""
        r = self.robots.get(robot)
        last = r.stamps[-1] if r is not None and r.stamps else -1
        added = 0
        for stamp, T in zip(stamps, poses):
            if int(stamp) > last:
                self.add_keyframe(robot, int(stamp), T)
                last, added = int(stamp), added + 1
        return added

    def robot_names(self) -> list[str]:
        return list(self.robots)

    def robot_of_session(self, session: int) -> Optional[str]:
        """The robot (this graph knows) whose fleet session is ``session`` (``fleet.robot_session``)."""
        names = list(self.robots) + ([self.reference] if self.reference else [])
        return next((n for n in names if fleet.robot_session(n) == session), None)

    def _attach(self, robot: str, stamp_ns: int):
        """(node, node base -> base at ``stamp_ns``), "later" (after the robot's last node) or None."""
        r = self.robots.get(robot)
        if r is None or not r.stamps or stamp_ns > r.stamps[-1]:
            return "later"
        s, gap = r.stamps, self.params.max_stamp_gap * 1e9
        j = bisect.bisect_left(s, stamp_ns)
        if j < len(s) and s[j] == stamp_ns:
            return j, np.eye(4)
        if j == 0:
            return (0, np.eye(4)) if s[0] - stamp_ns <= gap else None
        n = j - 1 if stamp_ns - s[j - 1] <= s[j] - stamp_ns else j
        if abs(s[n] - stamp_ns) > gap:
            return None
        T = interpolate_pose(stamp_ns, s[j - 1], r.odom[j - 1], s[j], r.odom[j])
        return n, np.linalg.inv(r.odom[n]) @ T

    def _retry_pending(self) -> None:
        if not self._pending:
            return
        waiting, self._pending = self._pending, []
        for args in waiting:
            self.add_loop(*args)   # either attached now, or back in the list
        self.stats["pending"] = len(self._pending)

    def add_loop(self, query_robot: str, query_stamp_ns: int, match_robot: str, match_stamp_ns: int,
                 T_match_query: np.ndarray, covariance: Optional[np.ndarray] = None,
                 metric_scale: bool = True) -> LoopResult:
        """A verified loop between two keyframes (of one robot or of two); call ``update`` to solve."""
        if not metric_scale:
            self.stats["skipped_unit"] += 1
            return LoopResult("skipped_unit", "translation is a unit direction (no depth): not a metric constraint")
        aq, am = self._attach(query_robot, int(query_stamp_ns)), self._attach(match_robot, int(match_stamp_ns))
        if aq is None or am is None:
            self.stats["refused"] += 1
            return LoopResult("refused", "a stamp is outside its robot's nodes")
        if "later" in (aq, am):
            self._pending.append((query_robot, query_stamp_ns, match_robot, match_stamp_ns,
                                  np.asarray(T_match_query, np.float64).copy(), covariance, True))
            self._pending = self._pending[-1000:]
            self.stats["pending"] = len(self._pending)
            return LoopResult("pending", "a stamp is after its robot's last node: waits for it")
        (nq, Dq), (nm, Dm) = aq, am
        if query_robot == match_robot and nq == nm:
            self.stats["refused"] += 1
            return LoopResult("refused", "both ends fall on the same node")
        M, cov = loop_edge(self.params, Dq, Dm, T_match_query, covariance)
        self.loops.append((match_robot, nm, query_robot, nq, M, cov))
        self.stats["loops"] += 1
        self.needs_update = True
        self.stats["inter_robot_loops"] += query_robot != match_robot
        self._merge()
        return LoopResult("added", "", nq, nm)

    def _merge(self) -> None:
        """Let every robot that a loop now connects to a merged one join the map (module doc)."""
        grew = True
        while grew:
            grew = False
            for rm, nm, rq, nq, M, _ in self.loops:
                if (rm in self._merged) == (rq in self._merged):
                    continue
                # X_q = X_m M: the new robot's node follows from the merged one's estimate
                if rm in self._merged:
                    new, n_new, X_new = rq, nq, self._estimate[self._x(rm, nm)] @ M
                else:
                    new, n_new, X_new = rm, nm, self._estimate[self._x(rq, nq)] @ np.linalg.inv(M)
                r = self.robots[new]
                O = X_new @ np.linalg.inv(r.odom[n_new])
                self._estimate[self._o(new)] = O
                for i, T in enumerate(r.odom):
                    self._estimate[self._x(new, i)] = O @ T
                self._merged.add(new)
                self.merge_events.append((new, len(self.loops)))
                grew = True

    # ------------------------------------------------------------------ solve
    def _graph(self, loss: str) -> gtsam.NonlinearFactorGraph:
        p = self.params
        g = gtsam.NonlinearFactorGraph()
        tight = gtsam.noiseModel.Isotropic.Sigma(6, p.prior_sigma)
        g.add(gtsam.PriorFactorPose3(self._o(self.reference), to_pose3(np.eye(4)), tight))
        for name in self._merged:
            r = self.robots[name]
            if not r.stamps:
                continue
            g.add(gtsam.BetweenFactorPose3(self._o(name), self._x(name, 0), to_pose3(r.odom[0]), tight))
            for i in range(1, len(r.stamps)):
                D = np.linalg.inv(r.odom[i - 1]) @ r.odom[i]
                g.add(gtsam.BetweenFactorPose3(self._x(name, i - 1), self._x(name, i), to_pose3(D),
                                               noise_model(p, "odom", odometry_covariance(p, D))))
        for rm, nm, rq, nq, M, cov in self.loops:
            if rm in self._merged and rq in self._merged:
                g.add(gtsam.BetweenFactorPose3(self._x(rm, nm), self._x(rq, nq), to_pose3(M),
                                               noise_model(p, "loop", cov, loss)))
        return g

    def update(self) -> None:
        """Solve the merged robots' graph from the current estimate (module doc)."""
        if not self.robots:
            return
        values = gtsam.Values()
        for k, T in self._estimate.items():
            values.insert(k, to_pose3(T))
        lp = gtsam.LevenbergMarquardtParams()
        lp.setMaxIterations(self.params.iterations)
        lp.setRelativeErrorTol(1e-10)
        lp.setAbsoluteErrorTol(1e-12)
        stages = ["huber", "cauchy"] if self.params.robust == "cauchy" else [self.params.robust]
        for loss in stages:
            values = gtsam.LevenbergMarquardtOptimizer(self._graph(loss), values, lp).optimize()
        self._estimate = {k: to_matrix(values.atPose3(k)) for k in self._estimate}
        self.needs_update = False

    # ------------------------------------------------------------------ output
    def merged(self, robot: str) -> bool:
        return robot in self._merged

    def poses(self, robot: str) -> Optional[np.ndarray]:
        """``robot``'s node poses [N, 4, 4] in the map frame, or None while it is not merged."""
        if robot not in self._merged:
            return None
        return np.stack([self._estimate[self._x(robot, i)] for i in range(len(self.robots[robot].stamps))])

    def origin(self, robot: str) -> Optional[np.ndarray]:
        """Where ``robot``'s odometry origin sits in the map (its variable ``o``), or None."""
        return self._estimate[self._o(robot)].copy() if robot in self._merged else None

    def map_to_odom(self, robot: str) -> Optional[np.ndarray]:
        """The correction T_map_odom of ``robot`` now: its latest node's map pose times the inverse
        of that node's odometry (``PoseGraph.map_to_odom``), or None while it is not merged."""
        if robot not in self._merged or not self.robots[robot].stamps:
            return None
        r = self.robots[robot]
        return self._estimate[self._x(robot, len(r.stamps) - 1)] @ np.linalg.inv(r.odom[-1])

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Write the graph to ``path`` atomically (npz, no pickle)."""
        names = list(self.robots)
        robots = [{"name": n, "stamps": [int(x) for x in self.robots[n].stamps]} for n in names]
        meta = {"format": FORMAT, "params": dataclasses.asdict(self.params), "reference": self.reference,
                "robots": robots, "merged": sorted(self._merged),
                "loops": [[rm, int(nm), rq, int(nq)] for rm, nm, rq, nq, _, _ in self.loops]}
        odom = [T for n in names for T in self.robots[n].odom]
        est = [[n, i] for n in names for i in range(len(self.robots[n].stamps)) if self._x(n, i) in self._estimate]
        with atomic_write(Path(path)) as f:
            np.savez_compressed(
                f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                odom=np.array(odom, np.float64).reshape(-1, 4, 4),
                loop_meas=np.array([lp[4] for lp in self.loops], np.float64).reshape(-1, 4, 4),
                loop_cov=np.array([lp[5] for lp in self.loops], np.float64).reshape(-1, 6, 6),
                anchors=np.array([self._estimate[self._o(n)] for n in names if n in self._merged],
                                 np.float64).reshape(-1, 4, 4),
                estimate=np.array([self._estimate[self._x(n, i)] for n, i in est], np.float64).reshape(-1, 4, 4))

    @classmethod
    def load(cls, path, params: Optional[PoseGraphParams] = None) -> "FleetPoseGraph":
        """The graph saved at ``path`` (its settings unless ``params`` is given)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                if meta.get("format") != FORMAT:
                    raise MapFileError(f"{path}: not a {FORMAT} file")
                d = {k: z[k] for k in z.files}
        except MapFileError:
            raise
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise MapFileError(f"{path} is not a fleet pose graph ({exc})") from None
        stored = dict(meta["params"])
        stored["base_T_camera"] = tuple(stored["base_T_camera"])
        g = cls(params or PoseGraphParams(**stored))
        k = 0
        for rob in meta["robots"]:
            r = g.robots[rob["name"]] = _Robot(len(g.robots))
            r.stamps = [int(x) for x in rob["stamps"]]
            r.odom = [np.array(T) for T in d["odom"][k:k + len(r.stamps)]]
            k += len(r.stamps)
        g.reference = meta["reference"]
        g._merged = set(meta["merged"])
        g.loops = [(rm, nm, rq, nq, d["loop_meas"][i], d["loop_cov"][i])
                   for i, (rm, nm, rq, nq) in enumerate(meta["loops"])]
        for n, T in zip([n for n in g.robots if n in g._merged], d["anchors"]):
            g._estimate[g._o(n)] = np.array(T)
        est = [(n, i) for n in g.robots for i in range(len(g.robots[n].stamps)) if n in g._merged]
        for (n, i), T in zip(est, d["estimate"]):
            g._estimate[g._x(n, i)] = np.array(T)
        g.stats.update(nodes=k, loops=len(g.loops), inter_robot_loops=sum(lp[0] != lp[2] for lp in g.loops))
        g.update()
        return g
