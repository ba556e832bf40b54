"""Ground truth for loop-closure evaluation: which frame pairs show the same place.

Three sources, all ending in one symmetric bool matrix ``gt[i, j]`` over the frames of a bag
(False on the diagonal):

* poses (a pose topic in the bag, or a trajectory file): frames whose positions are within
  ``distance_m`` of each other and at least ``exclude_s`` apart in time;
* a loop matrix file: an image (.bmp/.png, non-zero = same place, as RTAB-Map ships it), a .npy
  0/1 matrix, a .csv/.txt 0/1 matrix, or a VPR-Bench ``query_index,matching_reference_indices``
  table (reference frames first in the bag, then the queries);
* a shipped data set (``megaloc_ros.io.datasets``), which already carries its matrix.

Trajectory files are TUM (``t tx ty tz qx qy qz qw`` per line, t in seconds) or KITTI (12
values per line, a row-major 3x4 world-from-camera matrix, one line per frame, no stamps).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from megaloc_ros.errors import MegalocError

SECOND_NS = 1_000_000_000


@dataclass
class Trajectory:
    """Stamped world-from-body poses, sorted by stamp."""

    stamps_ns: np.ndarray  # int64 [M]
    poses: np.ndarray      # float64 [M, 4, 4]

    def __len__(self) -> int:
        return len(self.stamps_ns)

    @property
    def positions(self) -> np.ndarray:
        return self.poses[:, :3, 3]

    def at(self, stamps_ns, max_gap_s: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
        """Poses at ``stamps_ns``: position interpolated linearly between the two neighbouring
        poses, rotation of the nearer one. Returns (poses [N, 4, 4], valid [N]); a stamp is
        invalid when it lies outside the trajectory or more than ``max_gap_s`` from both
        neighbours (a gap in odometry is not bridged)."""
        t = np.asarray(stamps_ns, dtype=np.int64)
        out = np.tile(np.eye(4), (len(t), 1, 1))
        valid = np.zeros(len(t), bool)
        if len(self) == 0:
            return out, valid
        ts = self.stamps_ns
        hi = np.clip(np.searchsorted(ts, t, side="left"), 0, len(ts) - 1)
        lo = np.clip(hi - 1, 0, len(ts) - 1)
        gap = int(max_gap_s * SECOND_NS)
        for k, (tk, a, b) in enumerate(zip(t, lo, hi)):
            if tk <= ts[0]:
                a = b = 0
            elif tk >= ts[-1]:
                a = b = len(ts) - 1
            da, db = abs(int(tk - ts[a])), abs(int(ts[b] - tk))
            if min(da, db) > gap or tk < ts[0] - gap or tk > ts[-1] + gap:
                continue
            valid[k] = True
            out[k] = self.poses[a if da <= db else b]
            if a != b:
                w = (tk - ts[a]) / float(ts[b] - ts[a])
                out[k, :3, 3] = (1 - w) * self.poses[a, :3, 3] + w * self.poses[b, :3, 3]
        return out, valid


def quaternion_to_matrix(x: float, y: float, z: float, w: float) -> np.ndarray:
    """Unit quaternion (x, y, z, w) -> 3x3 rotation (normalised first)."""
    q = np.array([x, y, z, w], dtype=np.float64)
    n = np.linalg.norm(q)
    if n == 0.0:
        return np.eye(3)
    x, y, z, w = q / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def matrix_to_quaternion(r: np.ndarray) -> np.ndarray:
    """3x3 rotation -> unit quaternion (x, y, z, w) with w >= 0."""
    m = np.asarray(r, dtype=np.float64)
    # Shepperd's method: pick the largest diagonal term for numerical stability.
    tr = np.trace(m)
    if tr > 0:
        s = 2.0 * np.sqrt(tr + 1.0)
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s]
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + m[i, i] - m[j, j] - m[k, k])
        q = [0.0, 0.0, 0.0, (m[k, j] - m[j, k]) / s]
        q[i] = 0.25 * s
        q[j] = (m[j, i] + m[i, j]) / s
        q[k] = (m[k, i] + m[i, k]) / s
    q = np.array(q)
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q


def pose_matrix(position, quaternion_xyzw) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = quaternion_to_matrix(*quaternion_xyzw)
    out[:3, 3] = position
    return out


def read_trajectory(path: str | Path, frame_stamps_ns=None) -> Trajectory:
    """Read a TUM or KITTI trajectory file (see the module doc).

    KITTI files carry no stamps: they need ``frame_stamps_ns`` with one stamp per line.
    """
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise MegalocError(f"cannot read trajectory {p}: {exc.strerror}") from exc
    rows = []
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        try:
            rows.append([float(v) for v in s.replace(",", " ").split()])
        except ValueError:
            raise MegalocError(f"{p}:{n}: not a number in trajectory line '{s[:60]}'") from None
    if not rows:
        raise MegalocError(f"trajectory {p} has no poses")
    widths = {len(r) for r in rows}
    if widths == {8}:
        a = np.array(rows)
        stamps = np.round(a[:, 0] * SECOND_NS).astype(np.int64)
        poses = np.stack([pose_matrix(r[1:4], r[4:8]) for r in a])
    elif widths == {12}:
        if frame_stamps_ns is None or len(frame_stamps_ns) != len(rows):
            have = "no frames" if frame_stamps_ns is None else f"{len(frame_stamps_ns)} frames"
            raise MegalocError(f"KITTI trajectory {p} has {len(rows)} poses (one per frame, no stamps) "
                               f"but there are {have}; use a TUM file (t tx ty tz qx qy qz qw) instead")
        stamps = np.asarray(frame_stamps_ns, dtype=np.int64)
        poses = np.tile(np.eye(4), (len(rows), 1, 1))
        poses[:, :3, :] = np.array(rows).reshape(-1, 3, 4)
    else:
        raise MegalocError(f"trajectory {p}: expected TUM lines (t tx ty tz qx qy qz qw, 8 values) "
                           f"or KITTI lines (12 values), found lines of {sorted(widths)} values")
    order = np.argsort(stamps, kind="stable")
    return Trajectory(stamps[order], poses[order])


def write_trajectory_tum(path: str | Path, traj: Trajectory) -> None:
    with open(path, "w") as f:
        f.write("# timestamp tx ty tz qx qy qz qw\n")
        for t, m in zip(traj.stamps_ns, traj.poses):
            q = matrix_to_quaternion(m[:3, :3])
            vals = [*m[:3, 3], *q]
            f.write(f"{t / SECOND_NS:.9f} " + " ".join(f"{v:.9g}" for v in vals) + "\n")


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
