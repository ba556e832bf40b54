"""Several robots, one map: inter-robot loop closures over DDS (megaloc_ros/fleet.py,
megaloc_ros/ros/fleet_replay.py).

The slow tests run the fleet replay: the rtabmap sequence split between two robots (frames 1-40
robot_a, 41-84 robot_b), each robot's loop_closure_node + verifier_node in its own process, the
keyframes shared on one fleet topic over real Fast DDS, the verification data fetched from the
owner's ~/keyframe_data service; the inter-robot loops are scored against the ground truth and
compared with the loops one robot verifies on the whole sequence.
"""
from __future__ import annotations

import numpy as np
import pytest

from megaloc_ros import fleet
from megaloc_ros.verification.geometry import Camera


# ----------------------------------------------------------------------------- no ROS

def test_descriptor_codes_are_compact_and_keep_the_cosine():
    rng = np.random.default_rng(0)
    for dim in (384, 8448):
        d = rng.standard_normal(dim).astype(np.float32)
        d /= np.linalg.norm(d)
        other = d + 0.5 * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
        other /= np.linalg.norm(other)
        data, scale = fleet.encode_descriptor(d, "int8")
        assert len(data) == dim                        # vs 4 * dim for the raw float32
        back = fleet.decode_descriptor(data, "int8", scale, dim)
        assert abs(float(back @ other) - float(d @ other)) < 2e-3
        data16, s16 = fleet.encode_descriptor(d, "float16")
        assert len(data16) == 2 * dim
        assert abs(float(fleet.decode_descriptor(data16, "float16", s16, dim) @ d) - 1.0) < 1e-4
    with pytest.raises(Exception, match="values"):
        fleet.decode_descriptor(data, "int8", scale, dim + 1)


def test_robot_sessions_are_the_same_everywhere_and_distinct():
    assert fleet.robot_session("robot_a") == fleet.robot_session("robot_a")
    assert fleet.robot_session("robot_a") != fleet.robot_session("robot_b")
    assert 0 <= fleet.robot_session("robot_a") < 2**31
    assert fleet.robot_name("/robot_a/") == "robot_a" and fleet.robot_name("/", "") == "robot"


def test_peer_table_round_trip():
    t = fleet.PeerTable()
    t.add(7, fleet.PeerKeyframe("robot_b", "m1", 3, 11, "/robot_b/verifier_node/keyframe_data"))
    t.add(9, fleet.PeerKeyframe("robot_b", "m1", 4, 11, "/robot_b/verifier_node/keyframe_data"))
    back = fleet.PeerTable.from_extra(t.to_extra())
    assert back.local_id("robot_b", "m1", 4) == 9 and back.local_id("robot_b", "m2", 4) is None
    assert back.peer(7).remote_id == 3 and back.robots() == {11: "robot_b"}


def test_a_peer_frozen_between_two_frames_is_not_taken_for_idle():
    """A camera at 1 Hz leaves its robot idle between frames, so its status can say "idle 0.3 s"
    just before the robot freezes (a loaded machine; the fleet replay's --stall). Nothing more comes:
    that is silence (stopped only after the peer timeout), not idleness. Before, robot_a counted
    idle from that status and, 5 s into a 7 s freeze, verified its deferred queries against the
    end of robot_b's map: 4-5 near misses in 2 of 4 replays (test_two_robots_find_the_inter_robot_loops_one_robot_finds).
    Waking, the peer is idle only once its statuses have said so for settle_s on our clock."""
    S = 10**9
    st = fleet.PeerStatus
    f = fleet.Frontiers(settle_keyframes=3, settle_s=5.0, peer_timeout_s=10.0)
    for k in range(10):
        f.on_keyframe(2, 100 + k, k, 0.0)
    f.defer(2, "q")
    f.on_status(2, st(9 * S, 0.3, 9, 9 * S), 0.5)   # between two frames, then frozen
    for t in (5.5, 6.0, 9.9):
        assert f.settled(t) == [] and f.at_frontier(2, 109, t)
    f.on_status(2, st(9 * S, 7.3, 9, 9 * S), 7.5)   # wakes: "idle 7.3 s" (its player froze too)
    assert f.settled(7.5) == [] and f.settled(12.4) == []
    for t in range(8, 13):
        f.on_status(2, st(9 * S, 7.3 + t - 7.5, 9, 9 * S), float(t) + 0.5)
    assert f.settled(12.5) == [(2, "q", "idle")]
    g = fleet.Frontiers(settle_keyframes=3, settle_s=5.0, peer_timeout_s=10.0)
    g.on_keyframe(2, 100, 0, 0.0)
    g.defer(2, "q")
    g.on_status(2, st(0, 0.3, 0, 0), 0.5)
    assert g.settled(10.4) == [] and g.settled(10.6) == [(2, "q", "silent")]


