"""Loop-closure verification: SegVLAD re-scoring + geometric check + an explained decision.

``Verifier.add_keyframe`` reduces each keyframe to what verification needs, and only that:

  * SegVLAD: at most ``max_supersegments`` SuperSegment descriptors, PCA-reduced to
    ``pca_dim`` and stored as fp16 (default at most 48 x 256 x 2 B = 24 KiB);
  * geometry: at most ``max_keypoints`` keypoints (float32 x, y: 8 B) with SIFT descriptors
    stored as uint8 (128 B) or ORB (32 B) (default at most 500 x 136 B = 66 KiB).

So a keyframe costs at most ~90 KiB by default; 55 KiB on average on the rtabmap sequence
(``Verifier.bytes_per_keyframe`` reports the measured mean; `megaloc-ros bench verify` prints
it). No image is kept. Fixed cost per map: the vocabulary (32 x C floats) and the PCA matrix
(pca_dim x 32*C floats: 12 MiB for C = 384).

Vocabulary policy. The SegVLAD vocabulary (k-means centroids of the L2-normalised patch
features) and its PCA are fitted once, on the map's own first ``vocab_keyframes`` keyframes
that carry patch features, and are saved with the verifier state. Until then those keyframes
are held in a pending form (their fp16 patch features and SuperSegment membership, ~220 KiB
each) and converted when the fit happens; meanwhile decisions use the global score and
geometry only, and the reason says so. There is no automatic refit: stored descriptors are
lossy (PCA, fp16), so a new vocabulary would orphan every keyframe already described; start a
new map to change it.

Decision rule for each candidate, in order (thresholds in ``VerifierParams``):
  1. global score >= ``min_global_score``;
  2. SegVLAD score >= ``min_segvlad_score`` when both keyframes have SegVLAD descriptors;
  3. RANSAC inliers >= ``min_inliers`` (essential matrix with intrinsics, else fundamental).
The first failing test rejects; geometry is skipped after an earlier rejection. Of the
candidates that pass, only the ``max_accepted_per_query`` with the most inliers are accepted
(default 1): a query near a revisited stretch has several overlapping candidates, and the
neighbours of the true match also pass with fewer inliers; one well-supported loop per keyframe
is what a pose graph needs.

SegVLAD score (``verification_score``): ``segvlad.vote`` with the retrieval restricted to one
candidate at a time, i.e. the mean over the query's SuperSegments of their ``vote_top_k`` best
cosine similarities to the candidate's SuperSegments. The paper pools all candidates' segments
before voting; pooled votes split between the adjacent keyframes of a revisited stretch and
depend on how many candidates came, so no fixed threshold fits them (on rtabmap top-5
candidates, true-vs-false AUC was 0.69 pooled against 0.92 per candidate).

Transform: with intrinsics, ``RelativePose`` (rotation, unit translation direction,
``metric_scale`` False) with the rough covariance of ``geometry.pose_covariance`` (angular
variance (1 px / f)^2 / inliers on each axis); without intrinsics, None.
"""
from __future__ import annotations

import json
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np

from megaloc_ros.verification import geometry, segments, segvlad
from megaloc_ros.errors import DuplicateId, MapFileError, MegalocError
from megaloc_ros.io.files import atomic_write
from megaloc_ros.settings import section, setting, validate
from megaloc_ros.types import Candidate, ImageFeatures, Keyframe, KeyframeId, VerifiedLoop

_BLAS = None


