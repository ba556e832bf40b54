"""`megaloc-ros demo` (what `make demo` runs): the whole system on the real rtabmap sequence
shipped in data/rtabmap.

1. writes the 84 frames into a rosbag2 (demo_out/rtabmap_bag, sqlite3, sensor_msgs/Image);
2. starts loop_closure_node and verifier_node (``runner.NodeSet``) and plays the bag into them
   over DDS, recording ~/candidates, ~/loop_closures and ~/rejected (without rclpy, or with
   ``--offline``, the same pipeline runs in-process, and the demo says so);
3. prints the loops found against the sequence's ground truth and the metrics table;
4. writes demo_out/report.html with its PNG plots and metrics.json.

With an exported MegaLoc model it uses MegaLoc; otherwise the offline DINOv2 ViT-S/14 backbone,
and says so plainly.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from megaloc_ros.errors import MegalocError

ATTRIBUTION = ("data: RTAB-Map sample sequence (introlab/rtabmap data/samples, 84 indoor frames "
               "512x384 with a loop-closure ground-truth matrix), BSD 3-Clause, (c) Mathieu Labbe, "
               "IntRoLab, Universite de Sherbrooke; see data/README.md")
TOPIC = "/camera/image_raw"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--rate", type=float, default=1.0,
                   help="playback rate factor for the live run (default 1: the sequence's 1 Hz)")
    p.add_argument("--offline", action="store_true",
                   help="run the pipeline in-process instead of through the ROS 2 nodes")
    p.add_argument("--model-path", help="exported model .onnx (default: MegaLoc if exported, else the offline backbone)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def run(output: str | Path = "demo_out", rate: float = 1.0, live: bool = True, encoder=None,
        model: str | None = None, quiet: bool = False) -> dict:
    """The demo; returns the report dict (also written to ``output``/metrics.json)."""
    from megaloc_ros.io import datasets
    from megaloc_ros.io.bag import write_bag
    from megaloc_ros import pipeline as PL
    from megaloc_ros.evaluation.replay import replay_offline
    from megaloc_ros.evaluation.report import evaluate, format_loops, format_text, write_report

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    seq = datasets.rtabmap()
    _say("megaloc_ros demo: loop closure on a real indoor sequence")
    _say(ATTRIBUTION)

    if encoder is None:
        from megaloc_ros.encoding.loader import load_encoder
        encoder = load_encoder(model)
    if getattr(encoder, "kind", "megaloc") == "megaloc":
        _say(f"model: MegaLoc ({encoder.description})")
    else:
        _say("model: MegaLoc weights were not found, so this demo uses the offline DINOv2 ViT-S/14 "
             "backbone with a training-free descriptor. It is NOT MegaLoc; expect lower recall. "
             "Export MegaLoc with `megaloc-ros export` where its weights can be downloaded.")
        _say(f"       ({encoder.description})")

    bag = write_bag(out / "rtabmap_bag", seq.image_paths, seq.stamps_ns, storage="sqlite3",
                    topic=TOPIC, overwrite=True, progress=not quiet)
    _say(f"bag: {bag} ({len(seq)} frames on {TOPIC}, 1 Hz)")

    settings = PL.PipelineSettings()  # the nodes' defaults (config/loop_closure.yaml)
    replay = None
    if live:
        import importlib.util
        if importlib.util.find_spec("rclpy") is None:  # the core never imports rclpy itself
            _say("ROS 2 (rclpy) is not available here: running the same pipeline in-process "
                 "(offline replay, no DDS) instead of the ROS nodes.")
            live = False
    if live:
        from megaloc_ros.ros.live_replay import replay_live
        _say(f"starting loop_closure_node + verifier_node and playing the bag into them over DDS "
             f"at x{rate:g} ...")
        try:
            # reliable QoS and a deep queue: the demo scores every frame even on a slow CPU
            replay = replay_live(bag, TOPIC, settings, rate=rate, quiet=quiet, encoder=encoder,
                                 node_params={"image_qos": "reliable", "queue_size": 1000})
        except MegalocError as exc:
            _say(f"the live run through the ROS nodes failed ({exc}); running the same pipeline "
                 "in-process (offline replay) instead.")
    if replay is None:
        _say("replaying the bag through the pipeline in-process ...")
        replay = replay_offline(bag, TOPIC, PL.build(settings, encoder), quiet=quiet)
        replay.notes.insert(0, "offline replay (in-process, no ROS nodes / DDS)")

    report = evaluate(replay, seq.gt, settings.detector.exclude_recent_s)
    report["ground_truth"] = "data/rtabmap/ground_truth.bmp (RTAB-Map samples_GT.bmp)"
    page = write_report(out, replay, report, seq.gt, title="megaloc_ros demo: rtabmap sequence")
    accepted = [r for r in report["loops"] if r["verified"]]
    rejected = [r for r in report["loops"] if r["verified"] is False]
    _say()
    _say(f"loops found (accepted by the verifier): {len(accepted)}; candidates rejected: {len(rejected)}. "
         "Frames are numbered from 0 in bag order (frame i = data/rtabmap/<i+1>.jpg); truth is the "
         "shipped ground-truth matrix.")
    _say(format_loops({"loops": accepted}, limit=100))
    _say()
    _say(format_text(report))
    _say()
    _say(f"report: {page} (plots: {', '.join(str(out / p) for p in ['pr_curves.png', 'similarity.png'])})")
    return report


def main(args: argparse.Namespace) -> int:
    if args.rate <= 0:
        raise MegalocError("--rate must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    run(args.output, rate=args.rate, live=not args.offline, model=args.model_path, quiet=args.quiet)
    return 0
