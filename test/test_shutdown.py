"""Stopping a node process the way a terminal and `ros2 launch` do: SIGINT, and a second SIGINT
while it is saving. The map survives whole, the place map and the verifier state hold the same
keyframes, the process exits 0; a failed start is one line and exit status 2."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy")
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from megaloc_ros.msg import Keyframe as KeyframeMsg  # noqa: E402
from megaloc_ros.ros import conversions as conv  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
DOMAIN_ID = 150 + os.getpid() % 20
RELIABLE = QoSProfile(depth=200, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
KEEP_ALL = QoSProfile(depth=1, history=HistoryPolicy.KEEP_ALL, reliability=ReliabilityPolicy.RELIABLE)


@pytest.fixture(scope="module")
def model() -> str:
    from megaloc_ros.encoding.loader import load_encoder
    return str(load_encoder().model_path)


def _start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "ROS_DOMAIN_ID": str(DOMAIN_ID), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


class _Lines:
    """The process's output, read in a thread (a full pipe would block the node)."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._t = threading.Thread(target=lambda: self.lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        self._t.start()

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in list(self.lines)):
                return True
            time.sleep(0.02)
        return False

    def __str__(self) -> str:
        return "".join(self.lines[-40:])


def _publish_frames(rtabmap_seq, n: int, namespace: str, expect_keyframes: int) -> list[int]:
    """Publish the first ``n`` frames on <namespace>/image_raw; returns the keyframe ids seen."""
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    node = rclpy.create_node("shutdown_test", context=ctx)
    ids: list[int] = []
    sub = node.create_subscription(KeyframeMsg, f"/{namespace}/loop_closure_node/keyframes",
                                   lambda m: ids.append(int(m.id)), KEEP_ALL)
    pub = node.create_publisher(Image, f"/{namespace}/image_raw", RELIABLE)
    ex = rclpy.executors.SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    try:
        deadline = time.monotonic() + 60
        while (pub.get_subscription_count() < 1 or sub.get_publisher_count() < 1) and time.monotonic() < deadline:
            ex.spin_once(timeout_sec=0.05)
        assert pub.get_subscription_count() >= 1, "the node did not appear on DDS"
        time.sleep(0.3)
        for i in range(n):
            pub.publish(conv.rgb_to_image_msg(rtabmap_seq.load_rgb(i), (1_700_000_000 + i) * conv.NS, "camera"))
            ex.spin_once(timeout_sec=0.01)
        deadline = time.monotonic() + 120
        while len(ids) < expect_keyframes and time.monotonic() < deadline:
            ex.spin_once(timeout_sec=0.05)
    finally:
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
    return ids