def test_a_query_waits_while_the_peer_is_on_its_way_and_not_when_it_stopped():
    """fleet.Frontiers: robot B (session 2) maps keyframes 0..9 (local ids 100..109, stamps 1 s
    apart). A query that retrieves one of B's newest 2n waits while B is moving on, however
    slowly; it is asked again after n more keyframes, or once B stopped: idle for settle_s by
    our clock, staying settle_s of its camera time past its newest keyframe, or silent for the
    peer timeout; idle or staying only once we hold every keyframe its status counts."""
    S = 10**9
    st = fleet.PeerStatus

    def mapped(n=10):
        f = fleet.Frontiers(settle_keyframes=3, settle_s=5.0, peer_timeout_s=30.0)
        for k in range(n):
            f.on_keyframe(2, 100 + k, k, 0.0)
        return f

    f = mapped()
    assert f.at_frontier(2, 109, 0.0) and f.at_frontier(2, 104, 0.0)   # the newest 2n = 6: 104..109
    assert not f.at_frontier(2, 103, 0.0) and not f.at_frontier(7, 109, 0.0)
    f.defer(2, "q35")
    # slow: a frame waits for 20 s (its statuses say busy), no keyframe: still waiting
    for t in range(1, 21):
        f.on_status(2, st(10 * S, 0.0, 9, 9 * S), float(t))
        assert f.settled(float(t)) == []
    for k in range(3):                               # n = 3 more keyframes: asked again
        assert f.settled(21.0 + k) == []
        f.on_keyframe(2, 110 + k, 10 + k, 21.0 + k)
    assert f.settled(23.0) == [(2, "q35", "keyframes")] and f.pending() == 0

    f = mapped()
    f.defer(2, "q")
    for t in range(1, 6):                            # frozen, then says "idle 12.5 s" on waking:
        f.on_status(2, st(9 * S, 11.5 + t, 9, 9 * S), float(t))
    assert f.settled(5.9) == []                      # idle counts from when we heard it
    f.on_status(2, st(9 * S, 17.5, 9, 9 * S), 6.0)
    assert f.settled(6.0) == [(2, "q", "idle")]
    f.defer(2, "q")
    f.on_keyframe(2, 110, 10, 7.0)                   # moving again
    assert f.at_frontier(2, 110, 7.0) and f.settled(7.0) == []

    f = mapped()
    f.defer(2, "q")
    f.on_status(2, st(13 * S, 0.0, 9, 9 * S), 1.0)   # processing frames, 4 s past its keyframe 9
    assert f.settled(1.0) == []
    f.on_status(2, st(14 * S, 0.0, 9, 9 * S), 2.0)   # 5 s: it stays where it is
    assert f.settled(2.0) == [(2, "q", "staying")] and not f.at_frontier(2, 109, 2.0)

    f = mapped()                                      # its status comes before its last keyframes:
    f.defer(2, "q")
    f.on_status(2, st(20 * S, 0.0, 12, 12 * S), 1.0)  # it says 12 and 8 s past; we hold up to 9
    f.on_status(2, st(20 * S, 30.0, 12, 12 * S), 1.0)
    assert f.settled(10.0) == []                     # neither staying nor idle: 10-12 in flight
    f.on_keyframe(2, 110, 10, 10.0)
    f.on_keyframe(2, 111, 12, 10.0)                  # (11 was no keyframe of its; ids are its own)
    f.on_status(2, st(20 * S, 30.0, 12, 12 * S), 10.0)
    assert f.settled(10.0) == [(2, "q", "staying")]

    f = mapped()
    f.defer(2, "q")
    assert f.settled(29.9) == [] and f.settled(30.1) == [(2, "q", "silent")]   # gone
    f.reset([(2, 5), (2, 6)])
    assert f.keyframe_count(2) == 2 and f.pending() == 0
    assert not f.at_frontier(2, 6, 0.0)              # a loaded map's peer, not heard: not moving
    off = fleet.Frontiers(0, 5.0, 30.0)
    off.on_keyframe(2, 1, 0, 0.0)
    assert not off.at_frontier(2, 1, 0.0)


