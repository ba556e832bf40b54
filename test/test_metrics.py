"""Metrics and ground truth on small hand-checked cases (expected values worked out by hand)."""
from __future__ import annotations

import numpy as np
import pytest

from megaloc_ros.errors import MegalocError
from megaloc_ros.evaluation import ground_truth as G
from megaloc_ros.io.trajectory import Trajectory, read_trajectory, write_trajectory_tum
from megaloc_ros.transforms import matrix_to_quaternion, quaternion_to_matrix
from megaloc_ros.evaluation import metrics as M

S = 1_000_000_000


def _gt(n, pairs):
    g = np.zeros((n, n), bool)
    for a, b in pairs:
        g[a, b] = g[b, a] = True
    return g


# 5 frames at 1 Hz, exclusion 2 s. Same place: 3~0, 4~1, 4~3 (4~3 is only 1 s apart: not valid).
STAMPS = np.arange(5) * S
GT = _gt(5, [(3, 0), (4, 1), (4, 3)])


def test_valid_pairs_and_recall_denominator():
    v = G.valid_pairs(GT, STAMPS, 2.0)
    assert set(zip(*np.nonzero(v))) == {(3, 0), (4, 1)}
    assert G.has_true_match(GT, STAMPS, 2.0).tolist() == [False, False, False, True, True]
    # both valid pairs are exactly 3 s apart: kept at 3 s, dropped at 3.5 s
    assert G.has_true_match(GT, STAMPS, 3.5).tolist() == [False] * 5
    assert G.has_true_match(GT, STAMPS, 3.0).tolist() == [False, False, False, True, True]


def test_pr_curve_poor_detector_by_hand():
    retrieved = [[], [], [(0, 0.9)], [(0, 0.8), (1, 0.5)], [(2, 0.7), (1, 0.6)]]
    m, curves = M.summarize(retrieved, [], [[]] * 5, GT, STAMPS, 2.0)
    c = curves["retrieval"]
    # predictions by score: 0.9 false (2->0), 0.8 true (3->0), 0.7 false (4->2); 2 positives
    assert c.thresholds.tolist() == [0.9, 0.8, 0.7]
    assert c.tp.tolist() == [0, 1, 1] and c.fp.tolist() == [1, 1, 2]
    assert np.allclose(c.precision, [0.0, 0.5, 1 / 3])
    assert np.allclose(c.recall, [0.0, 0.5, 0.5])
    # trapezoids from (0, p0): 0 + 0.5 * (0 + 0.5) / 2 + 0 = 0.125
    assert m["retrieval"]["auc"] == pytest.approx(0.125)
    assert m["retrieval"]["max_recall_at_100_precision"] == 0.0
    assert m["retrieval"]["threshold_at_100_precision"] is None
    # recall@1: 3 hit, 4 miss (best is 2); recall@5: 4 also has 1 -> 1.0
    assert m["retrieval"]["recall@1"] == 0.5
    assert m["retrieval"]["recall@5"] == 1.0
    assert m["n_positive"] == 2 and m["gt_pairs"] == 3
    # nothing accepted by a verifier
    assert m["verified"]["auc"] == 0.0 and m["verified"]["recall@1"] == 0.0


def test_pr_curve_good_detector_and_verification_by_hand():
    retrieved = [[], [], [(0, 0.3)], [(0, 0.8)], [(1, 0.9), (2, 0.85)]]
    published = [[], [], [], [(0, 0.8)], [(1, 0.9), (2, 0.85)]]
    accepted = [[], [], [], [(0, 0.8)], [(1, 0.9)]]
    m, curves = M.summarize(retrieved, published, accepted, GT, STAMPS, 2.0)
    c = curves["retrieval"]
    # 0.9 T, 0.8 T, 0.3 F -> (R .5, P 1), (R 1, P 1), (R 1, P 2/3); area from (0, 1) = 1
    assert np.allclose(c.recall, [0.5, 1.0, 1.0]) and np.allclose(c.precision, [1, 1, 2 / 3])
    assert m["retrieval"]["auc"] == pytest.approx(1.0)
    assert m["retrieval"]["max_recall_at_100_precision"] == 1.0
    assert m["retrieval"]["threshold_at_100_precision"] == pytest.approx(0.8)
    assert m["published"] == {"loops": 3, "true_loops": 2, "false_loops": 1,
                              "precision": pytest.approx(2 / 3), "recall": 1.0,
                              "queries_with_true_loop": 2, "n_positive": 2}
    v = m["verified"]
    assert v["operating_point"]["precision"] == 1.0 and v["operating_point"]["false_loops"] == 0
    assert v["max_recall_at_100_precision"] == 1.0 and v["auc"] == pytest.approx(1.0)


