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
from dataclasses import dataclass, field
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


# ----------------------------------------------------------------------------- peers' frontiers

STATUS_PERIOD_S = 1.0  # every robot's FleetStatus period (must stay well under a peer timeout)
IDLE_STATUS_AGE_S = 3 * STATUS_PERIOD_S  # idle is what a peer keeps saying, not what a silence suggests


@dataclass
class _Peer:
    order: list = field(default_factory=list)  # local ids of its keyframes, in arrival order
    newest_id: int = -1                         # the highest of its own keyframe ids received
    heard: float = -1e18                        # our clock: its last keyframe or status
    status: Optional["PeerStatus"] = None       # its last status
    idle_from: Optional[float] = None           # our clock: since when its statuses say it is idle


@dataclass(frozen=True)
class PeerStatus:
    """What a robot says of its progress (``FleetStatus``): image stamps are its own clock."""
    frame_stamp_ns: int      # the newest image it processed
    idle_s: float            # how long it has had no frame to process (0: one waits or is processed)
    keyframe_id: int         # its newest shared keyframe (its own id; -1: none yet)
    keyframe_stamp_ns: int   # and that keyframe's image stamp


class Frontiers:
    """Where each peer robot's map ends, and whether the peer may still be on its way there.

    A keyframe that retrieves peer keyframes among that robot's newest ``2 n`` (``n`` =
    ``settle_keyframes``) while it may still be approaching is *deferred*: verified now it
    would accept a near miss, the best of what the peer has mapped so far. It is asked again
    (``settled``) once the peer sent ``n`` more keyframes, or once the peer stopped moving on,
    as far as we know: we hold every keyframe its last status counts (after a stall they come
    in a burst, its status can come first), and

    * idle: its statuses said it had no frame to process for ``settle_s`` (camera off, bag
      over), timed on our clock and said without a gap of more than ``IDLE_STATUS_AGE_S``: a
      peer frozen for a while says on waking that it was idle long, and one frozen just after
      saying "idle 0.3 s" (a camera at 1 Hz leaves it idle between frames) says nothing more;
    * staying: it processed frames ``settle_s`` past its newest keyframe (its own image stamps);
    * or silent: nothing heard of it (status or keyframe) for ``peer_timeout_s`` (gone).

    A peer that is only slow (frames waiting, a loaded machine) is still moving on: time since
    its last keyframe alone would take it for stopped, and let near misses through. Times are
    the caller's monotonic clock (``now``). No ROS."""

    def __init__(self, settle_keyframes: int, settle_s: float, peer_timeout_s: float):
        self.settle_keyframes, self.settle_s, self.peer_timeout_s = settle_keyframes, settle_s, peer_timeout_s
        self._peers: dict[int, _Peer] = {}
        self._deferred: list[tuple[int, int, object]] = []  # (session, its count then, payload)

    def reset(self, keyframes=()) -> None:
        """Forget everything; ``keyframes``: (session, local id) of a loaded map's peer keyframes."""
        self._peers, self._deferred = {}, []
        for session, lid in keyframes:
            self._peer(session).order.append(int(lid))

    def _peer(self, session: int) -> _Peer:
        return self._peers.setdefault(int(session), _Peer())

    def on_keyframe(self, session: int, local_id: int, remote_id: int, now: float) -> None:
        """A keyframe of the peer arrived (``remote_id``: its id in the peer's map)."""
        p = self._peer(session)
        p.order.append(int(local_id))
        p.newest_id = max(p.newest_id, int(remote_id))
        p.heard, p.idle_from = now, None  # it processed a frame not long ago

    def on_status(self, session: int, status: PeerStatus, now: float) -> None:
        p = self._peer(session)
        gap = now - p.heard
        p.heard, p.status = now, status
        if status.idle_s <= 0:
            p.idle_from = None
        elif p.idle_from is None or gap > IDLE_STATUS_AGE_S:
            p.idle_from = now  # from when we heard it: a peer waking from a freeze claims the freeze

    def moving(self, session: int, now: float) -> bool:
        """The peer may still be on its way (see the class)."""
        return self.stopped(session, now) is None

    def stopped(self, session: int, now: float) -> Optional[str]:
        """Why the peer is taken as stopped ("idle", "staying", "silent"); None while it moves on."""
        p = self._peers.get(int(session))
        if p is None or now - p.heard > self.peer_timeout_s:
            return "silent"
        st = p.status
        if st is None or p.newest_id < st.keyframe_id:
            return None  # no status yet, or keyframes it counts still in flight
        if p.idle_from is not None and now - p.idle_from >= self.settle_s and now - p.heard <= IDLE_STATUS_AGE_S:
            return "idle"
        if st.keyframe_id >= 0 and st.frame_stamp_ns - st.keyframe_stamp_ns >= self.settle_s * 1e9:
            return "staying"
        return None

    def at_frontier(self, session: int, local_id: int, now: float) -> bool:
        """``local_id`` is among the peer's newest ``2 n`` keyframes while it is moving."""
        p = self._peers.get(int(session))
        n = self.settle_keyframes
        return (n > 0 and p is not None and int(local_id) in p.order[-2 * n:]
                and self.moving(session, now))

    def defer(self, session: int, payload) -> None:
        """Hold ``payload`` (a query) until ``session``'s map settles (``settled``)."""
        self._deferred.append((int(session), len(self._peer(session).order), payload))

    def settled(self, now: float) -> list[tuple[int, object, str]]:
        """Remove and return ``(session, payload, why)`` of the deferred queries whose peer sent
        ``n`` keyframes more since (why: "keyframes"), or stopped moving on (``stopped``). The
        caller asks them again, and defers again any whose best places are still at the frontier."""
        ready, keep = [], []
        for s, count, payload in self._deferred:
            why = "keyframes" if len(self._peer(s).order) >= count + self.settle_keyframes else self.stopped(s, now)
            if why:
                ready.append((s, payload, why))
            else:
                keep.append((s, count, payload))
        self._deferred = keep
        return ready

    def pending(self) -> int:
        return len(self._deferred)

    def keyframe_count(self, session: int) -> int:
        p = self._peers.get(int(session))
        return len(p.order) if p else 0


