"""Covisibility ground truth: exact on synthetic geometry, sensible on the real TUM frames."""
import numpy as np
import pytest

from megaloc_ros.evaluation import covisibility as cv

K = np.array([[500.0, 0, 319.5], [0, 500.0, 239.5], [0, 0, 1]])


def wall(z=2.0, h=480, w=640):
    return np.full((h, w), z, np.float32)


def pose(tx=0.0, yaw_deg=0.0):
    T = np.eye(4)
    a = np.radians(yaw_deg)
    T[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
    T[0, 3] = tx
    return T


def test_same_view_is_fully_covisible():
    assert cv.covisibility(wall(), pose(), wall(), pose(), K) == pytest.approx(1.0)


def test_sideways_shift_leaves_the_overlap_fraction():
    # a fronto-parallel wall at 2 m; moving 0.64 m right shifts it by f * 0.64 / 2 = 160 px of 640
    c = cv.covisibility(wall(), pose(), wall(), pose(tx=0.64), K, stride=2)
    assert c == pytest.approx(0.75, abs=0.01)


def test_turned_away_and_wrong_depth_and_occluded_are_not_seen():
    assert cv.covisibility(wall(), pose(), wall(), pose(yaw_deg=180), K) == 0.0
    assert cv.covisibility(wall(), pose(), wall(3.0), pose(), K) == 0.0   # j sees another surface
    occluded = wall()
    occluded[:, :320] = 0.5                                               # something nearer in j
    assert cv.covisibility(wall(), pose(), occluded, pose(), K) == pytest.approx(0.5, abs=0.01)
    no_depth = wall()
    no_depth[240:] = 0                                                    # j has no depth there
    assert cv.covisibility(wall(), pose(), no_depth, pose(), K) == pytest.approx(0.5, abs=0.01)


def test_symmetric_takes_the_larger_direction():
    c = np.array([[1.0, 0.1], [0.6, 1.0]])
    assert cv.symmetric(c)[0, 1] == cv.symmetric(c)[1, 0] == 0.6


@pytest.fixture(scope="module")
def tum_seq():
    from megaloc_ros.io import tum
    return tum.tum_fr3_cabinet()


def test_tum_loader_gives_frames_depth_poses_intrinsics(tum_seq):
    assert len(tum_seq) == 58
    assert tum_seq.load_rgb(0).shape == (480, 640, 3)
    d = tum_seq.load_depth(0)
    assert d.dtype == np.uint16 and d.shape == (480, 640)
    z = tum_seq.depth_m(0)
    assert 0.3 < np.median(z[z > 0]) < 5.0                                 # 5000 units per metre
    assert np.allclose(tum_seq.K[[0, 1, 0, 1], [0, 1, 2, 2]], [535.4, 539.2, 320.1, 247.6])
    R = tum_seq.poses[:, :3, :3]
    assert np.allclose(R @ R.transpose(0, 2, 1), np.eye(3), atol=1e-6)
    # the loop of SOURCE.txt: frame 56 is 0.28 m from frame 0
    assert np.linalg.norm(tum_seq.poses[56, :3, 3] - tum_seq.poses[0, :3, 3]) == pytest.approx(0.284, abs=0.01)


def test_tum_loop_frames_are_covisible_and_far_ones_are_not(tum_seq):
    def c(i, j):
        return cv.covisibility(tum_seq.depth_m(i), tum_seq.poses[i], tum_seq.depth_m(j), tum_seq.poses[j],
                               tum_seq.K)
    assert min(c(56, 0), c(0, 56)) >= cv.SAME_PLACE        # the loop closure
    assert c(1, 0) > 0.5                                    # consecutive keyframes
    # frame 24 looks at the cabinet from the opposite side (~100 deg, 2.6 m away)
    assert max(c(0, 24), c(24, 0)) < cv.SAME_PLACE
    assert cv.viewing_angle_deg(tum_seq.poses[0], tum_seq.poses[24]) > 90
