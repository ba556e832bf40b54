"""The image encoder: RGB images -> ImageFeatures (global descriptor + dense patch features).

Runs an exported model (``.onnx`` / OpenVINO ``.xml`` with its ``.json`` sidecar, see
`megaloc-ros export`; which one: encoding/loader.py). ONNX Runtime prefers TensorRT (fp16,
engine cache under ``<cache>/trt/``) -> CUDA -> CPU; an OpenVINO IR (e.g. the static int8 CPU
variant) runs with OpenVINO on the CPU; ``backend="torch"`` (or a missing onnxruntime) runs the
PyTorch model from the weights the sidecar names (that backend alone needs PyTorch).
Preprocessing is the official evaluation's (encoding/preprocess.py, numpy).
"""
from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from megaloc_ros.encoding.cache import cache_root
from megaloc_ros.encoding.preprocess import preprocess
from megaloc_ros.encoding.sidecar import read_sidecar
from megaloc_ros.errors import WeightsError
from megaloc_ros.io.files import atomic_write
from megaloc_ros.types import ImageFeatures

log = logging.getLogger("megaloc_ros.encoding.encoder")


def _providers(device: str) -> list:
    import onnxruntime as ort
    available = set(ort.get_available_providers())
    trt_cache = cache_root() / "trt"
    wanted = {"auto": ["tensorrt", "cuda", "cpu"], "tensorrt": ["tensorrt", "cuda", "cpu"],
              "cuda": ["cuda", "cpu"], "gpu": ["tensorrt", "cuda", "cpu"], "cpu": ["cpu"]}.get(device)
    if wanted is None:
        raise WeightsError(f"unknown device {device!r}: use auto, cpu, cuda or tensorrt")
    out = []
    for w in wanted:
        if w == "tensorrt" and "TensorrtExecutionProvider" in available:
            trt_cache.mkdir(parents=True, exist_ok=True)
            out.append(("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                                      "trt_engine_cache_path": str(trt_cache),
                                                      "trt_timing_cache_enable": True}))
        elif w == "cuda" and "CUDAExecutionProvider" in available:
            out.append("CUDAExecutionProvider")
        elif w == "cpu":
            out.append("CPUExecutionProvider")
    if device in ("cuda", "tensorrt", "gpu") and len(out) == 1:
        log.warning("device %r requested but this onnxruntime has no GPU provider (%s): running on CPU",
                    device, ", ".join(sorted(available)))
    return out


