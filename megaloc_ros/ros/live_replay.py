"""Live replay (`megaloc-ros eval --live`, `megaloc-ros demo`): play a rosbag's images into the
ROS 2 nodes over DDS at a rate factor and record what they publish.

The nodes run in this process (``runner.NodeSet``: loop_closure_node + verifier_node on their
own executor thread) under a namespace of their own; a helper node in the same context
publishes the bag's image messages unchanged (serialised CDR) on ``<ns>/image_raw`` (or
``image_raw/compressed``) and subscribes to ``loop_closure_node/keyframes``,
``loop_closure_node/candidates``, ``loop_closure_node/retrieved``, ``verifier_node/loop_closures`` and ``verifier_node/rejected``.
Frames are matched back to the bag by their header stamps. The result is the same
``evaluation.replay.Replay`` the offline mode produces, so both are scored alike; what the
wire does not carry (the raw top-k below the detector's threshold, per-stage timings inside
the node) is said in ``Replay.notes``.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

from megaloc_ros.errors import MegalocError
from megaloc_ros.io.bag import progress_bar
from megaloc_ros.evaluation.replay import FrameRecord, Replay, descriptor_stride


class TimedEncoder:
    """An encoder that records how long each ``encode`` call took (shared with the node)."""

    def __init__(self, encoder):
        self._enc = encoder
        self.times_ms: list[float] = []

    def encode(self, images):
        t0 = time.perf_counter()
        out = self._enc.encode(images)
        self.times_ms.append((time.perf_counter() - t0) * 1e3)
        return out

    def __getattr__(self, name):
        return getattr(self._enc, name)


class _Recorder:
    """Collects the nodes' outputs with their arrival times (called on the executor thread)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.keyframes: list[tuple[float, object]] = []
        self.candidates: list[tuple[float, object]] = []
        self.retrieved: list[tuple[float, object]] = []
        self.verdicts: list[tuple[float, object]] = []

    def on(self, name):
        def cb(msg):
            with self.lock:
                getattr(self, name).append((time.monotonic(), msg))
        return cb

    def counts(self) -> tuple[int, int, int, int]:
        with self.lock:
            return (len(self.keyframes), sum(len(m.loops) for _, m in self.candidates),
                    sum(len(m.loops) for _, m in self.retrieved), sum(len(m.loops) for _, m in self.verdicts))


