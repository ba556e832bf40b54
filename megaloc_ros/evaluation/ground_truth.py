"""Ground truth for loop-closure evaluation: which frame pairs show the same place.

Three sources, all ending in one symmetric bool matrix ``gt[i, j]`` over the frames of a bag
(False on the diagonal):

* poses (a pose topic in the bag, or a trajectory file): frames whose positions are within
  ``distance_m`` of each other and at least ``exclude_s`` apart in time;
* a loop matrix file: an image (.bmp/.png, non-zero = same place, as RTAB-Map ships it), a .npy
  0/1 matrix, a .csv/.txt 0/1 matrix, or a VPR-Bench ``query_index,matching_reference_indices``
  table (reference frames first in the bag, then the queries);
* a shipped data set (``megaloc_ros.io.datasets``), which already carries its matrix.

Trajectory files (TUM, KITTI) are read by ``megaloc_ros.io.trajectory``.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np

from megaloc_ros.errors import MegalocError
from megaloc_ros.types import SECOND_NS


def gt_from_positions(positions, stamps_ns, distance_m: float, exclude_s: float,
                      valid: Optional[np.ndarray] = None) -> np.ndarray:
    """Same place = positions within ``distance_m`` and stamps at least ``exclude_s`` apart
    (so that standing still or moving slowly is not a loop). Frames without a pose
    (``valid`` False) have no ground-truth loops."""
    p = np.asarray(positions, dtype=np.float64)
    t = np.asarray(stamps_ns, dtype=np.int64)
    d = np.linalg.norm(p[:, None, :] - p[None, :, :], axis=-1)
    dt = np.abs(t[:, None] - t[None, :])
    gt = (d <= distance_m) & (dt >= int(exclude_s * SECOND_NS))
    if valid is not None:
        v = np.asarray(valid, bool)
        gt &= v[:, None] & v[None, :]
    np.fill_diagonal(gt, False)
    return gt


def valid_pairs(gt: np.ndarray, stamps_ns, exclude_s: float) -> np.ndarray:
    """bool [N, N]: ``gt[q, m]`` restricted to earlier frames (``m < q``) at least ``exclude_s``
    older — the only loops an online detector, which searches the past and excludes its most
    recent frames, can report."""
    gt = np.asarray(gt, bool)
    t = np.asarray(stamps_ns, dtype=np.int64)
    n = len(t)
    earlier = np.tril(np.ones((n, n), bool), k=-1)
    return gt & earlier & ((t[:, None] - t[None, :]) >= int(round(exclude_s * SECOND_NS)))


def has_true_match(gt: np.ndarray, stamps_ns, exclude_s: float) -> np.ndarray:
    """The recall denominator: bool [N], True for frames with at least one valid true match
    (``valid_pairs``)."""
    return np.any(valid_pairs(gt, stamps_ns, exclude_s), axis=1)


def _finish(m: np.ndarray, n_frames: int, source: str) -> np.ndarray:
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise MegalocError(f"ground-truth matrix {source} is {'x'.join(map(str, m.shape))}, not square")
    if m.shape[0] != n_frames:
        raise MegalocError(f"ground-truth matrix {source} is {m.shape[0]}x{m.shape[1]} "
                           f"but the bag has {n_frames} frames on the image topic")
    gt = np.asarray(m != 0)
    gt = gt | gt.T
    np.fill_diagonal(gt, False)
    return gt


def _read_vprbench_table(path: Path, n_frames: int) -> np.ndarray:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    n_query = len(rows)
    n_ref = n_frames - n_query
    if n_ref <= 0:
        raise MegalocError(f"{path} lists {n_query} queries but the bag has only {n_frames} frames")
    gt = np.zeros((n_frames, n_frames), bool)
    for row in rows:
        try:
            q = n_ref + int(row["query_index"])
            refs = [int(r) for r in (row["matching_reference_indices"] or "").split()]
        except (TypeError, ValueError):
            raise MegalocError(f"{path}: bad row {row}") from None
        if q >= n_frames or any(r < 0 or r >= n_ref for r in refs):
            raise MegalocError(f"{path}: row {row} points outside the {n_ref} reference + "
                               f"{n_query} query frames of the bag")
        gt[q, refs] = True
    return gt


def read_gt_matrix(path: str | Path, n_frames: int) -> np.ndarray:
    """Read a loop matrix file (see the module doc) for a bag of ``n_frames`` image frames."""
    p = Path(path)
    if not p.is_file():
        raise MegalocError(f"ground-truth file {p} not found")
    ext = p.suffix.lower()
    if ext in (".bmp", ".png", ".pgm", ".tif", ".tiff"):
        import cv2
        m = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        if m is None:
            raise MegalocError(f"ground-truth image {p} cannot be decoded")
    elif ext == ".npy":
        try:
            m = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise MegalocError(f"ground-truth {p} is not a plain .npy array: {exc}") from None
    elif ext in (".csv", ".txt"):
        head = p.read_text(errors="replace").lstrip()[:200]
        if head.startswith("query_index"):
            return _finish(_read_vprbench_table(p, n_frames), n_frames, str(p))
        try:
            m = np.loadtxt(p, delimiter="," if "," in head.splitlines()[0] else None, ndmin=2)
        except ValueError as exc:
            raise MegalocError(f"ground-truth {p} is not a 0/1 matrix: {exc}") from None
    else:
        raise MegalocError(f"ground-truth {p}: unknown format '{ext}' "
                           "(use .bmp/.png image, .npy, or .csv/.txt 0/1 matrix)")
    return _finish(np.asarray(m), n_frames, str(p))
