"""`megaloc-ros bench verify --sets ...`: the verifier on several real sets, with decisions that
must transfer (no threshold chosen per set).

Sets:
  rtabmap          84 indoor frames, loop matrix (data/rtabmap)        -- the set every verifier
                   setting was chosen on (and one of the SegVLAD vocabulary's sources)
  corridor         111 + 111 frames, 160x120 fisheye, ground_truth.csv (no intrinsics)
  tum_fr3_cabinet  58 RGB-D keyframes, ground truth from covisibility (max of both directions
                   >= 0.25; megaloc_ros/evaluation/covisibility.py), TUM fr3 intrinsics
  tum_pairs        the viewpoint-heavy pair set (megaloc_ros/evaluation/viewpoint_pairs.py):
                   TUM pairs >= 30 deg apart and >= 25% covisible both ways, and as many
                   zero-covisibility pairs (a TUM frame against an rtabmap frame)

Sequences run through the pipeline's stages (``LoopClosurePipeline.process`` with cached encoder
features, default ``DetectorParams``): the verifier decides on the detector's raw top-k of every
keyframe. The pair set calls the Verification stage directly: every frame of both scenes is
added as a keyframe, then each pair is verified as a one-candidate query, by the pair decision
alone (``consistency_window`` 0: a pair has no neighbouring keyframes to be consistent with; on
the sequences a loop must also be consistent with the keyframes before it).

Per set:
  accepted true / false  loops the verifier accepted whose pair is / is not the same place
                         (sequences: ``gt`` outside the detector's exclusion window, as in
                         megaloc_ros.evaluation.metrics; pairs: the pair's label). Corridor labels
                         query-reference pairs only: candidates within one traversal (its route
                         passes some places twice) are neither, left out of the table and counted
                         apart ("unlabelled"). Each false accept is listed with its distance
                         in frames to the nearest match the ground truth gives the query: a few
                         is a near miss (the same stretch, just outside the labels);
  verification recall    queries with an accepted true loop / queries whose top-k holds a true
                         match (pairs: accepted positives / positives): what the verifier keeps
                         of what retrieval offered, separate from the backbone's own recall;
  ROC AUC                of each signal over all verified candidates (true vs false):
                         global cosine, SegVLAD score, SegVLAD z-score (the decision's form;
                         "-" where no candidate of a class had one: a map too small for a
                         background), geometry (-log10 NFA);
  latency                ms per keyframe added (median, p90), ms per verified candidate (median);
  recall by view angle   (TUM sets) the same recall split by the angle between the optical axes
                         of a query and its nearest true match offered (pairs: of the pair):
                         where it is lost. Covisibility counts a shared floor seen from two sides
                         of the plain cabinet: 15 of its 23 offered queries have no true match
                         offered closer than 30 deg;
  wrong transforms       (TUM sets, which have motion capture) accepted true loops whose rotation
                         is more than 10 deg off the motion capture's: a covisible pair matched on
                         the wrong structure (the cabinet's sides look alike) gives a back end a
                         wrong edge, so these count against the goal like false accepts.

``camera`` (``--camera``) replays the sets as another camera would have taken them, encoder and
verifier alike: ``gray`` (a mono camera), ``scale=S`` (another resolution; intrinsics follow),
``jpeg=Q`` (stronger compression), ``blur=K`` (K px horizontal motion blur). Ground truth and
every setting stay as they are: a check that decisions transfer across cameras, on scenes whose
labels are known.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import numpy as np

SETS = ("rtabmap", "corridor", "tum_fr3_cabinet", "tum_pairs")
GOALS = {"rtabmap": 0.8, "tum_fr3_cabinet": 0.8, "tum_pairs": 0.7, "corridor": 0.5}
ADD_MS_GOAL, CAND_MS_GOAL = 150.0, 20.0


def roc_auc(labels, scores) -> Optional[float]:
    """Area under the ROC curve (Mann-Whitney, ties count half); None without both classes.
    Candidates without the signal (NaN) are left out."""
    y = np.asarray(labels, bool)
    s = np.asarray(scores, np.float64)
    ok = np.isfinite(s)
    y, s = y[ok], s[ok]
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks of ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


CAMERAS = ("gray", "scale=S", "jpeg=Q", "blur=K")


def _camera_op(camera: str):
    """(function BGR image -> BGR image, JPEG quality) of a ``--camera`` spec."""
    import cv2
    from megaloc_ros.errors import MegalocError
    kind, _, val = camera.partition("=")
    try:
        x = float(val) if val else None
    except ValueError:
        x = None
    if kind == "gray" and not val:
        return lambda im: cv2.cvtColor(cv2.cvtColor(im, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR), 95
    if kind == "scale" and x is not None and 0.1 <= x <= 4:
        return lambda im: cv2.resize(im, None, fx=x, fy=x,
                                     interpolation=cv2.INTER_AREA if x < 1 else cv2.INTER_CUBIC), 95
    if kind == "jpeg" and x is not None and 1 <= x <= 100:
        return lambda im: im, int(x)
    if kind == "blur" and x is not None and 2 <= x <= 64:
        k = int(x)
        kernel = np.zeros((k, k), np.float32)
        kernel[k // 2, :] = 1.0 / k
        return lambda im: cv2.filter2D(im, -1, kernel), 95
    raise MegalocError(f"--camera {camera!r}: expected one of {', '.join(CAMERAS)} "
                       "(S in 0.1-4, Q in 1-100, K in 2-64)")


def as_camera(paths, camera: Optional[str]) -> list:
    """``paths``, or (``camera`` given) copies of the images as that camera would have taken
    them, written once under the cache (``cache_root()/camera/<spec>``)."""
    import hashlib

    import cv2
    from pathlib import Path
    from megaloc_ros.encoding.cache import cache_root
    if not camera:
        return list(paths)
    op, quality = _camera_op(camera)
    d = cache_root() / "camera" / camera.replace("=", "-")
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        o = d / (hashlib.sha256(Path(p).read_bytes()).hexdigest()[:20] + ".jpg")
        if not o.is_file():
            tmp = o.with_suffix(".tmp.jpg")
            cv2.imwrite(str(tmp), op(cv2.imread(str(p), cv2.IMREAD_COLOR)), [cv2.IMWRITE_JPEG_QUALITY, quality])
            tmp.replace(o)
        out.append(o)
    return out


def _sequence(name: str, camera: Optional[str] = None):
    """(ImageSequence, geometry.Camera or None, camera-to-world poses or None,
    depth in metres of frame i or None: an RGB-D set gives the verifier its depth, as an RGB-D
    robot would, so loop transforms come from PnP); images as ``camera`` took them."""
    from megaloc_ros.evaluation.covisibility import as_image_sequence
    from megaloc_ros.io import datasets, tum
    from megaloc_ros.verification.geometry import Camera
    if name == "tum_fr3_cabinet":
        t = tum.tum_fr3_cabinet()
        seq, cam, poses, depth = as_image_sequence(t), Camera(t.K, t.image_size), t.poses, t.depth_m
    else:
        seq, cam, poses, depth = datasets.SEQUENCES[name](), None, None, lambda i: None
    return dataclasses.replace(seq, image_paths=as_camera(seq.image_paths, camera)), cam, poses, depth


ANGLE_BANDS = (0.0, 30.0, 60.0, 90.0)  # deg: recall is shown for [0, 30), [30, 60), [60, 90), >= 90


def angle_deg(poses, q: int, m: int) -> Optional[float]:
    """Angle between the optical axes of frames q and m (deg); None without poses."""
    from megaloc_ros.evaluation.covisibility import viewing_angle_deg
    return None if poses is None else viewing_angle_deg(poses[q], poses[m])


def recall_by_angle(offered: dict, confirmed) -> list[tuple[str, int, int]]:
    """[(band, confirmed, offered)] over ``ANGLE_BANDS``; ``offered``: query -> angle (deg) to its
    nearest true match offered (None: no poses, then [])."""
    if not offered or any(a is None for a in offered.values()):
        return []
    edges = list(ANGLE_BANDS) + [np.inf]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        qs = [q for q, a in offered.items() if lo <= a < hi]
        name = f"{lo:.0f}-{hi:.0f}" if np.isfinite(hi) else f">={lo:.0f}"
        out.append((name, sum(q in confirmed for q in qs), len(qs)))
    return out


MAX_ROTATION_ERROR_DEG = 10.0  # motion capture and vision disagree by ~2 deg on these frames


def transform_errors(loop, poses, q: int, m: int) -> Optional[tuple[float, Optional[float]]]:
    """(angle in deg between an accepted loop's rotation (query camera -> match camera) and the
    motion capture's, its translation's error in cm when metric, else None); None without a
    transform or poses. A loop whose pair is covisible but whose transform is wrong (the cabinet
    seen from its other, similar-looking side) misleads a back end as much as a false loop does."""
    from megaloc_ros.verification.metric_pose import pose_error
    if poses is None or loop.transform is None:
        return None
    T = np.eye(4)
    T[:3, :3] = loop.transform.rotation
    T[:3, 3] = loop.transform.translation
    t_m, r_deg = pose_error(T, np.linalg.inv(poses[m]) @ poses[q])
    return r_deg, (100.0 * t_m if loop.transform.metric_scale else None)


def _features(encoder, paths):
    from megaloc_ros.encoding.encoder import encode_files
    return encode_files(encoder, paths)


def _signals(ev, cand) -> tuple[float, float, float, float]:
    """global cosine, SegVLAD z, -log10 NFA, raw SegVLAD score (NaN where absent)."""
    z = np.nan if ev is None or ev.segvlad_z is None else ev.segvlad_z
    g = np.nan if ev is None or ev.significance is None else ev.significance.score
    sv = np.nan if ev is None or ev.segvlad is None else ev.segvlad
    return float(cand.score), float(z), float(g), float(sv)


def run_sequence(name: str, encoder=None, verifier_params=None, features=None, camera=None) -> dict:
    from megaloc_ros import pipeline as PL
    from megaloc_ros.evaluation import metrics
    from megaloc_ros.mapping.detector import DetectorParams
    from megaloc_ros.verification.verifier import VerifierParams
    seq, intrinsics, poses, depth = _sequence(name, camera)
    feats = features if features is not None else _features(encoder, seq.image_paths)
    dp = DetectorParams()
    vp = verifier_params or VerifierParams()
    settings = PL.PipelineSettings(detector=dp, verifier=vp)
    pipe = PL.LoopClosurePipeline(None, PL.build_mapping(settings, "bench", feats[0].descriptor.shape[0]),
                                  PL.build_verification(vp, intrinsics))
    verifier = pipe.verifier
    valid = metrics.valid_pairs(seq.gt, seq.stamps_ns, dp.exclude_recent_s)
    frame_of: dict[int, int] = {}
    rows = []            # (query frame, match frame, label, global, z, geometry, accepted)
    t_add, t_cand = [], []
    offered: dict[int, Optional[float]] = {}   # query frame -> angle to its nearest true match offered
    confirmed = set()
    true_acc = false_acc = 0
    pose_errors = []
    false_loops = []    # (query frame, match frame, frames from the nearest match the truth gives)
    unlabeled = [0, 0]  # candidates, accepted loops on pairs the set does not label
    for i in range(len(seq)):
        out = pipe.process(seq.load_rgb(i), int(seq.stamps_ns[i]), int(seq.sessions[i]), features=feats[i],
                           depth_m=depth(i))
        det = out.detection
        if det.keyframe is None:
            continue
        frame_of[det.keyframe.id] = i
        t_add.append(out.timings_ms["add_keyframe"])
        if not det.retrieved:
            continue
        t_cand.extend(verifier.last_candidate_ms)
        evs = list(verifier.last_evidence)
        for k, r in enumerate(out.loops):
            # a loop confirmed late belongs to an earlier query (only out of order; not here)
            q = frame_of[r.candidate.query.id]
            m = frame_of[r.candidate.match.id]
            if seq.labeled is not None and not seq.labeled[q, m]:
                unlabeled[0] += 1
                unlabeled[1] += r.accepted
                continue
            y = bool(valid[q, m])
            ev = evs[k] if k < len(evs) else None
            rows.append((q, m, y, *_signals(ev, r.candidate), r.accepted))
            if y:
                a = angle_deg(poses, q, m)
                offered[q] = a if q not in offered or a is None else min(a, offered[q])
            if r.accepted:
                true_acc += y
                false_acc += not y
                if y:
                    confirmed.add(q)
                    pose_errors.append(transform_errors(r, poses, q, m))
                else:
                    truth = np.flatnonzero(seq.gt[q])
                    false_loops.append((q, m, int(np.abs(truth - m).min()) if truth.size else None))
    what = f"{len(seq)} frames, {len(frame_of)} keyframes"
    if seq.labeled is not None:
        what += (f"; {unlabeled[0]} candidates within one traversal (not labelled by the set, not "
                 f"counted), {unlabeled[1]} of them accepted")
    out = _summary(name, rows, offered, confirmed, true_acc, false_acc, t_add, t_cand, verifier, what, pose_errors)
    out["unlabeled"] = {"candidates": unlabeled[0], "accepted": unlabeled[1]}
    out["false_loops"] = false_loops
    out["camera"] = camera or "as recorded"
    return out


def run_pairs(encoder=None, verifier_params=None, features: Optional[dict] = None, n: int = 60,
              camera: Optional[str] = None) -> dict:
    from megaloc_ros.evaluation import viewpoint_pairs as VP
    from megaloc_ros.io import datasets, tum
    from megaloc_ros.types import Candidate, Keyframe
    from megaloc_ros.verification.geometry import Camera
    from megaloc_ros.verification.verifier import Verifier, VerifierParams
    t = tum.tum_fr3_cabinet()
    t = dataclasses.replace(t, rgb_paths=as_camera(t.rgb_paths, camera))
    other = datasets.rtabmap()
    other = dataclasses.replace(other, image_paths=as_camera(other.image_paths, camera))
    features = features or {}
    f_t = features.get("tum_fr3_cabinet") or _features(encoder, t.rgb_paths)
    f_o = features.get("rtabmap") or _features(encoder, other.image_paths)
    pairs = VP.pairs(n, t, n_other=len(other))
    # isolated pairs have no sequence: the pair decision alone (consistency_window would only
    # pick up chance neighbours among the pairs' ids)
    vp = dataclasses.replace(verifier_params or VerifierParams(), consistency_window=0)
    v = Verifier(vp, Camera(t.K, t.image_size))
    # the map: the other scene first (ids 0..), then the TUM frames (ids 1000 + i)
    base = {"rtabmap": 0, "tum": 1000}
    kfs = {}
    t_add = []
    for s, seq, f in (("rtabmap", other, f_o), ("tum", t, f_t)):
        for i in range(len(seq)):
            kf = Keyframe(base[s] + i, (base[s] + i) * 1_000_000_000)
            kfs[(s, i)] = kf
            t0 = time.perf_counter()
            v.add_keyframe(kf, seq.load_rgb(i), f[i])
            t_add.append((time.perf_counter() - t0) * 1e3)
    desc = {("rtabmap", i): f_o[i].descriptor for i in range(len(other))}
    desc.update({("tum", i): f_t[i].descriptor for i in range(len(t))})
    rows, t_cand = [], []
    offered: dict[int, float] = {}
    confirmed = set()
    true_acc = false_acc = 0
    pose_errors = []
    for k, p in enumerate(pairs):
        c = Candidate(kfs[p.query], kfs[p.match], float(desc[p.query] @ desc[p.match]), 0)
        r = v.verify([c])[0]
        t_cand.extend(v.last_candidate_ms)
        ev = v.last_evidence[0] if v.last_evidence else None
        rows.append((k, k, p.positive, *_signals(ev, c), r.accepted))
        if p.positive:
            offered[k] = p.angle_deg
        if r.accepted:
            true_acc += p.positive
            false_acc += not p.positive
            if p.positive:
                confirmed.add(k)
                pose_errors.append(transform_errors(r, t.poses, p.query[1], p.match[1]))
    n_pos = sum(p.positive for p in pairs)
    angles = [p.angle_deg for p in pairs if p.positive]
    out = _summary("tum_pairs", rows, offered, confirmed, true_acc, false_acc, t_add, t_cand, v,
                   f"{n_pos} positive pairs ({min(angles):.0f}-{max(angles):.0f} deg), "
                   f"{len(pairs) - n_pos} zero-covisibility pairs, each decided on its own "
                   "(consistency_window 0)", pose_errors)
    out["camera"] = camera or "as recorded"
    return out


def _summary(name, rows, offered, confirmed, true_acc, false_acc, t_add, t_cand, verifier, what,
             pose_errors=()) -> dict:
    a = np.array([r[2:7] for r in rows], np.float64).reshape(-1, 5)
    checked = [e for e in pose_errors if e is not None]   # (rotation deg, translation cm or None)
    errs = [r for r, _ in checked]
    y = a[:, 0] > 0
    return {
        "set": name, "what": what, "candidates": len(rows),
        "accepted_true": int(true_acc), "accepted_false": int(false_acc),
        # accepted true loops whose rotation is checked against motion capture, and how many are off
        "poses_checked": len(errs), "wrong_pose": int(sum(e > MAX_ROTATION_ERROR_DEG for e in errs)),
        "rotation_errors_deg": [round(e, 2) for e in errs],
        # of those, the ones with a metric transform: its translation's error
        "translation_errors_cm": [round(t, 2) for _, t in checked if t is not None],
        "queries_offered": len(offered), "queries_confirmed": len(confirmed),
        "verification_recall": (len(confirmed) / len(offered)) if offered else None,
        "recall_by_angle": recall_by_angle(offered, confirmed),
        "auc": {"global": roc_auc(y, a[:, 1]), "segvlad": roc_auc(y, a[:, 4]),
                "segvlad_z": roc_auc(y, a[:, 2]), "geometry": roc_auc(y, a[:, 3])},
        "add_ms": {"median": float(np.median(t_add)), "p90": float(np.percentile(t_add, 90)),
                   "n": len(t_add)},
        "candidate_ms": {"median": float(np.median(t_cand)) if t_cand else None, "n": len(t_cand)},
        "vocabulary": getattr(verifier, "vocabulary_source", ""),
        "bytes_per_keyframe": verifier.bytes_per_keyframe(),
        # per candidate: query, match, label, global, segvlad z, -log10 NFA, segvlad, accepted
        "rows": [list(r) for r in rows],
    }


def run(sets=SETS, encoder=None, verifier_params=None, features: Optional[dict] = None,
        camera: Optional[str] = None) -> list[dict]:
    """Each named set in turn; ``features``: {set name: list of ImageFeatures} to skip encoding
    (of the images as ``camera`` took them)."""
    if encoder is None and not features:
        from megaloc_ros.encoding.loader import load_encoder
        encoder = load_encoder(device="cpu")
    features = features or {}
    out = []
    for s in sets:
        if s == "tum_pairs":
            out.append(run_pairs(encoder, verifier_params, features, camera=camera))
        else:
            out.append(run_sequence(s, encoder, verifier_params, features.get(s), camera))
    return out


def _f(x, fmt="{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def print_sets(results: list[dict], verifier_params=None) -> None:
    from megaloc_ros.verification.verifier import VerifierParams
    vp = verifier_params or VerifierParams()
    print(f"verifier: local_features {vp.local_features}; decisions: -log10 NFA >= {vp.min_significance:g}, "
          f"or >= {vp.min_significance_segvlad:g} with segvlad z >= {vp.min_segvlad_z:g} "
          f"(chosen on rtabmap)")
    cams = sorted({r.get("camera", "as recorded") for r in results})
    if cams != ["as recorded"]:
        print(f"images: as another camera would take them ({', '.join(cams)}); labels and settings unchanged")
    hdr = (f"{'set':16s} {'acc true/false':>14s} {'recall':>15s} {'goal':>5s} "
           f"{'AUC global/segvlad/z/geometry':>30s} {'add ms med/p90':>15s} {'ms/cand':>8s}")
    print(hdr)
    for r in results:
        rec = f"{_f(r['verification_recall'])} ({r['queries_confirmed']}/{r['queries_offered']})"
        auc = "/".join(_f(r["auc"][k]) for k in ("global", "segvlad", "segvlad_z", "geometry"))
        add = f"{r['add_ms']['median']:.0f}/{r['add_ms']['p90']:.0f}"
        print(f"{r['set']:16s} {r['accepted_true']:>8d} / {r['accepted_false']:<3d} {rec:>15s} "
              f"{GOALS.get(r['set'], 0):5.2f} {auc:>30s} {add:>15s} {_f(r['candidate_ms']['median'], '{:.1f}'):>8s}")
    for r in results:
        print(f"  {r['set']}: {r['what']}; {r['candidates']} candidates verified; {r['vocabulary']}")
        if r.get("recall_by_angle"):
            print("    recall by angle to the true match: " + ", ".join(
                f"{band} deg {c}/{n}" for band, c, n in r["recall_by_angle"]))
        if r.get("false_loops"):
            print("    false accepts (query frame -> match frame, frames from the nearest match the ground truth "
                  "gives): " + ", ".join(f"{q} -> {m} ({'-' if d is None else d})" for q, m, d in r["false_loops"]))
        if r.get("poses_checked"):
            t = r.get("translation_errors_cm") or []
            print(f"    transforms of accepted true loops against motion capture: {r['wrong_pose']} of "
                  f"{r['poses_checked']} off by more than {MAX_ROTATION_ERROR_DEG:g} deg in rotation; "
                  + (f"{len(t)} metric, translation {min(t):.1f}-{max(t):.1f} cm off" if t else "none metric"))
    print("goals: zero false accepts on every set; recall >= goal column; "
          f"<= {ADD_MS_GOAL:.0f} ms per keyframe added, <= {CAND_MS_GOAL:.0f} ms median per candidate")
    for r in results:
        miss = []
        if r["accepted_false"]:
            miss.append(f"{r['accepted_false']} false accepts")
        if r.get("wrong_pose"):
            miss.append(f"{r['wrong_pose']} true accepts with a rotation > {MAX_ROTATION_ERROR_DEG:g} deg off the "
                        "motion capture")
        rec = r["verification_recall"]
        if rec is None or rec < GOALS.get(r["set"], 0):
            miss.append(f"recall {_f(rec)} < {GOALS.get(r['set'], 0):.2f}")
        if r["add_ms"]["median"] > ADD_MS_GOAL:
            miss.append(f"add {r['add_ms']['median']:.0f} ms > {ADD_MS_GOAL:.0f}")
        cm = r["candidate_ms"]["median"]
        if cm is not None and cm > CAND_MS_GOAL:
            miss.append(f"{cm:.1f} ms per candidate > {CAND_MS_GOAL:.0f}")
        print(f"  {r['set']}: " + ("all goals met" if not miss else "NOT met: " + "; ".join(miss)))
