"""ROS messages <-> the shared types of megaloc_ros.types (and RGB uint8 arrays).

Pixel decoding is megaloc_ros.io.images' job; this module only moves fields. Poses are 4x4
float64 world-from-camera matrices, stamps integer nanoseconds, as everywhere in the core.
"""
from __future__ import annotations

import array
from typing import Iterable, Optional, Union

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Pose, Transform
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from megaloc_ros.msg import Keyframe as KeyframeMsg
from megaloc_ros.msg import LoopClosure, LoopClosureArray

from megaloc_ros.errors import ImageDecodeError
from megaloc_ros.io.images import (MAX_IMAGE_PIXELS, decode_compressed, decode_raw, downscale, encode_jpeg,
                                   encode_raw)
from megaloc_ros.transforms import matrix_to_quaternion, quaternion_to_matrix
from megaloc_ros.types import SECOND_NS, Candidate, ImageFeatures, Keyframe, RelativePose, VerifiedLoop

NS = SECOND_NS  # short name used by the nodes and their tests
NO_KEYFRAME = 2**64 - 1  # query_id of a query that is not a map keyframe (core id -1)


# --- time and headers ---------------------------------------------------------------------

def stamp_to_ns(t: Time) -> int:
    return int(t.sec) * NS + int(t.nanosec)


