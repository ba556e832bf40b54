"""``verifier_node``: loop-closure candidates -> verified loop closures for the SLAM back end.

A lifecycle node that configures and activates itself when ``autostart`` is true (the default).

Subscribes   <keyframes_topic>  megaloc_ros/Keyframe (reliable, keep-all: none may be lost)
             <candidates_topic> megaloc_ros/LoopClosureArray
Publishes    ~/loop_closures    LoopClosureArray: accepted loops only, verified=true, with the
                                transform when the camera intrinsics are known
             ~/rejected         LoopClosureArray: rejected candidates (debugging)
             ~/explanations     sensor_msgs/Image: each accepted loop drawn (query | match,
                                voting SuperSegments, inlier matches, the reason); rendered only
                                while someone subscribes (megaloc_ros/ros/explanations.py)
             /diagnostics
Services     ~/save_map, ~/load_map: the verifier state, kept at ``<path>.verifier`` next to the
             loop_closure_node's map file of the same path

Each keyframe is reduced by ``megaloc_ros.verification.verifier.Verifier`` to what verification needs (no
image is kept). A candidate array whose query keyframe has not arrived yet waits up to
``candidate_wait`` seconds (keyframes and candidates travel on different topics).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo

from megaloc_ros.msg import Keyframe as KeyframeMsg
from megaloc_ros.msg import LoopClosureArray

from megaloc_ros.errors import MegalocError
from megaloc_ros.types import VerifiedLoop
from megaloc_ros.pipeline import build_verification, live_verifier_params
from megaloc_ros.ros import conversions as conv
from megaloc_ros.ros import params as P
from megaloc_ros.ros.managed_node import RELIABLE, RELIABLE_KEEP_ALL, ManagedNode
from megaloc_ros.ros.explanations import ExplanationPublisher
from megaloc_ros.ros.managed_node import spin_single

SUFFIX = ".verifier"


class MapMismatch(MegalocError):
    """Input that names keyframes of another map than the verifier state holds."""


def verifier_state_path(map_path: str) -> str:
    return map_path + SUFFIX


class VerifierNode(ManagedNode):
    """See the module docstring."""

    STATE_NAME = "verifier state"
    DIAG_ERRORS = ("keyframe_errors", "verify_errors", "map_mismatch")
    DIAG_WARNING = ("candidates_expired", "candidates expired")

    def __init__(self, node_name: str = P.VERIFIER_NODE, **kwargs):
        sections = P.node_sections(P.VERIFIER_NODE)
        super().__init__(node_name, P.node_specs(P.VERIFIER_NODE), "verifier", sections["verifier"],
                         sections, **kwargs)
        self._camera()
        self.verification = None   # the pipeline's verification stage, built on configure
        self._lock = threading.RLock()   # the Verifier and the pending candidates
        self._keyframes: dict[int, object] = {}   # id -> Keyframe (with pose) received this run
        self._pending: list[tuple[float, LoopClosureArray]] = []
        self._autostart()

    # ----------------------------------------------------------------- lifecycle
    def _apply_params(self) -> None:
        if self.verification is not None:
            with self._lock:
                self.verifier.params = live_verifier_params(self.verifier.params, self._build_params())

    @property
    def verifier(self):
        return self.verification.verifier if self.verification is not None else None

    def _camera(self):
        c = [float(v) for v in self._param("camera_matrix")]
        if len(c) == 1 and c[0] == 0.0 or not c:
            return None, None
        if len(c) != 6 or min(c[0], c[1], c[4], c[5]) <= 0:
            raise MegalocError(f"camera_matrix must be [fx, fy, cx, cy, width, height] with positive focal "
                               f"lengths and size, got {c}")
        k = np.array([[c[0], 0, c[2]], [0, c[1], c[3]], [0, 0, 1]], np.float64)
        return k, (int(c[4]), int(c[5]))

    def _build_verification(self, map_path: str):
        k, size = self._camera()
        state = verifier_state_path(map_path) if map_path else ""
        v = build_verification(self._build_params(), k, size, state, map_path)
        if state and Path(state).exists():
            self.get_logger().info(f"loaded verifier state {state}: {len(v.verifier)} keyframes")
        return v

    def _configure(self) -> None:
        self.verification = self._build_verification(self._param("map_path"))
        self._pub_loops = self.create_lifecycle_publisher(LoopClosureArray, "~/loop_closures", RELIABLE)
        self._pub_rejected = self.create_lifecycle_publisher(LoopClosureArray, "~/rejected", RELIABLE)
        self.explanations = ExplanationPublisher(self)  # renders only while someone subscribes
        self._own_pubs = [self._pub_loops, self._pub_rejected, self.explanations.publisher]

    def _activate(self) -> None:
        # One callback group: the Verifier sees keyframes and candidates in arrival order.
        group = MutuallyExclusiveCallbackGroup()
        self._own_subs = [
            self.create_subscription(KeyframeMsg, self._param("keyframes_topic"), self._on_keyframe,
                                     RELIABLE_KEEP_ALL, callback_group=group),
            self.create_subscription(LoopClosureArray, self._param("candidates_topic"), self._on_candidates,
                                     RELIABLE, callback_group=group),
        ]
        if self._param("camera_info_topic") and self._camera()[0] is None and self.verifier.camera_matrix is None:
            self._own_subs.append(self.create_subscription(
                CameraInfo, self._param("camera_info_topic"), self._on_camera_info, qos_profile_sensor_data,
                callback_group=group))
        self.get_logger().info(f"verifying {self._own_subs[1].topic_name} with keyframes from {self._own_subs[0].topic_name}")

    # ----------------------------------------------------------------- input
    def _on_keyframe(self, msg: KeyframeMsg) -> None:
        self.stats.inc("keyframes_received")
        try:
            kf, rgb, feats = conv.msg_to_keyframe(msg)
            if rgb is None:
                raise MegalocError(f"keyframe {kf.id} carries no image")
            with self._lock:
                self._check_map(msg.map_id, f"keyframe {kf.id}")
                ms = self.verification.add_keyframe(kf, rgb, feats, conv.msg_depth(msg))
                self._keyframes[kf.id] = kf
                self.explanations.remember(kf.id, rgb)
                self._dirty = True
            self.stats.latency("add_keyframe", ms)
        except MapMismatch as exc:
            self.stats.error("map_mismatch", str(exc))
            self.get_logger().error(str(exc), throttle_duration_sec=2.0)
            return
        except Exception as exc:
            self.stats.error("keyframe_errors", str(exc))
            self.get_logger().error(f"keyframe {msg.id} not added: {exc}", throttle_duration_sec=2.0)
            return
        self._flush_pending()

    def _check_map(self, map_id: str, what: str) -> None:
        """MapMismatch unless ``map_id`` is the map this state belongs to. A fresh state (or one
        from before map ids) binds to the first map it is given; an empty id is not checked."""
        v = self.verifier
        if not map_id:
            return
        if not v.map_id:
            v.map_id = map_id
        elif v.map_id != map_id:
            raise MapMismatch(f"{what} refused: it belongs to map {map_id}, this verifier holds the state of "
                              f"map {v.map_id} (load the matching state: loop_closure_node/load_map loads both)")

    def _on_camera_info(self, msg: CameraInfo) -> None:
        k = np.array(msg.k, np.float64).reshape(3, 3)
        if self.verifier.camera_matrix is not None:
            return
        if k[0, 0] <= 0 or k[1, 1] <= 0 or msg.width == 0 or msg.height == 0:
            self.get_logger().warning(f"ignoring CameraInfo without intrinsics on {self._param('camera_info_topic')}",
                                      throttle_duration_sec=10.0)
            return
        with self._lock:
            self.verifier.camera_matrix, self.verifier.camera_size = k, (int(msg.width), int(msg.height))
        self.get_logger().info(f"camera intrinsics from CameraInfo: fx={k[0, 0]:.1f} fy={k[1, 1]:.1f} "
                               f"for {msg.width}x{msg.height} images")

    def _on_candidates(self, msg: LoopClosureArray) -> None:
        self.stats.inc("candidate_arrays_received")
        self.stats.inc("candidates_received", len(msg.loops))
        if not msg.loops:
            return
        with self._lock:
            try:
                self._check_map(msg.map_id, f"candidates of keyframe {msg.loops[0].query_id}")
            except MapMismatch as exc:
                self._refuse(msg, exc)
                return
            self._pending.append((time.monotonic(), msg))
        self._flush_pending()

    def _refuse(self, msg: LoopClosureArray, exc: MapMismatch) -> None:
        """Candidates naming another map's keyframes: never verified; counted, logged, and
        published on ~/rejected (so the verdict stays visible), and counted as verified."""
        cands = [conv.msg_to_candidate(lc) for lc in msg.loops]
        for _ in cands:
            self.stats.error("map_mismatch", str(exc))
        self.stats.inc("candidates_verified", len(cands))
        self.get_logger().error(str(exc), throttle_duration_sec=2.0)
        self._pub_rejected.publish(conv.loops_to_array(
            [VerifiedLoop(c, False, reason=f"rejected: {exc}") for c in cands],
            conv.stamp_to_ns(msg.header.stamp), msg.header.frame_id, msg.map_id))

    def _flush_pending(self) -> None:
        """Verify the pending candidate arrays whose query keyframe has arrived; expire old ones."""
        now = time.monotonic()
        wait = self._param("candidate_wait")
        with self._lock:
            ready, keep = [], []
            for t, m in self._pending:
                if m.loops[0].query_id in self._keyframes:
                    ready.append(m)
                elif now - t > wait:
                    self.stats.inc("candidates_expired", len(m.loops))
                    self.get_logger().warning(f"candidates of keyframe {m.loops[0].query_id} dropped: the keyframe "
                                           f"did not arrive within {wait} s", throttle_duration_sec=5.0)
                else:
                    keep.append((t, m))
            self._pending = keep
        for m in ready:
            self._verify(m)

    def _verify(self, msg: LoopClosureArray) -> None:
        cands = [conv.msg_to_candidate(lc, self._keyframes.get(lc.query_id), self._keyframes.get(lc.match_id))
                 for lc in msg.loops]
        try:
            with self._lock:
                self._check_map(msg.map_id, f"candidates of keyframe {msg.loops[0].query_id}")
                results, ms = self.verification.verify(cands)
        except MapMismatch as exc:  # the state was replaced while these waited
            self._refuse(msg, exc)
            return
        except Exception as exc:
            self.stats.error("verify_errors", str(exc))
            self.get_logger().error(f"verifying keyframe {msg.loops[0].query_id} failed: {exc}",
                                    throttle_duration_sec=2.0)
            return
        self.stats.latency("verify", ms)
        accepted = [r for r in results if r.accepted]
        rejected = [r for r in results if not r.accepted]
        for r in results:
            self.get_logger().debug(f"{r.candidate.query.id} -> {r.candidate.match.id}: {r.reason}")
        self.stats.inc("loops_accepted", len(accepted))
        self.stats.inc("loops_rejected", len(rejected))
        self.stats.inc("candidates_verified", len(results))
        stamp = conv.stamp_to_ns(msg.header.stamp)
        if accepted:
            out = conv.loops_to_array(accepted, stamp, msg.header.frame_id, msg.map_id)
            for i, lc in enumerate(out.loops):
                lc.rank = i
            self._pub_loops.publish(out)
            for r in accepted:
                self.get_logger().info(f"loop closure {r.candidate.query.id} -> {r.candidate.match.id}: {r.reason}")
        if rejected:
            self._pub_rejected.publish(conv.loops_to_array(rejected, stamp, msg.header.frame_id, msg.map_id))
        if self.explanations.wanted():
            try:
                self.explanations.publish(results, self.verifier)
            except Exception as exc:  # a picture is never worth a verdict
                self.stats.error("explanation_errors", str(exc))
                self.get_logger().error(f"explanation picture failed: {exc}", throttle_duration_sec=10.0)

    # ----------------------------------------------------------------- output
    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def _tick(self) -> None:
        self._flush_pending()
        self.stats.set("keyframes_stored", self._keyframe_count() or 0)
        self.stats.set("candidates_pending", self.pending_count())
        self._publish_diagnostics("verifier")

    # ----------------------------------------------------------------- state files
    def _keyframe_count(self) -> Optional[int]:
        return len(self.verifier) if self.verifier is not None else None

    def save_map(self, path: str = "") -> str:
        """Save the state to ``<path>.verifier`` (default path: ``map_path``); returns the file."""
        return self._write_state(verifier_state_path(self._map_path(path)), self._lock,
                                 lambda out: self.verifier.save(out))

    def load_map(self, path: str = "") -> str:
        """Replace the state by ``<path>.verifier`` (default path: ``map_path``); returns the file."""
        path = self._map_path(path)
        state = verifier_state_path(path)
        if not Path(state).exists():
            raise MegalocError(f"verifier state {state} does not exist")
        v = self._build_verification(path)
        with self._lock:
            self.verification = v
            self._keyframes.clear()
            self._pending.clear()
            self._dirty = False
        return state


def main(args=None) -> None:
    """`ros2 run megaloc_ros verifier_node`: this node alone on a multi-threaded executor."""
    spin_single(VerifierNode, args)