def test_robots_crossing_at_one_place_get_asked_again():
    """fleet.RecentQueries: robot A asked keyframe 7 (top-5 lowest score 0.6) before robot B's
    keyframe of the same place arrived (local id 9). B's keyframe, if like 7, defers 7 for B
    once; after the window, or for a keyframe that is not like it, nothing."""
    from megaloc_ros.types import Candidate, Keyframe
    rng = np.random.default_rng(3)

    def unit(v):
        return (v / np.linalg.norm(v)).astype(np.float32)
    place, elsewhere = unit(rng.normal(size=64)), unit(rng.normal(size=64))
    near = unit(place + 0.2 * unit(rng.normal(size=64)))
    r = fleet.RecentQueries(window_s=5.0)
    full = [Candidate(Keyframe(7, 0, 1), Keyframe(i, 0, 1), sc, i)
            for i, sc in enumerate((0.9, 0.8, 0.7, 0.65, 0.6))]
    q = fleet.Query.from_retrieval(Keyframe(7, 0, 1), place, "m", full, top_k=5, similarity_threshold=0.75)
    assert q.kth_score == pytest.approx(0.6)                   # its top-5 was full: the 5th
    assert fleet.Query.from_retrieval(Keyframe(7, 0, 1), place, "m", full[:2], 5, 0.75).kth_score == 0.75
    r.add(q, now=100.0)
    assert r.crossed(2, 8, elsewhere, 101.0) == []            # not a candidate it would have had
    assert r.crossed(2, 9, near, 101.0) == [q] and q.waiting == {2}
    assert r.crossed(2, 10, near, 101.5) == []                 # already waiting for B
    assert r.crossed(1, 11, near, 101.5) == []                 # its own robot: not a peer
    assert r.crossed(3, 6, near, 101.5) == []                  # arrived before 7 was asked
    assert r.crossed(3, 12, near, 106.0) == []                 # 6 s later: out of the window
    # asked again, it gets only the keyframes of B it was not verified against
    q.note_asked(2, [4, 5])
    hits = [(Keyframe(i, 0, 2), 0.9 - 0.01 * i) for i in (4, 9, 5, 10)]
    assert [m.id for m, _ in q.not_asked(2, hits)] == [9, 10]
    assert q.not_asked(3, hits) == hits


def test_verifier_entry_export_import(rtabmap_seq):
    """A keyframe's verification data moved to another verifier verifies the same loop."""
    from megaloc_ros.encoding.loader import load_encoder
    from megaloc_ros.types import Candidate, Keyframe
    from megaloc_ros.verification.verifier import Verifier, VerifierParams
    enc = load_encoder()
    vp = VerifierParams(consistency_window=0)  # one query on its own: the pair decision
    owner, other = Verifier(vp, backbone=enc.model_name), Verifier(vp, backbone=enc.model_name)
    kf = {i: Keyframe(i, i * 10**9, 0, "camera") for i in (3, 42)}
    for i, v in ((3, owner), (42, other)):
        img = rtabmap_seq.load_rgb(i)
        v.add_keyframe(kf[i], img, enc.encode([img])[0])
    data = fleet.export_entry(owner, 3)
    with pytest.raises(KeyError):
        fleet.export_entry(owner, 42)
    note = fleet.import_entry(other, 100, data)
    assert "SuperSegments" in note
    loop = other.verify([Candidate(kf[42], Keyframe(100, 3 * 10**9, 1, "camera"), 0.9, 0)])[0]
    assert loop.accepted, loop.reason          # frames 43 and 4 (1-based) are a ground-truth loop
    assert rtabmap_seq.gt[42, 3]


