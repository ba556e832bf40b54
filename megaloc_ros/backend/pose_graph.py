"""Pose graph on GTSAM: odometry keyframes + verified loops -> optimised trajectory (iSAM2).

Nodes are keyframes of the odometry (a new one when the robot moved ``keyframe_distance`` or
turned ``keyframe_angle`` or ``keyframe_interval`` passed; ``add_keyframe`` forces one). Between
consecutive nodes a ``BetweenFactorPose3`` holds the odometry increment, with a noise that grows
with the distance travelled (``odom_translation_noise`` of the distance, ``odom_rotation_noise``
radians per metre and per radian turned, never below the ``odom_min_sigma_*`` floors). The first
node gets a tight prior at its odometry pose: the map frame starts equal to the odometry frame.

Loops are ``(query_stamp, match_stamp, T_match_query, covariance)``: the pose of the query
camera in the match camera frame, as the verifier publishes it. A stamp between two nodes is
attached to the nearer one through the odometry interpolated at that stamp, and the camera
extrinsic ``base_T_camera`` turns the camera transform into one between base frames; the
covariance (x y z rx ry rz, right perturbation, see ``megaloc_ros.verification.metric_pose``) is
carried along with the adjoint of the same transforms. Then:

  * loops whose translation is only a direction (``metric_scale`` false: the verifier had no
    depth) are skipped: a unit vector is not a metric constraint, and a rotation-only factor is
    not worth the risk of a wrong scale-free edge. They are counted in ``stats["skipped_unit"]``.
  * a zero covariance (unknown) takes ``loop_default_sigma_*``; every covariance is inflated by
    ``loop_min_sigma_*`` squared on its diagonal: the fit covariance of a PnP solution knows the
    keypoint noise but not the depth bias or a ground-truth-sized systematic error (on TUM
    fr3/cabinet the fit says ~3 mm where the error is ~2 cm).
  * every loop factor has a robust loss, ``robust`` = "cauchy" (default), "huber", "gnc" or
    "none", with ``robust_k`` in whitened units (sigmas): a wrong loop far from the odometry's
    belief keeps a vanishing weight instead of pulling the whole graph.

Odometry goes to iSAM2 incrementally. A new loop triggers a batch solve of the whole graph from
the current estimate, after which iSAM2 restarts from the solution:
  * cauchy: Levenberg-Marquardt with a Huber loss first, then with the Cauchy loss from there.
    Huber is convex, so true loops far from a drifted estimate still pull the graph into their
    basin; Cauchy then lets a wrong loop's pull vanish (Huber alone keeps a constant pull of
    ``robust_k`` sigmas: on TUM fr3/cabinet one wrong loop moved the ATE by up to 45% with Huber
    k=1, by 1.1% with this Cauchy k=3).
    Cauchy alone from the drifted estimate gets stuck with the loops at near-zero weight.
  * huber: the first stage only.  none: plain least squares.
  * gnc: graduated non-convexity (GTSAM ``GncLMOptimizer``, Geman-McClure or TLS, odometry and
    prior known inliers); loops it weighs under 0.5 are left out of the iSAM2 graph. It needs
    other loops to out-vote a wrong one: a wrong loop that arrives alone is accepted.
The batch solve costs one sparse solve of the whole graph per loop event (milliseconds for
thousands of nodes); between loops the cost is iSAM2's.

``save``/``load`` write and read a numpy .npz (no pickle) holding the nodes, the factors, the
last estimate and the settings; loading re-optimises from the stored factors.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gtsam
import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from megaloc_ros.errors import MegalocError
from megaloc_ros.settings import setting, validate

FORMAT = "megaloc_ros.pose_graph/1"
# (x y z rx ry rz) <-> GTSAM Pose3 tangent order (rx ry rz x y z)
_TO_GTSAM = np.array([3, 4, 5, 0, 1, 2])


def X(i: int) -> int:
    return gtsam.symbol("x", i)


@dataclass
class PoseGraphParams:
    """Settings of ``PoseGraph`` (``graph.*`` parameters of pose_graph_node)."""
    keyframe_distance: float = setting(0.10, "a new graph node when the odometry moved this far (m) ...",
                                       range=(0.0, None))
    keyframe_angle: float = setting(0.10, "... or turned this much (rad) ...", range=(0.0, None))
    keyframe_interval: float = setting(1.0, "... or this many seconds passed", range=(0.0, None))
    odom_translation_noise: float = setting(0.05, "odometry translation sigma as a fraction of the distance "
                                            "travelled between nodes", range=(0.0, None))
    odom_rotation_noise: float = setting(0.02, "odometry rotation sigma (rad) per metre travelled and per "
                                         "radian turned", range=(0.0, None))
    odom_min_sigma_t: float = setting(0.005, "floor of the odometry translation sigma (m)", range=(1e-9, None))
    odom_min_sigma_r: float = setting(0.002, "floor of the odometry rotation sigma (rad)", range=(1e-9, None))
    prior_sigma: float = setting(1e-4, "sigma (m and rad) of the first node's prior", range=(1e-12, None))
    loop_default_sigma_t: float = setting(0.05, "translation sigma (m) of a loop without covariance",
                                          range=(1e-9, None))
    loop_default_sigma_r: float = setting(0.03, "rotation sigma (rad) of a loop without covariance",
                                          range=(1e-9, None))
    loop_min_sigma_t: float = setting(0.02, "added in quadrature to every loop's translation sigma (m): the "
                                      "fit covariance misses systematic errors", range=(0.0, None))
    loop_min_sigma_r: float = setting(0.01, "added in quadrature to every loop's rotation sigma (rad)",
                                      range=(0.0, None))
    robust: str = setting("cauchy", "robust loss of loop factors: cauchy (Huber solve, then Cauchy), huber, "
                          "gnc (graduated non-convexity) or none", choices=("cauchy", "huber", "gnc", "none"))
    robust_k: float = setting(3.0, "cauchy / huber kernel width in sigmas", range=(1e-6, None))
    gnc_loss: str = setting("gm", "gnc: gm (Geman-McClure) or tls (truncated least squares, stricter)",
                            choices=("gm", "tls"))
    gnc_inlier_probability: float = setting(0.99, "gnc: chi-square (6 dof) quantile of an inlier loop's residual",
                                            range=(0.5, 1.0 - 1e-12))
    iterations: int = setting(100, "Levenberg-Marquardt iterations (at most) of the solve a new loop triggers",
                              range=(1, None))
    relinearize_threshold: float = setting(0.01, "iSAM2 relinearisation threshold", range=(1e-9, None))
    max_stamp_gap: float = setting(2.0, "a loop stamp farther than this (s) from every node is refused",
                                   range=(0.0, None))
    base_T_camera: tuple[float, ...] = setting(tuple(np.eye(4).reshape(-1)), "pose of the camera in the "
                                               "odometry child (base) frame, row-major 4x4 (16 values)")

    def __post_init__(self) -> None:
        validate(self, "graph")
        self.base_T_camera = tuple(float(v) for v in self.base_T_camera)
        T = np.asarray(self.base_T_camera).reshape(-1)
        if T.size != 16 or not np.allclose(T[12:], [0, 0, 0, 1]) or \
                not np.allclose(T.reshape(4, 4)[:3, :3] @ T.reshape(4, 4)[:3, :3].T, np.eye(3), atol=1e-6):
            raise MegalocError("graph.base_T_camera must be a row-major 4x4 rigid transform (16 values)")

    @property
    def camera_extrinsic(self) -> np.ndarray:
        return np.asarray(self.base_T_camera, np.float64).reshape(4, 4)


@dataclass
class LoopResult:
    status: str          # added | skipped_unit | pending | refused
    reason: str = ""
    query_node: int = -1
    match_node: int = -1


def to_pose3(T: np.ndarray) -> gtsam.Pose3:
    """A 4x4 rigid transform as a gtsam.Pose3."""
    T = np.asarray(T, np.float64)
    return gtsam.Pose3(gtsam.Rot3(T[:3, :3]), gtsam.Point3(*T[:3, 3]))


def to_matrix(p: gtsam.Pose3) -> np.ndarray:
    """A gtsam.Pose3 as a 4x4 matrix."""
    return np.asarray(p.matrix(), np.float64)


def to_gtsam_cov(cov_xyz_rpy: np.ndarray) -> np.ndarray:
    c = np.asarray(cov_xyz_rpy, np.float64).reshape(6, 6)
    return c[np.ix_(_TO_GTSAM, _TO_GTSAM)]


def interpolate_pose(t: int, t0: int, T0: np.ndarray, t1: int, T1: np.ndarray) -> np.ndarray:
    """The pose at stamp ``t`` between (t0, T0) and (t1, T1): translation linear, rotation slerp
    (clamped to the ends)."""
    if t1 == t0:
        return T0.copy()
    a = min(max((t - t0) / (t1 - t0), 0.0), 1.0)
    out = np.eye(4)
    out[:3, :3] = Slerp([0, 1], Rotation.from_matrix([T0[:3, :3], T1[:3, :3]]))(a).as_matrix()
    out[:3, 3] = (1 - a) * T0[:3, 3] + a * T1[:3, 3]
    return out


def is_new_node(params: PoseGraphParams, last_stamp_ns: int, last_T: np.ndarray, stamp_ns: int,
                T: np.ndarray) -> bool:
    """Whether odometry ``T`` at ``stamp_ns`` is far enough (distance, angle or time) from the last
    node to be a new one."""
    D = np.linalg.inv(last_T) @ T
    ang = np.linalg.norm(Rotation.from_matrix(D[:3, :3]).as_rotvec())
    return (np.linalg.norm(D[:3, 3]) >= params.keyframe_distance or ang >= params.keyframe_angle
            or (stamp_ns - last_stamp_ns) * 1e-9 >= params.keyframe_interval)


def odometry_covariance(params: PoseGraphParams, D: np.ndarray) -> np.ndarray:
    """GTSAM-order covariance of the odometry increment ``D`` between two nodes (module doc)."""
    dist = float(np.linalg.norm(D[:3, 3]))
    ang = float(np.linalg.norm(Rotation.from_matrix(D[:3, :3]).as_rotvec()))
    st = max(params.odom_min_sigma_t, params.odom_translation_noise * dist)
    sr = max(params.odom_min_sigma_r, params.odom_rotation_noise * (dist + ang))
    return np.diag([sr ** 2] * 3 + [st ** 2] * 3)


def loop_edge(params: PoseGraphParams, Dq: np.ndarray, Dm: np.ndarray, Z: np.ndarray,
              covariance: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(measurement between the match node and the query node, its GTSAM-order covariance) of a
    loop ``Z`` (query camera in the match camera), with ``Dq`` / ``Dm`` each node's base -> the
    base at that end's stamp (module doc: extrinsic, default and minimum sigmas, adjoint)."""
    Xc = params.camera_extrinsic
    Z = np.asarray(Z, np.float64)
    M = Dm @ Xc @ Z @ np.linalg.inv(Xc) @ np.linalg.inv(Dq)
    cov = None if covariance is None else np.asarray(covariance, np.float64).reshape(6, 6)
    if cov is None or not np.any(cov) or not np.all(np.isfinite(cov)):
        cov = np.diag([params.loop_default_sigma_t ** 2] * 3 + [params.loop_default_sigma_r ** 2] * 3)
    cg = to_gtsam_cov(cov) + np.diag([params.loop_min_sigma_r ** 2] * 3 + [params.loop_min_sigma_t ** 2] * 3)
    A = to_pose3(Dq @ Xc).AdjointMap()
    cg = A @ cg @ A.T
    return M, 0.5 * (cg + cg.T)


