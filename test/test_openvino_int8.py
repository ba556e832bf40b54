"""The fastest CPU variant: an OpenVINO IR with static int8 (NNCF), exported, checked and encoded."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from safetensors.torch import save_file

from megaloc_ros import cli
from megaloc_ros.bench.encoder import _recall_and_top1
from megaloc_ros.encoding.encoder import Encoder
from megaloc_ros.errors import WeightsError
from megaloc_ros.encoding.export import calibration_images, export_model, quantize_openvino
from megaloc_ros.encoding.model.weights import load_megaloc
from megaloc_ros.encoding.preprocess import preprocess
from test_model import SMALL, official_key_shapes, synthetic_checkpoint

pytest.importorskip("openvino", reason="OpenVINO is part of the project env (tools/requirements/core.txt)")
pytest.importorskip("nncf")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    sd = synthetic_checkpoint(official_key_shapes(**SMALL), seed=5)
    path = tmp_path_factory.mktemp("small") / "model.safetensors"
    save_file(sd, str(path))
    return path


def test_cli_exports_openvino_int8_calibrated_on_given_images(small, tmp_path, rtabmap_seq, corridor_seq):
    """`--output FILE.xml --precision int8 --calibration DIR`: an IR (xml + bin) and a sidecar
    saying how it was quantised; the Encoder runs it with OpenVINO and it tracks fp32."""
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(0, 40, 5):  # the robot's own frames, as a user would pass them
        cv2.imwrite(str(calib / f"{i:03d}.jpg"), rtabmap_seq.load_rgb(i)[:, :, ::-1])
    out = tmp_path / "models" / "small_int8.xml"
    assert cli.main(["export", "--weights", str(small), "--precision", "int8", "--calibration", str(calib),
                     "--check-images", "2", "--output", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".bin").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["small_int8.bin", "small_int8.json", "small_int8.xml"]
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["runtime"] == "openvino" and meta["precision"] == "int8"
    assert "NNCF" in meta["quantization"]["method"] and meta["quantization"]["calibration_images"] == 8
    assert meta["check_vs_pytorch"]["descriptor_min_cosine"] >= 0.99

    fp32 = tmp_path / "small.onnx"
    export_model(load_megaloc(small), fp32, check_images=0)
    enc = Encoder(out, threads=2)
    assert enc.backend == "openvino" and enc.providers == ["OpenVINO:CPU"] and enc.precision == "int8"
    imgs = [rtabmap_seq.load_rgb(i) for i in (50, 70)] + [corridor_seq.load_rgb(i) for i in (120, 200)]
    a, b = Encoder(fp32, device="cpu").encode(imgs), enc.encode(imgs)
    for fa, fb in zip(a, b):
        assert abs(float(np.linalg.norm(fb.descriptor)) - 1.0) < 1e-5
        assert float(fa.descriptor @ fb.descriptor) >= 0.99
        assert fb.patch_features.shape == fa.patch_features.shape
    # batched and single calls agree (the IR keeps the dynamic batch)
    one = enc.encode(imgs[:1])[0].descriptor
    assert np.abs(one - b[0].descriptor).max() < 1e-5


def test_openvino_int8_of_the_real_backbone_keeps_retrieval(real_encoder, rtabmap_seq, tmp_path):
    """Calibrated on the corridor reference frames (the default), checked on rtabmap, which
    calibration never saw: descriptors stay within cosine 0.99 and recall@1 holds."""
    fp32 = real_encoder.model_path
    xml = tmp_path / "int8.xml"
    size = real_encoder.input_size
    quant = quantize_openvino(fp32, xml, preprocess(calibration_images(), size))
    assert quant["calibration_images"] == 111
    meta = json.loads(fp32.with_suffix(".json").read_text())
    meta.update(precision="int8", runtime="openvino", quantization=quant)
    xml.with_suffix(".json").write_text(json.dumps(meta))
    idx = np.arange(len(rtabmap_seq))
    imgs = [rtabmap_seq.load_rgb(int(i)) for i in idx]
    a = np.stack([f.descriptor for f in Encoder(fp32, device="cpu").encode(imgs)])
    b = np.stack([f.descriptor for f in Encoder(xml).encode(imgs)])
    cos = (a * b).sum(1)
    _, r_fp32, _ = _recall_and_top1(a, rtabmap_seq, idx)
    _, r_int8, _ = _recall_and_top1(b, rtabmap_seq, idx)
    print(f"OpenVINO int8 vs fp32 on rtabmap: cosine min {cos.min():.4f}; R@1 {r_fp32:.3f} -> {r_int8:.3f}")
    assert cos.min() >= 0.99
    assert r_int8 >= r_fp32 - 0.03
    assert xml.with_suffix(".bin").stat().st_size < 0.5 * fp32.stat().st_size


def test_openvino_refusals_are_clear(small, real_encoder, tmp_path):
    with pytest.raises(WeightsError, match="fp32 and int8"):
        export_model(load_megaloc(small), tmp_path / "m.xml", precision="fp16", check_images=0)
    with pytest.raises(WeightsError, match="no calibration images"):
        calibration_images(tmp_path)
    # an IR whose weights file went missing: named, not a crash deep inside OpenVINO
    xml = tmp_path / "lonely.xml"
    xml.write_text("<net/>")
    xml.with_suffix(".json").write_text(real_encoder.model_path.with_suffix(".json").read_text())
    with pytest.raises(WeightsError, match="FILE.bin"):
        Encoder(xml)
    with pytest.raises(WeightsError, match=r"\.onnx .* or \.xml"):
        export_model(load_megaloc(small), tmp_path / "m.engine", check_images=0)
