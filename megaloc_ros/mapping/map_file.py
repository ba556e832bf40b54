"""The place-map file format (no pickle) and its atomic writer.

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
import os
import struct
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from megaloc_ros.errors import MapFileError

MAGIC = b"MGLCMAP\0"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")
_DIGEST = 32
_DTYPE_KINDS = "biuf"  # numbers only: nothing in a map file can carry code


def _le(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if a.dtype.kind not in _DTYPE_KINDS:
        raise MapFileError(f"cannot store an array of dtype {a.dtype} in a map file (numbers only)")
    return a.astype(a.dtype.newbyteorder("<"), copy=False)


def map_arrays(pmap) -> dict[str, np.ndarray]:
    """Everything of ``pmap`` that goes into the payload, by name."""
    c, n = pmap._cols, len(pmap)
    arrays = {
        "ids": c.ids[:n], "stamps_ns": c.stamps[:n], "sessions": c.sessions[:n],
        "frame_index": c.frame_idx[:n],
    }
    pos = np.array(sorted(c.poses), np.int64)
    arrays["pose_positions"] = pos
    arrays["poses"] = (np.stack([c.poses[int(i)] for i in pos]) if len(pos)
                       else np.zeros((0, 4, 4), np.float64))
    if pmap._flat is not None:
        arrays["descriptors"] = pmap._flat.reconstruct_n(0, pmap._flat.ntotal) if n else \
            np.zeros((0, pmap.dim), np.float32)
    else:
        arrays["projection"] = pmap._proj
        arrays["faiss_index"] = pmap._faiss.serialize_index(pmap._index)
        if pmap._full is not None:
            arrays["descriptors"] = pmap._full[:n]
    for name, a in pmap.extras.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise MapFileError(f"extra array name {name!r} must be a non-empty string without '/'")
        arrays[f"extra/{name}"] = np.asarray(a)
    return arrays


def save_map(pmap, path) -> None:
    """Write ``pmap`` to ``path`` atomically: temporary file in the same directory, fsync,
    rename over ``path``, fsync the directory. A crash leaves the old file or the new one."""
    path = Path(path)
    arrays = {k: _le(v) for k, v in map_arrays(pmap).items()}
    table, offset = [], 0
    for name, a in arrays.items():
        table.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape),
                      "offset": offset, "nbytes": a.nbytes})
        offset += a.nbytes
    from megaloc_ros import __version__
    header = json.dumps({
        "writer": f"megaloc_ros {__version__}",
        "model_name": pmap.model_name, "dim": pmap.dim,
        "index": pmap.index_kind, "options": pmap.options, "count": len(pmap),
        "frame_names": pmap._frame_names, "payload_size": offset, "arrays": table,
    }).encode()
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise MapFileError(f"cannot save map to {path}: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            h = hashlib.sha256()

            def put(b) -> None:
                h.update(b)
                f.write(b)

            put(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)))
            put(header)
            for a in arrays.values():
                put(memoryview(a).cast("B") if a.nbytes else b"")
            f.write(h.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


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


def load_map(cls, path, expected_model: Optional[str] = None, expected_dim: Optional[int] = None):
    header, payload = read_header(path)
    model, dim = header["model_name"], int(header["dim"])
    if (expected_model is not None and model != expected_model) or \
            (expected_dim is not None and dim != int(expected_dim)):
        raise MapFileError(
            f"{path} was built with model {model!r} ({dim}-D descriptors) but this node uses "
            f"{expected_model if expected_model is not None else model!r} "
            f"({expected_dim if expected_dim is not None else dim}-D); descriptors of different "
            "models cannot be compared: load a map made with this model or rebuild it")
    from megaloc_ros.mapping.place_map import DEFAULT_OPTIONS
    options = {k: v for k, v in header["options"].items() if k in DEFAULT_OPTIONS}
    if header["index"] == "ivfpq":  # files from before ``pq_bits`` existed hold 8-bit PQ codes
        options.setdefault("pq_bits", 8)
    a = read_arrays(header, payload, path)
    n = int(header["count"])
    try:
        pmap = cls(dim, model, header["index"], **options)
        c = pmap._cols
        c.n = n
        c.ids, c.stamps = a["ids"].copy(), a["stamps_ns"].copy()
        c.sessions, c.frame_idx = a["sessions"].copy(), a["frame_index"].copy()
        if not (len(c.ids) == len(c.stamps) == len(c.sessions) == len(c.frame_idx) == n):
            raise ValueError("metadata columns disagree with the keyframe count")
        c.poses = {int(i): p.copy() for i, p in zip(a["pose_positions"], a["poses"])}
        pmap._frame_names = [str(s) for s in header["frame_names"]]
        pmap._frame_lookup = {s: i for i, s in enumerate(pmap._frame_names)}
        pmap._monotonic = bool(n < 2 or np.all(np.diff(c.ids) > 0))
        if "faiss_index" in a:
            pmap._proj = np.ascontiguousarray(a["projection"], np.float32)
            pmap._index = pmap._faiss.deserialize_index(np.ascontiguousarray(a["faiss_index"]))
            pmap._configure(pmap._index)
            pmap._flat = None
            if pmap._index.ntotal != n:
                raise ValueError(f"index holds {pmap._index.ntotal} codes for {n} keyframes")
            if "descriptors" in a:
                pmap._full = np.array(a["descriptors"], np.float32)
        else:
            d = np.ascontiguousarray(a["descriptors"], np.float32)
            if d.shape != (n, dim):
                raise ValueError(f"descriptor array has shape {d.shape}, expected {(n, dim)}")
            pmap._flat.add(d)
        pmap.extras = {k[len("extra/"):]: v.copy() for k, v in a.items() if k.startswith("extra/")}
    except MapFileError:
        raise
    except Exception as exc:  # consistent checksum but inconsistent content: a writer bug or forgery
        raise MapFileError(f"{path} is inconsistent ({exc}); the file is damaged") from exc
    return pmap
