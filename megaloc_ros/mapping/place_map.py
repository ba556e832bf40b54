"""The place map: an incremental FAISS index of keyframe descriptors plus per-keyframe metadata.

Index kinds (``PlaceMap(dim, model_name, MapSettings(index=...))``; the other fields of
``MapSettings`` are the options named below, e.g. ``map.nprobe`` as a setting):

``"flat"`` (default)
    Exact inner product over the full descriptors (they are also what ``descriptor(id)`` returns).
    Right for maps up to ~100k keyframes; 4*dim bytes per keyframe.
``"ivfpq"``, ``"ivfsq8"``, ``"hnsw"``, ``"sq8"`` (compressed, for large maps)
    Descriptors are first projected onto their top ``pca_dim`` principal directions (uncentred,
    so inner products are kept, optionally whitened), then indexed by
    ``ivfpq``  IVF + product quantisation (4-bit "fast scan" codes by default, ``pq_bits``),
               the shortlist re-ranked with 8-bit codes (``Refine(SQ8)``);
    ``ivfsq8`` IVF + 8-bit scalar quantisation;  ``hnsw``  HNSW graph over 8-bit codes;
    ``sq8``    brute force over 8-bit codes.
    A compressed map answers with exact search over the stored descriptors until it holds
    ``train_size`` keyframes; it then trains (in a background thread when
    ``background_training=True``, meanwhile still answering exactly) and keeps only codes.
    Scores of a compressed map are inner products in the projected space: slightly below the
    exact cosine, so thresholds tuned on a flat map may need lowering.

Why the ``ivfpq`` defaults: where it misses the exact top-1 at scale, the IVF is to blame, not
the codes. On ``bench map`` data (300k keyframes, IVF1024 trained on 100k) the exact top-1 was
always within the 500-long PQ shortlist (64 B codes) once its list was probed, and the 1024-D
re-rank costs ~2% (PCA truncation, not 8-bit quantisation); but a revisit often lands in a list
other than its keyframe's, more often for keyframes added after training: at nprobe 32 recall@1
fell from 0.96 (100k) to 0.83 (300k). So the defaults probe widely (256 lists) and pay for it
with 4-bit fast-scan codes (same recall@1 as 8-bit codes of the same size at every nprobe
tried, 2.7x faster at nprobe 256) rather than with more bytes. The defaults are set for that
pessimistic data: little cluster structure (a revisit ~0.76 cosine to its keyframe, unrelated
places ~0.2, ~100 equally strong directions). A real map with more structure (repeated places,
similar surroundings) may keep its recall with a smaller ``nprobe`` (``set_search_options``);
that is untested here without real MegaLoc maps: check with ``bench map --nprobe 64,128,256``
style sweeps on your own descriptors before lowering it.

Persistence lives in ``map_file`` (no pickle); ``save`` is atomic.
"""
from __future__ import annotations

import dataclasses
import hashlib
import threading
import uuid
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np

from megaloc_ros.errors import DuplicateId, MapFileError, MegalocError
from megaloc_ros.mapping import map_file
from megaloc_ros.settings import setting, validate
from megaloc_ros.types import Descriptor, Keyframe, KeyframeId, as_descriptor

PCA_FIT_ROWS = 16000
COMPRESSED_KINDS = ("ivfpq", "ivfsq8", "hnsw", "sq8")
INDEX_KINDS = ("flat",) + COMPRESSED_KINDS



