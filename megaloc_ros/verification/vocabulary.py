"""SegVLAD vocabularies: k-means centroids of a backbone's patch features + PCA of SuperSegment
VLADs, fitted once on a diverse set of real frames and shipped with the package, so that SegVLAD
works from a map's first keyframe.

A shipped vocabulary lives in ``megaloc_ros/verification/vocabularies/<model>-c<width>.npz`` (no
pickle): ``centroids`` [K, C] float32, ``pca_mean`` [K*C] float32, ``pca_components`` [d, K*C]
float16, ``pca_scale`` [d], and ``meta`` (JSON: model name, patch-feature width, the frame sets it
was fitted on, the segmentation and SuperSegment settings used). ``shipped(model, width)`` picks
the one for a backbone: by model name when the caller knows it, else the single shipped file of
that patch-feature width. A backbone with none (MegaLoc, a second ``segvlad_model``) keeps the
map-fitted path of ``Verifier`` (fit on the map's first ``vocab_keyframes`` keyframes).

Fit one: ``python -m megaloc_ros.verification.vocabulary --out PATH [--sets rtabmap ...]
[--skimage]`` (encodes the frames with the default encoder; ``--skimage`` adds scikit-image's
bundled natural photographs for diversity). What the shipped one saw is in its ``meta`` and in
``megaloc-ros bench verify`` output.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from megaloc_ros.verification import segments, segvlad

SHIPPED_DIR = Path(__file__).resolve().parent / "vocabularies"
FORMAT = "megaloc_ros.segvlad_vocabulary"


@dataclass
class Vocabulary:
    centroids: np.ndarray          # [K, C] unit rows
    pca: segvlad.Pca
    model: str = ""                # backbone it was fitted for
    sources: list = field(default_factory=list)   # frame sets it saw
    path: str = ""

    @property
    def width(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def name(self) -> str:
        return f"{self.model}-c{self.width}"

    def describe(self) -> str:
        return (f"shipped SegVLAD vocabulary {self.name} ({len(self.centroids)} words, PCA {self.pca.dim}; "
                f"fitted on {', '.join(self.sources) or 'unknown frames'})")

    def save(self, path) -> None:
        meta = {"format": FORMAT, "model": self.model, "width": self.width, "sources": list(self.sources)}
        np.savez_compressed(path, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                            centroids=self.centroids.astype(np.float32),
                            pca_mean=self.pca.mean.astype(np.float32),
                            pca_components=self.pca.components.astype(np.float16),
                            pca_scale=self.pca.scale.astype(np.float32))

    @classmethod
    def load(cls, path) -> "Vocabulary":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a SegVLAD vocabulary")
            pca = segvlad.Pca(z["pca_mean"], z["pca_components"].astype(np.float32), z["pca_scale"])
            return cls(z["centroids"].astype(np.float32), pca, meta.get("model", ""),
                       list(meta.get("sources", [])), str(path))


def shipped(model: Optional[str], width: int) -> Optional[Vocabulary]:
    """The shipped vocabulary for ``model`` (exact name) or, with ``model`` unknown (None or
    empty), the only shipped one of patch-feature ``width``; None when there is none."""
    if not SHIPPED_DIR.is_dir():
        return None
    if model:
        p = SHIPPED_DIR / f"{model}-c{width}.npz"
        return Vocabulary.load(p) if p.is_file() else None
    found = sorted(SHIPPED_DIR.glob(f"*-c{width}.npz"))
    return Vocabulary.load(found[0]) if len(found) == 1 else None


def supersegment_weights(image_rgb: np.ndarray, grid_hw: tuple[int, int],
                         seg_params: segments.SegmentParams, order: int, max_supersegments: int,
                         sam=None) -> np.ndarray:
    """float32 [S, h*w]: how much each patch of the ``grid_hw`` grid belongs to each of the (at
    most ``max_supersegments``, largest first) SuperSegments of ``image_rgb``."""
    labels = segments.segment_image(image_rgb, seg_params, sam)
    adj = segvlad.delaunay_adjacency(segvlad.segment_centroids(labels))
    member = segvlad.patch_membership(labels, grid_hw)
    ss = segvlad.supersegments(adj, order).astype(np.float32)
    w = np.minimum(ss @ member, 1.0)
    area = member.sum(axis=1)
    keep = np.argsort(-area, kind="stable")[:max_supersegments]
    return w[np.sort(keep)]


def fit(patch_sets: list[np.ndarray], weight_sets: list[np.ndarray], vocab_size: int = 32,
        pca_dim: int = 256, whiten: bool = False) -> tuple[np.ndarray, segvlad.Pca]:
    """Centroids and PCA from per-image patch features [P, C] and SuperSegment weights [S, P]."""
    centroids = segvlad.kmeans(np.concatenate(patch_sets).astype(np.float32), vocab_size)
    vlads = [segvlad.vlad(p, w, centroids) for p, w in zip(patch_sets, weight_sets)]
    return centroids, segvlad.Pca.fit(np.concatenate(vlads), pca_dim, whiten, max_samples=4000)


def skimage_photos() -> list[tuple[str, np.ndarray]]:
    """The colour photographs bundled with scikit-image (no download)."""
    from skimage import data
    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle"):
        try:
            img = getattr(data, name)()
        except Exception:  # noqa: BLE001 - a missing bundled file only shrinks the set
            continue
        if isinstance(img, tuple):  # stereo pair: the left view
            img = img[0]
        if img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8:
            out.append((name, img))
    return out


def main(argv=None) -> int:
    import argparse
    from megaloc_ros.encoding.loader import load_encoder
    from megaloc_ros.io import datasets
    p = argparse.ArgumentParser(description="fit a SegVLAD vocabulary for the default backbone")
    p.add_argument("--out", required=True)
    p.add_argument("--sets", nargs="*", default=["rtabmap"], help="shipped sequences to fit on")
    p.add_argument("--skimage", action="store_true", help="add scikit-image's bundled photographs")
    p.add_argument("--vocab-size", type=int, default=32)
    p.add_argument("--pca-dim", type=int, default=256)
    p.add_argument("--order", type=int, default=3)
    p.add_argument("--max-supersegments", type=int, default=48)
    a = p.parse_args(argv)
    enc = load_encoder(device="cpu")
    images, sources = [], []
    for s in a.sets:
        seq = datasets.SEQUENCES[s]() if s in datasets.SEQUENCES else None
        if seq is None:
            from megaloc_ros.evaluation.covisibility import as_image_sequence
            from megaloc_ros.io import tum
            seq = as_image_sequence(getattr(tum, s)())
        images += [seq.load_rgb(i) for i in range(len(seq))]
        sources.append(f"{s} (all {len(seq)} frames)")
    if a.skimage:
        photos = skimage_photos()
        images += [im for _, im in photos]
        sources.append("scikit-image photos (" + ", ".join(n for n, _ in photos) + ")")
    seg = segments.SegmentParams()
    patches, weights = [], []
    for img in images:
        pf = enc.encode([img])[0].patch_features
        patches.append(pf.reshape(-1, pf.shape[2]).astype(np.float32))
        weights.append(supersegment_weights(img, pf.shape[:2], seg, a.order, a.max_supersegments))
    c, pca = fit(patches, weights, a.vocab_size, a.pca_dim)
    v = Vocabulary(c, pca, enc.model_name, sources)
    v.save(a.out)
    print(f"wrote {a.out}: {v.describe()}, {len(images)} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