def onnx_session(path, device: str = "auto", threads: int = 0):
    """An ONNX Runtime session for the model at ``path`` on the providers for ``device``
    (TensorRT / CUDA / CPU), all graph optimisations on; ``threads`` 0: ONNX Runtime's default."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle worker threads sleep instead of spin-waiting: on 2 cores shared with other processes
    # (a robot's other nodes; here, two test workers) spinning threads take the CPU from the
    # ones with work. Encoding the 84 rtabmap frames one at a time at 224 (offline ViT-S/14, a
    # scratch timing loop): 13.7-16.5 s spinning vs 10.5-12.4 s not, alone; 34 vs 24 s each with
    # two such processes at once. `megaloc-ros bench encoder --skip-torch --images 12
    # --agreement-images -1` at 322, both in a row: ORT fp32 259 -> 241 ms, int8 180 -> 184 ms.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=_providers(device))


class Encoder:
    """Runs an exported model. ``encode(list of RGB uint8 HxWx3) -> list[ImageFeatures]``."""

    def __init__(self, model_path: str | Path, device: str = "auto", batch_size: int = 8,
                 backend: str = "auto", threads: int | None = None, inference_precision: str = "f32"):
        """``inference_precision`` (OpenVINO only): "f32", or "bf16" to run the float parts in
        bfloat16 on CPUs that have it (AVX512-BF16, AMX)."""
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise WeightsError(f"model {self.model_path} does not exist")
        self.meta = read_sidecar(self.model_path)
        self.model_name: str = self.meta["model_name"]
        self.kind: str = self.meta.get("kind", "megaloc")
        self.precision: str = self.meta.get("precision", "fp32")
        inp = self.meta["input"]
        self.input_name: str = inp["name"]
        self.input_size: tuple[int, int] = (int(inp["height"]), int(inp["width"]))
        self.mean, self.std = tuple(inp["mean"]), tuple(inp["std"])
        outs = self.meta["outputs"]
        self.descriptor_dim: int = int(outs["descriptor"]["dim"])
        self.has_patch_features = "patch_features" in outs
        self.patch_grid: tuple[int, int] | None = (tuple(outs["patch_features"]["shape"][:2])
                                                  if self.has_patch_features else None)
        self.patch_dim: int | None = outs["patch_features"]["shape"][2] if self.has_patch_features else None
        self.batch_size = max(1, int(batch_size))
        # Identifies the exact model (weights, size, precision) for feature caches.
        sidecar = self.model_path.with_suffix(".json").read_bytes()
        if inference_precision != "f32":  # same file, other arithmetic: other features
            sidecar += inference_precision.encode()
        self.model_id = hashlib.sha256(sidecar).hexdigest()[:16]
        if backend == "auto" and self.model_path.suffix == ".xml":
            backend = "openvino"
        if backend == "auto":
            try:
                import onnxruntime  # noqa: F401
                backend = "onnxruntime"
            except ImportError:
                backend = "torch"
        self.backend = backend
        if backend == "onnxruntime":
            self._session = onnx_session(self.model_path, device, threads)
            self.providers = self._session.get_providers()
            self._outputs = [outs["descriptor"]["name"]] + ([outs["patch_features"]["name"]]
                                                             if self.has_patch_features else [])
        elif backend == "openvino":
            self._init_openvino(device, threads, inference_precision)
        elif backend == "torch":
            self._torch_model = self._load_torch_model(device)
            self.providers = [f"torch:{self._torch_device}"]
        else:
            raise WeightsError(f"unknown backend {backend!r}: use auto, onnxruntime, openvino or torch")

    def _init_openvino(self, device: str, threads: int | None, inference_precision: str) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise WeightsError(f"{self.model_path} is an OpenVINO IR: `pip install openvino` ({exc})") from exc
        if self.model_path.suffix != ".xml" or not self.model_path.with_suffix(".bin").is_file():
            raise WeightsError(f"{self.model_path}: an OpenVINO IR is FILE.xml with FILE.bin next to it")
        if device not in ("auto", "cpu"):
            log.warning("device %r requested for an OpenVINO IR: it runs on the CPU", device)
        # Latency mode: one image at a time through all cores, as a camera node feeds it.
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": inference_precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self._compiled = ov.Core().compile_model(str(self.model_path), "CPU", config)
        except RuntimeError as exc:
            raise WeightsError(f"OpenVINO cannot load {self.model_path}: {str(exc).splitlines()[0]}") from exc
        self._request = self._compiled.create_infer_request()
        self._request_lock = threading.Lock()  # an infer request serves one caller at a time
        self._ov_outputs = [self._compiled.output(self.meta["outputs"]["descriptor"]["name"])] + (
            [self._compiled.output(self.meta["outputs"]["patch_features"]["name"])] if self.has_patch_features else [])
        self.providers = ["OpenVINO:CPU" + ("" if inference_precision == "f32" else f":{inference_precision}")]

    def _load_torch_model(self, device: str):
        from megaloc_ros.encoding import require_torch
        torch = require_torch("the Encoder's torch backend (or install onnxruntime)")
        from megaloc_ros.encoding.model.weights import model_from_weights
        wpath = self.meta.get("weights", {}).get("path")
        if not wpath or not Path(wpath).is_file():
            raise WeightsError(f"torch backend needs the source weights named in the sidecar ({wpath}), not found")
        model, _, _ = model_from_weights(wpath)
        self._torch_device = "cuda" if device in ("auto", "cuda", "gpu") and torch.cuda.is_available() else "cpu"
        return model.to(self._torch_device).eval()

    @property
    def description(self) -> str:
        what = ("MegaLoc" if self.kind == "megaloc"
                else "the offline DINOv2 ViT-S/14 backbone with a training-free descriptor, NOT MegaLoc")
        return (f"{self.model_name}: {what}; {self.descriptor_dim}-D descriptor, input "
                f"{self.input_size[0]}x{self.input_size[1]}, {self.precision}, {self.backend} "
                f"[{', '.join(self.providers)}], {self.model_path}")

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Preprocessed [B, 3, H, W] -> (descriptors [B, D], patch features [B, h, w, C] or None)."""
        if self.backend == "onnxruntime":
            res = self._session.run(self._outputs, {self.input_name: batch})
            return res[0], (res[1] if self.has_patch_features else None)
        if self.backend == "openvino":
            with self._request_lock:
                res = self._request.infer({self.input_name: batch})
                # copies: the request reuses its output buffers on the next call
                out = [np.array(res[o]) for o in self._ov_outputs]
            return out[0], (out[1] if self.has_patch_features else None)
        import torch
        with torch.no_grad():
            d, p = self._torch_model.forward_features(torch.from_numpy(batch).to(self._torch_device))
        return d.float().cpu().numpy(), p.float().cpu().numpy()

    def encode(self, images: Sequence[np.ndarray]) -> list[ImageFeatures]:
        """RGB uint8 images (any size) -> one ImageFeatures each (unit float32 descriptor)."""
        out: list[ImageFeatures] = []
        for s in range(0, len(images), self.batch_size):
            batch = preprocess(images[s:s + self.batch_size], self.input_size, self.mean, self.std)
            desc, patches = self.run(batch)
            desc = desc.astype(np.float32, copy=False)
            desc = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
            for i in range(desc.shape[0]):
                pf = None if patches is None else np.ascontiguousarray(patches[i], dtype=np.float32)
                out.append(ImageFeatures(descriptor=np.ascontiguousarray(desc[i]), patch_features=pf))
        return out


def encode_files(encoder: Encoder, paths: Sequence[str | Path], cache_dir: Path | None = None,
                 with_patches: bool = True) -> list[ImageFeatures]:
    """Encode image files, caching the result on disk keyed by the model and the files' hashes."""
    from megaloc_ros.io.images import read_image_file
    h = hashlib.sha256(encoder.model_id.encode())
    for p in paths:
        h.update(hashlib.sha256(Path(p).read_bytes()).digest())
    cache_dir = Path(cache_dir) if cache_dir else cache_root() / "features"
    cache = cache_dir / f"{encoder.model_name}-{h.hexdigest()[:20]}{'' if with_patches else '-nopatch'}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                desc = z["descriptors"]
                pf = z["patch_features"] if "patch_features" in z.files else None
            return [ImageFeatures(desc[i], None if pf is None else pf[i]) for i in range(len(desc))]
        except (OSError, ValueError, KeyError):
            log.warning("feature cache %s unreadable; recomputing", cache)
    feats: list[ImageFeatures] = []
    for s in range(0, len(paths), encoder.batch_size):
        feats += encoder.encode([read_image_file(p) for p in paths[s:s + encoder.batch_size]])
    if not with_patches:
        feats = [ImageFeatures(f.descriptor, None) for f in feats]
    arrays = {"descriptors": np.stack([f.descriptor for f in feats])}
    if with_patches and feats and feats[0].patch_features is not None:
        arrays["patch_features"] = np.stack([f.patch_features for f in feats])
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(cache) as f:
        np.savez(f, **arrays)
    return feats