def test_double_sigint_during_the_shutdown_save_keeps_one_consistent_map(tmp_path, rtabmap_seq, model):
    """`megaloc-ros run` (both nodes): frames in, SIGINT, a second SIGINT as it starts stopping
    and a third while it saves; it exits 0 and the place map and verifier state hold the same
    keyframes, all that were published."""
    from megaloc_ros.mapping.place_map import PlaceMap
    from megaloc_ros.verification.verifier import Verifier

    map_path = tmp_path / "maps" / "office.map"
    ns = f"shutdown_{os.getpid()}"
    proc = _start(["-m", "megaloc_ros", "run", "--params", "config/loop_closure.yaml", "--namespace", ns,
                   "--map-path", str(map_path), "-p", f"encoder.model_path:={model}",
                   "-p", "image_qos:=reliable", "-p", "queue_size:=100", "-p", "image_qos_depth:=100",
                   "-p", "detector.max_similarity_to_last:=1.01"])
    out = _Lines(proc)
    try:
        assert out.wait_for("running; Ctrl-C to stop", 120), str(out)
        n = 30  # every frame becomes a keyframe (novelty test off)
        ids = _publish_frames(rtabmap_seq, n, ns, n)
        assert len(ids) == n, f"{len(ids)} keyframes of {n} frames\n{out}"
        proc.send_signal(signal.SIGINT)
        assert out.wait_for("stopping", 20), str(out)
        proc.send_signal(signal.SIGINT)  # the terminal's Ctrl-C after launch's
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, str(out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Traceback" not in str(out) and "KeyboardInterrupt" not in str(out), str(out)
    pm = PlaceMap.load(map_path)
    v = Verifier.load(str(map_path) + ".verifier")
    map_ids = sorted(kf.id for kf in pm.keyframes())
    assert map_ids == sorted(ids) and all(i in v for i in map_ids) and len(v) == len(map_ids)
    assert not [p for p in map_path.parent.iterdir() if p.name.startswith(".")], "temporary files left"


def test_node_executable_survives_a_second_sigint_while_saving(tmp_path, rtabmap_seq, model):
    """The installed executable (what `ros2 launch` starts): SIGINT twice in quick succession."""
    from megaloc_ros.mapping.place_map import PlaceMap

    map_path = tmp_path / "lc.map"
    ns = f"single_{os.getpid()}"
    proc = _start([str(ROOT / "scripts" / "loop_closure_node"), "--ros-args", "-r", f"__ns:=/{ns}",
                   "--params-file", "config/loop_closure.yaml", "-p", f"encoder.model_path:={model}",
                   "-p", f"map_path:={map_path}", "-p", "image_qos:=reliable", "-p", "image_qos_depth:=100", "-p", "queue_size:=100",
                   "-p", "detector.max_similarity_to_last:=1.01"])
    out = _Lines(proc)
    try:
        ids = _publish_frames(rtabmap_seq, 12, ns, 12)
        assert len(ids) == 12, str(out)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, str(out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Traceback" not in str(out), str(out)
    assert sorted(kf.id for kf in PlaceMap.load(map_path).keyframes()) == sorted(ids)


def test_node_that_cannot_start_says_why_in_one_line_and_exits_2(tmp_path):
    proc = _start([str(ROOT / "scripts" / "loop_closure_node"), "--ros-args",
                   "-p", f"encoder.model_path:={tmp_path / 'missing.onnx'}"])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert "Traceback" not in out and "could not start" in out and "missing.onnx" in out, out


def test_autosave_writes_the_map_while_running(tmp_path, rtabmap_seq, model):
    """autosave_period bounds what a crash loses: the files appear without any stop."""
    from megaloc_ros.mapping.place_map import PlaceMap
    from megaloc_ros.ros.runner import NodeSet

    map_path = tmp_path / "auto.map"
    params = {"encoder.model_path": model, "map_path": str(map_path), "autosave_period": 0.5,
              "image_qos": "reliable", "queue_size": 100, "detector.max_similarity_to_last": 1.01}
    with NodeSet(params, namespace=f"autosave_{os.getpid()}", domain_id=DOMAIN_ID) as ns:
        pub = ns.helper_node.create_publisher(Image, "image_raw", RELIABLE)
        deadline = time.monotonic() + 30
        while pub.get_subscription_count() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        for i in range(3):
            pub.publish(conv.rgb_to_image_msg(rtabmap_seq.load_rgb(i), (1_700_000_000 + i) * conv.NS, "camera"))
        assert ns.wait_idle(timeout=60)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
                Path(str(map_path) + ".verifier").exists() and map_path.exists() and len(PlaceMap.load(map_path)) == 3):
            time.sleep(0.1)  # an earlier autosave may hold fewer
        assert len(PlaceMap.load(map_path)) == 3 and Path(str(map_path) + ".verifier").exists()


def test_stop_is_prompt_when_the_verifier_was_never_activated(tmp_path):
    """autostart false and only loop_closure_node driven: stopping does not wait for a verifier
    that can receive nothing."""
    from megaloc_ros.ros.runner import NodeSet
    ns = NodeSet({"autostart": False}, namespace=f"idle_{os.getpid()}", domain_id=DOMAIN_ID).start()
    assert ns.loop_closure.start()
    t0 = time.monotonic()
    ns.stop()
    assert time.monotonic() - t0 < 10


def test_leftover_temporaries_of_an_interrupted_save_are_removed_on_the_next(tmp_path):
    from megaloc_ros.io.files import atomic_write
    target = tmp_path / "office.map"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited
    stale = tmp_path / f".office.map.{dead}.abcd1234.tmp"
    stale.write_bytes(b"x" * 100)
    with atomic_write(target) as f:
        f.write(b"map")
    assert target.read_bytes() == b"map" and not stale.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["office.map"]
    with pytest.raises(IsADirectoryError):
        with atomic_write(tmp_path) as f:
            f.write(b"no")
