"""``rtabmap_adapter``: the verifier's loops -> RTAB-Map links through its ``add_link`` service.

Needs the ``rtabmap_msgs`` package (installed with RTAB-Map); it is imported when the node starts.

Subscribes   <loops_topic>              megaloc_ros/LoopClosureArray (default verifier_node/loop_closures)
             <rtabmap_ns>/mapData       rtabmap_msgs/MapData: nodes' ids and stamps
             <rtabmap_ns>/info          rtabmap_msgs/Info: ref_id and header stamp of each new node
Calls        <rtabmap_ns>/add_link      rtabmap_msgs/srv/AddLink, one request per loop

Each verified loop with a metric transform becomes a ``rtabmap_msgs/Link``:
  from_id      the RTAB-Map node whose stamp is nearest the loop's query stamp (within
               ``stamp_tolerance`` s), to_id the same for the match stamp
  type         4 (RTAB-Map's user closure)
  transform    pose of the match base in the query base (RTAB-Map's convention: the pose of
               ``to`` in the frame of ``from``), from our camera transform and ``base_T_camera``
  information  inverse of its covariance (x y z roll pitch yaw), the verifier's covariance
               carried to the base frames, or ``default_sigma_*`` when it has none, with the
               ``min_sigma_*`` floors added in quadrature
A loop whose stamps have no RTAB-Map node yet waits ``pending_timeout`` s for one (RTAB-Map
makes nodes at its own rate, Rtabmap/DetectionRate, so not every keyframe of ours is a node).
Loops whose translation is only a direction, or that are unverified, are skipped and counted.
"""
from __future__ import annotations

import bisect
import time
from typing import Optional

import numpy as np
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy

from megaloc_ros.msg import LoopClosureArray

from megaloc_ros.errors import MegalocError
from megaloc_ros.ros import conversions as conv
from megaloc_ros.ros.adapters import frames
from megaloc_ros.types import SECOND_NS as NS, RelativePose

NODE_NAME = "rtabmap_adapter"
USER_CLOSURE = 4   # rtabmap::Link::kUserClosure
RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)


def rtabmap_msgs():
    """(Link, AddLink, MapData, Info) of rtabmap_msgs, or MegalocError saying how to get them."""
    try:
        from rtabmap_msgs.msg import Info, Link, MapData
        from rtabmap_msgs.srv import AddLink
    except ImportError as exc:
        raise MegalocError(f"the rtabmap_msgs package is missing (apt install "
                           f"ros-$ROS_DISTRO-rtabmap-msgs, or RTAB-Map's workspace sourced): {exc}") from None
    return Link, AddLink, MapData, Info