def test_a_peer_keyframe_keeps_its_own_camera(tmp_path):
    """Robots of one fleet need not share a camera: the synthetic two-view scene, the match seen
    by robot A's wide-angle camera (another focal length, principal point and a plumb_bob lens),
    the query by robot B's. The entry carries A's camera across, so B recovers the rotation; read
    with B's own camera, the same matches give a wrong one. B's saved state keeps A's camera."""
    import cv2
    from test_geometry import K, WIDE, _distort, angle_deg, two_view_scene
    from megaloc_ros.verification import geometry
    from megaloc_ros.verification.verifier import Verifier, VerifierParams, _Entry
    K_a = np.array([[380.0, 0, 300], [0, 380.0, 250], [0, 0, 1]])
    lens_a = geometry.Distortion("plumb_bob", WIDE["plumb_bob"])

    def through(lf, K_to):  # the scene's pinhole keypoints (intrinsics K) as a camera K_to sees them
        x = cv2.undistortPoints(lf.keypoints.reshape(-1, 1, 2).astype(np.float64), K, None).reshape(-1, 2)
        return geometry.LocalFeatures((np.c_[x, np.ones(len(x))] @ K_to.T)[:, :2].astype(np.float32),
                                      lf.descriptors, lf.image_size)

    q, m, R, _ = two_view_scene()
    robot_a = Verifier(VerifierParams(), Camera(K_a, (640, 480), lens_a))
    robot_b = Verifier(VerifierParams(), Camera(K, (640, 480)))
    robot_a._entries[7] = _Entry((640, 480), _distort(through(m, K_a), lens_a, K_a))
    robot_b._entries[1] = _Entry((640, 480), q)
    fleet.import_entry(robot_b, 1007, fleet.export_entry(robot_a, 7))
    peer = robot_b._entries[1007]
    assert peer.camera == Camera(K_a, (640, 480), lens_a)
    chk = robot_b.check_geometry(robot_b._entries[1], peer).check
    assert chk.inliers >= 130 and angle_deg(chk.pose.rotation, R) < 0.5     # measured 144, 0.08 deg
    peer.camera = None  # read with B's camera
    wrong = robot_b.check_geometry(robot_b._entries[1], peer).check
    assert wrong.pose is None or angle_deg(wrong.pose.rotation, R) > 3.0   # measured 123, 20.0 deg
    peer.camera = Camera(K_a, (640, 480), lens_a)
    robot_b.save(tmp_path / "b.verifier")
    back = Verifier.load(tmp_path / "b.verifier")
    assert back._entries[1].camera is None and back._entries[1007].camera == Camera(K_a, (640, 480), lens_a)


# ----------------------------------------------------------------------------- the fleet over DDS

@pytest.fixture(scope="module")
def baseline():
    from megaloc_ros.ros.fleet_replay import baseline_loops
    return baseline_loops(40)


def _run(mode, tmp_path, baseline, stall=0.0):
    pytest.importorskip("rclpy")
    from megaloc_ros.ros.fleet_replay import run_fleet, score, summary
    out = run_fleet(mode, 40, str(tmp_path / mode), baseline=False, quiet=True, stall=stall)
    out["baseline"] = baseline
    out["score"] = score(out["robots"], baseline, 40)
    print(summary(out))
    return out


