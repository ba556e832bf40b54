"""Several robots, one map: the ROS-free parts of inter-robot loop closures.

Design (the nodes in ``megaloc_ros/ros`` move these over DDS):

* Every robot's loop_closure_node publishes each accepted keyframe on the fleet topic (an
  absolute topic shared by all robots) with a *compact* descriptor: ``encode_descriptor`` codes
  the L2-normalised float32 descriptor as int8 with one float32 scale (``dim`` bytes + 4: MegaLoc's
  8448-D descriptor 8452 B instead of 33 792 B; the offline 384-D backbone 388 B) or as float16.
* Peers insert it into their own place map as the owner robot's session. Fleet sessions are
  ``robot_session(name)`` (CRC-32 of the robot name, 31 bits): every robot gives a robot the same
  session number, so ``query_session`` / ``match_session`` of a loop name the two robots.
* Ids: a peer keyframe gets a *local* id from the receiving robot's own counter (ids stay dense and
  increasing, the detector's windows and a loaded map's ``next_id`` work as before); ``PeerTable``
  keeps ``(robot, map id, remote id) -> local id`` and back, and is saved in the place map's
  ``extras`` so a saved map knows where its peers' keyframes came from.
* Verification data travels only for candidates: ``export_entry`` / ``import_entry`` turn one
  keyframe's verifier entry (keypoints, local descriptors, SuperSegment descriptors, keypoint
  depths, and the owner's camera: intrinsics and lens distortion, since robots need not share a
  camera) into bytes and back.
"""
from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megaloc_ros.errors import MegalocError

ENCODINGS = ("int8", "float16")


def robot_session(robot: str) -> int:
    """The fleet-wide session number of ``robot`` (CRC-32 of its name, 31 bits)."""
    return zlib.crc32(robot.encode()) & 0x7FFFFFFF


def robot_name(namespace: str, given: str = "") -> str:
    """``given``, else the namespace without its leading '/', else "robot"."""
    return given or namespace.strip("/") or "robot"


# ----------------------------------------------------------------------------- descriptors

def encode_descriptor(d: np.ndarray, encoding: str = "int8") -> tuple[bytes, float]:
    """(bytes, scale) of a descriptor coded as ``encoding``."""
    d = np.asarray(d, np.float32).ravel()
    if encoding == "int8":
        top = float(np.max(np.abs(d))) if d.size else 0.0
        scale = top / 127.0 if top > 0 else 1.0
        return np.clip(np.rint(d / scale), -127, 127).astype(np.int8).tobytes(), scale
    if encoding == "float16":
        return d.astype(np.float16).tobytes(), 1.0
    raise MegalocError(f"unknown fleet descriptor encoding {encoding!r} (one of {ENCODINGS})")


def decode_descriptor(data: bytes, encoding: str, scale: float, dim: int) -> np.ndarray:
    """The float32 descriptor, L2-normalised again (the coding error is < 0.5 code units)."""
    buf = bytes(data)
    if encoding == "int8":
        d = np.frombuffer(buf, np.int8).astype(np.float32) * np.float32(scale)
    elif encoding == "float16":
        d = np.frombuffer(buf, np.float16).astype(np.float32)
    else:
        raise MegalocError(f"unknown fleet descriptor encoding {encoding!r} (one of {ENCODINGS})")
    if d.size != dim:
        raise MegalocError(f"fleet descriptor has {d.size} values, dim says {dim}")
    n = float(np.linalg.norm(d))
    return d / n if n > 0 else d


# ----------------------------------------------------------------------------- id table

@dataclass(frozen=True)
class PeerKeyframe:
    robot: str
    map_id: str
    remote_id: int
    session: int
    data_service: str


