"""Loop-closure verification: SegVLAD re-scoring + geometric check + an explained decision.

``Verifier.add_keyframe`` reduces each keyframe to what verification needs, and only that:

  * SegVLAD: at most ``max_supersegments`` SuperSegment descriptors, PCA-reduced to
    the vocabulary's PCA length (128 shipped, ``pca_dim`` when fitted on the map) and stored as
    fp16 (48 x 128 x 2 B = 12 KiB shipped, at most 48 x 256 x 2 B = 24 KiB map-fitted);
  * geometry: at most ``max_keypoints`` keypoints (float32 x, y: 8 B) with SIFT descriptors
    stored as uint8 (128 B), ORB (32 B) or XFeat int8 (64 B) (default at most 500 x 136 B = 66 KiB);
  * with a depth image (RGB-D): each keypoint's depth (4 B), and at most ``metric_keypoints``
    ORB keypoints with their depth (44 B each; a TUM fr3/cabinet frame gives ~1000: ~43 KiB),
    from which a loop gets its metric transform when the keypoints above give too few PnP
    inliers (``metric_pose``).

So a keyframe costs at most ~80 KiB by default (without depth); 71.8 KiB on average on the rtabmap sequence
(``Verifier.bytes_per_keyframe`` reports the measured mean; `megaloc-ros bench verify` prints
it). No image is kept. Fixed cost per map: the vocabulary (32 x C floats) and the PCA matrix
(PCA length x 32*C floats: 6 MiB for the shipped one, C = 384, PCA 128).

Vocabulary policy (``vocabulary``). "auto": the SegVLAD vocabulary (k-means centroids of the
L2-normalised patch features + PCA of SuperSegment VLADs) shipped with the package for the
backbone (``megaloc_ros/verification/vocabulary.py``; picked by the model name when known, else
by the patch-feature width) is used from the first keyframe. For a backbone without one (and with
"map"), it is fitted once on the map's own first ``vocab_keyframes`` keyframes that carry patch
features; until then those keyframes are held pending (fp16 patch features and SuperSegment
membership, ~220 KiB each) and converted when the fit happens, and decisions use geometry only
(the reason says so). Either way the vocabulary is saved with the verifier state (and which one
it is, ``vocabulary_source``). There is no automatic refit: stored descriptors are lossy (PCA,
fp16), so a new vocabulary would orphan every keyframe already described.

Decision rule (megaloc_ros/verification/decision.py): each signal is judged against chance for
this pair and this map, so that no threshold depends on the camera or the scene:
  * geometry: tentative matches (ratio test + mutual) -> USAC essential matrix (intrinsics
    known) or fundamental matrix -> a-contrario significance, -log10 NFA
    (``acontrario.significance``): the inlier count weighed against the number of tentative
    matches, the image area they cover and how often a wrong partner fits as well;
  * SegVLAD: the query's score on the candidate as a z-score against its scores on up to
    ``segvlad_background`` other map keyframes (not the candidates' neighbourhoods, not the
    query's ``segvlad_exclude_recent`` predecessors).
Accepted: -log10 NFA >= ``min_significance``, or >= ``min_significance_segvlad`` with segvlad
z >= ``min_segvlad_z``. SegVLAD adds evidence and re-ranks, it never vetoes strong geometry
(``min_segvlad_score`` is an optional absolute floor, off by default). Of a query's accepted
candidates only the ``max_accepted_per_query`` with the most evidence (-log10 NFA + max(z, 0))
are kept (default 1): the neighbours of the true match also pass, and one well-supported loop
per keyframe is what a pose graph needs. Then consistency (``consistency_window``,
``consistency_radius``): a loop is published only when a keyframe just before the query also
passed to the same stretch of the map (``Verifier._check_consistency``). The thresholds were
chosen on rtabmap only (with the offline DINOv2 ViT-S/14); `megaloc-ros bench verify --sets all`
reports them on the other sets.
Every reason names the statistics (e.g. "accepted: 34/61 inliers within 1.6 px, -log10 NFA
12.3 >= 6; segvlad 0.31 z 4.1 (over 32 keyframes)").

SegVLAD score (``verification_score``): ``segvlad.vote`` with the retrieval restricted to one
candidate at a time, i.e. the mean over the query's SuperSegments of their ``vote_top_k`` best
cosine similarities to the candidate's SuperSegments. The paper pools all candidates' segments
before voting; pooled votes split between the adjacent keyframes of a revisited stretch and
depend on how many candidates came (on rtabmap top-5 candidates, true-vs-false AUC was 0.69
pooled against 0.92 per candidate).

Local features (``local_features``): SIFT (default), ORB or XFeat (ONNX Runtime,
``megaloc_ros/verification/xfeat.py``), detected at a scale that adapts to the image
(``features.extract``: images smaller than ``feature_min_side`` are upsampled). Tentative
matches (``matcher``): nearest neighbours with the ratio test and the mutual check (default), or
LighterGlue for XFeat features (``megaloc_ros/verification/lighterglue.py``, ONNX Runtime):
far more matches across wide viewpoint changes, at ~100-250 ms per candidate on 2 CPU cores.

Cameras: the geometry works on keypoints with the lens distortion undone (``camera.distortion``:
CameraInfo's model and coefficients, ``geometry.Distortion``); keypoints are stored as detected.
A peer robot's keyframe keeps the camera that took it (``camera_of``).

Transform: with intrinsics, ``RelativePose`` (rotation, unit translation direction,
``metric_scale`` False) with ``geometry.essential_pose``'s covariance (the fit's first-order
rotation variance, at least a measured floor of 2 deg std per axis; no weight on the
translation); with
depth, PnP's metric pose (``metric_pose``; on the keyframes' ORB keypoints, ``metric_keypoints``,
when the verification keypoints give fewer than 20 inliers); without intrinsics, None.
"""
from __future__ import annotations

import bisect
import json
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from megaloc_ros.verification import acontrario, decision, geometry, metric_pose, segments, segvlad, vocabulary
from megaloc_ros.verification import features as local
from megaloc_ros.errors import DuplicateId, MapFileError, MegalocError
from megaloc_ros.io.files import atomic_write
from megaloc_ros.settings import section, setting, validate
from megaloc_ros.types import Candidate, ImageFeatures, Keyframe, KeyframeId, VerifiedLoop