@dataclass
class MapSettings:
    """The place map's index kind and its options (see the module docstring)."""
    index: str = setting("flat", "place-map index kind (flat, ivfpq, ivfsq8, hnsw, sq8), used when no map is "
                         "loaded (a loaded map keeps its own)", choices=INDEX_KINDS, read_only=True)
    pca_dim: int = setting(1024, "compressed kinds: projected descriptor dimension", range=(1, None),
                           read_only=True)
    # whitening re-weights components: it ruins agreement with exact inner products
    # (bench data, PCA-1024: recall@1 vs exact 0.98 plain, 0.22 whitened)
    whiten: bool = setting(False, "compressed kinds: whiten the projection (hurts recall)", read_only=True)
    nlist: int = setting(0, "IVF lists; 0: 4*sqrt(train_size) rounded to a power of two", range=(0, None),
                         read_only=True)
    # Wide on purpose: a revisit and its keyframe often fall in different lists (bench data at
    # 300k keyframes, IVF1024: the keyframe's list is among the query's 32 nearest for 84%, 128:
    # 98%, 256: 99.7%); 4-bit fast-scan codes make the wide probe cheap (~1 ms per 75k codes)
    nprobe: int = setting(256, "IVF lists visited per query", range=(1, None), read_only=True)
    pq_m: int = setting(128, "ivfpq: PQ sub-quantisers, must divide pca_dim; a code is pq_m*pq_bits/8 bytes",
                        range=(1, None), read_only=True)
    pq_bits: int = setting(4, "ivfpq: 4 = SIMD fast-scan PQ (PQ{m}x4fs), 8 = classic PQ{m}x8", choices=(4, 8),
                           read_only=True)
    refine_factor: int = setting(100, "ivfpq: re-rank refine_factor*k shortlisted codes with SQ8 (plus one per "
                                 "keyframe an exclusion window may drop)", range=(1, None), read_only=True)
    hnsw_m: int = setting(32, "hnsw: graph degree", range=(2, None), read_only=True)
    ef_search: int = setting(128, "hnsw: search breadth", range=(1, None), read_only=True)
    train_size: int = setting(20000, "compressed kinds: keyframes needed before the index is trained",
                              range=(256, None), read_only=True)
    background_training: bool = setting(False, "compressed kinds: train in a background thread (searches stay "
                                        "exact meanwhile)", read_only=True)
    keep_descriptors: bool = setting(False, "compressed kinds: also keep the full descriptors (4*dim bytes each)",
                                     read_only=True)

    def __post_init__(self) -> None:
        validate(self, "map")
        if self.index != "flat":
            p = self.pca_dim
            if self.index == "ivfpq" and p % self.pq_m:
                raise MegalocError(f"map.pq_m={self.pq_m} must divide map.pca_dim={p}")
            if self.train_size < max(p, 256):
                raise MegalocError(f"map.train_size must be at least max(map.pca_dim, 256) = {max(p, 256)}")

    def options(self) -> dict:
        """Everything but ``index``, as map files store it."""
        d = dataclasses.asdict(self)
        del d["index"]
        return d

    @classmethod
    def from_file(cls, index: str, options: dict) -> "MapSettings":
        """From a map file's header (``index`` and its ``options`` dict); names this build does not
        know are dropped. Files from before ``pq_bits`` existed hold 8-bit PQ codes."""
        known = {f.name for f in dataclasses.fields(cls)} - {"index"}
        opts = {k: v for k, v in options.items() if k in known}
        if index == "ivfpq":
            opts.setdefault("pq_bits", 8)
        return cls(index=index, **opts)


class _Columns:
    """Growable per-keyframe metadata arrays (amortised O(1) append, compact for 1M entries)."""

    def __init__(self, capacity: int = 1024):
        self.n = 0
        self.ids = np.zeros(capacity, np.int64)
        self.stamps = np.zeros(capacity, np.int64)
        self.sessions = np.zeros(capacity, np.int32)
        self.frame_idx = np.zeros(capacity, np.int32)   # into PlaceMap._frame_names
        self.poses: dict[int, np.ndarray] = {}          # position -> 4x4, only where known

    def append(self, kid: int, stamp: int, session: int, frame_idx: int) -> int:
        if self.n == len(self.ids):
            cap = max(1024, 2 * self.n)
            for name in ("ids", "stamps", "sessions", "frame_idx"):
                old = getattr(self, name)
                new = np.zeros(cap, old.dtype)
                new[: self.n] = old[: self.n]
                setattr(self, name, new)
        i = self.n
        self.ids[i], self.stamps[i], self.sessions[i], self.frame_idx[i] = kid, stamp, session, frame_idx
        self.n += 1
        return i


