"""rosbag2 files: writing one from an image folder (`megaloc-ros make-bag`) and reading camera
images and poses back for `megaloc-ros eval`.

Uses ``rosbags`` (pure Python, no ROS installation needed); both storage plugins (sqlite3 and
mcap) and both image types (``sensor_msgs/Image`` and ``sensor_msgs/CompressedImage``). Images
are decoded by ``megaloc_ros.io.images``, the same code the nodes use. Every failure on a bad bag
is a ``BagError`` (or ``ImageDecodeError``) that names the bag, the topic and what to do.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from megaloc_ros.errors import BagError, ImageDecodeError, MegalocError
from megaloc_ros.types import SECOND_NS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
POSE_TYPES = (
    "geometry_msgs/msg/PoseStamped",
    "geometry_msgs/msg/PoseWithCovarianceStamped",
    "nav_msgs/msg/Odometry",
    "geometry_msgs/msg/TransformStamped",
)
STORAGES = ("sqlite3", "mcap")


def _typestore():
    from rosbags.typesys import Stores, get_typestore
    return get_typestore(Stores.ROS2_KILTED)


def natural_key(path: Path):
    """Sort key so that 2.jpg < 10.jpg."""
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", Path(path).name)]


def list_images(folder: str | Path) -> list[Path]:
    """JPEG/PNG files of a folder in natural order."""
    d = Path(folder)
    if not d.is_dir():
        raise MegalocError(f"image folder {d} not found")
    paths = sorted((p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
                   key=natural_key)
    if not paths:
        raise MegalocError(f"no .jpg/.jpeg/.png images in {d}")
    return paths


def read_stamps(path: str | Path, n_images: int) -> np.ndarray:
    """A stamps file: one stamp in seconds per line (first column; '#' lines ignored), one line
    per image in image order. Returns int64 nanoseconds."""
    p = Path(path)
    try:
        lines = [ln.strip() for ln in p.read_text().splitlines()]
    except OSError as exc:
        raise MegalocError(f"cannot read stamps file {p}: {exc.strerror}") from exc
    vals = []
    for n, ln in enumerate(lines, 1):
        if not ln or ln.startswith("#"):
            continue
        try:
            vals.append(float(ln.replace(",", " ").split()[0]))
        except ValueError:
            raise MegalocError(f"{p}:{n}: expected a stamp in seconds, got '{ln[:40]}'") from None
    if len(vals) != n_images:
        raise MegalocError(f"stamps file {p} has {len(vals)} stamps for {n_images} images")
    stamps = np.round(np.array(vals) * SECOND_NS).astype(np.int64)
    if np.any(np.diff(stamps) <= 0):
        raise MegalocError(f"stamps in {p} are not strictly increasing")
    return stamps


def _stamp(ts, ns: int):
    Time = ts.types["builtin_interfaces/msg/Time"]
    return Time(sec=int(ns // SECOND_NS), nanosec=int(ns % SECOND_NS))


def _header(ts, ns: int, frame_id: str):
    return ts.types["std_msgs/msg/Header"](stamp=_stamp(ts, ns), frame_id=frame_id)


def write_bag(output: str | Path, image_paths: Sequence[str | Path], stamps_ns, *,
              storage: str = "sqlite3", compressed: bool = False, topic: Optional[str] = None,
              frame_id: str = "camera", trajectory=None, pose_topic: str = "/pose",
              world_frame: str = "map", overwrite: bool = False, progress: bool = False,
              camera=None) -> Path:
    """Write ``image_paths`` (one message per image at ``stamps_ns``) into a new rosbag2.

    Compressed bags carry the image files' bytes unchanged (no re-encoding); raw bags carry rgb8.
    ``trajectory`` (io.trajectory.Trajectory) is written as PoseStamped on
    ``pose_topic`` at its own stamps. ``camera`` (``geometry.Camera`` with its size): a CameraInfo
    per image on ``<image namespace>/camera_info``. Returns the bag directory.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer, WriterError

    from megaloc_ros.io.images import read_image_file, encode_raw
    from megaloc_ros.transforms import matrix_to_quaternion

    if storage not in STORAGES:
        raise MegalocError(f"unknown storage '{storage}' (use {' or '.join(STORAGES)})")
    out = Path(output)
    stamps = np.asarray(stamps_ns, dtype=np.int64)
    if len(stamps) != len(image_paths):
        raise MegalocError(f"{len(stamps)} stamps for {len(image_paths)} images")
    if out.exists():
        if not overwrite:
            raise BagError(f"{out} already exists (pass --force to replace it)")
        if not (out / "metadata.yaml").exists():
            raise BagError(f"{out} exists and is not a rosbag2 directory; not replacing it")
    topic = topic or ("/camera/image_raw/compressed" if compressed else "/camera/image_raw")
    ts = _typestore()
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    msgtype = COMPRESSED_TYPE if compressed else IMAGE_TYPE
    out.parent.mkdir(parents=True, exist_ok=True)
    # the bag being replaced stays aside until the new one is complete: a failure restores it
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}") if out.exists() else None
    if old is not None:
        out.rename(old)
    bar = progress_bar(len(image_paths), "make-bag", quiet=not progress)
    try:
        with Writer(out, version=Writer.VERSION_LATEST, storage_plugin=plugin) as w:
            conn = w.add_connection(topic, msgtype, typestore=ts)
            info = None
            if camera is not None:
                iconn = w.add_connection(camera_info_beside(topic), CAMERA_INFO_TYPE, typestore=ts)
                info = _camera_info_msg(ts, camera, frame_id)
            for path, t in zip(image_paths, stamps):
                if info is not None:
                    info.header = _header(ts, int(t), frame_id)
                    w.write(iconn, int(t), ts.serialize_cdr(info, CAMERA_INFO_TYPE))
                p = Path(path)
                if compressed:
                    data = _checked_file_bytes(p)
                    fmt = "png" if p.suffix.lower() == ".png" else "jpeg"
                    msg = ts.types[COMPRESSED_TYPE](header=_header(ts, int(t), frame_id), format=fmt,
                                                    data=np.frombuffer(data, np.uint8))
                else:
                    h, wd, step, data = encode_raw(read_image_file(p), "rgb8")
                    msg = ts.types[IMAGE_TYPE](header=_header(ts, int(t), frame_id), height=h, width=wd,
                                               encoding="rgb8", is_bigendian=0, step=step,
                                               data=np.frombuffer(data, np.uint8))
                w.write(conn, int(t), ts.serialize_cdr(msg, msgtype))
                bar.update(1)
            if trajectory is not None and len(trajectory):
                ptype = "geometry_msgs/msg/PoseStamped"
                pconn = w.add_connection(pose_topic, ptype, typestore=ts)
                G = ts.types
                for t, m in zip(trajectory.stamps_ns, trajectory.poses):
                    q = matrix_to_quaternion(m[:3, :3])
                    pose = G["geometry_msgs/msg/Pose"](
                        position=G["geometry_msgs/msg/Point"](x=float(m[0, 3]), y=float(m[1, 3]), z=float(m[2, 3])),
                        orientation=G["geometry_msgs/msg/Quaternion"](x=q[0], y=q[1], z=q[2], w=q[3]))
                    msg = G[ptype](header=_header(ts, int(t), world_frame), pose=pose)
                    w.write(pconn, int(t), ts.serialize_cdr(msg, ptype))
    except BaseException as exc:  # also Ctrl-C: no half-written bag stays behind
        shutil.rmtree(out, ignore_errors=True)
        if old is not None:
            old.rename(out)
        if isinstance(exc, WriterError):
            raise BagError(f"cannot write {out}: {exc}") from None
        raise
    finally:
        bar.close()
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def camera_info_beside(image_topic: str) -> str:
    """``<namespace>/camera_info`` of an image topic (``.../image_raw`` or ``.../image_raw/compressed``):
    the image_transport convention."""
    ns = image_topic.rsplit("/", 2 if image_topic.endswith("/compressed") else 1)[0]
    return f"{ns}/camera_info"


