"""Camera frames published by another process reach a subscriber with the node's default QoS.

Runs `megaloc-ros bench qos`'s core (``measure``: publisher and subscriber in two processes,
private domain, ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST) with loop_closure_node's defaults
(``image_qos`` / ``image_qos_depth`` from LoopClosureNodeSettings) on 640x480 rgb8 real frames at
30 Hz, and checks that the measurement sees losses when there are some: a subscriber that
spends 0.2 s per frame with best-effort depth 1 cannot take 30 Hz.
"""
from __future__ import annotations

import pytest

from megaloc_ros.bench import qos
from megaloc_ros.ros.params import LoopClosureNodeSettings

pytestmark = [pytest.mark.slow, pytest.mark.ros]


def test_default_qos_delivers_every_frame_across_processes():
    s = LoopClosureNodeSettings()
    r = qos.measure(qos.node_choice(s.image_qos, s.image_qos_depth), frames=90, rate=30.0, timeout=60.0)
    assert r["sent"] == 90 and r["bytes"] == 640 * 480 * 3
    assert r["publish_rate_hz"] > 25.0, r
    assert r["ratio"] >= 0.99, f"default camera QoS {s.image_qos} depth {s.image_qos_depth} lost frames: {r}"


def test_measurement_counts_losses():
    """JPEG frames are small enough for best effort (the bench delivers them all), so what is lost
    here is what the slow subscriber's depth-1 history overwrote."""
    slow = qos.Choice("slow", "jpeg best effort depth 1, 0.2 s per frame", "compressed", "best_effort", 1, False)
    r = qos.measure(slow, frames=45, rate=30.0, work_s=0.2, timeout=60.0)
    assert r["sent"] == 45
    assert 0 < r["received"] < 0.5 * r["sent"], r
    assert r["lost"] == r["sent"] - r["received"]
    assert r["ratio"] == pytest.approx(r["received"] / r["sent"])