class PlaceMap:
    """Keyframe descriptors with metadata; see the module docstring for the index kinds.

    ``extras`` holds named numpy arrays saved with the map (e.g. a verifier vocabulary).
    Thread safety: ``add``/``search``/``save`` may be called from different threads.
    """

    def __init__(self, dim: int, model_name: str, settings: Optional[MapSettings] = None):
        self.dim = int(dim)
        self.model_name = str(model_name)
        self.settings = settings if settings is not None else MapSettings()
        if not isinstance(self.settings, MapSettings):
            raise MegalocError(f"PlaceMap settings must be a MapSettings, got {type(self.settings).__name__}")
        if self.settings.index != "flat" and not self.settings.pca_dim <= self.dim:
            raise MegalocError(f"map.pca_dim={self.settings.pca_dim} must be in 1..{self.dim}")
        # One id per map, kept by its files: the verifier state of this map carries the same one,
        # so a node never verifies against keyframes of another map (ids repeat across maps).
        self.map_id = new_map_id()
        self.extras: dict[str, np.ndarray] = {}
        self._cols = _Columns()
        self._frame_names: list[str] = []
        self._frame_lookup: dict[str, int] = {}
        self._monotonic = True        # ids added in increasing order: position lookup by bisection
        self._id_to_pos: Optional[dict[int, int]] = None
        self._lock = threading.RLock()
        import faiss
        self._faiss = faiss
        # Until a compressed index is trained, everything lives in an exact flat index.
        self._flat: Optional[object] = faiss.IndexFlatIP(self.dim)
        self._proj: Optional[np.ndarray] = None     # [dim, pca_dim] float32, compressed kinds
        self._index: Optional[object] = None        # trained compressed index
        self._full: Optional[np.ndarray] = None     # keep_descriptors store for compressed kinds
        self._trainer: Optional[threading.Thread] = None
        self._train_error: Optional[BaseException] = None

    # ----------------------------------------------------------------- contents
    def __len__(self) -> int:
        return self._cols.n

    @property
    def trained(self) -> bool:
        """True for flat maps, and for compressed maps once their index is trained."""
        return self.settings.index == "flat" or self._index is not None

    @property
    def next_id(self) -> KeyframeId:
        """One more than the largest keyframe id (0 for an empty map)."""
        n = self._cols.n
        return int(self._cols.ids[:n].max()) + 1 if n else 0

    def _pos(self, kid: int) -> Optional[int]:
        c = self._cols
        if self._monotonic:
            i = int(np.searchsorted(c.ids[: c.n], kid))
            return i if i < c.n and c.ids[i] == kid else None
        if self._id_to_pos is None:
            self._id_to_pos = {int(k): i for i, k in enumerate(c.ids[: c.n])}
        return self._id_to_pos.get(int(kid))

    def _keyframe_at(self, i: int) -> Keyframe:
        c = self._cols
        pose = c.poses.get(i)
        return Keyframe(int(c.ids[i]), int(c.stamps[i]), int(c.sessions[i]),
                        self._frame_names[c.frame_idx[i]], None if pose is None else pose.copy())

    def __contains__(self, kid: KeyframeId) -> bool:
        return self._pos(kid) is not None

    def keyframe(self, kid: KeyframeId) -> Keyframe:
        i = self._pos(kid)
        if i is None:
            raise KeyError(f"keyframe {kid} is not in the map")
        return self._keyframe_at(i)

    def keyframes(self) -> Iterator[Keyframe]:
        """All keyframes in insertion order."""
        for i in range(self._cols.n):
            yield self._keyframe_at(i)

    def descriptor(self, kid: KeyframeId) -> Optional[Descriptor]:
        """The stored descriptor of ``kid``, or None when only compressed codes are kept."""
        with self._lock:
            i = self._pos(kid)
            if i is None:
                raise KeyError(f"keyframe {kid} is not in the map")
            if self._flat is not None:
                return self._flat.reconstruct(i)
            if self._full is not None:
                return self._full[i].copy()
            return None

    def memory_bytes(self) -> dict[str, int]:
        """Bytes the map holds: ``index`` (exact descriptors, or for a trained compressed map its
        serialised FAISS index: coarse centroids, codebooks, PQ codes, 8-byte ids, re-rank codes;
        plus the projection matrix and any kept descriptors), ``metadata`` (the allocated
        per-keyframe columns, poses, frame names); their sum is the whole map (callers sum the
        values). Slack in FAISS's growable inverted lists is not counted."""
        with self._lock:
            index = 0
            if self._flat is not None:
                index += self._flat.ntotal * self.dim * 4
            if self._index is not None:
                index += len(self._faiss.serialize_index(self._index))
            if self._proj is not None:
                index += self._proj.nbytes
            if self._full is not None:
                index += self._full.nbytes
            c = self._cols
            meta = c.ids.nbytes + c.stamps.nbytes + c.sessions.nbytes + c.frame_idx.nbytes
            meta += len(c.poses) * (16 * 8 + 100)  # 4x4 float64 plus dict entry overhead
            meta += sum(len(f) + 50 for f in self._frame_names)
            return {"index": index, "metadata": meta}

    # ----------------------------------------------------------------- adding
    def add(self, keyframe: Keyframe, descriptor) -> None:
        """Add one keyframe. Raises DescriptorSizeError or DuplicateId (map unchanged then)."""
        d = as_descriptor(descriptor, self.dim)
        kid = int(keyframe.id)
        pose = None
        if keyframe.pose is not None:
            pose = np.asarray(keyframe.pose, np.float64)
            if pose.shape != (4, 4) or not np.all(np.isfinite(pose)):
                raise MegalocError(f"keyframe {kid}: pose must be a finite 4x4 matrix, got shape {pose.shape}")
        with self._lock:
            self._raise_training_error()
            c = self._cols
            if not self._monotonic or (c.n and kid <= int(c.ids[c.n - 1])):
                if self._pos(kid) is not None:
                    raise DuplicateId(f"keyframe id {kid} is already in the map; ids must be unique")
                if self._monotonic:
                    self._monotonic = False
                    self._id_to_pos = None
            fi = self._frame_lookup.get(keyframe.frame_id)
            if fi is None:
                fi = self._frame_lookup[keyframe.frame_id] = len(self._frame_names)
                self._frame_names.append(keyframe.frame_id)
            i = c.append(kid, int(keyframe.stamp_ns), int(keyframe.session), fi)
            if pose is not None:
                c.poses[i] = pose.copy()
            if self._id_to_pos is not None:
                self._id_to_pos[kid] = i
            self._add_vectors(d[None])
        self._maybe_train()

    def add_many(self, keyframes: list[Keyframe], descriptors: np.ndarray) -> None:
        """Add keyframes in bulk (ids strictly increasing and above those in the map, no poses
        checked beyond ``add``'s rules); much faster than ``add`` in a loop for offline builds."""
        x = np.asarray(descriptors, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim or len(x) != len(keyframes):
            raise MegalocError(f"add_many: need [{len(keyframes)}, {self.dim}] descriptors, got {x.shape}")
        if not len(keyframes):
            return
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise MegalocError("add_many: descriptors must be finite and non-zero")
        x = np.ascontiguousarray(x / norms, dtype=np.float32)
        ids = np.array([k.id for k in keyframes], np.int64)
        with self._lock:
            self._raise_training_error()
            c = self._cols
            if np.any(np.diff(ids) <= 0) or (c.n and ids[0] <= c.ids[c.n - 1]):
                raise DuplicateId("add_many: ids must increase and exceed the map's largest id; use add()")
            for kf in keyframes:
                fi = self._frame_lookup.get(kf.frame_id)
                if fi is None:
                    fi = self._frame_lookup[kf.frame_id] = len(self._frame_names)
                    self._frame_names.append(kf.frame_id)
                i = c.append(int(kf.id), int(kf.stamp_ns), int(kf.session), fi)
                if kf.pose is not None:
                    c.poses[i] = np.asarray(kf.pose, np.float64).reshape(4, 4).copy()
            self._add_vectors(x)
        self._maybe_train()

    def _add_vectors(self, x: np.ndarray) -> None:
        if self._flat is not None:
            self._flat.add(x)
        if self._index is not None:
            self._index.add(self._project(x))
            if self._full is not None:
                self._full = _append_rows(self._full, x, self._cols.n - len(x))

    def _project(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x @ self._proj, dtype=np.float32)

    # ----------------------------------------------------------------- training
    def _maybe_train(self) -> None:
        with self._lock:
            if self.settings.index == "flat" or self._index is not None or self._trainer is not None:
                return
            if self._cols.n < self.settings.train_size:
                return
            if self.settings.background_training:
                self._trainer = threading.Thread(target=self._train_guarded, name="placemap-train", daemon=True)
                self._trainer.start()
                return
        self._train()

    def _train_guarded(self) -> None:
        try:
            self._train()
        except BaseException as exc:  # surfaced on the next add()/wait_trained()
            self._train_error = exc

    def _raise_training_error(self) -> None:
        if self._train_error is not None:
            exc, self._train_error = self._train_error, None
            self._trainer = None
            raise MegalocError(f"training the {self.settings.index} index failed: {exc}") from exc

    def wait_trained(self, timeout: Optional[float] = None) -> bool:
        """Block until a background training finishes; returns ``self.trained``."""
        t = self._trainer
        if t is not None:
            t.join(timeout)
        with self._lock:
            self._raise_training_error()
        return self.trained

    def train_now(self) -> None:
        """Train the compressed index on what is stored now (at least 256 keyframes)."""
        if self.settings.index == "flat" or self._index is not None:
            return
        if self._cols.n < max(256, self.settings.pca_dim):
            raise MegalocError(f"need at least {max(256, self.settings.pca_dim)} keyframes to train")
        self._train()

    def _train(self) -> None:
        if self.settings.background_training:
            self._train_body()
        else:  # in the caller's thread: hold the lock so the view below stays valid
            with self._lock:
                self._train_body()

    def _train_body(self) -> None:
        with self._lock:  # snapshot: the flat index keeps growing meanwhile
            if self._index is not None:  # another thread trained it first
                return
            n0 = self._flat.ntotal
            if self.settings.background_training:  # adds may reallocate the flat store: copy
                sample = self._flat.reconstruct_n(0, n0)
            else:  # nothing else runs meanwhile: a view saves a dim*4*n0-byte copy
                sample = self._faiss.rev_swig_ptr(self._flat.get_xb(), n0 * self.dim).reshape(n0, self.dim)
        # the projection needs far fewer samples than the index; fit it on a subset
        pca_rows = sample if n0 <= PCA_FIT_ROWS else \
            sample[np.random.default_rng(0).choice(n0, PCA_FIT_ROWS, replace=False)]
        proj = fit_projection(pca_rows, self.settings.pca_dim, self.settings.whiten)
        del pca_rows
        index = self._new_index(n0)
        xs = np.ascontiguousarray(sample @ proj, dtype=np.float32)
        index.train(xs)
        index.add(xs)
        del xs
        with self._lock:
            n1 = self._flat.ntotal
            if n1 > n0:  # keyframes added while training
                index.add(np.ascontiguousarray(self._flat.reconstruct_n(n0, n1 - n0) @ proj, dtype=np.float32))
            if self.settings.keep_descriptors:
                self._full = self._flat.reconstruct_n(0, n1)
            self._proj, self._index, self._flat = proj, index, None
            self._trainer = None

    def _new_index(self, n_train: int):
        faiss = self._faiss
        o, p = self.settings, self.settings.pca_dim
        nlist = o.nlist or _auto_nlist(n_train)
        factory = {
            "ivfpq": f"IVF{nlist},PQ{o.pq_m}x{'4fs' if o.pq_bits == 4 else 8},Refine(SQ8)",
            "ivfsq8": f"IVF{nlist},SQ8",
            "hnsw": f"HNSW{o.hnsw_m},SQ8",
            "sq8": "SQ8",
        }[self.settings.index]
        index = faiss.index_factory(p, factory, faiss.METRIC_INNER_PRODUCT)
        base = faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefine) else index
        if isinstance(base, faiss.IndexIVFPQ):
            base.do_polysemous_training = False  # slow, and polysemous search is not used
        if isinstance(base, faiss.IndexIVF):
            # unit-norm centroids: max-inner-product assignment to plain k-means centroids
            # favours large clusters and costs a lot of recall
            base.cp.spherical = True
        self._configure(index)
        return index

    def _configure(self, index) -> None:
        faiss, o = self._faiss, self.settings
        if isinstance(index, faiss.IndexRefine):
            index.k_factor = float(o.refine_factor)
        base = faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefine) else index
        if isinstance(base, faiss.IndexIVF):
            base.nprobe = o.nprobe
        if isinstance(base, faiss.IndexHNSW):
            base.hnsw.efSearch = o.ef_search

    def set_search_options(self, **options) -> None:
        """Change query-time knobs (``nprobe``, ``refine_factor``, ``ef_search``) in place."""
        bad = set(options) - {"nprobe", "refine_factor", "ef_search"}
        if bad:
            raise MegalocError(f"not query-time options: {sorted(bad)}")
        with self._lock:
            self.settings = dataclasses.replace(self.settings, **options)
            if self._index is not None:
                self._configure(self._index)

    # ----------------------------------------------------------------- search
    def search(self, descriptor, k: int, *,
               exclude_ids: Optional[tuple[int, int]] = None,
               exclude_stamps: Optional[tuple[int, int]] = None,
               exclude_window_session: Optional[int] = None,
               exclude_sessions: Iterable[int] = (),
               only_sessions: Optional[Iterable[int]] = None) -> list[tuple[Keyframe, float]]:
        """The ``k`` most similar keyframes, best first, as ``(keyframe, score)``.

        Exclusions (all optional, combined):
          exclude_ids=(lo, hi)      drop keyframes with lo <= id <= hi
          exclude_stamps=(lo, hi)   drop keyframes with lo <= stamp_ns <= hi
          exclude_window_session=s  apply the two windows above only to keyframes of session s
          exclude_sessions=[...]    drop these sessions entirely
          only_sessions=[...]       keep only these sessions
        Scores are cosine similarities (flat) or projected inner products (compressed kinds).
        """
        q = as_descriptor(descriptor, self.dim)[None]
        k = int(k)
        excl_s = set(int(s) for s in exclude_sessions)
        only_s = None if only_sessions is None else set(int(s) for s in only_sessions)
        with self._lock:
            n = self._cols.n
            if k <= 0 or n == 0:
                return []
            index = self._flat if self._flat is not None else self._index
            qq = q if self._flat is not None else self._project(q)
            filtering = bool(exclude_ids or exclude_stamps or excl_s or only_s is not None)
            fetch = min(n, k + self._window_count(exclude_ids, exclude_stamps) if filtering else k)
            # an approximate index gets slow and no better for very long shortlists
            limit = n if self._flat is not None else min(n, max(16 * fetch, 1024))
            while True:
                scores, pos = index.search(qq, fetch, params=self._refine_params(k, fetch))
                scores, pos = scores[0], pos[0]
                ok = pos >= 0
                scores, pos = scores[ok], pos[ok]
                if filtering:
                    keep = self._keep_mask(pos, exclude_ids, exclude_stamps, exclude_window_session,
                                           excl_s, only_s)
                    scores, pos = scores[keep], pos[keep]
                if len(pos) >= k or fetch >= limit:
                    break
                fetch = min(limit, fetch * 4)   # exclusions ate the shortlist: look further
            return [(self._keyframe_at(int(i)), float(s)) for i, s in zip(pos[:k], scores[:k])]

    def _refine_params(self, k: int, fetch: int):
        """Re-rank refine_factor*k shortlisted codes plus the fetch margin, not refine_factor*fetch:
        keyframes the exclusions will drop need one shortlist place each, not refine_factor."""
        if self._flat is not None or not isinstance(self._index, self._faiss.IndexRefine):
            return None
        params = self._faiss.IndexRefineSearchParameters()
        params.k_factor = max(1.0, (self.settings.refine_factor * k + fetch - k) / fetch)
        return params

    def _window_count(self, ids, stamps) -> int:
        """How many keyframes the windows exclude at most (exact when ids/stamps are sorted)."""
        c, extra = self._cols, 0
        if ids is not None and self._monotonic:
            a = c.ids[: c.n]
            extra += int(np.searchsorted(a, ids[1], "right") - np.searchsorted(a, ids[0], "left"))
        elif ids is not None:
            extra += max(0, int(ids[1]) - int(ids[0]) + 1)
        if stamps is not None:
            extra += 16
        return extra + 8

    def _keep_mask(self, pos, ids, stamps, window_session, excl_s, only_s) -> np.ndarray:
        c = self._cols
        sess = c.sessions[pos]
        in_window = np.zeros(len(pos), bool)
        if ids is not None:
            kid = c.ids[pos]
            in_window |= (kid >= ids[0]) & (kid <= ids[1])
        if stamps is not None:
            st = c.stamps[pos]
            in_window |= (st >= stamps[0]) & (st <= stamps[1])
        if window_session is not None:
            in_window &= sess == int(window_session)
        keep = ~in_window
        if excl_s:
            keep &= ~np.isin(sess, list(excl_s))
        if only_s is not None:
            keep &= np.isin(sess, list(only_s))
        return keep

    # ----------------------------------------------------------------- persistence
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The whole map as plain data: (meta: model_name, dim, index, options, count,
        frame_names; arrays by name: metadata columns, poses, descriptors or the projection and
        the serialised FAISS index, ``extra/<name>``). Views, not copies: hold the lock or use
        it at once. ``from_state`` rebuilds the map."""
        with self._lock:
            c, n = self._cols, len(self)
            arrays = {"ids": c.ids[:n], "stamps_ns": c.stamps[:n], "sessions": c.sessions[:n],
                      "frame_index": c.frame_idx[:n]}
            pos = np.array(sorted(c.poses), np.int64)
            arrays["pose_positions"] = pos
            arrays["poses"] = (np.stack([c.poses[int(i)] for i in pos]) if len(pos)
                               else np.zeros((0, 4, 4), np.float64))
            if self._flat is not None:
                arrays["descriptors"] = self._flat.reconstruct_n(0, self._flat.ntotal) if n else \
                    np.zeros((0, self.dim), np.float32)
            else:
                arrays["projection"] = self._proj
                arrays["faiss_index"] = self._faiss.serialize_index(self._index)
                if self._full is not None:
                    arrays["descriptors"] = self._full[:n]
            for name, a in self.extras.items():
                if not isinstance(name, str) or not name or "/" in name:
                    raise MapFileError(f"extra array name {name!r} must be a non-empty string without '/'")
                arrays[f"extra/{name}"] = np.asarray(a)
            meta = {"map_id": self.map_id, "model_name": self.model_name, "dim": self.dim,
                    "index": self.settings.index,
                    "options": self.settings.options(), "count": n, "frame_names": list(self._frame_names)}
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "PlaceMap":
        """A map from ``state()``'s output; ValueError/KeyError when the parts disagree."""
        n, dim = int(meta["count"]), int(meta["dim"])
        a = arrays
        pmap = cls(dim, meta["model_name"], MapSettings.from_file(meta["index"], meta["options"]))
        pmap.map_id = str(meta.get("map_id") or _legacy_map_id(arrays))
        c = pmap._cols
        c.n = n
        c.ids, c.stamps = a["ids"].copy(), a["stamps_ns"].copy()
        c.sessions, c.frame_idx = a["sessions"].copy(), a["frame_index"].copy()
        if not (len(c.ids) == len(c.stamps) == len(c.sessions) == len(c.frame_idx) == n):
            raise ValueError("metadata columns disagree with the keyframe count")
        c.poses = {int(i): p.copy() for i, p in zip(a["pose_positions"], a["poses"])}
        pmap._frame_names = [str(s) for s in meta["frame_names"]]
        pmap._frame_lookup = {s: i for i, s in enumerate(pmap._frame_names)}
        pmap._monotonic = bool(n < 2 or np.all(np.diff(c.ids) > 0))
        if "faiss_index" in a:
            pmap._proj = np.ascontiguousarray(a["projection"], np.float32)
            pmap._index = pmap._faiss.deserialize_index(np.ascontiguousarray(a["faiss_index"]))
            pmap._configure(pmap._index)
            pmap._flat = None
            if pmap._index.ntotal != n:
                raise ValueError(f"index holds {pmap._index.ntotal} codes for {n} keyframes")
            if "descriptors" in a:
                pmap._full = np.array(a["descriptors"], np.float32)
        else:
            d = np.ascontiguousarray(a["descriptors"], np.float32)
            if d.shape != (n, dim):
                raise ValueError(f"descriptor array has shape {d.shape}, expected {(n, dim)}")
            pmap._flat.add(d)
        pmap.extras = {k[len("extra/"):]: v.copy() for k, v in a.items() if k.startswith("extra/")}
        return pmap

    def save(self, path) -> None:
        """Write the map atomically (temporary file, fsync, rename); waits for a background
        training to finish first. See ``map_file``."""
        self.wait_trained()
        with self._lock:  # the state is views into the live map
            map_file.save_map(path, *self.state())

    @classmethod
    def load(cls, path, expected_model: Optional[str] = None, expected_dim: Optional[int] = None) -> "PlaceMap":
        """Read a map saved by ``save``; raises MapFileError on a foreign, truncated, corrupt or
        other-model file (``expected_model`` / ``expected_dim`` when given)."""
        meta, arrays = map_file.load_map(path, expected_model, expected_dim)
        try:
            return cls.from_state(meta, arrays)
        except MapFileError:
            raise
        except Exception as exc:  # consistent checksum but inconsistent content: a writer bug or forgery
            raise MapFileError(f"{path} is inconsistent ({exc}); the file is damaged") from exc


