"""``verifier_node``: loop-closure candidates -> verified loop closures for the SLAM back end.

A lifecycle node that configures and activates itself when ``autostart`` is true (the default).

Subscribes   <keyframes_topic>  megaloc_ros/Keyframe (reliable, keep-all: none may be lost)
             <candidates_topic> megaloc_ros/LoopClosureArray
             <peer_keyframes_topic> megaloc_ros/FleetKeyframe: other robots' keyframes that
                                loop_closure_node put in the map (local id, owner, owner's service)
Publishes    ~/loop_closures    LoopClosureArray: accepted loops only, verified=true, with the
                                transform when the camera intrinsics are known
             ~/rejected         LoopClosureArray: rejected candidates (debugging); a loop withheld
                                for want of a consistent one is here first, and on
                                ~/loop_closures if a keyframe verified later supports it
             ~/explanations     sensor_msgs/Image: each accepted loop drawn (query | match,
                                voting SuperSegments, inlier matches, the reason); rendered only
                                while someone subscribes (megaloc_ros/ros/explanations.py)
             /diagnostics
Services     ~/save_map, ~/load_map: the verifier state, kept at ``<path>.verifier`` next to the
             loop_closure_node's map file of the same path
             ~/keyframe_data (megaloc_ros/KeyframeData): one of this robot's stored keyframes'
             verification data, for the other robots' verifiers (megaloc_ros/fleet.py)

Inter-robot candidates (their match is a peer keyframe) are verified here: the match's data is
asked for once from its owner's ~/keyframe_data when it first becomes a candidate, then kept
(and saved) like our own keyframes. The candidates wait for the answer; an owner that does not
answer within ``fleet_request_timeout`` costs a rejection and a count, never a stall.

Counts (/diagnostics): ``candidates_verified`` the candidates decided (each once);
``loops_rejected`` the rejections among them; ``loops_accepted`` the loops published, of which
``loops_confirmed_late`` were rejected (withheld) first. So accepted + rejected = verified + late.

Each keyframe is reduced by ``megaloc_ros.verification.verifier.Verifier`` to what verification needs (no
image is kept). A candidate array whose query keyframe has not arrived yet waits up to
``candidate_wait`` seconds (keyframes and candidates travel on different topics).
"""
from __future__ import annotations

import array
import threading
import time
from pathlib import Path
from typing import Optional

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo

from megaloc_ros.msg import FleetKeyframe
from megaloc_ros.msg import Keyframe as KeyframeMsg
from megaloc_ros.msg import LoopClosureArray
from megaloc_ros.srv import KeyframeData

from megaloc_ros import fleet

from megaloc_ros.errors import MegalocError
from megaloc_ros.types import Keyframe, VerifiedLoop
from megaloc_ros.verification import geometry
from megaloc_ros.pipeline import build_verification, live_verifier_params
from megaloc_ros.ros import conversions as conv
from megaloc_ros.ros import params as P
from megaloc_ros.ros.managed_node import RELIABLE, RELIABLE_KEEP_ALL, ManagedNode
from megaloc_ros.ros.explanations import ExplanationPublisher
from megaloc_ros.ros.managed_node import spin_single

SUFFIX = ".verifier"
NOT_STORED = "not stored (yet)"
# loop_closure_node's peer keyframes, also those announced before this node subscribed
PEERS_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.TRANSIENT_LOCAL)


class MapMismatch(MegalocError):
    """Input that names keyframes of another map than the verifier state holds."""


def verifier_state_path(map_path: str) -> str:
    return map_path + SUFFIX