@dataclass
class Query:
    """One of this robot's keyframes as it was asked of the map: what asking it again needs."""
    kf: object                   # the Keyframe
    descriptor: np.ndarray       # float32, L2-normalised
    map_id: str
    kth_score: float             # the lowest score that made its top-k then (if it was not full:
                                 # the detector's similarity_threshold)
    asked: dict = field(default_factory=dict)   # peer session -> local ids it was verified against
    waiting: set = field(default_factory=set)   # peer sessions it is deferred for (``Frontiers``)
    made: float = 0.0            # our clock: when it was first asked

    @classmethod
    def from_retrieval(cls, kf, descriptor, map_id: str, retrieved: list, top_k: int,
                       similarity_threshold: float) -> "Query":
        """The query of keyframe ``kf`` whose raw top-k (``retrieved``, best first) was just
        found: a keyframe arriving later would have been among them if it scores at least the
        k-th, or ``similarity_threshold`` when fewer than ``top_k`` were found."""
        kth = retrieved[-1].score if len(retrieved) >= top_k else similarity_threshold
        return cls(kf, np.asarray(descriptor, np.float32).copy(), map_id, float(kth))

    def not_asked(self, session: int, hits: list) -> list:
        """``hits`` ((keyframe, score), best first) without the keyframes of ``session`` it was
        already verified against: a query asked again gets only what is new to it."""
        done = self.asked.get(int(session), set())
        return [(m, sc) for m, sc in hits if m.id not in done]

    def note_asked(self, session: int, ids) -> None:
        self.asked.setdefault(int(session), set()).update(int(i) for i in ids)


class RecentQueries:
    """This robot's queries of the last ``window_s`` seconds, for the robots-crossing race.

    Two robots that reach one place at the same moment each ask the map before the other's
    keyframe of it has arrived, so neither finds the loop; ``Frontiers`` does not help when
    neither query retrieved the other robot's newest keyframes. So when a peer keyframe arrives,
    ``crossed`` returns the recent queries it would have been a candidate of had it been there
    (its score beats the query's ``kth_score``): the caller defers them for that peer
    (``Frontiers.defer``), and they are asked again of the peer keyframes new to them once the
    peer's map settled, the best of its keyframes there rather than the first. No ROS."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._queries: list[Query] = []

    def reset(self) -> None:
        self._queries = []

    def add(self, q: Query, now: float) -> None:
        q.made = now
        self._queries.append(q)
        self._forget(now)

    def _forget(self, now: float) -> None:
        self._queries = [q for q in self._queries if now - q.made <= self.window_s]

    def crossed(self, session: int, local_id: int, descriptor: np.ndarray, now: float) -> list[Query]:
        """The recent queries that the peer keyframe (``session``, ``local_id``: arrived now)
        would have been a candidate of, not already waiting for that peer; marked waiting."""
        self._forget(now)
        d = np.asarray(descriptor, np.float32)
        out = []
        for q in self._queries:
            if int(session) in q.waiting or int(local_id) <= q.kf.id or q.kf.session == int(session):
                continue
            if float(q.descriptor @ d) >= q.kth_score:
                q.waiting.add(int(session))
                out.append(q)
        return out


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
        for name in ("supersegments", "pending_patches", "pending_weights", "keypoint_depth", "metric_depth"):
            a = getattr(e, name)
            if a is not None:
                arrays[name] = np.asarray(a)
        if e.metric is not None:
            arrays.update(metric_keypoints=np.asarray(e.metric.keypoints),
                          metric_descriptors=np.asarray(e.metric.descriptors))
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
    if "metric_keypoints" in d and "metric_depth" in d:  # RGB-D keyframes: ORB keypoints for metric PnP
        e.metric = geometry.LocalFeatures(d["metric_keypoints"], d["metric_descriptors"], size)
        e.metric_depth = d["metric_depth"]
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
