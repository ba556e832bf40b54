"""`megaloc-ros export`: ONNX graphs that reproduce the official forward, sidecars, precisions."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from megaloc_ros import cli
from megaloc_ros.encoder import Encoder
from megaloc_ros.export import convert_precision, export_model
from megaloc_ros.model.weights import load_megaloc
from test_model import SMALL, official_key_shapes, reference_megaloc, synthetic_checkpoint


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    sd = synthetic_checkpoint(official_key_shapes(**SMALL), seed=5)
    path = tmp_path_factory.mktemp("small") / "model.safetensors"
    save_file(sd, str(path))
    return sd, path


def test_cli_export_matches_reference_with_dynamic_batch(small, tmp_path, rtabmap_seq):
    sd, weights = small
    out = tmp_path / "small.onnx"
    assert cli.main(["export", "--weights", str(weights), "--height", "322", "--width", "322",
                     "--output", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model_name"] == "megaloc" and meta["kind"] == "megaloc" and meta["precision"] == "fp32"
    assert meta["input"]["height"] == meta["input"]["width"] == 322
    assert meta["input"]["mean"] == [0.485, 0.456, 0.406] and meta["input"]["std"] == [0.229, 0.224, 0.225]
    assert meta["outputs"]["descriptor"] == {"name": "descriptor", "dim": 96}
    assert meta["outputs"]["patch_features"]["shape"] == [23, 23, 64]
    assert len(meta["weights"]["sha256"]) == 64
    assert meta["check_vs_pytorch"]["images"] == 4 and meta["check_vs_pytorch"]["descriptor_max_abs_diff"] < 1e-4

    sess = _session(out)
    g = torch.Generator().manual_seed(11)
    model = load_megaloc(weights)
    for batch in (2, 1, 3):  # exported with an example batch of 2; the batch axis is dynamic
        x = torch.randn(batch, 3, 322, 322, generator=g)
        desc, patches = sess.run(None, {"image": x.numpy()})
        ref = reference_megaloc(sd, x, heads=1).numpy()  # heads = 64 / 64 when read from shapes
        assert desc.shape == (batch, 96) and patches.shape == (batch, 23, 23, 64)
        assert np.abs(desc - ref).max() <= 1e-4
        with torch.no_grad():
            assert np.abs(patches - model.forward_features(x)[1].numpy()).max() <= 1e-4

    # The Encoder runs it with the official preprocessing; the torch fallback agrees.
    imgs = [rtabmap_seq.load_rgb(i) for i in (0, 40)]
    a = Encoder(out, device="cpu").encode(imgs)
    b = Encoder(out, backend="torch").encode(imgs)
    assert Encoder(out).patch_grid == (23, 23) and Encoder(out).descriptor_dim == 96
    for fa, fb in zip(a, b):
        assert np.abs(fa.descriptor - fb.descriptor).max() <= 1e-4
        assert fa.patch_features.shape == (23, 23, 64)


def test_export_at_480x640_resizes_inside_the_graph(small, tmp_path):
    sd, weights = small
    out = tmp_path / "small_480x640.onnx"
    meta = export_model(load_megaloc(weights), out, height=480, width=640, check_images=0)
    assert meta["outputs"]["patch_features"]["shape"] == [34, 46, 64]  # 476 x 644 inside the model
    x = torch.randn(1, 3, 480, 640, generator=torch.Generator().manual_seed(2))
    desc, patches = _session(out).run(None, {"image": x.numpy()})
    assert np.abs(desc - reference_megaloc(sd, x, heads=1).numpy()).max() <= 1e-4
    assert patches.shape == (1, 34, 46, 64)


def test_int8_offline_model_agrees_with_fp32(real_encoder, rtabmap_seq, corridor_seq, tmp_path):
    """Dynamic int8 quantisation of the real backbone keeps descriptors (cosine >= 0.99)."""
    fp32 = real_encoder.model_path
    int8 = tmp_path / "int8.onnx"
    convert_precision(fp32, int8, "int8")
    meta = json.loads(fp32.with_suffix(".json").read_text())
    meta["precision"] = "int8"
    int8.with_suffix(".json").write_text(json.dumps(meta))
    imgs = [rtabmap_seq.load_rgb(i) for i in (0, 30, 60)] + [corridor_seq.load_rgb(i) for i in (5, 150)]
    a = np.stack([f.descriptor for f in Encoder(fp32, device="cpu").encode(imgs)])
    b = np.stack([f.descriptor for f in Encoder(int8, device="cpu").encode(imgs)])
    assert (a * b).sum(1).min() >= 0.99
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size


def test_export_without_weights_offline_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEGALOC_CACHE", str(tmp_path))
    monkeypatch.setenv("MEGALOC_WEIGHTS_URL", "http://127.0.0.1:9/model.safetensors")  # nothing listens
    assert cli.main(["export", "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "cannot download the MegaLoc weights" in err
    assert "gberton/MegaLoc" in err and "--weights model.safetensors" in err
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.rglob("*.part"))


@pytest.mark.slow
def test_full_size_vit_b14_megaloc_export(tmp_path):
    """The full MegaLoc (ViT-B/14, 64x256 SALAD, 8448-D) from a checkpoint with every official
    key: strict load, export at 322x322, ONNX Runtime at batch 2 == the reference forward."""
    sd = synthetic_checkpoint(official_key_shapes(), seed=7)
    weights = tmp_path / "model.safetensors"
    save_file(sd, str(weights))
    out = tmp_path / "megaloc.onnx"
    assert cli.main(["export", "--weights", str(weights), "--check-images", "2", "--output", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["outputs"]["descriptor"]["dim"] == 8448
    assert meta["outputs"]["patch_features"]["shape"] == [23, 23, 768]
    x = torch.randn(2, 3, 322, 322, generator=torch.Generator().manual_seed(4))
    desc, patches = _session(out).run(None, {"image": x.numpy()})
    ref = reference_megaloc(sd, x, heads=12).numpy()
    assert desc.shape == (2, 8448) and patches.shape == (2, 23, 23, 768)
    assert np.abs(desc - ref).max() <= 1e-4
    assert (desc * ref).sum(1).min() > 0.99999
    # 480x640 through the PyTorch model (the graph at that size is covered on the small config)
    x = torch.randn(1, 3, 480, 640, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (load_megaloc(weights)(x) - reference_megaloc(sd, x, heads=12)).abs().max() <= 1e-4