def noise_model(params: PoseGraphParams, kind: str, cov: np.ndarray, loss: Optional[str] = None):
    """Gaussian noise of ``cov``; a loop's wrapped in the ``loss`` (default ``params.robust``)."""
    noise = gtsam.noiseModel.Gaussian.Covariance(np.asarray(cov, np.float64))
    loss = loss or params.robust
    if kind == "loop" and loss in ("cauchy", "huber"):
        k = params.robust_k
        m = (gtsam.noiseModel.mEstimator.Cauchy.Create(k) if loss == "cauchy"
             else gtsam.noiseModel.mEstimator.Huber.Create(k))
        noise = gtsam.noiseModel.Robust.Create(m, noise)
    return noise


class PoseGraph:
    """See the module docstring. Not thread-safe: one caller at a time."""

    MAX_PENDING = 1000   # loops waiting for odometry (the oldest are dropped beyond)

    def __init__(self, params: Optional[PoseGraphParams] = None):
        self.params = params or PoseGraphParams()
        p = gtsam.ISAM2Params()
        p.setRelinearizeThreshold(self.params.relinearize_threshold)
        p.relinearizeSkip = 1
        self._isam = gtsam.ISAM2(p)
        self._new = gtsam.NonlinearFactorGraph()
        self._init = gtsam.Values()
        self.stamps: list[int] = []          # node stamps (ns), increasing
        self.odom: list[np.ndarray] = []     # node odometry poses (odom <- base)
        # factors, kept for save/load: (kind, key_a, key_b, measurement 4x4, covariance 6x6 GTSAM order)
        self.factors: list[tuple[str, int, int, np.ndarray, np.ndarray]] = []
        self._estimate: Optional[gtsam.Values] = None
        self._recent: deque = deque(maxlen=2000)  # (stamp, odometry pose) since the last node
        self._pending: list[tuple] = []
        self._loop_inlier: dict[int, bool] = {}   # gnc: factor index -> inlier at the last solve
        self.stats = {"nodes": 0, "loops": 0, "loops_rejected": 0, "skipped_unit": 0, "refused": 0, "pending": 0}

    # ------------------------------------------------------------------ odometry
    def __len__(self) -> int:
        return len(self.stamps)

    def add_odometry(self, stamp_ns: int, T_odom_base: np.ndarray) -> Optional[int]:
        """An odometry sample; returns the new node's index when it became a keyframe."""
        stamp_ns = int(stamp_ns)
        T = np.asarray(T_odom_base, np.float64)
        if self.stamps and stamp_ns <= self.stamps[-1]:
            return None  # out of order or repeated
        self._recent.append((stamp_ns, T))
        node = None
        if not self.stamps or self._is_keyframe(stamp_ns, T):
            node = self.add_keyframe(stamp_ns, T)
        self._retry_pending()
        return node

    def _is_keyframe(self, stamp_ns: int, T: np.ndarray) -> bool:
        return is_new_node(self.params, self.stamps[-1], self.odom[-1], stamp_ns, T)

    def add_keyframe(self, stamp_ns: int, T_odom_base: np.ndarray) -> int:
        """Force a node at this odometry pose; returns its index."""
        stamp_ns = int(stamp_ns)
        T = np.asarray(T_odom_base, np.float64)
        if self.stamps and stamp_ns <= self.stamps[-1]:
            raise ValueError(f"keyframe stamp {stamp_ns} is not after the last node's {self.stamps[-1]}")
        i = len(self.stamps)
        p = self.params
        if i == 0:
            cov = np.eye(6) * p.prior_sigma ** 2
            self._add_factor("prior", i, i, T, cov)
            guess = T
        else:
            D = np.linalg.inv(self.odom[-1]) @ T
            self._add_factor("odom", i - 1, i, D, odometry_covariance(p, D))
            prev = self._current(i - 1)
            guess = prev @ D
        self._init.insert(X(i), to_pose3(guess))
        self.stamps.append(stamp_ns)
        self.odom.append(T)
        self._recent.clear()
        self.stats["nodes"] = len(self.stamps)
        return i

    def _add_factor(self, kind: str, a: int, b: int, meas: np.ndarray, cov: np.ndarray) -> None:
        self.factors.append((kind, a, b, np.asarray(meas, np.float64).copy(), np.asarray(cov, np.float64).copy()))
        self._new.add(self._make_factor(kind, a, b, meas, cov))

    def _make_factor(self, kind, a, b, meas, cov, loss: Optional[str] = None):
        """``loss``: of a loop factor, default ``params.robust`` (gnc: plain, GNC wraps it)."""
        noise = noise_model(self.params, kind, cov, loss)
        if kind == "prior":
            return gtsam.PriorFactorPose3(X(a), to_pose3(meas), noise)
        return gtsam.BetweenFactorPose3(X(a), X(b), to_pose3(meas), noise)

    def _current(self, i: int) -> np.ndarray:
        if self._init.exists(X(i)):
            return to_matrix(self._init.atPose3(X(i)))
        if self._estimate is not None and self._estimate.exists(X(i)):
            return to_matrix(self._estimate.atPose3(X(i)))
        return to_matrix(self._isam.calculateEstimatePose3(X(i)))

    # ------------------------------------------------------------------ loops
    def _odom_at(self, stamp_ns: int) -> Optional[tuple[int, np.ndarray]]:
        """(nearest node, odometry pose at ``stamp_ns``), or None when outside the nodes' span."""
        s = self.stamps
        if not s:
            return None
        gap = self.params.max_stamp_gap * 1e9
        j = bisect.bisect_left(s, stamp_ns)
        if j < len(s) and s[j] == stamp_ns:
            return j, self.odom[j]
        if j == 0:
            return (0, self.odom[0]) if s[0] - stamp_ns <= gap else None
        if j == len(s):
            return None  # after the last node: add_loop makes a node first
        T = interpolate_pose(stamp_ns, s[j - 1], self.odom[j - 1], s[j], self.odom[j])
        n = j - 1 if stamp_ns - s[j - 1] <= s[j] - stamp_ns else j
        if abs(s[n] - stamp_ns) > gap:
            return None
        return n, T

    def add_loop(self, query_stamp_ns: int, match_stamp_ns: int, T_match_query: np.ndarray,
                 covariance: Optional[np.ndarray] = None, metric_scale: bool = True) -> LoopResult:
        """A verified loop (see the module docstring). Call ``update`` to optimise."""
        if not metric_scale:
            self.stats["skipped_unit"] += 1
            return LoopResult("skipped_unit", "translation is a unit direction (no depth): not a metric constraint")
        q, m = int(query_stamp_ns), int(match_stamp_ns)
        if self.stamps and max(q, m) > self.stamps[-1]:
            latest = self._recent[-1][0] if self._recent else self.stamps[-1]
            if max(q, m) <= latest:   # odometry is there, not yet a node: make one
                st, T = self._recent[-1]
                self.add_keyframe(st, T)
            else:
                self._pending.append((q, m, np.asarray(T_match_query, np.float64).copy(),
                                      None if covariance is None else np.asarray(covariance, np.float64).copy()))
                self.stats["pending"] = len(self._pending)
                return LoopResult("pending", "stamp ahead of the odometry: waits for it")
        return self._attach_loop(q, m, T_match_query, covariance)

    def _attach_loop(self, q, m, Z, covariance) -> LoopResult:
        aq, am = self._odom_at(q), self._odom_at(m)
        if aq is None or am is None:
            self.stats["refused"] += 1
            return LoopResult("refused", "a stamp is outside the odometry the graph holds")
        (nq, Oq), (nm, Om) = aq, am
        if nq == nm:
            self.stats["refused"] += 1
            return LoopResult("refused", "both ends fall on the same node")
        Dq = np.linalg.inv(self.odom[nq]) @ Oq   # node nq -> base at the query stamp
        Dm = np.linalg.inv(self.odom[nm]) @ Om
        M, cg = loop_edge(self.params, Dq, Dm, Z, covariance)
        self._add_factor("loop", nm, nq, M, cg)
        self.stats["loops"] += 1
        return LoopResult("added", "", nq, nm)

    def _retry_pending(self) -> None:
        """Attach the loops whose stamps the odometry has now reached."""
        if not self._pending:
            return
        latest = self._recent[-1][0] if self._recent else self.stamps[-1]
        keep = []
        for q, m, Z, cov in self._pending:
            if max(q, m) > latest:
                keep.append((q, m, Z, cov))
                continue
            if max(q, m) > self.stamps[-1]:
                self.add_keyframe(*self._recent[-1])
            self._attach_loop(q, m, Z, cov)
        self._pending = keep[-self.MAX_PENDING:]
        self.stats["pending"] = len(self._pending)

    # ------------------------------------------------------------------ optimisation
    def update(self) -> None:
        """Hand the new nodes and odometry to iSAM2 (incremental). New loops trigger a batch solve
        of the whole graph instead (``_solve_batch``), after which iSAM2 restarts from its solution."""
        if self._new.size() == 0 and self._init.size() == 0:
            return
        had_loop = any(k == "loop" for k, *_ in self.factors[len(self.factors) - self._new.size():])
        if had_loop:
            self._solve_batch()
            return
        self._isam.update(self._new, self._init)
        self._new = gtsam.NonlinearFactorGraph()
        self._init = gtsam.Values()
        self._estimate = self._isam.calculateEstimate()

    def _values(self) -> gtsam.Values:
        """The current estimate of every node (the new ones at their initial guess)."""
        v = gtsam.Values()
        for i in range(len(self.stamps)):
            v.insert(X(i), to_pose3(self._current(i)))
        return v

    def _solve_batch(self) -> None:
        """Levenberg-Marquardt over all factors from the current estimate, to convergence (robust
        loop losses reweighted at every step), or GNC when ``robust`` = "gnc": it starts from the
        least-squares problem and turns the loss non-convex step by step (Yang et al. 2020),
        odometry and prior known inliers; loops it weighs under 0.5 are left out. iSAM2 then
        restarts from the solution and takes the following odometry incrementally."""
        graph = gtsam.NonlinearFactorGraph()
        loops = []
        for idx, (kind, a, b, meas, cov) in enumerate(self.factors):
            graph.add(self._make_factor(kind, a, b, meas, cov))
            if kind == "loop":
                loops.append(idx)
        if self.params.robust == "gnc":
            gp = gtsam.GncLMParams()
            gp.setLossType(gtsam.GncLossType.TLS if self.params.gnc_loss == "tls" else gtsam.GncLossType.GM)
            loop_set = set(loops)
            gp.setKnownInliers([i for i in range(len(self.factors)) if i not in loop_set])
            gnc = gtsam.GncLMOptimizer(graph, self._values(), gp)
            gnc.setInlierCostThresholdsAtProbability(self.params.gnc_inlier_probability)
            result = gnc.optimize()
            w = np.asarray(gnc.getWeights())
            self._loop_inlier = {i: bool(w[i] > 0.5) for i in loops}
            graph = gtsam.NonlinearFactorGraph()
            for idx, f in enumerate(self.factors):
                if self._loop_inlier.get(idx, True):
                    graph.add(self._make_factor(*f))
            self.stats["loops_rejected"] = sum(1 for v in self._loop_inlier.values() if not v)
        else:
            lp = gtsam.LevenbergMarquardtParams()
            lp.setMaxIterations(self.params.iterations)
            lp.setRelativeErrorTol(1e-10)
            lp.setAbsoluteErrorTol(1e-12)
            result = self._values()
            # cauchy by continuation: the Huber solution (convex loss: loops far from the odometry's
            # belief still pull) is where the Cauchy solve (vanishing pull of outliers) starts
            stages = ["huber", "cauchy"] if self.params.robust == "cauchy" else [self.params.robust]
            for loss in stages:
                graph = gtsam.NonlinearFactorGraph()
                for f in self.factors:
                    graph.add(self._make_factor(*f, loss=loss))
                result = gtsam.LevenbergMarquardtOptimizer(graph, result, lp).optimize()
        p = gtsam.ISAM2Params()
        p.setRelinearizeThreshold(self.params.relinearize_threshold)
        p.relinearizeSkip = 1
        self._isam = gtsam.ISAM2(p)
        self._isam.update(graph, result)
        self._new = gtsam.NonlinearFactorGraph()
        self._init = gtsam.Values()
        self._estimate = result

    def poses(self) -> np.ndarray:
        """Optimised node poses [N, 4, 4] in the map frame (call ``update`` first)."""
        if self._init.size() or self._new.size():
            self.update()
        if self._estimate is None:
            return np.zeros((0, 4, 4))
        return np.stack([to_matrix(self._estimate.atPose3(X(i))) for i in range(len(self.stamps))])

    def map_to_odom(self) -> np.ndarray:
        """T_map_odom = T_map_base(last node) * inverse(T_odom_base(last node))."""
        if not self.stamps:
            return np.eye(4)
        P = self.poses()
        return P[-1] @ np.linalg.inv(self.odom[-1])

    def loop_weights(self) -> np.ndarray:
        """Robust-loss weight of each loop factor at the current estimate (1: fully trusted)."""
        out = []
        est = self._estimate
        for idx, (kind, a, b, meas, cov) in enumerate(self.factors):
            if kind != "loop":
                continue
            if self.params.robust == "gnc":
                out.append(1.0 if self._loop_inlier.get(idx, True) else 0.0)
                continue
            if est is None:
                out.append(1.0)
                continue
            err = to_pose3(meas).localCoordinates(_mat_between(est, a, b))
            w = float(np.sqrt(err @ np.linalg.solve(cov, err)))
            k = self.params.robust_k
            out.append(1.0 if self.params.robust == "none" else
                       1.0 / (1.0 + (w / k) ** 2) if self.params.robust == "cauchy" else min(1.0, k / max(w, 1e-12)))
        return np.array(out)

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """numpy .npz, no pickled objects."""
        kinds = np.array([{"prior": 0, "odom": 1, "loop": 2}[k] for k, *_ in self.factors], np.int8)
        keys = np.array([(a, b) for _, a, b, _, _ in self.factors], np.int64).reshape(-1, 2)
        meas = np.array([f[3] for f in self.factors], np.float64).reshape(-1, 4, 4)
        covs = np.array([f[4] for f in self.factors], np.float64).reshape(-1, 6, 6)
        params = dataclasses.asdict(self.params)
        params["base_T_camera"] = list(params["base_T_camera"])
        path = Path(path)
        with open(path, "wb") as f:
            np.savez_compressed(f, format=np.array(FORMAT), params=np.array(json.dumps(params)),
                                stamps=np.array(self.stamps, np.int64), odom=np.array(self.odom).reshape(-1, 4, 4),
                                kinds=kinds, keys=keys, meas=meas, covs=covs,
                                poses=self.poses())

    @classmethod
    def load(cls, path, params: Optional[PoseGraphParams] = None) -> "PoseGraph":
        """The graph saved at ``path`` (its settings unless ``params`` is given), re-optimised."""
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != FORMAT:
                raise ValueError(f"{path}: not a {FORMAT} file")
            stored = json.loads(str(z["params"]))
            stored["base_T_camera"] = tuple(stored["base_T_camera"])
            g = cls(params or PoseGraphParams(**stored))
            g.stamps = [int(s) for s in z["stamps"]]
            g.odom = [np.array(T) for T in z["odom"]]
            names = {0: "prior", 1: "odom", 2: "loop"}
            for kind, (a, b), meas, cov in zip(z["kinds"], z["keys"], z["meas"], z["covs"]):
                g._add_factor(names[int(kind)], int(a), int(b), meas, cov)
            poses = z["poses"]
        for i in range(len(g.stamps)):
            g._init.insert(X(i), to_pose3(poses[i] if i < len(poses) else g.odom[i]))
        g.stats.update(nodes=len(g.stamps), loops=sum(1 for f in g.factors if f[0] == "loop"))
        g.update()
        return g


def _mat_between(est: gtsam.Values, a: int, b: int) -> gtsam.Pose3:
    return est.atPose3(X(a)).between(est.atPose3(X(b)))
