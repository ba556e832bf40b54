"""`megaloc-ros export`: MegaLoc (or an offline DINOv2 backbone) -> ONNX, checked, with a sidecar.

The exported graph takes ``image`` [B, 3, H, W] (ImageNet-normalised RGB, dynamic batch) and
returns ``descriptor`` [B, D] (L2-normalised) and, unless disabled, ``patch_features``
[B, h, w, C] (the backbone's final-norm patch tokens, so verification needs no second pass).
Next to ``FILE.onnx`` a ``FILE.json`` sidecar records input size, normalisation, output names and
sizes, the weights hash and the error measured against PyTorch on real images; the Encoder
reads it.

The output's suffix picks the runtime: ``.onnx`` for ONNX Runtime (TensorRT, CUDA, CPU; int8 is
dynamic quantisation), ``.xml`` for OpenVINO on x86 CPUs (an IR ``FILE.xml`` + ``FILE.bin``;
int8 is static post-training quantisation with NNCF, calibrated on real images: the fastest
CPU variant, see `megaloc-ros bench encoder`).

Export uses the dynamo exporter at opset 18 (the TorchScript exporter cannot trace the
resize-to-multiple-of-14 branch); torch.export specialises a batch of 1, so the example batch is 2.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import numpy as np

from megaloc_ros.encoding import require_torch

# before anything that imports torch: one clear line when it is missing
torch = require_torch("`megaloc-ros export`")
from torch import nn

from megaloc_ros.encoding.cache import cache_root
from megaloc_ros.encoding.model.megaloc import MegaLoc
from megaloc_ros.encoding.model.offline import BackboneDescriptor
from megaloc_ros.encoding.model.weights import model_from_weights
from megaloc_ros.encoding.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess
from megaloc_ros.encoding.sidecar import SIDECAR_FORMAT, sidecar_path, write_sidecar
from megaloc_ros.errors import WeightsError
from megaloc_ros.io.files import atomic_write, file_sha256

OFFICIAL_URL = "https://huggingface.co/gberton/MegaLoc/resolve/main/model.safetensors"
PRECISIONS = ("fp32", "fp16", "int8")


class _ExportHead(nn.Module):
    def __init__(self, model: nn.Module, with_patches: bool):
        super().__init__()
        self.model, self.with_patches = model, with_patches

    def forward(self, image: torch.Tensor):
        desc, patches = self.model.forward_features(image)
        return (desc, patches) if self.with_patches else desc


def export_onnx(model: nn.Module, output: str | Path, height: int, width: int,
                with_patches: bool = True, opset: int = 18) -> list[str]:
    """Export ``model.forward_features`` to ``output`` (fp32, dynamic batch); returns output names."""
    import logging
    # The exporter warns about torchvision ops it cannot register; they are not used here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    head = _ExportHead(model.eval(), with_patches).eval()
    names = ["descriptor", "patch_features"] if with_patches else ["descriptor"]
    example = torch.zeros(2, 3, height, width)
    batch = torch.export.Dim("batch", min=1, max=1024)
    import warnings
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch-internal deprecations
        program = torch.onnx.export(head, (example,), dynamo=True, opset_version=opset,
                                    input_names=["image"], output_names=names,
                                    dynamic_shapes=({0: batch},), verbose=False)
    program.optimize()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(output))
    return names


INT8_METHOD = {
    "method": "onnxruntime.quantization.quantize_dynamic on a fused graph",
    "weights": "int8, per output channel (every MatMul with a constant weight)",
    "activations": "uint8, per tensor, range taken at run time for each image",
    "kept_fp32": "attention softmax and score/value products (com.microsoft MultiHeadAttention), "
                 "GELU, LayerNorm, the patch-embedding convolution, the aggregation arithmetic "
                 "(SALAD's Sinkhorn, L2 normalisations); linear layers of SALAD and the head are int8",
}


OPENVINO_INT8_METHOD = {
    "method": "NNCF post-training static quantisation of the OpenVINO IR (transformer preset)",
    "weights": "int8, symmetric, per output channel (MatMul and convolution weights)",
    "activations": "int8, per tensor, ranges measured on the calibration images (also the "
                   "attention score/value products)",
    "smooth_quant": "off: on the DINOv2 ViT-S/14 it lowered the descriptor cosine to fp32 from "
                    "0.993 to 0.936 (min over the shipped real frames)",
    "kept_fp32": "softmax, GELU, LayerNorm, the aggregation arithmetic (SALAD's Sinkhorn, L2 "
                 "normalisations): OpenVINO runs them in fp32",
}
OPENVINO_VERSION = 1  # bump when quantize_openvino changes what it writes (bench caches its outputs)

CPU_FUSIONS_VERSION = 2  # bump when fuse_for_cpu changes what it writes (bench caches its outputs)


def fuse_for_cpu(model) -> dict:
    """Rewrite the exported ViT graph in place for ONNX Runtime's CPU kernels; returns counts.

    - attention: qkv MatMul -> reshape/permute/unbind -> QK^T*scale -> softmax -> @V -> merge
      heads becomes three weight MatMuls (q, k, v: what int8 quantises) feeding
      com.microsoft.MultiHeadAttention (one fused kernel instead of ~17 small ops and 5-D
      transposes);
    - gelu: the exported erf formula (Div, Erf, Add, Mul, Mul) becomes com.microsoft.Gelu (exact erf);
    - layer_scale: MatMul -> Add(bias) -> Mul(gamma) folds gamma into the weight and bias columns.
    All three are exact rewrites (ONNX Runtime's own optimiser and onnxruntime.transformers do
    not recognise the patterns the dynamo exporter emits)."""
    from onnx import helper, numpy_helper
    g = model.graph
    inits = {i.name: i for i in g.initializer}

    def const(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def made_by(name, op):
        n = producer.get(name)
        return n if n is not None and n.op_type == op else None

    def sole_user(name, op):
        c = consumers.get(name, [])
        return c[0] if len(c) == 1 and c[0].op_type == op else None

    def perm(n):
        return [list(a.ints) for a in n.attribute if a.name == "perm"][0]

    replace, drop, new_inits = {}, set(), []
    counts = {"attention": 0, "gelu": 0, "layer_scale": 0}
    for sm in [n for n in g.node if n.op_type == "Softmax"]:
        mul = made_by(sm.input[0], "Mul")
        qk = made_by(mul.input[0], "MatMul") if mul is not None else None
        scale = const(mul.input[1]) if mul is not None else None
        if qk is None or scale is None or scale.size != 1:
            continue
        sq_q, kt = made_by(qk.input[0], "Squeeze"), made_by(qk.input[1], "Transpose")
        sq_k = made_by(kt.input[0], "Squeeze") if kt is not None and perm(kt) == [0, 1, 3, 2] else None
        av = sole_user(sm.output[0], "MatMul")
        sq_v = made_by(av.input[1], "Squeeze") if av is not None else None
        if sq_q is None or sq_k is None or sq_v is None:
            continue
        slices = [made_by(s.input[0], "Slice") for s in (sq_q, sq_k, sq_v)]
        # q, k, v = the 3-axis (axis 0 after the permute) taken at 0, 1, 2
        if any(s is None for s in slices) or len({s.input[0] for s in slices}) != 1 or any(
                len(s.input) < 4 or const(s.input[1]) is None or int(const(s.input[1]).ravel()[0]) != i
                or const(s.input[3]) is None or int(const(s.input[3]).ravel()[0]) != 0
                for i, s in enumerate(slices)):
            continue
        heads_first = made_by(slices[0].input[0], "Transpose")
        rs = made_by(heads_first.input[0], "Reshape") if heads_first is not None and \
            perm(heads_first) == [2, 0, 3, 1, 4] else None
        shape = const(rs.input[1]) if rs is not None else None
        if shape is None or shape.size != 5 or int(shape[2]) != 3:
            continue
        heads, head_dim = int(shape[3]), int(shape[4])
        bias_add = made_by(rs.input[0], "Add")
        qkv = made_by(bias_add.input[0], "MatMul") if bias_add is not None else None
        w = const(qkv.input[1]) if qkv is not None else None
        b = const(bias_add.input[1]) if bias_add is not None else None
        if w is None or b is None or w.shape[-1] != 3 * heads * head_dim or b.shape != (w.shape[-1],):
            continue
        merge_t = sole_user(av.output[0], "Transpose")
        merge = sole_user(merge_t.output[0], "Reshape") if merge_t is not None and perm(merge_t) == [0, 2, 1, 3] else None
        if merge is None:
            continue
        k, c = counts["attention"], heads * head_dim
        qkv_out = []
        for j, part in enumerate("qkv"):
            name = f"fused_attention_{k}_{part}"
            # one MatMul each (not one + Split): int8 then quantises the input once for all three
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(w[:, j * c:(j + 1) * c]), name + "_weight"))
            replace.setdefault(id(qkv), []).append(
                helper.make_node("MatMul", [qkv.input[0], name + "_weight"], [name], name=name))
            qkv_out.append(name)
        # the qkv bias goes in as MultiHeadAttention's bias input ([3 * hidden])
        replace[id(qkv)].append(
            helper.make_node("MultiHeadAttention", [*qkv_out, bias_add.input[1]], [merge.output[0]],
                             name=f"fused_attention_{k}", domain="com.microsoft",
                             num_heads=heads, scale=float(scale.ravel()[0])))
        drop.update(id(n) for n in (qkv, bias_add, rs, heads_first, *slices, sq_q, sq_k, sq_v, kt, qk, mul,
                                    sm, av, merge_t, merge))
        counts["attention"] += 1

    for erf in [n for n in g.node if n.op_type == "Erf"]:
        div = made_by(erf.input[0], "Div")
        one = sole_user(erf.output[0], "Add")
        half = sole_user(one.output[0], "Mul") if one is not None else None
        out = sole_user(half.output[0], "Mul") if half is not None else None
        if div is None or out is None or div.input[0] not in out.input or \
                not np.isclose(float(const(div.input[1]) if div.input[1] in inits else 0), np.sqrt(2), rtol=1e-4):
            continue
        replace[id(div)] = [helper.make_node("Gelu", [div.input[0]], [out.output[0]], domain="com.microsoft",
                                             name=f"fused_gelu_{counts['gelu']}")]
        drop.update(id(n) for n in (erf, one, half, out))
        counts["gelu"] += 1

    for mul in [n for n in g.node if n.op_type == "Mul" and id(n) not in drop]:
        gamma = const(mul.input[1])
        add = made_by(mul.input[0], "Add")
        mm = made_by(add.input[0], "MatMul") if add is not None else None
        if gamma is None or mm is None or gamma.ndim != 1 or id(mm) in replace or id(add) in drop or \
                len(consumers.get(add.output[0], [])) != 1 or len(consumers.get(mm.output[0], [])) != 1:
            continue
        w, b = const(mm.input[1]), const(add.input[1])
        if w is None or b is None or w.ndim != 2 or w.shape[1] != gamma.size or b.shape != gamma.shape or \
                len(consumers[mm.input[1]]) != 1 or len(consumers[add.input[1]]) != 1:
            continue
        inits[mm.input[1]].CopyFrom(numpy_helper.from_array((w * gamma).astype(w.dtype), mm.input[1]))
        inits[add.input[1]].CopyFrom(numpy_helper.from_array((b * gamma).astype(b.dtype), add.input[1]))
        add.output[0] = mul.output[0]
        drop.add(id(mul))
        counts["layer_scale"] += 1

    nodes = []
    for n in g.node:
        nodes.extend(replace.get(id(n), [] if id(n) in drop else [n]))
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    keep = [i for i in [*g.initializer, *new_inits] if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    if counts["attention"] or counts["gelu"]:
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return counts


def convert_precision(fp32_path: Path, output: Path, precision: str) -> dict:
    """fp16: weights and compute in half, fp32 inputs/outputs kept. int8: the graph fused for
    ONNX Runtime's CPU kernels (`fuse_for_cpu`), then dynamic quantisation (`INT8_METHOD`).
    Returns what goes into the sidecar's ``quantization`` entry ({} for fp16)."""
    import onnx
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        m = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
        onnx.save(m, str(output))
        return {}
    if precision == "int8":
        import logging
        from onnxruntime.quantization import QuantType, quantize_dynamic
        m = onnx.load(str(fp32_path))
        fusions = fuse_for_cpu(m)
        fused = output.with_name(output.stem + ".fused.onnx")
        root, level = logging.getLogger(), logging.getLogger().level
        try:
            onnx.save(m, str(fused))
            del m
            # it suggests shape-inference pre-processing, which changes nothing for these graphs
            root.setLevel(max(level, logging.ERROR))
            quantize_dynamic(str(fused), str(output), op_types_to_quantize=["MatMul"],
                             weight_type=QuantType.QInt8, per_channel=True)
        finally:
            root.setLevel(level)
            fused.unlink(missing_ok=True)
        return {**INT8_METHOD, "graph_fusions": fusions, "fusions_version": CPU_FUSIONS_VERSION}
    raise ValueError(precision)