def link_fields(T_match_query: np.ndarray, covariance: Optional[np.ndarray], base_T_camera: Optional[np.ndarray] = None,
                default_sigma_t: float = 0.05, default_sigma_r: float = 0.03, min_sigma_t: float = 0.0,
                min_sigma_r: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(transform 4x4 = pose of the match base in the query base, information 6x6) of the link
    query -> match for a camera loop ``T_match_query`` with its covariance."""
    cov = frames.usable_covariance(covariance, default_sigma_t, default_sigma_r, min_sigma_t, min_sigma_r)
    M, cm = frames.base_loop(T_match_query, cov, base_T_camera)
    T, ct = frames.inverted(M, cm)
    info = np.linalg.inv(0.5 * (ct + ct.T))
    return T, 0.5 * (info + info.T)


class NodeStamps:
    """RTAB-Map node ids by stamp (nearest within a tolerance)."""

    def __init__(self):
        self._stamps: list[int] = []
        self._ids: list[int] = []

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, stamp_ns: int, node_id: int) -> None:
        if node_id <= 0:
            return
        j = bisect.bisect_left(self._stamps, stamp_ns)
        if j < len(self._stamps) and self._stamps[j] == stamp_ns:
            self._ids[j] = node_id
            return
        self._stamps.insert(j, stamp_ns)
        self._ids.insert(j, node_id)

    def nearest(self, stamp_ns: int, tolerance_ns: int) -> Optional[int]:
        j = bisect.bisect_left(self._stamps, stamp_ns)
        best = None
        for k in (j - 1, j):
            if 0 <= k < len(self._stamps):
                d = abs(self._stamps[k] - stamp_ns)
                if d <= tolerance_ns and (best is None or d < best[0]):
                    best = (d, self._ids[k])
        return None if best is None else best[1]


class RtabmapAdapter(Node):
    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        self.Link, self.AddLink, MapData, Info = rtabmap_msgs()
        d = self.declare_parameter
        self.loops_topic = d("loops_topic", "verifier_node/loop_closures").value
        ns = str(d("rtabmap_namespace", "rtabmap").value).rstrip("/")
        prefix = f"{ns}/" if ns else ""
        self.stamp_tolerance = float(d("stamp_tolerance", 0.05).value)
        self.pending_timeout = float(d("pending_timeout", 30.0).value)
        X = [float(v) for v in d("base_T_camera", [float(v) for v in np.eye(4).reshape(-1)]).value]
        if len(X) != 16:
            self.destroy_node()  # refused: leave nothing of it in the graph
            raise MegalocError(f"base_T_camera must have 16 values (row-major 4x4), got {len(X)}")
        self.base_T_camera = np.array(X).reshape(4, 4)
        self.sigmas = dict(default_sigma_t=float(d("default_sigma_t", 0.05).value),
                           default_sigma_r=float(d("default_sigma_r", 0.03).value),
                           min_sigma_t=float(d("min_sigma_t", 0.02).value),
                           min_sigma_r=float(d("min_sigma_r", 0.01).value))
        self.nodes = NodeStamps()
        self._pending: list[tuple[float, object]] = []
        self.counts = {"received": 0, "sent": 0, "acknowledged": 0, "failed": 0, "expired": 0,
                       "skipped_unverified": 0, "skipped_not_metric": 0}
        self._client = self.create_client(self.AddLink, prefix + "add_link")
        self._subs = [
            self.create_subscription(LoopClosureArray, self.loops_topic, self._on_loops, RELIABLE),
            self.create_subscription(MapData, prefix + "mapData", self._on_map_data, RELIABLE),
            self.create_subscription(Info, prefix + "info", self._on_info, RELIABLE),
        ]
        self._timer = self.create_timer(0.5, self._flush)
        self.get_logger().info(f"loops from {self._subs[0].topic_name} -> {self._client.srv_name}")

    # ----------------------------------------------------------------- RTAB-Map's nodes
    def _on_map_data(self, msg) -> None:
        for n in msg.nodes:
            self.nodes.add(int(round(float(n.stamp) * NS)), int(n.id))
        self._flush()

    def _on_info(self, msg) -> None:
        self.nodes.add(conv.stamp_to_ns(msg.header.stamp), int(msg.ref_id))
        self._flush()

    # ----------------------------------------------------------------- loops
    def _on_loops(self, msg: LoopClosureArray) -> None:
        now = time.monotonic()
        for lc in msg.loops:
            self.counts["received"] += 1
            if not lc.verified:
                self.counts["skipped_unverified"] += 1
                continue
            if not (lc.has_transform and lc.metric_scale):
                self.counts["skipped_not_metric"] += 1
                self.get_logger().warning(f"loop {lc.query_id} -> {lc.match_id} has no metric transform: not sent "
                                          f"(RTAB-Map needs one)", throttle_duration_sec=10.0)
                continue
            self._pending.append((now + self.pending_timeout, lc))
        self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        tol = int(self.stamp_tolerance * NS)
        now = time.monotonic()
        keep = []
        ready = self._client.service_is_ready()
        for deadline, lc in self._pending:
            a = self.nodes.nearest(conv.stamp_to_ns(lc.query_stamp), tol)
            b = self.nodes.nearest(conv.stamp_to_ns(lc.match_stamp), tol)
            if a is not None and b is not None and a != b and ready:
                self._send(lc, a, b)
            elif now > deadline:
                self.counts["expired"] += 1
                self.get_logger().warning(f"loop {lc.query_id} -> {lc.match_id} dropped: no RTAB-Map node at its "
                                          f"stamps (or no add_link service) within {self.pending_timeout} s")
            else:
                keep.append((deadline, lc))
        self._pending = keep

    def _send(self, lc, from_id: int, to_id: int) -> None:
        rp = conv.transform_to_relative_pose(lc.transform, lc.metric_scale, lc.covariance)
        Z = np.eye(4)
        Z[:3, :3], Z[:3, 3] = rp.rotation, rp.translation
        T, info = link_fields(Z, rp.covariance, self.base_T_camera, **self.sigmas)
        req = self.AddLink.Request()
        req.link = self.Link(from_id=int(from_id), to_id=int(to_id), type=USER_CLOSURE,
                             transform=conv.relative_pose_to_transform(
                                 RelativePose(rotation=T[:3, :3], translation=T[:3, 3], metric_scale=True)),
                             information=[float(v) for v in info.reshape(-1)])
        self.counts["sent"] += 1
        fut = self._client.call_async(req)
        fut.add_done_callback(lambda f, q=lc.query_id, m=lc.match_id: self._done(f, q, m, from_id, to_id))

    def _done(self, fut, q, m, a, b) -> None:
        if fut.exception() is not None:
            self.counts["failed"] += 1
            self.get_logger().error(f"add_link {a} -> {b} (loop {q} -> {m}) failed: {fut.exception()}")
        else:
            self.counts["acknowledged"] += 1
            self.get_logger().info(f"loop {q} -> {m} added to RTAB-Map as link {a} -> {b}")


def main(args=None) -> None:
    """`ros2 run megaloc_ros rtabmap_adapter`."""
    from megaloc_ros.ros.managed_node import spin_single
    spin_single(RtabmapAdapter, args)


if __name__ == "__main__":
    main()