def ns_to_stamp(ns: int) -> Time:
    ns = int(ns)
    return Time(sec=ns // NS, nanosec=ns % NS)


def make_header(stamp_ns: int, frame_id: str = "") -> Header:
    return Header(stamp=ns_to_stamp(stamp_ns), frame_id=frame_id)


# --- poses --------------------------------------------------------------------------------

def pose_to_matrix(p: Pose) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = quaternion_to_matrix(p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w)
    m[:3, 3] = (p.position.x, p.position.y, p.position.z)
    return m


def matrix_to_pose(m: np.ndarray) -> Pose:
    m = np.asarray(m, dtype=np.float64)
    p = Pose()
    p.position.x, p.position.y, p.position.z = (float(v) for v in m[:3, 3])
    q = matrix_to_quaternion(m[:3, :3])
    p.orientation.x, p.orientation.y, p.orientation.z, p.orientation.w = (float(v) for v in q)
    return p


def relative_pose_to_transform(rp: RelativePose) -> Transform:
    t = Transform()
    t.translation.x, t.translation.y, t.translation.z = (float(v) for v in np.asarray(rp.translation).reshape(3))
    q = matrix_to_quaternion(rp.rotation)
    t.rotation.x, t.rotation.y, t.rotation.z, t.rotation.w = (float(v) for v in q)
    return t


def transform_to_relative_pose(t: Transform, metric_scale: bool, covariance) -> RelativePose:
    r = quaternion_to_matrix(t.rotation.x, t.rotation.y, t.rotation.z, t.rotation.w)
    tr = np.array([t.translation.x, t.translation.y, t.translation.z], dtype=np.float64)
    cov = np.asarray(covariance, dtype=np.float64).reshape(6, 6).copy()
    return RelativePose(rotation=r, translation=tr, metric_scale=bool(metric_scale), covariance=cov)


def odometry_to_matrix(odom) -> np.ndarray:
    """``nav_msgs/Odometry`` -> 4x4 pose of its child frame in its header frame."""
    return pose_to_matrix(odom.pose.pose)


# --- images -------------------------------------------------------------------------------

ImageMsg = Union[Image, CompressedImage]


def image_msg_to_rgb(msg: ImageMsg, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an Image or CompressedImage to RGB uint8; raises ImageDecodeError on bad input,
    and on images larger than ``max_pixels`` (checked before decoding)."""
    if isinstance(msg, CompressedImage):
        return decode_compressed(msg.format, msg.data, max_pixels)
    return decode_raw(msg.encoding, msg.height, msg.width, msg.step, msg.data, bool(msg.is_bigendian), max_pixels)


def rgb_to_image_msg(rgb: np.ndarray, stamp_ns: int = 0, frame_id: str = "", encoding: str = "rgb8") -> Image:
    h, w, step, data = encode_raw(rgb, encoding)
    return Image(header=make_header(stamp_ns, frame_id), height=h, width=w, encoding=encoding,
                 is_bigendian=0, step=step, data=array.array("B", data))


def rgb_to_compressed_msg(rgb: np.ndarray, stamp_ns: int = 0, frame_id: str = "", quality: int = 90) -> CompressedImage:
    return CompressedImage(header=make_header(stamp_ns, frame_id), format="jpeg",
                           data=array.array("B", encode_jpeg(rgb, quality)))


# --- keyframes ----------------------------------------------------------------------------

def _f32(x: np.ndarray) -> array.array:
    return array.array("f", np.ascontiguousarray(x, dtype=np.float32).tobytes())


def keyframe_to_msg(kf: Keyframe, image_rgb: Optional[np.ndarray], features: ImageFeatures,
                    image_max_side: int = 0, map_id: str = "", depth_m: Optional[np.ndarray] = None) -> KeyframeMsg:
    """A keyframe with what the verifier needs: the (downscaled) rgb8 image and the features."""
    m = KeyframeMsg()
    m.header = make_header(kf.stamp_ns, kf.frame_id)
    m.id = int(kf.id)
    m.session = int(kf.session)
    m.map_id = map_id
    if image_rgb is not None:
        small = downscale(image_rgb, image_max_side)
        m.image = rgb_to_image_msg(small, kf.stamp_ns, kf.frame_id)
        if depth_m is not None:  # nearest-neighbour to the sent image's size: no mixed depths at edges
            import cv2
            d = np.ascontiguousarray(cv2.resize(np.asarray(depth_m, np.float32), (small.shape[1], small.shape[0]),
                                                interpolation=cv2.INTER_NEAREST))
            m.depth = Image(header=make_header(kf.stamp_ns, kf.frame_id), height=d.shape[0], width=d.shape[1],
                               encoding="32FC1", is_bigendian=0, step=d.shape[1] * 4, data=d.tobytes())
    m.descriptor = _f32(features.descriptor)
    if features.patch_features is not None:
        pf = np.asarray(features.patch_features)
        m.patch_features = _f32(pf)
        m.patch_shape = np.array(pf.shape, dtype=np.uint32)
    if kf.pose is not None:
        m.has_pose = True
        m.pose = matrix_to_pose(kf.pose)
    return m


def msg_to_keyframe(m: KeyframeMsg) -> tuple[Keyframe, Optional[np.ndarray], ImageFeatures]:
    """Inverse of ``keyframe_to_msg``: (keyframe, rgb image or None, features)."""
    kf = Keyframe(id=int(m.id), stamp_ns=stamp_to_ns(m.header.stamp), session=int(m.session),
                  frame_id=m.header.frame_id, pose=pose_to_matrix(m.pose) if m.has_pose else None)
    rgb = image_msg_to_rgb(m.image) if m.image.width and m.image.height else None
    desc = np.frombuffer(m.descriptor, dtype=np.float32).copy()
    patches = None
    if len(m.patch_features):
        shape = tuple(int(v) for v in m.patch_shape)
        patches = np.frombuffer(m.patch_features, dtype=np.float32).copy()
        if int(np.prod(shape)) != patches.size:
            raise ValueError(f"keyframe {m.id}: patch_shape {shape} does not match {patches.size} patch values")
        patches = patches.reshape(shape)
    return kf, rgb, ImageFeatures(descriptor=desc, patch_features=patches)


# --- loop closures ------------------------------------------------------------------------

def loop_to_msg(item: Union[Candidate, VerifiedLoop], frame_id: str = "") -> LoopClosure:
    """A candidate (unverified) or a verifier result -> LoopClosure."""
    loop = item if isinstance(item, VerifiedLoop) else None
    c = loop.candidate if loop is not None else item
    m = LoopClosure()
    m.header = make_header(c.query.stamp_ns, frame_id or c.query.frame_id)
    m.query_id = int(c.query.id) if c.query.id >= 0 else NO_KEYFRAME
    m.match_id = int(c.match.id)
    m.query_stamp, m.match_stamp = ns_to_stamp(c.query.stamp_ns), ns_to_stamp(c.match.stamp_ns)
    m.query_session, m.match_session = int(c.query.session), int(c.match.session)
    m.score, m.rank = float(c.score), int(c.rank)
    if loop is not None:
        m.verified = bool(loop.accepted)
        m.verification_score = float(loop.verification_score)
        m.inliers = int(loop.inliers)
        m.reason = loop.reason
        if loop.transform is not None:
            m.has_transform = True
            m.transform = relative_pose_to_transform(loop.transform)
            m.metric_scale = bool(loop.transform.metric_scale)
            m.covariance = np.asarray(loop.transform.covariance, dtype=np.float64).reshape(36)
    return m


def msg_to_candidate(m: LoopClosure, query: Optional[Keyframe] = None, match: Optional[Keyframe] = None) -> Candidate:
    """LoopClosure -> Candidate. Pass the full keyframes when known (they carry poses)."""
    q = query or Keyframe(id=int(m.query_id) if m.query_id != NO_KEYFRAME else -1, stamp_ns=stamp_to_ns(m.query_stamp), session=int(m.query_session),
                          frame_id=m.header.frame_id)
    t = match or Keyframe(id=int(m.match_id), stamp_ns=stamp_to_ns(m.match_stamp), session=int(m.match_session),
                          frame_id=m.header.frame_id)
    return Candidate(query=q, match=t, score=float(m.score), rank=int(m.rank))


def msg_to_verified_loop(m: LoopClosure) -> VerifiedLoop:
    tf = transform_to_relative_pose(m.transform, m.metric_scale, m.covariance) if m.has_transform else None
    return VerifiedLoop(candidate=msg_to_candidate(m), accepted=bool(m.verified),
                        verification_score=float(m.verification_score), inliers=int(m.inliers), transform=tf,
                        reason=m.reason)


def loops_to_array(items: Iterable[Union[Candidate, VerifiedLoop]], stamp_ns: int, frame_id: str = "",
                   map_id: str = "") -> LoopClosureArray:
    return LoopClosureArray(header=make_header(stamp_ns, frame_id), map_id=map_id,
                            loops=[loop_to_msg(i, frame_id) for i in items])


def depth_msg_to_metres(msg: Image, depth_scale: float = 0.0) -> np.ndarray:
    """A depth image (16UC1 or mono16: ``depth_scale`` units per metre, default 1000 = mm;
    32FC1: metres unless ``depth_scale``) -> float32 metres [H, W], NaN where there is none."""
    kinds = {"16UC1": np.uint16, "mono16": np.uint16, "32FC1": np.float32}
    dtype = kinds.get(msg.encoding)
    if dtype is None:
        raise ImageDecodeError(f"unsupported depth encoding '{msg.encoding}' (16UC1, mono16 or 32FC1)")
    item = np.dtype(dtype).itemsize
    if msg.height == 0 or msg.width == 0 or msg.step < msg.width * item or len(msg.data) < msg.step * msg.height:
        raise ImageDecodeError(f"depth image {msg.width}x{msg.height} step {msg.step} with {len(msg.data)} bytes "
                               "is inconsistent")
    buf = np.frombuffer(memoryview(msg.data), np.uint8)[: msg.step * msg.height].reshape(msg.height, msg.step)
    dt = np.dtype(dtype).newbyteorder(">" if msg.is_bigendian else "<")
    raw = np.ascontiguousarray(buf[:, : msg.width * item]).view(dt).reshape(msg.height, msg.width)
    scale = depth_scale or (1000.0 if dtype is np.uint16 else 1.0)
    d = raw.astype(np.float32) / np.float32(scale)
    d[~np.isfinite(d) | (d <= 0)] = np.nan
    return d


def msg_depth(m: KeyframeMsg) -> Optional[np.ndarray]:
    """The keyframe's depth in metres (see ``keyframe_to_msg``), or None without one."""
    return depth_msg_to_metres(m.depth) if m.depth.width and m.depth.height else None
