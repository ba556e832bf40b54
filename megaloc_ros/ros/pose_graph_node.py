"""``pose_graph_node``: a built-in back end for robots without one (``megaloc_ros.backend``).

A lifecycle node (ManagedNode) that configures and activates itself when ``autostart`` is true.

Subscribes   <odom_topic>   nav_msgs/Odometry: the odometry pose of the base (child frame)
             <loops_topic>  megaloc_ros/LoopClosureArray: the verifier's loops (verified ones
                            with a metric transform become loop factors; unit-direction ones are
                            skipped and counted, see megaloc_ros/backend/pose_graph.py)
Publishes    ~/path         nav_msgs/Path: the optimised keyframe poses in <map_frame>
             ~/markers      visualization_msgs/MarkerArray: optimised trajectory, loop edges
                            (green: trusted, red: down-weighted by the robust loss)
             ~/map_to_odom  geometry_msgs/TransformStamped: the correction, <map_frame> -> odometry frame
             /tf            tf2_msgs/TFMessage with the same transform (when ``publish_tf`` and the
                            tf2_msgs package is installed; without it only ~/map_to_odom)
             /diagnostics
Services     ~/save_map, ~/load_map: the pose graph, kept at ``<path>.graph`` (numpy .npz)

Several robots (``fleet_graph_topic`` set, an absolute topic shared by the fleet, e.g.
``/megaloc_fleet/graph``): the graph is a ``FleetPoseGraph`` (megaloc_ros/backend/fleet_graph.py)
whose map is this robot's odometry frame. The node publishes its own graph nodes (stamp, odometry
pose) as a nav_msgs/Path on that topic (header.frame_id = the robot's name, reliable,
transient-local: a robot that starts late gets them), at most every ``path_period`` while they
grow; it adds the other robots' nodes from it, and a loop between two robots (its
``query_session`` / ``match_session``: the fleet sessions, CRC-32 of the robot names, as
loop_closure_node's) merges the other robot into the map. ~/markers then draws every merged
robot's trajectory (one line strip per robot, namespace = its name); ~/path and the correction
stay this robot's.

All the work is ``PoseGraph``'s (``FleetPoseGraph``'s); this node moves messages and parameters
(``graph.*`` are ``PoseGraphParams``).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from geometry_msgs.msg import Point, PoseStamped, TransformStamped
from nav_msgs.msg import Odometry, Path as PathMsg
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from scipy.spatial.transform import Rotation
from std_msgs.msg import ColorRGBA
from visualization_msgs.msg import Marker, MarkerArray

from megaloc_ros.msg import LoopClosureArray

from megaloc_ros import fleet
from megaloc_ros.backend.fleet_graph import FleetPoseGraph
from megaloc_ros.backend.pose_graph import PoseGraph, PoseGraphParams
from megaloc_ros.errors import MegalocError
from megaloc_ros.ros import conversions as conv
from megaloc_ros.ros import params as P
from megaloc_ros.ros.managed_node import RELIABLE, ManagedNode, spin_single
from megaloc_ros.settings import setting
from megaloc_ros.types import RelativePose

NODE_NAME = "pose_graph_node"
SUFFIX = ".graph"
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
ODOM_QOS = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)   # seconds of odometry at 200 Hz
# every robot's latest chain (one transient-local message per publisher): up to 100 robots
FLEET_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


@dataclass
class PoseGraphNodeSettings(P.CommonNodeSettings):
    """pose_graph_node's own settings (the graph's are ``graph.*``)."""
    odom_topic: str = setting("odom", "nav_msgs/Odometry of the robot base", read_only=True)
    loops_topic: str = setting("verifier_node/loop_closures", "megaloc_ros/LoopClosureArray with the "
                               "verified loops", read_only=True)
    map_frame: str = setting("map", "frame of the optimised poses and parent of the published correction")
    odom_frame: str = setting("", "odometry frame (child of the correction); empty: the Odometry "
                              "messages' header.frame_id")
    publish_tf: bool = setting(True, "publish map_frame -> odom_frame on /tf (needs tf2_msgs)")
    tf_period: float = setting(0.05, "seconds between /tf and ~/map_to_odom messages", range=(0.001, 60.0),
                               read_only=True)
    path_period: float = setting(0.5, "seconds between ~/path and ~/markers messages while only odometry "
                                 "comes in (a graph changed by a loop is published at once)", range=(0.0, 60.0))
    fleet_graph_topic: str = setting("", "several robots: absolute topic shared by the fleet (e.g. "
                                     "/megaloc_fleet/graph) on which every robot's graph nodes go; set, the graph "
                                     "merges the other robots at their first loop with this one; empty: one robot",
                                     read_only=True)
    fleet_robot: str = setting("", "this robot's name on the fleet graph topic and in loops' sessions; empty: "
                               "the node's namespace (as loop_closure_node's fleet_robot)", read_only=True)


def pose_graph_node_specs() -> list:
    return P.dataclass_specs(PoseGraphNodeSettings, "") + P.dataclass_specs(PoseGraphParams, "graph")


def graph_state_path(map_path: str) -> str:
    return map_path + SUFFIX


def _tf_message_class():
    """tf2_msgs/TFMessage, or None when the package is not installed."""
    try:
        from tf2_msgs.msg import TFMessage
        return TFMessage
    except ImportError:
        return None


class PoseGraphNode(ManagedNode):
    """See the module docstring."""

    STATE_NAME = "pose graph"
    DIAG_ERRORS = ("odometry_errors", "loop_errors")
    DIAG_WARNING = ("loops_refused", "loops refused (stamps outside the odometry)")

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, pose_graph_node_specs(), "graph", PoseGraphParams, **kwargs)
        self.graph = None   # PoseGraph, or FleetPoseGraph with fleet_graph_topic
        self.robot = ""     # fleet name, with fleet_graph_topic set
        self._pub_fleet = None
        self._fleet_sent = 0.0
        self._fleet_nodes_sent = 0
        self._lock = threading.RLock()
        self._odom_frame = ""
        self._base_frame = ""
        self._tf_cls = _tf_message_class()
        self._pub_tf = None
        self._tf_timer = None
        self._last_path = 0.0
        self._autostart()

    # ----------------------------------------------------------------- lifecycle
    def _apply_params(self) -> None:
        if self.graph is not None:
            with self._lock:
                self.graph.params = self._build_params()   # new factors use them; existing ones stay

    def _configure(self) -> None:
        path = self._param("map_path")
        state = graph_state_path(path) if path else ""
        topic = self._param("fleet_graph_topic")
        if topic and not topic.startswith("/"):
            raise MegalocError(f"fleet_graph_topic must be absolute (shared by every robot), got {topic!r}")
        if topic:
            self.robot = fleet.robot_name(self.get_namespace(), self._param("fleet_robot"))
        with self._lock:
            if state and Path(state).exists():
                self.graph = (FleetPoseGraph.load(state, self._build_params()) if topic
                              else PoseGraph.load(state, self._build_params()))
                self.get_logger().info(f"loaded pose graph {state}: {self.graph.stats['nodes']} nodes")
            else:
                self.graph = FleetPoseGraph(self._build_params(), self.robot) if topic else \
                    PoseGraph(self._build_params())
        self._pub_path = self.create_lifecycle_publisher(PathMsg, "~/path", LATCHED)
        self._pub_markers = self.create_lifecycle_publisher(MarkerArray, "~/markers", LATCHED)
        self._pub_correction = self.create_lifecycle_publisher(TransformStamped, "~/map_to_odom", 10)
        self._own_pubs = [self._pub_path, self._pub_markers, self._pub_correction]
        if topic:
            self._pub_fleet = self.create_lifecycle_publisher(PathMsg, topic, LATCHED)
            self._own_pubs.append(self._pub_fleet)
            self._fleet_nodes_sent = 0
        if self._param("publish_tf"):
            if self._tf_cls is None:
                self.get_logger().warning("tf2_msgs is not installed: map -> odom goes to ~/map_to_odom only")
            else:
                self._pub_tf = self.create_lifecycle_publisher(self._tf_cls, "/tf", 100)
                self._own_pubs.append(self._pub_tf)

    def _activate(self) -> None:
        group = MutuallyExclusiveCallbackGroup()   # odometry and loops reach the graph in arrival order
        self._own_subs = [
            self.create_subscription(Odometry, self._param("odom_topic"), self._on_odometry, ODOM_QOS,
                                     callback_group=group),
            self.create_subscription(LoopClosureArray, self._param("loops_topic"), self._on_loops, RELIABLE,
                                     callback_group=group),
        ]
        if self._pub_fleet is not None:
            self._own_subs.append(self.create_subscription(PathMsg, self._param("fleet_graph_topic"),
                                                           self._on_fleet_graph, FLEET_QOS, callback_group=group))
        if not any(t is self._tf_timer for t in self._own_timers):   # released with the others on cleanup
            self._tf_timer = self.create_timer(self._param("tf_period"), self._on_timer,
                                               callback_group=MutuallyExclusiveCallbackGroup())
            self._own_timers.append(self._tf_timer)
        self.get_logger().info(f"pose graph on {self._own_subs[0].topic_name} with loops from "
                               f"{self._own_subs[1].topic_name}")

    def _keyframe_count(self) -> Optional[int]:
        return self.graph.stats["nodes"] if self.graph is not None else None

    def _tick(self) -> None:
        if self.graph is not None:
            with self._lock:
                for k, v in self.graph.stats.items():
                    self.stats.set(f"graph_{k}", float(v))
        self._publish_diagnostics("pose_graph")

    # ----------------------------------------------------------------- input
    def _on_odometry(self, msg: Odometry) -> None:
        self.stats.inc("odometry_received")
        try:
            T = conv.odometry_to_matrix(msg)
            stamp = conv.stamp_to_ns(msg.header.stamp)
            with self._lock:
                self._odom_frame = self._param("odom_frame") or msg.header.frame_id or "odom"
                self._base_frame = msg.child_frame_id
                if self.robot:
                    if self.graph.add_odometry(self.robot, stamp, T) is None:
                        return
                    if self.graph.needs_update:   # a waiting loop reached its node
                        self.graph.update()
                else:
                    if self.graph.add_odometry(stamp, T) is None:
                        return
                    self.graph.update()
                self._dirty = True
        except Exception as exc:
            self.stats.error("odometry_errors", str(exc))
            self.get_logger().error(f"odometry not used: {exc}", throttle_duration_sec=2.0)
            return
        if time.monotonic() - self._last_path >= self._param("path_period"):
            self._publish_graph()
        else:
            self._share_nodes()

    def _on_loops(self, msg: LoopClosureArray) -> None:
        changed = False
        for lc in msg.loops:
            self.stats.inc("loops_received")
            if not lc.verified:
                self.stats.inc("loops_unverified")
                continue
            if not lc.has_transform:
                self.stats.inc("loops_without_transform")
                continue
            try:
                rp = conv.transform_to_relative_pose(lc.transform, lc.metric_scale, lc.covariance)
                T = np.eye(4)
                T[:3, :3], T[:3, 3] = rp.rotation, rp.translation
                with self._lock:
                    if self.robot:
                        qr, mr = self.graph.robot_of_session(lc.query_session), \
                            self.graph.robot_of_session(lc.match_session)
                        if qr is None or mr is None:
                            self.stats.inc("loops_unknown_robot")
                            self.get_logger().warning(
                                f"loop {lc.query_id} -> {lc.match_id}: sessions {lc.query_session} / "
                                f"{lc.match_session} name no robot on the fleet graph topic yet; not used",
                                throttle_duration_sec=2.0)
                            continue
                        r = self.graph.add_loop(qr, conv.stamp_to_ns(lc.query_stamp), mr,
                                                conv.stamp_to_ns(lc.match_stamp), T, rp.covariance,
                                                metric_scale=rp.metric_scale)
                    else:
                        r = self.graph.add_loop(conv.stamp_to_ns(lc.query_stamp), conv.stamp_to_ns(lc.match_stamp),
                                                T, rp.covariance, metric_scale=rp.metric_scale)
            except Exception as exc:
                self.stats.error("loop_errors", str(exc))
                self.get_logger().error(f"loop {lc.query_id} -> {lc.match_id} not used: {exc}",
                                        throttle_duration_sec=2.0)
                continue
            self.stats.inc(f"loops_{r.status}")
            if r.status == "added":
                changed = True
                self.get_logger().info(f"loop {lc.query_id} -> {lc.match_id}: graph nodes {r.query_node} -> "
                                       f"{r.match_node}")
            elif r.status != "pending":
                self.get_logger().info(f"loop {lc.query_id} -> {lc.match_id} {r.status}: {r.reason}",
                                       throttle_duration_sec=2.0)
        if changed:
            with self._lock:
                self.graph.update()
                self._dirty = True
            self._publish_graph()

    def _on_fleet_graph(self, msg: PathMsg) -> None:
        """Another robot's graph nodes (its odometry chain): the new ones join the fleet graph."""
        peer = msg.header.frame_id
        if not peer or peer == self.robot:
            return
        try:
            stamps = [conv.stamp_to_ns(ps.header.stamp) for ps in msg.poses]
            poses = [conv.pose_to_matrix(ps.pose) for ps in msg.poses]
            with self._lock:
                added = self.graph.add_nodes(peer, stamps, poses)
                if added:
                    self.stats.inc("fleet_nodes_received", added)
                    self._dirty = True
                if self.graph.needs_update:   # waiting loops reached the new nodes
                    self.graph.update()
        except Exception as exc:
            self.stats.error("fleet_errors", str(exc))
            self.get_logger().error(f"graph nodes of {peer!r} not used: {exc}", throttle_duration_sec=2.0)
            return
        if added:
            self._publish_graph()

    def _share_nodes(self, force: bool = False) -> None:
        """Our odometry chain on the fleet graph topic, when it grew (at most every path_period)."""
        if self._pub_fleet is None or not self._own_subs:
            return
        with self._lock:
            r = self.graph.robots.get(self.robot)
            if r is None or len(r.stamps) == self._fleet_nodes_sent:
                return
            if not force and time.monotonic() - self._fleet_sent < self._param("path_period"):
                return
            stamps, odom = list(r.stamps), list(r.odom)
        msg = _path_message(self.robot, stamps, np.array(odom))
        self._pub_fleet.publish(msg)
        self._fleet_sent, self._fleet_nodes_sent = time.monotonic(), len(stamps)
        self.stats.inc("fleet_graph_messages")

    # ----------------------------------------------------------------- output
    def _publish_graph(self) -> None:
        if self.robot:
            self._publish_fleet_graph()
            return
        self._last_path = time.monotonic()
        with self._lock:
            poses = self.graph.poses()
            stamps = list(self.graph.stamps)
            loops = [(a, b) for kind, a, b, _, _ in self.graph.factors if kind == "loop"]
            weights = self.graph.loop_weights()
        path = _path_message(self._param("map_frame"), stamps, poses)
        self._pub_path.publish(path)
        traj = Marker(ns="trajectory", id=0, type=Marker.LINE_STRIP, action=Marker.ADD)
        traj.header = path.header
        traj.scale.x = 0.02
        traj.color = ColorRGBA(r=0.2, g=0.4, b=1.0, a=1.0)
        traj.pose.orientation.w = 1.0
        traj.points = [Point(x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])) for T in poses]
        edges = Marker(ns="loops", id=0, type=Marker.LINE_LIST, action=Marker.ADD)
        edges.header = path.header
        edges.scale.x = 0.01
        edges.pose.orientation.w = 1.0
        for (a, b), w in zip(loops, weights):
            c = ColorRGBA(r=0.1, g=0.9, b=0.1, a=1.0) if w > 0.5 else ColorRGBA(r=1.0, g=0.1, b=0.1, a=1.0)
            for k in (a, b):
                edges.points.append(Point(x=float(poses[k][0, 3]), y=float(poses[k][1, 3]), z=float(poses[k][2, 3])))
                edges.colors.append(c)
        self._pub_markers.publish(MarkerArray(markers=[traj, edges]))
        self._publish_correction()

    def _publish_fleet_graph(self) -> None:
        """~/path (this robot's nodes in the map), ~/markers (every merged robot's trajectory and
        the loops between merged nodes), our nodes on the fleet topic, the correction."""
        self._last_path = time.monotonic()
        frame = self._param("map_frame")
        with self._lock:
            g = self.graph
            trajectories = {n: (list(g.robots[n].stamps), g.poses(n)) for n in g.robot_names() if g.merged(n)}
            edges = [(rm, nm, rq, nq) for rm, nm, rq, nq, _, _ in g.loops if g.merged(rm) and g.merged(rq)]
        stamps, poses = trajectories.get(self.robot, ([], np.zeros((0, 4, 4))))
        path = _path_message(frame, stamps, poses)
        self._pub_path.publish(path)
        markers = []
        for k, (name, (_, robot_poses)) in enumerate(sorted(trajectories.items())):
            m = Marker(ns=name, id=0, type=Marker.LINE_STRIP, action=Marker.ADD)
            m.header = path.header
            m.scale.x = 0.02
            m.color = ColorRGBA(r=0.2 + 0.6 * (k % 2), g=0.4, b=1.0 - 0.6 * (k % 2), a=1.0)
            m.pose.orientation.w = 1.0
            m.points = [Point(x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])) for T in robot_poses]
            markers.append(m)
        lines = Marker(ns="loops", id=0, type=Marker.LINE_LIST, action=Marker.ADD)
        lines.header = path.header
        lines.scale.x = 0.01
        lines.pose.orientation.w = 1.0
        lines.color = ColorRGBA(r=0.1, g=0.9, b=0.1, a=1.0)
        for rm, nm, rq, nq in edges:
            for name, i in ((rm, nm), (rq, nq)):
                T = trajectories[name][1][i]
                lines.points.append(Point(x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])))
        self._pub_markers.publish(MarkerArray(markers=markers + [lines]))
        self._share_nodes(force=True)
        self._publish_correction()

    def _on_timer(self) -> None:
        self._share_nodes()   # nodes that arrived within path_period of the last share
        self._publish_correction()

    def _publish_correction(self) -> None:
        if not self._own_subs:   # not active
            return
        with self._lock:
            if self.graph is None or not self.graph.stats["nodes"]:
                return
            M = self.graph.map_to_odom(self.robot) if self.robot else self.graph.map_to_odom()
            if M is None:
                return
            child = self._odom_frame or "odom"
        t = TransformStamped()
        t.header.stamp = self.get_clock().now().to_msg()
        t.header.frame_id = self._param("map_frame")
        t.child_frame_id = child
        t.transform = conv.relative_pose_to_transform(_as_relative_pose(M))
        self._pub_correction.publish(t)
        if self._pub_tf is not None:
            self._pub_tf.publish(self._tf_cls(transforms=[t]))

    # ----------------------------------------------------------------- files
    def save_map(self, path: str = "") -> str:
        out = graph_state_path(self._map_path(path))
        return self._write_state(out, self._lock, self.graph.save)

    def load_map(self, path: str = "") -> str:
        src = graph_state_path(self._map_path(path))
        g = (FleetPoseGraph.load(src, self._build_params()) if self.robot
             else PoseGraph.load(src, self._build_params()))
        with self._lock:
            self.graph = g
            self._dirty = False
        self._publish_graph()
        return src


def _path_message(frame: str, stamps, poses: np.ndarray) -> PathMsg:
    """nav_msgs/Path of ``poses`` [N, 4, 4] at ``stamps`` (ns), header.frame_id ``frame``."""
    path = PathMsg(header=conv.make_header(stamps[-1] if len(stamps) else 0, frame))
    quats = Rotation.from_matrix(poses[:, :3, :3]).as_quat() if len(poses) else np.zeros((0, 4))
    for s, T, q in zip(stamps, poses, quats):
        ps = PoseStamped(header=conv.make_header(s, frame))
        ps.pose.position.x, ps.pose.position.y, ps.pose.position.z = (float(v) for v in T[:3, 3])
        ps.pose.orientation.x, ps.pose.orientation.y, ps.pose.orientation.z, ps.pose.orientation.w = \
            (float(v) for v in q)
        path.poses.append(ps)
    return path


def _as_relative_pose(M: np.ndarray) -> RelativePose:
    return RelativePose(rotation=M[:3, :3], translation=M[:3, 3], metric_scale=True)


def main(args=None) -> None:
    """`ros2 run megaloc_ros pose_graph_node`."""
    spin_single(PoseGraphNode, args)


if __name__ == "__main__":
    main()