class PeerTable:
    """``(robot, map id, remote id) <-> local id`` of the peers' keyframes in this robot's map."""

    def __init__(self):
        self._by_key: dict[tuple[str, str, int], int] = {}
        self._by_local: dict[int, PeerKeyframe] = {}

    def __len__(self) -> int:
        return len(self._by_local)

    def local_id(self, robot: str, map_id: str, remote_id: int) -> Optional[int]:
        return self._by_key.get((robot, map_id, int(remote_id)))

    def peer(self, local_id: int) -> Optional[PeerKeyframe]:
        return self._by_local.get(int(local_id))

    def add(self, local_id: int, p: PeerKeyframe) -> None:
        self._by_key[(p.robot, p.map_id, int(p.remote_id))] = int(local_id)
        self._by_local[int(local_id)] = p

    def items(self):
        return sorted(self._by_local.items())

    def robots(self) -> dict[int, str]:
        """{session: robot name} of the peers seen."""
        return {p.session: p.robot for p in self._by_local.values()}

    # saved with the place map (its ``extras``: plain numpy arrays, no pickle)
    EXTRA = "fleet_peers"

    def to_extra(self) -> np.ndarray:
        rows = [[lid, p.robot, p.map_id, p.remote_id, p.session, p.data_service] for lid, p in self.items()]
        return np.frombuffer(json.dumps(rows).encode(), np.uint8).copy()

    @classmethod
    def from_extra(cls, a: Optional[np.ndarray]) -> "PeerTable":
        t = cls()
        if a is None or not len(a):
            return t
        for lid, robot, map_id, rid, session, service in json.loads(np.asarray(a, np.uint8).tobytes().decode()):
            t.add(int(lid), PeerKeyframe(str(robot), str(map_id), int(rid), int(session), str(service)))
        return t


# ----------------------------------------------------------------------------- verifier entries

def export_entry(verifier, kid: int) -> bytes:
    """One stored keyframe of ``verifier`` (megaloc_ros.verification.verifier.Verifier) as npz
    bytes: what its verification needs, nothing else (no image). KeyError when not stored."""
    with verifier._lock:
        e = verifier._entries[int(kid)]
        cam = verifier.camera_of(e)
        meta = {"image_size": list(e.image_size), "local_features": verifier.params.local_features,
                "vocabulary_source": verifier.vocabulary_source,
                # the camera that took it: the robots of a fleet need not share one
                "camera_matrix": None if cam is None else cam.intrinsics(e.image_size).ravel().tolist(),
                "distortion": None if cam is None or cam.distortion is None else cam.distortion.saved()}
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
                  "keypoints": np.asarray(e.local.keypoints), "descriptors": np.asarray(e.local.descriptors)}
        for name in ("supersegments", "pending_patches", "pending_weights", "keypoint_depth"):
            a = getattr(e, name)
            if a is not None:
                arrays[name] = np.asarray(a)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def import_entry(verifier, kid: int, data: bytes) -> str:
    """Store the entry ``export_entry`` made (on another robot) under ``kid``. SuperSegment
    descriptors made with another vocabulary than ``verifier``'s are dropped (geometry still
    decides); returns a note on what was kept. MegalocError on a foreign entry."""
    from megaloc_ros.verification import geometry
    from megaloc_ros.verification.verifier import _Entry
    with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    meta = json.loads(d["meta"].tobytes().decode())
    if meta["local_features"] != verifier.params.local_features:
        raise MegalocError(f"peer keyframe has {meta['local_features']} local features, this verifier uses "
                           f"{verifier.params.local_features}")
    size = tuple(int(v) for v in meta["image_size"])
    e = _Entry(size, geometry.LocalFeatures(d["keypoints"], d["descriptors"], size))
    e.keypoint_depth = d.get("keypoint_depth")
    if meta.get("camera_matrix") is not None:  # entries from before cameras travelled have none
        e.camera = geometry.Camera(meta["camera_matrix"], size, geometry.Distortion.from_saved(meta.get("distortion")))
    note = "local features"
    with verifier._lock:
        same_vocab = meta["vocabulary_source"] == verifier.vocabulary_source
        if "supersegments" in d and same_vocab and verifier.has_vocabulary:
            e.supersegments = d["supersegments"]
            note += " + SuperSegments"
        elif "pending_patches" in d and verifier.has_vocabulary:
            e.supersegments = verifier._describe(d["pending_patches"].astype(np.float32),
                                                 d["pending_weights"].astype(np.float32))
            note += " + SuperSegments (described here)"
        elif "supersegments" in d or "pending_patches" in d:
            note += " (SuperSegments dropped: another SegVLAD vocabulary)"
        verifier._entries[int(kid)] = e
    return note
