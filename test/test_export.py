"""`megaloc-ros export`: ONNX graphs that reproduce the official forward, sidecars, precisions."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from megaloc_ros import cli
from megaloc_ros.encoding.encoder import Encoder
from megaloc_ros.encoding.export import convert_precision, export_model, fuse_for_cpu
from megaloc_ros.encoding.model.weights import load_megaloc
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


def test_cli_int8_export_fuses_then_quantises(small, tmp_path, rtabmap_seq, corridor_seq):
    """--precision int8: attention, GELU and LayerScale fused for the CPU kernels (an exact
    rewrite), then dynamic int8 on the weight MatMuls; the sidecar says how."""
    sd, weights = small
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export_model(load_megaloc(weights), fp32, check_images=0)
    assert cli.main(["export", "--weights", str(weights), "--precision", "int8", "--check-images", "2",
                     "--output", str(int8)]) == 0
    meta = json.loads(int8.with_suffix(".json").read_text())
    assert meta["precision"] == "int8"
    q = meta["quantization"]
    assert "quantize_dynamic" in q["method"] and "per output channel" in q["weights"]
    assert q["graph_fusions"] == {"attention": 2, "gelu": 2, "layer_scale": 4}  # 2 blocks
    assert meta["check_vs_pytorch"]["descriptor_min_cosine"] >= 0.99
    ops = Counter(n.op_type for n in onnx.load(str(int8)).graph.node)
    assert ops["MultiHeadAttention"] == 2 and ops["Gelu"] == 2 and not ops["Softmax"] and not ops["Erf"]
    assert ops["MatMulInteger"] >= 2 * 6  # q, k, v, proj, fc1, fc2 of each block (+ the head's)

    # the fusions alone change nothing beyond float rounding, at any batch
    m = onnx.load(str(fp32))
    assert fuse_for_cpu(m) == q["graph_fusions"]
    fused = tmp_path / "fused.onnx"
    onnx.save(m, str(fused))
    x = torch.randn(3, 3, 322, 322, generator=torch.Generator().manual_seed(8)).numpy()
    for a, b in zip(_session(fp32).run(None, {"image": x}), _session(fused).run(None, {"image": x})):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-4

    imgs = [rtabmap_seq.load_rgb(i) for i in (0, 45)] + [corridor_seq.load_rgb(i) for i in (20, 130)]
    a = Encoder(fp32, device="cpu").encode(imgs)
    b = Encoder(int8, device="cpu").encode(imgs)
    assert Encoder(int8).precision == "int8"
    for fa, fb in zip(a, b):
        assert float(fa.descriptor @ fb.descriptor) >= 0.99
        assert fb.patch_features.shape == fa.patch_features.shape


def test_int8_offline_model_agrees_with_fp32(real_encoder, rtabmap_seq, corridor_seq, tmp_path):
    """The int8 path on the real backbone: every block fused, descriptors kept (cosine >= 0.99)."""
    fp32 = real_encoder.model_path
    int8 = tmp_path / "int8.onnx"
    quant = convert_precision(fp32, int8, "int8")
    depth = json.loads(fp32.with_suffix(".json").read_text())["architecture"]["backbone"]["depth"]
    assert quant["graph_fusions"] == {"attention": depth, "gelu": depth, "layer_scale": 2 * depth}
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
