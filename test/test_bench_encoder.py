"""`megaloc-ros bench encoder` end to end on a small model: every CPU variant timed and compared."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file

from megaloc_ros import cli
from megaloc_ros.bench.encoder import _cpu_flags
from megaloc_ros.encoding.export import export_model
from megaloc_ros.encoding.model.weights import load_megaloc
from test_model import SMALL, official_key_shapes, synthetic_checkpoint


def test_bench_encoder_reports_each_variant_against_ort_fp32(tmp_path, capsys):
    pytest.importorskip("openvino")
    weights = tmp_path / "small.safetensors"
    save_file(synthetic_checkpoint(official_key_shapes(**SMALL), seed=3), str(weights))
    fp32 = tmp_path / "small.onnx"
    export_model(load_megaloc(weights), fp32, check_images=0, weights_path=weights)
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "encoder", "--model", str(fp32), "--images", "2", "--warmup", "1",
                     "--agreement-images", "6", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) >= {"pytorch eager fp32", "onnxruntime fp32 CPU", "ORT fp32 fused CPU",
                         "onnxruntime int8 CPU", "OpenVINO int8 CPU"}
    assert rows["OpenVINO int8 CPU"]["providers"] == "OpenVINO:CPU"
    if "avx512_bf16" in _cpu_flags() or "amx_bf16" in _cpu_flags():
        assert rows["OpenVINO bf16 CPU"]["providers"] == "OpenVINO:CPU:bf16"
        assert rows["OpenVINO bf16 CPU"]["cos_min"] >= 0.999
    base = rows["onnxruntime fp32 CPU"]
    assert base["cos_min"] > 0.9999 and base["top1 same rtabmap"] == 1.0 and base["top1_same_decided"] == 1.0
    for r in rows.values():
        assert r["ms_per_image"] > 0 and 0.9 <= r["cos_mean"] <= 1.0 + 1e-6
    printed = capsys.readouterr().out
    assert "x ORT fp32" in printed and "OpenVINO int8 CPU" in printed and "top1=decid" in printed
    # derived models are cached next to the fp32 file, with sidecars the Encoder reads
    assert (tmp_path / "small-int8-openvino.xml").is_file() and (tmp_path / "small-int8-openvino.json").is_file()
