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
    p.add_argument("bag", nargs="?", help="rosbag2 directory (sqlite3 or mcap), or a bare .db3/.mcap file")
    p.add_argument("--pose-graph", metavar="SEQUENCE", choices=["tum_fr3_cabinet"],
                   help="instead of a bag: run the pipeline on this shipped RGB-D sequence (depth, mocap "
                        "poses), close the GTSAM pose graph over seeded drifted odometry with the verified "
                        "loops' metric transforms, and print ATE/RPE of odometry and optimised trajectory")
    p.add_argument("--drift-seeds", type=int, default=10, help="--pose-graph: drift seeds to run (default 10)")
    p.add_argument("--robots", type=int, default=1, choices=(1, 2),
                   help="--pose-graph: 2 splits the sequence between two robots, each with its own odometry "
                        "origin, merged by the fleet pose graph at their first inter-robot loop; prints the "
                        "merged trajectory's ATE (megaloc_ros/evaluation/fleet_trajectory.py)")
    p.add_argument("--image-topic",
                   help="sensor_msgs/Image or sensor_msgs/CompressedImage topic "
                        "(default: the bag's only image topic)")
    p.add_argument("--camera-info-topic", default="auto",
                   help="sensor_msgs/CameraInfo for the verifier (intrinsics, lens distortion: loops get "
                        "transforms, as the nodes' camera_info_topic gives them); default auto: the one "
                        "beside the image topic, else the bag's only one; 'none': without")
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
    p.add_argument("--params", help="the nodes' parameters YAML (encoder.*, map.*, detector.* and "
                                    "verifier.* are used)")
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="set one parameter (names as in config/loop_closure.yaml), e.g. --set "
                        "detector.similarity_threshold=0.8 or --set map.index=ivfpq (repeatable); with "
                        "--live also node parameters, e.g. --set queue_size=100")
    p.add_argument("--model-path", help="exported model .onnx (sets encoder.model_path; default: MegaLoc "
                                        "if exported, else the offline DINOv2 ViT-S/14 backbone)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="sets encoder.device (default auto)")
    p.add_argument("--no-verify", action="store_true", help="global retrieval only, no verifier")
    p.add_argument("--live", action="store_true",
                   help="play the bag into the ROS 2 nodes (started in this process) over DDS")
    p.add_argument("--rate", type=float, default=1.0, help="--live: playback rate factor (default 1)")
    p.add_argument("--output", "-o", default="eval_out", help="report directory (default eval_out)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


PIPELINE_PREFIXES = ("encoder", "map", "detector", "verifier")


def _overrides(items) -> dict:
    """``--set`` items (or an already parsed dict) as ``{name: value}`` (``settings.parse_set``)."""
    from megaloc_ros.settings import parse_set
    if isinstance(items, dict):
        return dict(items)
    try:
        return parse_set(items)
    except MegalocError as exc:
        raise MegalocError(f"--set: {exc}") from None


def cli_overrides(args) -> dict:
    """``--set`` plus the flags that set a pipeline setting (``--model-path``, ``--device``)."""
    over = _overrides(args.set)
    if args.model_path:
        over["encoder.model_path"] = args.model_path
    if args.device:
        over["encoder.device"] = args.device
    return over


def pipeline_settings(params_file=None, overrides=None, verify: bool = True):
    """``PipelineSettings`` from the nodes' YAML (``encoder.*``, ``map.*``, ``detector.*`` of
    loop_closure_node, ``verifier.*`` of verifier_node) and ``--set`` overrides, else the defaults;
    ``verifier`` None without verification. An unknown name or a bad value raises MegalocError."""
    from megaloc_ros.pipeline import PipelineSettings
    from megaloc_ros.ros.params import LOOP_CLOSURE_NODE, VERIFIER_NODE
    from megaloc_ros.settings import load_params_file

    over = _overrides(overrides)
    node_names = _node_param_names()
    for key in over:
        prefix = key.partition(".")[0]
        if prefix == "verifier" and not verify:
            raise MegalocError(f"--set {key}: a verifier setting, which does not apply with --no-verify")
        if prefix not in PIPELINE_PREFIXES and key not in node_names:
            raise MegalocError(f"--set {key}: unknown parameter (known: {', '.join(p + '.*' for p in PIPELINE_PREFIXES)}, "
                               "and node parameters with --live; see config/loop_closure.yaml)")
    values = {}
    if params_file:
        values.update({k: v for k, v in load_params_file(params_file, LOOP_CLOSURE_NODE).items()
                       if not k.startswith("verifier.")})
        values.update({k: v for k, v in load_params_file(params_file, VERIFIER_NODE).items()
                       if k.startswith("verifier.")})
    values.update(over)
    return PipelineSettings.from_flat(values, verify=verify)


def _node_param_names() -> set[str]:
    """The nodes' own parameters (not pipeline settings)."""
    from megaloc_ros.ros.params import all_node_specs
    return {s.name for specs in all_node_specs().values() for s in specs
            if s.name.partition(".")[0] not in PIPELINE_PREFIXES}


def node_param_overrides(overrides, live: bool) -> dict:
    """``--set`` values for the nodes as parameters: their own (queue_size, image_qos, ...: only
    with --live) and loop_closure_node's ``encoder.*`` / ``map.*`` (``detector.*`` / ``verifier.*``
    travel as dataclasses)."""
    over = _overrides(overrides)
    names = _node_param_names()
    own = {k: v for k, v in over.items() if k in names}
    if own and not live:
        raise MegalocError(f"--set {next(iter(own))}: a node parameter, which only applies with --live")
    return {**own, **{k: v for k, v in over.items() if k.startswith(("encoder.", "map."))}}


def ground_truth_source(args, n_frames: int, reader):
    """Read and check the ground truth before the (long) replay. Returns (trajectory or None,
    resolve(stamps_ns, exclude_s) -> (gt [N, N] or None, positions [N, 3] or None,
    positions valid [N] or None, description))."""
    from megaloc_ros.evaluation import ground_truth as G
    from megaloc_ros.io.trajectory import read_trajectory
    if args.gt_matrix:
        gt = G.read_gt_matrix(args.gt_matrix, n_frames)
        return None, lambda stamps, ex: (gt, None, None, f"loop matrix {args.gt_matrix}")
    if args.pose_topic:
        traj = reader.trajectory(args.pose_topic)
        src = f"pose topic {args.pose_topic}"
    elif args.gt_poses:
        traj = read_trajectory(args.gt_poses, np.zeros(n_frames, np.int64))  # check it now
        src = f"trajectory {args.gt_poses}"
    else:
        return None, lambda stamps, ex: (None, None, None, "none")

    def resolve(stamps_ns, exclude_s):
        tr = read_trajectory(args.gt_poses, stamps_ns) if args.gt_poses else traj
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


def camera_source(args, reader):
    """(``geometry.Camera`` or None, description) for the verifier, as the
    nodes would have it: verifier_node's camera_matrix in ``--params`` when set (it wins over
    CameraInfo there too), else the bag's CameraInfo (``--camera-info-topic``)."""
    if args.params:
        from megaloc_ros.ros.params import VERIFIER_NODE, camera_from_params
        from megaloc_ros.settings import load_params_file
        v = load_params_file(args.params, VERIFIER_NODE)
        try:
            cam = camera_from_params(v.get("camera_matrix", [0.0]), v.get("camera_distortion_model", ""),
                                     v.get("camera_distortion", [0.0]))
        except ValueError as exc:
            raise MegalocError(f"{args.params}: {exc}") from None
        if cam is not None:
            return cam, f"camera_matrix in {args.params}"
    if args.camera_info_topic == "none":
        return None, "none (--camera-info-topic none): loops without transforms"
    topic = (reader.camera_info_topic(args.image_topic) if args.camera_info_topic == "auto"
             else args.camera_info_topic)
    if topic is None:
        return None, "no CameraInfo in the bag: loops without transforms"
    from megaloc_ros.io.bag import BagError
    try:
        cam = reader.camera_info(topic)
    except BagError as exc:
        raise MegalocError(f"{exc} (--camera-info-topic none: evaluate without it)") from None
    return cam, f"{topic}: {cam}"


def _check_decodable(reader, topic: str, n: int, tries: int = 10) -> None:
    """Raise the first decoding error when none of the first ``tries`` images decodes (an
    unsupported encoding); a few bad frames among good ones are skipped by the replay instead."""
    errors = []

    class _Enough(Exception):
        pass

    def bad(index, stamp_ns, exc):
        errors.append(exc)
        if len(errors) >= min(tries, n):
            raise _Enough

    try:
        for _ in reader.images(topic, on_error=bad):
            return
    except _Enough:
        pass
    if errors:
        raise errors[0]


def run(args, encoder=None) -> tuple[dict, Path]:
    """The whole command minus printing: replay, score, write the report. Also used by the demo.
    ``encoder``: an already loaded encoder for offline mode (default: ``load_encoder``)."""
    from megaloc_ros.io.bag import BagReader
    from megaloc_ros import pipeline as PL
    from megaloc_ros.evaluation.replay import replay_offline
    from megaloc_ros.evaluation.report import evaluate, write_report

    over = cli_overrides(args)
    settings = pipeline_settings(args.params, over, verify=not args.no_verify)
    dp = settings.detector
    node_params = node_param_overrides(over, args.live)  # rejects node parameters without --live, early
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
        _check_decodable(r, args.image_topic, n)  # an unknown encoding fails now, not after model loading
        odometry, resolve_gt = ground_truth_source(args, n, r)
        camera, camera_desc = camera_source(args, r) if not args.no_verify else (None, "")
    if args.live:
        from megaloc_ros.ros.live_replay import replay_live
        from megaloc_ros.encoding.loader import load_encoder
        if odometry is not None:
            node_params.setdefault("odom_max_dt", min(args.pose_max_gap, 10.0))
        if camera is not None and "camera_matrix" not in node_params:  # as verifier_node's parameters
            from megaloc_ros.ros.params import camera_to_params
            node_params.update(camera_to_params(camera))
        es = settings.encoder
        enc = encoder or (load_encoder(es.model_path, device=es.device) if es.model_path else None)
        replay = replay_live(args.bag, args.image_topic, settings, params_file=args.params,
                             rate=args.rate, quiet=args.quiet, trajectory=odometry, encoder=enc,
                             node_params=node_params)
    else:
        pipe = PL.build(settings, encoder, camera)
        replay = replay_offline(args.bag, args.image_topic, pipe, trajectory=odometry,
                                pose_max_gap_s=args.pose_max_gap, quiet=args.quiet)
    gt, pos, valid, gt_desc = resolve_gt(replay.stamps_ns, exclude_s)
    report = evaluate(replay, gt, exclude_s)
    report["ground_truth"] = gt_desc
    if camera_desc:
        report["camera"] = camera_desc
    page = write_report(args.output, replay, report, gt, pos, valid)
    return report, page


def pose_graph(args, encoder=None) -> int:
    """`eval --pose-graph`: the loops the pipeline verifies on an RGB-D sequence, in a GTSAM pose
    graph over drifted odometry (megaloc_ros/evaluation/trajectory_eval.py); 1 when a goal is missed."""
    import json
    from dataclasses import asdict

    from megaloc_ros.evaluation import trajectory_eval as TE
    settings = pipeline_settings(args.params, cli_overrides(args), verify=True)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.robots == 2:
        from megaloc_ros.evaluation import fleet_trajectory as FT
        f = FT.run(TE.DriftModel(), seeds=args.drift_seeds, settings=settings, encoder=encoder)
        print(FT.report(f))
        (out / "fleet_pose_graph.json").write_text(json.dumps(asdict(f), indent=1))
        print(f"figures: {out / 'fleet_pose_graph.json'}")
        return 0 if all(s.merged_at_frame >= 0 for s in f.seeds) else 1
    r = TE.run(args.pose_graph, TE.DriftModel(), seeds=args.drift_seeds, settings=settings, encoder=encoder)
    print(TE.report(r))
    d = asdict(r)
    d.update(median_gain=r.median_gain, max_wrong_change=r.max_wrong_change)
    (out / "pose_graph.json").write_text(json.dumps(d, indent=1))
    print(f"figures: {out / 'pose_graph.json'}")
    return 0 if r.meets_goals() else 1


def main(args, encoder=None) -> int:
    from megaloc_ros.evaluation.report import format_loops, format_text
    if args.rate <= 0:
        raise MegalocError("--rate must be positive")
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    if args.pose_graph:
        return pose_graph(args, encoder)
    if not args.bag:
        raise MegalocError("give a bag to replay (or --pose-graph SEQUENCE)")
    report, page = run(args, encoder)
    print(format_loops(report))
    print()
    print(format_text(report))
    pics = (report.get("explanations") or {})
    if pics.get("pictures"):
        print(f"why each loop was accepted or rejected: {len(pics['pictures'])} pictures in "
              f"{page.parent / 'explanations'}")
    elif pics.get("note"):
        print(f"explanation pictures: {pics['note']}")
    print(f"report: {page}")
    return 0