class VerifierNode(ManagedNode):
    """See the module docstring."""

    STATE_NAME = "verifier state"
    DIAG_ERRORS = ("keyframe_errors", "verify_errors", "map_mismatch", "fleet_requests_failed",
                   "fleet_requests_timed_out", "camera_info_errors")
    DIAG_WARNING = ("candidates_expired", "candidates expired")

    def __init__(self, node_name: str = P.VERIFIER_NODE, **kwargs):
        sections = P.node_sections(P.VERIFIER_NODE)
        super().__init__(node_name, P.node_specs(P.VERIFIER_NODE), "verifier", sections["verifier"],
                         sections, **kwargs)
        with self.destroyed_on_error():
            self._camera()
        self.verification = None   # the pipeline's verification stage, built on configure
        self._lock = threading.RLock()   # the Verifier and the pending candidates
        self._keyframes: dict[int, object] = {}   # id -> Keyframe (with pose) received this run
        self._pending: list[tuple[float, LoopClosureArray]] = []
        self._peers: dict[int, FleetKeyframe] = {}   # local id -> the peer keyframe it names
        self._fetches: dict[int, dict] = {}          # local id -> request state (see _fetch)
        self._data_clients: dict[str, object] = {}
        self._client_group = ReentrantCallbackGroup()
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
        """The ``geometry.Camera`` of the camera_* parameters; None: unset."""
        try:
            return P.camera_from_params(self._param("camera_matrix"), self._param("camera_distortion_model"),
                                        self._param("camera_distortion"))
        except ValueError as exc:
            raise MegalocError(str(exc)) from None

    def _build_verification(self, map_path: str):
        state = verifier_state_path(map_path) if map_path else ""
        v = build_verification(self._build_params(), self._camera(), state, map_path)
        if state and Path(state).exists():
            self.get_logger().info(f"loaded verifier state {state}: {len(v.verifier)} keyframes")
        return v

    def _configure(self) -> None:
        self.verification = self._build_verification(self._param("map_path"))
        self._pub_loops = self.create_lifecycle_publisher(LoopClosureArray, "~/loop_closures", RELIABLE)
        self._pub_rejected = self.create_lifecycle_publisher(LoopClosureArray, "~/rejected", RELIABLE)
        self.explanations = ExplanationPublisher(self)  # renders only while someone subscribes
        self._own_pubs = [self._pub_loops, self._pub_rejected, self.explanations.publisher]

    def _extra_services(self) -> list:
        return [(KeyframeData, "~/keyframe_data", self._srv_keyframe_data)]

    def _activate(self) -> None:
        # One callback group: the Verifier sees keyframes and candidates in arrival order.
        group = MutuallyExclusiveCallbackGroup()
        self._own_subs = [
            self.create_subscription(KeyframeMsg, self._param("keyframes_topic"), self._on_keyframe,
                                     RELIABLE_KEEP_ALL, callback_group=group),
            self.create_subscription(LoopClosureArray, self._param("candidates_topic"), self._on_candidates,
                                     RELIABLE, callback_group=group),
            self.create_subscription(FleetKeyframe, self._param("peer_keyframes_topic"), self._on_peer_keyframe,
                                     PEERS_QOS, callback_group=group),
        ]
        if not any(getattr(t, "_megaloc_fleet", False) for t in self._own_timers):
            timer = self.create_timer(0.05, self._fleet_tick, callback_group=MutuallyExclusiveCallbackGroup())
            timer._megaloc_fleet = True  # requests for peer keyframes: sent, timed out
            self._own_timers.append(timer)
        if self._param("camera_info_topic") and self._camera() is None and self.verifier.camera is None:
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
        if self.verifier.camera is not None:
            return
        try:
            cam = geometry.camera_from_info(msg.k, msg.width, msg.height, msg.distortion_model, msg.d)
        except ValueError as exc:  # geometry on a lens model it cannot undo would be wrong: no transform
            self.stats.error("camera_info_errors", str(exc))
            self.get_logger().error(f"ignoring CameraInfo on {self._param('camera_info_topic')}: {exc}",
                                    throttle_duration_sec=10.0)
            return
        if cam is None:
            self.get_logger().warning(f"ignoring CameraInfo without intrinsics on {self._param('camera_info_topic')}",
                                      throttle_duration_sec=10.0)
            return
        with self._lock:
            self.verifier.camera = cam
        self.get_logger().info(f"camera from CameraInfo: {cam}")

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
        published on ~/rejected (so the verdict stays visible), and counted as verified and rejected."""
        cands = [conv.msg_to_candidate(lc) for lc in msg.loops]
        for _ in cands:
            self.stats.error("map_mismatch", str(exc))
        self.stats.inc("candidates_verified", len(cands))
        self.stats.inc("loops_rejected", len(cands))
        self.get_logger().error(str(exc), throttle_duration_sec=2.0)
        self._pub_rejected.publish(conv.loops_to_array(
            [VerifiedLoop(c, False, reason=f"rejected: {exc}") for c in cands],
            conv.stamp_to_ns(msg.header.stamp), msg.header.frame_id, msg.map_id))

    def _flush_pending(self) -> None:
        """Verify the pending candidate arrays whose query keyframe has arrived (and whose peer
        matches' data has arrived or failed); expire old ones."""
        now = time.monotonic()
        wait = self._param("candidate_wait")
        with self._lock:
            ready, keep = [], []
            for t, m in self._pending:
                if m.loops[0].query_id in self._keyframes and self._peer_data_ready(m, t):
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
        # past the given candidates' verdicts: loops of other keyframes, withheld (and counted in
        # loops_rejected) earlier, that these make consistent (a fleet's out-of-order peers)
        late = results[len(cands):]
        accepted = [r for r in results if r.accepted]
        rejected = [r for r in results if not r.accepted]
        for r in results:
            self.get_logger().debug(f"{r.candidate.query.id} -> {r.candidate.match.id}: {r.reason}")
        self.stats.inc("loops_accepted", len(accepted))
        if late:
            self.stats.inc("loops_confirmed_late", len(late))
        inter = sum(1 for r in accepted if r.candidate.match.id in self._peers)
        if inter:
            self.stats.inc("fleet_loops_accepted", inter)
        if self.stats.count("fleet_loops_accepted"):
            self.stats.set("fleet_bytes_per_loop", self.stats.count("fleet_bytes_fetched")
                           / self.stats.count("fleet_loops_accepted"))
        self.stats.inc("loops_rejected", len(rejected))
        self.stats.inc("candidates_verified", len(cands))
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

    # ----------------------------------------------------------------- fleet
    def _on_peer_keyframe(self, msg: FleetKeyframe) -> None:
        """A peer keyframe loop_closure_node put in the map under ``local_id``."""
        with self._lock:
            self._peers[int(msg.local_id)] = msg
            self._keyframes.setdefault(int(msg.local_id), Keyframe(
                int(msg.local_id), conv.stamp_to_ns(msg.header.stamp), int(msg.session), msg.header.frame_id))
        if self.verifier is not None:
            self.verifier.note_keyframe(int(msg.local_id), int(msg.session))  # consistency counts along sessions
        self.stats.inc("fleet_peer_keyframes")
        self._flush_pending()

    def _peer_data_ready(self, m: LoopClosureArray, t_arrived: float) -> bool:
        """Under the lock: True when every peer match of ``m`` is stored or its request ended;
        starts the requests still needed. A match id the verifier has never heard of waits (up to
        candidate_wait) for its peer_keyframes message when peers are in use."""
        ready = True
        for lc in m.loops:
            mid = int(lc.match_id)
            if mid in self.verifier:
                continue
            if mid not in self._peers:
                if self._peers and time.monotonic() - t_arrived <= self._param("candidate_wait"):
                    ready = False
                continue
            f = self._fetches.get(mid)
            if f is None:
                self._fetches[mid] = {"t": time.monotonic(), "future": None, "done": False}
                ready = False
            elif not f["done"]:
                ready = False
        return ready

    def _client(self, service: str):
        c = self._data_clients.get(service)
        if c is None:
            c = self._data_clients[service] = self.create_client(KeyframeData, service,
                                                                 callback_group=self._client_group)
        return c

    def _fleet_tick(self) -> None:
        """Send the requests whose owner's service is up; time out the ones unanswered."""
        if not self._fetches:
            return
        now, timeout, changed = time.monotonic(), self._param("fleet_request_timeout"), False
        with self._lock:
            todo = [(mid, f) for mid, f in self._fetches.items() if not f["done"]]
        for mid, f in todo:
            p = self._peers[mid]
            if now - f["t"] > timeout:
                with self._lock:
                    if f["future"] is not None:
                        self._client(p.data_service).remove_pending_request(f["future"])
                    f["done"], f["t_done"] = True, now
                self.stats.inc("fleet_requests_timed_out")
                self.get_logger().warning(f"{p.data_service} did not give keyframe {p.robot}/{p.id} within "
                                          f"{timeout:g} s: its candidates are rejected", throttle_duration_sec=5.0)
                changed = True
            elif f["future"] is not None and now - f["sent"] > min(1.0, timeout / 3):
                # unanswered: a request sent while the owner's service was still matching our
                # client loses its reply (DDS discovery): send it again, within the timeout
                with self._lock:
                    self._client(p.data_service).remove_pending_request(f["future"])
                    f["future"] = None
                self.stats.inc("fleet_requests_resent")
            if not f["done"] and f["future"] is None and now >= f.get("retry_at", 0.0):
                client = self._client(p.data_service)
                if client.service_is_ready():
                    future = client.call_async(KeyframeData.Request(id=int(p.id), map_id=p.map_id))
                    f["future"], f["sent"] = future, now
                    self.stats.inc("fleet_requests")
                    future.add_done_callback(lambda fut, mid=mid: self._on_peer_data(mid, fut))
        # a done request retried later is forgotten after a while (an owner back online answers)
        with self._lock:
            for mid in [m for m, f in self._fetches.items() if f["done"] and now - f.get("t_done", now) > 60.0
                        and m not in self.verifier]:
                del self._fetches[mid]
        if changed:
            self._flush_pending()

    def _on_peer_data(self, mid: int, future) -> None:
        p = self._peers.get(mid)
        with self._lock:
            f = self._fetches.get(mid)
            if f is None or f["future"] is not future or f["done"]:
                return  # an answer to a request given up or sent again
        try:
            res = future.result()
            if res is not None and not res.success and res.message.startswith(NOT_STORED):
                # the owner shares a keyframe before its own verifier has stored it: ask again soon
                # (within fleet_request_timeout)
                with self._lock:
                    f = self._fetches.get(mid)
                    if f is not None:
                        f["future"], f["retry_at"] = None, time.monotonic() + 0.2
                self.stats.inc("fleet_requests_retried")
                return
            if res is None or not res.success:
                raise MegalocError(res.message if res is not None else "no answer")
            with self._lock:
                note = fleet.import_entry(self.verifier, mid, bytes(res.data))
                self._dirty = True
            self.stats.inc("fleet_bytes_fetched", len(res.data))
            self.stats.inc("fleet_keyframes_fetched")
            self.get_logger().debug(f"keyframe {p.robot}/{p.id} from {p.data_service} as {mid}: {note}")
        except Exception as exc:
            self.stats.error("fleet_requests_failed", str(exc))
            self.get_logger().error(f"keyframe data of {p.robot}/{p.id} not usable: {exc}", throttle_duration_sec=5.0)
        with self._lock:
            f = self._fetches.get(mid)
            if f is not None:
                f["done"], f["t_done"] = True, time.monotonic()
        self._flush_pending()

    def _srv_keyframe_data(self, req, res):
        """One of our keyframes' verification data, for another robot's verifier."""
        try:
            if self.verifier is None:
                raise MegalocError("the verifier is not configured")
            if req.map_id and self.verifier.map_id and req.map_id != self.verifier.map_id:
                raise MegalocError(f"keyframe {req.id} of map {req.map_id} asked for; this verifier holds map "
                                   f"{self.verifier.map_id}")
            data = fleet.export_entry(self.verifier, int(req.id))
            res.data = array.array("B", data)
            res.success, res.message = True, f"{len(data)} bytes"
            self.stats.inc("fleet_keyframes_served")
            self.stats.inc("fleet_bytes_served", len(data))
        except KeyError:
            res.success, res.message = False, f"{NOT_STORED}: keyframe {req.id}"
        except Exception as exc:
            res.success, res.message = False, str(exc)
        return res

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
            self._fetches.clear()   # _peers stay: loop_closure_node announces a loaded map's peers again
            self._dirty = False
        return state


def main(args=None) -> None:
    """`ros2 run megaloc_ros verifier_node`: this node alone on a multi-threaded executor."""
    spin_single(VerifierNode, args)