@pytest.mark.slow
@pytest.mark.ros
def test_two_robots_find_the_inter_robot_loops_one_robot_finds(tmp_path, baseline):
    """Both robots at once, robot_b frozen for 7 s on its way (SIGSTOP, as a loaded machine can
    stall a process): robot_a must not take it for stopped and accept near misses at the end of
    its map (with the rule this replaced, "no keyframe for 5 s", such freezes gave 5 false loops)."""
    out = _run("concurrent", tmp_path, baseline, stall=7.0)
    s = out["score"]
    assert s["baseline_false"] == 0 and len(s["baseline_frames"]) >= 30
    assert s["false"] == 0, s["false_loops"]
    # measured 0.944-1.0 (34-36 of 36 frames) in six runs with the stall: a frame taken at the
    # same moment as the peer's at that place can miss its loop (README)
    assert s["ratio"] >= 0.85, s
    assert sum(r["loop_closure_stats"].get("fleet_settled_keyframes", 0) for r in out["robots"]) > 0
    # compact: 384-D offline descriptor in 384 B (int8) + metadata, vs 1536 B raw float32
    assert s["descriptor_bytes"] == 384 and s["bytes_per_shared_keyframe"] < 4 * 384
    assert s["requests_timed_out"] == 0 and s["keyframes_fetched"] > 0
    # data is fetched only for keyframes that became candidates, not for every shared one
    assert s["keyframes_fetched"] <= s["keyframes_shared"]
    for r in out["robots"]:
        assert r["peer_keyframes"] > 0
        # a loop withheld, then confirmed by a peer keyframe verified later, is one candidate
        # verified (not two), rejected at first and accepted late
        vs = r["verifier_stats"]
        assert (vs.get("loops_accepted", 0) + vs.get("loops_rejected", 0)
                == vs["candidates_verified"] + vs.get("loops_confirmed_late", 0)), vs
        assert r["loop_closure_stats"]["fleet_keyframes_inserted"] == r["peer_keyframes"]
    # each robot's saved map holds its peer's keyframes, as the peer's session, with their origin
    from megaloc_ros.mapping.place_map import PlaceMap
    a, b = out["robots"]
    pm = PlaceMap.load(tmp_path / "concurrent" / "robot_a.map")
    sessions = {kf.session for kf in pm.keyframes()}
    assert sessions == {a["session"], b["session"]}
    table = fleet.PeerTable.from_extra(pm.extras[fleet.PeerTable.EXTRA])
    assert len(table) == a["peer_keyframes"] and set(table.robots().values()) == {"robot_b"}
    # restarted on its saved map, robot_a's verifier learns every peer keyframe again (DDS,
    # transient-local) and holds the verification data it fetched before
    import time
    from megaloc_ros.ros.runner import NodeSet
    params = {"map_path": str(tmp_path / "concurrent" / "robot_a.map"), "fleet_topic": "/megaloc_fleet_restart/kf",
              "save_map_on_shutdown": False}
    with NodeSet(params, namespace="/robot_a", domain_id=231) as nodes:
        lc, vn = nodes.loop_closure, nodes.verifier
        assert len(lc.peers) == len(table) and lc.session == a["session"]
        deadline = time.monotonic() + 20
        while len(vn._peers) < len(table) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(vn._peers) == [lid for lid, _ in table.items()]
        fetched = [lid for lid, _ in table.items() if lid in vn.verifier]
        assert len(fetched) == a["verifier_stats"]["fleet_keyframes_fetched"] > 0


@pytest.mark.slow
@pytest.mark.ros
def test_a_robot_started_after_the_other_finished_gets_the_backlog(tmp_path, baseline):
    out = _run("late", tmp_path, baseline)
    s = out["score"]
    a = out["robots"][0]
    assert out["backlog"]["inserted"] == a["loop_closure_stats"]["fleet_keyframes_sent"] > 0
    assert s["false"] == 0, s["false_loops"]
    assert s["ratio"] >= 0.90, s


@pytest.mark.slow
@pytest.mark.ros
def test_a_robot_that_disappears_does_not_stall_the_other(tmp_path, baseline):
    out = _run("owner-gone", tmp_path, baseline)
    (b,) = out["robots"]                       # robot_a was killed before robot_b played
    vs = b["verifier_stats"]
    assert vs.get("fleet_requests_timed_out", 0) > 0
    assert b["loop_closure_stats"]["frames_processed"] == 44
    assert out["score"]["false"] == 0
    # no verification data came, so no inter-robot loop could be verified; robot_b's own loops still are
    assert out["score"]["inter_robot_loops"] == 0