def replay_live(bag_path: str | Path, topic: str, settings=None, *,
                params_file: Optional[str] = None, rate: float = 1.0, quiet: bool = False,
                trajectory=None, encoder=None, node_params: Optional[dict] = None,
                namespace: Optional[str] = None, timeout_s: float = 600.0) -> Replay:
    """Play ``topic`` of the bag into freshly started nodes and record their outputs.

    ``settings`` (``pipeline.PipelineSettings``; its ``verifier`` None runs no verifier node)
    overrides ``params_file``; ``node_params`` overrides node parameters such as
    ``image_qos`` or ``queue_size``. ``rate`` scales the bag's timing (2.0 = twice as fast).
    ``trajectory`` (io.trajectory.Trajectory) is played as nav_msgs/Odometry on
    ``<ns>/odom``, interleaved with the images by stamp, and the node is told to use it.
    """
    try:
        from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    except ImportError:
        raise MegalocError("--live needs ROS 2 (rclpy); run through tools/with_env.sh, "
                           "or drop --live for the offline replay") from None
    from megaloc_ros.msg import Keyframe as KeyframeMsg
    from megaloc_ros.msg import LoopClosureArray
    from nav_msgs.msg import Odometry
    from sensor_msgs.msg import CompressedImage, Image

    from megaloc_ros.io.bag import COMPRESSED_TYPE, BagReader
    from megaloc_ros.ros import conversions as conv
    from megaloc_ros.ros.runner import NodeSet, load_params

    if rate <= 0:
        raise MegalocError("rate must be positive")
    with BagReader(bag_path) as r:
        n_frames = r.image_count(topic)
        msgtype = next(c.msgtype for c in r._reader.connections if c.topic == topic)
    compressed = msgtype == COMPRESSED_TYPE
    from megaloc_ros.pipeline import PipelineSettings

    settings = settings or PipelineSettings()
    params = load_params(params_file)
    params.update({k: list(v) if isinstance(v, tuple) else v for k, v in settings.to_flat().items()})
    params.update({"image_topic": "image_raw", "image_transport": "compressed" if compressed else "raw",
                   "map_path": "", "autostart": True, "odom_topic": "odom" if trajectory is not None else "",
                   # a replay must lose no frame: reliable with a history deep enough for the whole
                   # burst (KEEP_LAST overwrites unread frames even when reliable) and no queue drops
                   "image_qos": "reliable", "image_qos_depth": 1000, "queue_size": 1000})
    params.update(node_params or {})
    ns = namespace if namespace is not None else f"megaloc_replay_{os.getpid()}"
    if encoder is None:
        from megaloc_ros.encoding.loader import load_encoder
        encoder = load_encoder(settings.encoder.model_path or None, device=settings.encoder.device)
    timed = TimedEncoder(encoder)
    rec = _Recorder()
    reliable = QoSProfile(depth=1000, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
    published_at: dict[int, float] = {}
    stamps: list[int] = []
    notes = []
    with NodeSet(params, namespace=ns, use_verifier=settings.verifier is not None, encoder=timed) as nodes:
        h = nodes.helper_node
        # exactly the topic the node subscribed to (namespace and /compressed resolved)
        image_topic = getattr(nodes, "image_topic", "") or ("image_raw/compressed" if compressed else "image_raw")
        pub = h.create_publisher(CompressedImage if compressed else Image, image_topic, reliable)
        subs = [h.create_subscription(KeyframeMsg, "loop_closure_node/keyframes", rec.on("keyframes"), reliable),
                h.create_subscription(LoopClosureArray, "loop_closure_node/candidates", rec.on("candidates"), reliable),
                h.create_subscription(LoopClosureArray, "loop_closure_node/retrieved", rec.on("retrieved"), reliable)]
        if nodes.verifier is not None:
            subs += [h.create_subscription(LoopClosureArray, f"verifier_node/{t}", rec.on("verdicts"), reliable)
                     for t in ("loop_closures", "rejected")]
        odom_pub = None
        if trajectory is not None:
            odom_pub = h.create_publisher(Odometry, "odom", reliable)
        _wait_discovery(pub, subs, extra_pubs=[odom_pub] if odom_pub else [])
        odom_msgs = _odometry(trajectory, conv, Odometry) if odom_pub is not None else []
        bar = progress_bar(n_frames, f"live x{rate:g}", quiet)
        try:
            with BagReader(bag_path) as r:
                t0 = first = None
                k = 0  # next odometry message
                for i, stamp, _, raw in r.raw_images(topic):
                    if t0 is None:
                        t0, first = time.monotonic(), stamp
                    # odometry up to this image's stamp goes first, as a recorded bag would play it
                    while k < len(odom_msgs) and odom_msgs[k][0] <= stamp:
                        odom_pub.publish(odom_msgs[k][1])
                        k += 1
                    wait = t0 + (stamp - first) / 1e9 / rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    published_at[i] = time.monotonic()
                    stamps.append(stamp)
                    pub.publish(raw)
                    bar.update(1)
        finally:
            bar.close()
        lc, vn = nodes.loop_closure, nodes.verifier
        # wait_idle sees only frames the node has received: the last ones may still be in transit
        # (reliable QoS loses none; under load the executor takes them late)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and lc.stats.count("frames_received") < len(published_at):
            time.sleep(0.02)
        if lc.stats.count("frames_received") < len(published_at):
            notes.append(f"loop_closure_node received {lc.stats.count('frames_received')} of "
                         f"{len(published_at)} frames within {timeout_s:g} s")
        if not nodes.wait_idle(timeout=timeout_s):
            notes.append(f"the nodes were still busy {timeout_s:g} s after the last frame; results are partial")
        want = (lc.stats.count("keyframes"), lc.stats.count("candidates"), lc.stats.count("retrieved"),
                vn.stats.count("candidates_verified") if vn is not None else 0)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(g < w for g, w in zip(rec.counts(), want)):
            time.sleep(0.05)
        got = rec.counts()
        if any(g < w for g, w in zip(got, want)):
            notes.append(f"recorded {got} of {want} (keyframes, candidates, retrieved, verdicts) the nodes published")
        snap = {**lc.stats.snapshot(), **({f"verifier_{k}": v for k, v in vn.stats.snapshot().items()}
                                          if vn is not None else {})}
        node_lat = ", ".join(f"{k[:-len('_ms_median')].replace('verifier_', '')} {v:.1f} ms"
                             for k, v in snap.items() if k.endswith("_ms_median"))
        expired = vn.stats.count("candidates_expired") if vn is not None else 0
        if expired:
            notes.append(f"{expired} candidates got no verdict: verifier_node dropped them because their "
                         "query keyframe did not arrive within candidate_wait (it was behind)")
        dropped = lc.stats.count("frames_dropped")
        processed = lc.stats.count("frames_processed")
        pm = lc.mapping.place_map
        map_size = len(pm)
        map_bytes = dict(pm.memory_bytes()) if hasattr(pm, "memory_bytes") else {}
        used = {"detector": dataclasses.asdict(lc.mapping.params)}
        verifier_state = None
        if vn is not None:
            used["verifier"] = dataclasses.asdict(vn.verifier.params)
            verifier_state = vn.verifier  # the report draws its verdicts (in this process)
        for s in subs:
            h.destroy_subscription(s)
        h.destroy_publisher(pub)

    notes.insert(0, f"live replay over DDS at rate x{rate:g} (namespace /{ns}): {len(stamps)} frames "
                    f"published, {processed} processed by loop_closure_node, {dropped} dropped by its queue")
    if trajectory is not None:
        notes.append("the bag's poses were replayed as nav_msgs/Odometry on odom (keyframe selection "
                     "uses them, like the offline replay)")
    if node_lat:
        notes.append(f"median stage latencies the nodes report (last 100 frames): {node_lat}")
    notes.append("live mode: the sweep scores the raw top-k the node publishes on ~/retrieved; "
                 "image_to_keyframe includes DDS transport and queueing; offline mode times "
                 "decode/encode/search/verify per frame")
    replay = _to_replay(str(bag_path), topic, stamps, published_at, rec, timed, conv, map_size, map_bytes,
                        vn_used=settings.verifier is not None, params=used, notes=notes)
    replay.verifier_state = verifier_state
    return replay


def _odometry(trajectory, conv, Odometry) -> list:
    """(stamp_ns, nav_msgs/Odometry) for every pose of ``trajectory``."""
    out = []
    for t, m in zip(trajectory.stamps_ns, trajectory.poses):
        msg = Odometry()
        msg.header = conv.make_header(int(t), "odom")
        msg.child_frame_id = "camera"
        msg.pose.pose = conv.matrix_to_pose(m)
        out.append((int(t), msg))
    return out


def _wait_discovery(pub, subs, timeout: float = 15.0, extra_pubs=()) -> None:
    deadline = time.monotonic() + timeout
    pubs = [pub, *extra_pubs]
    while time.monotonic() < deadline:
        if all(p.get_subscription_count() >= 1 for p in pubs) and all(s.get_publisher_count() >= 1 for s in subs):
            time.sleep(0.2)  # let the matched endpoints finish their handshake
            return
        time.sleep(0.05)
    raise MegalocError("the nodes did not appear on DDS within 15 s (check ROS_DOMAIN_ID, "
                       "ROS_LOCALHOST_ONLY / ROS_AUTOMATIC_DISCOVERY_RANGE and the firewall)")


def _to_replay(bag, topic, stamps, published_at, rec: _Recorder, timed: TimedEncoder, conv,
               map_size, map_bytes, vn_used: bool, params: dict, notes: list[str]) -> Replay:
    from megaloc_ros.evaluation.replay import _jsonable

    frame_of_stamp: dict[int, int] = {}
    for i, s in enumerate(stamps):
        frame_of_stamp.setdefault(s, i)
    frames = [FrameRecord(i, s) for i, s in enumerate(stamps)]
    stride = descriptor_stride(len(stamps))
    descs, desc_frames = [], []
    kf_arrival: dict[int, float] = {}
    for t, m in sorted(rec.keyframes, key=lambda x: x[0]):
        i = frame_of_stamp.get(conv.stamp_to_ns(m.header.stamp))
        if i is None:
            continue
        frames[i].keyframe_id = int(m.id)
        kf_arrival[i] = t
        frames[i].timings_ms["image_to_keyframe"] = (t - published_at.get(i, t)) * 1e3
        if i % stride == 0 and len(m.descriptor):
            descs.append(np.asarray(m.descriptor, dtype=np.float32))
            desc_frames.append(i)
    def by_frame(arrays):
        """(arrival time, frame index, LoopClosure) of every loop whose query is a frame of the bag."""
        for t, arr in arrays:
            for lc in arr.loops:
                i = frame_of_stamp.get(conv.stamp_to_ns(lc.query_stamp))
                if i is not None:
                    yield t, i, lc

    for _, i, lc in by_frame(rec.candidates):
        frames[i].candidates.append(conv.msg_to_candidate(lc))
    cand_arrival: dict[int, float] = {}
    for t, i, lc in by_frame(rec.retrieved):
        frames[i].retrieved.append(conv.msg_to_candidate(lc))
        cand_arrival.setdefault(i, t)
    verdict_arrival: dict[int, float] = {}
    for t, i, lc in by_frame(rec.verdicts):
        frames[i].loops.append(conv.msg_to_verified_loop(lc))
        verdict_arrival[i] = max(t, verdict_arrival.get(i, t))
    for i, t in verdict_arrival.items():
        if i in cand_arrival:
            frames[i].timings_ms["candidates_to_verdict"] = (t - cand_arrival[i]) * 1e3
    for f in frames:
        f.candidates.sort(key=lambda c: -c.score)
        f.retrieved.sort(key=lambda c: -c.score)
    dim = len(descs[0]) if descs else int(getattr(timed, "descriptor_dim", 0))
    replay = Replay(bag=bag, topic=topic, mode="live", model=timed.description,
                    model_kind=getattr(timed, "kind", "megaloc"), frames=frames,
                    descriptors=np.stack(descs) if descs else np.zeros((0, dim), np.float32),
                    descriptor_frames=np.array(desc_frames, dtype=np.int64), map_size=map_size,
                    map_bytes=map_bytes, verifier=vn_used, params=_jsonable(params), notes=notes)
    replay.extra_timings = {"encode": list(timed.times_ms)}
    return replay
