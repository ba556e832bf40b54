"""One end of `megaloc-ros bench qos`: a camera-like publisher or a subscriber, one per process.

``python -m megaloc_ros.ros.qos_probe pub|sub ...`` (started by ``megaloc_ros.bench.qos``, which
sets the environment: ROS_DOMAIN_ID, ROS_AUTOMATIC_DISCOVERY_RANGE, FASTDDS_BUILTIN_TRANSPORTS).

- ``pub`` loads the real frames, resizes them to --width x --height, builds the messages once
  (rgb8 ``sensor_msgs/Image``, or JPEG ``sensor_msgs/CompressedImage``: the encoding is done
  before the clock starts), waits until the subscriber is matched, then publishes --frames
  messages at --rate Hz on a fixed schedule; ``header.frame_id`` carries the sequence number and
  ``header.stamp`` the wall-clock publish time.
- ``sub`` prints ``READY`` once subscribed, decodes every message to numpy (what the node does
  before queueing a frame; optionally sleeps --work-s more), and after ``DONE`` on stdin (the
  publisher has finished) waits until every frame arrived or none came for --idle-s.

Each prints one line ``RESULT {json}`` at the end.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import numpy as np


def _qos(reliability: str, depth: int):
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    rel = {"reliable": ReliabilityPolicy.RELIABLE, "best_effort": ReliabilityPolicy.BEST_EFFORT,
           "best_available": ReliabilityPolicy.BEST_AVAILABLE}[reliability]
    return QoSProfile(depth=depth, history=HistoryPolicy.KEEP_LAST, reliability=rel,
                      durability=DurabilityPolicy.VOLATILE)


def _frames(paths: list[str], width: int, height: int, count: int) -> list[np.ndarray]:
    import cv2
    from megaloc_ros.io.images import read_image_file
    out = []
    for p in paths[:max(1, min(count, len(paths)))]:
        rgb = read_image_file(p)
        out.append(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA))
    return out


def run_pub(a) -> dict:
    import array

    import rclpy
    from sensor_msgs.msg import CompressedImage, Image
    from megaloc_ros.io.images import encode_jpeg, encode_raw

    frames = _frames(a.images, a.width, a.height, a.frames)
    if a.transport == "compressed":
        msgs = [CompressedImage(format="jpeg", data=array.array("B", encode_jpeg(f, a.quality))) for f in frames]
        kind = CompressedImage
    else:
        msgs = []
        for f in frames:
            h, w, step, data = encode_raw(f, "rgb8")
            msgs.append(Image(height=h, width=w, encoding="rgb8", is_bigendian=0, step=step,
                              data=array.array("B", data)))
        kind = Image
    sizes = [len(m.data) for m in msgs]
    rclpy.init()
    node = rclpy.create_node(f"qos_probe_pub_{a.tag}")
    pub = node.create_publisher(kind, a.topic, _qos(a.pub_reliability or a.reliability, a.depth))
    deadline = time.monotonic() + a.match_timeout
    while pub.get_subscription_count() < 1:
        if time.monotonic() > deadline:
            raise SystemExit(f"no subscriber matched {a.topic} within {a.match_timeout} s")
        time.sleep(0.02)
    time.sleep(a.settle)  # let the reader's side of the match complete too
    publish_s = []
    period = 1.0 / a.rate
    t0 = time.monotonic()
    late = 0
    for i in range(a.frames):
        wait = t0 + i * period - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        elif wait < -period:
            late += 1
        m = msgs[i % len(msgs)]
        m.header.frame_id = str(i)
        now = time.time_ns()
        m.header.stamp.sec, m.header.stamp.nanosec = now // 10**9, now % 10**9
        t = time.perf_counter()
        pub.publish(m)
        publish_s.append(time.perf_counter() - t)
    elapsed = time.monotonic() - t0
    time.sleep(a.linger)  # a reliable writer still resends what the reader has not acknowledged
    node.destroy_node()
    rclpy.try_shutdown()
    return {"sent": a.frames, "elapsed_s": elapsed, "rate_hz": (a.frames - 1) / elapsed if elapsed > 0 else 0.0,
            "late": late, "publish_ms_median": 1e3 * float(np.median(publish_s)),
            "publish_ms_max": 1e3 * float(np.max(publish_s)), "bytes_median": int(np.median(sizes))}


def run_sub(a) -> dict:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import CompressedImage, Image
    from megaloc_ros.io.images import decode_compressed, decode_raw

    rclpy.init()
    node = rclpy.create_node(f"qos_probe_sub_{a.tag}")
    seen: set[int] = set()
    latency_ms: list[float] = []
    decode_ms: list[float] = []
    state = {"last": time.monotonic(), "dup": 0, "bad": 0, "lost_event": 0, "incompatible_event": 0}

    def on_msg(msg) -> None:
        now = time.time_ns()
        state["last"] = time.monotonic()
        try:
            seq = int(msg.header.frame_id)
        except ValueError:
            state["bad"] += 1
            return
        if seq in seen:
            state["dup"] += 1
            return
        seen.add(seq)
        latency_ms.append((now - (msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec)) / 1e6)
        t = time.perf_counter()
        if isinstance(msg, CompressedImage):  # what the node does (ros/conversions.image_msg_to_rgb)
            rgb = decode_compressed(msg.format, msg.data)
        else:
            rgb = decode_raw(msg.encoding, msg.height, msg.width, msg.step, msg.data, bool(msg.is_bigendian))
        if rgb.shape != (a.height, a.width, 3):
            state["bad"] += 1
        decode_ms.append(1e3 * (time.perf_counter() - t))
        if a.work_s > 0:
            time.sleep(a.work_s)

    kind = CompressedImage if a.transport == "compressed" else Image
    from rclpy.event_handler import SubscriptionEventCallbacks

    def on_lost(info) -> None:  # what DDS itself reports lost (the node could count this)
        state["lost_event"] = int(info.total_count)

    def on_incompatible(info) -> None:
        state["incompatible_event"] = int(info.total_count)

    events = SubscriptionEventCallbacks(message_lost=on_lost, incompatible_qos=on_incompatible)
    node.create_subscription(kind, a.topic, on_msg, _qos(a.reliability, a.depth), event_callbacks=events)
    done = threading.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "DONE":
                break
        done.set()

    threading.Thread(target=read_stdin, daemon=True).start()
    ex = SingleThreadedExecutor()
    ex.add_node(node)
    print("READY", flush=True)
    hard_stop = time.monotonic() + a.timeout
    done_at = None
    while time.monotonic() < hard_stop:
        ex.spin_once(timeout_sec=0.05)
        if len(seen) >= a.frames:
            break
        if done.is_set():
            done_at = done_at or time.monotonic()
            now = time.monotonic()
            if now - max(state["last"], done_at) > a.idle_s:
                break
    node.destroy_node()
    rclpy.try_shutdown()
    lat = np.array(latency_ms) if latency_ms else np.array([np.nan])
    return {"received": len(seen), "duplicates": state["dup"], "bad": state["bad"],
            "message_lost_event": state["lost_event"], "incompatible_qos_event": state["incompatible_event"],
            "latency_ms_median": float(np.median(lat)), "latency_ms_p99": float(np.percentile(lat, 99)),
            "decode_ms_median": float(np.median(decode_ms)) if decode_ms else float("nan")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("role", choices=("pub", "sub"))
    p.add_argument("--topic", required=True)
    p.add_argument("--tag", default="0", help="node name suffix")
    p.add_argument("--transport", choices=("raw", "compressed"), default="raw")
    p.add_argument("--reliability", choices=("best_effort", "reliable", "best_available"), default="best_effort")
    p.add_argument("--pub-reliability", choices=("best_effort", "reliable"), default=None,
                   help="the publisher's, when it differs from --reliability")
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--rate", type=float, default=30.0)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--images", nargs="*", default=[], help="frames to cycle through (pub)")
    p.add_argument("--match-timeout", type=float, default=20.0)
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--linger", type=float, default=0.5)
    p.add_argument("--work-s", type=float, default=0.0, help="extra seconds of work per frame (sub)")
    p.add_argument("--idle-s", type=float, default=1.5)
    p.add_argument("--timeout", type=float, default=120.0)
    a = p.parse_args(argv)
    result = run_pub(a) if a.role == "pub" else run_sub(a)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