_BLAS = None
_HISTORY = 1024  # query keyframes consistency remembers (a fleet verifies them far out of order)


def _one_blas_thread():
    """Single-threaded BLAS for the verifier's small matrix products: multi-threaded OpenBLAS
    on a busy 2-core CPU made a 48x12288x256 product 5-50x slower (spin-waiting threads)."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


# PnP of a verified loop: 15 inliers left ~10 cm errors on TUM fr3/cabinet (56 -> 1, 15/36),
# so a metric transform needs 20; fewer keep a unit direction (the pose graph skips those).
METRIC_MIN_INLIERS = 20
# ... but from 10 PnP inliers on, the loop's rotation and direction come from PnP, not from the
# essential matrix: on the 73 TUM fr3/cabinet pairs <= 60 deg apart with -log10 NFA >= 6, the
# 5-point essential matrix's rotation was > 10 deg off the motion capture on 9 (a small object
# filling little of a narrow view), PnP's on the same matches within 5.3 deg at 10-19 inliers,
# where its translation could still be 0.4 m off; under 10, PnP went 16 deg off once
# (`python -m megaloc_ros.bench.metric_pose --rotation`; TUM is the only set with motion capture).
ROTATION_POSE = metric_pose.MetricPoseParams(min_inliers=10)
# Too few for a metric transform: PnP again on the keyframes' denser ORB keypoints
# (``metric_keypoints``); on TUM fr3/cabinet's loops (55, 56, 57 -> 0, 1) it finds 38-45 inliers,
# 1-4 cm / 0.5-2.3 deg from the motion capture, where 11-16 inliers (52, 53, 54 -> 0) were
# 22-37 cm off: the same 20-inlier minimum
METRIC_POSE = metric_pose.MetricPoseParams(min_inliers=METRIC_MIN_INLIERS)


def extract_local_features(params: "VerifierParams", image_rgb: np.ndarray) -> geometry.LocalFeatures:
    """The local features ``params`` asks for (kind, count, detection scale) of one image."""
    return local.extract(image_rgb, params.local_features, params.max_keypoints, params.feature_max_side,
                         params.sift_contrast, params.feature_min_side)

FORMAT = "megaloc_ros.verifier"  # the files' identifier (the module's old name): never change it
VERSION = 1


@dataclass
class VerifierParams:
    """Verifier settings. The decision thresholds are significance levels (-log10 NFA, SegVLAD
    z-score), not scores of one backbone or camera; their values were checked on the rtabmap
    sequence only (offline DINOv2 ViT-S/14) and are reported on the other sets by `megaloc-ros
    bench verify --sets all` (change them with ``--set verifier.NAME=VALUE``).

    Only the decision settings may change at run time (``read_only`` False); the others shape the
    stored keyframe data, which a loaded verifier state keeps."""
    segments: segments.SegmentParams = section(segments.SegmentParams, "image segmentation for SegVLAD",
                                               read_only=True)
    # SegVLAD
    segvlad_model: str = setting("", "a second backbone (exported .onnx + .json sidecar) whose patch features "
                                 "SegVLAD uses; empty: the keyframe's own", read_only=True)
    order: int = setting(3, "SuperSegment neighbourhood order o (graph hops)", range=(0, 16), read_only=True)
    vocab_size: int = setting(32, "k-means clusters of the SegVLAD vocabulary", range=(2, 1024), read_only=True)
    vocab_keyframes: int = setting(30, "map-fitted vocabulary: fit once this many keyframes exist", range=(1, None),
                                   read_only=True)
    pca_dim: int = setting(256, "SuperSegment descriptor length after PCA of a map-fitted vocabulary (a shipped "
                           "one brings its own)", range=(1, None), read_only=True)
    pca_whiten: bool = setting(False, "PCA-whitening of a map-fitted vocabulary (lowers absolute scores; the "
                               "decisions use z-scores)", read_only=True)
    max_supersegments: int = setting(48, "SuperSegments kept per keyframe (largest by area)", range=(1, None),
                                     read_only=True)
    vote_top_k: int = setting(5, "segment-level retrieval depth per query SuperSegment", range=(1, None))
    vocabulary: str = setting("auto", "SegVLAD vocabulary: auto (the one shipped for the backbone's patch "
                              "features, from the first keyframe; else fitted on the map), map (fitted on the "
                              "map's first vocab_keyframes keyframes) or the path of a vocabulary .npz",
                              read_only=True)
    segvlad_background: int = setting(32, "map keyframes the query is also scored on, for the SegVLAD z-score",
                                      range=(0, None))
    segvlad_exclude_recent: int = setting(20, "keyframe ids just before the query left out of that background "
                                          "(its recent past)", range=(0, None))
    # Geometry
    local_features: str = setting("sift", "local features: sift, orb or xfeat (ONNX; needs the XFeat weights)",
                                  choices=local.KINDS, read_only=True)
    max_keypoints: int = setting(500, "keypoints kept per keyframe (strongest)", range=(8, None), read_only=True)
    metric_keypoints: int = setting(2000, "ORB keypoints (with their depth) kept per keyframe that comes with a "
                                    "depth image, for the metric transform of a loop whose verification "
                                    "keypoints give too few PnP inliers (0: none)", range=(0, None), read_only=True)
    feature_max_side: int = setting(640, "detect keypoints at most at this longest side", range=(16, None),
                                    read_only=True)
    feature_min_side: int = setting(480, "smaller images are upsampled to this longest side for detection "
                                    "(160x120 frames give a handful of keypoints otherwise)", range=(16, None),
                                    read_only=True)
    sift_contrast: float = setting(0.005, "SIFT contrastThreshold at 640 px (scaled for upsampled images); the "
                                   "max_keypoints strongest are kept, so a low value only adds keypoints where "
                                   "texture is poor", range=(0.0, 1.0), read_only=True)
    matcher: str = setting("nn", "tentative matches: nn (ratio test + mutual nearest neighbours) or lighterglue "
                           "(the learned matcher trained for XFeat: needs local_features xfeat and its weights; "
                           "~100-250 ms per candidate on 2 CPU cores, meant for a GPU)",
                           choices=("nn", "lighterglue"), read_only=True)
    ratio: float = setting(0.8, "Lowe ratio test (matcher nn)", range=(0.01, 1.0))
    mutual: bool = setting(True, "keep mutual nearest neighbours only")
    ransac_threshold_px: float = setting(2.0, "RANSAC fit threshold in pixels of a 640 px image (scaled with "
                                         "the image)", range=(0.01, None))
    max_threshold_px: float = setting(8.0, "largest epipolar distance the a-contrario test tries (640 px "
                                      "image)", range=(0.5, None))
    # Decision (see megaloc_ros/verification/decision.py)
    min_significance: float = setting(6.0, "-log10 NFA of the epipolar fit that accepts on geometry "
                                      "alone (a-contrario: fewer than 10^-x such fits expected by chance)")
    min_significance_segvlad: float = setting(1.0, "-log10 NFA that accepts when SegVLAD also singles the "
                                              "candidate out (segvlad z >= min_segvlad_z)")
    min_segvlad_z: float = setting(3.0, "SegVLAD z-score (candidate vs the query's scores on other map "
                                   "keyframes) that supports weaker geometry")
    min_global_score: float = setting(0.0, "global cosine score a candidate needs (the detector already "
                                      "thresholds; raise to be stricter)", range=(-1.0, 1.0))
    min_segvlad_score: float = setting(-1.0, "absolute SegVLAD score floor (-1: off; absolute scores do not "
                                       "transfer across backbones and scenes, the z-score is used instead)",
                                       range=(-1.0, 1.0))
    min_inliers: int = setting(0, "inlier floor on top of the a-contrario test (0: none)", range=(0, None))
    max_accepted_per_query: int = setting(1, "keep the N accepted candidates with the most evidence (-log10 NFA "
                                          "+ segvlad z) (0 = all)", range=(0, None))
    consistency_window: int = setting(2, "a loop is accepted only when a query keyframe at most N keyframes "
                                      "away in its session (in a sequence: one of the N before) also passed to "
                                      "the same place (0: each keyframe on its own); on verified evidence, "
                                      "unlike the detector's consistency_k on global scores", range=(0, None))
    consistency_radius: int = setting(3, "keyframes (along the match's session) a consistent loop's match may lie "
                                      "from the earlier one's (revisits go at another speed)", range=(0, None))

    def __post_init__(self) -> None:
        validate(self, "verifier")
        if self.matcher == "lighterglue" and self.local_features != "xfeat":
            raise ValueError(f"verifier.matcher lighterglue matches XFeat features: set verifier.local_features "
                             f"xfeat (it is {self.local_features!r})")

    @classmethod
    def from_dict(cls, d: dict) -> "VerifierParams":
        """From ``asdict`` output (a saved verifier state). States written before segmentation was
        nested carry its fields flat, under older names: those are read into ``segments``."""
        d = dict(d)
        seg = dict(d.pop("segments", {}))
        for old, new in _FLAT_SEGMENT_FIELDS.items():
            if old in d:
                seg[new] = d.pop(old)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown verifier parameters {sorted(unknown)}")
        return cls(segments=segments.SegmentParams(**seg), **d)


# verifier states of version 1 stored these segmentation fields in VerifierParams itself
_FLAT_SEGMENT_FIELDS = {"segment_method": "method", "segment_max_side": "max_side", "n_segments": "n_segments",
                        "sam_encoder": "sam_encoder", "sam_decoder": "sam_decoder"}


@dataclass
class PairGeometry:
    """What ``Verifier.check_geometry`` found for one pair."""
    pairs: np.ndarray                 # tentative matches [M, 2] (query index, match index)
    check: acontrario.PairCheck
    query_keypoints: np.ndarray       # as the check used them: lens distortion undone
    match_keypoints: np.ndarray
    K_query: Optional[np.ndarray]     # intrinsics of each keyframe's camera for its image (None: unknown)
    K_match: Optional[np.ndarray]


@dataclass
class _Entry:
    """What one keyframe keeps."""
    image_size: tuple[int, int]                 # (w, h) of the image the keypoints refer to
    local: geometry.LocalFeatures
    supersegments: Optional[np.ndarray] = None  # fp16 [S, pca_dim], unit rows
    pending_patches: Optional[np.ndarray] = None  # fp16 [P, C] until the vocabulary exists
    pending_weights: Optional[np.ndarray] = None  # fp16 [S, P] SuperSegment -> patch weights
    keypoint_depth: Optional[np.ndarray] = None   # float32 [N] metres per keypoint, NaN: none
    metric: Optional[geometry.LocalFeatures] = None  # ORB keypoints for metric PnP (keyframes with depth)
    metric_depth: Optional[np.ndarray] = None     # float32 [M] metres per metric keypoint, NaN: none
    camera: Optional[geometry.Camera] = None  # a peer robot's camera; None: the verifier's own

    @property
    def nbytes(self) -> int:
        n = self.local.nbytes + (0 if self.metric is None else self.metric.nbytes)
        for a in (self.supersegments, self.pending_patches, self.pending_weights, self.keypoint_depth,
                  self.metric_depth):
            n += 0 if a is None else a.nbytes
        return n


class Verifier:
    """Checks the candidates of one query keyframe against the stored keyframes.

    ``camera`` (``geometry.Camera``: intrinsics, e.g. from CameraInfo, and lens distortion, undone
    on the keypoints before geometry; keypoints are stored as detected). Without one the check
    uses a fundamental matrix and gives no transform.
    """

    def __init__(self, params: VerifierParams = VerifierParams(), camera: Optional[geometry.Camera] = None,
                 backbone: Optional[str] = None):
        """``backbone``: the model name of the patch features, to pick its shipped vocabulary
        (unknown: the only shipped vocabulary of their width, if any)."""
        self.params = params
        self.backbone = backbone
        self.vocabulary_source = ""    # which vocabulary SegVLAD uses, once it has one
        self.last_evidence: list = []  # decision.Evidence per candidate of the last verify()
        self.map_id = ""  # the place map this state belongs to ("" until it is bound to one)
        self.camera = camera
        self.centroids: Optional[np.ndarray] = None  # [K, C]
        self.pca: Optional[segvlad.Pca] = None
        self._entries: dict[KeyframeId, _Entry] = {}
        self.last_candidate_ms: list[float] = []
        # consistency's short-term memory (not saved: a restart costs at most one revisit's first
        # loop). Query keyframe id -> match ids that passed the pair decision, newest _HISTORY
        self._passed: dict[KeyframeId, list[KeyframeId]] = {}
        # query keyframe id -> (loop, pass reason, evidence rank) withheld for want of consistency
        self._withheld: dict[KeyframeId, list] = {}
        # the order of each session's keyframes, for consistency: in a fleet's map a robot's and
        # its peers' keyframes take turns in the ids, so "within 3 keyframes" counts along the
        # session (a keyframe of unknown session counts in ids, as before sessions were known)
        self._session_of: dict[KeyframeId, int] = {}
        self._session_ids: dict[int, list[KeyframeId]] = {}
        self._lock = threading.Lock()
        self._patch_encoder = None
        if params.segvlad_model:
            from megaloc_ros.encoding.encoder import Encoder
            self._patch_encoder = Encoder(params.segvlad_model)
            if not self._patch_encoder.has_patch_features:
                raise MegalocError(f"segvlad_model {params.segvlad_model} exports no patch features")
            self.backbone = self._patch_encoder.model_name  # its shipped vocabulary, by name only
        self._sam = None
        seg = params.segments
        if seg.method == "sam":
            self._sam = segments.SamSegmenter(seg.sam_encoder, seg.sam_decoder, seg.sam_points_per_side)

    # ------------------------------------------------------------------ keyframes
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, kf_id: KeyframeId) -> bool:
        return kf_id in self._entries

    @property
    def has_vocabulary(self) -> bool:
        return self.centroids is not None

    def bytes_per_keyframe(self) -> float:
        """Mean bytes held per keyframe (pending keyframes included while they exist)."""
        with self._lock:
            if not self._entries:
                return 0.0
            return float(np.mean([e.nbytes for e in self._entries.values()]))

    def _supersegment_weights(self, image_rgb: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
        labels = segments.segment_image(image_rgb, self.params.segments, self._sam)
        adj = segvlad.delaunay_adjacency(segvlad.segment_centroids(labels))
        member = segvlad.patch_membership(labels, grid_hw)              # [S, P]
        ss = segvlad.supersegments(adj, self.params.order).astype(np.float32)
        w = np.minimum(ss @ member, 1.0)                                # segments are disjoint
        area = member.sum(axis=1)
        keep = np.argsort(-area, kind="stable")[: self.params.max_supersegments]
        return w[np.sort(keep)]

    def _describe(self, patches: np.ndarray, weights: np.ndarray) -> np.ndarray:
        v = segvlad.vlad(patches, weights, self.centroids)
        return self.pca.project(v).astype(np.float16)

    def add_keyframe(self, keyframe: Keyframe, image_rgb: np.ndarray, features: ImageFeatures,
                     depth_m: Optional[np.ndarray] = None) -> None:
        """Store what verification needs for ``keyframe`` (see the module docstring for sizes).
        ``depth_m``: a depth image in metres registered to ``image_rgb`` (NaN or 0: none); the
        depth of each keypoint is kept (4 B), so loops matching this keyframe get a metric
        transform (PnP). DuplicateId when the id is taken: a collision is another map's
        keyframe, never replaced."""
        if keyframe.id in self._entries:
            raise DuplicateId(f"keyframe {keyframe.id} is already in the verifier state; not replaced "
                              "(a keyframe of another map or session with a colliding id?)")
        with _one_blas_thread():
            self._add_keyframe(keyframe, image_rgb, features, depth_m)
        self.note_keyframe(keyframe.id, keyframe.session)

    def note_keyframe(self, kf_id: KeyframeId, session: int) -> None:
        """``kf_id`` is a keyframe of ``session`` in the map (e.g. a peer's, whose data has not
        been fetched): consistency counts keyframes along each session."""
        kf_id, session = int(kf_id), int(session)
        with self._lock:
            if self._session_of.get(kf_id) == session:
                return
            old = self._session_of.get(kf_id)
            if old is not None:
                self._session_ids[old].remove(kf_id)
            self._session_of[kf_id] = session
            bisect.insort(self._session_ids.setdefault(session, []), kf_id)

    def _rank(self, kf_id: KeyframeId) -> tuple:
        """Under ``_lock``: (session, position among its keyframes); (None, id) when unknown."""
        s = self._session_of.get(kf_id)
        if s is None:
            return None, kf_id
        return s, bisect.bisect_left(self._session_ids[s], kf_id)

    def _apart(self, a: KeyframeId, b: KeyframeId) -> float:
        """Under ``_lock``: keyframes between ``a`` and ``b`` along their session (inf: other sessions)."""
        (sa, ra), (sb, rb) = self._rank(a), self._rank(b)
        return abs(ra - rb) if sa == sb else float("inf")

    def _around(self, kf_id: KeyframeId, w: int) -> list[KeyframeId]:
        """Under ``_lock``: the keyframes at most ``w`` before or after ``kf_id`` in its session."""
        s, r = self._rank(kf_id)
        if s is None:
            return [q for q in range(kf_id - w, kf_id + w + 1) if q != kf_id]
        ids = self._session_ids[s]
        return [q for q in ids[max(r - w, 0):r + w + 1] if q != kf_id]

    def _add_keyframe(self, keyframe: Keyframe, image_rgb: np.ndarray, features: ImageFeatures,
                      depth_m: Optional[np.ndarray] = None) -> None:
        p = self.params
        feats = extract_local_features(p, image_rgb)
        entry = _Entry((image_rgb.shape[1], image_rgb.shape[0]), feats)
        if depth_m is not None:
            entry.keypoint_depth = metric_pose.keypoint_depths(feats.keypoints, depth_m, entry.image_size)
            if p.metric_keypoints > 0:
                grey = image_rgb if image_rgb.ndim == 2 else cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
                xy, desc = metric_pose.orb_features(grey, p.metric_keypoints)
                entry.metric = geometry.LocalFeatures(xy, desc, entry.image_size)
                entry.metric_depth = metric_pose.keypoint_depths(xy, depth_m, entry.image_size)
        pf = features.patch_features
        if self._patch_encoder is not None:
            pf = self._patch_encoder.encode([image_rgb])[0].patch_features
        if pf is not None and np.asarray(pf).ndim == 3:
            pf = np.asarray(pf, np.float32)
            weights = self._supersegment_weights(image_rgb, pf.shape[:2])
            patches = pf.reshape(-1, pf.shape[2])
            if not self.has_vocabulary:
                self._use_shipped_vocabulary(patches.shape[1])
            if self.has_vocabulary:
                if patches.shape[1] != self.centroids.shape[1]:
                    raise MapFileError(f"patch features have {patches.shape[1]} channels, the "
                                       f"SegVLAD vocabulary {self.centroids.shape[1]}: another backbone?")
                entry.supersegments = self._describe(patches, weights)
            else:
                entry.pending_patches = patches.astype(np.float16)
                entry.pending_weights = weights.astype(np.float16)
        with self._lock:
            self._entries[keyframe.id] = entry
            if not self.has_vocabulary and self._pending_count() >= p.vocab_keyframes:
                self._fit_vocabulary()

    def _use_shipped_vocabulary(self, width: int) -> None:
        """Adopt the vocabulary ``params.vocabulary`` names (module doc), converting keyframes
        held pending; nothing for "map" or when none fits ``width``."""
        choice = self.params.vocabulary
        if choice == "map":
            return
        if choice == "auto":
            voc = vocabulary.shipped(self.backbone, width)
        else:
            try:
                voc = vocabulary.Vocabulary.load(choice)
            except (OSError, ValueError, KeyError) as exc:
                raise MegalocError(f"verifier vocabulary {choice!r} cannot be read: {exc}") from None
            if voc.width != width:
                raise MapFileError(f"vocabulary {choice} is for {voc.width}-channel patch features, "
                                   f"these have {width}")
        if voc is None or voc.width != width:
            return
        with self._lock:
            if self.has_vocabulary:
                return
            self.centroids, self.pca = voc.centroids, voc.pca
            self.vocabulary_source = voc.describe()
            for e in self._entries.values():
                if e.pending_patches is not None:
                    e.supersegments = self._describe(e.pending_patches.astype(np.float32),
                                                     e.pending_weights.astype(np.float32))
                    e.pending_patches = e.pending_weights = None

    def _pending_count(self) -> int:
        return sum(e.pending_patches is not None for e in self._entries.values())

    def _fit_vocabulary(self) -> None:
        pend = [e for e in self._entries.values() if e.pending_patches is not None]
        dims = {e.pending_patches.shape[1] for e in pend}
        if len(dims) != 1:
            raise MapFileError(f"keyframes carry patch features of different widths {sorted(dims)}")
        self.centroids = segvlad.kmeans(np.concatenate([e.pending_patches for e in pend]).astype(np.float32),
                                        self.params.vocab_size)
        vlads = [segvlad.vlad(e.pending_patches.astype(np.float32), e.pending_weights.astype(np.float32),
                              self.centroids) for e in pend]
        self.pca = segvlad.Pca.fit(np.concatenate(vlads), self.params.pca_dim, self.params.pca_whiten)
        self.vocabulary_source = f"SegVLAD vocabulary fitted on this map's first {len(pend)} keyframes"
        for e, v in zip(pend, vlads):
            e.supersegments = self.pca.project(v).astype(np.float16)
            e.pending_patches = e.pending_weights = None

    # ------------------------------------------------------------------ verification
    def camera_of(self, e: _Entry) -> Optional[geometry.Camera]:
        """The camera that took keyframe ``e`` (None: unknown): its own (a peer robot's,
        ``_Entry.camera``), else this verifier's."""
        return e.camera if e.camera is not None else self.camera

    def _intrinsics(self, e: _Entry) -> Optional[np.ndarray]:
        """``e``'s camera's intrinsics for its image; None when unknown."""
        cam = self.camera_of(e)
        return None if cam is None else cam.intrinsics(e.image_size)

    def verify(self, candidates: list[Candidate]) -> list[VerifiedLoop]:
        """Decide on each candidate of one query keyframe (added before); same order as given,
        followed by any earlier-withheld loop of a later keyframe that this one makes consistent
        (only when keyframes are verified out of order, as a fleet's are). ``last_evidence`` and
        ``last_candidate_ms`` then hold each given candidate's evidence and time."""
        if not candidates:
            return []
        qid = candidates[0].query.id
        if any(c.query.id != qid for c in candidates):
            raise ValueError("verify() takes the candidates of one query keyframe at a time")
        p = self.params
        t_start = time.perf_counter()
        with self._lock:
            q = self._entries.get(qid)
            entries = [self._entries.get(c.match.id) for c in candidates]
            vocab_note = (None if self.has_vocabulary else
                          f"no segvlad yet (vocabulary after {p.vocab_keyframes} keyframes, "
                          f"{self._pending_count()} so far)")
            bg_ids = decision.background_ids(
                [i for i, e in sorted(self._entries.items()) if e.supersegments is not None], qid,
                [c.match.id for c in candidates], p.segvlad_background, p.segvlad_exclude_recent, 2)
            background = [self._entries[i].supersegments for i in bg_ids]
        bg_scores = None
        if q is not None and q.supersegments is not None and background:
            with _one_blas_thread():
                bg_scores = decision.segvlad_scores(q.supersegments.astype(np.float32),
                                                    [b.astype(np.float32) for b in background], p.vote_top_k)
        shared_ms = (time.perf_counter() - t_start) * 1e3 / len(candidates)
        out, ms, evs = [], [], []
        self.last_candidate_ms, self.last_evidence = ms, evs  # for benchmarks
        for cand, m in zip(candidates, entries):
            if q is None or m is None:
                which = qid if q is None else cand.match.id
                out.append(VerifiedLoop(cand, False, reason=f"rejected: keyframe {which} was never "
                                        "added to the verifier"))
                evs.append(None)
                continue
            t0 = time.perf_counter()
            with _one_blas_thread():
                loop, ev = self._decide(cand, q, m, vocab_note, bg_scores)
            out.append(loop)
            evs.append(ev)
            ms.append((time.perf_counter() - t0) * 1e3 + shared_ms)
        withheld = self._check_consistency(qid, out)
        cap = p.max_accepted_per_query
        order = sorted((k for k, r in enumerate(out) if r.accepted), key=lambda k: -evs[k].rank)
        if cap > 0 and len(order) > cap:
            best = out[order[0]]
            for k in order[cap:]:
                _demote(out[k], f"keyframe {best.candidate.match.id} has more evidence "
                                f"({evs[order[0]].rank:.1f} vs {evs[k].rank:.1f})")
        return out + self._confirm_late(qid, out, withheld, evs)

    def _confirm_late(self, qid: KeyframeId, out: list[VerifiedLoop], withheld: dict[int, str],
                      evs: list) -> list[VerifiedLoop]:
        """Keep ``qid``'s withheld loops (index -> the pass reason) while it has no accepted one;
        return the withheld loops of keyframes just after ``qid``, verified before it (a fleet's
        peer data comes out of order), that ``qid``'s passes now make consistent: at most one
        per keyframe, accepted. In a sequence verified in order this returns nothing."""
        p = self.params
        late = []
        with self._lock:
            passed = self._passed.get(qid, [])
            if any(r.accepted for r in out):
                self._withheld.pop(qid, None)
            elif withheld:
                self._withheld.setdefault(qid, []).extend(
                    (out[k], why, evs[k].rank) for k, why in withheld.items())
            for q in [q for q in self._around(qid, p.consistency_window) if q > qid and q in self._withheld]:
                ok = [(rank, loop, why, m) for loop, why, rank in self._withheld[q] for m in passed
                      if self._apart(loop.candidate.match.id, m) <= p.consistency_radius]
                if ok:
                    _, loop, why, m = max(ok, key=lambda t: t[0])
                    loop.accepted = True
                    loop.reason = f"accepted: {why}; consistent: keyframe {qid} passed to {m} (verified after it)"
                    late.append(loop)
                    del self._withheld[q]
            _trim(self._withheld)
        return late

    def _check_consistency(self, qid: KeyframeId, out: list[VerifiedLoop]) -> dict[int, str]:
        """Withhold the loops of ``qid`` that passed the pair decision but have no support: no
        query within ``consistency_window`` keyframes of it (in a sequence: the ones before it)
        passed to a match within ``consistency_radius`` keyframes; both counted along their
        session (``note_keyframe``), as a fleet's robots take turns in the ids. One frame
        matching a look-alike place (a repeated door, a corridor section 50 m on) is the usual
        false loop; a true revisit
        keeps matching the same stretch of the map from one keyframe to the next (the temporal
        consistency of DBoW2 and RTAB-Map, here on verified evidence). Costs the first keyframe
        of a revisit. A keyframe none of whose neighbours has been verified yet (the start of a
        map; in a fleet, neighbours whose peer data is still in flight) is decided on its own.
        Returns the withheld loops' indices in ``out`` with their pass reasons."""
        p = self.params
        passed = [r.candidate.match.id for r in out if r.accepted]
        with self._lock:
            self._passed.setdefault(qid, []).extend(passed)  # a query can be asked again (fleet)
            _trim(self._passed)
            if p.consistency_window <= 0:
                return {}
            # either side: a fleet query can be asked again after its successors (peer data
            # fetched late); in a single sequence only the keyframes before have been verified
            verified = [q for q in self._around(qid, p.consistency_window) if q in self._passed]
            near = [(q, m) for q in verified for m in self._passed[q]]
        if not verified:  # the start of a map, or (fleet) its neighbours still wait for peer data
            for r in out:
                if r.accepted:
                    r.reason += f"; consistency not checked: no keyframe within {p.consistency_window} verified yet"
            return {}
        withheld = {}
        for k, r in enumerate(out):
            if not r.accepted:
                continue
            mid = r.candidate.match.id
            with self._lock:
                support = [(self._apart(m, mid), -q, q, m) for q, m in near]
            support = [t for t in support if t[0] <= p.consistency_radius]
            if support:
                _, _, q, m = min(support)
                r.reason += f"; consistent: keyframe {q} passed to {m}"
            else:
                withheld[k] = _demote(r, f"not yet consistent: no keyframe within {p.consistency_window} "
                                         f"of {qid} passed to a keyframe within {p.consistency_radius} of {mid}")
        return withheld

    def tentative_matches(self, a: geometry.LocalFeatures, b: geometry.LocalFeatures) -> np.ndarray:
        """Index pairs [M, 2] (into a, into b) by the configured ``matcher``."""
        if self.params.matcher == "lighterglue":
            from megaloc_ros.verification import lighterglue
            return lighterglue.default_model().match(a, b)
        return local.match(a, b, self.params.ratio, self.params.mutual)

    def _pinhole(self, e: _Entry, keypoints: Optional[np.ndarray] = None) -> np.ndarray:
        """``e``'s keypoints (default its verification keypoints) where an ideal pinhole camera
        with its intrinsics would see them: its camera's lens distortion undone (as stored
        without one, or without intrinsics)."""
        pts = e.local.keypoints if keypoints is None else keypoints
        cam = self.camera_of(e)
        if cam is None or cam.distortion is None:
            return pts
        return cam.distortion.undistort(pts, cam.intrinsics(e.image_size)).astype(np.float32)

    def _metric_pnp(self, q: _Entry, m: _Entry, K_query: np.ndarray, K_match: np.ndarray):
        """PnP on the two keyframes' metric (ORB) keypoints, the match's lifted with their depth;
        None when either has none."""
        if q.metric is None or m.metric is None or m.metric_depth is None:
            return None
        pairs = metric_pose.mutual_pairs(q.metric.descriptors, m.metric.descriptors)
        return metric_pose.pose_from_keypoint_depths(
            self._pinhole(m, m.metric.keypoints), m.metric_depth, K_match, self._pinhole(q, q.metric.keypoints),
            K_query, pairs, METRIC_POSE)

    def check_geometry(self, q: _Entry, m: _Entry) -> "PairGeometry":
        """The geometric half of a decision, also what an explanation draws. Matches whose
        keypoint the distortion model cannot undo (beyond a fisheye's 90 deg) are left out."""
        p = self.params
        Kq, Km = self._intrinsics(q), self._intrinsics(m)
        pairs = self.tentative_matches(q.local, m.local)
        qk, mk = self._pinhole(q), self._pinhole(m)
        if len(pairs):
            pairs = pairs[np.isfinite(qk[pairs[:, 0]]).all(axis=1) & np.isfinite(mk[pairs[:, 1]]).all(axis=1)]
        chk = acontrario.check_pair(geometry.LocalFeatures(qk, q.local.descriptors, q.image_size),
                                    geometry.LocalFeatures(mk, m.local.descriptors, m.image_size), Kq, Km,
                                    threshold_px=p.ransac_threshold_px, max_threshold_px=p.max_threshold_px,
                                    pairs=pairs)
        return PairGeometry(pairs, chk, qk, mk, Kq, Km)

    def _decide(self, cand: Candidate, q: _Entry, m: _Entry, vocab_note: Optional[str],
                bg_scores: Optional[np.ndarray]):
        """(VerifiedLoop, decision.Evidence) for one candidate."""
        p = self.params
        ev = decision.Evidence(None)
        if cand.score < p.min_global_score:
            return VerifiedLoop(cand, False, reason=f"rejected: global {cand.score:.2f} < "
                                f"{p.min_global_score:.2f}"), ev
        sv = 0.0
        if q.supersegments is not None and m.supersegments is not None:
            sv = float(decision.segvlad_scores(q.supersegments.astype(np.float32),
                                               [m.supersegments.astype(np.float32)], p.vote_top_k)[0])
            ev.segvlad = sv
            if bg_scores is not None:
                ev.segvlad_z, ev.segvlad_note = decision.zscore(sv, bg_scores)
                ev.background = len(bg_scores)
            else:
                ev.segvlad_note = "no segvlad z (no other keyframes to compare with)"
            if sv < p.min_segvlad_score:
                return VerifiedLoop(cand, False, sv, reason=f"rejected: segvlad {sv:.2f} < "
                                    f"{p.min_segvlad_score:.2f} (geometry skipped)"), ev
        else:
            ev.segvlad_note = vocab_note or "no segvlad (keyframe without patch features)"
        g = self.check_geometry(q, m)
        chk = g.check
        ev.significance = chk.significance
        ok, reason = decision.decide(ev, p.min_significance, p.min_significance_segvlad, p.min_segvlad_z,
                                     p.min_inliers)
        pose = chk.pose
        if ok and m.keypoint_depth is not None and g.K_query is not None and g.K_match is not None:
            pnp = metric_pose.pose_from_keypoint_depths(g.match_keypoints, m.keypoint_depth, g.K_match,
                                                        g.query_keypoints, g.K_query, g.pairs, ROTATION_POSE)
            fit = (f"PnP {len(pnp.inliers)}/{pnp.points_with_depth} matches with depth, "
                   f"{pnp.rms_px:.2f} px rms") if pnp is not None else ""
            dense = None
            if pnp is None or len(pnp.inliers) < METRIC_MIN_INLIERS:
                dense = self._metric_pnp(q, m, g.K_query, g.K_match)
            if pnp is not None and len(pnp.inliers) >= METRIC_MIN_INLIERS:
                pose = pnp.pose
                reason += f"; metric transform: {fit}"
            elif dense is not None:
                pose = dense.pose
                reason += (f"; metric transform: PnP {len(dense.inliers)}/{dense.points_with_depth} ORB "
                           f"matches with depth, {dense.rms_px:.2f} px rms (verification keypoints: "
                           f"{fit or 'PnP failed'})")
            elif pnp is not None:
                pose = metric_pose.without_scale(pnp.pose)
                reason += (f"; rotation and unit direction: {fit} (< {METRIC_MIN_INLIERS} inliers "
                           "for a metric translation)")
            else:
                reason += (f"; unit direction from the essential matrix: PnP failed (< "
                           f"{ROTATION_POSE.min_inliers} inliers among the matches with depth)")
        if ok and pose is None:
            reason += "; no transform (no intrinsics)"
        return VerifiedLoop(cand, ok, sv, chk.inliers, pose, reason=reason), ev

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write the state to ``path`` atomically (npz, no pickle)."""
        path = Path(path)
        with self._lock:
            ids = sorted(self._entries)
            es = [self._entries[i] for i in ids]
            peer_cams = [(i, e.camera.intrinsics(e.image_size), e.camera.distortion)
                         for i, e in zip(ids, es) if e.camera is not None]
            cam = self.camera
            meta = {"format": FORMAT, "version": VERSION, "params": asdict(self.params),
                    "camera_size": None if cam is None else cam.size, "map_id": self.map_id,
                    "distortion": None if cam is None or cam.distortion is None else cam.distortion.saved(),
                    "entry_distortion": [None if dist is None else dist.saved() for _, _, dist in peer_cams],
                    "vocabulary_source": self.vocabulary_source, "backbone": self.backbone}
            arrays = {
                "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
                "ids": np.array(ids, np.int64),
                # every keyframe's session the verifier heard of, for consistency (fetched or not)
                "session_ids": np.array(sorted(self._session_of), np.int64),
                "sessions": np.array([self._session_of[i] for i in sorted(self._session_of)], np.int64),
                "image_size": np.array([e.image_size for e in es], np.int64).reshape(-1, 2),
                "kp_count": np.array([len(e.local.keypoints) for e in es], np.int64),
                "keypoints": _cat([e.local.keypoints for e in es], (0, 2), np.float32),
                "descriptors": _cat([e.local.descriptors for e in es],
                                    (0, local.DESCRIPTOR_BYTES[self.params.local_features]),
                                    np.int8 if self.params.local_features == "xfeat" else np.uint8),
                "ss_count": np.array([-1 if e.supersegments is None else len(e.supersegments) for e in es], np.int64),
                "keypoint_depth": _cat([e.keypoint_depth if e.keypoint_depth is not None else
                                        np.full(len(e.local.keypoints), -1.0, np.float32) for e in es], (0,),
                                       np.float32),  # -1: this keyframe had no depth image
                "supersegments": _cat([e.supersegments for e in es if e.supersegments is not None],
                                      (0, self.pca.dim if self.pca else 0), np.float16),
                # ORB keypoints for metric PnP: -1, none (the keyframe came without depth)
                "metric_count": np.array([-1 if e.metric is None else len(e.metric.keypoints) for e in es], np.int64),
                "metric_keypoints": _cat([e.metric.keypoints for e in es if e.metric is not None], (0, 2), np.float32),
                "metric_descriptors": _cat([e.metric.descriptors for e in es if e.metric is not None], (0, 32),
                                           np.uint8),
                "metric_depth": _cat([e.metric_depth for e in es if e.metric is not None], (0,), np.float32),
            }
            pend = [(i, e) for i, e in zip(ids, es) if e.pending_patches is not None]
            arrays["pending_ids"] = np.array([i for i, _ in pend], np.int64)
            for i, e in pend:
                arrays[f"pending_patches_{i}"] = e.pending_patches
                arrays[f"pending_weights_{i}"] = e.pending_weights
            if cam is not None:
                arrays["camera_matrix"] = cam.K
            if peer_cams:  # keyframes of peer robots' cameras: K for each keyframe's image
                arrays["entry_camera_ids"] = np.array([i for i, _, _ in peer_cams], np.int64)
                arrays["entry_camera_matrix"] = np.stack([K for _, K, _ in peer_cams]).astype(np.float64)
            if self.has_vocabulary:
                arrays.update(centroids=self.centroids, pca_mean=self.pca.mean,
                              pca_components=self.pca.components, pca_scale=self.pca.scale)
        with atomic_write(path) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path, camera: Optional[geometry.Camera] = None) -> "Verifier":
        """Read a state written by ``save``; MapFileError if it is not one, or is damaged.
        ``camera`` replaces the saved camera (intrinsics and distortion)."""
        path = Path(path)
        try:
            with open(path, "rb") as f:  # npz is a zip: anything else is not a state (say so plainly)
                if f.read(4) != b"PK\x03\x04":
                    raise MapFileError(f"{path} is not a megaloc_ros verifier state (not an npz archive)")
            with np.load(path, allow_pickle=False) as z:
                if "meta" not in z.files:
                    raise MapFileError(f"{path} is not a megaloc_ros verifier state")
                meta = json.loads(z["meta"].tobytes().decode())
                if meta.get("format") != FORMAT:
                    raise MapFileError(f"{path} is not a megaloc_ros verifier state")
                if meta.get("version") != VERSION:
                    raise MapFileError(f"{path} has verifier state version {meta.get('version')}, "
                                       f"this build reads {VERSION}: rebuild the map")
                d = {k: z[k] for k in z.files}
        except MapFileError:
            raise
        except FileNotFoundError:
            raise MapFileError(f"{path}: no such verifier state file") from None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, json.JSONDecodeError,
                UnicodeDecodeError) as exc:
            raise MapFileError(f"{path} is truncated or not a verifier state ({exc})") from None
        try:
            params = VerifierParams.from_dict(meta["params"])
            if camera is None and "camera_matrix" in d:
                camera = geometry.Camera(d["camera_matrix"], meta.get("camera_size"),
                                         geometry.Distortion.from_saved(meta.get("distortion")))
            v = cls(params, camera, meta.get("backbone"))
            v.vocabulary_source = meta.get("vocabulary_source", "")
            v.map_id = str(meta.get("map_id", ""))
            if "centroids" in d:
                v.centroids = d["centroids"].astype(np.float32)
                v.pca = segvlad.Pca(d["pca_mean"], d["pca_components"], d["pca_scale"])
            kp_off = np.concatenate([[0], np.cumsum(d["kp_count"])])
            ss_count = d["ss_count"]
            ss_off = np.concatenate([[0], np.cumsum(np.maximum(ss_count, 0))])
            if kp_off[-1] != len(d["keypoints"]) or ss_off[-1] != len(d["supersegments"]):
                raise ValueError("array lengths disagree")
            # states from before metric keypoints have none
            metric_count = d.get("metric_count", np.full(len(d["ids"]), -1, np.int64))
            mt_off = np.concatenate([[0], np.cumsum(np.maximum(metric_count, 0))])
            if mt_off[-1] != len(d.get("metric_keypoints", ())):
                raise ValueError("metric keypoint array lengths disagree")
            for kid, session in zip(d.get("session_ids", np.zeros(0, np.int64)).tolist(),
                                    d.get("sessions", np.zeros(0, np.int64)).tolist()):
                v.note_keyframe(kid, session)
            pending = set(d["pending_ids"].tolist())
            for n, kid in enumerate(d["ids"].tolist()):
                size = tuple(int(x) for x in d["image_size"][n])
                local = geometry.LocalFeatures(d["keypoints"][kp_off[n]:kp_off[n + 1]],
                                               d["descriptors"][kp_off[n]:kp_off[n + 1]], size)
                e = _Entry(size, local)
                if "keypoint_depth" in d:  # states from before depth support have none
                    kd = d["keypoint_depth"][kp_off[n]:kp_off[n + 1]]
                    if len(kd) and not np.all(kd == -1.0):
                        e.keypoint_depth = kd.astype(np.float32)
                if ss_count[n] >= 0:
                    e.supersegments = d["supersegments"][ss_off[n]:ss_off[n + 1]]
                if metric_count[n] >= 0:
                    a, b = mt_off[n], mt_off[n + 1]
                    e.metric = geometry.LocalFeatures(d["metric_keypoints"][a:b], d["metric_descriptors"][a:b], size)
                    e.metric_depth = d["metric_depth"][a:b]
                if kid in pending:
                    e.pending_patches = d[f"pending_patches_{kid}"]
                    e.pending_weights = d[f"pending_weights_{kid}"]
                v._entries[kid] = e
            for n, kid in enumerate(d.get("entry_camera_ids", np.zeros(0, np.int64)).tolist()):
                e = v._entries[kid]
                e.camera = geometry.Camera(d["entry_camera_matrix"][n], e.image_size,
                                           geometry.Distortion.from_saved(meta["entry_distortion"][n]))
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            raise MapFileError(f"{path} is inconsistent or truncated ({exc})") from None
        return v


def _demote(loop: VerifiedLoop, why: str) -> str:
    """Reject a loop that passed the pair decision, saying why; returns its pass reason."""
    passed = loop.reason[len("accepted: "):]
    loop.accepted = False
    loop.reason = f"rejected: passed ({passed}) but {why}"
    return passed


def _trim(history: dict) -> None:
    """Drop the oldest entries beyond ``_HISTORY`` (insertion order)."""
    while len(history) > _HISTORY:
        del history[next(iter(history))]


def _cat(arrays: list[np.ndarray], empty_shape: tuple[int, int], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(empty_shape, dtype)
