"""The core loop-closure pipeline: image -> descriptor -> place map -> candidates -> verified loops.

The ROS nodes, `megaloc-ros eval` and the demo all run these same objects; the nodes split them
in two (LoopClosureNode: encoder + detector, VerifierNode: verifier).

With a verifier, the verifier sees the detector's raw top-k (``Detection.retrieved``), not only
its published candidates: true loops under strong viewpoint change rank low or miss the
threshold and the temporal-consistency check, and verification is what confirms them. Measured
on rtabmap with the offline backbone (`megaloc-ros bench verify`): verifying the published
candidates kept 100% precision at 0.50 recall, verifying the top-5 at 0.80.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from megaloc_ros.types import Candidate, ImageFeatures, VerifiedLoop


@dataclass
class FrameResult:
    features: ImageFeatures
    detection: "Detection"                 # from megaloc_ros.mapping.detector
    loops: list[VerifiedLoop] = field(default_factory=list)  # verifier output (empty without one)
    timings_ms: dict[str, float] = field(default_factory=dict)  # encode, search, verify

    @property
    def candidates(self) -> list[Candidate]:
        return self.detection.candidates


class LoopClosurePipeline:
    """Runs one frame at a time through encoder, detector and (optionally) verifier."""

    def __init__(self, encoder, detector, verifier=None):
        self.encoder = encoder
        self.detector = detector
        self.verifier = verifier

    def process(self, image: np.ndarray, stamp_ns: int, session: int = 0, frame_id: str = "",
                pose: Optional[np.ndarray] = None) -> FrameResult:
        t0 = time.perf_counter()
        features = self.encoder.encode([image])[0]
        t1 = time.perf_counter()
        detection = self.detector.process(features.descriptor, stamp_ns, session=session,
                                          frame_id=frame_id, pose=pose)
        t2 = time.perf_counter()
        timings = {"encode": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3}
        loops: list[VerifiedLoop] = []
        if self.verifier is not None and detection.keyframe is not None:
            self.verifier.add_keyframe(detection.keyframe, image, features)
            if detection.retrieved:
                loops = self.verifier.verify(detection.retrieved)
            timings["verify"] = (time.perf_counter() - t2) * 1e3
        return FrameResult(features, detection, loops, timings)
