"""`megaloc-ros export`: MegaLoc (or an offline DINOv2 backbone) -> ONNX, checked, with a sidecar.

The exported graph takes ``image`` [B, 3, H, W] (ImageNet-normalised RGB, dynamic batch) and
returns ``descriptor`` [B, D] (L2-normalised) and, unless disabled, ``patch_features``
[B, h, w, C] (the backbone's final-norm patch tokens, so verification needs no second pass).
Next to ``FILE.onnx`` a ``FILE.json`` sidecar records input size, normalisation, output names and
sizes, the weights hash and the error measured against PyTorch on real images; the Encoder
reads it.

Export uses the dynamo exporter at opset 18 (the TorchScript exporter cannot trace the
resize-to-multiple-of-14 branch); torch.export specialises a batch of 1, so the example batch is 2.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import WeightsError
from .model.megaloc import MegaLoc
from .model.offline import BackboneDescriptor
from .model.weights import file_sha256, load_dinov2_backbone, load_megaloc, megaloc_layout, read_tensors
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess

SIDECAR_FORMAT = "megaloc-ros-encoder/1"
OFFICIAL_URL = "https://huggingface.co/gberton/MegaLoc/resolve/main/model.safetensors"
PRECISIONS = ("fp32", "fp16", "int8")


class _ExportHead(nn.Module):
    def __init__(self, model: nn.Module, with_patches: bool):
        super().__init__()
        self.model, self.with_patches = model, with_patches

    def forward(self, image: torch.Tensor):
        desc, patches = self.model.forward_features(image)
        return (desc, patches) if self.with_patches else desc


def sidecar_path(onnx_path: str | Path) -> Path:
    return Path(onnx_path).with_suffix(".json")


def read_sidecar(onnx_path: str | Path) -> dict:
    p = sidecar_path(onnx_path)
    if not p.is_file():
        raise WeightsError(f"{onnx_path} has no sidecar {p.name}; re-export it with `megaloc-ros export`")
    with open(p) as f:
        meta = json.load(f)
    if meta.get("format") != SIDECAR_FORMAT:
        raise WeightsError(f"{p} is not a {SIDECAR_FORMAT} sidecar (format={meta.get('format')!r})")
    return meta


def model_from_weights(path: str | Path) -> tuple[nn.Module, str, str]:
    """(model, kind, model_name): MegaLoc for MegaLoc checkpoints, else the offline descriptor on
    a DINOv2 backbone (kind 'dinov2-offline')."""
    layout = megaloc_layout(read_tensors(path))
    if layout in ("official", "legacy"):
        return load_megaloc(path), "megaloc", "megaloc"
    if layout == "hf_dinov2":
        vit = load_dinov2_backbone(path)
        size = {384: "vits14", 768: "vitb14", 1024: "vitl14", 1536: "vitg14"}.get(vit.embed_dim, f"d{vit.embed_dim}")
        return BackboneDescriptor(vit).eval(), "dinov2-offline", f"dinov2-{size}-offline"
    return load_megaloc(path), "megaloc", "megaloc"  # raises the detailed key error


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


def convert_precision(fp32_path: Path, output: Path, precision: str) -> None:
    """fp16: weights and compute in half, fp32 inputs/outputs kept. int8: dynamic quantisation of
    MatMul weights (per-channel int8), activations quantised at run time."""
    import onnx
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        m = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
        onnx.save(m, str(output))
    elif precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantize_dynamic(str(fp32_path), str(output), op_types_to_quantize=["MatMul"],
                         weight_type=QuantType.QInt8, per_channel=True)
    else:
        raise ValueError(precision)


def real_check_images(n: int = 4) -> list[np.ndarray]:
    """A few real frames from the shipped data sets (both sequences)."""
    from . import datasets
    seqs = [datasets.rtabmap(), datasets.corridor()]
    picks = [(seqs[0], 0), (seqs[0], 50), (seqs[1], 10), (seqs[1], 150), (seqs[0], 20), (seqs[1], 60)]
    return [s.load_rgb(i) for s, i in picks[:n]]


def compare_with_torch(model: nn.Module, onnx_path: Path, images: np.ndarray,
                       with_patches: bool) -> dict:
    """Max abs difference and min cosine of ONNX Runtime (CPU) vs PyTorch on ``images``."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": images})
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
                 weights_sha256: str | None = None, check_images: int = 4, log=print) -> dict:
    """Export, convert precision, check ONNX Runtime against PyTorch on real images, write the
    sidecar; returns the sidecar dict."""
    if precision not in PRECISIONS:
        raise WeightsError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    output = Path(output)
    if output.suffix != ".onnx":
        raise WeightsError(f"output {output} must end in .onnx")
    output.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # Build next to the target and rename at the end, so a reader never sees half a model.
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".export-") as tmp:
        fp32 = Path(tmp) / "model_fp32.onnx"
        names = export_onnx(model, fp32, height, width, with_patches)
        final = fp32
        if precision != "fp32":
            final = Path(tmp) / f"model_{precision}.onnx"
            convert_precision(fp32, final, precision)
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
            "input": {"name": "image", "height": height, "width": width, "layout": "NCHW", "channels": "RGB",
                      "scale": 1.0 / 255.0, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                      "resize": "bilinear, antialiased, to height x width"},
            "outputs": {"descriptor": {"name": names[0], "dim": int(desc.shape[-1])}},
            "weights": {"path": str(weights_path) if weights_path else None,
                        "sha256": weights_sha256 or (file_sha256(weights_path) if weights_path else None)},
            "check_vs_pytorch": check,
            "exported_with": {"torch": torch.__version__, "opset": 18, "seconds": round(export_s, 1)},
        }
        if with_patches:
            meta["outputs"]["patch_features"] = {"name": names[1], "shape": list(patches.shape[1:])}
        os.replace(final, output)
    with open(sidecar_path(output).with_suffix(".json.part"), "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(sidecar_path(output).with_suffix(".json.part"), sidecar_path(output))
    if check:
        log(f"checked ONNX Runtime vs PyTorch on {check['images']} real images: descriptor max |diff| "
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
    part = dest.with_suffix(".part")
    print(f"downloading the official MegaLoc weights from {url}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(part, "wb") as f:
            while block := r.read(1 << 22):
                f.write(block)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise WeightsError(
            f"cannot download the MegaLoc weights from {url} ({exc}). On a machine with internet, fetch "
            f"{OFFICIAL_URL} (Hugging Face repo gberton/MegaLoc, file model.safetensors), copy it here "
            f"and run `megaloc-ros export --weights model.safetensors --output megaloc.onnx`; or "
            f"export the offline DINOv2 backbone: `megaloc-ros export --weights .cache/weights/vit_s_focus.onnx "
            f"--output dinov2_vits14.onnx`") from exc
    os.replace(part, dest)
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
    p.add_argument("--output", required=True, help="FILE.onnx (a FILE.json sidecar is written next to it)")


def main(args) -> int:
    from .encoder import cache_root
    weights = Path(args.weights) if args.weights else download_official(cache_root() / "weights" / "megaloc.safetensors")
    model, kind, name = model_from_weights(weights)
    if kind != "megaloc":
        print(f"note: {weights} is a plain DINOv2 backbone, not MegaLoc: exporting the training-free "
              f"offline descriptor ({name})", file=sys.stderr)
    meta = export_model(model, args.output, height=args.height, width=args.width, precision=args.precision,
                        with_patches=not args.no_patch_features, model_name=name, kind=kind,
                        weights_path=weights, check_images=args.check_images)
    outs = ", ".join(f"{k} {v.get('dim', v.get('shape'))}" for k, v in meta["outputs"].items())
    print(f"wrote {args.output} ({name}, {args.precision}, {args.height}x{args.width}; outputs: {outs}) "
          f"and {sidecar_path(args.output)}")
    return 0