def test_ties_form_one_point_and_match_inside_exclusion_is_false():
    # 4 -> 3 is a same-place pair but only 1 s old: a detector must not report it.
    retrieved = [[], [], [], [(0, 0.5)], [(3, 0.5)]]
    c = M.summarize(retrieved, [], [[]] * 5, GT, STAMPS, 2.0)[1]["retrieval"]
    assert c.thresholds.tolist() == [0.5]
    assert c.tp.tolist() == [1] and c.fp.tolist() == [1]
    assert c.recall.tolist() == [0.5] and c.precision.tolist() == [0.5]


def test_pr_curve_matches_brute_force_threshold_sweep():
    rng = np.random.default_rng(0)
    q = 200
    scores = np.round(rng.uniform(0, 1, q), 2)          # rounded: many ties
    scores[rng.uniform(size=q) < 0.1] = -np.inf         # some queries predict nothing
    correct = rng.uniform(size=q) < 0.6
    n_pos = 150
    c = M.pr_curve(scores, correct, n_pos)
    for t, p, r in zip(c.thresholds, c.precision, c.recall):
        pos = scores >= t
        tp = np.sum(pos & correct)
        assert p == pytest.approx(tp / pos.sum())
        assert r == pytest.approx(tp / n_pos)
    assert len(c.thresholds) == len(np.unique(scores[np.isfinite(scores)]))
    # AUC by explicit trapezoids
    rr = [0.0] + list(c.recall)
    pp = [c.precision[0]] + list(c.precision)
    area = sum((rr[i + 1] - rr[i]) * (pp[i + 1] + pp[i]) / 2 for i in range(len(rr) - 1))
    assert c.auc == pytest.approx(area)


def test_latency_summary():
    s = M.latency_summary({"encode": list(range(1, 101)), "verify": []})
    assert s["encode"]["median_ms"] == 50.5
    assert s["encode"]["p99_ms"] == pytest.approx(99.01)  # 1 + 0.99 * 99 = position 99.01
    assert s["encode"]["n"] == 100 and "verify" not in s


def test_gt_from_positions_by_hand():
    # a square loop: 0 (0,0) 1 (5,0) 2 (5,5) 3 (0,5) 4 (0.5,0.5) 5 (5.2,0)
    pos = np.array([[0, 0, 0], [5, 0, 0], [5, 5, 0], [0, 5, 0], [0.5, 0.5, 0], [5.2, 0, 0]], float)
    t = np.array([0, 10, 20, 30, 40, 41]) * S
    gt = G.gt_from_positions(pos, t, distance_m=1.0, exclude_s=5.0)
    assert set(zip(*np.nonzero(np.triu(gt)))) == {(0, 4), (1, 5)}
    assert np.array_equal(gt, gt.T) and not gt.diagonal().any()
    # frames without a pose have no loops
    gt = G.gt_from_positions(pos, t, 1.0, 5.0, valid=np.array([1, 1, 1, 1, 0, 1], bool))
    assert set(zip(*np.nonzero(np.triu(gt)))) == {(1, 5)}


def test_trajectory_interpolation_and_gaps():
    poses = np.tile(np.eye(4), (3, 1, 1))
    poses[:, 0, 3] = [0.0, 1.0, 10.0]
    tr = Trajectory(np.array([0, 1, 5]) * S, poses)
    at, ok = tr.at(np.array([0.25 * S, 1 * S, 3 * S, 5.2 * S, 9 * S]).astype(np.int64), max_gap_s=0.5)
    assert ok.tolist() == [True, True, False, True, False]
    assert at[0, 0, 3] == pytest.approx(0.25) and at[1, 0, 3] == pytest.approx(1.0)
    assert at[3, 0, 3] == pytest.approx(10.0)


