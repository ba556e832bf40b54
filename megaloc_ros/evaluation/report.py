"""The evaluation report: metrics.json, PNG plots and one self-contained HTML page.

Plots (matplotlib, Agg backend, so no display is needed):
  pr_curves.png    precision-recall over the global-score threshold, without and with
                   verification, with the operating points the system actually published;
  similarity.png   descriptor cosine-similarity matrix next to the ground truth, with the
                   published loops marked (true / false, accepted / rejected by the verifier);
  trajectory.png   the path (when poses exist) with the published loops drawn as edges.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Optional

import numpy as np

from megaloc_ros.errors import MegalocError
from megaloc_ros.evaluation import metrics as M
from megaloc_ros.evaluation.replay import Replay, _jsonable

LATENCY_NOTE = ("Stages: decode = deserialise + decode the bag message; encode = the model; search = "
                "LoopDetector.process (keyframe test, map search, decisions, insertion); verify = "
                "Verifier.add_keyframe + verify of the frame's raw top-k (what the verifier node does "
                "per keyframe). Live mode: image_to_keyframe = publishing the image to receiving its "
                "~/keyframes message (DDS, queueing, encode, search); candidates_to_verdict = receiving "
                "~/retrieved to receiving the verifier's verdicts.")


# ---------------------------------------------------------------- the numbers

def evaluate(replay: Replay, gt: Optional[np.ndarray], exclude_s: float) -> dict:
    """Score ``replay`` against ``gt`` (None: loops and latency only). Returns the report dict."""
    frames = replay.frames
    out: dict = {
        "bag": replay.bag, "topic": replay.topic, "mode": replay.mode, "model": replay.model,
        "model_kind": replay.model_kind, "n_frames": len(frames),
        "keyframes": sum(f.keyframe_id is not None for f in frames),
        "map_size": replay.map_size, "map_bytes": replay.map_bytes, "verifier": replay.verifier,
        "latency": M.latency_summary(replay.timings()), "params": replay.params,
        "notes": list(replay.notes), "skipped_frames": len(replay.skipped),
    }
    loops = replay.loop_table()
    curves: dict = {}
    if gt is not None:
        retrieved = replay.matches("retrieved")
        published = replay.matches("candidates")
        accepted = replay.matches("accepted")
        m, curves = M.summarize(retrieved, published, accepted, gt, replay.stamps_ns, exclude_s)
        if not replay.verifier:
            m.pop("verified")
        valid = M.valid_pairs(gt, replay.stamps_ns, exclude_s)
        det = replay.params.get("detector", {})
        if "exclude_recent_s" in det and "exclude_recent_keyframes" in det:
            m["unreachable"] = M.unreachable(valid, [f.keyframe_id for f in frames], replay.stamps_ns,
                                             float(det["exclude_recent_s"]), int(det["exclude_recent_keyframes"]),
                                             skipped=replay.skipped)
        out["metrics"] = m
        for row in loops:
            row["true"] = bool(row["match"] is not None and valid[row["query"], row["match"]])
    out["loops"] = loops
    out["curves"] = {k: c.to_dict() for k, c in curves.items()
                     if k != "verified" or replay.verifier}
    return _jsonable(out)


def warnings(report: dict) -> list[str]:
    """Why recall is lower than the ground truth suggests: true loops the settings made
    impossible to find (``metrics.unreachable``), one line each; empty when there are none."""
    m = report.get("metrics") or {}
    if m and not m["n_positive"]:
        return [f"no frame has a true loop at least {m['exclude_s']:g} s older in the ground truth: recall "
                "is undefined (shown -)"]
    u = m.get("unreachable")
    if not u or not u["n"]:
        return []
    out = [f"{u['n']} of {u['n_positive']} frames with a true loop cannot be found with these settings, so "
           f"recall cannot exceed {_pct(u['max_recall'])}:"]
    for why, frames in u["frames"].items():
        out.append(f"  {len(frames)} hidden by {why} (frames {M.frame_ranges(frames)})")
    return out


def recall_denominator(m: dict) -> str:
    """The sentence saying what recall is counted over."""
    u = m.get("unreachable")
    kf = (f"; {u['n_positive_keyframes']} of them are keyframes, only keyframes query the map"
          if u is not None else "")
    return (f"{m['n_positive']} {m.get('recall_unit', M.RECALL_UNIT)} (of all {m['n_frames']} frames on the "
            f"topic, keyframes or not) have a true loop at least {m['exclude_s']:g} s older: the recall "
            f"denominator{kf}")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _f(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def metric_rows(report: dict) -> list[tuple[str, str, str]]:
    """(metric, without verification, with verification) rows for the text and HTML tables."""
    m = report.get("metrics")
    if not m:
        return []
    r, v = m["retrieval"], m.get("verified")
    pub = m["published"]
    rows = [
        ("PR AUC", _f(r["auc"]), _f(v["auc"]) if v else "-"),
        ("max recall @ 100% precision", _pct(r["max_recall_at_100_precision"]),
         _pct(v["max_recall_at_100_precision"]) if v else "-"),
        ("  at score threshold >=", _f(r["threshold_at_100_precision"]),
         _f(v["threshold_at_100_precision"]) if v else "-"),
    ]
    for k in (1, 5):
        rows.append((f"recall@{k}", _pct(r[f"recall@{k}"]), _pct(v[f"recall@{k}"]) if v else "-"))
    vp = v["operating_point"] if v else None
    rows += [
        ("published loops (true / false)", f"{pub['true_loops']} / {pub['false_loops']}",
         f"{vp['true_loops']} / {vp['false_loops']}" if vp else "-"),
        ("precision of published loops", _pct(pub["precision"]), _pct(vp["precision"]) if vp else "-"),
        ("recall of published loops", _pct(pub["recall"]), _pct(vp["recall"]) if vp else "-"),
    ]
    return rows


def format_text(report: dict) -> str:
    """The metrics table printed by `eval` and the demo."""
    lines = [f"model: {report['model']}",
             f"bag:   {report['bag']} ({report['topic']}, {report['n_frames']} frames, {report['mode']} replay)"]
    if report.get("camera"):
        lines.append(f"camera: {report['camera']}")
    for note in report.get("notes", []):
        lines.append(f"note:  {note}")
    m = report.get("metrics")
    if m:
        lines.append(f"ground truth: {m['gt_pairs']} same-place pairs; {recall_denominator(m)}")
        lines += [f"WARNING: {w}" if i == 0 else f"         {w.strip()}" for i, w in enumerate(warnings(report))]
        rows = metric_rows(report)
        w = max(len(a) for a, _, _ in rows)
        lines.append(f"{'':{w}}  {'retrieval only':>16}  {'+ verification':>16}")
        lines += [f"{a:{w}}  {b:>16}  {c:>16}" for a, b, c in rows]
    else:
        lines.append("no ground truth given: loops and latency only")
    lines.append(f"keyframes: {report['keyframes']} of {report['n_frames']} frames; map holds "
                 f"{report['map_size']} keyframes" + (f" ({_bytes(sum(report['map_bytes'].values()))})"
                                                      if report.get("map_bytes") else ""))
    lat = report.get("latency", {})
    if lat:
        lines.append("latency per frame (ms):  " + "   ".join(
            f"{k} {v['median_ms']:.1f} median / {v['p99_ms']:.1f} p99" for k, v in lat.items()))
    return "\n".join(lines)


def format_loops(report: dict, limit: int = 40) -> str:
    rows = report.get("loops", [])
    if not rows:
        return "no loops published"
    lines = [f"{'query':>6} {'match':>6} {'score':>6} {'verified':>9} {'v.score':>8} {'inliers':>8}  truth"]
    for r in rows[:limit]:
        ver = "-" if r["verified"] is None else ("yes" if r["verified"] else "no")
        truth = "-" if "true" not in r else ("TRUE" if r["true"] else "false")
        lines.append(f"{r['query']:>6} {str(r['match']):>6} {r['score']:6.3f} {ver:>9} "
                     f"{_f(r['verification_score'], 3):>8} {'-' if r['inliers'] is None else r['inliers']!s:>8}  "
                     f"{truth}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in metrics.json")
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------- plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_pr(report: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    styles = {"retrieval": ("retrieval only",
                            "tab:blue"), "verified": ("+ verification", "tab:green")}
    m = report["metrics"]
    for name, c in report["curves"].items():
        label, color = styles[name]
        rec, prec = np.array(c["recall"]), np.array(c["precision"])
        if len(rec) and m[name]["auc"] is not None:
            ax.plot(np.r_[0.0, rec], np.r_[prec[0], prec], "-", color=color, lw=2,
                    label=f"{label}: AUC {m[name]['auc']:.3f}, "
                          f"R@100%P {100 * m[name]['max_recall_at_100_precision']:.1f}%")
        else:
            ax.plot([], [], color=color, label=f"{label}: " + ("no predictions" if m["n_positive"]
                                                              else "no true loop, no recall"))
    thr = detector_threshold_point(report)
    if thr is not None:
        ax.plot(thr["recall"], thr["precision"], "*", ms=15, color="tab:orange", mec="black", mew=0.8, zorder=5,
                label=f"detector threshold {thr['threshold']:.2f} on this curve (P {100 * thr['precision']:.0f}%, "
                      f"R {100 * thr['recall']:.0f}%)")
    pub = m["published"]
    _operating_mark(ax, pub, "o", "tab:blue", "published candidates")
    if "verified" in m:
        _operating_mark(ax, m["verified"]["operating_point"], "s", "tab:green", "verified loops")
    u = m.get("unreachable")
    if u and u["n"] and u["max_recall"] is not None:
        ax.axvline(u["max_recall"], color="tab:red", ls="--", lw=1.2,
                   label=f"recall ceiling {100 * u['max_recall']:.0f}%: the settings hide the loops of {u['n']} frames")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(f"recall (of {m['n_positive']} {m.get('recall_unit', M.RECALL_UNIT)} with a true loop)")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall over the global-score threshold")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def detector_threshold_point(report: dict) -> Optional[dict]:
    """Where the detector's ``similarity_threshold`` sits on the retrieval-only curve: the point
    of the lowest swept threshold at or above it (None when no prediction reaches it)."""
    t = (report.get("params") or {}).get("detector", {}).get("similarity_threshold")
    c = (report.get("curves") or {}).get("retrieval")
    if t is None or not c or not len(c["thresholds"]):
        return None
    th = np.asarray(c["thresholds"])
    ok = np.flatnonzero(th >= float(t) - 1e-12)
    if not len(ok):
        return None
    i = int(ok[-1])
    return {"threshold": float(t), "precision": float(c["precision"][i]), "recall": float(c["recall"][i])}


def _operating_mark(ax, op: dict, marker: str, color: str, name: str) -> None:
    if op["precision"] is None or op["recall"] is None:  # nothing published, or no true loop
        ax.plot([], [], marker, ms=9, mfc="none", mec=color, mew=2,
                label=f"{name}: " + ("none (precision -)" if op["precision"] is None else "recall undefined"))
        return
    ax.plot(op["recall"], op["precision"], marker, ms=9, mfc="none", mec=color, mew=2,
            label=f"{name} ({op['true_loops']} true, {op['false_loops']} false)")


def plot_similarity(replay: Replay, report: dict, gt: Optional[np.ndarray], path: Path) -> None:
    plt = _plt()
    sim, step = replay.similarity()
    panels = 2 if gt is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 5.4), dpi=120, squeeze=False)
    ax = axes[0, 0]
    n = len(replay.frames)
    extent = (-0.5, len(sim) * step - 0.5, len(sim) * step - 0.5, -0.5)
    off = sim[~np.eye(len(sim), dtype=bool) & np.isfinite(sim)]
    off = off if off.size else np.ones(1)
    # contrast from the off-diagonal range: descriptors of one run often span only 0.8-1.0
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(sim), cmap=cmap, interpolation="nearest", extent=extent,
                   vmin=float(np.percentile(off, 2)), vmax=float(np.percentile(off, 99.9)))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    ax.set_title("Descriptor similarity" + (f" (every {step}th frame)" if step > 1 else "")
                 + (", ground truth outlined" if gt is not None else "")
                 + ("\n(white: frames that are not keyframes)" if np.isnan(sim).any() else ""), fontsize=10)
    ax.set_xlabel("frame")
    ax.set_ylabel("frame")
    if gt is not None:
        g = _pool(gt, step)
        if g.any():
            xs = np.arange(len(g)) * step + (step - 1) / 2
            ax.contour(xs, xs, g.astype(float), levels=[0.5], colors="red", linewidths=0.8)
        ax2 = axes[0, 1]
        ax2.imshow(np.tril(g), cmap="Greys", interpolation="nearest", vmin=0, vmax=1.6,
                   extent=extent)
        ax2.set_title("Ground truth (grey) and published loops")
        ax2.set_xlabel("match frame")
        ax2.set_ylabel("query frame")
        _loop_markers(ax2, report)
        ax2.set_xlim(-0.5, n - 0.5)
        ax2.set_ylim(n - 0.5, -0.5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pool(gt: np.ndarray, step: int) -> np.ndarray:
    """Max-pool a bool matrix by ``step`` so thin diagonals survive downsampling."""
    if step == 1:
        return np.asarray(gt, bool)
    n = len(gt)
    g = -(-n // step)
    pad = np.zeros((g * step, g * step), bool)
    pad[:n, :n] = gt
    return pad.reshape(g, step, g, step).any(axis=(1, 3))


def _loop_markers(ax, report: dict) -> None:
    groups = {}
    for r in report.get("loops", []):
        if r["match"] is None:
            continue
        key = (r.get("true"), r["verified"])
        groups.setdefault(key, []).append((r["match"], r["query"]))
    style = {True: ("tab:green", "true"), False: ("tab:red", "false"), None: ("tab:blue", "")}
    for (truth, verified), pts in sorted(groups.items(), key=str):
        color, tname = style[truth]
        marker = "o" if verified is not False else "x"
        vname = {True: "accepted", False: "rejected",
                 None: "no verdict" if report.get("verifier") else "candidate"}[verified]
        x, y = zip(*pts)
        style_kw = ({"facecolors": "none", "edgecolors": color} if marker == "o" else {"c": color})
        ax.scatter(x, y, s=28, marker=marker, linewidths=1.5, label=f"{tname} {vname} ({len(pts)})".strip(),
                   **style_kw)
    if groups:
        ax.legend(loc="upper right", fontsize=8)


def top_view_axes(positions: np.ndarray) -> tuple[tuple[int, int], int]:
    """((a, b), up): the two world axes to plot a trajectory on, seen from above, and the one
    left out: the axis along which the positions spread least (z for a ground robot in a z-up
    world, y for camera-frame poses with y down)."""
    p = np.asarray(positions, np.float64)
    spread = np.ptp(p, axis=0) if len(p) else np.zeros(3)
    up = int(np.argmin(spread)) if len(p) > 1 and spread.max() > 0 else 2
    a, b = [i for i in range(3) if i != up]
    return (a, b), up


def plot_trajectory(replay: Replay, report: dict, positions: np.ndarray, valid: np.ndarray,
                    path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=120)
    ok = np.asarray(valid, bool)
    (a0, a1), up = top_view_axes(np.asarray(positions)[ok])
    p = np.asarray(positions)[:, [a0, a1]]
    sc = ax.scatter(p[ok, 0], p[ok, 1], c=np.nonzero(ok)[0], cmap="viridis", s=10, zorder=2)
    ax.plot(p[ok, 0], p[ok, 1], "-", color="0.7", lw=1, zorder=1)
    fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.04, label="frame")
    seen = set()
    for r in report.get("loops", []):
        q, m = r["query"], r["match"]
        if m is None or not (ok[q] and ok[m]):
            continue
        if r["verified"] is False:
            color, name, z, lw = "0.75", "rejected by verifier", 2, 1.0
        else:
            color, name = {True: ("tab:green", "true loop"), False: ("tab:red", "false loop"),
                           None: ("tab:blue", "loop")}[r.get("true")]
            # true loops join nearby points: short edges, drawn last and thick so they show
            z, lw = (5, 3.0) if r.get("true") else (3, 1.2)
        ax.plot([p[q, 0], p[m, 0]], [p[q, 1], p[m, 1]], "-", color=color, lw=lw, zorder=z,
                label=None if name in seen else name)
        seen.add(name)
    ax.set_aspect("equal", adjustable="datalim")
    names = "xyz"
    ax.set_xlabel(f"{names[a0]} [m]")
    ax.set_ylabel(f"{names[a1]} [m]")
    ax.set_title(f"Trajectory seen from above ({names[up]} up: the axis it moves least along) and loops",
                 fontsize=10)
    ax.grid(alpha=0.3)
    if seen:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------- files

EXPLAIN_DIR = "explanations"     # under the report folder
EXPLAIN_HEIGHT = 240             # panel height of the report's pictures
EXPLAIN_MAX_SIDE = 640           # images read back from the bag are kept at most this large
MAX_EXPLANATIONS = 200           # pictures per report at most (accepted loops first)


def explanation_items(replay: Replay, report: dict, gt: Optional[np.ndarray]) -> list[dict]:
    """The verdicts the report draws: every loop the verifier accepted (what it publishes), then
    every true loop it rejected (``gt`` needed to know which), in frame order, each as
    ``{"query", "match" (frame indices), "loop" (VerifiedLoop), "true" (bool or None)}``."""
    frame_of = replay._frame_of()
    valid = None
    m = report.get("metrics")
    if gt is not None and m is not None:
        valid = M.valid_pairs(gt, replay.stamps_ns, m["exclude_s"])
    accepted, rejected = [], []
    for f in replay.frames:
        for loop in f.loops:
            mf = frame_of(loop.candidate.match)
            if mf is None:
                continue
            true = None if valid is None else bool(valid[f.index, mf])
            item = {"query": f.index, "match": mf, "loop": loop, "true": true}
            if loop.accepted:
                accepted.append(item)
            elif true:
                rejected.append(item)
    return accepted + rejected


def write_explanations(out: Path, replay: Replay, report: dict, gt: Optional[np.ndarray]) -> dict:
    """Render ``explanation_items`` into ``out``/explanations/*.png (``verification.explain``;
    the images come back from the bag). Returns ``{"pictures": [...], "note": str}`` for the
    report (each picture: file, frames, stamps, verdict, truth, reason)."""
    if not replay.verifier:
        return {"pictures": [], "note": "no verifier ran: no verdicts to explain"}
    verifier = replay.verifier_state
    if verifier is None:
        return {"pictures": [], "note": f"no explanation pictures: the {replay.mode} replay does not keep the "
                                        "verifier's state they are computed from (the offline replay does)"}
    items = explanation_items(replay, report, gt)
    note = ""
    if len(items) > MAX_EXPLANATIONS:
        note = f"{len(items)} verdicts to draw; the first {MAX_EXPLANATIONS} are drawn"
        items = items[:MAX_EXPLANATIONS]
    if not items:
        return {"pictures": [], "note": "no loop was accepted and no true loop rejected: nothing to draw"}
    import cv2
    from megaloc_ros.io.bag import BagReader
    from megaloc_ros.io.images import downscale
    from megaloc_ros.verification.explain import explain_details, render_explanation

    need = {i for it in items for i in (it["query"], it["match"])}
    rgb: dict[int, np.ndarray] = {}
    with BagReader(replay.bag) as r:
        for img in r.images(replay.topic, on_error=lambda *a: None, only=need):
            rgb[img.index] = downscale(img.rgb, EXPLAIN_MAX_SIDE)
    folder = out / EXPLAIN_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # a previous run's pictures would be shown as this run's
        old.unlink()
    pictures, failed = [], []
    stamps = replay.stamps_ns
    for it in items:
        q, m, loop = it["query"], it["match"], it["loop"]
        try:
            details = explain_details(verifier, loop.candidate)
            pic = render_explanation(rgb[q], rgb[m], loop, details, EXPLAIN_HEIGHT)
        except (KeyError, MegalocError) as exc:
            failed.append(f"{q}->{m}: {exc}")
            continue
        name = f"{EXPLAIN_DIR}/q{q:05d}_m{m:05d}.png"
        if not cv2.imwrite(str(out / name), np.ascontiguousarray(pic[:, :, ::-1]),
                           [cv2.IMWRITE_PNG_COMPRESSION, 6]):
            failed.append(f"{q}->{m}: cannot write {out / name}")
            continue
        pictures.append({"file": name, "query": q, "match": m, "query_stamp_s": int(stamps[q]) / 1e9,
                         "match_stamp_s": int(stamps[m]) / 1e9, "accepted": bool(loop.accepted),
                         "true": it["true"], "reason": loop.reason})
    if failed:
        note = (note + "; " if note else "") + f"{len(failed)} could not be drawn (e.g. {failed[0]})"
    return {"pictures": pictures, "note": note}


def write_report(out_dir: str | Path, replay: Replay, report: dict, gt: Optional[np.ndarray],
                 positions: Optional[np.ndarray] = None, positions_valid: Optional[np.ndarray] = None,
                 title: str = "megaloc_ros loop-closure evaluation") -> Path:
    """Write metrics.json, the PNGs (plots, and the explanation pictures under explanations/) and
    report.html into ``out_dir``; returns the HTML path. Adds ``plots`` and ``explanations`` to
    ``report``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    if report.get("metrics"):
        plot_pr(report, out / "pr_curves.png")
        images.append(("pr_curves.png", "Precision-recall curves"))
    if len(replay.descriptors):
        plot_similarity(replay, report, gt, out / "similarity.png")
        images.append(("similarity.png", "Similarity matrix and ground truth"))
    if positions is not None and positions_valid is not None and np.any(positions_valid):
        plot_trajectory(replay, report, positions, positions_valid, out / "trajectory.png")
        images.append(("trajectory.png", "Trajectory seen from above, with loop edges"))
    # also in the caller's dict, which `eval` prints from
    report["explanations"] = write_explanations(out, replay, report, gt)
    report["plots"] = [name for name, _ in images]
    (out / "metrics.json").write_text(json.dumps(report, indent=1) + "\n")
    page = out / "report.html"
    page.write_text(_html(report, images, title))
    return page


def _explanations_html(ex: dict) -> list[str]:
    e = html.escape
    pics = ex.get("pictures", [])
    out = [f"<h2>Why: the verifier's evidence ({len(pics)} pictures)</h2>"]
    if ex.get("note"):
        out.append(f"<p class='warn'>{e(ex['note'])}</p>")
    if not pics:
        return out
    out.append("<p>Query (left) and match (right): the query's segments tinted by how well their "
               "SuperSegment found a partner in the match, the best five and their partners numbered, "
               "geometric inliers in cyan; the verdict and its reason below. Click a picture to enlarge it; "
               "layout: megaloc_ros/verification/explain.py.</p>")
    groups = (("Published: loops the verifier accepted", [p for p in pics if p["accepted"]]),
              ("True loops the verifier rejected", [p for p in pics if not p["accepted"]]))
    for caption, group in groups:
        if not group:
            continue
        out.append(f"<h3>{e(caption)} ({len(group)})</h3><div class='thumbs'>")
        for p in group:
            truth = "" if p["true"] is None else (" true" if p["true"] else " <span class='bad'>FALSE</span>")
            verdict = "accepted" if p["accepted"] else "rejected"
            out.append(f"<figure><a href='{e(p['file'])}'><img loading='lazy' src='{e(p['file'])}' "
                       f"alt='frame {p['query']} to frame {p['match']}'></a><figcaption>frame {p['query']} "
                       f"(t={p['query_stamp_s']:.3f} s) &rarr; frame {p['match']} (t={p['match_stamp_s']:.3f} s): "
                       f"{verdict}{truth}</figcaption></figure>")
        out.append("</div>")
    return out


def _html(report: dict, images: list[tuple[str, str]], title: str) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1250px;margin:1em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}"
             ".warn{background:#fff3cd;padding:.5em;border:1px solid #e0c060}"
             "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}"
             ".thumbs{display:flex;flex-wrap:wrap;gap:10px}.thumbs figure{margin:0;width:300px;font-size:12px}"
             ".thumbs img{width:100%;margin:0}.bad{color:#b00020;font-weight:bold}</style></head><body>",
             f"<h1>{e(title)}</h1>"]
    cls = "" if report["model_kind"] == "megaloc" else " class='warn'"
    parts.append(f"<p{cls}><b>Model:</b> {e(report['model'])}</p>")
    parts.append(f"<p><b>Bag:</b> {e(report['bag'])} &mdash; {e(report['topic'])}, {report['n_frames']} frames, "
                 f"{e(report['mode'])} replay; {report['keyframes']} keyframes, map holds "
                 f"{report['map_size']}.</p>")
    for note in report.get("notes", []):
        parts.append(f"<p class='warn'>{e(note)}</p>")
    rows = metric_rows(report)
    if rows:
        m = report["metrics"]
        parts.append(f"<h2>Metrics</h2><p>{m['gt_pairs']} same-place pairs in the ground truth; "
                     f"{e(recall_denominator(m))}. Definitions: megaloc_ros/evaluation/metrics.py.</p>")
        warn = warnings(report)
        if warn:
            parts.append(f"<div class='warn'><b>{e(warn[0])}</b><ul>"
                         + "".join(f"<li>{e(w.strip())}</li>" for w in warn[1:]) + "</ul></div>")
        parts.append("<table><tr><th>metric</th><th>retrieval only</th><th>+ verification</th></tr>")
        parts += [f"<tr><td>{e(a.strip())}</td><td>{e(b)}</td><td>{e(c)}</td></tr>" for a, b, c in rows]
        parts.append("</table>")
    else:
        parts.append("<p class='warn'>No ground truth given: loops and latency only.</p>")
    lat = report.get("latency", {})
    if lat:
        parts.append("<h2>Latency per frame</h2><table><tr><th>stage</th><th>median ms</th>"
                     "<th>p99 ms</th><th>max ms</th><th>frames</th></tr>")
        parts += [f"<tr><td>{e(k)}</td><td>{v['median_ms']:.2f}</td><td>{v['p99_ms']:.2f}</td>"
                  f"<td>{v['max_ms']:.2f}</td><td>{v['n']}</td></tr>" for k, v in lat.items()]
        parts.append("</table><p>" + e(LATENCY_NOTE) + "</p>")
    for name, caption in images:
        parts.append(f"<h2>{e(caption)}</h2><img src='{e(name)}' alt='{e(caption)}'>")
    parts += _explanations_html(report.get("explanations") or {})
    pics = {(p["query"], p["match"]): p["file"] for p in (report.get("explanations") or {}).get("pictures", [])}
    loops = report.get("loops", [])
    parts.append(f"<h2>Published loops ({len(loops)})</h2>")
    if loops:
        parts.append("<table><tr><th>query frame</th><th>match frame</th><th>score</th><th>verified</th>"
                     "<th>verification score</th><th>inliers</th><th>ground truth</th><th>reason</th>"
                     "<th>picture</th></tr>")
        for r in loops[:500]:
            pic = pics.get((r["query"], r["match"]))
            link = f"<a href='{e(pic)}'>why</a>" if pic else ""
            ver = "-" if r["verified"] is None else ("yes" if r["verified"] else "no")
            truth = "-" if "true" not in r else ("true" if r["true"] else "<b>false</b>")
            parts.append(f"<tr><td>{r['query']}</td><td>{r['match']}</td><td>{r['score']:.3f}</td>"
                         f"<td>{ver}</td><td>{_f(r['verification_score'])}</td>"
                         f"<td>{'-' if r['inliers'] is None else r['inliers']}</td><td>{truth}</td>"
                         f"<td>{e(r.get('reason') or '')}</td><td>{link}</td></tr>")
        parts.append("</table>")
    parts.append("<p>All numbers: <a href='metrics.json'>metrics.json</a>.</p></body></html>\n")
    return "\n".join(parts)
