"""Depth with keyframes: the verifier keeps each keypoint's depth and gives loops on them a
metric transform (PnP), checked against the TUM fr3/cabinet mocap poses; saved and loaded."""
from __future__ import annotations

import numpy as np
import pytest

from megaloc_ros.io import tum
from megaloc_ros.types import Candidate, ImageFeatures, Keyframe
from megaloc_ros.verification.metric_pose import pose_error
from megaloc_ros.verification.verifier import Verifier, VerifierParams
from megaloc_ros.verification.geometry import Camera


@pytest.fixture(scope="module")
def seq():
    return tum.tum_fr3_cabinet()


def _verify_pair(v: Verifier, seq, q: int, m: int, with_depth: bool):
    feats = ImageFeatures(np.ones(4, np.float32) / 2)  # no patch features: geometry decides
    for i in (m, q):
        v.add_keyframe(Keyframe(i, int(seq.stamps_ns[i])), seq.load_rgb(i), feats,
                       seq.depth_m(i) if with_depth else None)
    return v.verify([Candidate(Keyframe(q, int(seq.stamps_ns[q])), Keyframe(m, int(seq.stamps_ns[m])), 0.9, 0)])[0]


# the plain cabinet gives the default 500 keypoints few matches; the depth path is what is tested
DENSE = VerifierParams(max_keypoints=2000, consistency_window=0)  # pairs, each on its own


def test_neighbouring_keyframes_get_a_metric_transform_within_5cm_2deg(seq, tmp_path):
    v = Verifier(DENSE, Camera(seq.K, seq.image_size))
    errors = []
    for q, m in ((13, 12), (16, 15), (22, 21), (49, 48)):
        loop = _verify_pair(v, seq, q, m, with_depth=True)
        assert loop.accepted and loop.transform is not None, loop.reason
        assert loop.transform.metric_scale and "metric transform: PnP" in loop.reason, loop.reason
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = loop.transform.rotation, loop.transform.translation
        errors.append(pose_error(T, np.linalg.inv(seq.poses[m]) @ seq.poses[q]))
        assert np.all(np.linalg.eigvalsh(loop.transform.covariance) > 0)
    t, r = np.median(np.array(errors), axis=0)
    assert t <= 0.05 and r <= 2.0, errors
    # the depths survive save/load: the loaded state gives the same metric transform
    v.save(tmp_path / "s.verifier")
    w = Verifier.load(tmp_path / "s.verifier")
    again = w.verify([Candidate(Keyframe(49, int(seq.stamps_ns[49])), Keyframe(48, int(seq.stamps_ns[48])), 0.9, 0)])[0]
    assert again.transform.metric_scale and np.allclose(again.transform.translation, loop.transform.translation)


def test_without_depth_the_translation_stays_a_direction(seq):
    v = Verifier(DENSE, Camera(seq.K, seq.image_size))
    loop = _verify_pair(v, seq, 13, 12, with_depth=False)
    assert loop.accepted and loop.transform is not None and not loop.transform.metric_scale
    assert np.linalg.norm(loop.transform.translation) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("q, m", [(24, 26), (1, 55)])
def test_few_pnp_inliers_still_give_the_loop_its_rotation(seq, q, m):
    """Fewer than 20 PnP inliers are too few for a metric translation but not for the rotation:
    on these TUM pairs (10-19 inliers, the default 500 keypoints) the essential matrix's rotation
    is more than 10 deg off the motion capture and PnP's within 5 (measured 17.0 / 1.0 and
    25.0 / 0.7 deg)."""
    truth = np.linalg.inv(seq.poses[m]) @ seq.poses[q]
    errs = {}
    for with_depth in (True, False):
        # without the denser ORB keypoints, which would give them a metric transform (next test)
        v = Verifier(VerifierParams(consistency_window=0, metric_keypoints=0), Camera(seq.K, seq.image_size))
        loop = _verify_pair(v, seq, q, m, with_depth)
        assert loop.accepted and loop.transform is not None and not loop.transform.metric_scale, loop.reason
        assert np.linalg.norm(loop.transform.translation) == pytest.approx(1.0, abs=1e-6)
        assert np.all(np.diag(loop.transform.covariance)[:3] >= 1e6)  # no scale: no weight
        T = np.eye(4)
        T[:3, :3] = loop.transform.rotation
        errs[with_depth] = pose_error(T, truth)[1]
        if with_depth:
            assert "rotation and unit direction: PnP" in loop.reason, loop.reason
            assert np.all(np.diag(loop.transform.covariance)[3:] > 0)
    assert errs[True] < 5.0 and errs[False] > 10.0, errs


def test_loops_the_verification_keypoints_cannot_measure_get_their_metric_transform_from_orb(seq, tmp_path):
    """An RGB-D keyframe also keeps ~1000 ORB keypoints with their depth: loops whose 500 SIFT
    keypoints give PnP too few inliers (10-16, or none for 57 -> 0) get their metric transform
    from those, within 5 cm / 2 deg of the motion capture (measured 0.9-3.1 cm, 0.41-1.83 deg;
    without them the translation is a direction, 61-73 cm off at unit length). They survive
    save/load and travel to a peer robot with the keyframe."""
    from megaloc_ros import fleet
    cam = Camera(seq.K, seq.image_size)
    for q, m in ((24, 26), (1, 55), (57, 0)):
        v = Verifier(VerifierParams(consistency_window=0), cam)
        loop = _verify_pair(v, seq, q, m, with_depth=True)
        assert loop.accepted and loop.transform is not None and loop.transform.metric_scale, loop.reason
        assert "ORB matches with depth" in loop.reason, loop.reason
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = loop.transform.rotation, loop.transform.translation
        t, r = pose_error(T, np.linalg.inv(seq.poses[m]) @ seq.poses[q])
        assert t <= 0.05 and r <= 2.0, (q, m, t, r)
        assert np.all(np.linalg.eigvalsh(loop.transform.covariance) > 0)
    cand = Candidate(Keyframe(q, int(seq.stamps_ns[q])), Keyframe(m, int(seq.stamps_ns[m])), 0.9, 0)
    v.save(tmp_path / "s.verifier")
    w = Verifier.load(tmp_path / "s.verifier")
    assert w._entries[m].metric is not None and len(w._entries[m].metric.keypoints) > 500
    again = w.verify([cand])[0]
    assert again.transform.metric_scale and np.allclose(again.transform.translation, loop.transform.translation)
    peer = Verifier(VerifierParams(consistency_window=0), cam)  # the match keyframe is another robot's
    peer.add_keyframe(Keyframe(q, int(seq.stamps_ns[q])), seq.load_rgb(q), ImageFeatures(np.ones(4, np.float32) / 2),
                      seq.depth_m(q))
    fleet.import_entry(peer, m, fleet.export_entry(v, m))
    there = peer.verify([cand])[0]
    assert there.transform.metric_scale and np.allclose(there.transform.translation, loop.transform.translation)
