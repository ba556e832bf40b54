"""The Encoder on the real offline model (or MegaLoc when exported): contract, preprocessing, cache."""
from __future__ import annotations

import numpy as np
import pytest

from megaloc_ros.errors import ImageDecodeError
from megaloc_ros.types import ImageFeatures


def test_encode_contract(real_encoder, rtabmap_seq):
    enc = real_encoder
    imgs = [rtabmap_seq.load_rgb(0), rtabmap_seq.load_rgb(1)[::2, ::2].copy(), np.zeros((50, 300, 3), np.uint8)]
    feats = enc.encode(imgs)
    assert len(feats) == 3 and all(isinstance(f, ImageFeatures) for f in feats)
    for f in feats:
        assert f.descriptor.dtype == np.float32 and f.descriptor.shape == (enc.descriptor_dim,)
        assert abs(np.linalg.norm(f.descriptor) - 1) < 1e-5
        assert f.patch_features.shape == (*enc.patch_grid, f.patch_features.shape[2])
        assert f.patch_features.dtype == np.float32
    assert enc.input_size[0] % 14 == 0 and enc.patch_grid == (enc.input_size[0] // 14, enc.input_size[1] // 14)
    assert isinstance(enc.model_name, str) and enc.model_name
    if enc.kind != "megaloc":
        assert "megaloc" not in enc.model_name and "NOT MegaLoc" in enc.description


def test_bad_images_raise(real_encoder):
    with pytest.raises(ImageDecodeError):
        real_encoder.encode([np.zeros((10, 10), np.uint8)])
    with pytest.raises(ImageDecodeError):
        real_encoder.encode([np.zeros((10, 10, 3), np.float32)])


def test_fixture_features_match_fresh_encoding(real_encoder, rtabmap_seq, rtabmap_features, corridor_features,
                                               corridor_seq):
    assert len(rtabmap_features) == len(rtabmap_seq) and len(corridor_features) == len(corridor_seq)
    fresh = real_encoder.encode([rtabmap_seq.load_rgb(5)])[0]
    np.testing.assert_allclose(fresh.descriptor, rtabmap_features[5].descriptor, atol=1e-5)
    # a revisit (frame 45 sees the place of frame 5) is closer than an unrelated frame
    d = np.stack([f.descriptor for f in rtabmap_features])
    sims = d @ d[44]
    gt = rtabmap_seq.gt[44]
    assert sims[gt].max() > np.median(sims[~gt])
