"""The real image sequences shipped in ``data/`` (see data/README.md for sources and licences).

Both are returned as one ``ImageSequence``: images in capture order, stamps, sessions and a
symmetric boolean ground-truth matrix ``gt[i, j]`` (frames i and j show the same place), and
where the set does not label every pair, which pairs it does (``labeled``).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from megaloc_ros.errors import MegalocError
from megaloc_ros.types import SECOND_NS


def data_dir() -> Path:
    """``$MEGALOC_DATA`` or the repository's ``data/``."""
    env = os.environ.get("MEGALOC_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


@dataclass
class ImageSequence:
    name: str
    image_paths: list[Path]
    stamps_ns: np.ndarray   # int64 [N]
    sessions: np.ndarray    # int32 [N]
    gt: np.ndarray          # bool [N, N], symmetric, False on the diagonal
    # bool [N, N]: the pairs whose truth the set states (None: all). A place-recognition set
    # labels query-reference pairs only: a revisit within one traversal is neither true nor false
    labeled: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.image_paths)

    def load_rgb(self, i: int) -> np.ndarray:
        from megaloc_ros.io.images import read_image_file
        return read_image_file(self.image_paths[i])


def _need(path: Path) -> Path:
    if not path.exists():
        raise MegalocError(f"{path} not found: the shipped data sets live in data/ of the repository")
    return path


def rtabmap(root: Path | None = None) -> ImageSequence:
    """84 indoor frames (RTAB-Map samples); frames 41-84 revisit earlier places. 1 Hz stamps."""
    d = _need((root or data_dir()) / "rtabmap")
    paths = [d / f"{i}.jpg" for i in range(1, 85)]
    import cv2
    g = cv2.imread(str(_need(d / "ground_truth.bmp")), cv2.IMREAD_GRAYSCALE) > 0
    gt = g | g.T
    np.fill_diagonal(gt, False)
    n = len(paths)
    return ImageSequence("rtabmap", paths, np.arange(n, dtype=np.int64) * SECOND_NS,
                         np.zeros(n, np.int32), gt)


def corridor(root: Path | None = None) -> ImageSequence:
    """Corridor: the reference traversal (session 0) then the query traversal (session 1, a day
    later) as one two-session sequence; ground truth links each query to its reference frames.
    Pairs within one traversal are not labelled (``labeled``): the route passes some places twice
    (reference frames 40 and 88 show the same lockers and door), which the set does not record."""
    d = _need((root or data_dir()) / "corridor")
    ref = sorted(_need(d / "ref").glob("*.jpg"))
    qry = sorted(_need(d / "query").glob("*.jpg"))
    n_ref, n = len(ref), len(ref) + len(qry)
    gt = np.zeros((n, n), bool)
    with open(_need(d / "ground_truth.csv"), newline="") as f:
        for row in csv.DictReader(f):
            q = n_ref + int(row["query_index"])
            for r in row["matching_reference_indices"].split():
                gt[q, int(r)] = gt[int(r), q] = True
    half_hz = SECOND_NS // 2
    stamps = np.concatenate([np.arange(n_ref) * half_hz,
                             86_400 * SECOND_NS + np.arange(len(qry)) * half_hz]).astype(np.int64)
    sessions = np.concatenate([np.zeros(n_ref), np.ones(len(qry))]).astype(np.int32)
    return ImageSequence("corridor", ref + qry, stamps, sessions, gt,
                         labeled=sessions[:, None] != sessions[None, :])


SEQUENCES = {"rtabmap": rtabmap, "corridor": corridor}
