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
offered here). Loop stamps attach to the nearest node within ``max_stamp_gap`` (no interpolation:
the fleet's nodes are its keyframes, which the loops name).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import gtsam
import numpy as np

from megaloc_ros.backend.pose_graph import (LoopResult, PoseGraphParams, _mat, _pose3, loop_edge, noise_model,
                                            odometry_covariance)
from megaloc_ros.errors import MegalocError


@dataclass
class _Robot:
    index: int
    stamps: list = field(default_factory=list)   # node stamps (ns), increasing
    odom: list = field(default_factory=list)     # node odometry poses (odom_r <- base)


class FleetPoseGraph:
    """See the module docstring. Not thread-safe: one caller at a time."""

    def __init__(self, params: Optional[PoseGraphParams] = None):
        self.params = params or PoseGraphParams()
        if self.params.robust == "gnc":
            raise MegalocError("the fleet graph offers robust cauchy, huber or none (not gnc)")
        self.robots: dict[str, _Robot] = {}
        self.reference: Optional[str] = None
        # loops: (match robot, match node, query robot, query node, measurement, GTSAM covariance)
        self.loops: list[tuple[str, int, str, int, np.ndarray, np.ndarray]] = []
        self._merged: set[str] = set()
        self._estimate: dict[int, np.ndarray] = {}   # key -> 4x4, merged robots only
        self.merge_events: list[tuple[str, int]] = []  # (robot, loop count when it joined)
        self.stats = {"nodes": 0, "loops": 0, "inter_robot_loops": 0, "refused": 0, "skipped_unit": 0}

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
        return len(r.stamps) - 1

    def _node(self, robot: str, stamp_ns: int) -> Optional[int]:
        r = self.robots.get(robot)
        if r is None or not r.stamps:
            return None
        s = np.asarray(r.stamps)
        j = int(np.argmin(np.abs(s - stamp_ns)))
        return j if abs(int(s[j]) - stamp_ns) <= self.params.max_stamp_gap * 1e9 else None

    def add_loop(self, query_robot: str, query_stamp_ns: int, match_robot: str, match_stamp_ns: int,
                 T_match_query: np.ndarray, covariance: Optional[np.ndarray] = None,
                 metric_scale: bool = True) -> LoopResult:
        """A verified loop between two keyframes (of one robot or of two); call ``update`` to solve."""
        if not metric_scale:
            self.stats["skipped_unit"] += 1
            return LoopResult("skipped_unit", "translation is a unit direction (no depth): not a metric constraint")
        nq, nm = self._node(query_robot, int(query_stamp_ns)), self._node(match_robot, int(match_stamp_ns))
        if nq is None or nm is None:
            self.stats["refused"] += 1
            return LoopResult("refused", "a stamp is not at a node of its robot")
        if query_robot == match_robot and nq == nm:
            self.stats["refused"] += 1
            return LoopResult("refused", "both ends fall on the same node")
        M, cov = loop_edge(self.params, np.eye(4), np.eye(4), T_match_query, covariance)
        self.loops.append((match_robot, nm, query_robot, nq, M, cov))
        self.stats["loops"] += 1
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
        g.add(gtsam.PriorFactorPose3(self._o(self.reference), _pose3(np.eye(4)), tight))
        for name in self._merged:
            r = self.robots[name]
            if not r.stamps:
                continue
            g.add(gtsam.BetweenFactorPose3(self._o(name), self._x(name, 0), _pose3(r.odom[0]), tight))
            for i in range(1, len(r.stamps)):
                D = np.linalg.inv(r.odom[i - 1]) @ r.odom[i]
                g.add(gtsam.BetweenFactorPose3(self._x(name, i - 1), self._x(name, i), _pose3(D),
                                               noise_model(p, "odom", odometry_covariance(p, D))))
        for rm, nm, rq, nq, M, cov in self.loops:
            if rm in self._merged and rq in self._merged:
                g.add(gtsam.BetweenFactorPose3(self._x(rm, nm), self._x(rq, nq), _pose3(M),
                                               noise_model(p, "loop", cov, loss)))
        return g

    def update(self) -> None:
        """Solve the merged robots' graph from the current estimate (module doc)."""
        if not self.robots:
            return
        values = gtsam.Values()
        for k, T in self._estimate.items():
            values.insert(k, _pose3(T))
        lp = gtsam.LevenbergMarquardtParams()
        lp.setMaxIterations(self.params.iterations)
        lp.setRelativeErrorTol(1e-10)
        lp.setAbsoluteErrorTol(1e-12)
        stages = ["huber", "cauchy"] if self.params.robust == "cauchy" else [self.params.robust]
        for loss in stages:
            values = gtsam.LevenbergMarquardtOptimizer(self._graph(loss), values, lp).optimize()
        self._estimate = {k: _mat(values.atPose3(k)) for k in self._estimate}

    # ------------------------------------------------------------------ output
    def merged(self, robot: str) -> bool:
        return robot in self._merged

    def poses(self, robot: str) -> Optional[np.ndarray]:
        """``robot``'s node poses [N, 4, 4] in the map frame, or None while it is not merged."""
        if robot not in self._merged:
            return None
        return np.stack([self._estimate[self._x(robot, i)] for i in range(len(self.robots[robot].stamps))])

    def map_to_odom(self, robot: str) -> Optional[np.ndarray]:
        """T_map_odom of ``robot`` (where its odometry frame sits in the map), or None."""
        return self._estimate[self._o(robot)].copy() if robot in self._merged else None
