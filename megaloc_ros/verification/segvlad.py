"""SegVLAD ("Revisit Anything", Garg et al., ECCV 2024): segment-level place descriptors.

Steps, each a function here so it can be tested with known answers:
  1. segments (``megaloc_ros.verification.segments``) -> centroids -> Delaunay graph (``delaunay_adjacency``)
  2. SuperSegment of segment i = segments within ``order`` hops of i (``supersegments``)
  3. segment -> patch-grid membership by area (``patch_membership``); a SuperSegment covers the
     union of its segments' patches
  4. hard-assignment VLAD of the (L2-normalised) patch features of each SuperSegment over a
     k-means vocabulary, intra-normalised then L2-normalised (``vlad``)
  5. optional PCA (-whitening) to a short vector, stored in fp16 (``Pca``)
  6. each query SuperSegment retrieves its ``top_k`` nearest SuperSegments among the candidates'
     ones; each hit votes its cosine similarity for the image it came from (``vote``).
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import Delaunay, QhullError


def segment_centroids(labels: np.ndarray) -> np.ndarray:
    """Centroids (x, y) in pixels of labels 0..S-1 -> float64 [S, 2]."""
    s = int(labels.max()) + 1
    ys, xs = np.indices(labels.shape)
    cnt = np.bincount(labels.ravel(), minlength=s).astype(np.float64)
    cx = np.bincount(labels.ravel(), xs.ravel(), minlength=s) / np.maximum(cnt, 1)
    cy = np.bincount(labels.ravel(), ys.ravel(), minlength=s) / np.maximum(cnt, 1)
    return np.stack([cx, cy], axis=1)


def delaunay_adjacency(points: np.ndarray) -> np.ndarray:
    """Symmetric bool [S, S] adjacency of the Delaunay triangulation of ``points`` [S, 2].

    Fewer than 3 points, or all collinear: consecutive points (in x, then y order) are linked.
    """
    n = len(points)
    adj = np.zeros((n, n), bool)
    if n < 2:
        return adj
    try:
        if n < 3:
            raise QhullError("too few points")
        tri = Delaunay(points).simplices
        for a, b in ((0, 1), (1, 2), (0, 2)):
            adj[tri[:, a], tri[:, b]] = True
    except QhullError:
        order = np.lexsort((points[:, 1], points[:, 0]))
        adj[order[:-1], order[1:]] = True
    return adj | adj.T


def supersegments(adjacency: np.ndarray, order: int) -> np.ndarray:
    """bool [S, S]: row i marks the segments within ``order`` graph hops of segment i (itself
    included). ``order`` 0 gives the identity: each SuperSegment is its own segment."""
    n = adjacency.shape[0]
    reach = np.eye(n, dtype=bool)
    step = adjacency.astype(np.int32) + np.eye(n, dtype=np.int32)
    for _ in range(order):
        reach = (reach.astype(np.int32) @ step) > 0
    return reach


def patch_membership(labels: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """float32 [S, h*w]: fraction of each patch cell's area covered by each segment.

    The label map and the patch grid both span the whole image (the encoder resizes the image
    to its input, so a grid cell covers the same fraction of the image in both).
    """
    gh, gw = grid_hw
    H, W = labels.shape
    s = int(labels.max()) + 1
    py = (np.arange(H) * gh // H)[:, None]
    px = (np.arange(W) * gw // W)[None, :]
    cell = (py * gw + px).ravel()
    counts = np.bincount(labels.ravel() * (gh * gw) + cell, minlength=s * gh * gw)
    m = counts.reshape(s, gh * gw).astype(np.float32)
    return m / np.maximum(m.sum(axis=0, keepdims=True), 1.0)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def kmeans(x: np.ndarray, k: int, iters: int = 20, seed: int = 0) -> np.ndarray:
    """Spherical k-means (FAISS) of rows of ``x`` -> unit centroids float32 [k, C]."""
    import faiss
    x = np.ascontiguousarray(normalize_rows(np.asarray(x, np.float32)))
    k = min(k, len(x))
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, spherical=True,
                      max_points_per_centroid=100000, verbose=False)
    km.train(x)
    return normalize_rows(km.centroids.astype(np.float32))


def vlad(features: np.ndarray, weights: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Hard-assignment VLAD of weighted feature sets.

    features [P, C] (L2-normalised here), weights [N, P] (row n = how much each feature belongs
    to set n; 0 = not in it), centroids [K, C] -> float32 [N, K*C]: per-cluster sums of
    weighted residuals, each cluster block L2-normalised (intra-normalisation), then the whole
    vector L2-normalised. Empty sets give zero vectors.
    """
    f = normalize_rows(np.asarray(features, np.float32))
    c = np.asarray(centroids, np.float32)
    assign = np.argmax(f @ c.T, axis=1)  # cosine nearest centroid
    n, (k, dim) = weights.shape[0], c.shape
    out = np.zeros((n, k, dim), np.float32)
    for j in np.unique(assign):
        idx = np.flatnonzero(assign == j)
        w = weights[:, idx]
        out[:, j, :] = w @ f[idx] - w.sum(axis=1, keepdims=True) * c[j]
    out = normalize_rows(out)
    return normalize_rows(out.reshape(n, k * dim))


