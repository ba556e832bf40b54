"""Local features, matching and RANSAC on a synthetic two-view scene with known pose."""
import cv2
import numpy as np
import pytest

from megaloc_ros.verification import geometry
from megaloc_ros.verification import features as F
from megaloc_ros.verification.geometry import LocalFeatures

K = np.array([[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]])


def rot(axis, deg):
    return cv2.Rodrigues(np.asarray(axis, float) / np.linalg.norm(axis) * np.radians(deg))[0]


def project(X, K_):
    x = (K_ @ X.T).T
    return x[:, :2] / x[:, 2:3]


def two_view_scene(n_true=150, n_out=100, noise_px=0.3, seed=0):
    """Points in the query camera frame; the match camera sees X_m = R X_q + t."""
    rng = np.random.default_rng(seed)
    Xq = np.column_stack([rng.uniform(-3, 3, n_true), rng.uniform(-2, 2, n_true), rng.uniform(4, 10, n_true)])
    R = rot([0.2, 1.0, 0.1], 12.0)
    t = np.array([0.8, -0.1, 0.3])
    Xm = Xq @ R.T + t
    pq = project(Xq, K) + rng.normal(0, noise_px, (n_true, 2))
    pm = project(Xm, K) + rng.normal(0, noise_px, (n_true, 2))
    desc = rng.integers(0, 256, (n_true, 128), dtype=np.uint8)
    # outliers: unrelated points with their own descriptors, present in both images
    oq = rng.uniform([0, 0], [640, 480], (n_out, 2))
    om = rng.uniform([0, 0], [640, 480], (n_out, 2))
    od = rng.integers(0, 256, (n_out, 128), dtype=np.uint8)
    perm = rng.permutation(n_out)  # wrong correspondences: descriptor i pairs with point perm[i]
    q = LocalFeatures(np.vstack([pq, oq]).astype(np.float32), np.vstack([desc, od]), (640, 480))
    m = LocalFeatures(np.vstack([pm, om[perm]]).astype(np.float32), np.vstack([desc, od]), (640, 480))
    return q, m, R, t / np.linalg.norm(t)


def angle_deg(Ra, Rb):
    return np.degrees(np.linalg.norm(cv2.Rodrigues(Ra.T @ Rb)[0]))


def test_essential_matrix_recovers_pose_of_the_query_in_the_match_frame():
    q, m, R, t = two_view_scene()
    res = geometry.verify_pair(q, m, K, K)
    assert res.matches == 250  # identical descriptors: every pair passes ratio + mutual
    assert 140 <= res.inliers <= 160  # the 150 true pairs (a few outliers may fit by chance)
    assert angle_deg(res.pose.rotation, R) < 0.5
    assert np.degrees(np.arccos(np.clip(res.pose.translation @ t, -1, 1))) < 3.0
    assert not res.pose.metric_scale
    assert np.allclose(np.linalg.norm(res.pose.translation), 1.0)
    cov = res.pose.covariance
    assert cov.shape == (6, 6) and np.all(np.diag(cov) > 0)
    # a unit direction has no scale: a back end reading only the covariance must not trust it
    assert np.all(np.diag(cov)[:3] >= geometry.UNKNOWN_SCALE_VARIANCE)
    # a clean fit's own rotation std is far below the floor measured on real pairs: the floor
    assert np.allclose(np.degrees(np.sqrt(np.diag(cov)[3:])), geometry.ESSENTIAL_ROTATION_STD_FLOOR_DEG)


def test_essential_rotation_std_grows_with_the_fit_s_residuals():
    """Above the floor the rotation std is the fit's own: the same 30 points with 4x the pixel
    noise, at the true pose, give a larger one (measured 2.37 -> 4.97 deg for 4 -> 16 px)."""
    def std_deg(noise):
        q, m, R, t = two_view_scene(n_true=30, n_out=0, noise_px=noise, seed=1)
        a, b = (cv2.undistortPoints(f.keypoints.reshape(-1, 1, 2).astype(np.float64), K, None).reshape(-1, 2)
                for f in (q, m))
        return np.degrees(np.sqrt(geometry.essential_rotation_variance(R, t, a, b, K[0, 0])))
    assert std_deg(0.3) == pytest.approx(geometry.ESSENTIAL_ROTATION_STD_FLOOR_DEG)
    assert geometry.ESSENTIAL_ROTATION_STD_FLOOR_DEG < std_deg(4.0) < std_deg(16.0) - 1.0


