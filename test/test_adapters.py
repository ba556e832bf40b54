"""The back-end glue over real rclpy + Fast DDS: pose_graph_node, and the LIO-SAM and RTAB-Map
adapters talking to stand-ins of LIO-SAM's subscriber and RTAB-Map's add_link service.

rtabmap_msgs and tf2_msgs are not in the PyPI ROS 2 wheels: test/interfaces/ holds the subsets
of their public interfaces the nodes use, built here with colcon (cached) and loaded in-process.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

rclpy = pytest.importorskip("rclpy")
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402

from megaloc_ros.msg import LoopClosure, LoopClosureArray  # noqa: E402
from megaloc_ros.ros import conversions as conv  # noqa: E402
from megaloc_ros.types import RelativePose  # noqa: E402

pytestmark = pytest.mark.ros

NS = conv.NS
RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
BASE = 1_700_000_000 * NS
# camera optical frame on a base: x forward / y left / z up -> z forward / x right / y down, 10 cm ahead, 20 cm up
BASE_T_CAM = np.array([[0, 0, 1, 0.1], [-1, 0, 0, 0.0], [0, -1, 0, 0.2], [0, 0, 0, 1]], np.float64)


@pytest.fixture(scope="module")
def interfaces():
    import ros_test_interfaces as T
    if T.missing():
        T.activate(T.build())


class Ros:
    """One context in a domain of its own, spun by a multi-threaded executor in a thread."""

    _next = 0

    def __init__(self):
        Ros._next += 1
        self.ctx = rclpy.Context()
        rclpy.init(args=[], context=self.ctx, domain_id=140 + (os.getpid() + Ros._next) % 60)
        self.ex = MultiThreadedExecutor(num_threads=4, context=self.ctx)
        self.nodes = []
        self._t = threading.Thread(target=self._spin, daemon=True)
        self._t.start()

    def _spin(self):
        try:
            self.ex.spin()
        except Exception:
            pass

    def add(self, node):
        self.nodes.append(node)
        self.ex.add_node(node)
        return node

    def node(self, name):
        return self.add(Node(name, context=self.ctx))

    def close(self):
        for n in self.nodes:
            if hasattr(n, "close"):
                n.close()
        self.ex.shutdown(timeout_sec=2.0)
        for n in self.nodes:
            n.destroy_node()
        rclpy.try_shutdown(context=self.ctx)


@pytest.fixture
def ros():
    r = Ros()
    yield r
    r.close()


def wait_for(cond, timeout=20.0, period=0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(period)
    return cond()


def wait_matched(pub, n=1, timeout=10.0):
    assert wait_for(lambda: pub.get_subscription_count() >= n, timeout), f"no subscriber on {pub.topic_name}"


def pose(rotvec_deg, t) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(np.radians(rotvec_deg)).as_matrix()
    T[:3, 3] = t
    return T


def loop_msg(q_ns, m_ns, Z=None, cov=None, verified=True, metric=True, qid=0, mid=0) -> LoopClosure:
    lc = LoopClosure(query_id=qid, match_id=mid, verified=verified)
    lc.query_stamp, lc.match_stamp = conv.ns_to_stamp(q_ns), conv.ns_to_stamp(m_ns)
    if Z is not None:
        lc.has_transform = True
        lc.transform = conv.relative_pose_to_transform(RelativePose(Z[:3, :3], Z[:3, 3], metric))
        lc.metric_scale = metric
        lc.covariance = np.asarray(cov if cov is not None else np.zeros((6, 6)), np.float64).reshape(36)
    return lc


def _tf(t) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = Rotation.from_quat([t.rotation.x, t.rotation.y, t.rotation.z, t.rotation.w]).as_matrix()
    T[:3, 3] = (t.translation.x, t.translation.y, t.translation.z)
    return T


# ------------------------------------------------------------------------------------- LIO-SAM
def test_lio_sam_adapter_forwards_exact_stamps(ros):
    from std_msgs.msg import Float64MultiArray

    from megaloc_ros.ros.adapters.lio_sam import LioSamAdapter
    ros.add(LioSamAdapter(context=ros.ctx))
    helper = ros.node("fake_lio_sam")
    got = []
    helper.create_subscription(Float64MultiArray, "lio_loop/loop_closure_detection", lambda m: got.append(list(m.data)),
                               RELIABLE)
    pub = helper.create_publisher(LoopClosureArray, "verifier_node/loop_closures", RELIABLE)
    wait_matched(pub)
    stamps = [(BASE + 95 * NS + 123_456_789, BASE + 3 * NS + 987_654_321),
              (BASE + 96 * NS + 1, BASE + 4 * NS),
              (BASE + 97 * NS + 999_999_999, BASE + 5 * NS + 500_000_000)]
    loops = [loop_msg(stamps[0][0], stamps[0][1], pose([0, 5, 0], [0.1, 0, 0]), np.eye(6) * 1e-4),
             loop_msg(stamps[1][0], stamps[1][1]),                                # no transform: still useful
             loop_msg(BASE + 50 * NS, BASE + 2 * NS, verified=False),                        # not verified: dropped
             loop_msg(stamps[2][0], stamps[2][1], pose([0, 5, 0], [1, 0, 0]), metric=False)]  # unit direction: kept
    pub.publish(LoopClosureArray(loops=loops[:2]))
    pub.publish(LoopClosureArray(loops=loops[2:]))
    assert wait_for(lambda: len(got) == 3)
    time.sleep(0.3)
    assert len(got) == 3
    for (q, m), data in zip(stamps, got):
        assert data == [(q // NS) + (q % NS) * 1e-9, (m // NS) + (m % NS) * 1e-9]
        assert abs(round(data[0] * NS) - q) < 500 and abs(round(data[1] * NS) - m) < 500   # double: ~240 ns at 1.7e9 s


# ------------------------------------------------------------------------------------- RTAB-Map
def _expected_link(Z, cov, X, min_t=0.02, min_r=0.01):
    """The link (pose of the match base in the query base) and its information, computed
    independently of the adapter: the covariance propagated by a numerical Jacobian of
    d -> Log(T^-1 f(Z Exp(d))), f(Z) = (X Z X^-1)^-1, all in (x y z rx ry rz)."""
    def exp(d):
        E = np.eye(4)
        E[:3, :3] = Rotation.from_rotvec(d[3:]).as_matrix()
        E[:3, 3] = d[:3]   # first order is all a Jacobian needs
        return E

    def f(Zp):
        return np.linalg.inv(X @ Zp @ np.linalg.inv(X))

    def log(D):
        return np.concatenate([D[:3, 3], Rotation.from_matrix(D[:3, :3]).as_rotvec()])

    T = f(Z)
    J = np.zeros((6, 6))
    eps = 1e-7
    for k in range(6):
        d = np.zeros(6)
        d[k] = eps
        J[:, k] = (log(np.linalg.inv(T) @ f(Z @ exp(d))) - log(np.linalg.inv(T) @ f(Z @ exp(-d)))) / (2 * eps)
    C = cov + np.diag([min_t ** 2] * 3 + [min_r ** 2] * 3)
    return T, np.linalg.inv(J @ C @ J.T)


def test_rtabmap_adapter_add_link_fields(ros, interfaces):
    from rtabmap_msgs.msg import Info, MapData, Node as RtabNode
    from rtabmap_msgs.srv import AddLink

    from megaloc_ros.ros.adapters.rtabmap import USER_CLOSURE, RtabmapAdapter
    adapter = ros.add(RtabmapAdapter(context=ros.ctx, parameter_overrides=[
        Parameter("base_T_camera", value=[float(v) for v in BASE_T_CAM.reshape(-1)]),
        Parameter("pending_timeout", value=2.0), Parameter("stamp_tolerance", value=0.05)]))
    fake = ros.node("rtabmap")    # the stand-in: serves rtabmap/add_link, publishes rtabmap/mapData and info
    links = []

    def add_link(req, res):
        links.append(req.link)
        return res

    fake.create_service(AddLink, "rtabmap/add_link", add_link)
    pub_map = fake.create_publisher(MapData, "rtabmap/mapData", RELIABLE)
    pub_info = fake.create_publisher(Info, "rtabmap/info", RELIABLE)
    helper = ros.node("verifier_stand_in")
    pub_loops = helper.create_publisher(LoopClosureArray, "verifier_node/loop_closures", RELIABLE)
    for p in (pub_map, pub_info, pub_loops):
        wait_matched(p)

    ZA, covA = pose([4, -20, 3], [0.30, -0.05, 0.12]), np.diag([4e-4, 1e-4, 9e-4, 1e-5, 4e-5, 2.5e-5])
    ZB = pose([-2, 35, 1], [-0.2, 0.02, 0.4])
    loops = [
        loop_msg(BASE + 100 * NS, BASE + 10 * NS, ZA, covA, qid=90, mid=9),            # A: nodes 42 and 7
        loop_msg(BASE + 101 * NS, BASE + 11 * NS, ZB, None, qid=91, mid=10),  # B: no covariance; node 8 from info
        loop_msg(BASE + 102 * NS, BASE + 12 * NS, ZA, covA, verified=False),          # not verified
        loop_msg(BASE + 103 * NS, BASE + 13 * NS, ZA, covA, metric=False),            # unit direction
        loop_msg(BASE + 104 * NS, BASE + 55 * NS, ZA, covA, qid=94, mid=50),           # no node near 55 s: expires
    ]
    pub_loops.publish(LoopClosureArray(loops=loops))
    assert wait_for(lambda: adapter.counts["received"] == 5)
    time.sleep(0.5)
    assert links == []   # RTAB-Map has announced no node yet: the loops wait

    md = MapData()
    md.nodes = [RtabNode(id=7, stamp=(BASE + 10 * NS + 20_000_000) / NS),   # 20 ms off: within tolerance
                RtabNode(id=42, stamp=(BASE + 100 * NS) / NS),
                RtabNode(id=43, stamp=(BASE + 101 * NS) / NS),
                RtabNode(id=44, stamp=(BASE + 104 * NS) / NS),
                RtabNode(id=60, stamp=(BASE + 55 * NS + 200_000_000) / NS)]  # 200 ms off: not the match of E
    pub_map.publish(md)
    info = Info(ref_id=8)
    info.header.stamp = conv.ns_to_stamp(BASE + 11 * NS)
    pub_info.publish(info)

    assert wait_for(lambda: len(links) == 2 and adapter.counts["expired"] == 1, timeout=15.0)
    time.sleep(0.3)
    assert len(links) == 2
    assert adapter.counts["skipped_unverified"] == 1 and adapter.counts["skipped_not_metric"] == 1
    assert wait_for(lambda: adapter.counts["acknowledged"] == 2)
    by_from = {lk.from_id: lk for lk in links}
    for from_id, to_id, Z, cov in [(42, 7, ZA, covA),
                                   (43, 8, ZB, np.diag([0.05 ** 2] * 3 + [0.03 ** 2] * 3))]:
        lk = by_from[from_id]
        assert (lk.from_id, lk.to_id, lk.type) == (from_id, to_id, USER_CLOSURE)
        T, info_expected = _expected_link(Z, cov, BASE_T_CAM)
        assert np.allclose(_tf(lk.transform), T, atol=1e-9)
        info = np.array(lk.information).reshape(6, 6)
        assert np.allclose(info, info_expected, rtol=1e-5, atol=1e-6 * np.abs(info_expected).max())
        assert np.allclose(info, info.T) and np.all(np.linalg.eigvalsh(info) > 0)
    # the query base sees the match base where the camera geometry says
    qb = pose([0, 0, 30], [1.0, 2.0, 0.0])
    mb = qb @ BASE_T_CAM @ np.linalg.inv(ZA) @ np.linalg.inv(BASE_T_CAM)
    assert np.allclose(np.linalg.inv(qb) @ mb, _tf(by_from[42].transform), atol=1e-9)


def test_rtabmap_adapter_needs_rtabmap_msgs_only_when_started():
    """The module imports without rtabmap_msgs; the node says what is missing."""
    import megaloc_ros.ros.adapters.rtabmap as R
    T, info = R.link_fields(np.eye(4), None)
    assert np.allclose(T, np.eye(4)) and np.allclose(np.diag(info)[:3], 1 / 0.05 ** 2)


# ------------------------------------------------------------------------------------- pose graph node
def _circle(t: float) -> np.ndarray:
    a = 2 * np.pi * t / 40.0
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler("z", a + np.pi / 2).as_matrix()
    T[:3, 3] = (2 * np.cos(a), 2 * np.sin(a), 0.0)
    return T


def _drifted(times):
    out = [_circle(times[0])]
    for t0, t1 in zip(times[:-1], times[1:]):
        inc = np.linalg.inv(_circle(t0)) @ _circle(t1)
        inc[:3, 3] *= 1.03
        e = np.eye(4)
        e[:3, :3] = Rotation.from_euler("z", 0.01 * (t1 - t0)).as_matrix()
        out.append(out[-1] @ inc @ e)
    return np.array(out)


def _cam_loop(tq, tm):
    return np.linalg.inv(_circle(tm) @ BASE_T_CAM) @ (_circle(tq) @ BASE_T_CAM)


def test_pose_graph_node_closes_the_loop_and_publishes(ros, interfaces, tmp_path):
    from geometry_msgs.msg import TransformStamped
    from nav_msgs.msg import Odometry, Path
    from tf2_msgs.msg import TFMessage
    from visualization_msgs.msg import MarkerArray

    from megaloc_ros.ros.pose_graph_node import PoseGraphNode
    from megaloc_ros.srv import SaveMap
    params = [Parameter("graph.base_T_camera", value=[float(v) for v in BASE_T_CAM.reshape(-1)]),
              Parameter("graph.keyframe_distance", value=0.25), Parameter("map_path", value=str(tmp_path / "run")),
              Parameter("tf_period", value=0.1)]
    node = ros.add(PoseGraphNode(context=ros.ctx, parameter_overrides=params))
    assert node._tf_cls is not None   # tf2_msgs from test/interfaces
    h = ros.node("robot")
    paths, tfs, corrections, markers = [], [], [], []
    h.create_subscription(Path, "pose_graph_node/path", paths.append, LATCHED)
    h.create_subscription(TFMessage, "/tf", tfs.append, 100)
    h.create_subscription(TransformStamped, "pose_graph_node/map_to_odom", corrections.append, 10)
    h.create_subscription(MarkerArray, "pose_graph_node/markers", markers.append, LATCHED)
    pub_odom = h.create_publisher(Odometry, "odom", QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE))
    pub_loops = h.create_publisher(LoopClosureArray, "verifier_node/loop_closures", RELIABLE)
    wait_matched(pub_odom)
    wait_matched(pub_loops)

    times = np.arange(0.0, 44.0, 0.1)
    odom = _drifted(times)
    for t, T in zip(times, odom):
        m = Odometry(child_frame_id="base_link")
        m.header = conv.make_header(BASE + int(round(t * NS)), "odom")
        m.pose.pose = conv.matrix_to_pose(T)
        pub_odom.publish(m)   # a burst: the queues on both sides hold 1000
    assert wait_for(lambda: node.stats.count("odometry_received") == len(times))
    n_nodes = len(node.graph)
    cov = np.diag([1e-4] * 3 + [1e-5] * 3)
    loops = [loop_msg(BASE + int(tq * NS), BASE + int(tm * NS), _cam_loop(tq, tm), cov, qid=i + 100, mid=i)
             for i, (tq, tm) in enumerate([(40.5, 0.4), (41.5, 1.5), (42.5, 2.5)])]
    loops.append(loop_msg(BASE + 43 * NS, BASE + 3 * NS, _cam_loop(43, 3), cov, metric=False))   # skipped
    loops.append(loop_msg(BASE + 30 * NS, BASE + 10 * NS, _cam_loop(41.5, 1.5), cov, qid=7, mid=8))  # wrong
    pub_loops.publish(LoopClosureArray(loops=loops))
    assert wait_for(lambda: node.graph.stats["loops"] == 4 and node.graph.stats["skipped_unit"] == 1)
    assert wait_for(lambda: paths and len(paths[-1].poses) == n_nodes and markers
                    and len(markers[-1].markers[1].points) == 8)

    P = np.array([conv.pose_to_matrix(p.pose) for p in paths[-1].poses])
    stamps = [conv.stamp_to_ns(p.header.stamp) for p in paths[-1].poses]
    truth = np.array([_circle((s - BASE) / NS) for s in stamps])
    odo = np.array(node.graph.odom)
    err_odom = np.linalg.norm(odo[:, :3, 3] - truth[:, :3, 3], axis=1).max()
    err_opt = np.linalg.norm(P[:, :3, 3] - truth[:, :3, 3], axis=1).max()
    assert err_odom > 0.5 and err_opt < 0.25 * err_odom
    assert paths[-1].header.frame_id == "map"
    # map -> odom on /tf and ~/map_to_odom: the optimised last pose is the correction times its odometry
    assert wait_for(lambda: tfs and corrections)
    t_last = tfs[-1].transforms[0]
    assert (t_last.header.frame_id, t_last.child_frame_id) == ("map", "odom")
    assert wait_for(lambda: np.allclose(_tf(tfs[-1].transforms[0].transform) @ odo[-1], P[-1], atol=1e-6))
    assert np.allclose(_tf(corrections[-1].transform) @ odo[-1], P[-1], atol=1e-6)
    # loop markers: 3 green (trusted), 1 red (the wrong loop)
    colours = markers[-1].markers[1].colors[::2]
    assert sum(c.g > 0.5 for c in colours) == 3 and sum(c.r > 0.5 for c in colours) == 1

    # save through the service, reload in a fresh node: the same optimised path
    cli = h.create_client(SaveMap, "pose_graph_node/save_map")
    assert cli.wait_for_service(timeout_sec=10)
    fut = cli.call_async(SaveMap.Request(path=""))
    assert wait_for(fut.done) and fut.result().success, fut.result().message
    assert (tmp_path / "run.graph").exists()
    node2 = ros.add(PoseGraphNode("pose_graph_node_2", context=ros.ctx, parameter_overrides=params))
    assert len(node2.graph) == n_nodes and node2.graph.stats["loops"] == 4
    assert np.allclose(node2.graph.poses(), node.graph.poses(), atol=1e-5)


def test_pose_graph_nodes_of_two_robots_merge_at_their_first_loop(ros, tmp_path):
    """Two robots' pose_graph_nodes with one fleet_graph_topic: each shares its graph nodes and
    adds the other's; robot_b's node, which gets the inter-robot loop (sessions naming the two
    robots), puts robot_a's odometry frame where it truly is in robot_b's map and draws both
    trajectories; robot_a's, which got no loop, keeps robot_b apart. Saved and loaded, the fleet
    graph is the same."""
    from nav_msgs.msg import Odometry
    from visualization_msgs.msg import MarkerArray

    from megaloc_ros.verification.metric_pose import pose_error
    from megaloc_ros.fleet import robot_session
    from megaloc_ros.ros.pose_graph_node import PoseGraphNode
    params = [Parameter("graph.base_T_camera", value=[float(v) for v in BASE_T_CAM.reshape(-1)]),
              Parameter("graph.keyframe_distance", value=0.25), Parameter("publish_tf", value=False),
              Parameter("fleet_graph_topic", value="/megaloc_fleet/graph"), Parameter("path_period", value=0.1)]
    nodes = {r: ros.add(PoseGraphNode(context=ros.ctx, namespace=f"/{r}", parameter_overrides=params +
                                      [Parameter("map_path", value=str(tmp_path / r))]))
             for r in ("robot_a", "robot_b")}
    h = ros.node("robots")
    markers = []
    h.create_subscription(MarkerArray, "/robot_b/pose_graph_node/markers", markers.append, LATCHED)
    qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
    pubs = {r: h.create_publisher(Odometry, f"/{r}/odom", qos) for r in nodes}
    loops_b = h.create_publisher(LoopClosureArray, "/robot_b/verifier_node/loop_closures", RELIABLE)
    for p in (*pubs.values(), loops_b):
        wait_matched(p)
    # robot_a drives the first half lap (its odometry frame is the world), robot_b the second half
    # from its own origin: its odometry frame sits at the circle's pose at 20 s
    origin_b = _circle(20.0)
    ta, tb = np.arange(0.0, 20.0, 0.1), np.arange(20.0, 40.0, 0.1)
    for r, times, to_odom in (("robot_a", ta, np.eye(4)), ("robot_b", tb, np.linalg.inv(origin_b))):
        for t in times:
            m = Odometry(child_frame_id="base_link")
            m.header = conv.make_header(BASE + int(round(t * NS)), "odom")
            m.pose.pose = conv.matrix_to_pose(to_odom @ _circle(t))
            pubs[r].publish(m)
    for r, times in (("robot_a", ta), ("robot_b", tb)):
        assert wait_for(lambda: nodes[r].stats.count("odometry_received") == len(times))
    a, b = nodes["robot_a"].graph, nodes["robot_b"].graph
    # each has the other's nodes from the fleet topic, neither has merged the other
    assert wait_for(lambda: "robot_a" in b.robots and "robot_b" in a.robots
                    and len(b.robots["robot_a"].stamps) == len(a.robots["robot_a"].stamps)
                    and len(a.robots["robot_b"].stamps) == len(b.robots["robot_b"].stamps))
    assert not b.merged("robot_a") and not a.merged("robot_b")
    # robot_b, near the end of the lap, sees where robot_a started
    lc = loop_msg(BASE + int(39.55 * NS), BASE + int(0.45 * NS), _cam_loop(39.55, 0.45),
                  np.diag([1e-4] * 3 + [1e-5] * 3), qid=7, mid=3)
    lc.query_session, lc.match_session = robot_session("robot_b"), robot_session("robot_a")
    loops_b.publish(LoopClosureArray(loops=[lc]))
    assert wait_for(lambda: b.merged("robot_a") and nodes["robot_b"].stats.count("loops_added") == 1)
    # robot_a's odometry frame (the world) in robot_b's map (robot_b's odometry frame)
    te, re = pose_error(b.origin("robot_a"), np.linalg.inv(origin_b))
    assert te < 0.02 and re < 0.5, (te, re)
    assert wait_for(lambda: markers and {m.ns for m in markers[-1].markers} >= {"robot_a", "robot_b", "loops"})
    assert not a.merged("robot_b")   # robot_a got no loop
    nodes["robot_b"].save_map("")
    from megaloc_ros.backend.fleet_graph import FleetPoseGraph
    again = FleetPoseGraph.load(str(tmp_path / "robot_b") + ".graph")
    assert again.merged("robot_a") and np.allclose(again.origin("robot_a"), b.origin("robot_a"), atol=1e-6)
