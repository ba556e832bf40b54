"""`megaloc-ros bench qos`: does a camera stream published by another process reach the node?

Each choice runs a publisher and a subscriber in two processes (``megaloc_ros.ros.qos_probe``),
on a private ROS_DOMAIN_ID and topic, discovery limited to this machine
(ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST), FASTDDS_BUILTIN_TRANSPORTS set the same in both
processes. The publisher sends --frames real frames (data/rtabmap, resized to --width x
--height, cycled) at --rate Hz, as rgb8 ``sensor_msgs/Image`` or as JPEG (quality 90)
``sensor_msgs/CompressedImage``; the subscriber decodes each to numpy. Printed per choice:
delivery ratio (distinct frames received / sent), frames lost and the receive latency (publish
stamp to callback, same clock) median and p99, and the loss the subscriber's DDS reader itself
reports (the ``message_lost`` QoS event, which a node can count: it sees transport losses, not
samples its own KEEP_LAST history overwrote); then one line saying which choices lose at most
1 %. Publisher and subscriber use the same QoS (reliability, KEEP_LAST depth) unless a choice says
otherwise (``Choice.pub_reliability``).

This module never imports rclpy: the two ends are subprocesses. ``measure()`` is the core (the
test calls it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

LOSS_GOAL = 0.99  # delivery ratio a default must reach


@dataclass(frozen=True)
class Choice:
    key: str             # --only name
    label: str
    transport: str       # raw | compressed
    reliability: str     # the subscriber's: best_effort | reliable | best_available
    depth: int
    large_data: bool     # FASTDDS_BUILTIN_TRANSPORTS=LARGE_DATA in both processes
    pub_reliability: Optional[str] = None  # the publisher's (the camera's), when it differs

    @property
    def needs_env(self) -> bool:
        return self.large_data


CHOICES = (
    Choice("sensor_data", "raw sensor_data (best effort, depth 5)", "raw", "best_effort", 5, False),
    Choice("sensor_data+large", "raw sensor_data, LARGE_DATA", "raw", "best_effort", 5, True),
    Choice("reliable5", "raw reliable depth 5", "raw", "reliable", 5, False),
    Choice("reliable30", "raw reliable depth 30", "raw", "reliable", 30, False),
    Choice("reliable5+large", "raw reliable depth 5, LARGE_DATA", "raw", "reliable", 5, True),
    Choice("reliable30+large", "raw reliable depth 30, LARGE_DATA", "raw", "reliable", 30, True),
    Choice("jpeg_sensor_data", "jpeg q90 sensor_data (best effort, depth 5)", "compressed", "best_effort", 5, False),
    Choice("jpeg_reliable5", "jpeg q90 reliable depth 5", "compressed", "reliable", 5, False),
)
BY_KEY = {c.key: c for c in CHOICES}


def choice(key: str) -> Choice:
    if key not in BY_KEY:
        raise ValueError(f"unknown QoS choice {key!r} (choices: {', '.join(BY_KEY)})")
    return BY_KEY[key]


def node_choice(image_qos: str, depth: int, large_data: bool = False) -> Choice:
    """The choice matching loop_closure_node's ``image_qos`` / ``image_qos_depth`` (raw images)."""
    rel = "best_effort" if image_qos == "sensor_data" else "reliable"
    return Choice(f"{image_qos}{depth}{'+large' if large_data else ''}",
                  f"raw {image_qos} depth {depth}{', LARGE_DATA' if large_data else ''}", "raw", rel, depth,
                  large_data)


def frame_paths() -> list[str]:
    from megaloc_ros.io import datasets
    folder = datasets.data_dir() / "rtabmap"
    paths = sorted(folder.glob("*.jpg"), key=lambda p: (len(p.stem), p.stem))
    if not paths:
        raise FileNotFoundError(f"no frames in {folder}")
    return [str(p) for p in paths]


