"""The ``.json`` sidecar next to an exported model: input size, normalisation, outputs, weights.

Written by `megaloc-ros export` (encoding/export.py), read by the Encoder; no torch here.
"""
from __future__ import annotations

import json
from pathlib import Path

from megaloc_ros.errors import WeightsError
from megaloc_ros.io.files import atomic_write

SIDECAR_FORMAT = "megaloc-ros-encoder/1"


def sidecar_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


def read_sidecar(model_path: str | Path) -> dict:
    p = sidecar_path(model_path)
    if not p.is_file():
        raise WeightsError(f"{model_path} has no sidecar {p.name}; re-export it with `megaloc-ros export`")
    with open(p) as f:
        meta = json.load(f)
    if meta.get("format") != SIDECAR_FORMAT:
        raise WeightsError(f"{p} is not a {SIDECAR_FORMAT} sidecar (format={meta.get('format')!r})")
    return meta


def write_sidecar(model_path: str | Path, meta: dict) -> Path:
    """Write ``meta`` (its ``format`` set to SIDECAR_FORMAT) next to ``model_path``, atomically."""
    p = sidecar_path(model_path)
    with atomic_write(p, "w") as f:
        json.dump({**meta, "format": SIDECAR_FORMAT}, f, indent=2)
    return p
