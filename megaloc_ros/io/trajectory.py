"""Stamped pose trajectories and their files.

Files are TUM (``t tx ty tz qx qy qz qw`` per line, t in seconds) or KITTI (12 values per line,
a row-major 3x4 world-from-camera matrix, one line per frame, no stamps).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megaloc_ros.errors import MegalocError
from megaloc_ros.transforms import matrix_to_quaternion, pose_matrix
from megaloc_ros.types import SECOND_NS


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


def read_trajectory(path: str | Path, frame_stamps_ns=None) -> Trajectory:
    """Read a TUM or KITTI trajectory file (see the module doc).

    KITTI files carry no stamps: they need ``frame_stamps_ns`` with one stamp per line.
    """
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise MegalocError(f"cannot read trajectory {p}: {exc.strerror}") from exc
    rows, numbers = [], []
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        try:
            rows.append([float(v) for v in s.replace(",", " ").split()])
        except ValueError:
            raise MegalocError(f"{p}:{n}: not a number in trajectory line '{s[:60]}'") from None
        numbers.append(n)
    if not rows:
        raise MegalocError(f"trajectory {p} has no poses")
    widths = {len(r) for r in rows}
    if widths == {8}:
        a = np.array(rows)
        stamps = np.round(a[:, 0] * SECOND_NS).astype(np.int64)
        poses = np.empty((len(a), 4, 4))
        for i, (n, r) in enumerate(zip(numbers, a)):
            try:
                poses[i] = pose_matrix(r[1:4], r[4:8])
            except ValueError as exc:
                raise MegalocError(f"{p}:{n}: {exc}") from None
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
