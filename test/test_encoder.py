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


def test_batches_give_the_same_features_as_single_images(real_encoder, corridor_seq):
    from megaloc_ros.encoding.encoder import Encoder
    imgs = [corridor_seq.load_rgb(i) for i in (0, 3, 120, 200, 221)]
    batched = Encoder(real_encoder.model_path, device="cpu", batch_size=2).encode(imgs)
    for img, b in zip(imgs, batched):
        single = real_encoder.encode([img])[0]
        np.testing.assert_allclose(single.descriptor, b.descriptor, atol=1e-5)
        np.testing.assert_allclose(single.patch_features, b.patch_features, atol=1e-4)


def test_feature_cache_is_keyed_by_model_and_image_content(real_encoder, rtabmap_seq, tmp_path):
    import shutil
    from megaloc_ros.encoding.encoder import encode_files
    paths = [tmp_path / f"{i}.jpg" for i in range(3)]
    for i, p in enumerate(paths):
        shutil.copy(rtabmap_seq.image_paths[i], p)
    cache = tmp_path / "features"
    first = encode_files(real_encoder, paths, cache_dir=cache)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1 and real_encoder.model_name in files[0].name
    again = encode_files(real_encoder, paths, cache_dir=cache)
    for a, b in zip(first, again):
        assert np.array_equal(a.descriptor, b.descriptor) and np.array_equal(a.patch_features, b.patch_features)
    shutil.copy(rtabmap_seq.image_paths[10], paths[2])  # same names, new content -> new entry
    changed = encode_files(real_encoder, paths, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 2
    assert not np.allclose(changed[2].descriptor, first[2].descriptor)


def test_load_encoder_prefers_an_exported_megaloc(tmp_path, monkeypatch, caplog):
    import logging
    import shutil

    import torch
    from megaloc_ros.encoding.encoder import Encoder
    from megaloc_ros.encoding.loader import load_encoder
    from megaloc_ros.errors import WeightsError
    from megaloc_ros.encoding.export import export_model
    from megaloc_ros.encoding.model import MegaLoc, MegaLocConfig, ViTConfig

    torch.manual_seed(0)
    small = MegaLoc(MegaLocConfig(vit=ViTConfig(embed_dim=64, depth=1, num_heads=1), num_clusters=4,
                                  cluster_dim=8, token_dim=8, mlp_dim=16, feat_dim=32)).eval()
    models = tmp_path / "models"
    export_model(small, models / "megaloc.onnx", height=224, width=224, check_images=0)
    monkeypatch.setenv("MEGALOC_CACHE", str(tmp_path))
    monkeypatch.delenv("MEGALOC_MODEL", raising=False)
    with caplog.at_level(logging.INFO, logger="megaloc_ros.encoding.encoder"):
        enc = load_encoder(device="cpu")
    assert enc.kind == "megaloc" and enc.model_name == "megaloc" and enc.descriptor_dim == 32
    assert enc.input_size == (224, 224) and enc.patch_grid == (16, 16)
    assert "MegaLoc" in caplog.text and "NOT MegaLoc" not in caplog.text

    monkeypatch.setenv("MEGALOC_MODEL", str(tmp_path / "nowhere.onnx"))
    with pytest.raises(WeightsError, match="MEGALOC_MODEL"):
        load_encoder()
    monkeypatch.delenv("MEGALOC_MODEL")
    (models / "megaloc.onnx").unlink()  # nothing exported and no offline backbone in this cache
    with pytest.raises(WeightsError, match="ros2 run megaloc_ros megaloc-ros export"):
        load_encoder()

    lonely = tmp_path / "lonely.onnx"
    shutil.copy(models / "megaloc.json", tmp_path / "other.json")
    lonely.write_bytes(b"")
    with pytest.raises(WeightsError, match="sidecar"):
        Encoder(lonely)