def test_quaternions_round_trip():
    rng = np.random.default_rng(1)
    for _ in range(20):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        q = -q if q[3] < 0 else q
        r = quaternion_to_matrix(*q)
        assert np.allclose(r @ r.T, np.eye(3)) and np.linalg.det(r) == pytest.approx(1.0)
        assert np.allclose(matrix_to_quaternion(r), q)
    # 90 degrees about z maps x to y
    r = quaternion_to_matrix(0, 0, np.sqrt(0.5), np.sqrt(0.5))
    assert np.allclose(r @ [1, 0, 0], [0, 1, 0])


def test_trajectory_files(tmp_path):
    tum = tmp_path / "t.txt"
    tum.write_text("# t x y z qx qy qz qw\n2.0 1 2 3 0 0 0 1\n1.0 0 0 0 0 0 0.7071068 0.7071068\n")
    tr = read_trajectory(tum)
    assert tr.stamps_ns.tolist() == [1 * S, 2 * S]  # sorted
    assert np.allclose(tr.positions[1], [1, 2, 3])
    out = tmp_path / "o.txt"
    write_trajectory_tum(out, tr)
    tr2 = read_trajectory(out)
    assert np.allclose(tr2.poses, tr.poses, atol=1e-6) and (tr2.stamps_ns == tr.stamps_ns).all()
    kitti = tmp_path / "k.txt"
    kitti.write_text("1 0 0 5 0 1 0 6 0 0 1 7\n1 0 0 8 0 1 0 9 0 0 1 10\n")
    tr = read_trajectory(kitti, frame_stamps_ns=[0, S])
    assert np.allclose(tr.positions, [[5, 6, 7], [8, 9, 10]])
    with pytest.raises(MegalocError, match="KITTI trajectory .* 2 poses"):
        read_trajectory(kitti, frame_stamps_ns=[0])
    bad = tmp_path / "b.txt"
    bad.write_text("1 2 3\n")
    with pytest.raises(MegalocError, match="TUM"):
        read_trajectory(bad)


def test_gt_matrix_files(tmp_path, rtabmap_seq, corridor_seq):
    import cv2
    g = G.read_gt_matrix("data/rtabmap/ground_truth.bmp", 84)
    assert np.array_equal(g, rtabmap_seq.gt)
    m = np.zeros((4, 4), np.uint8)
    m[2, 0] = 1
    np.save(tmp_path / "m.npy", m)
    np.savetxt(tmp_path / "m.csv", m, fmt="%d", delimiter=",")
    np.savetxt(tmp_path / "m.txt", m, fmt="%d")
    cv2.imwrite(str(tmp_path / "m.png"), m * 255)
    for name in ("m.npy", "m.csv", "m.txt", "m.png"):
        g = G.read_gt_matrix(tmp_path / name, 4)
        assert set(zip(*np.nonzero(g))) == {(2, 0), (0, 2)}, name
    with pytest.raises(MegalocError, match="4x4 but the bag has 5 frames"):
        G.read_gt_matrix(tmp_path / "m.npy", 5)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))  # an object array: needs pickle to read
    with pytest.raises(MegalocError, match="not a plain .npy"):
        G.read_gt_matrix(tmp_path / "obj.npy", 1)
    # the VPR-Bench table shipped with the corridor set: references first, then queries
    g = G.read_gt_matrix("data/corridor/ground_truth.csv", len(corridor_seq))
    assert np.array_equal(g, corridor_seq.gt)


def test_operating_point_without_loops_has_no_precision():
    v = G.valid_pairs(GT, STAMPS, 2.0)
    op = M.operating_point([[] for _ in range(5)], v)
    assert op["loops"] == 0 and op["precision"] is None and op["recall"] == 0.0
    op = M.operating_point([[], [], [], [(0, 0.9)], [(2, 0.8)]], v)
    assert (op["precision"], op["recall"]) == (0.5, 0.5)


def test_loops_on_unlabelled_pairs_are_neither_true_nor_false():
    v = G.valid_pairs(GT, STAMPS, 2.0)
    labeled = np.ones((5, 5), bool)
    labeled[4, 2] = labeled[2, 4] = False      # e.g. two frames of one traversal of a VPR set
    pub = [[], [], [], [(0, 0.9)], [(2, 0.8)]]
    op = M.operating_point(pub, v, labeled)
    assert (op["loops"], op["false_loops"], op["unlabeled_loops"], op["precision"]) == (1, 0, 1, 1.0)
    assert M.operating_point(pub, v)["false_loops"] == 1
    # the curve drops the unlabelled prediction: only query 3's is scored
    c = M.curve_from_matches(pub, v, labeled)
    assert c.fp.tolist() == [0] and M.curve_from_matches(pub, v).fp.max() == 1