class Pca:
    """PCA projection (optionally whitening) fitted on VLAD vectors; output L2-normalised."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, scale: np.ndarray):
        self.mean = np.asarray(mean, np.float32)              # [D]
        self.components = np.asarray(components, np.float32)  # [d, D]
        self.scale = np.asarray(scale, np.float32)            # [d] 1 or 1/sqrt(eigenvalue)

    @classmethod
    def fit(cls, x: np.ndarray, dim: int, whiten: bool = False, max_samples: int = 1200,
            seed: int = 0) -> "Pca":
        x = np.asarray(x, np.float32)
        if len(x) > max_samples:  # SVD cost grows with samples^2 * D
            x = x[np.random.default_rng(seed).choice(len(x), max_samples, replace=False)]
        mean = x.mean(axis=0)
        xc = x - mean
        # Few samples of long vectors: eigenvectors of the small Gram matrix give the principal
        # axes (v = X^T u / s) at a fraction of a full SVD's cost.
        w, u = np.linalg.eigh((xc @ xc.T).astype(np.float64))
        order = np.argsort(w)[::-1]
        w, u = np.maximum(w[order], 0.0), u[:, order]
        dim = min(dim, int(np.count_nonzero(w > w[0] * 1e-10)))
        vt = ((xc.T @ u[:, :dim].astype(np.float32)) / np.sqrt(w[:dim]).astype(np.float32)).T
        ev = w[:dim] / max(len(x) - 1, 1)
        scale = 1.0 / np.sqrt(ev + 1e-6 * ev[0] + 1e-12) if whiten else np.ones(dim)
        return cls(mean, vt[:dim], scale)

    @property
    def dim(self) -> int:
        return self.components.shape[0]

    def project(self, x: np.ndarray) -> np.ndarray:
        return normalize_rows(((x - self.mean) @ self.components.T) * self.scale)


def vote(query: np.ndarray, database: list[np.ndarray], top_k: int = 5) -> np.ndarray:
    """Similarity-weighted voting of segment-level retrieval restricted to ``database``.

    query [Sq, d] and each database[i] [Si, d] are L2-normalised SuperSegment descriptors.
    Each query SuperSegment retrieves its ``top_k`` most similar SuperSegments over all images
    in ``database``; every hit adds its cosine similarity (clipped at 0) to its image's score.
    Scores are divided by Sq * top_k, so they lie in [0, 1]; with one database image the score
    is the mean top-k similarity of the query's SuperSegments to that image.
    """
    if len(database) == 0:
        return np.zeros(0, np.float32)
    q = np.asarray(query, np.float32)
    if len(q) == 0:
        return np.zeros(len(database), np.float32)
    db = np.concatenate([np.asarray(d, np.float32) for d in database], axis=0)
    owner = np.concatenate([np.full(len(d), i) for i, d in enumerate(database)])
    if len(db) == 0:
        return np.zeros(len(database), np.float32)
    sim = q @ db.T
    k = min(top_k, db.shape[0])
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    hits = np.take_along_axis(sim, top, axis=1)
    scores = np.bincount(owner[top].ravel(), np.maximum(hits, 0).ravel(), minlength=len(database))
    return (scores / (len(q) * k)).astype(np.float32)
