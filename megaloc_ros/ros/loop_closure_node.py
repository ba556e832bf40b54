"""``loop_closure_node``: camera images -> encoder -> place map -> loop-closure candidates.

A lifecycle node that configures and activates itself when ``autostart`` is true (the default).

Subscribes   <image_topic> (sensor_msgs/Image) or <image_topic>/compressed (CompressedImage),
             <odom_topic> (nav_msgs/Odometry, optional: keyframe selection and poses)
             <depth_topic> (sensor_msgs/Image 16UC1/32FC1 registered depth, optional: sent with
             each keyframe, so the verifier gives loops a metric transform)
Publishes    ~/candidates  megaloc_ros/LoopClosureArray, the detector's decisions (threshold,
                           temporal consistency, duplicate suppression): for a back end
                           without verifier_node
             ~/retrieved   megaloc_ros/LoopClosureArray, the raw top-k of every keyframe, what
                           verifier_node checks (see megaloc_ros/pipeline.py for why)
             ~/keyframes   megaloc_ros/Keyframe, every accepted keyframe with its (downscaled)
                           image and features, for verifier_node (reliable, keep-all)
             ~/markers     visualization_msgs/MarkerArray: keyframes and candidate edges (with poses)
             <fleet_topic> megaloc_ros/FleetKeyframe (with fleet_topic set): every accepted keyframe's
                           compact descriptor for the other robots (reliable, transient-local,
                           fleet_backlog deep: a robot that starts late gets the backlog)
             <fleet_topic>/status megaloc_ros/FleetStatus, every second: this robot's progress, so
                           the others can tell it slow from stopped (megaloc_ros/fleet.py Frontiers)
             ~/peer_keyframes megaloc_ros/FleetKeyframe: each peer keyframe put in this map, with the
                           local id it got, for verifier_node (reliable, transient-local; all of
                           a loaded map's peers again at activation and after load_map)
             /diagnostics  frames, keyframes, map size, queue, drops, errors, latencies
Subscribes   <fleet_topic> (with fleet_topic set): the other robots' keyframes, inserted into this
             map as their robot's session (megaloc_ros/fleet.py: ids, sessions, bytes), and
             <fleet_topic>/status: their progress
Services     ~/save_map, ~/load_map (megaloc_ros/SaveMap, LoadMap; empty path: map_path)
             ~/query_image (megaloc_ros/QueryImage): retrieval without inserting; the results'
             query_id is 2^64-1 (not a keyframe)

Threading: the image callback only decodes and appends to a bounded queue (the oldest frame is
dropped and counted when full); one worker thread encodes, runs the detector and publishes.
A frame the detector accepted as keyframe is in the map and on ~/keyframes, whatever follows.
"""
from __future__ import annotations

import array
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np
from geometry_msgs.msg import Point
from nav_msgs.msg import Odometry
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from visualization_msgs.msg import Marker, MarkerArray

from megaloc_ros.msg import FleetKeyframe, FleetStatus
from megaloc_ros.msg import Keyframe as KeyframeMsg
from megaloc_ros.msg import LoopClosureArray
from megaloc_ros.srv import LoadMap, QueryImage, SaveMap

from megaloc_ros import fleet
from megaloc_ros.errors import MegalocError
from megaloc_ros.types import Candidate, Keyframe
from megaloc_ros.pipeline import PipelineSettings, build_encoding, build_mapping
from megaloc_ros.ros import conversions as conv
from megaloc_ros.ros import params as P
from megaloc_ros.ros.managed_node import RELIABLE, RELIABLE_KEEP_ALL, ManagedNode
from megaloc_ros.ros.managed_node import spin_single

LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


@dataclass
class _Frame:
    rgb: np.ndarray
    stamp_ns: int
    frame_id: str
    received: float  # time.monotonic()