def test_fundamental_matrix_without_intrinsics_counts_inliers_only():
    q, m, _, _ = two_view_scene()
    res = geometry.verify_pair(q, m)
    assert 140 <= res.inliers <= 170 and res.pose is None


def test_intrinsics_scaled_to_a_downscaled_image():
    q, m, R, t = two_view_scene()
    half = np.diag([0.5, 0.5, 1.0])
    qs = LocalFeatures(q.keypoints * 0.5, q.descriptors, (320, 240))
    K2 = geometry.scale_intrinsics(K, (640, 480), (320, 240))
    assert np.allclose(K2, half @ K)
    res = geometry.verify_pair(qs, m, K2, K, threshold_px=2.0)
    assert res.inliers >= 140 and angle_deg(res.pose.rotation, R) < 1.0


def test_camera_from_camera_info_serves_any_image_size():
    cam = geometry.camera_from_info(K.ravel(), 640, 480, "plumb_bob", [-0.1, 0.01, 0, 0, 0])
    assert cam.size == (640, 480) and cam.distortion.model == "plumb_bob"
    assert cam.intrinsics((640, 480)) is cam.K and np.allclose(cam.intrinsics((320, 240)), np.diag([0.5, 0.5, 1]) @ K)
    assert geometry.Camera(K).intrinsics((123, 45)) is not None  # no size: valid as given
    assert cam == geometry.Camera(K.copy(), (640, 480), geometry.Distortion("plumb_bob", (-0.1, 0.01, 0, 0, 0)))
    assert cam != geometry.Camera(K, (640, 480)) and str(cam).startswith("fx ")
    assert geometry.camera_from_info(np.zeros(9), 640, 480) is None  # a CameraInfo without intrinsics


def test_unrelated_views_give_few_inliers():
    rng = np.random.default_rng(5)
    a = LocalFeatures(rng.uniform(0, 640, (300, 2)).astype(np.float32),
                      rng.integers(0, 256, (300, 128), dtype=np.uint8), (640, 480))
    b = LocalFeatures(rng.uniform(0, 640, (300, 2)).astype(np.float32),
                      rng.integers(0, 256, (300, 128), dtype=np.uint8), (640, 480))
    res = geometry.verify_pair(a, b, K, K)
    assert res.inliers < 10


def test_ratio_test_and_mutual_check():
    rng = np.random.default_rng(2)
    d = rng.integers(0, 256, (3, 128), dtype=np.uint8)
    a = LocalFeatures(np.zeros((3, 2), np.float32), d, (10, 10))
    # b holds d0 twice (ambiguous: fails the ratio test), d1 once, and d2 once
    b = LocalFeatures(np.zeros((4, 2), np.float32), np.vstack([d[0], d[0], d[1], d[2]]), (10, 10))
    pairs = geometry.match(a, b, ratio=0.8, mutual=True)
    assert sorted(map(tuple, pairs.tolist())) == [(1, 2), (2, 3)]
    # mutual check: a0 is a perturbed copy of c0, a1 an exact copy, so both a0 and a1 pick c0,
    # but c0 picks a1; the pair (a0, c0) goes without the mutual check only.
    c0 = d[1]
    a0 = c0.copy()
    a0[:20] = 255 - a0[:20]
    z = (255 - c0).astype(np.uint8)
    a2 = LocalFeatures(np.zeros((2, 2), np.float32), np.vstack([a0, c0]), (10, 10))
    c = LocalFeatures(np.zeros((2, 2), np.float32), np.vstack([c0, z]), (10, 10))
    assert geometry.match(a2, c, ratio=0.99, mutual=True).tolist() == [[1, 0]]
    assert geometry.match(a2, c, ratio=0.99, mutual=False).tolist() == [[0, 0], [1, 0]]


