"""Loop-closure decisions on top of the place map: keyframe selection, exclusion windows,
threshold, temporal consistency and duplicate suppression. Plain Python, no ROS.

Per frame (``LoopDetector.process``):
  1. Keyframe selection: a frame becomes a keyframe when at least ``min_keyframe_interval_s``
     passed since the last one, the robot moved ``min_travel_m`` or turned ``min_rotation_deg``
     (only checked when poses are given), and its descriptor differs from the last keyframe's
     (cosine below ``max_similarity_to_last``). Other frames return ``Detection(None, [], [])``.
  2. Retrieval: the ``top_k`` most similar map keyframes, leaving out the recent past of the
     same session (``exclude_recent_s`` seconds and ``exclude_recent_keyframes`` keyframes);
     this is ``Detection.retrieved``. The keyframe is then added to the map.
  3. Decision: candidates with score >= ``similarity_threshold``; the best one per island
     (matches within ``island_radius`` keyframe ids of each other are one place); kept when the
     last ``consistency_k`` keyframes (including this one) all had an accepted candidate
     on neighbouring places (DBoW2 / iBoW-LCD temporal consistency); a match keyframe already
     reported in the last ``duplicate_window_s`` is not reported again; at most
     ``max_candidates``. That is ``Detection.candidates``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from megaloc_ros.errors import MegalocError
from megaloc_ros.mapping.place_map import PlaceMap
from megaloc_ros.settings import setting, validate
from megaloc_ros.types import SECOND_NS, Candidate, Keyframe, as_descriptor


@dataclass
class DetectorParams:
    """Thresholds of ``LoopDetector``; the defaults suit a 1-30 Hz camera."""
    # keyframe selection
    min_keyframe_interval_s: float = setting(0.25, "seconds between keyframes at least (0.25: at most 4 per second)",
                                             range=(0.0, None))
    min_travel_m: float = setting(0.2, "with poses: translation (m) since the last keyframe needed for a new "
                                  "one ...", range=(0.0, None))
    min_rotation_deg: float = setting(10.0, "... or rotation (degrees), whichever comes first", range=(0.0, 180.0))
    max_similarity_to_last: float = setting(0.98, "novelty: a frame whose descriptor has at least this cosine "
                                            "similarity to the last keyframe's is skipped (above 1: off)",
                                            range=(0.0, 1.01))
    # retrieval
    top_k: int = setting(5, "map keyframes retrieved per keyframe (the raw top-k the verifier checks)",
                         range=(1, None))
    exclude_recent_s: float = setting(20.0, "same-session keyframes younger than this (s) are not retrieved",
                                      range=(0.0, None))
    exclude_recent_keyframes: int = setting(20, "... nor the last this many keyframes", range=(0, None))
    # decision
    similarity_threshold: float = setting(
        0.60, "cosine similarity a candidate needs; depends on the descriptor (model) and index kind: "
        "tune it with megaloc-ros eval on a bag of your robot (recall at 100% precision picks it)",
        range=(-1.0, 1.0))
    consistency_k: int = setting(2, "consecutive keyframes whose global matches must agree before a candidate "
                                 "is published on ~/candidates (1 = off); the verifier, which takes the raw "
                                 "top-k (~/retrieved) by default, checks consistency on verified loops instead "
                                 "(verifier.consistency_window)", range=(1, None))
    island_radius: int = setting(3, "matches within this many ids are one place", range=(0, None))
    consistency_max_gap_s: float = setting(5.0, "a longer pause (s) between keyframes breaks agreement",
                                           range=(0.0, None))
    duplicate_window_s: float = setting(2.0, "a match reported this recently (s) is not repeated",
                                        range=(0.0, None))
    max_candidates: int = setting(3, "candidates published per keyframe (best islands first)", range=(1, None))

    def __post_init__(self) -> None:
        validate(self, "detector")


@dataclass
class Detection:
    keyframe: Optional[Keyframe]                                  # None: not taken as keyframe
    candidates: list[Candidate] = field(default_factory=list)     # what to publish
    retrieved: list[Candidate] = field(default_factory=list)      # raw top-k after exclusions


class LoopDetector:
    """Decides which frames become keyframes and which retrievals are loop candidates.

    Its own state is small: the last keyframe (stamp, session, pose, descriptor), the accepted
    matches of the previous keyframe with their agreement streaks, and recently reported matches.
    That state is not saved; the map is, and ids continue after a loaded map.
    """

    def __init__(self, place_map: PlaceMap, params: Optional[DetectorParams] = None):
        self.map = place_map
        self.params = params or DetectorParams()
        self.next_id = place_map.next_id
        self.reset()

    def reset(self) -> None:
        """Forget the short-term state (e.g. after a time jump or a new session)."""
        self._last: Optional[tuple[int, int, Optional[np.ndarray], np.ndarray]] = None
        self._streaks: list[tuple[int, int, int]] = []   # (session, match id, streak) of last keyframe
        self._reported: dict[int, int] = {}              # match id -> stamp_ns when reported

    # ----------------------------------------------------------------- keyframe selection
    def _is_keyframe(self, d: np.ndarray, stamp_ns: int, session: int, pose) -> bool:
        if self._last is None:
            return True
        last_stamp, last_session, last_pose, last_d = self._last
        if session != last_session:
            return True
        dt = stamp_ns - last_stamp
        if dt < -SECOND_NS:  # clock jumped back (bag restarted): start over
            self.reset()
            return True
        p = self.params
        if dt < p.min_keyframe_interval_s * SECOND_NS:
            return False
        if pose is not None and last_pose is not None:
            moved = float(np.linalg.norm(pose[:3, 3] - last_pose[:3, 3]))
            r = last_pose[:3, :3].T @ pose[:3, :3]
            turned = math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(r) - 1.0) / 2.0))))
            if moved < p.min_travel_m and turned < p.min_rotation_deg:
                return False
        return float(d @ last_d) < p.max_similarity_to_last

    # ----------------------------------------------------------------- retrieval
    def _exclusions(self, stamp_ns: int, session: int) -> dict:
        p = self.params
        return {
            "exclude_ids": (self.next_id - p.exclude_recent_keyframes, self.next_id)
            if p.exclude_recent_keyframes > 0 else None,
            "exclude_stamps": (stamp_ns - int(p.exclude_recent_s * SECOND_NS), 2 ** 62)
            if p.exclude_recent_s > 0 else None,
            "exclude_window_session": session,
        }

    def query(self, descriptor, top_k: Optional[int] = None, stamp_ns: int = 0, session: int = 0,
              frame_id: str = "", exclude_recent: bool = False) -> list[Candidate]:
        """Retrieve without inserting (e.g. the ``~/query_image`` service). The query keyframe
        of the returned candidates has id -1. With ``exclude_recent`` the same exclusion
        windows as ``process`` apply, relative to ``stamp_ns`` and ``session``."""
        d = as_descriptor(descriptor, self.map.dim)
        kf = Keyframe(-1, int(stamp_ns), int(session), frame_id)
        excl = self._exclusions(int(stamp_ns), int(session)) if exclude_recent else {}
        hits = self.map.search(d, top_k or self.params.top_k, **excl)
        return [Candidate(kf, m, s, r) for r, (m, s) in enumerate(hits)]

    # ----------------------------------------------------------------- per frame
    def process(self, descriptor, stamp_ns: int, session: int = 0, frame_id: str = "",
                pose: Optional[np.ndarray] = None) -> Detection:
        """Run one frame; see the module docstring."""
        d = as_descriptor(descriptor, self.map.dim)
        stamp_ns, session = int(stamp_ns), int(session)
        if pose is not None:
            pose = np.asarray(pose, np.float64)
            if pose.shape != (4, 4):
                raise MegalocError(f"pose must be a 4x4 matrix, got shape {pose.shape}")
        if not self._is_keyframe(d, stamp_ns, session, pose):
            return Detection(None)
        kf = Keyframe(self.next_id, stamp_ns, session, frame_id, pose)
        hits = self.map.search(d, self.params.top_k, **self._exclusions(stamp_ns, session))
        retrieved = [Candidate(kf, m, s, r) for r, (m, s) in enumerate(hits)]
        self.map.add(kf, d)
        self.next_id += 1
        gap_ok = self._last is not None and self._last[1] == session and \
            stamp_ns - self._last[0] <= self.params.consistency_max_gap_s * SECOND_NS
        self._last = (stamp_ns, session, pose, d)
        return Detection(kf, self._decide(kf, retrieved, gap_ok), retrieved)

    def _decide(self, kf: Keyframe, retrieved: list[Candidate], continuous: bool) -> list[Candidate]:
        p = self.params
        # best candidate per island (retrieved is sorted best first)
        accepted: list[Candidate] = []
        for c in retrieved:
            if c.score < p.similarity_threshold:
                break
            if not any(a.match.session == c.match.session and abs(a.match.id - c.match.id) <= p.island_radius
                       for a in accepted):
                accepted.append(c)
        prev = self._streaks if continuous else []
        streaks = []
        for c in accepted:
            before = [s for (sess, mid, s) in prev
                      if sess == c.match.session and abs(mid - c.match.id) <= 2 * p.island_radius + 1]
            streaks.append((c.match.session, c.match.id, 1 + max(before, default=0)))
        self._streaks = streaks
        horizon = kf.stamp_ns - int(p.duplicate_window_s * SECOND_NS)
        self._reported = {m: t for m, t in self._reported.items() if t >= horizon}
        out = []
        for c, (_, _, streak) in zip(accepted, streaks):
            if streak < p.consistency_k or c.match.id in self._reported or len(out) >= p.max_candidates:
                continue
            self._reported[c.match.id] = kf.stamp_ns
            out.append(Candidate(c.query, c.match, c.score, len(out)))
        return out
