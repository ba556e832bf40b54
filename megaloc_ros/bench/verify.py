"""`megaloc-ros bench verify`: what verification buys on a real sequence, and what it costs.

Runs the nodes' pipeline stages frame by frame (megaloc_ros/pipeline.py: cached encoder
features -> mapping with default ``DetectorParams`` -> verification with default
``VerifierParams``) over a shipped sequence and
prints one table with three rows:

  global only                 the detector's published candidates (operating point) and the
                              sweep of its top-1 global score (recall at 100% precision);
  global + verification       the same published candidates, kept when the verifier accepts;
  top-k + verification        the detector's raw top-k retrievals given to the verifier (what
                              the pipeline does with DetectorParams similarity_threshold -1,
                              consistency_k 1, island_radius 0, duplicate_window_s 0): the
                              verifier alone decides, and loops the global descriptor scores
                              or ranks low can be recovered.

Scoring is ``megaloc_ros.evaluation.metrics`` (see its docstring): a query frame's reported
loop is a true positive if ``gt[query, match]`` and the match lies outside the exclusion
window; the recall denominator is the number of query frames with any ground-truth match among
earlier frames outside that window (``--exclude-s``, default: the detector's
``exclude_recent_s``). Precision/recall at the operating point count what is published;
recall at 100% precision sweeps the global score of each query's best (accepted) candidate.

Latency: wall time of ``Verifier.verify`` divided by its number of candidates (per verified
candidate, query-side work amortised), and of ``Verifier.add_keyframe`` per keyframe, on this
machine's CPU. Bytes per keyframe: the verifier's measured mean after the run.
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sequence", default="rtabmap", choices=["rtabmap", "corridor"],
                   help="shipped sequence (default: %(default)s)")
    p.add_argument("--model-path", default=None, help="exported model (.onnx); default: load_encoder()")
    p.add_argument("--threshold", type=float, default=None,
                   help="detector similarity_threshold (default: DetectorParams default)")
    p.add_argument("--exclude-s", type=float, default=None,
                   help="evaluation exclusion window in seconds (default: the detector's)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a verifier setting, e.g. --set verifier.min_inliers=30 (repeatable)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--sets", nargs="+", default=None, metavar="SET",
                   choices=["all", "rtabmap", "corridor", "tum_fr3_cabinet", "tum_pairs"],
                   help="instead of --sequence: the verifier on several real sets with one table "
                        "(accepted true/false, verification recall, ROC AUC per signal, latency; "
                        "megaloc_ros/bench/verify_sets.py); 'all' = rtabmap corridor tum_fr3_cabinet tum_pairs")
    p.add_argument("--camera", default=None, metavar="SPEC",
                   help="with --sets: the images as another camera would take them: gray, scale=S, jpeg=Q "
                        "or blur=K (K px motion blur); labels and settings unchanged")


def parse_overrides(items: list[str]):
    """``["verifier.min_inliers=30", ...]`` -> VerifierParams with those settings (``settings.parse_set``
    syntax and typing; names as in config/loop_closure.yaml)."""
    from megaloc_ros.errors import MegalocError
    from megaloc_ros.settings import from_flat, parse_set
    from megaloc_ros.verification.verifier import VerifierParams
    values = parse_set(items)
    other = [k for k in values if not k.startswith("verifier.")]
    if other:
        raise MegalocError(f"--set {other[0]}: bench verify takes verifier.* settings only "
                           "(e.g. --set verifier.min_inliers=30)")
    return from_flat(VerifierParams, "verifier", values)


def run(sequence: str = "rtabmap", model: str | None = None, threshold: float | None = None,
        exclude_s: float | None = None, features=None, verifier_params=None,
        detector_params=None) -> dict:
    """Replay ``sequence``; returns the figures the table prints. ``features`` (list of
    ImageFeatures per frame) skips encoding, e.g. from test fixtures."""
    from megaloc_ros import pipeline as PL
    from megaloc_ros.evaluation import metrics
    from megaloc_ros.io import datasets
    from megaloc_ros.mapping.detector import DetectorParams
    from megaloc_ros.verification.verifier import VerifierParams

    seq = datasets.SEQUENCES[sequence]()
    model_name = "features"
    if features is None:
        from megaloc_ros.encoding.encoder import encode_files
        from megaloc_ros.encoding.loader import load_encoder
        enc = load_encoder(model)
        model_name = enc.description
        features = encode_files(enc, seq.image_paths)
    dp = detector_params or DetectorParams()
    if threshold is not None:
        dp.similarity_threshold = threshold
    if exclude_s is None:
        exclude_s = dp.exclude_recent_s
    vp = verifier_params or VerifierParams()
    settings = PL.PipelineSettings(detector=dp, verifier=vp)
    # the nodes' stages, fed the cached features (no encoding stage)
    pipe = PL.LoopClosurePipeline(None, PL.build_mapping(settings, "bench", features[0].descriptor.shape[0]),
                                  PL.build_verification(vp))
    verifier = pipe.verifier
    changed = {k: v for k, v in vars(vp).items() if getattr(VerifierParams(), k) != v}

    n = len(seq)
    frame_of: dict[int, int] = {}
    retrieved = [[] for _ in range(n)]
    published = [[] for _ in range(n)]
    accepted_pub = [[] for _ in range(n)]
    accepted_top = [[] for _ in range(n)]
    t_add, t_cand, t_geom = [], [], []
    reasons: dict[str, int] = {}

    def tally(res, ms):
        """Per-candidate latency and decision kinds of one verify call; accepted (frame, score)."""
        t_cand.extend([ms / len(res)] * len(res))
        t_geom.extend(t for t, r in zip(verifier.last_candidate_ms, res)
                      if _reason_kind(r.reason) in ("accepted", "rejected: inliers", "rejected: passed"))
        for r in res:
            kind = _reason_kind(r.reason)
            reasons[kind] = reasons.get(kind, 0) + 1
        return [(frame_of[r.candidate.match.id], r.candidate.score) for r in res if r.accepted]

    for i in range(n):
        image = seq.load_rgb(i)
        out = pipe.process(image, int(seq.stamps_ns[i]), int(seq.sessions[i]), features=features[i])
        det = out.detection
        if det.keyframe is None:
            continue
        frame_of[det.keyframe.id] = i
        t_add.append(out.timings_ms["add_keyframe"])
        retrieved[i] = [(frame_of[c.match.id], c.score) for c in det.retrieved]
        published[i] = [(frame_of[c.match.id], c.score) for c in det.candidates]
        if det.retrieved:
            accepted_top[i] = tally(out.loops, out.timings_ms["verify"])
        if det.candidates:  # the second row: the verifier given only the detector's decisions
            accepted_pub[i] = tally(*pipe.verification.verify(det.candidates))

    valid = metrics.valid_pairs(seq.gt, seq.stamps_ns, exclude_s)
    rows = {}
    for name, pub, curve_src in [("global only", published, retrieved),
                                 ("global + verification", accepted_pub, accepted_pub),
                                 ("top-k + verification", accepted_top, accepted_top)]:
        op = metrics.operating_point(pub, valid, seq.labeled)
        curve = metrics.curve_from_matches(curve_src, valid, seq.labeled)
        rows[name] = {"precision": op["precision"], "recall": op["recall"], "loops": op["loops"],
                      "false_loops": op["false_loops"], "unlabeled_loops": op.get("unlabeled_loops", 0),
                      "recall_at_100_precision": curve.max_recall_at_full_precision}
    a, c = np.asarray(t_add), np.asarray(t_cand)
    return {
        "sequence": sequence, "frames": n, "keyframes": len(frame_of), "model": model_name,
        "n_positive": int(valid.any(axis=1).sum()), "exclude_s": exclude_s,
        "similarity_threshold": dp.similarity_threshold, "rows": rows,
        "verify_ms_per_candidate": {"median": float(np.median(c)) if c.size else None,
                                    "p90": float(np.percentile(c, 90)) if c.size else None,
                                    "n": int(c.size)},
        "geometry_checked_ms": {"median": float(np.median(t_geom)) if t_geom else None,
                                "p90": float(np.percentile(t_geom, 90)) if t_geom else None,
                                "n": len(t_geom)},
        "add_keyframe_ms": {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
                            "max": float(a.max()), "n": int(a.size)},
        "bytes_per_keyframe": verifier.bytes_per_keyframe(),
        "vocabulary": verifier.has_vocabulary, "reasons": reasons,
        "verifier_params": "defaults" + "".join(f", {k}={v}" for k, v in changed.items()),
    }


def _reason_kind(reason: str) -> str:
    """'rejected: 12 inliers < 20 (31 matches); ...' -> 'rejected: inliers'."""
    verdict, _, rest = reason.partition(": ")
    if verdict == "accepted":
        return "accepted"
    for word in ("passed", "global", "segvlad", "inliers", "never added"):
        if word in rest.split(";")[0]:
            return f"rejected: {word}"
    return verdict


def print_table(r: dict) -> None:
    print(f"sequence {r['sequence']}: {r['frames']} frames, {r['keyframes']} keyframes, "
          f"{r['n_positive']} queries with a true earlier match (exclusion {r['exclude_s']:g} s)")
    print(f"model: {r['model']}")
    print(f"detector similarity_threshold {r['similarity_threshold']:.2f}; "
          f"verifier: {r['verifier_params']}")
    v = r["verify_ms_per_candidate"]
    lat = "-" if v["median"] is None else f"{v['median']:.1f} / {v['p90']:.1f}"
    hdr = f"{'':24s} {'precision':>9s} {'recall':>7s} {'loops(false)':>12s} {'R@100%P':>8s} {'verify ms/cand med/p90':>23s}"
    print(hdr)
    for name, row in r["rows"].items():
        l = "-" if name == "global only" else lat
        prec = f"{row['precision']:9.3f}" if row["loops"] else f"{'- (none)':>9s}"  # no loops: no precision
        print(f"{name:24s} {prec} {row['recall']:7.3f} "
              f"{row['loops']:>7d} ({row['false_loops']:d}) {row['recall_at_100_precision']:8.3f} {l:>23s}")
    rows = r["rows"]
    unl = {name: row["unlabeled_loops"] for name, row in rows.items() if row.get("unlabeled_loops")}
    if unl:
        print("not counted, on pairs the set does not label (within one traversal): "
              + ", ".join(f"{name} {n}" for name, n in unl.items()))
    g0, vk = rows["global only"], rows["top-k + verification"]
    if not vk["loops"]:
        print("=> the verifier accepted no loop on this sequence (nothing confirmed, nothing false)")
    else:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731  (None: nothing published)
        print(f"=> detector alone: precision {fmt(g0['precision'])} at recall {g0['recall']:.3f}; with the "
              f"verifier deciding on its top-k: precision {fmt(vk['precision'])} at recall {vk['recall']:.3f}. "
              f"Recall at 100% precision {g0['recall_at_100_precision']:.3f} -> {vk['recall_at_100_precision']:.3f}.")
    a, g = r["add_keyframe_ms"], r["geometry_checked_ms"]
    if g["n"]:
        print(f"candidates that reached RANSAC ({g['n']}): {g['median']:.1f} ms median, "
              f"{g['p90']:.1f} ms p90 each (the others stop before geometry)")
    print(f"verify latency over {v['n']} candidates; add_keyframe {a['median']:.1f} ms median, "
          f"{a['p90']:.1f} ms p90 (segments + SIFT + SegVLAD, once per keyframe); max {a['max']:.0f} ms "
          f"(with a map-fitted vocabulary: its one-off fit)")
    print(f"verifier storage: {r['bytes_per_keyframe'] / 1024:.1f} KiB per keyframe "
          f"(SuperSegment descriptors fp16 + local features)")
    print("decisions: " + "; ".join(f"{k} x{n}" for k, n in sorted(r["reasons"].items(), key=lambda x: -x[1])))


def main(args: argparse.Namespace) -> int:
    if args.sets:
        from megaloc_ros.bench import verify_sets
        sets = verify_sets.SETS if "all" in args.sets else tuple(args.sets)
        vp = parse_overrides(args.set)
        encoder = None
        if args.model_path:
            from megaloc_ros.encoding.loader import load_encoder
            encoder = load_encoder(args.model_path)
        res = verify_sets.run(sets, encoder, vp, camera=args.camera)
        verify_sets.print_sets(res, vp)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
        return 0
    r = run(args.sequence, args.model_path, args.threshold, args.exclude_s,
            verifier_params=parse_overrides(args.set))
    print_table(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0
