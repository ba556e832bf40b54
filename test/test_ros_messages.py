"""The package's messages over real rclpy + Fast DDS, and the msg <-> core-type conversions."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy, DurabilityPolicy  # noqa: E402

from megaloc_ros.msg import Keyframe as KeyframeMsg, LoopClosure, LoopClosureArray  # noqa: E402
from megaloc_ros.ros import conversions as conv  # noqa: E402
from megaloc_ros.types import Candidate, ImageFeatures, Keyframe, RelativePose, VerifiedLoop  # noqa: E402

pytestmark = pytest.mark.ros

# A domain of its own so that other test runs on this machine cannot cross-talk.
DOMAIN_ID = 160 + os.getpid() % 20
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")


@pytest.fixture(scope="module")
def ros():
    """An initialised context with a talker and a listener node spinning in the background."""
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    talker = rclpy.create_node("talker", context=ctx)
    listener = rclpy.create_node("listener", context=ctx)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(listener)
    t = threading.Thread(target=ex.spin, daemon=True)
    t.start()
    yield talker, listener
    ex.shutdown()
    talker.destroy_node()
    listener.destroy_node()
    rclpy.shutdown(context=ctx)
    t.join(5)


def _roundtrip(ros, msg_type, topic, msg, timeout=10.0):
    """Publish ``msg`` from one node and return what the other node receives over DDS."""
    talker, listener = ros
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    got, ev = [], threading.Event()
    sub = listener.create_subscription(msg_type, topic, lambda m: (got.append(m), ev.set()), qos)
    pub = talker.create_publisher(msg_type, topic, qos)
    try:
        deadline = time.monotonic() + timeout
        while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        pub.publish(msg)
        assert ev.wait(max(0.1, deadline - time.monotonic())), f"nothing received on {topic}"
        return got[0]
    finally:
        listener.destroy_subscription(sub)
        talker.destroy_publisher(pub)


def _unset_fields(msg, prefix=""):
    """Paths of the primitive fields of ``msg`` still equal to their defaults, recursively."""
    default = type(msg)()
    for name in msg.get_fields_and_field_types():
        v, d = getattr(msg, name), getattr(default, name)
        if hasattr(v, "get_fields_and_field_types"):
            yield from _unset_fields(v, f"{prefix}{name}.")
        elif isinstance(v, list) and v and hasattr(v[0], "get_fields_and_field_types"):
            for i, e in enumerate(v):
                yield from _unset_fields(e, f"{prefix}{name}[{i}].")
        elif np.array_equal(np.asarray(v), np.asarray(d)):
            yield prefix + name


def _assert_every_field_set(msg, allowed=()):
    """Guard against a round trip that passes because fields are left at their defaults."""
    unset = [f for f in _unset_fields(msg) if f not in allowed]
    assert not unset, f"{type(msg).__name__} fields left at their defaults: {unset}"


def _full_loop(i: int) -> LoopClosure:
    rng = np.random.default_rng(i)
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    m = LoopClosure()
    m.header.stamp.sec, m.header.stamp.nanosec = 1700000000 + i, 123456789
    m.header.frame_id = f"camera_{i}"
    m.query_id, m.match_id = 2**40 + i, 7 + i
    m.query_stamp.sec, m.query_stamp.nanosec = 1700000000 + i, 111
    m.match_stamp.sec, m.match_stamp.nanosec = 1600000000 + i, 222
    m.query_session, m.match_session = 3, 1
    m.score, m.rank = 0.8125, 2 + i
    m.verified = True
    m.verification_score, m.inliers = 0.375, 57 + i
    m.reason = f"accepted: {57 + i} inliers"
    m.has_transform = True
    m.transform.translation.x, m.transform.translation.y, m.transform.translation.z = 1.5, -2.25, 0.125
    m.transform.rotation.x, m.transform.rotation.y, m.transform.rotation.z, m.transform.rotation.w = (float(v) for v in q)
    m.metric_scale = True
    m.covariance = rng.normal(size=36)
    return m


def test_loop_closure_roundtrip_over_dds(ros):
    sent = _full_loop(0)
    _assert_every_field_set(sent)
    got = _roundtrip(ros, LoopClosure, "/test/loop", sent)
    assert got == sent
    np.testing.assert_array_equal(got.covariance, sent.covariance)
    assert got.query_id == 2**40  # uint64 beyond 32 bits survives


def test_loop_closure_array_roundtrip_over_dds(ros):
    sent = LoopClosureArray()
    sent.header.stamp.sec, sent.header.stamp.nanosec = 1700000005, 5
    sent.header.frame_id = "map"
    sent.map_id = "0f3c9a"
    sent.loops = [_full_loop(i) for i in range(3)]
    _assert_every_field_set(sent)
    got = _roundtrip(ros, LoopClosureArray, "/test/loops", sent)
    assert got == sent
    assert [lc.rank for lc in got.loops] == [2, 3, 4]


def test_keyframe_roundtrip_over_dds_with_real_image(ros, rtabmap_seq):
    rgb = rtabmap_seq.load_rgb(0)
    pose = np.eye(4)
    pose[:3, :3] = conv.quaternion_to_matrix(0.1, 0.2, 0.3, 0.9)
    pose[:3, 3] = (4.0, -1.0, 0.5)
    rng = np.random.default_rng(0)
    desc = rng.normal(size=256).astype(np.float32)
    desc /= np.linalg.norm(desc)
    feats = ImageFeatures(descriptor=desc, patch_features=rng.normal(size=(16, 12, 8)).astype(np.float32))
    kf = Keyframe(id=42, stamp_ns=1_700_000_000_123_456_789, session=2, frame_id="cam", pose=pose)
    depth = np.full(rgb.shape[:2], 2.5, np.float32)
    depth[:10] = np.nan  # no measurement there
    sent = conv.keyframe_to_msg(kf, rgb, feats, image_max_side=256, map_id="0f3c9a", depth_m=depth)
    _assert_every_field_set(sent, allowed={"image.is_bigendian", "depth.is_bigendian"})  # little-endian data
    got = _roundtrip(ros, KeyframeMsg, "/test/keyframe", sent)
    assert got == sent
    kf2, rgb2, feats2 = conv.msg_to_keyframe(got)
    assert (kf2.id, kf2.stamp_ns, kf2.session, kf2.frame_id) == (42, kf.stamp_ns, 2, "cam")
    np.testing.assert_allclose(kf2.pose, pose, atol=1e-12)
    assert rgb2.shape == (192, 256, 3)  # 512x384 downscaled to a 256 longest side
    d2 = conv.msg_depth(got)  # downscaled with the image, nearest-neighbour
    assert d2.shape == (192, 256) and np.isnan(d2[:4]).all() and np.all(d2[10:] == 2.5)
    np.testing.assert_array_equal(feats2.descriptor, desc)
    np.testing.assert_array_equal(feats2.patch_features, feats.patch_features)


def test_candidate_and_verified_loop_conversions():
    rng = np.random.default_rng(1)
    q = Keyframe(id=10, stamp_ns=20 * conv.NS + 5, session=1, frame_id="cam")
    t = Keyframe(id=3, stamp_ns=2 * conv.NS + 7, session=0, frame_id="cam")
    cand = Candidate(query=q, match=t, score=0.75, rank=1)
    m = conv.loop_to_msg(cand)
    assert not m.verified and not m.has_transform
    c2 = conv.msg_to_candidate(m)
    assert (c2.query.id, c2.match.id, c2.query.stamp_ns, c2.match.stamp_ns) == (10, 3, q.stamp_ns, t.stamp_ns)
    assert (c2.query.session, c2.match.session, c2.rank) == (1, 0, 1)
    assert c2.score == pytest.approx(0.75)

    rot = conv.quaternion_to_matrix(*rng.normal(size=4))
    cov = rng.normal(size=(6, 6))
    loop = VerifiedLoop(cand, accepted=True, verification_score=0.5, inliers=33,
                        transform=RelativePose(rot, np.array([0.6, 0.0, 0.8]), metric_scale=False, covariance=cov))
    m = conv.loop_to_msg(loop)
    assert m.verified and m.has_transform and m.inliers == 33
    back = conv.msg_to_verified_loop(m)
    np.testing.assert_allclose(back.transform.rotation, rot, atol=1e-12)
    np.testing.assert_allclose(back.transform.translation, [0.6, 0.0, 0.8])
    np.testing.assert_allclose(back.transform.covariance, cov)
    assert back.transform.metric_scale is False


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16"])
def test_image_messages_decode_to_rgb(rtabmap_seq, encoding):
    rgb = rtabmap_seq.load_rgb(3)
    out = conv.image_msg_to_rgb(conv.rgb_to_image_msg(rgb, 5, "cam", encoding))
    if encoding.startswith("mono"):
        ref = rgb.mean(axis=2)
        assert np.abs(out[..., 0].astype(float) - ref).max() <= 1.0 + 255 * (1 - ref.max() / 255)
    else:
        np.testing.assert_array_equal(out, rgb)
    jpg = conv.image_msg_to_rgb(conv.rgb_to_compressed_msg(rgb, 5, "cam", quality=95))
    assert jpg.shape == rgb.shape and np.abs(jpg.astype(int) - rgb).mean() < 4