class LoopClosureNode(ManagedNode):
    """See the module docstring. ``encoder``: an already loaded encoder to use instead of
    loading ``encoder.model_path`` (tests and in-process callers share one)."""

    DIAG_ERRORS = ("decode_errors", "processing_errors", "odom_errors", "depth_errors", "fleet_errors")
    DIAG_ERROR_TEXT = "bad frames"
    DIAG_WARNING = ("frames_dropped", "frames dropped")

    def __init__(self, node_name: str = P.LOOP_CLOSURE_NODE, *, encoder=None, **kwargs):
        sections = P.node_sections(P.LOOP_CLOSURE_NODE)
        super().__init__(node_name, P.node_specs(P.LOOP_CLOSURE_NODE), "detector", sections["detector"],
                         sections, **kwargs)
        self._logged: dict[str, float] = {}
        self._given_encoder = encoder
        self.encoding = None   # pipeline stages (megaloc_ros.pipeline), built on configure
        self.mapping = None
        self.session = 0
        self._verifier_clients: dict = {}
        self._client_group = ReentrantCallbackGroup()  # replies arrive while our service callback waits
        self._cv = threading.Condition()
        self._queue: deque[_Frame] = deque()
        self._busy = False
        self._idle_since = time.monotonic()  # no frame waiting or being processed since (fleet status)
        self._stop = False
        self._worker: Optional[threading.Thread] = None
        self._odom: deque = deque(maxlen=2000)  # (stamp_ns, 4x4 pose), in arrival order
        self._depth: deque = deque(maxlen=30)   # (stamp_ns, depth Image message), decoded for keyframes only
        self._odom_frame = ""
        self._positions: dict[int, np.ndarray] = {}
        self._edges: list[tuple[int, int]] = []
        self._markers_dirty = False
        self.robot = ""                     # fleet name, with fleet_topic set
        self.peers = fleet.PeerTable()      # the peers' keyframes in this map
        self._pub_fleet = self._pub_peers = self._pub_status = None
        self._fleet_lock = threading.Lock()
        self._frontiers = fleet.Frontiers(0, 0.0, 0.0)  # peers' map ends; queries waiting for them
        self._recent = fleet.RecentQueries(0.0)          # own queries a crossing peer may have missed
        self._last_frame_stamp = 0
        self._last_shared = (-1, 0)  # (id, stamp_ns) of the newest keyframe shared with the fleet
        self._autostart()

    # ----------------------------------------------------------------- lifecycle
    def _apply_params(self) -> None:
        if self.mapping is not None:
            self.mapping.set_params(self._build_params())
            self.get_logger().info("detector parameters updated")

    def _configure(self) -> None:
        if self._param("fleet_topic"):
            if not self._param("fleet_topic").startswith("/"):
                raise MegalocError(f"fleet_topic must be absolute (shared by every robot), got "
                                   f"{self._param('fleet_topic')!r}")
            self.robot = fleet.robot_name(self.get_namespace(), self._param("fleet_robot"))
        settings = PipelineSettings.from_flat(self._values, verify=False)
        self.encoding = build_encoding(settings.encoder, self._given_encoder)
        enc = self.encoding.encoder
        self.get_logger().info(f"encoder: {enc.model_name} ({enc.descriptor_dim}-D)")
        self.mapping = build_mapping(settings, enc.model_name, enc.descriptor_dim, self._param("map_path"))
        if len(self.mapping):
            self.get_logger().info(f"loaded map {self._param('map_path')}: {len(self.mapping)} keyframes")
        self._on_new_map()
        self._pub_candidates = self.create_lifecycle_publisher(LoopClosureArray, "~/candidates", RELIABLE)
        self._pub_retrieved = self.create_lifecycle_publisher(LoopClosureArray, "~/retrieved", RELIABLE)
        self._pub_keyframes = self.create_lifecycle_publisher(KeyframeMsg, "~/keyframes", RELIABLE_KEEP_ALL)
        self._pub_markers = self.create_lifecycle_publisher(MarkerArray, "~/markers", LATCHED)
        self._own_pubs = [self._pub_candidates, self._pub_retrieved, self._pub_keyframes, self._pub_markers]
        if self.robot:
            self._pub_fleet = self.create_publisher(FleetKeyframe, self._param("fleet_topic"), self._fleet_qos())
            # transient-local: a verifier that starts (or restarts) later still learns every peer
            # (a plain publisher: it announces a loaded map's peers while activating)
            self._pub_peers = self.create_publisher(FleetKeyframe, "~/peer_keyframes", self._fleet_qos())
            self._pub_status = self.create_publisher(FleetStatus, self._status_topic(), RELIABLE)
            self._own_pubs += [self._pub_fleet, self._pub_peers, self._pub_status]
            self._own_timers.append(self.create_timer(fleet.STATUS_PERIOD_S, self._publish_status,
                                                      callback_group=MutuallyExclusiveCallbackGroup()))
            name = self._param("verifier_node") or "verifier_node"
            ns = self.get_namespace().rstrip("/")
            self._data_service = name if name.startswith("/") else f"{ns}/{name}/keyframe_data"
        self._stop = False
        self._worker = threading.Thread(target=self._work, name=f"{self.get_name()}_worker", daemon=True)
        self._worker.start()

    def _extra_services(self) -> list:
        return [(QueryImage, "~/query_image", self._srv_query_image)]

    def _on_new_map(self) -> None:
        """Session of new keyframes and the markers, for the map now in ``mapping``."""
        keyframes = list(self.mapping.place_map.keyframes())
        s = int(self._param("session"))
        if s < 0 and self.robot:
            s = fleet.robot_session(self.robot)
        if s < 0:
            s = max((kf.session for kf in keyframes), default=-1) + 1
        self.session = s
        self.peers = fleet.PeerTable.from_extra(self.mapping.place_map.extras.get(fleet.PeerTable.EXTRA))
        with self._fleet_lock:
            self._frontiers.reset((p.session, lid) for lid, p in self.peers.items())
            self._recent.reset()
        self._positions = {kf.id: kf.pose[:3, 3].copy() for kf in keyframes if kf.pose is not None}
        self._edges = []
        self._markers_dirty = True

    def _activate(self) -> None:
        qos = qos_profile_sensor_data if self._param("image_qos") == "sensor_data" else RELIABLE
        qos = QoSProfile(depth=self._param("image_qos_depth"), reliability=qos.reliability,
                         durability=qos.durability, history=HistoryPolicy.KEEP_LAST)
        topic = self._param("image_topic")
        group = MutuallyExclusiveCallbackGroup()
        if self._param("image_transport") == "compressed":
            if not topic.endswith("/compressed"):
                topic = topic.rstrip("/") + "/compressed"
            self._own_subs = [self.create_subscription(CompressedImage, topic, self._on_image, qos, callback_group=group)]
        else:
            self._own_subs = [self.create_subscription(Image, topic, self._on_image, qos, callback_group=group)]
        if self._param("depth_topic"):
            qos_d = QoSProfile(depth=self._param("image_qos_depth"), reliability=qos.reliability,
                               history=HistoryPolicy.KEEP_LAST)
            self._own_subs.append(self.create_subscription(
                Image, self._param("depth_topic"), lambda m: self._depth.append((conv.stamp_to_ns(m.header.stamp), m)),
                qos_d, callback_group=MutuallyExclusiveCallbackGroup()))
        if self.robot:
            self._own_subs.append(self.create_subscription(
                FleetKeyframe, self._param("fleet_topic"), self._on_fleet_keyframe, self._fleet_qos(),
                callback_group=MutuallyExclusiveCallbackGroup()))
            self._own_subs.append(self.create_subscription(
                FleetStatus, self._status_topic(), self._on_fleet_status, RELIABLE,
                callback_group=MutuallyExclusiveCallbackGroup()))
        if self._param("odom_topic"):
            self._own_subs.append(self.create_subscription(Odometry, self._param("odom_topic"), self._on_odom, 100,
                                                       callback_group=MutuallyExclusiveCallbackGroup()))
        if self.robot:
            self._announce_peers()
        self.get_logger().info(f"listening on {self._own_subs[0].topic_name}; map has {len(self.mapping)} keyframes, "
                               f"new keyframes are session {self.session}")

    def _drain(self) -> None:
        self.wait_idle(timeout=30.0)

    def _stop_work(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout=30.0)
        self._worker = None
        with self._cv:
            self._queue.clear()

    # ----------------------------------------------------------------- input
    def _on_image(self, msg) -> None:
        self.stats.inc("frames_received")
        t = time.monotonic()
        try:
            rgb = conv.image_msg_to_rgb(msg, self._param("max_image_pixels"))
        except Exception as exc:  # ImageDecodeError, and anything else a malformed message causes
            self.stats.error("decode_errors", str(exc))
            self._log_error(f"frame dropped: {exc}")
            return
        frame = _Frame(rgb, conv.stamp_to_ns(msg.header.stamp), msg.header.frame_id, t)
        with self._cv:
            if len(self._queue) >= self._param("queue_size"):
                self._queue.popleft()
                self.stats.inc("frames_dropped")
                self.get_logger().warning("encoder is behind: dropped the oldest queued frame "
                                       "(see /diagnostics frames_dropped)", throttle_duration_sec=5.0)
            self._queue.append(frame)
            self._cv.notify_all()

    def _log_error(self, text: str, period: float = 5.0) -> None:
        """Log each distinct error, repeats of the same one at most every ``period`` seconds
        (a broken camera driver must not flood the log; /diagnostics counts every one)."""
        now = time.monotonic()
        if now - self._logged.get(text, -1e9) >= period:
            self._logged[text] = now
            if len(self._logged) > 100:
                self._logged = {k: t for k, t in self._logged.items() if now - t < period}
            self.get_logger().error(text)

    def _on_odom(self, msg: Odometry) -> None:
        try:
            pose = conv.odometry_to_matrix(msg)
        except ValueError as exc:
            self.stats.error("odom_errors", str(exc))
            self.get_logger().error(f"odometry ignored: {exc}", throttle_duration_sec=5.0)
            return
        self._odom.append((conv.stamp_to_ns(msg.header.stamp), pose))
        self._odom_frame = msg.header.frame_id

    def _depth_at(self, stamp_ns: int) -> Optional[np.ndarray]:
        """The depth image (metres) of this stamp, within depth_max_dt; a bad one is counted."""
        near = [(abs(t - stamp_ns), m) for t, m in list(self._depth)]
        if not near:
            return None
        dt, msg = min(near, key=lambda x: x[0])
        if dt > self._param("depth_max_dt") * 1e9:
            self.stats.inc("keyframes_without_depth")
            return None
        try:
            return conv.depth_msg_to_metres(msg, self._param("depth_scale"))
        except Exception as exc:
            self.stats.error("depth_errors", str(exc))
            self._log_error(f"depth image ignored: {exc}")
            return None

    def _pose_at(self, stamp_ns: int) -> Optional[np.ndarray]:
        if not self._odom:
            return None
        best = min(list(self._odom), key=lambda o: abs(o[0] - stamp_ns))
        return best[1] if abs(best[0] - stamp_ns) <= self._param("odom_max_dt") * 1e9 else None

    # ----------------------------------------------------------------- fleet
    def _fleet_qos(self) -> QoSProfile:
        return QoSProfile(depth=self._param("fleet_backlog"), history=HistoryPolicy.KEEP_LAST,
                          reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)

    def _share(self, kf: Keyframe, descriptor, map_id: str) -> None:
        """Publish an accepted keyframe's compact descriptor on the fleet topic (bytes counted)."""
        from rclpy.serialization import serialize_message
        data, scale = fleet.encode_descriptor(descriptor, self._param("fleet_descriptor"))
        m = FleetKeyframe(header=conv.make_header(kf.stamp_ns, kf.frame_id), robot=self.robot, session=kf.session,
                          id=int(kf.id), map_id=map_id, data_service=self._data_service,
                          encoding=self._param("fleet_descriptor"), scale=float(scale), dim=len(descriptor))
        m.data = array.array("B", data)
        self._pub_fleet.publish(m)
        self._last_shared = (int(kf.id), int(kf.stamp_ns))
        self.stats.inc("fleet_keyframes_sent")
        self.stats.set("fleet_descriptor_bytes", len(data))
        self.stats.inc("fleet_bytes_sent", len(serialize_message(m)))
        self.stats.set("fleet_bytes_per_keyframe", self.stats.count("fleet_bytes_sent")
                       / self.stats.count("fleet_keyframes_sent"))

    def _on_fleet_keyframe(self, msg: FleetKeyframe) -> None:
        """A peer's keyframe: into this map as its robot's session, with a local id (once)."""
        if msg.robot == self.robot:
            return  # our own, back from the shared topic
        self.stats.inc("fleet_keyframes_received")
        self.stats.inc("fleet_bytes_received", len(msg.data) + len(msg.robot) + len(msg.map_id)
                       + len(msg.data_service) + 64)
        try:
            d = fleet.decode_descriptor(msg.data, msg.encoding, msg.scale, msg.dim)
            if self.mapping is None:
                return
            with self.mapping.lock:
                if self.peers.local_id(msg.robot, msg.map_id, msg.id) is not None:
                    self.stats.inc("fleet_duplicates")  # e.g. the backlog again after a reconnection
                    return
                det = self.mapping.detector
                local = det.next_id
                kf = Keyframe(local, conv.stamp_to_ns(msg.header.stamp), int(msg.session), msg.header.frame_id)
                self.mapping.place_map.add(kf, d)
                det.next_id += 1
                self.peers.add(local, fleet.PeerKeyframe(msg.robot, msg.map_id, int(msg.id), int(msg.session),
                                                         msg.data_service))
                self._dirty = True
        except Exception as exc:
            self.stats.error("fleet_errors", str(exc))
            self._log_error(f"fleet keyframe {msg.robot}/{msg.id} ignored: {exc}")
            return
        self.stats.inc("fleet_keyframes_inserted")
        with self._fleet_lock:
            now = time.monotonic()
            frontiers = self._frontier_params()
            frontiers.on_keyframe(int(msg.session), int(local), int(msg.id), now)
            crossed = self._recent.crossed(int(msg.session), int(local), d, now)
            for q in crossed:  # asked before this keyframe came: ask again once that map settled
                frontiers.defer(int(msg.session), q)
        if crossed:
            self.stats.inc("fleet_deferred_crossed", len(crossed))
        self._requery_settled()
        out = FleetKeyframe(header=msg.header, robot=msg.robot, session=msg.session, id=msg.id, map_id=msg.map_id,
                            data_service=msg.data_service, local_id=int(local), encoding=msg.encoding,
                            scale=msg.scale, dim=msg.dim)
        self._pub_peers.publish(out)

    def _status_topic(self) -> str:
        return self._param("fleet_topic").rstrip("/") + "/status"

    def _frontier_params(self) -> fleet.Frontiers:
        """Under ``_fleet_lock``: the frontiers (and the recent queries' window), with the
        current parameters."""
        f = self._frontiers
        f.settle_keyframes, f.settle_s = self._param("fleet_settle_keyframes"), self._param("fleet_settle_s")
        f.peer_timeout_s = self._param("fleet_peer_timeout")
        self._recent.window_s = f.settle_s
        return f

    def _publish_status(self) -> None:
        """This robot's progress on ``<fleet_topic>/status`` (timer, ``fleet.STATUS_PERIOD_S``)."""
        with self._cv:
            idle = 0.0 if (self._queue or self._busy) else time.monotonic() - self._idle_since
        kid, kstamp = self._last_shared
        self._pub_status.publish(FleetStatus(
            header=conv.make_header(self._last_frame_stamp, ""), robot=self.robot, session=self.session,
            frames_processed=int(self.stats.count("frames_processed")),
            keyframes=int(self.stats.count("fleet_keyframes_sent")), keyframe_id=kid,
            keyframe_stamp=conv.ns_to_stamp(kstamp), idle_s=float(idle)))

    def _on_fleet_status(self, msg: FleetStatus) -> None:
        if msg.robot == self.robot:
            return
        with self._fleet_lock:
            self._frontier_params().on_status(int(msg.session), fleet.PeerStatus(
                conv.stamp_to_ns(msg.header.stamp), float(msg.idle_s), int(msg.keyframe_id),
                conv.stamp_to_ns(msg.keyframe_stamp)), time.monotonic())
        self._requery_settled()

    def _at_frontier(self, c: Candidate, now: float) -> bool:
        """Under ``_fleet_lock``: ``c`` matches a peer keyframe at that robot's frontier while it
        may still be on its way there (``fleet.Frontiers``)."""
        s = c.match.session
        return s != self.session and self._frontier_params().at_frontier(s, c.match.id, now)

    def _ask_or_defer_peers(self, q: fleet.Query, retrieved: list) -> list:
        """The candidates to verify now; records which peer keyframes ``q`` was asked of.
        A peer robot's candidates are left out when some are at its frontier (``_at_frontier``):
        the peer may be on its way to this place, and verifying now accepts a near miss (the best
        of what it mapped so far). The query is asked again of that robot's keyframes when its
        map settled (``fleet.Frontiers.settled``, ``_requery_settled``). ``q`` is kept a while
        (``fleet.RecentQueries``): a peer arriving at its place just after it was asked gets it
        deferred too."""
        now = time.monotonic()
        with self._fleet_lock:
            defer = set()
            if self._frontier_params().settle_keyframes > 0:
                defer = {c.match.session for c in retrieved if self._at_frontier(c, now)}
            # all of that robot's candidates wait: verified together later, the best one wins
            keep = [c for c in retrieved if c.match.session not in defer]
            for s in defer:
                q.waiting.add(s)
                self._frontiers.defer(s, q)
            for c in keep:
                if c.match.session != self.session:
                    q.note_asked(c.match.session, [c.match.id])
            self._recent.add(q, now)
        if defer:
            self.stats.inc("fleet_deferred_queries", len(defer))
            keep = [type(c)(c.query, c.match, c.score, r) for r, c in enumerate(keep)]
        return keep

    def _requery_settled(self) -> None:
        """Ask the deferred queries again of their peer's keyframes where its map settled."""
        with self._fleet_lock:
            ready = self._frontier_params().settled(time.monotonic())
        stopped: dict[tuple[int, str], list[int]] = {}
        for s, q, why in ready:
            self.stats.inc(f"fleet_settled_{why}")
            if why != "keyframes":
                stopped.setdefault((s, why), []).append(q.kf.id)
        for (s, why), ids in stopped.items():
            robot = self.peers.robots().get(s, f"session {s}")
            self.get_logger().info(f"{robot} is {why}: keyframes {ids} are asked again of its map as it is")
        for s, q, why in ready:
            try:
                k = self.mapping.params.top_k
                with self.mapping.lock:
                    if self.mapping.place_map.map_id != q.map_id:
                        continue  # another map was loaded meanwhile
                    hits = self.mapping.place_map.search(q.descriptor, k + len(q.asked.get(s, ())),
                                                         only_sessions=[s])
                with self._fleet_lock:
                    hits = q.not_asked(s, hits)[:k]   # not the keyframes it was verified against
                    cands = [Candidate(q.kf, m, sc, r) for r, (m, sc) in enumerate(hits)]
                    if any(self._at_frontier(c, time.monotonic()) for c in cands):
                        self._frontiers.defer(s, q)  # still on its way: wait more
                        self.stats.inc("fleet_deferred_again")
                        continue
                    q.waiting.discard(s)
                    q.note_asked(s, [c.match.id for c in cands])
                self.stats.inc("fleet_requeries")
                if cands:
                    self._pub_retrieved.publish(conv.loops_to_array(cands, q.kf.stamp_ns, q.kf.frame_id, q.map_id))
                    self.stats.inc("retrieved", len(cands))
            except Exception as exc:
                self.stats.error("fleet_errors", str(exc))
                self._log_error(f"asking keyframe {q.kf.id} again failed: {exc}")

    def _announce_peers(self) -> None:
        """Every peer keyframe of the map on ~/peer_keyframes (a loaded map's peers)."""
        pm = self.mapping.place_map
        for lid, p in self.peers.items():
            if lid not in pm:
                continue
            kf = pm.keyframe(lid)
            self._pub_peers.publish(FleetKeyframe(
                header=conv.make_header(kf.stamp_ns, kf.frame_id), robot=p.robot, session=p.session,
                id=int(p.remote_id), map_id=p.map_id, data_service=p.data_service, local_id=int(lid)))

    def fleet_pending(self) -> int:
        """Queries still waiting for a peer's map to settle."""
        with self._fleet_lock:
            return self._frontiers.pending()

    # ----------------------------------------------------------------- worker
    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until the queue is empty and the worker is not processing; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._queue or self._busy:
                if self._worker is None or not self._worker.is_alive():
                    return not self._queue
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
        return True

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                frame = self._queue.popleft()
                self._busy = True
            try:
                self._process(frame)
            except Exception as exc:
                self.stats.error("processing_errors", str(exc))
                self.get_logger().error(f"frame at {frame.stamp_ns} ns failed: {exc}", throttle_duration_sec=2.0)
            finally:
                with self._cv:
                    self._busy = False
                    self._idle_since = time.monotonic()
                    self._cv.notify_all()

    def _process(self, f: _Frame) -> None:
        pose = self._pose_at(f.stamp_ns) if self._param("odom_topic") else None
        self._last_frame_stamp = f.stamp_ns
        feats, encode_ms = self.encoding.encode(f.rgb)
        det, search_ms = self.mapping.detect(feats.descriptor, f.stamp_ns, self.session, f.frame_id, pose)
        map_id = self.mapping.place_map.map_id  # the map whose ids det names (a load waits for us)
        if det.keyframe is not None:
            self._dirty = True
        self.stats.latency("encode", encode_ms)
        self.stats.latency("search", search_ms)
        self.stats.inc("frames_processed")
        kf = det.keyframe
        if kf is None:
            self.stats.latency("total", (time.monotonic() - f.received) * 1e3)
            return
        self.stats.inc("keyframes")
        if not self._param("publish_patch_features"):
            feats = type(feats)(feats.descriptor, None)
        depth = self._depth_at(f.stamp_ns) if self._param("depth_topic") else None
        self._pub_keyframes.publish(conv.keyframe_to_msg(kf, f.rgb, feats, self._param("keyframe_image_max_side"),
                                                         map_id, depth))
        if self._pub_fleet is not None:
            self._share(kf, feats.descriptor, map_id)
            p = self.mapping.params
            q = fleet.Query.from_retrieval(kf, feats.descriptor, map_id, det.retrieved, p.top_k,
                                           p.similarity_threshold)
            det.retrieved = self._ask_or_defer_peers(q, det.retrieved)
        if det.retrieved:
            self._pub_retrieved.publish(conv.loops_to_array(det.retrieved, kf.stamp_ns, kf.frame_id, map_id))
            self.stats.inc("retrieved", len(det.retrieved))
        if det.candidates:
            self._pub_candidates.publish(conv.loops_to_array(det.candidates, kf.stamp_ns, kf.frame_id, map_id))
            self.stats.inc("candidates", len(det.candidates))
        if kf.pose is not None:
            self._positions[kf.id] = kf.pose[:3, 3].copy()
            self._edges += [(c.query.id, c.match.id) for c in det.candidates]
            self._markers_dirty = True
        self.stats.latency("total", (time.monotonic() - f.received) * 1e3)

    # ----------------------------------------------------------------- output
    def _tick(self) -> None:
        if self.fleet_pending():
            self._requery_settled()
        self.stats.set("fleet_deferred", self.fleet_pending())
        with self._cv:
            qlen = len(self._queue)
        self.stats.set("queue_length", qlen)
        self.stats.set("queue_size", self._param("queue_size"))
        self.stats.set("map_size", self._keyframe_count() or 0)
        self.stats.set("session", self.session)
        self.stats.set("frame_rate_hz", self.stats.rate("frames_received"))
        dead = None if self._worker is not None and self._worker.is_alive() else "worker not running"
        self._publish_diagnostics(self.encoding.encoder.model_name if self.encoding else "", dead)
        if self._markers_dirty:
            self._markers_dirty = False
            self._publish_markers()

    def _publish_markers(self) -> None:
        frame = self._odom_frame or self._param("map_frame")
        stamp = self.get_clock().now().to_msg()
        pts = dict(self._positions)
        kfm = Marker(ns="keyframes", id=0, type=Marker.SPHERE_LIST, action=Marker.ADD)
        kfm.header.frame_id, kfm.header.stamp = frame, stamp
        kfm.pose.orientation.w = 1.0
        kfm.scale.x = kfm.scale.y = kfm.scale.z = 0.15
        kfm.color.r, kfm.color.g, kfm.color.b, kfm.color.a = 0.2, 0.6, 1.0, 1.0
        kfm.points = [Point(x=float(p[0]), y=float(p[1]), z=float(p[2])) for p in pts.values()]
        edges = Marker(ns="loop_candidates", id=0, type=Marker.LINE_LIST, action=Marker.ADD)
        edges.header.frame_id, edges.header.stamp = frame, stamp
        edges.pose.orientation.w = 1.0
        edges.scale.x = 0.05
        edges.color.r, edges.color.g, edges.color.b, edges.color.a = 1.0, 0.3, 0.1, 1.0
        for q, m in list(self._edges):
            if q in pts and m in pts:
                edges.points += [Point(x=float(v[0]), y=float(v[1]), z=float(v[2])) for v in (pts[q], pts[m])]
        self._pub_markers.publish(MarkerArray(markers=[kfm, edges]))

    # ----------------------------------------------------------------- map files
    def _keyframe_count(self) -> Optional[int]:
        return len(self.mapping) if self.mapping is not None else None

    def save_map(self, path: str = "") -> str:
        """Save the map to ``path`` (default ``map_path``); returns the path written."""
        path = self._map_path(path)
        if self.mapping is None:
            raise MegalocError("the node is not configured: no map to save")
        return self._write_state(path, self.mapping.lock, self._save_with_peers)

    def _save_with_peers(self, path: str) -> None:
        """The map, with the (robot, remote id) of its peers' keyframes in its extras."""
        if len(self.peers):
            self.mapping.place_map.extras[fleet.PeerTable.EXTRA] = self.peers.to_extra()
        self.mapping.save(path)

    def load_map(self, path: str = "") -> str:
        """Replace the map by the one at ``path`` (default ``map_path``); new keyframes continue
        its ids in a new session (unless the ``session`` parameter fixes one)."""
        from megaloc_ros.mapping.place_map import PlaceMap
        path = self._map_path(path)
        if not os.path.exists(path):
            raise MegalocError(f"map file {path} does not exist")
        enc = self.encoding.encoder
        m = PlaceMap.load(path, expected_model=enc.model_name, expected_dim=enc.descriptor_dim)
        self.wait_idle(timeout=30.0)
        with self.mapping.lock:
            self.mapping.replace_map(m)
            self._on_new_map()
            self._dirty = False
            if self.robot and self._own_subs:  # active: the verifier learns the new map's peers
                self._announce_peers()
        self.get_logger().info(f"loaded map {path}: {len(m)} keyframes, new keyframes are session {self.session}")
        return path

    def _srv_query_image(self, req, res):
        try:
            rgb = conv.image_msg_to_rgb(req.image, self._param("max_image_pixels"))
            feats, _ = self.encoding.encode(rgb)
            stamp = conv.stamp_to_ns(req.image.header.stamp)
            cands = self.mapping.query(feats.descriptor, top_k=int(req.top_k) or None, stamp_ns=stamp,
                                       session=self.session, frame_id=req.image.header.frame_id)
            res.result = conv.loops_to_array(cands, stamp, req.image.header.frame_id,
                                             self.mapping.place_map.map_id)
            res.success, res.message = True, f"{len(cands)} places"
        except Exception as exc:  # an error, never an empty result that reads as "no match"
            self.stats.error("query_errors", str(exc))
            self.get_logger().error(f"query_image: {exc}")
            res.success, res.message, res.result = False, str(exc), LoopClosureArray()
        return res

    # ----------------------------------------------------------------- one map, both nodes
    def _srv_save_map(self, req, res):
        return self._with_verifier(SaveMap, "save_map", req, super()._srv_save_map(req, res))

    def _srv_load_map(self, req, res):
        return self._with_verifier(LoadMap, "load_map", req, super()._srv_load_map(req, res))

    def _with_verifier(self, srv_type, service: str, req, res, timeout: float = 60.0):
        """After this node saved or loaded the map, the verifier node (``verifier_node``
        parameter) saves or loads its state at the same path: one call does both. A verifier
        that is absent or fails is said in the reply (it then refuses this map's keyframes)."""
        name = self._param("verifier_node")
        if not res.success or not name:
            return res
        client = self._verifier_clients.get(service)
        if client is None:
            client = self._verifier_clients[service] = self.create_client(
                srv_type, f"{name}/{service}", callback_group=self._client_group)
        if not client.wait_for_service(timeout_sec=2.0):
            res.message += f"; {client.srv_name} is not available, its state was not {service.split('_')[0]}d"
            return res
        done = threading.Event()
        future = client.call_async(srv_type.Request(path=self._map_path(req.path)))
        future.add_done_callback(lambda _: done.set())
        if not done.wait(timeout) or future.result() is None:
            res.success, res.message = False, res.message + f"; {client.srv_name} did not answer in {timeout:g} s"
        elif not future.result().success:
            res.success = False
            res.message += f"; but {client.srv_name} failed: {future.result().message}"
        else:
            res.message += f"; {name}: {future.result().message}"
        return res


def main(args=None) -> None:
    """`ros2 run megaloc_ros loop_closure_node`: this node alone on a multi-threaded executor."""
    spin_single(LoopClosureNode, args)