def _env(large_data: bool, domain_id: int, discovery_range: str = "LOCALHOST") -> dict:
    env = dict(os.environ)
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = discovery_range
    env.pop("ROS_LOCALHOST_ONLY", None)
    env.pop("ROS_STATIC_PEERS", None)
    env.pop("FASTRTPS_DEFAULT_PROFILES_FILE", None)
    env.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
    if large_data:
        env["FASTDDS_BUILTIN_TRANSPORTS"] = "LARGE_DATA"
    else:
        env.pop("FASTDDS_BUILTIN_TRANSPORTS", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _result_line(out: str) -> dict:
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError("no RESULT line in:\n" + out[-2000:])


def default_domain_id() -> int:
    """A domain of this run's own (0-101 keep Fast DDS's ports below the ephemeral range)."""
    return 60 + os.getpid() % 40


def measure(c: Choice, frames: int = 300, rate: float = 30.0, width: int = 640, height: int = 480,
            quality: int = 90, work_s: float = 0.0, domain_id: Optional[int] = None,
            images: Optional[list[str]] = None, timeout: float = 120.0,
            discovery_range: str = "LOCALHOST") -> dict:
    """Publish ``frames`` frames at ``rate`` Hz from one process to a subscriber in another with
    choice ``c``; returns sent, received, ratio, lost, latency median/p99 (ms) and more."""
    domain_id = default_domain_id() if domain_id is None else domain_id
    tag = f"{os.getpid()}_{int(time.time() * 1e3) % 10**8}"
    topic = f"/megaloc_qos_bench_{tag}/image"
    env = _env(c.large_data, domain_id, discovery_range)
    common = ["--topic", topic, "--tag", tag, "--transport", c.transport, "--reliability", c.reliability,
              "--depth", str(c.depth), "--frames", str(frames), "--rate", str(rate), "--width", str(width),
              "--height", str(height), "--quality", str(quality)]
    if c.pub_reliability:
        common += ["--pub-reliability", c.pub_reliability]
    cmd = [sys.executable, "-m", "megaloc_ros.ros.qos_probe"]
    sub = subprocess.Popen(cmd + ["sub", *common, "--work-s", str(work_s), "--timeout", str(timeout)],
                           env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    pub = None
    try:
        ready = sub.stdout.readline()
        if ready.strip() != "READY":
            try:
                rest, _ = sub.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                rest = ""
            raise RuntimeError(f"subscriber did not start: {ready}{rest[-2000:]}")
        pub = subprocess.run(cmd + ["pub", *common, "--images", *(images or frame_paths())], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        if pub.returncode != 0:
            raise RuntimeError(f"publisher failed ({pub.returncode}):\n{pub.stdout[-2000:]}")
        sent = _result_line(pub.stdout)
        try:
            sub.stdin.write("DONE\n")
            sub.stdin.flush()
        except BrokenPipeError:  # it already has every frame and has finished
            pass
        out, _ = sub.communicate(timeout=timeout)
        if sub.returncode != 0:
            raise RuntimeError(f"subscriber failed ({sub.returncode}):\n{out[-2000:]}")
        got = _result_line(out)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    n = int(sent["sent"])
    received = int(got["received"])
    return {"choice": c.key, "label": c.label, **{k: v for k, v in asdict(c).items() if k not in ("key", "label")},
            "sent": n, "received": received, "ratio": received / n if n else 0.0, "lost": n - received,
            "latency_ms_median": got["latency_ms_median"], "latency_ms_p99": got["latency_ms_p99"],
            "decode_ms_median": got["decode_ms_median"], "duplicates": got["duplicates"],
            "message_lost_event": got.get("message_lost_event"), "incompatible_qos_event": got.get("incompatible_qos_event"),
            "publish_rate_hz": sent["rate_hz"], "publish_ms_max": sent["publish_ms_max"],
            "bytes": sent["bytes_median"], "work_s": work_s}


def recommendation(results: list[dict], goal: float = LOSS_GOAL) -> str:
    """One line: which choices delivered >= goal, and the preferred one (no environment variable
    needed, raw images, smallest depth, then lowest p99 latency)."""
    ok = [r for r in results if r["ratio"] >= goal]
    rate = results[0]["publish_rate_hz"] if results else 0.0
    if not ok:
        return f"no choice lost <= {100 * (1 - goal):.0f}% at {rate:.0f} Hz"
    best = min(ok, key=lambda r: (r["large_data"], r["transport"] != "raw", r["depth"], r["latency_ms_p99"]))
    return (f"recommendation: {best['label']} (delivered {100 * best['ratio']:.1f}%, p99 "
            f"{best['latency_ms_p99']:.1f} ms); losing <= {100 * (1 - goal):.0f}% at {rate:.0f} Hz: "
            + ", ".join(r["choice"] for r in ok))


def table(results: list[dict]) -> str:
    rows = ["| choice | delivered | lost | lost as DDS reports it | latency ms median / p99 | bytes/frame |",
            "|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['label']} | {r['received']}/{r['sent']} ({100 * r['ratio']:.1f}%) | {r['lost']} | "
                    f"{r['message_lost_event']} | {r['latency_ms_median']:.1f} / {r['latency_ms_p99']:.1f} | "
                    f"{r['bytes']} |")
    return "\n".join(rows)


def add_arguments(p) -> None:
    p.add_argument("--frames", type=int, default=300, help="frames per choice")
    p.add_argument("--rate", type=float, default=30.0, help="publish rate, Hz")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--only", default="", help="comma-separated choices (default: all): " + ", ".join(BY_KEY))
    p.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID of the run (default: from the pid)")
    p.add_argument("--discovery-range", default="LOCALHOST", choices=("LOCALHOST", "SUBNET"),
                   help="ROS_AUTOMATIC_DISCOVERY_RANGE of both processes (LOCALHOST: nothing leaves this "
                        "machine; SUBNET is ROS's default)")
    p.add_argument("--json", help="also write the results here")


def main(args) -> int:
    keys = [k.strip() for k in args.only.split(",") if k.strip()] if args.only else list(BY_KEY)
    chosen = [choice(k) for k in keys]
    images = frame_paths()
    print(f"{args.frames} frames {args.width}x{args.height} at {args.rate:g} Hz per choice, publisher and "
          f"subscriber in two processes (ROS_AUTOMATIC_DISCOVERY_RANGE={args.discovery_range})", flush=True)
    results = []
    t0 = time.monotonic()
    for c in chosen:
        r = measure(c, args.frames, args.rate, args.width, args.height, domain_id=args.domain_id, images=images,
                    discovery_range=args.discovery_range)
        results.append(r)
        print(f"  {c.label}: {r['received']}/{r['sent']} delivered, p99 {r['latency_ms_p99']:.1f} ms "
              f"(published at {r['publish_rate_hz']:.1f} Hz)", flush=True)
    print()
    print(table(results))
    print()
    print(recommendation(results))
    print(f"({time.monotonic() - t0:.0f} s)")
    if args.json:
        from megaloc_ros.io.files import atomic_write
        with atomic_write(args.json, "w") as f:
            f.write(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(prog="python -m megaloc_ros.bench.qos", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
