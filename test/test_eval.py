"""`megaloc-ros eval` on bags made from the shipped real sequences, checked against an independent
brute-force computation over the same descriptors, plus the one-line errors on bad input.

The encoder's outputs for the shipped images are computed once with the real encoder and cached
on disk (``encode_files``); during the replay a ``FeatureTable`` answers images it has seen from
that table (keyed by their pixels) and asserts that every image of the bag was one of them, so
the bag's decoded pixels are exactly the files' pixels.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from megaloc_ros.io import bag as B
from megaloc_ros import cli
from megaloc_ros import eval_cli
from megaloc_ros.verification.geometry import Camera
from megaloc_ros.errors import MegalocError
from megaloc_ros.evaluation.ground_truth import gt_from_positions
from megaloc_ros.io.trajectory import Trajectory, write_trajectory_tum

ROOT = Path(__file__).resolve().parents[1]
S = 1_000_000_000
# Every frame a keyframe; exclusion by time only (10.5 s: no boundary ties at 1 Hz or 2 Hz).
ALL_FRAMES = ["detector.min_keyframe_interval_s=0", "detector.max_similarity_to_last=1.01",
              "detector.exclude_recent_keyframes=0", "detector.exclude_recent_s=10.5",
              "detector.top_k=5"]


def _key(rgb: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(rgb).tobytes() + str(rgb.shape).encode()).hexdigest()


class FeatureTable:
    """The real encoder, answering already-encoded images from a table (keyed by pixels)."""

    def __init__(self, encoder, sequences_and_features):
        self._enc = encoder
        self.table = {}
        for seq, feats in sequences_and_features:
            for i, f in enumerate(feats):
                self.table[_key(seq.load_rgb(i))] = f
        self.misses = 0

    def encode(self, images):
        out = []
        for im in images:
            f = self.table.get(_key(im))
            if f is None:
                self.misses += 1
                f = self._enc.encode([im])[0]
            out.append(f)
        return out

    def __getattr__(self, name):
        return getattr(self._enc, name)


@pytest.fixture(scope="session")
def features(real_encoder, rtabmap_seq, corridor_seq, rtabmap_features, corridor_features):
    feats = {"rtabmap": rtabmap_features, "corridor": corridor_features}
    table = FeatureTable(real_encoder, [(rtabmap_seq, rtabmap_features), (corridor_seq, corridor_features)])
    return feats, table


def run_eval(argv, encoder, capsys):
    args = cli.build_parser("eval").parse_args(["eval", *argv, "--quiet"])
    assert eval_cli.main(args, encoder=encoder) == 0
    out = capsys.readouterr().out
    return json.loads((Path(args.output) / "metrics.json").read_text()), out


def brute_force(desc: np.ndarray, stamps_ns: np.ndarray, gt: np.ndarray, exclude_s: float, k: int = 5):
    """Independent of the package: exhaustive cosine search over earlier frames older than the
    exclusion, one prediction per query, threshold sweep by explicit loops."""
    n = len(desc)
    sim = desc.astype(np.float64) @ desc.astype(np.float64).T
    tops = []
    for q in range(n):
        ms = [m for m in range(q) if (stamps_ns[q] - stamps_ns[m]) / S >= exclude_s]
        tops.append(sorted(ms, key=lambda m: -sim[q, m])[:k])
    truth = lambda q, m: bool(gt[q, m]) and m < q and (stamps_ns[q] - stamps_ns[m]) / S >= exclude_s
    positives = [q for q in range(n) if any(truth(q, m) for m in range(q))]
    best = [(q, t[0], sim[q, t[0]]) for q, t in enumerate(tops) if t]
    points = []
    for thr in sorted({round(s, 5) for _, _, s in best}, reverse=True):
        sel = [(q, m) for q, m, s in best if round(s, 5) >= thr]
        tp = sum(truth(q, m) for q, m in sel)
        points.append((tp / len(positives), tp / len(sel), len(sel) - tp))
    auc, r0, p0 = 0.0, 0.0, points[0][1]
    for r, p, _ in points:
        auc += (r - r0) * (p + p0) / 2
        r0, p0 = r, p
    return {
        "n_positive": len(positives),
        "auc": auc,
        "max_recall_at_100_precision": max([r for r, _, fp in points if fp == 0], default=0.0),
        "recall@1": sum(any(truth(q, m) for m in tops[q][:1]) for q in positives) / len(positives),
        "recall@5": sum(any(truth(q, m) for m in tops[q][:5]) for q in positives) / len(positives),
    }


def _check(metrics, expected):
    m = metrics["metrics"]
    assert m["n_positive"] == expected["n_positive"]
    for key in ("auc", "max_recall_at_100_precision", "recall@1", "recall@5"):
        assert m["retrieval"][key] == pytest.approx(expected[key], abs=1e-3), key


def verified_by_hand(loops, n_positive):
    """From the loop table (published candidates and accepted loops with their verdicts) only:
    best accepted loop per query, swept."""
    best = {}
    for r in loops:
        if r["verified"] and (r["query"] not in best or r["score"] > best[r["query"]]["score"]):
            best[r["query"]] = r
    preds = sorted(best.values(), key=lambda r: -r["score"])
    rec = [sum(p["true"] for p in preds if p["score"] >= t["score"]) / n_positive for t in preds]
    fp = [sum(not p["true"] for p in preds if p["score"] >= t["score"]) for t in preds]
    return max([r for r, f in zip(rec, fp) if f == 0], default=0.0)


def test_eval_rtabmap_bag_matches_brute_force(tmp_path, rtabmap_seq, features, capsys):
    """Retrieval metrics against brute force; verification metrics against the verdicts."""
    feats, table = features
    bag = B.write_bag(tmp_path / "rtabmap", rtabmap_seq.image_paths, rtabmap_seq.stamps_ns, storage="sqlite3")
    out = tmp_path / "report"
    metrics, printed = run_eval([str(bag), "--image-topic", "/camera/image_raw", "--gt-matrix",
                                 str(ROOT / "data/rtabmap/ground_truth.bmp"),
                                 "-o", str(out)] + sum((["--set", s] for s in ALL_FRAMES), []),
                                table, capsys)
    assert table.misses == 0
    assert metrics["n_frames"] == metrics["keyframes"] == metrics["map_size"] == 84
    desc = np.stack([f.descriptor for f in feats["rtabmap"]])
    expected = brute_force(desc, rtabmap_seq.stamps_ns, rtabmap_seq.gt, 10.5)
    _check(metrics, expected)
    # the printed table shows the same numbers
    assert f"{expected['auc']:.3f}" in printed
    assert f"{100 * expected['recall@1']:.1f}%" in printed
    assert "NOT MegaLoc" in printed or "MegaLoc" in metrics["model"]
    for stage in ("decode", "encode", "search", "add_keyframe", "verify"):
        lat = metrics["latency"][stage]
        assert 0 <= lat["median_ms"] <= lat["p99_ms"]
        # every frame is a keyframe; verify runs for those whose retrieval found something
        assert lat["n"] == 84 if stage != "verify" else 0 < lat["n"] < 84
    # with verification: the verdicts recorded in the loop table give the same numbers
    v = metrics["metrics"]["verified"]
    accepted = [r for r in metrics["loops"] if r["verified"]]
    assert v["operating_point"]["true_loops"] == sum(r["true"] for r in accepted)
    assert v["operating_point"]["false_loops"] == sum(not r["true"] for r in accepted)
    assert v["max_recall_at_100_precision"] == pytest.approx(
        verified_by_hand(metrics["loops"], expected["n_positive"]))
    assert all(r["verified"] is not None for r in metrics["loops"])
    for name in ("report.html", "pr_curves.png", "similarity.png", "metrics.json"):
        assert (out / name).stat().st_size > 1000, name
    html = (out / "report.html").read_text()
    assert "pr_curves.png" in html and "similarity.png" in html and f"{expected['auc']:.3f}" in html
    # every published loop is labelled against the ground truth
    for row in metrics["loops"]:
        assert row["true"] == bool(rtabmap_seq.gt[row["query"], row["match"]])


def test_eval_corridor_compressed_mcap_matches_brute_force(tmp_path, corridor_seq, features, capsys):
    feats, table = features
    bag = B.write_bag(tmp_path / "corridor", corridor_seq.image_paths, corridor_seq.stamps_ns,
                      storage="mcap", compressed=True)
    metrics, _ = run_eval([str(bag), "--gt-matrix",  # the only image topic is picked by itself
                           str(ROOT / "data/corridor/ground_truth.csv"), "--no-verify",
                           "--params", str(ROOT / "config/loop_closure.yaml"),  # --set wins over it
                           "-o", str(tmp_path / "r")] + sum((["--set", s] for s in ALL_FRAMES), []),
                          table, capsys)
    assert table.misses == 0
    desc = np.stack([f.descriptor for f in feats["corridor"]])
    _check(metrics, brute_force(desc, corridor_seq.stamps_ns, corridor_seq.gt, 10.5))
    assert metrics["metrics"]["n_positive"] == 111  # every query has its reference frames
    assert metrics["topic"] == "/camera/image_raw/compressed"
    assert metrics["params"]["detector"]["exclude_recent_s"] == 10.5


def test_eval_ground_truth_from_pose_topic(tmp_path, rtabmap_seq, features, capsys):
    """A made-up trajectory that revisits like the rtabmap sequence: frames 41-80 retrace 1-40."""
    _, table = features
    n = 84
    # a 10 m circle driven twice (the second lap 0.3 m further out), then the first 4 m again
    step = np.r_[np.arange(40), np.arange(40), np.arange(4)]
    radius = np.r_[np.full(40, 10.0), np.full(40, 10.3), np.full(4, 10.0)]
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, 0, 3] = radius * np.cos(step * 2 * np.pi / 40)
    poses[:, 1, 3] = radius * np.sin(step * 2 * np.pi / 40)
    traj_file = tmp_path / "traj.tum"
    write_trajectory_tum(traj_file, Trajectory(rtabmap_seq.stamps_ns, poses))
    bag = tmp_path / "bag"
    assert cli.main(["make-bag", "--dataset", "rtabmap", "-o", str(bag), "--poses", str(traj_file),
                     "--quiet", "--compressed"]) == 0
    capsys.readouterr()
    metrics, printed = run_eval([str(bag), "--image-topic", "/camera/image_raw/compressed",
                                 "--pose-topic", "/pose", "--gt-distance", "1.0", "--no-verify",
                                 "-o", str(tmp_path / "r")] + sum((["--set", s] for s in ALL_FRAMES), []),
                                table, capsys)
    gt = gt_from_positions(poses[:, :3, 3], rtabmap_seq.stamps_ns, 1.0, 10.5)
    assert metrics["metrics"]["gt_pairs"] == int(np.triu(gt).sum())
    assert metrics["ground_truth"].startswith("pose topic /pose")
    assert (tmp_path / "r" / "trajectory.png").stat().st_size > 1000
    assert "trajectory.png" in (tmp_path / "r" / "report.html").read_text()


def _cli(*argv):
    return subprocess.run([str(ROOT / "tools/with_env.sh"), "megaloc-ros", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, rtabmap_seq):
    good = B.write_bag(tmp_path / "good", rtabmap_seq.image_paths[:3], rtabmap_seq.stamps_ns[:3],
                       storage="sqlite3")
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "metadata.yaml").write_bytes((good / "metadata.yaml").read_bytes())
    db = next(good.glob("*.db3"))
    (trunc / db.name).write_bytes(db.read_bytes()[:4096])
    garbage = tmp_path / "garbage.mcap"
    garbage.write_bytes(b"\x89MCAP0\r\n" + bytes(range(256)) * 8)
    from test_bag import _bag_with_encoding
    nv21 = _bag_with_encoding(tmp_path / "nv21", "nv21")
    cases = [
        ([str(trunc), "--image-topic", "/camera/image_raw"], "cannot open bag"),
        ([str(garbage), "--image-topic", "/camera/image_raw"], "cannot open bag"),
        ([str(good), "--image-topic", "/camera/missing"], "topic /camera/missing is not in bag"),
        ([str(nv21), "--image-topic", "/cam"], "unsupported image encoding 'nv21'"),
        ([str(good), "--image-topic", "/camera/image_raw", "--gt-matrix", str(tmp_path / "no.bmp")],
         "ground-truth file"),
        ([str(good), "--image-topic", "/camera/image_raw", "--set", "detector.nope=1"], "unknown parameter"),
        ([str(good), "--set", "queue_size=3"], "only applies with --live"),
        ([str(tmp_path / "no_such_bag")], "bag " + str(tmp_path / "no_such_bag") + " not found"),
    ]
    # a CameraInfo with a lens model the verifier cannot undo (written as a recorder would)
    from types import SimpleNamespace
    odd_lens = B.write_bag(tmp_path / "odd_lens", rtabmap_seq.image_paths[:3], rtabmap_seq.stamps_ns[:3],
                           camera=Camera(np.diag([400.0, 400.0, 1.0]), (512, 384),
                                         SimpleNamespace(model="kannala_brandt", d=(0.1, 0.0, 0.0, 0.0))))
    cases = [(argv + ["--no-verify"], msg) for argv, msg in cases]
    cases.append(([str(odd_lens), "--gt-distance", "1"], "'kannala_brandt' is not supported"))
    for argv, msg in cases:
        r = _cli("eval", *argv, "-o", str(tmp_path / "out"))
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 2, (argv, r.stderr)
        assert "Traceback" not in r.stderr
        assert len(lines) == 1 and lines[0].startswith("megaloc-ros eval: error:") and msg in lines[0], r.stderr


@pytest.mark.slow
@pytest.mark.ros
def test_live_replay_through_the_nodes_matches_offline(tmp_path, rtabmap_seq, features):
    """The bag played over DDS into loop_closure_node + verifier_node publishes the candidates
    the offline pipeline computes on the same frames (both see every frame, in order)."""
    from megaloc_ros import pipeline as PL
    from megaloc_ros.evaluation.replay import replay_offline
    from megaloc_ros.ros.live_replay import replay_live

    _, table = features
    bag = B.write_bag(tmp_path / "bag", rtabmap_seq.image_paths, rtabmap_seq.stamps_ns,
                      storage="mcap", compressed=True)
    topic = "/camera/image_raw/compressed"
    settings = eval_cli.pipeline_settings(None, None, verify=True)
    offline = replay_offline(bag, topic, PL.build(settings, table), quiet=True)
    live = replay_live(bag, topic, settings, rate=20.0, quiet=True, encoder=table,
                       node_params={"image_qos": "reliable", "queue_size": 1000})
    assert live.mode == "live" and "84 frames published, 84 processed" in live.notes[0]
    assert [f.keyframe_id for f in live.frames] == [f.keyframe_id for f in offline.frames]
    pairs = lambda r: [(f.index, m, round(s, 4)) for f in r.frames for m, s in
                       r.matches("candidates")[f.index]]
    assert pairs(live) == pairs(offline) and len(pairs(live)) > 10
    verdicts = lambda r: sorted((row["query"], row["match"], row["verified"]) for row in r.loop_table())
    assert verdicts(live) == verdicts(offline)
    assert live.map_size == offline.map_size


def test_parameters_from_the_nodes_yaml_and_set(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text("loop_closure_node:\n  ros__parameters:\n    detector:\n      top_k: 3\n"
                 "      similarity_threshold: 0.7\n"
                 "verifier_node:\n  ros__parameters:\n    verifier.min_inliers: 40\n")
    s = eval_cli.pipeline_settings(str(y), ["detector.similarity_threshold=0.9"])
    assert (s.detector.top_k, s.detector.similarity_threshold, s.verifier.min_inliers) == (3, 0.9, 40)
    s = eval_cli.pipeline_settings(None, None, verify=False)
    from megaloc_ros.mapping.detector import DetectorParams
    assert s.verifier is None and s.detector == DetectorParams()
    assert eval_cli.node_param_overrides(["queue_size=50", "detector.top_k=2"], live=True) == {"queue_size": 50}
    # map and encoder settings by the same names as the nodes' parameters
    s = eval_cli.pipeline_settings(str(y), ["map.index=ivfpq", "map.nprobe=64", "encoder.device=cpu"])
    assert (s.map.index, s.map.nprobe, s.encoder.device, s.detector.top_k) == ("ivfpq", 64, "cpu", 3)
    assert eval_cli.node_param_overrides(["map.index=hnsw", "detector.top_k=2"], live=False) == {"map.index": "hnsw"}
    args = _parser().parse_args(["eval", "bag", "--model-path", "m.onnx", "--device", "cpu", "--set", "map.index=sq8"])
    assert eval_cli.cli_overrides(args) == {"map.index": "sq8", "encoder.model_path": "m.onnx", "encoder.device": "cpu"}
    for bad, msg in [(["map.index=lsh"], "map.index must be one of flat"),
                     (["detector.top_k=two"], "detector.top_k must be of type int"),
                     (["verifier.min_inliers=3"], "does not apply with --no-verify"),
                     (["map_index=ivfpq"], "unknown parameter"), (["top_k"], "expected NAME=VALUE")]:
        with pytest.raises(MegalocError, match=msg):
            eval_cli.pipeline_settings(None, bad, verify=False)


def _parser():
    from megaloc_ros.cli import build_parser
    return build_parser("eval")


def _revisit_bag(tmp_path, rtabmap_seq, n: int = 20):
    """2n frames at 1 Hz: rtabmap frames 0..n-1, then the same n images again (n revisited
    places, each exactly n seconds later), with its ground-truth matrix."""
    paths = list(rtabmap_seq.image_paths[:n]) * 2
    bag = B.write_bag(tmp_path / "revisit", paths, np.arange(2 * n) * S)
    gt = np.zeros((2 * n, 2 * n), np.uint8)
    for i in range(n):
        gt[i, i + n] = gt[i + n, i] = 1
    np.save(tmp_path / "gt.npy", gt)
    return bag, tmp_path / "gt.npy"


def test_eval_says_which_setting_hides_the_true_loops(tmp_path, rtabmap_seq, features, capsys):
    """40 frames at 1 Hz, 20 places seen twice 20 s apart: the default exclusion windows hide
    every true match; eval says so, names the setting, on the console and in the report."""
    _, table = features
    bag, gt = _revisit_bag(tmp_path, rtabmap_seq)
    base = [str(bag), "--gt-matrix", str(gt)]
    metrics, printed = run_eval(base + ["--no-verify", "-o", str(tmp_path / "a")], table, capsys)
    m = metrics["metrics"]
    u = m["unreachable"]
    assert m["n_positive"] == u["n_positive"] == 20 and m["recall_unit"] == "frames"
    assert u["n"] == 20 and u["max_recall"] == 0.0 and m["retrieval"]["recall@5"] == 0.0
    assert "WARNING: 20 of 20 frames with a true loop cannot be found with these settings, so recall " \
           "cannot exceed 0.0%" in printed
    assert "detector.exclude_recent_keyframes=20" in printed
    assert "20 frames (of all 40 frames on the topic, keyframes or not) have a true loop" in printed
    html = (tmp_path / "a" / "report.html").read_text()
    assert "cannot be found with these settings" in html and "detector.exclude_recent_keyframes=20" in html
    # without the keyframe window, the time window still hides them: 20 s old is inside 20 s
    metrics, printed = run_eval(base + ["--no-verify", "-o", str(tmp_path / "b"),
                                        "--set", "detector.exclude_recent_keyframes=0"], table, capsys)
    u = metrics["metrics"]["unreachable"]
    assert u["n"] == 20 and "detector.exclude_recent_s=20" in printed
    assert "exclude_recent_keyframes" not in printed
    # with neither, every keyframe finds its place again, and the verifier draws why
    metrics, printed = run_eval(base + ["-o", str(tmp_path / "c"), "--set", "detector.exclude_recent_keyframes=0",
                                        "--set", "detector.exclude_recent_s=19.5"], table, capsys)
    m = metrics["metrics"]
    hidden = m["unreachable"]["n"]
    assert all(k.startswith("keyframe selection") for k in m["unreachable"]["by_setting"])
    assert ("WARNING" in printed) == (hidden > 0)
    assert m["retrieval"]["recall@1"] == pytest.approx((20 - hidden) / 20)  # the same images: rank 0
    assert m["verified"]["operating_point"]["true_loops"] > 10
    pics = metrics["explanations"]["pictures"]
    accepted = [(f["query"], f["match"]) for f in pics if f["accepted"]]
    assert sorted(accepted) == sorted((r["query"], r["match"]) for r in metrics["loops"] if r["verified"])
    assert all(f["true"] for f in pics if not f["accepted"])  # the rejected ones drawn are true loops
    out = tmp_path / "c"
    html = (out / "report.html").read_text()
    for f in pics:
        img = cv2.imread(str(out / f["file"]))
        assert img is not None and img.shape[1] == 2 * round(512 * 240 / 384) + 8, f["file"]
        assert f"href='{f['file']}'" in html
        assert f["query_stamp_s"] == f["query"] and f["match_stamp_s"] == f["match"]  # 1 Hz from 0
    q, mt = accepted[0]
    assert f"frame {q} (t={q}.000 s) &rarr; frame {mt} (t={mt}.000 s): accepted true" in html
    assert f"why each loop was accepted or rejected: {len(pics)} pictures" in printed


def test_eval_skips_a_corrupt_frame_and_prints_no_precision_without_loops(tmp_path, rtabmap_seq, features,
                                                                          capsys):
    from test_bag import _corrupt_message
    _, table = features
    bag = B.write_bag(tmp_path / "bag", rtabmap_seq.image_paths[:12], np.arange(12) * S, compressed=True)
    _corrupt_message(bag, 6, b"\xff\xd8\xff\xe0 truncated", stamp_ns=5 * S)  # frame 5
    gt = np.zeros((12, 12), np.uint8)
    gt[11, 5] = gt[5, 11] = gt[10, 2] = gt[2, 10] = 1
    np.save(tmp_path / "gt.npy", gt)
    metrics, printed = run_eval([str(bag), "--gt-matrix", str(tmp_path / "gt.npy"), "-o", str(tmp_path / "r"),
                                 "--gt-exclude-s", "5"], table, capsys)
    assert metrics["n_frames"] == 12 and metrics["skipped_frames"] == 1
    assert "note:  1 of 12 frames could not be decoded and were skipped" in printed and "frame 5" in printed
    assert metrics["keyframes"] <= 11
    m = metrics["metrics"]
    # nothing can be published (the default 20 s window is longer than the bag): no precision
    assert m["published"]["loops"] == 0 and m["published"]["precision"] is None
    assert m["verified"]["operating_point"]["precision"] is None
    row = next(ln for ln in printed.splitlines() if ln.startswith("precision of published loops"))
    assert row.split()[-2:] == ["-", "-"] and "100" not in row
    hidden = m["unreachable"]["frames"]
    assert hidden.pop("its true matches could not be decoded (skipped)") == [11]
    assert list(hidden.values()) == [[10]]  # by the exclusion windows, or keyframe selection (frame 2)
    assert metrics["explanations"]["pictures"] == []
    # a ground truth without any loop: recall is undefined, not 0%
    np.save(tmp_path / "none.npy", np.zeros((12, 12), np.uint8))
    metrics, printed = run_eval([str(bag), "--gt-matrix", str(tmp_path / "none.npy"), "-o", str(tmp_path / "n"),
                                 "--no-verify", "--set", "detector.exclude_recent_s=2",
                                 "--set", "detector.exclude_recent_keyframes=0"], table, capsys)
    assert "WARNING: no frame has a true loop at least 2 s older in the ground truth: recall is undefined" in printed
    for name in ("recall@1", "recall@5", "recall of published loops", "max recall @ 100% precision"):
        row = next(ln for ln in printed.splitlines() if ln.startswith(name))
        assert row.split()[-2:] == ["-", "-"], row
    assert (tmp_path / "n" / "pr_curves.png").stat().st_size > 1000


def test_eval_gives_the_verifier_the_bags_camera_info(tmp_path, real_encoder, capsys):
    """A bag with sensor_msgs/CameraInfo beside its images (TUM fr3/cabinet, the start and the
    end of its loop: 18 of its 58 RGB keyframes): eval hands the intrinsics to the verifier, as
    the nodes' camera_info_topic would, so verified loops carry a transform; with
    --camera-info-topic none they do not."""
    from megaloc_ros.io import tum
    from megaloc_ros.io.trajectory import Trajectory as Traj
    t = tum.tum_fr3_cabinet()
    idx = list(range(0, 8)) + list(range(48, 58))
    bag = B.write_bag(tmp_path / "tum", [t.rgb_paths[i] for i in idx], t.stamps_ns[idx], compressed=True,
                      trajectory=Traj(t.stamps_ns[idx], t.poses[idx]), camera=Camera(t.K, t.image_size))
    # every frame a keyframe (the poses would thin them by travel), as `bench verify --sets` has
    # them; the end may query the start: more than exclude_recent_s apart, not 20 keyframes
    base = [str(bag), "--image-topic", "/camera/image_raw/compressed", "--pose-topic", "/pose",
            "--gt-distance", "0.5", "--set", "detector.min_travel_m=0", "--set", "detector.min_rotation_deg=0",
            "--set", "detector.exclude_recent_keyframes=4"]
    with_info, printed = run_eval(base + ["-o", str(tmp_path / "a")], real_encoder, capsys)
    assert with_info["camera"].startswith("/camera/camera_info: fx 535.4 fy 539.2 for 640x480")
    assert "camera: /camera/camera_info" in printed
    without, _ = run_eval(base + ["-o", str(tmp_path / "b"), "--camera-info-topic", "none"], real_encoder, capsys)
    assert without["camera"].startswith("none")
    for report, transform in ((with_info, True), (without, False)):
        accepted = [lp for lp in report["loops"] if lp["verified"]]
        assert accepted, "the cabinet's revisit gives verified loops"
        assert all(("no transform" not in lp["reason"]) == transform for lp in accepted), accepted
