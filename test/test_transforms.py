"""megaloc_ros.transforms: one quaternion <-> rotation conversion for files, bags and messages."""
from __future__ import annotations

import numpy as np
import pytest

from megaloc_ros.transforms import matrix_to_quaternion, pose_matrix, quaternion_to_matrix


def test_round_trip_and_agreement_with_scipy():
    from scipy.spatial.transform import Rotation
    rng = np.random.default_rng(0)
    for q in rng.normal(size=(200, 4)):
        r = quaternion_to_matrix(*q)
        np.testing.assert_allclose(r, Rotation.from_quat(q / np.linalg.norm(q)).as_matrix(), atol=1e-12)
        back = matrix_to_quaternion(r)
        assert back[3] >= 0 and abs(np.linalg.norm(back) - 1) < 1e-12
        np.testing.assert_allclose(abs(back @ q) / np.linalg.norm(q), 1.0, atol=1e-12)  # same rotation


def test_invalid_quaternions_are_value_errors():
    for q in [(0, 0, 0, 0), (np.nan, 0, 0, 1), (np.inf, 0, 0, 1)]:
        with pytest.raises(ValueError, match="invalid quaternion"):
            quaternion_to_matrix(*q)
    np.testing.assert_allclose(quaternion_to_matrix(0, 0, 0, 2), np.eye(3))  # non-unit: normalised


def test_pose_matrix():
    m = pose_matrix([1, 2, 3], [0, 0, np.sqrt(0.5), np.sqrt(0.5)])
    np.testing.assert_allclose(m[:3, 3], [1, 2, 3])
    np.testing.assert_allclose(m[:3, :3] @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(m[3], [0, 0, 0, 1])


def test_a_zero_quaternion_in_a_trajectory_file_names_its_line(tmp_path):
    from megaloc_ros.errors import MegalocError
    from megaloc_ros.io.trajectory import read_trajectory
    p = tmp_path / "t.txt"
    p.write_text("# t tx ty tz qx qy qz qw\n0 0 0 0 0 0 0 1\n1 1 0 0 0 0 0 0\n")
    with pytest.raises(MegalocError, match=r"t.txt:3: invalid quaternion"):
        read_trajectory(p)