def _camera_info_msg(ts, camera, frame_id: str):
    """A sensor_msgs/CameraInfo for a ``geometry.Camera`` (with its size)."""
    K, (width, height), dist = camera.K, camera.size, camera.distortion
    P = np.zeros((3, 4))
    P[:, :3] = K
    return ts.types[CAMERA_INFO_TYPE](
        header=_header(ts, 0, frame_id), height=int(height), width=int(width),
        distortion_model=dist.model if dist is not None else "plumb_bob",
        d=np.asarray(dist.d if dist is not None else [0.0] * 5, np.float64), k=K.ravel(),
        r=np.eye(3).ravel(), p=P.ravel(), binning_x=0, binning_y=0,
        roi=ts.types["sensor_msgs/msg/RegionOfInterest"](x_offset=0, y_offset=0, height=0, width=0,
                                                        do_rectify=False))


def _checked_file_bytes(path: Path) -> bytes:
    """The bytes of an image file for a CompressedImage, after checking that they decode (as
    the nodes will decode them); ImageDecodeError naming the file otherwise."""
    from megaloc_ros.io.images import decode_compressed
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MegalocError(f"cannot read {path}: {exc.strerror}") from None
    fmt = "png" if path.suffix.lower() == ".png" else "jpeg"
    try:
        decode_compressed(fmt, np.frombuffer(data, np.uint8))
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{path} is not a readable {fmt.upper()} image ({exc}); no bag written") from None
    return data


