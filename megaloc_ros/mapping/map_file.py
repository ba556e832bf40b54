"""The place-map file format (no pickle): a PlaceMap's state (``PlaceMap.state()``) to a file.

Layout, all integers little-endian::

    b"MGLCMAP\\0"            8 bytes magic
    format version          uint32
    header length H         uint32
    header                  H bytes of UTF-8 JSON: model_name, dim, index kind and options,
                            keyframe count, frame names, payload size, and for each array its
                            name, dtype, shape, offset and size in the payload
    payload                 the arrays' raw bytes (metadata columns, descriptors or PCA matrix
                            plus ``faiss.serialize_index`` bytes, ``extra/<name>`` arrays)
    sha256                  32 bytes over everything before it

Every way a file can be wrong (foreign, truncated, corrupted, newer version, another model or
descriptor size) raises MapFileError naming the file and what to do.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from megaloc_ros.errors import MapFileError
from megaloc_ros.io.files import atomic_write

MAGIC = b"MGLCMAP\0"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")
_DIGEST = 32
_DTYPE_KINDS = "biuf"  # numbers only: nothing in a map file can carry code
# what the header carries of PlaceMap.state()'s meta
HEADER_KEYS = ("model_name", "dim", "index", "options", "count", "frame_names")
# written by this version, optional when reading (files from before it have none)
OPTIONAL_KEYS = ("map_id",)


def _le(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if a.dtype.kind not in _DTYPE_KINDS:
        raise MapFileError(f"cannot store an array of dtype {a.dtype} in a map file (numbers only)")
    return a.astype(a.dtype.newbyteorder("<"), copy=False)


def save_map(path, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Write a map's state (``PlaceMap.state()``: ``meta`` with model_name, dim, index, options,
    count, frame_names; its named ``arrays``) to ``path`` atomically (``io.files.atomic_write``):
    a crash leaves the old file or the new one."""
    path = Path(path)
    arrays = {k: _le(v) for k, v in arrays.items()}
    table, offset = [], 0
    for name, a in arrays.items():
        table.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape),
                      "offset": offset, "nbytes": a.nbytes})
        offset += a.nbytes
    from megaloc_ros import __version__
    header = json.dumps({"writer": f"megaloc_ros {__version__}", **{k: meta[k] for k in HEADER_KEYS + OPTIONAL_KEYS if k in meta},
                         "payload_size": offset, "arrays": table}).encode()
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise MapFileError(f"cannot save map to {path}: directory {directory} does not exist")
    with atomic_write(path) as f:
        h = hashlib.sha256()

        def put(b) -> None:
            h.update(b)
            f.write(b)

        put(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)))
        put(header)
        for a in arrays.values():
            put(memoryview(a).cast("B") if a.nbytes else b"")
        f.write(h.digest())


def read_header(path) -> tuple[dict, bytes]:
    """Validate ``path`` and return (header, payload bytes). Raises MapFileError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MapFileError(f"cannot read map file {path}: {exc.strerror or exc}") from exc
    if len(data) < _PREFIX.size or data[:8] != MAGIC:
        raise MapFileError(f"{path} is not a megaloc_ros map file (no MGLCMAP magic); "
                           "give a file written by PlaceMap.save or the ~/save_map service")
    _, version, hlen = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise MapFileError(f"{path} is map format v{version}; this megaloc_ros reads v{FORMAT_VERSION}"
                           + (" (the file is from a newer release: upgrade)" if version > FORMAT_VERSION else ""))
    start = _PREFIX.size + hlen
    if len(data) < start:
        raise MapFileError(f"{path} is truncated ({len(data)} bytes, header alone needs {start}); "
                           "the save was interrupted or the copy is incomplete")
    try:
        header = json.loads(data[_PREFIX.size:start].decode())
        payload_size = int(header["payload_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise MapFileError(f"{path} has a corrupt header ({exc}); the file is damaged") from exc
    total = start + payload_size + _DIGEST
    if len(data) < total:
        raise MapFileError(f"{path} is truncated ({len(data)} of {total} bytes); "
                           "the save was interrupted or the copy is incomplete")
    if len(data) > total:
        raise MapFileError(f"{path} has {len(data) - total} unexpected trailing bytes; the file is damaged")
    if hashlib.sha256(memoryview(data)[: total - _DIGEST]).digest() != data[total - _DIGEST:]:
        raise MapFileError(f"{path} fails its sha256 checksum: the file is corrupt; "
                           "restore it from a backup or rebuild the map")
    return header, data[start: start + payload_size]


def read_arrays(header: dict, payload: bytes, path) -> dict[str, np.ndarray]:
    out = {}
    for e in header["arrays"]:
        dt = np.dtype(e["dtype"])
        if dt.kind not in _DTYPE_KINDS or e["offset"] + e["nbytes"] > len(payload):
            raise MapFileError(f"{path}: array {e['name']!r} is malformed; the file is damaged")
        a = np.frombuffer(payload, dt, count=e["nbytes"] // max(dt.itemsize, 1), offset=e["offset"])
        out[e["name"]] = a.reshape(e["shape"]).astype(dt.newbyteorder("="), copy=False)
    return out


def load_map(path, expected_model: Optional[str] = None,
             expected_dim: Optional[int] = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Read and check ``path``: (meta, arrays) as ``PlaceMap.from_state`` takes them. Raises
    MapFileError, also when the map was built with another model or descriptor size than the
    ``expected_*`` ones given."""
    header, payload = read_header(path)
    model, dim = header["model_name"], int(header["dim"])
    if (expected_model is not None and model != expected_model) or \
            (expected_dim is not None and dim != int(expected_dim)):
        raise MapFileError(
            f"{path} was built with model {model!r} ({dim}-D descriptors) but this node uses "
            f"{expected_model if expected_model is not None else model!r} "
            f"({expected_dim if expected_dim is not None else dim}-D); descriptors of different "
            "models cannot be compared: load a map made with this model or rebuild it")
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing:
        raise MapFileError(f"{path} has a corrupt header (no {', '.join(missing)}); the file is damaged")
    return ({k: header[k] for k in HEADER_KEYS + OPTIONAL_KEYS if k in header},
            read_arrays(header, payload, path))
