"""Replaying a rosbag through the loop-closure pipeline and recording what it decided.

``replay_offline`` runs the pipeline stages the nodes run (megaloc_ros/pipeline.py: encoding ->
mapping -> verification) frame by frame, without DDS. The live mode
(megaloc_ros/ros/live_replay.py) fills the same ``Replay`` from what the running nodes publish, so
both are scored and reported by the same code.
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from megaloc_ros.io.bag import progress_bar
from megaloc_ros.types import Candidate, VerifiedLoop

MAX_SIMILARITY_FRAMES = 1500  # descriptors kept for the similarity-matrix plot (evenly spaced)


@dataclass
class FrameRecord:
    """What the pipeline did with one image of the bag."""
    index: int                                   # position on the image topic
    stamp_ns: int
    keyframe_id: Optional[int] = None            # None: not taken as keyframe
    retrieved: list[Candidate] = field(default_factory=list)   # raw top-k (threshold sweeps)
    candidates: list[Candidate] = field(default_factory=list)  # published by the detector
    loops: list[VerifiedLoop] = field(default_factory=list)    # verifier verdicts
    timings_ms: dict[str, float] = field(default_factory=dict) # decode, encode, search, verify


@dataclass
class Replay:
    """One replayed bag: per-frame records plus what the report needs."""
    bag: str
    topic: str
    mode: str                                    # "offline" or "live"
    model: str                                   # encoder description (says MegaLoc or not)
    model_kind: str                              # "megaloc" or "offline"
    frames: list[FrameRecord]
    descriptors: np.ndarray                      # float32 [M, D] for the similarity plot
    descriptor_frames: np.ndarray                # int [M]: frame index of each row
    map_size: int = 0                            # keyframes in the map at the end
    map_bytes: dict = field(default_factory=dict)
    verifier: bool = False                       # whether a verifier ran
    params: dict = field(default_factory=dict)   # detector / verifier parameters used
    notes: list[str] = field(default_factory=list)
    extra_timings: dict = field(default_factory=dict)  # stage -> [ms] not tied to a frame
    skipped: dict[int, str] = field(default_factory=dict)  # frame index -> why it was not processed
    # the Verifier that decided (offline replay), for the report's explanation pictures; not saved
    verifier_state: Optional[object] = field(default=None, repr=False, compare=False)

    @property
    def stamps_ns(self) -> np.ndarray:
        return np.array([f.stamp_ns for f in self.frames], dtype=np.int64)

    def _frame_of(self):
        by_id = {f.keyframe_id: f.index for f in self.frames if f.keyframe_id is not None}
        by_stamp: dict[int, int] = {}
        for f in self.frames:
            by_stamp.setdefault(f.stamp_ns, f.index)

        def frame_of(kf) -> Optional[int]:
            i = by_id.get(kf.id)
            return by_stamp.get(kf.stamp_ns) if i is None else i
        return frame_of

    def matches(self, what: str) -> list[list[tuple[int, float]]]:
        """Per frame, ``[(match frame index, global score), ...]`` best first, for ``what`` in
        ``retrieved`` (raw top-k), ``candidates`` (published) or ``accepted`` (verified loops).
        Matches that are not frames of this bag (a pre-loaded map) are left out."""
        frame_of = self._frame_of()
        out = []
        for f in self.frames:
            if what == "accepted":
                items = [l.candidate for l in f.loops if l.accepted]
            else:
                items = getattr(f, what)
            ms = [(frame_of(c.match), float(c.score)) for c in items]
            out.append(sorted([(m, s) for m, s in ms if m is not None], key=lambda x: -x[1]))
        return out

    def loop_table(self) -> list[dict]:
        """Every loop the system output: the detector's published candidates, and every loop the
        verifier accepted (it checks the raw top-k, so some were never published), each with the
        verifier's verdict when one ran."""
        frame_of = self._frame_of()
        rows = []
        for f in self.frames:
            verdicts = {l.candidate.match.id: l for l in f.loops}
            shown = {c.match.id: c for c in f.candidates}
            published = set(shown)
            for l in f.loops:
                if l.accepted:
                    shown.setdefault(l.candidate.match.id, l.candidate)
            for mid, c in shown.items():
                v = verdicts.get(mid)
                rows.append({"query": f.index, "match": frame_of(c.match), "query_id": c.query.id,
                             "match_id": c.match.id, "score": float(c.score),
                             "published": mid in published,
                             "verified": None if v is None else bool(v.accepted),
                             "verification_score": None if v is None else float(v.verification_score),
                             "inliers": None if v is None else int(v.inliers),
                             "reason": "" if v is None else v.reason})
        return rows

    def timings(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {k: list(v) for k, v in self.extra_timings.items()}
        for f in self.frames:
            for k, v in f.timings_ms.items():
                out.setdefault(k, []).append(v)
        return out

    def similarity(self) -> tuple[np.ndarray, int]:
        """(cosine similarity on a grid of every ``stride``-th frame [G, G], NaN where a frame has
        no descriptor (live mode: non-keyframes), stride)."""
        stride = descriptor_stride(len(self.frames))
        g = math.ceil(len(self.frames) / stride)
        out = np.full((g, g), np.nan, np.float32)
        if len(self.descriptors):
            d = self.descriptors.astype(np.float32)
            cells = self.descriptor_frames // stride
            out[np.ix_(cells, cells)] = d @ d.T
        return out, stride


def descriptor_stride(n_frames: int) -> int:
    return max(1, math.ceil(n_frames / MAX_SIMILARITY_FRAMES))


def replay_offline(bag_path: str | Path, topic: str, pipeline, trajectory=None,
                   pose_max_gap_s: float = 0.5, quiet: bool = False) -> Replay:
    """Run every image on ``topic`` through ``pipeline`` (``megaloc_ros.pipeline.build``), in bag order.

    ``trajectory`` (io.trajectory.Trajectory), when given, supplies the pose of each frame
    (as odometry would to the node), which keyframe selection uses. A frame that cannot be
    decoded is skipped and counted, as loop_closure_node drops it (``Replay.skipped``, and a
    note): it keeps its place in the frame list, with no keyframe.
    """
    from megaloc_ros.io.bag import BagReader

    enc = pipeline.encoder
    frames: list[FrameRecord] = []
    descs: list[np.ndarray] = []
    desc_frames: list[int] = []
    with BagReader(bag_path) as reader:
        n = reader.image_count(topic)
        stride = descriptor_stride(n)
        bar = progress_bar(n, "eval", quiet)
        n_candidates = n_accepted = 0
        skipped: dict[int, str] = {}

        def skip(index: int, stamp_ns: int, exc: Exception) -> None:
            skipped[index] = str(exc)
            frames.append(FrameRecord(index, stamp_ns))
            bar.update(1)

        try:
            for img in reader.images(topic, on_error=skip):
                pose = None
                if trajectory is not None:
                    p, ok = trajectory.at([img.stamp_ns], pose_max_gap_s)
                    pose = p[0] if ok[0] else None
                res = pipeline.process(img.rgb, img.stamp_ns, session=0, frame_id=img.frame_id, pose=pose)
                det = res.detection
                frames.append(FrameRecord(
                    img.index, img.stamp_ns, None if det.keyframe is None else det.keyframe.id,
                    list(det.retrieved), list(det.candidates), list(res.loops),
                    {"decode": img.decode_ms, **res.timings_ms}))
                if img.index % stride == 0:
                    descs.append(res.features.descriptor.astype(np.float32))
                    desc_frames.append(img.index)
                n_candidates += len(det.candidates)
                n_accepted += sum(l.accepted for l in res.loops)
                bar.set_postfix(candidates=n_candidates, verified=n_accepted, refresh=False)
                bar.update(1)
        finally:
            bar.close()
    pm = pipeline.detector.map
    dim = enc.descriptor_dim
    params = {"detector": dataclasses.asdict(pipeline.detector.params)}
    if pipeline.verifier is not None and dataclasses.is_dataclass(getattr(pipeline.verifier, "params", None)):
        params["verifier"] = dataclasses.asdict(pipeline.verifier.params)
    notes = []
    if skipped:
        first = next(iter(skipped.items()))
        notes.append(f"{len(skipped)} of {len(frames)} frames could not be decoded and were skipped "
                     f"(counted as frames without a keyframe), e.g. frame {first[0]}: {first[1]}")
    return Replay(
        bag=str(bag_path), topic=topic, mode="offline", model=enc.description,
        model_kind=getattr(enc, "kind", "megaloc"), frames=frames,
        descriptors=np.stack(descs) if descs else np.zeros((0, dim), np.float32),
        descriptor_frames=np.array(desc_frames, dtype=np.int64), map_size=len(pm),
        map_bytes=dict(pm.memory_bytes()) if hasattr(pm, "memory_bytes") else {},
        verifier=pipeline.verifier is not None, params=_jsonable(params), notes=notes, skipped=skipped,
        verifier_state=pipeline.verifier)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