def test_unreachable_names_the_setting_by_hand():
    """10 frames at 1 Hz: 0-4 seen again as 5-9 (true matches 5~0 ... 9~4, 5 s apart)."""
    n = 10
    stamps = np.arange(n) * S
    gt = _gt(n, [(i + 5, i) for i in range(5)])
    v = G.valid_pairs(gt, stamps, 2.0)
    every = list(range(n))  # every frame a keyframe, ids = frame indices
    u = M.unreachable(v, every, stamps, exclude_recent_s=2.0, exclude_recent_keyframes=0)
    assert u["n"] == 0 and u["max_recall"] == 1.0 and u["n_positive"] == u["n_positive_keyframes"] == 5
    # the keyframe window reaches 5 keyframes back (inclusive): every match hidden
    u = M.unreachable(v, every, stamps, 2.0, 5)
    assert u["by_setting"] == {"detector.exclude_recent_keyframes=5": 5} and u["max_recall"] == 0.0
    assert u["frames"]["detector.exclude_recent_keyframes=5"] == [5, 6, 7, 8, 9]
    assert M.unreachable(v, every, stamps, 2.0, 4)["n"] == 0
    # the time window is inclusive too: 5 s excludes keyframes exactly 5 s old
    u = M.unreachable(v, every, stamps, 5.0, 0)
    assert u["by_setting"] == {"detector.exclude_recent_s=5": 5}
    assert M.unreachable(v, every, stamps, 4.9, 0)["n"] == 0
    both = M.unreachable(v, every, stamps, 5.0, 5)
    assert list(both["by_setting"]) == ["detector.exclude_recent_keyframes=5 and detector.exclude_recent_s=5 "
                                        "(each hides every true match)"]
    # keyframe selection: 6 is not a keyframe, 2 (the match of 7) is not either; ids skip them
    ids = [0, 1, None, 2, 3, 4, None, 5, 6, 7]
    u = M.unreachable(v, ids, stamps, 2.0, 0)
    assert u["n"] == 2 and u["n_positive_keyframes"] == 4 and u["max_recall"] == pytest.approx(0.6)
    assert u["frames"] == {M.KEYFRAME_SELECTION + ": the frame was not a keyframe": [6],
                           M.KEYFRAME_SELECTION + ": none of its true matches was a keyframe": [7]}
    # frames that could not be decoded are named as such, as query or as the only match
    ids = [0, 1, None, 2, 3, 4, None, 5, 6, 7]
    u = M.unreachable(v, ids, stamps, 2.0, 0, skipped={2, 6})
    assert u["frames"] == {"the frame could not be decoded (skipped)": [6],
                           "its true matches could not be decoded (skipped)": [7]}
    # a query with two true matches is hidden only when both are
    gt2 = _gt(n, [(9, 0), (9, 6)])
    v2 = G.valid_pairs(gt2, stamps, 2.0)
    assert M.unreachable(v2, every, stamps, 3.0, 5)["n"] == 0  # 6 is hidden, 0 is not
    assert M.unreachable(v2, every, stamps, 3.0, 9)["by_setting"] == {"detector.exclude_recent_keyframes=9": 1}
    assert M.frame_ranges([9, 3, 4, 5, 7, 11, 12]) == "3-5, 7, 9, 11-12" and M.frame_ranges([]) == ""


def test_no_true_loop_means_no_recall_not_zero():
    """A ground truth without a findable loop: recall, AUC and recall@K are undefined (None),
    precision is still counted per published loop."""
    gt = _gt(5, [(4, 3)])  # only 1 s apart: not a loop at 2 s exclusion
    retrieved = [[], [(0, 0.9)], [(0, 0.8)], [(1, 0.7)], [(3, 0.95)]]
    m, curves = M.summarize(retrieved, retrieved, [[]] * 5, gt, STAMPS, 2.0)
    assert m["n_positive"] == 0
    for name in ("retrieval", "verified"):
        assert m[name]["auc"] is None and m[name]["max_recall_at_100_precision"] is None
        assert m[name]["recall@1"] is None and m[name]["recall@5"] is None
    assert m["published"]["recall"] is None and m["published"]["precision"] == 0.0
    assert m["verified"]["operating_point"]["precision"] is None