@pytest.mark.parametrize("kind,width", [("sift", 128), ("orb", 32)])
def test_extract_on_a_real_image(rtabmap_seq, kind, width):
    img = rtabmap_seq.load_rgb(10)
    f = F.extract(img, kind, max_keypoints=300, max_side=256, min_side=16)  # no upsampling
    assert 50 <= len(f.keypoints) <= 300
    assert f.descriptors.dtype == np.uint8 and f.descriptors.shape == (len(f.keypoints), width)
    # keypoints are in the full image's pixels although detection ran at 256 px
    assert f.keypoints[:, 0].max() > 256 and f.keypoints[:, 0].max() < img.shape[1]
    assert f.image_size == (img.shape[1], img.shape[0])


@pytest.mark.parametrize("kind,least", [("sift", 120), ("orb", 60)])
def test_real_image_against_its_warped_copy(rtabmap_seq, kind, least):
    img = rtabmap_seq.load_rgb(40)
    h, w = img.shape[:2]
    H = np.array([[0.95, 0.05, 20], [-0.04, 0.97, 10], [0, 0, 1]])
    warped = cv2.warpPerspective(img, H, (w, h))
    a = F.extract(img, kind, min_side=16)
    res = geometry.verify_pair(a, F.extract(warped, kind, min_side=16))
    assert res.inliers >= least  # a plane-induced homography satisfies any fundamental matrix
    assert not rtabmap_seq.gt[40, 20]
    other = rtabmap_seq.load_rgb(20)  # a different place
    assert geometry.verify_pair(a, F.extract(other, kind, min_side=16)).inliers < 20


# ----------------------------------------------------------------------------- lens distortion

def _distort(lf, d, K_cam=K):
    """``lf``'s pinhole keypoints (intrinsics ``K_cam``) as that camera with distortion ``d``
    images them."""
    x = cv2.undistortPoints(lf.keypoints.reshape(-1, 1, 2).astype(np.float64), K_cam, None).reshape(-1, 2)
    if d.model == "equidistant":
        p = cv2.fisheye.distortPoints(x.reshape(-1, 1, 2), K_cam, np.array(d.d))
    else:
        p = cv2.projectPoints(np.c_[x, np.ones(len(x))].reshape(-1, 1, 3), np.zeros(3), np.zeros(3), K_cam,
                              np.array(d.d))[0]
    return LocalFeatures(p.reshape(-1, 2).astype(np.float32), lf.descriptors, lf.image_size)


WIDE = {  # a wide-angle lens's barrel distortion in each CameraInfo model
    "plumb_bob": (-0.3, 0.1, 0.001, -0.002, 0.0),
    "rational_polynomial": (-0.3, 0.1, 0.001, -0.002, 0.0, 0.01, 0.02, 0.0),
    "equidistant": (0.1, -0.02, 0.01, 0.0),
}


@pytest.mark.parametrize("model", sorted(WIDE))
def test_distortion_is_undone_to_the_pinhole_pixels(model):
    d = geometry.Distortion(model, WIDE[model])
    q, _, _, _ = two_view_scene(n_out=0)
    qd = _distort(q, d)
    assert np.abs(qd.keypoints - q.keypoints).max() > 20  # a real lens moves the edges that far
    assert np.abs(d.undistort(qd.keypoints, K) - q.keypoints).max() < 0.01


def test_distortion_from_camera_info():
    assert geometry.Distortion.from_camera_info("", []) is None
    assert geometry.Distortion.from_camera_info("plumb_bob", [0.0] * 5) is None  # nothing to undo
    assert geometry.Distortion.from_camera_info("plumb_bob", [-0.1, 0, 0, 0, 0]).d == (-0.1, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="not supported"):
        geometry.Distortion.from_camera_info("kannala_brandt", [0.1])
    with pytest.raises(ValueError, match="takes 4 coefficients"):
        geometry.Distortion.from_camera_info("equidistant", [0.1, 0.0])
    with pytest.raises(ValueError, match="without a distortion model"):
        geometry.Distortion.from_camera_info("", [0.1, 0.0, 0.0, 0.0, 0.0])