def new_map_id() -> str:
    return uuid.uuid4().hex


def _legacy_map_id(arrays: dict[str, np.ndarray]) -> str:
    """A file from before map ids: an id derived from its keyframes, the same on every load."""
    h = hashlib.sha256(np.ascontiguousarray(arrays["ids"]).tobytes()
                       + np.ascontiguousarray(arrays["stamps_ns"]).tobytes())
    return "legacy-" + h.hexdigest()[:24]


def map_id_of(path) -> str:
    """The map id of the map file at ``path`` (checked like ``PlaceMap.load``; MapFileError)."""
    header, payload = map_file.read_header(path)
    if header.get("map_id"):
        return str(header["map_id"])
    return _legacy_map_id(map_file.read_arrays(header, payload, path))


def fit_projection(x: np.ndarray, out_dim: int, whiten: bool = False, seed: int = 0) -> np.ndarray:
    """Top ``out_dim`` right singular vectors of ``x`` (uncentred PCA) as a [D, out_dim] matrix.

    Uncentred so that ``(a @ P) . (b @ P)`` approximates ``a . b`` (no mean term to correct);
    randomized SVD (Halko et al. 2011) because an exact 8448x8448 eigen-decomposition is slow.
    """
    x = np.asarray(x, np.float32)
    n, d = x.shape
    out_dim = min(out_dim, d)
    if out_dim >= min(n, d) or d <= 1024:
        # small problem: exact eigen-decomposition of the Gram/covariance matrix
        if n < d:
            w, u = np.linalg.eigh((x @ x.T).astype(np.float64))
            order = np.argsort(w)[::-1][:out_dim]
            s = np.sqrt(np.maximum(w[order], 1e-12))
            v = (x.T.astype(np.float64) @ u[:, order]) / s
        else:
            w, v = np.linalg.eigh((x.T @ x).astype(np.float64))
            order = np.argsort(w)[::-1][:out_dim]
            v, s = v[:, order], np.sqrt(np.maximum(w[order], 1e-12))
    else:
        rng = np.random.default_rng(seed)
        r = min(out_dim + 64, min(n, d))
        y = x @ rng.standard_normal((d, r), dtype=np.float32)
        for _ in range(2):  # power iterations sharpen a slowly decaying spectrum
            y, _ = np.linalg.qr(y)
            y = x @ (x.T @ y)
        qmat, _ = np.linalg.qr(y)
        b = qmat.T @ x
        _, s, vt = np.linalg.svd(b.astype(np.float64), full_matrices=False)
        v, s = vt[:out_dim].T, s[:out_dim]
    v = v.astype(np.float32)
    if whiten:
        v = v * (np.sqrt(n) / np.maximum(s, 1e-6)).astype(np.float32)[None, :]
    return np.ascontiguousarray(v)


def _auto_nlist(n: int) -> int:
    target = max(16, int(4 * np.sqrt(max(n, 1))))
    return int(2 ** int(np.round(np.log2(target))))


def _append_rows(a: np.ndarray, x: np.ndarray, n_before: int) -> np.ndarray:
    if len(a) < n_before + len(x):
        b = np.zeros((max(2 * len(a), n_before + len(x)), a.shape[1]), a.dtype)
        b[:n_before] = a[:n_before]
        a = b
    a[n_before: n_before + len(x)] = x
    return a