def calibration_images(source: str | Path | None = None, limit: int = 128) -> list[np.ndarray]:
    """Images for static int8 calibration: every image file under ``source`` (your robot's
    frames calibrate best), else the shipped corridor reference session (111 real frames; the
    rtabmap sequence and the corridor query session stay held out for the agreement figures)."""
    from megaloc_ros.io import datasets
    from megaloc_ros.io.images import read_image_file
    if source is None:
        seq = datasets.corridor()
        picks = np.flatnonzero(seq.sessions == 0)
        return [seq.load_rgb(int(i)) for i in picks[:: max(1, len(picks) // limit)][:limit]]
    root = Path(source)
    files = sorted(p for p in (root.rglob("*") if root.is_dir() else [root])
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm"))
    if not files:
        raise WeightsError(f"no calibration images (.jpg/.png/.bmp/.pgm/.ppm) under {root}")
    return [read_image_file(p) for p in files[:: max(1, len(files) // limit)][:limit]]


def quantize_openvino(fp32_onnx: Path, output_xml: Path, calibration: np.ndarray) -> dict:
    """fp32 ONNX -> OpenVINO IR with static int8 (NNCF), calibrated on ``calibration``
    (preprocessed [N, 3, H, W]). Returns the sidecar's ``quantization`` entry."""
    try:
        import nncf
        import openvino as ov
        from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                           AdvancedSmoothQuantParameters)
    except ImportError as exc:
        raise WeightsError(f"OpenVINO int8 needs `pip install openvino nncf` ({exc})") from exc
    import logging
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.WARNING)  # one INFO line per node otherwise
    try:
        model = ov.Core().read_model(str(fp32_onnx))
        data = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
        quantized = nncf.quantize(
            model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
            advanced_parameters=AdvancedQuantizationParameters(
                smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)))
    finally:
        nncf_log.setLevel(level)
    ov.save_model(quantized, str(output_xml), compress_to_fp16=False)
    return {**OPENVINO_INT8_METHOD, "calibration_images": int(len(calibration)),
            "openvino": ov.__version__, "nncf": nncf.__version__, "recipe_version": OPENVINO_VERSION}


def _check_openvino_precision(precision: str) -> None:
    if precision not in ("fp32", "int8"):
        raise WeightsError(f"OpenVINO export supports fp32 and int8, not {precision} "
                           "(fp16 is for GPUs: export .onnx and run it with TensorRT)")


def convert_openvino(fp32_onnx: Path, output_xml: Path, precision: str,
                     calibration: np.ndarray | None = None) -> dict:
    """fp32 ONNX -> OpenVINO IR (``output_xml`` + its ``.bin``): fp32 as is, or int8."""
    if precision == "int8":
        if calibration is None or not len(calibration):
            raise WeightsError("OpenVINO int8 needs calibration images")
        return quantize_openvino(fp32_onnx, output_xml, calibration)
    _check_openvino_precision(precision)
    try:
        import openvino as ov
    except ImportError as exc:
        raise WeightsError(f"an OpenVINO export needs `pip install openvino` ({exc})") from exc
    ov.save_model(ov.Core().read_model(str(fp32_onnx)), str(output_xml), compress_to_fp16=False)
    return {}


def install_model(src: Path, output: Path) -> None:
    """Move a built model into place (an OpenVINO IR's .bin before its .xml, so a reader that
    sees the .xml finds its weights)."""
    if src.suffix == ".xml":
        os.replace(src.with_suffix(".bin"), output.with_suffix(".bin"))
    os.replace(src, output)


def run_model(path: Path):
    """A plain CPU runner for an exported file: ``f(batch) -> list of outputs`` (checks, tests)."""
    if Path(path).suffix == ".xml":
        import openvino as ov
        compiled = ov.Core().compile_model(str(path), "CPU")
        return lambda x: [v.copy() for v in compiled(x).values()]
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {sess.get_inputs()[0].name: x})


def real_check_images(n: int = 4) -> list[np.ndarray]:
    """A few real frames from the shipped data sets (both sequences)."""
    from megaloc_ros.io import datasets
    seqs = [datasets.rtabmap(), datasets.corridor()]
    picks = [(seqs[0], 0), (seqs[0], 50), (seqs[1], 10), (seqs[1], 150), (seqs[0], 20), (seqs[1], 60)]
    return [s.load_rgb(i) for s, i in picks[:n]]


def compare_with_torch(model: nn.Module, onnx_path: Path, images: np.ndarray,
                       with_patches: bool) -> dict:
    """Max abs difference and min cosine of the exported model (CPU) vs PyTorch on ``images``."""
    got = run_model(onnx_path)(images)
    with torch.no_grad():
        desc, patches = model.forward_features(torch.from_numpy(images))
    ref = [desc.numpy()] + ([patches.numpy()] if with_patches else [])
    cos = np.sum(got[0] * ref[0], axis=1) / (np.linalg.norm(got[0], axis=1) * np.linalg.norm(ref[0], axis=1))
    out = {"images": int(images.shape[0]),
           "descriptor_max_abs_diff": float(np.abs(got[0] - ref[0]).max()),
           "descriptor_min_cosine": float(cos.min())}
    if with_patches:
        out["patch_features_max_abs_diff"] = float(np.abs(got[1] - ref[1]).max())
    return out


def export_model(model: nn.Module, output: str | Path, *, height: int = 322, width: int = 322,
                 precision: str = "fp32", with_patches: bool = True, model_name: str = "megaloc",
                 kind: str = "megaloc", weights_path: str | Path | None = None,
                 weights_sha256: str | None = None, check_images: int = 4,
                 calibration: str | Path | None = None, log=print) -> dict:
    """Export, convert precision, check the result against PyTorch on real images, write the
    sidecar; returns the sidecar dict. ``output`` ending in .xml gives an OpenVINO IR
    (``calibration``: images for its int8, see `calibration_images`)."""
    if precision not in PRECISIONS:
        raise WeightsError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    output = Path(output)
    if output.suffix not in (".onnx", ".xml"):
        raise WeightsError(f"output {output} must end in .onnx (ONNX Runtime) or .xml (OpenVINO IR)")
    runtime = "openvino" if output.suffix == ".xml" else "onnxruntime"
    if runtime == "openvino":
        _check_openvino_precision(precision)  # before the export, which takes minutes
    output.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # Build next to the target and rename at the end, so a reader never sees half a model.
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".export-") as tmp:
        fp32 = Path(tmp) / "model_fp32.onnx"
        names = export_onnx(model, fp32, height, width, with_patches)
        final, quant = fp32, {}
        if runtime == "openvino":
            final = Path(tmp) / f"model_{precision}.xml"
            calib = (preprocess(calibration_images(calibration), (height, width))
                     if precision == "int8" else None)
            quant = convert_openvino(fp32, final, precision, calib)
        elif precision != "fp32":
            final = Path(tmp) / f"model_{precision}.onnx"
            quant = convert_precision(fp32, final, precision)
        export_s = time.perf_counter() - t0
        imgs = preprocess(real_check_images(check_images), (height, width)) if check_images else None
        check = compare_with_torch(model, final, imgs, with_patches) if imgs is not None else {}
        with torch.no_grad():
            desc, patches = model.forward_features(torch.zeros(1, 3, height, width))
        meta = {
            "format": SIDECAR_FORMAT,
            "model_name": model_name,
            "kind": kind,
            "architecture": _architecture(model),
            "precision": precision,
            "runtime": runtime,
            "input": {"name": "image", "height": height, "width": width, "layout": "NCHW", "channels": "RGB",
                      "scale": 1.0 / 255.0, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                      "resize": "bilinear, antialiased, to height x width"},
            "outputs": {"descriptor": {"name": names[0], "dim": int(desc.shape[-1])}},
            "weights": {"path": str(weights_path) if weights_path else None,
                        "sha256": weights_sha256 or (file_sha256(weights_path) if weights_path else None)},
            "check_vs_pytorch": check,
            **({"quantization": quant} if quant else {}),
            "exported_with": {"torch": torch.__version__, "opset": 18, "seconds": round(export_s, 1)},
        }
        if with_patches:
            meta["outputs"]["patch_features"] = {"name": names[1], "shape": list(patches.shape[1:])}
        install_model(final, output)
    write_sidecar(output, meta)
    if check:
        log(f"checked {runtime} vs PyTorch on {check['images']} real images: descriptor max |diff| "
            f"{check['descriptor_max_abs_diff']:.2e}, min cosine {check['descriptor_min_cosine']:.6f}")
    return meta


def _architecture(model: nn.Module) -> dict:
    if isinstance(model, MegaLoc):
        c = model.cfg
        return {"backbone": asdict(c.vit), "aggregator": "SALAD", "num_clusters": c.num_clusters,
                "cluster_dim": c.cluster_dim, "token_dim": c.token_dim, "feat_dim": c.feat_dim}
    if isinstance(model, BackboneDescriptor):
        return {"backbone": asdict(model.backbone.cfg),
                "descriptor_pooling": model.pooling}
    return {"class": type(model).__name__}


def download_official(dest: Path) -> Path:
    """The official ``model.safetensors`` from Hugging Face, or a WeightsError saying what to do."""
    if dest.is_file():
        return dest
    url = os.environ.get("MEGALOC_WEIGHTS_URL", OFFICIAL_URL)  # e.g. a local mirror
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading the official MegaLoc weights from {url}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=30) as r, atomic_write(dest) as f:
            while block := r.read(1 << 22):
                f.write(block)
    except OSError as exc:
        raise WeightsError(
            f"cannot download the MegaLoc weights from {url} ({exc}). On a machine with internet, fetch "
            f"{OFFICIAL_URL} (Hugging Face repo gberton/MegaLoc, file model.safetensors), copy it here "
            f"and run `megaloc-ros export --weights model.safetensors --output megaloc.onnx`; or "
            f"export the offline DINOv2 backbone: `megaloc-ros export --weights {cache_root() / 'weights' / 'vit_s_focus.onnx'} "
            f"--output dinov2_vits14.onnx`") from exc
    return dest


def add_arguments(p) -> None:
    p.add_argument("--weights", help="model.safetensors (official), megaloc.torch (legacy), or a DINOv2 "
                   "backbone in Hugging Face naming (.safetensors or .onnx) for the offline descriptor; "
                   "default: download the official MegaLoc weights")
    p.add_argument("--height", type=int, default=322)
    p.add_argument("--width", type=int, default=322)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--no-patch-features", action="store_true", help="export the global descriptor only")
    p.add_argument("--check-images", type=int, default=4, help="real images for the PyTorch comparison (0: skip)")
    p.add_argument("--calibration", help="images (a directory) for OpenVINO int8 calibration, ideally "
                   "frames of your own robot; default: the shipped corridor reference frames")
    p.add_argument("--output", required=True, help="FILE.onnx for ONNX Runtime (TensorRT/CUDA/CPU) or FILE.xml "
                   "for OpenVINO (x86 CPUs; int8 is the fastest CPU variant); a FILE.json sidecar is "
                   "written next to it")


def main(args) -> int:
    weights = Path(args.weights) if args.weights else download_official(cache_root() / "weights" / "megaloc.safetensors")
    model, kind, name = model_from_weights(weights)
    if kind != "megaloc":
        print(f"note: {weights} is a plain DINOv2 backbone, not MegaLoc: exporting the training-free "
              f"offline descriptor ({name})", file=sys.stderr)
    meta = export_model(model, args.output, height=args.height, width=args.width, precision=args.precision,
                        with_patches=not args.no_patch_features, model_name=name, kind=kind,
                        weights_path=weights, check_images=args.check_images,
                        calibration=args.calibration)
    outs = ", ".join(f"{k} {v.get('dim', v.get('shape'))}" for k, v in meta["outputs"].items())
    print(f"wrote {args.output} ({name}, {args.precision}, {args.height}x{args.width}; outputs: {outs}) "
          f"and {sidecar_path(args.output)}")
    return 0
