"""`megaloc-ros eval`: replay a rosbag2 and score the loop closures against ground truth.

Offline (default) the bag's images go through the same core objects as the nodes; ``--live``
plays the bag into the running ROS 2 nodes over DDS and scores what they publish.
Writes metrics.json, PNG plots and report.html to ``--output``, and prints the metrics table.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from megaloc_ros.errors import MegalocError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bag", help="rosbag2 directory (sqlite3 or mcap), or a bare .db3/.mcap file")
    p.add_argument("--image-topic",
                   help="sensor_msgs/Image or sensor_msgs/CompressedImage topic "
                        "(default: the bag's only image topic)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pose-topic", help="ground truth from a pose topic in the bag "
                                        "(PoseStamped, PoseWithCovarianceStamped, Odometry, TransformStamped)")
    g.add_argument("--gt-poses", help="ground truth from a trajectory file (TUM, or KITTI one line per frame)")
    g.add_argument("--gt-matrix", help="ground truth loop matrix: .bmp/.png (non-zero = same place), "
                                       ".npy or .csv/.txt 0/1 matrix, or a VPR-Bench query/reference table")
    p.add_argument("--gt-distance", type=float, default=3.0,
                   help="with poses: frames within this many metres are the same place (default 3)")
    p.add_argument("--gt-exclude-s", type=float, default=None,
                   help="pairs closer in time are not loops (default: the detector's exclude_recent_s)")
    p.add_argument("--pose-max-gap", type=float, default=0.5,
                   help="seconds between an image and the nearest pose beyond which it has no pose")
    p.add_argument("--params", help="the nodes' parameters YAML (detector.* and verifier.* are used)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one parameter, e.g. --set detector.similarity_threshold=0.8 "
                        "(repeatable); with --live also node parameters, e.g. --set queue_size=100")
    p.add_argument("--model", help="exported model .onnx (default: MegaLoc if exported, else the "
                                   "offline DINOv2 ViT-S/14 backbone)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--index", default="flat", help="place-map index kind (flat, ivfpq, ivfsq8, hnsw, sq8)")
    p.add_argument("--no-verify", action="store_true", help="global retrieval only, no verifier")
    p.add_argument("--live", action="store_true",
                   help="play the bag into the ROS 2 nodes (started in this process) over DDS")
    p.add_argument("--rate", type=float, default=1.0, help="--live: playback rate factor (default 1)")
    p.add_argument("--output", "-o", default="eval_out", help="report directory (default eval_out)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _overrides(items) -> dict:
    import yaml
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MegalocError(f"--set expects KEY=VALUE (e.g. detector.similarity_threshold=0.8), got '{item}'")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise MegalocError(f"--set {item}: cannot parse the value") from None
    return out


def detector_and_verifier_params(params_file=None, overrides=None, verify: bool = True):
    """DetectorParams and VerifierParams (None without verification) from the nodes' YAML
    (``detector.*`` / ``verifier.*``) and ``--set`` overrides, else their defaults."""
    import dataclasses

    from megaloc_ros.mapping.detector import DetectorParams
    # megaloc_ros.ros.params reads the YAML with PyYAML; it imports no rclpy at module level.
    from megaloc_ros.ros.params import LOOP_CLOSURE_NODE, VERIFIER_NODE, build_dataclass, load_params_file

    over = _overrides(overrides)
    classes = {"detector": DetectorParams}
    if verify:
        from megaloc_ros.verification.verifier import VerifierParams
        classes["verifier"] = VerifierParams
    node_names = _node_param_names()
    for key in over:
        prefix, _, name = key.partition(".")
        cls = classes.get(prefix)
        if key in node_names and prefix not in ("detector", "verifier"):
            continue  # a node parameter (live mode), see node_param_overrides
        if cls is None or name not in {f.name for f in dataclasses.fields(cls)}:
            known = ", ".join(f"{p}.<field>" for p in classes)
            raise MegalocError(f"--set {key}: unknown parameter (known: {known}, and node parameters "
                               "with --live; see config/loop_closure.yaml)")
    out = {}
    for prefix, cls in classes.items():
        node = LOOP_CLOSURE_NODE if prefix == "detector" else VERIFIER_NODE
        values = load_params_file(params_file, node) if params_file else {}
        values.update({k: v for k, v in over.items() if k.startswith(prefix + ".")})
        try:
            out[prefix] = build_dataclass(cls, prefix, values)
        except TypeError as exc:
            raise MegalocError(f"{prefix} parameters: {exc}") from None
    return out["detector"], out.get("verifier")


def _node_param_names() -> set[str]:
    from megaloc_ros.ros.params import all_node_specs
    return {s.name for specs in all_node_specs().values() for s in specs
            if not s.name.startswith(("detector.", "verifier."))}


def node_param_overrides(overrides, live: bool) -> dict:
    """``--set`` values for node parameters (queue_size, image_qos, ...): only with --live."""
    names = _node_param_names()
    out = {k: v for k, v in _overrides(overrides).items() if k in names}
    if out and not live:
        raise MegalocError(f"--set {next(iter(out))}: a node parameter, which only applies with --live")
    return out


def ground_truth_source(args, n_frames: int, reader):
    """Read and check the ground truth before the (long) replay. Returns (trajectory or None,
    resolve(stamps_ns, exclude_s) -> (gt [N, N] or None, positions [N, 3] or None,
    positions valid [N] or None, description))."""
    from megaloc_ros.evaluation import ground_truth as G
    if args.gt_matrix:
        gt = G.read_gt_matrix(args.gt_matrix, n_frames)
        return None, lambda stamps, ex: (gt, None, None, f"loop matrix {args.gt_matrix}")
    if args.pose_topic:
        traj = reader.trajectory(args.pose_topic)
        src = f"pose topic {args.pose_topic}"
    elif args.gt_poses:
        traj = G.read_trajectory(args.gt_poses, np.zeros(n_frames, np.int64))  # check it now
        src = f"trajectory {args.gt_poses}"
    else:
        return None, lambda stamps, ex: (None, None, None, "none")

    def resolve(stamps_ns, exclude_s):
        tr = G.read_trajectory(args.gt_poses, stamps_ns) if args.gt_poses else traj
        poses, valid = tr.at(stamps_ns, args.pose_max_gap)
        if not valid.any():
            raise MegalocError(f"no image stamp is within {args.pose_max_gap} s of a pose from {src}; "
                               "are the poses on the same clock as the images?")
        pos = poses[:, :3, 3]
        gt = G.gt_from_positions(pos, stamps_ns, args.gt_distance, exclude_s, valid)
        return gt, pos, valid, (f"{src}: same place within {args.gt_distance:g} m and at least "
                                f"{exclude_s:g} s apart ({int(valid.sum())} of {len(stamps_ns)} "
                                "frames have a pose)")
    return (traj if args.pose_topic else None), resolve


def run(args, encoder=None) -> tuple[dict, Path]:
    """The whole command minus printing: replay, score, write the report. Also used by the demo.
    ``encoder``: an already loaded encoder for offline mode (default: ``load_encoder``)."""
    from megaloc_ros.io.bag import BagReader
    from megaloc_ros.evaluation.replay import build_pipeline, replay_offline
    from megaloc_ros.evaluation.report import evaluate, write_report

    dp, vp = detector_and_verifier_params(args.params, args.set, verify=not args.no_verify)
    node_param_overrides(args.set, args.live)  # reject node parameters without --live, early
    exclude_s = dp.exclude_recent_s if args.gt_exclude_s is None else args.gt_exclude_s
    with BagReader(args.bag) as r:  # check everything cheap before the long part
        if not args.image_topic:
            from megaloc_ros.io.bag import IMAGE_TYPES
            found = [t.name for t in r.topics if t.msgtype in IMAGE_TYPES]
            if len(found) != 1:
                raise MegalocError(f"bag {args.bag} has {len(found)} image topics"
                                   + (f" ({', '.join(found)})" if found else "") + "; pick one with --image-topic")
            args.image_topic = found[0]
        n = r.image_count(args.image_topic)
        if n == 0:
            raise MegalocError(f"topic {args.image_topic} in {args.bag} has no messages")
        next(r.images(args.image_topic))  # an unknown encoding fails now, not after model loading
        odometry, resolve_gt = ground_truth_source(args, n, r)
    if args.live:
        from megaloc_ros.ros.live_replay import replay_live
        from megaloc_ros.encoding.encoder import load_encoder
        node_params = node_param_overrides(args.set, True)
        if args.index != "flat":
            node_params.setdefault("map_index", args.index)
        if odometry is not None:
            node_params.setdefault("odom_max_dt", min(args.pose_max_gap, 10.0))
        enc = encoder or (load_encoder(args.model, device=args.device) if args.model else None)
        replay = replay_live(args.bag, args.image_topic, dp, vp, params_file=args.params,
                             rate=args.rate, quiet=args.quiet, trajectory=odometry, encoder=enc,
                             node_params=node_params)
    else:
        from megaloc_ros.encoding.encoder import load_encoder
        enc = encoder or load_encoder(args.model, device=args.device)
        pipe = build_pipeline(enc, dp, vp, verify=not args.no_verify, index=args.index)
        replay = replay_offline(args.bag, args.image_topic, pipe, trajectory=odometry,
                                pose_max_gap_s=args.pose_max_gap, quiet=args.quiet)
    gt, pos, valid, gt_desc = resolve_gt(replay.stamps_ns, exclude_s)
    report = evaluate(replay, gt, exclude_s)
    report["ground_truth"] = gt_desc
    page = write_report(args.output, replay, report, gt, pos, valid)
    return report, page


def main(args, encoder=None) -> int:
    from megaloc_ros.evaluation.report import format_loops, format_text
    if args.rate <= 0:
        raise MegalocError("--rate must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    report, page = run(args, encoder)
    print(format_loops(report))
    print()
    print(format_text(report))
    print(f"report: {page}")
    return 0