def _one_blas_thread():
    """Single-threaded BLAS for the verifier's small matrix products: multi-threaded OpenBLAS
    on a busy 2-core CPU made a 48x12288x256 product 5-50x slower (spin-waiting threads)."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


FORMAT = "megaloc_ros.verification.verifier"
VERSION = 1


@dataclass
class VerifierParams:
    """Verifier settings. The decision thresholds were chosen on the rtabmap sequence with the
    offline DINOv2 ViT-S/14 backbone (`megaloc-ros bench verify` shows the effect of changing
    them with ``--set verifier.NAME=VALUE``); SegVLAD scores depend on the backbone, so re-check
    ``min_segvlad_score`` with `megaloc-ros eval` on your own bag when using MegaLoc features.

    Only the decision settings may change at run time (``read_only`` False); the others shape the
    stored keyframe data, which a loaded verifier state keeps."""
    segments: segments.SegmentParams = section(segments.SegmentParams, "image segmentation for SegVLAD",
                                               read_only=True)
    # SegVLAD
    segvlad_model: str = setting("", "a second backbone (exported .onnx + .json sidecar) whose patch features "
                                 "SegVLAD uses; empty: the keyframe's own", read_only=True)
    order: int = setting(3, "SuperSegment neighbourhood order o (graph hops)", range=(0, 16), read_only=True)
    vocab_size: int = setting(32, "k-means clusters of the SegVLAD vocabulary", range=(2, 1024), read_only=True)
    vocab_keyframes: int = setting(30, "fit the vocabulary once this many keyframes exist", range=(1, None),
                                   read_only=True)
    pca_dim: int = setting(256, "SuperSegment descriptor length after PCA", range=(1, None), read_only=True)
    pca_whiten: bool = setting(False, "PCA-whitening; lowers scores: re-tune min_segvlad_score (at 0.30 it kept "
                               "6 of 35 true loops on rtabmap)", read_only=True)
    max_supersegments: int = setting(48, "SuperSegments kept per keyframe (largest by area)", range=(1, None),
                                     read_only=True)
    vote_top_k: int = setting(5, "segment-level retrieval depth per query SuperSegment", range=(1, None))
    # Geometry
    local_features: str = setting("sift", "local features: sift or orb", choices=("sift", "orb"), read_only=True)
    max_keypoints: int = setting(500, "keypoints kept per keyframe (strongest)", range=(8, None), read_only=True)
    feature_max_side: int = setting(640, "detect keypoints at this longest side", range=(16, None), read_only=True)
    sift_contrast: float = setting(0.02, "SIFT contrastThreshold (OpenCV default 0.04: too few indoors)",
                                   range=(0.0, 1.0), read_only=True)
    ratio: float = setting(0.8, "Lowe ratio test", range=(0.01, 1.0))
    mutual: bool = setting(True, "keep mutual nearest neighbours only")
    ransac_threshold_px: float = setting(2.0, "epipolar inlier threshold in pixels", range=(0.01, None))
    # Decision
    min_global_score: float = setting(0.0, "global cosine score a candidate needs (the detector already "
                                      "thresholds; raise to be stricter)", range=(-1.0, 1.0))
    min_segvlad_score: float = setting(0.30, "SegVLAD score a candidate needs: mean top-k SuperSegment cosine "
                                       "similarity", range=(-1.0, 1.0))
    min_inliers: int = setting(20, "RANSAC inliers a candidate needs", range=(0, None))
    max_accepted_per_query: int = setting(1, "keep the N passing candidates with most inliers (0 = all)",
                                          range=(0, None))

    def __post_init__(self) -> None:
        validate(self, "verifier")

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
class _Entry:
    """What one keyframe keeps."""
    image_size: tuple[int, int]                 # (w, h) of the image the keypoints refer to
    local: geometry.LocalFeatures
    supersegments: Optional[np.ndarray] = None  # fp16 [S, pca_dim], unit rows
    pending_patches: Optional[np.ndarray] = None  # fp16 [P, C] until the vocabulary exists
    pending_weights: Optional[np.ndarray] = None  # fp16 [S, P] SuperSegment -> patch weights

    @property
    def nbytes(self) -> int:
        n = self.local.nbytes
        for a in (self.supersegments, self.pending_patches, self.pending_weights):
            n += 0 if a is None else a.nbytes
        return n


class Verifier:
    """Checks the candidates of one query keyframe against the stored keyframes.

    ``camera_matrix``: 3x3 intrinsics (e.g. from ``CameraInfo.k``) valid for images of
    ``camera_size`` (w, h); None = images as given to ``add_keyframe``. Without intrinsics the
    check uses a fundamental matrix and gives no transform.
    """

    def __init__(self, params: VerifierParams = VerifierParams(),
                 camera_matrix: Optional[np.ndarray] = None,
                 camera_size: Optional[tuple[int, int]] = None):
        self.params = params
        self.map_id = ""  # the place map this state belongs to ("" until it is bound to one)
        self.camera_matrix = None if camera_matrix is None else np.asarray(camera_matrix, np.float64).reshape(3, 3)
        self.camera_size = None if camera_size is None else (int(camera_size[0]), int(camera_size[1]))
        self.centroids: Optional[np.ndarray] = None  # [K, C]
        self.pca: Optional[segvlad.Pca] = None
        self._entries: dict[KeyframeId, _Entry] = {}
        self.last_candidate_ms: list[float] = []
        self._lock = threading.Lock()
        self._patch_encoder = None
        if params.segvlad_model:
            from megaloc_ros.encoding.encoder import Encoder
            self._patch_encoder = Encoder(params.segvlad_model)
            if not self._patch_encoder.has_patch_features:
                raise MegalocError(f"segvlad_model {params.segvlad_model} exports no patch features")
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

    def add_keyframe(self, keyframe: Keyframe, image_rgb: np.ndarray, features: ImageFeatures) -> None:
        """Store what verification needs for ``keyframe`` (see the module docstring for sizes).
        DuplicateId when the id is taken: a collision is another map's keyframe, never replaced."""
        if keyframe.id in self._entries:
            raise DuplicateId(f"keyframe {keyframe.id} is already in the verifier state; not replaced "
                              "(a keyframe of another map or session with a colliding id?)")
        with _one_blas_thread():
            self._add_keyframe(keyframe, image_rgb, features)

    def _add_keyframe(self, keyframe: Keyframe, image_rgb: np.ndarray, features: ImageFeatures) -> None:
        p = self.params
        local = geometry.extract(image_rgb, p.local_features, p.max_keypoints, p.feature_max_side,
                                 p.sift_contrast)
        entry = _Entry((image_rgb.shape[1], image_rgb.shape[0]), local)
        pf = features.patch_features
        if self._patch_encoder is not None:
            pf = self._patch_encoder.encode([image_rgb])[0].patch_features
        if pf is not None and np.asarray(pf).ndim == 3:
            pf = np.asarray(pf, np.float32)
            weights = self._supersegment_weights(image_rgb, pf.shape[:2])
            patches = pf.reshape(-1, pf.shape[2])
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
        for e, v in zip(pend, vlads):
            e.supersegments = self.pca.project(v).astype(np.float16)
            e.pending_patches = e.pending_weights = None

    # ------------------------------------------------------------------ verification
    def _intrinsics(self, size: tuple[int, int]) -> Optional[np.ndarray]:
        if self.camera_matrix is None:
            return None
        if self.camera_size is None or self.camera_size == size:
            return self.camera_matrix
        return geometry.scale_intrinsics(self.camera_matrix, self.camera_size, size)

    def verify(self, candidates: list[Candidate]) -> list[VerifiedLoop]:
        """Decide on each candidate of one query keyframe (added before); same order as given."""
        if not candidates:
            return []
        qid = candidates[0].query.id
        if any(c.query.id != qid for c in candidates):
            raise ValueError("verify() takes the candidates of one query keyframe at a time")
        p = self.params
        with self._lock:
            q = self._entries.get(qid)
            entries = [self._entries.get(c.match.id) for c in candidates]
            vocab_note = (None if self.has_vocabulary else
                          f"no segvlad yet (vocabulary after {p.vocab_keyframes} keyframes, "
                          f"{self._pending_count()} so far)")
        out, ms = [], []
        self.last_candidate_ms = ms  # wall time per decided candidate, for benchmarks
        for cand, m in zip(candidates, entries):
            if q is None or m is None:
                which = qid if q is None else cand.match.id
                out.append(VerifiedLoop(cand, False, reason=f"rejected: keyframe {which} was never "
                                        "added to the verifier"))
                continue
            t0 = time.perf_counter()
            with _one_blas_thread():
                out.append(self._decide(cand, q, m, vocab_note))
            ms.append((time.perf_counter() - t0) * 1e3)
        cap = p.max_accepted_per_query
        passed = sorted((r for r in out if r.accepted), key=lambda r: -r.inliers)
        if cap > 0 and len(passed) > cap:
            for r in passed[cap:]:
                r.accepted = False
                r.reason = (f"rejected: passed ({r.reason[len('accepted: '):]}) but keyframe "
                            f"{passed[0].candidate.match.id} has more inliers ({passed[0].inliers})")
        return out

    def _decide(self, cand: Candidate, q: _Entry, m: _Entry, vocab_note: Optional[str]) -> VerifiedLoop:
        p = self.params
        notes = []
        if cand.score < p.min_global_score:
            return VerifiedLoop(cand, False, reason=f"rejected: global {cand.score:.2f} < {p.min_global_score:.2f}")
        sv = 0.0
        if q.supersegments is not None and m.supersegments is not None:
            sv = float(segvlad.vote(q.supersegments.astype(np.float32),
                                    [m.supersegments.astype(np.float32)], p.vote_top_k)[0])
            if sv < p.min_segvlad_score:
                return VerifiedLoop(cand, False, sv, reason=f"rejected: segvlad {sv:.2f} < "
                                    f"{p.min_segvlad_score:.2f} (geometry skipped)")
            notes.append(f"segvlad {sv:.2f} >= {p.min_segvlad_score:.2f}")
        else:
            notes.append(vocab_note or "no segvlad (keyframe without patch features)")
        res = geometry.verify_pair(q.local, m.local, self._intrinsics(q.image_size),
                                   self._intrinsics(m.image_size), p.ratio, p.mutual,
                                   p.ransac_threshold_px)
        if res.inliers < p.min_inliers:
            return VerifiedLoop(cand, False, sv, res.inliers, res.pose,
                                reason=f"rejected: {res.inliers} inliers < {p.min_inliers}"
                                       f" ({res.matches} matches); " + ", ".join(notes))
        notes.append(f"{res.inliers} inliers >= {p.min_inliers}")
        if res.pose is None:
            notes.append("no transform (no intrinsics)")
        return VerifiedLoop(cand, True, sv, res.inliers, res.pose, reason="accepted: " + ", ".join(notes))

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Write the state to ``path`` atomically (npz, no pickle)."""
        path = Path(path)
        with self._lock:
            ids = sorted(self._entries)
            es = [self._entries[i] for i in ids]
            meta = {"format": FORMAT, "version": VERSION, "params": asdict(self.params),
                    "camera_size": self.camera_size, "map_id": self.map_id}
            arrays = {
                "meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
                "ids": np.array(ids, np.int64),
                "image_size": np.array([e.image_size for e in es], np.int64).reshape(-1, 2),
                "kp_count": np.array([len(e.local.keypoints) for e in es], np.int64),
                "keypoints": _cat([e.local.keypoints for e in es], (0, 2), np.float32),
                "descriptors": _cat([e.local.descriptors for e in es],
                                    (0, 128 if self.params.local_features == "sift" else 32), np.uint8),
                "ss_count": np.array([-1 if e.supersegments is None else len(e.supersegments) for e in es], np.int64),
                "supersegments": _cat([e.supersegments for e in es if e.supersegments is not None],
                                      (0, self.pca.dim if self.pca else 0), np.float16),
            }
            pend = [(i, e) for i, e in zip(ids, es) if e.pending_patches is not None]
            arrays["pending_ids"] = np.array([i for i, _ in pend], np.int64)
            for i, e in pend:
                arrays[f"pending_patches_{i}"] = e.pending_patches
                arrays[f"pending_weights_{i}"] = e.pending_weights
            if self.camera_matrix is not None:
                arrays["camera_matrix"] = self.camera_matrix
            if self.has_vocabulary:
                arrays.update(centroids=self.centroids, pca_mean=self.pca.mean,
                              pca_components=self.pca.components, pca_scale=self.pca.scale)
        with atomic_write(path) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path, camera_matrix: Optional[np.ndarray] = None) -> "Verifier":
        """Read a state written by ``save``; MapFileError if it is not one, or is damaged.
        ``camera_matrix`` overrides the saved intrinsics."""
        path = Path(path)
        try:
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
            K = camera_matrix if camera_matrix is not None else d.get("camera_matrix")
            v = cls(params, K, meta.get("camera_size"))
            v.map_id = str(meta.get("map_id", ""))
            if "centroids" in d:
                v.centroids = d["centroids"].astype(np.float32)
                v.pca = segvlad.Pca(d["pca_mean"], d["pca_components"], d["pca_scale"])
            kp_off = np.concatenate([[0], np.cumsum(d["kp_count"])])
            ss_count = d["ss_count"]
            ss_off = np.concatenate([[0], np.cumsum(np.maximum(ss_count, 0))])
            if kp_off[-1] != len(d["keypoints"]) or ss_off[-1] != len(d["supersegments"]):
                raise ValueError("array lengths disagree")
            pending = set(d["pending_ids"].tolist())
            for n, kid in enumerate(d["ids"].tolist()):
                size = tuple(int(x) for x in d["image_size"][n])
                local = geometry.LocalFeatures(d["keypoints"][kp_off[n]:kp_off[n + 1]],
                                               d["descriptors"][kp_off[n]:kp_off[n + 1]], size)
                e = _Entry(size, local)
                if ss_count[n] >= 0:
                    e.supersegments = d["supersegments"][ss_off[n]:ss_off[n + 1]]
                if kid in pending:
                    e.pending_patches = d[f"pending_patches_{kid}"]
                    e.pending_weights = d[f"pending_weights_{kid}"]
                v._entries[kid] = e
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            raise MapFileError(f"{path} is inconsistent or truncated ({exc})") from None
        return v


def _cat(arrays: list[np.ndarray], empty_shape: tuple[int, int], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(empty_shape, dtype)