def progress_bar(total: int, desc: str, quiet: bool = False):
    """tqdm on stderr; off with ``quiet`` or when stderr is not a terminal."""
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="frame", file=sys.stderr, dynamic_ncols=True,
                disable=quiet or not sys.stderr.isatty(), leave=False)


@dataclass
class BagImage:
    index: int            # position on the topic, from 0
    stamp_ns: int         # header stamp (bag receive time when the header stamp is zero)
    frame_id: str
    rgb: np.ndarray       # RGB uint8 [H, W, 3]
    decode_ms: float      # deserialisation + decoding time


@dataclass
class TopicInfo:
    name: str
    msgtype: str
    count: int


class BagReader:
    """Reads camera images and poses from a rosbag2 directory (or a bare .db3/.mcap file).

    Use as a context manager. All rosbags/sqlite/mcap failures become BagError.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._reader = None
        self._ts = None

    def __enter__(self) -> "BagReader":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        from rosbags.rosbag2 import Reader

        p = self.path
        if not p.exists():
            raise BagError(f"bag {p} not found")
        if p.is_dir() and not (p / "metadata.yaml").exists():
            raise BagError(f"{p} is not a rosbag2 bag (no metadata.yaml); pass the bag directory "
                           "written by `ros2 bag record` or `megaloc-ros make-bag`")
        try:
            reader = Reader(p)
            reader.open()
        except Exception as exc:  # rosbags, sqlite3 and mcap each raise their own types
            raise BagError(f"cannot open bag {p}: {_why(exc)} (is it a complete rosbag2 recording?)") from None
        self._reader = reader
        self._ts = _typestore()
        self._register_bag_types()

    def close(self) -> None:
        if self._reader is not None:
            try:
                self._reader.close()
            except Exception:  # closing a half-broken file must not hide the first error
                pass
            self._reader = None

    def _register_bag_types(self) -> None:
        """Teach the typestore any message definitions the bag carries that it lacks."""
        from rosbags.typesys import get_types_from_msg, get_types_from_idl

        for c in self._reader.connections:
            if c.msgtype in self._ts.types or not c.msgdef or not c.msgdef.data:
                continue
            try:
                fmt = getattr(c.msgdef.format, "name", str(c.msgdef.format)).upper()
                types = (get_types_from_idl(c.msgdef.data) if "IDL" in fmt
                         else get_types_from_msg(c.msgdef.data, c.msgtype))
                self._ts.register(types)
            except Exception:  # an unreadable definition only matters if that topic is used
                pass

    @property
    def topics(self) -> list[TopicInfo]:
        counts: dict[str, TopicInfo] = {}
        for c in self._reader.connections:
            info = counts.setdefault(c.topic, TopicInfo(c.topic, c.msgtype, 0))
            info.count += c.msgcount
        return sorted(counts.values(), key=lambda i: i.name)

    def _connections(self, topic: str, allowed: Sequence[str], what: str):
        conns = [c for c in self._reader.connections if c.topic == topic]
        if not conns:
            have = [f"{i.name} ({i.msgtype.replace('/msg/', '/')})" for i in self.topics
                    if i.msgtype in allowed]
            hint = f"{what} topics in the bag: {', '.join(have)}" if have else f"the bag has no {what} topics"
            raise BagError(f"topic {topic} is not in bag {self.path}; {hint}")
        bad = [c.msgtype for c in conns if c.msgtype not in allowed]
        if bad:
            raise BagError(f"topic {topic} in {self.path} has type {bad[0]}, expected "
                           f"{' or '.join(allowed)}")
        return conns

    def count(self, topic: str) -> int:
        return sum(c.msgcount for c in self._reader.connections if c.topic == topic)

    def image_count(self, topic: str) -> int:
        """Messages on ``topic``; BagError when it is missing or does not carry images."""
        self._connections(topic, IMAGE_TYPES, "image")
        return self.count(topic)

    def _messages(self, conns) -> Iterator[tuple[object, int, bytes]]:
        it = self._reader.messages(connections=conns)
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except Exception as exc:
                raise BagError(f"bag {self.path} is corrupt or truncated: {_why(exc)}") from None
            yield item

    def _deserialize(self, raw: bytes, msgtype: str, topic: str, index: int):
        try:
            return self._ts.deserialize_cdr(raw, msgtype)
        except Exception as exc:  # garbage bytes fail anywhere inside the CDR parser
            raise BagError(f"message {index} on {topic} in {self.path} cannot be deserialised as "
                           f"{msgtype}: {_why(exc)}") from None

    def images(self, topic: str, on_error=None, only=None) -> Iterator[BagImage]:
        """Decode every image on ``topic`` in bag order (``only``: just the images at these
        indices; the others are not even deserialised). A message that cannot be deserialised or
        decoded raises (BagError / ImageDecodeError), unless ``on_error`` is given: then it is
        called as ``on_error(index, stamp_ns, error)`` (the bag's receive time when the header
        cannot be read) and the frame is skipped. A corrupt bag file raises either way."""
        from megaloc_ros.io.images import decode_compressed, decode_raw

        conns = self._connections(topic, IMAGE_TYPES, "image")
        wanted = None if only is None else {int(i) for i in only}
        for i, (conn, t_bag, raw) in enumerate(self._messages(conns)):
            if wanted is not None:
                if i not in wanted:
                    continue
                wanted.discard(i)
            t0 = time.perf_counter()
            stamp = int(t_bag)
            try:
                msg = self._deserialize(raw, conn.msgtype, topic, i)
                s = msg.header.stamp.sec * SECOND_NS + msg.header.stamp.nanosec
                stamp = int(s) if s > 0 else int(t_bag)
                try:
                    if conn.msgtype == COMPRESSED_TYPE:
                        rgb = decode_compressed(msg.format, msg.data)
                    else:
                        rgb = decode_raw(msg.encoding, msg.height, msg.width, msg.step, msg.data,
                                         bool(msg.is_bigendian))
                except ImageDecodeError as exc:
                    raise ImageDecodeError(f"image {i} on {topic}: {exc}") from None
            except (BagError, ImageDecodeError) as exc:
                if on_error is None:
                    raise
                on_error(i, stamp, exc)
                continue
            dt = (time.perf_counter() - t0) * 1e3
            yield BagImage(i, stamp, msg.header.frame_id, rgb, dt)
            if wanted is not None and not wanted:
                return

    def raw_images(self, topic: str) -> Iterator[tuple[int, int, str, bytes]]:
        """(index, header stamp ns, message type, CDR bytes) of every image on ``topic``: what a
        player republishes. A zero header stamp is replaced by the bag's receive time (as
        ``images`` does), so the receiver sees the same stamps."""
        conns = self._connections(topic, IMAGE_TYPES, "image")
        for i, (conn, t_bag, raw) in enumerate(self._messages(conns)):
            msg = self._deserialize(raw, conn.msgtype, topic, i)
            stamp = msg.header.stamp.sec * SECOND_NS + msg.header.stamp.nanosec
            if stamp <= 0:
                stamp = int(t_bag)
                msg.header.stamp = _stamp(self._ts, stamp)
                raw = self._ts.serialize_cdr(msg, conn.msgtype)
            yield i, int(stamp), conn.msgtype, bytes(raw)

    def camera_info_topic(self, image_topic: str) -> Optional[str]:
        """The CameraInfo topic that goes with ``image_topic``: the one beside it
        (``<namespace>/camera_info``, the image_transport convention), else the bag's only one;
        None when there is none, or several and none beside it."""
        infos = [t.name for t in self.topics if t.msgtype == CAMERA_INFO_TYPE]
        beside = camera_info_beside(image_topic)
        if beside in infos:
            return beside
        return infos[0] if len(infos) == 1 else None

    def camera_info(self, topic: str):
        """The ``geometry.Camera`` of the first CameraInfo on ``topic`` with intrinsics. BagError
        when it has none, or a distortion model the verifier cannot undo."""
        from megaloc_ros.verification.geometry import camera_from_info
        conns = self._connections(topic, (CAMERA_INFO_TYPE,), "CameraInfo")
        for i, (conn, _, raw) in enumerate(self._messages(conns)):
            msg = self._deserialize(raw, conn.msgtype, topic, i)
            try:
                cam = camera_from_info(msg.k, msg.width, msg.height, msg.distortion_model, msg.d)
            except ValueError as exc:
                raise BagError(f"camera info {topic} in {self.path}: {exc}") from None
            if cam is not None:
                return cam
        raise BagError(f"camera info {topic} in {self.path} has no message with intrinsics")

    def trajectory(self, topic: str):
        """All poses on ``topic`` (PoseStamped, PoseWithCovarianceStamped, Odometry or
        TransformStamped) as an io.trajectory.Trajectory."""
        from megaloc_ros.io.trajectory import Trajectory
        from megaloc_ros.transforms import pose_matrix

        conns = self._connections(topic, POSE_TYPES, "pose")
        stamps, poses = [], []
        for i, (conn, t_bag, raw) in enumerate(self._messages(conns)):
            msg = self._deserialize(raw, conn.msgtype, topic, i)
            if conn.msgtype.endswith("TransformStamped"):
                tr = msg.transform
                pos, rot = tr.translation, tr.rotation
            else:
                pose = msg.pose if conn.msgtype.endswith("/PoseStamped") else msg.pose.pose
                pos, rot = pose.position, pose.orientation
            stamp = msg.header.stamp.sec * SECOND_NS + msg.header.stamp.nanosec
            stamps.append(int(stamp) if stamp > 0 else int(t_bag))
            try:
                poses.append(pose_matrix([pos.x, pos.y, pos.z], [rot.x, rot.y, rot.z, rot.w]))
            except ValueError as exc:
                raise BagError(f"pose topic {topic} in {self.path}, message {i}: {exc}") from None
        if not poses:
            raise BagError(f"pose topic {topic} in {self.path} has no messages")
        s = np.array(stamps, dtype=np.int64)
        order = np.argsort(s, kind="stable")
        return Trajectory(s[order], np.stack(poses)[order])


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------- `megaloc-ros make-bag`

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Write a rosbag2 from an image folder (natural order: 2.jpg before 10.jpg), "
                     "or from a shipped data set with --dataset.")
    p.add_argument("image_dirs", nargs="*", metavar="IMAGE_DIR",
                   help="folder(s) of .jpg/.png images, concatenated in the order given")
    p.add_argument("--dataset", choices=["rtabmap", "corridor"],
                   help="write a shipped data set (data/README.md) with its own stamps instead")
    p.add_argument("--output", "-o", required=True, help="bag directory to create")
    p.add_argument("--storage", choices=STORAGES, default="sqlite3")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rate", type=float, default=None, help="frame rate for generated stamps (Hz, default 1)")
    g.add_argument("--stamps", help="file with one stamp in seconds per line, one line per image")
    p.add_argument("--start", type=float, default=0.0, help="first stamp in seconds (with --rate)")
    p.add_argument("--poses", help="trajectory file (TUM: t tx ty tz qx qy qz qw; KITTI: 12 values "
                                   "per line, one per image), written as PoseStamped")
    p.add_argument("--pose-topic", default="/pose")
    p.add_argument("--compressed", action="store_true",
                   help="write sensor_msgs/CompressedImage with the files' bytes (default: raw rgb8)")
    p.add_argument("--topic", default=None,
                   help="image topic (default /camera/image_raw, or /camera/image_raw/compressed)")
    p.add_argument("--frame-id", default="camera")
    p.add_argument("--force", action="store_true", help="replace an existing bag at --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from megaloc_ros.io.trajectory import read_trajectory

    if args.dataset and args.image_dirs:
        raise MegalocError("give either IMAGE_DIR or --dataset, not both")
    if args.dataset:
        from megaloc_ros.io import datasets
        seq = datasets.SEQUENCES[args.dataset]()
        paths = list(seq.image_paths)
        stamps = seq.stamps_ns if args.rate is None and args.stamps is None else None
    elif args.image_dirs:
        paths = [p for d in args.image_dirs for p in list_images(d)]
        stamps = None
    else:
        raise MegalocError("give an IMAGE_DIR or --dataset NAME")
    if stamps is None:
        if args.stamps:
            stamps = read_stamps(args.stamps, len(paths))
        else:
            rate = 1.0 if args.rate is None else args.rate
            if rate <= 0:
                raise MegalocError("--rate must be positive")
            stamps = (np.round(args.start * SECOND_NS)
                      + np.round(np.arange(len(paths)) * SECOND_NS / rate)).astype(np.int64)
    traj = read_trajectory(args.poses, stamps) if args.poses else None
    out = write_bag(args.output, paths, stamps, storage=args.storage, compressed=args.compressed,
                    topic=args.topic, frame_id=args.frame_id, trajectory=traj,
                    pose_topic=args.pose_topic, overwrite=args.force, progress=not args.quiet)
    with BagReader(out) as r:
        desc = ", ".join(f"{t.name} ({t.count} x {t.msgtype.replace('/msg/', '/')})" for t in r.topics)
    print(f"wrote {out} [{args.storage}]: {desc}")
    return 0
