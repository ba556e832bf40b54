"""TUM RGB-D keyframes shipped in ``data/tum_fr3_cabinet`` (see data/README.md for the source).

``tum_fr3_cabinet()`` returns a ``TumSequence``: colour frames, registered depth (uint16, 5000
units per metre, 0 = no measurement), camera-to-world poses from the motion-capture ground
truth, and the TUM fr3 intrinsics (no distortion). ``evaluation.covisibility.as_image_sequence``
turns it into the ``ImageSequence`` the benchmarks replay, with a ground-truth matrix from
covisibility instead of a loop matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megaloc_ros.errors import MegalocError
from megaloc_ros.types import SECOND_NS
DEPTH_SCALE = 5000.0  # TUM depth PNG units per metre
FR3_INTRINSICS = np.array([[535.4, 0.0, 320.1],
                           [0.0, 539.2, 247.6],
                           [0.0, 0.0, 1.0]])


@dataclass
class TumSequence:
    name: str
    rgb_paths: list[Path]
    depth_paths: list[Path]
    stamps_ns: np.ndarray   # int64 [N]
    poses: np.ndarray       # float64 [N, 4, 4] camera-to-world
    K: np.ndarray           # float64 3x3, pixels of the 640x480 images

    def __len__(self) -> int:
        return len(self.rgb_paths)

    def load_rgb(self, i: int) -> np.ndarray:
        from megaloc_ros.io.images import read_image_file
        return read_image_file(self.rgb_paths[i])

    def load_depth(self, i: int) -> np.ndarray:
        """uint16 [H, W], ``DEPTH_SCALE`` units per metre, 0 = no depth."""
        import cv2
        d = cv2.imread(str(self.depth_paths[i]), cv2.IMREAD_UNCHANGED)
        if d is None or d.dtype != np.uint16 or d.ndim != 2:
            raise MegalocError(f"{self.depth_paths[i]} is not a 16-bit depth PNG")
        return d

    def depth_m(self, i: int) -> np.ndarray:
        """float32 [H, W] metres, 0 where there is no depth."""
        return self.load_depth(i).astype(np.float32) / DEPTH_SCALE

    image_size: tuple[int, int] = (640, 480)  # (width, height) ``K`` refers to
    depth_scale: float = DEPTH_SCALE          # raw depth units per metre


def _rows(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise MegalocError(f"{path} not found: the shipped data sets live in data/ of the repository")
    return [ln.split() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def tum_fr3_cabinet(root: Path | None = None) -> TumSequence:
    """58 keyframes of TUM RGB-D fr3/cabinet; frames 52-57 come back to frame 0."""
    from megaloc_ros.transforms import pose_matrix
    from megaloc_ros.io.datasets import data_dir
    d = (root or data_dir()) / "tum_fr3_cabinet"
    images = _rows(d / "rgb.txt")
    truth = _rows(d / "groundtruth.txt")
    if len(images) != len(truth):
        raise MegalocError(f"{d}: rgb.txt has {len(images)} lines, groundtruth.txt {len(truth)}")
    stamps, poses = [], []
    for img, gt in zip(images, truth):
        if abs(float(img[0]) - float(gt[0])) > 1e-3:
            raise MegalocError(f"{d}: rgb.txt and groundtruth.txt stamps differ ({img[0]} vs {gt[0]})")
        stamps.append(round(float(gt[0]) * SECOND_NS))
        v = [float(x) for x in gt[1:8]]
        poses.append(pose_matrix(v[0:3], v[3:7]))
    return TumSequence("tum_fr3_cabinet", [d / r[1] for r in images], [d / r[2] for r in images],
                       np.array(stamps, np.int64), np.stack(poses), FR3_INTRINSICS.copy())
