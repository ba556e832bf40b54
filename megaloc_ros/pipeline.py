"""The loop-closure pipeline: camera image -> descriptor -> place map -> candidate -> verified loop.

Three stages, and the one code path of every consumer:

  ``Encoding``      image -> ``ImageFeatures`` (global descriptor + patch features)
  ``Mapping``       descriptor -> ``Detection``: keyframe selection, retrieval, insertion into the
                    place map, the detector's candidates; under the map lock (encoding is not)
  ``Verification``  keyframes in; candidates -> ``VerifiedLoop`` (accepted or not, and why)

``build_encoding``, ``build_mapping`` and ``build_verification`` (and ``build`` for all three)
are the one place that builds them from ``PipelineSettings``. loop_closure_node runs Encoding +
Mapping, verifier_node runs Verification, with DDS in between; ``LoopClosurePipeline.process``
chains the three in-process for offline `eval`, `bench verify` and the tests.

The verifier checks the detector's raw top-k (``Detection.retrieved``), not only its published
candidates: true loops under strong viewpoint change rank low or miss the threshold and the
temporal-consistency check, and verification is what confirms them. Measured on rtabmap with
the offline backbone (`megaloc-ros bench verify`): verifying the published candidates kept 100%
precision at 0.50 recall, verifying the top-5 at 0.80.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from megaloc_ros import settings as S
from megaloc_ros.mapping.detector import Detection, DetectorParams, LoopDetector
from megaloc_ros.errors import MapFileError
from megaloc_ros.mapping.place_map import MapSettings, PlaceMap, map_id_of
from megaloc_ros.settings import EncoderSettings
from megaloc_ros.types import Candidate, ImageFeatures, Keyframe, VerifiedLoop
from megaloc_ros.verification.verifier import Verifier, VerifierParams


@dataclass
class PipelineSettings:
    """Every setting of the three stages; flat names are ``<stage>.<field>`` (``encoder.model_path``,
    ``map.index``, ``detector.top_k``, ``verifier.min_inliers``), as ROS parameters and ``--set``."""
    encoder: EncoderSettings = field(default_factory=EncoderSettings)
    map: MapSettings = field(default_factory=MapSettings)
    detector: DetectorParams = field(default_factory=DetectorParams)
    verifier: Optional[VerifierParams] = field(default_factory=VerifierParams)  # None: no verification

    PREFIXES = ("encoder", "map", "detector", "verifier")

    @classmethod
    def from_flat(cls, values: dict[str, Any], verify: bool = True) -> "PipelineSettings":
        """From flat ``{"detector.top_k": 5, ...}`` values (other names are ignored)."""
        types = {"encoder": EncoderSettings, "map": MapSettings, "detector": DetectorParams,
                 "verifier": VerifierParams}
        kw = {p: S.from_flat(types[p], p, values) for p in cls.PREFIXES if p != "verifier" or verify}
        if not verify:
            kw["verifier"] = None
        return cls(**kw)

    def to_flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.PREFIXES:
            if getattr(self, p) is not None:
                out.update(S.flatten(getattr(self, p), p))
        return out


# ----------------------------------------------------------------------------- stages

class Encoding:
    """Stage 1. Thread-safe as far as the encoder is (ONNX Runtime sessions are)."""

    def __init__(self, encoder):
        self.encoder = encoder

    def encode(self, image_rgb: np.ndarray) -> tuple[ImageFeatures, float]:
        """(features, milliseconds)."""
        t0 = time.perf_counter()
        features = self.encoder.encode([image_rgb])[0]
        return features, (time.perf_counter() - t0) * 1e3


class Mapping:
    """Stage 2: the place map and the detector deciding on it, behind one lock."""

    def __init__(self, place_map: PlaceMap, params: DetectorParams):
        self.lock = threading.RLock()
        self.detector = LoopDetector(place_map, params)

    @property
    def place_map(self) -> PlaceMap:
        return self.detector.map

    @property
    def params(self) -> DetectorParams:
        return self.detector.params

    def set_params(self, params: DetectorParams) -> None:
        with self.lock:
            self.detector.params = params

    def detect(self, descriptor, stamp_ns: int, session: int = 0, frame_id: str = "",
               pose: Optional[np.ndarray] = None) -> tuple[Detection, float]:
        """(detection, milliseconds); a keyframe it returns is in the map."""
        t0 = time.perf_counter()
        with self.lock:
            det = self.detector.process(descriptor, stamp_ns, session=session, frame_id=frame_id, pose=pose)
        return det, (time.perf_counter() - t0) * 1e3

    def query(self, descriptor, top_k: Optional[int] = None, stamp_ns: int = 0, session: int = 0,
              frame_id: str = "") -> list[Candidate]:
        """Retrieval without inserting (the query keyframe has id -1)."""
        with self.lock:
            return self.detector.query(descriptor, top_k=top_k, stamp_ns=stamp_ns, session=session,
                                       frame_id=frame_id)

    def replace_map(self, place_map: PlaceMap) -> None:
        """Continue on another map (loaded from a file): ids continue its own, short-term state resets."""
        with self.lock:
            self.detector = LoopDetector(place_map, self.detector.params)

    def save(self, path) -> None:
        with self.lock:
            self.place_map.save(path)

    def __len__(self) -> int:
        return len(self.place_map)


class Verification:
    """Stage 3: what the verifier stores per keyframe, and its decisions."""

    def __init__(self, verifier: Verifier):
        self.verifier = verifier

    def add_keyframe(self, keyframe: Keyframe, image_rgb: np.ndarray, features: ImageFeatures,
                     depth_m: Optional[np.ndarray] = None) -> float:
        """Store what verification needs of ``keyframe`` (with ``depth_m``, metres registered to
        the image: loops on it get metric transforms); returns milliseconds."""
        t0 = time.perf_counter()
        self.verifier.add_keyframe(keyframe, image_rgb, features, depth_m)
        return (time.perf_counter() - t0) * 1e3

    def verify(self, candidates: list[Candidate]) -> tuple[list[VerifiedLoop], float]:
        """(verdicts in the order given, then loops of other keyframes confirmed late, see
        ``Verifier.verify``; milliseconds); candidates of several queries are decided per query
        (the one-loop-per-keyframe cap applies to each)."""
        t0 = time.perf_counter()
        by_query: dict[int, list[int]] = {}
        for i, c in enumerate(candidates):
            by_query.setdefault(c.query.id, []).append(i)
        out: list[Optional[VerifiedLoop]] = [None] * len(candidates)
        late: list[VerifiedLoop] = []
        for idx in by_query.values():
            res = self.verifier.verify([candidates[i] for i in idx])
            for i, r in zip(idx, res):
                out[i] = r
            late.extend(res[len(idx):])
        return out + late, (time.perf_counter() - t0) * 1e3  # type: ignore[operator]


# ----------------------------------------------------------------------------- building

def build_encoding(settings: EncoderSettings, encoder=None) -> Encoding:
    """``encoder``: an already loaded one (shared by tests and in-process callers)."""
    if encoder is None:
        from megaloc_ros.encoding.loader import load_encoder
        encoder = load_encoder(settings.model_path or None, device=settings.device)
    return Encoding(encoder)


def build_mapping(settings: PipelineSettings, model_name: str, dim: int, map_path: str = "") -> Mapping:
    """A new place map for ``dim``-D descriptors of ``model_name``, or the one at ``map_path`` when
    that file exists (checked against both)."""
    if map_path and Path(map_path).exists():
        pm = PlaceMap.load(map_path, expected_model=model_name, expected_dim=dim)
    else:
        pm = PlaceMap(dim, model_name, settings.map)
    return Mapping(pm, settings.detector)


def build_verification(params: VerifierParams, camera=None, state_path: str = "", map_path: str = "",
                       backbone: Optional[str] = None) -> Verification:
    """A new verifier, or the state at ``state_path`` when that file exists; ``camera``
    (``geometry.Camera``), when given, replaces a loaded state's. A loaded state keeps
    the settings that shaped its stored keyframes and takes the decision settings of ``params``.
    With ``map_path`` (an existing place-map file) the state must belong to that map (same map
    id; a state from before map ids is bound to it): MapFileError otherwise."""
    if state_path and Path(state_path).exists():
        v = Verifier.load(state_path, camera)
        if map_path and Path(map_path).exists():
            mid = map_id_of(map_path)
            if v.map_id and v.map_id != mid:
                raise MapFileError(f"{state_path} belongs to map {v.map_id}, but {map_path} is map {mid}: "
                                   "they were not saved together; load a matching pair or start a new map")
            v.map_id = mid
        v.params = live_verifier_params(v.params, params)
    else:
        v = Verifier(params, camera, backbone)  # backbone: its shipped vocabulary
    return Verification(v)


def live_verifier_params(stored: VerifierParams, new: VerifierParams) -> VerifierParams:
    """``stored`` with the fields of ``new`` that only change decisions (settable at run time)."""
    live = {f.name: getattr(new, f.name) for f in dataclasses.fields(VerifierParams)
            if not f.metadata.get("read_only", False)}
    return dataclasses.replace(stored, **live)


@dataclass
class FrameResult:
    features: ImageFeatures
    detection: Detection
    loops: list[VerifiedLoop] = field(default_factory=list)     # verifier output (empty without one)
    timings_ms: dict[str, float] = field(default_factory=dict)  # encode, search, verify

    @property
    def candidates(self) -> list[Candidate]:
        return self.detection.candidates


class LoopClosurePipeline:
    """The three stages chained in-process, one frame at a time."""

    def __init__(self, encoding: Optional[Encoding], mapping: Mapping, verification: Optional[Verification] = None):
        """``encoding`` None: every ``process`` call brings its ``features``."""
        self.encoding, self.mapping, self.verification = encoding, mapping, verification

    @property
    def encoder(self):
        return self.encoding.encoder

    @property
    def detector(self) -> LoopDetector:
        return self.mapping.detector

    @property
    def verifier(self) -> Optional[Verifier]:
        return self.verification.verifier if self.verification is not None else None

    def process(self, image: np.ndarray, stamp_ns: int, session: int = 0, frame_id: str = "",
                pose: Optional[np.ndarray] = None, features: Optional[ImageFeatures] = None,
                depth_m: Optional[np.ndarray] = None) -> FrameResult:
        """``features``: already computed for ``image`` (benchmarks replaying cached features);
        ``depth_m``: depth in metres registered to ``image`` (metric loop transforms)."""
        timings = {}
        if features is None:
            features, timings["encode"] = self.encoding.encode(image)
        det, timings["search"] = self.mapping.detect(features.descriptor, stamp_ns, session, frame_id, pose)
        loops: list[VerifiedLoop] = []
        if self.verification is not None and det.keyframe is not None:
            timings["add_keyframe"] = self.verification.add_keyframe(det.keyframe, image, features, depth_m)
            if det.retrieved:
                loops, timings["verify"] = self.verification.verify(det.retrieved)
        return FrameResult(features, det, loops, timings)


def build(settings: Optional[PipelineSettings] = None, encoder=None, camera=None) -> LoopClosurePipeline:
    """All three stages from ``settings`` (no verification when ``settings.verifier`` is None);
    with a ``camera`` (``geometry.Camera``) verified loops get transforms."""
    settings = settings or PipelineSettings()
    encoding = build_encoding(settings.encoder, encoder)
    enc = encoding.encoder
    mapping = build_mapping(settings, enc.model_name, enc.descriptor_dim)
    verification = (build_verification(settings.verifier, camera, backbone=enc.model_name)
                    if settings.verifier is not None else None)
    return LoopClosurePipeline(encoding, mapping, verification)
