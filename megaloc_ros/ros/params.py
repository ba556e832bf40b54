"""ROS parameters of the two nodes, derived from settings dataclasses only.

A node's parameters are its own settings (``LoopClosureNodeSettings`` / ``VerifierNodeSettings``,
unprefixed names) plus the pipeline settings it runs: loop_closure_node ``encoder.*``
(``EncoderSettings``), ``map.*`` (``MapSettings``) and ``detector.*`` (``DetectorParams``);
verifier_node ``verifier.*`` (``VerifierParams``, ``verifier.segments.*`` nested). Each field's
``setting(...)`` metadata gives the description, range, choices and read-only flag, so the YAML
file, the launch file, ``--set`` and the core use the same names and defaults. Bad values are
rejected with a message (rclpy checks ranges and read-only flags; ``declare`` and ``validator``
check choices and the dataclasses' own ``__post_init__`` checks).

Importable without rclpy (rclpy is imported inside the functions that need it).
``python -m megaloc_ros.ros.params`` prints config/loop_closure.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from megaloc_ros import fleet
from megaloc_ros import settings as S
from megaloc_ros.settings import setting, validate

LOOP_CLOSURE_NODE = "loop_closure_node"
VERIFIER_NODE = "verifier_node"
INT_MAX = 2**31 - 1
FLOAT_MAX = 1e12


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    read_only: bool = False                   # needs a restart (lifecycle cleanup + configure)
    range: Optional[tuple[float, float]] = None
    choices: Optional[tuple] = None
    type_hint: Any = None                     # for list defaults that are empty

    def check(self, value) -> Optional[str]:
        """A message when ``value`` is not acceptable, else None."""
        if self.choices is not None and value not in self.choices:
            return f"{self.name} must be one of {list(self.choices)}, got {value!r}"
        if self.range is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, hi = self.range
            if not lo <= value <= hi:
                return f"{self.name} must be in [{lo}, {hi}], got {value}"
        return None


# --- the nodes' own settings ----------------------------------------------------------------

@dataclass
class CommonNodeSettings:
    """Settings of both nodes (a ``/**`` YAML section sets them once)."""
    autostart: bool = setting(True, "configure and activate at start (as a plain node); false: wait for "
                              "lifecycle transitions", read_only=True)
    map_path: str = setting("", "map file: loaded at start when it exists, saved on shutdown; the verifier "
                            "keeps its state in <map_path>.verifier. Empty: in-memory only")
    save_map_on_shutdown: bool = setting(True, "save to map_path on deactivate, cleanup and shutdown")
    autosave_period: float = setting(0.0, "seconds between saves to map_path while running, when the map "
                                     "changed (bounds what a crash loses); 0: only on shutdown",
                                     range=(0.0, 86400.0), read_only=True)
    diagnostics_period: float = setting(1.0, "seconds between /diagnostics messages", range=(0.1, 60.0),
                                        read_only=True)

    def __post_init__(self) -> None:
        validate(self, "")


@dataclass
class LoopClosureNodeSettings(CommonNodeSettings):
    """loop_closure_node's own settings (its pipeline settings are ``encoder.*``, ``map.*``, ``detector.*``)."""
    image_topic: str = setting("image_raw", "camera topic (relative names resolve in the node's namespace); "
                               "with image_transport compressed, <image_topic>/compressed is subscribed",
                               read_only=True)
    image_transport: str = setting("raw", "raw: sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8, mono16, "
                                   "Bayer bayer_rggb8/bggr8/gbrg8/grbg8 and their 16-bit forms, YUV 4:2:2 "
                                   "yuv422 (uyvy) and yuv422_yuy2 (yuyv)); "
                                   "compressed: sensor_msgs/CompressedImage (jpeg, png)",
                                   choices=("raw", "compressed"), read_only=True)
    image_qos: str = setting("reliable", "camera subscription QoS. reliable: frames from another process "
                             "arrive whole (bench qos, 640x480 rgb8 at 30 Hz: 300/300), but a best-effort "
                             "publisher is not matched (rclpy warns: incompatible QoS). sensor_data (best "
                             "effort) matches any publisher, but loses most raw frames of that size from another "
                             "process, unseen (0-6 of 300 in four runs), unless the camera publishes compressed",
                             choices=("sensor_data", "reliable"), read_only=True)
    image_qos_depth: int = setting(5, "camera subscription history depth (KEEP_LAST). When the node falls behind, "
                                   "DDS keeps the newest image_qos_depth frames (older ones are overwritten, "
                                   "uncounted) and the frame queue drops its oldest (queue_size, counted in "
                                   "frames_dropped), so latency stays bounded; a larger depth delivers older frames "
                                   "late instead", range=(1, 1000), read_only=True)
    odom_topic: str = setting("", "nav_msgs/Odometry for keyframe selection and keyframe poses; empty: none",
                              read_only=True)
    depth_topic: str = setting("", "sensor_msgs/Image depth registered to the camera image (16UC1 or 32FC1): "
                               "verified loops on keyframes with depth get a metric transform; empty: none",
                               read_only=True)
    depth_scale: float = setting(0.0, "raw depth units per metre; 0: 1000 for 16UC1 (millimetres), 1 for "
                                 "32FC1 (metres)", range=(0.0, 1e6))
    depth_max_dt: float = setting(0.02, "largest stamp difference (s) between an image and its depth image",
                                  range=(0.0, 1.0))
    odom_max_dt: float = setting(0.1, "largest stamp difference (s) between an image and the odometry used "
                                 "for it", range=(0.0, 10.0))
    session: int = setting(-1, "session id of new keyframes; -1: one more than the highest session of the "
                           "loaded map (0 for a new map); with fleet_topic: the robot's fleet session "
                           "(CRC-32 of fleet_robot, 31 bits), the same on every robot", range=(-1, None),
                           read_only=True)
    queue_size: int = setting(4, "frames waiting for the encoder; under load the oldest is dropped and counted",
                              range=(1, 1000), read_only=True)
    keyframe_image_max_side: int = setting(640, "longest side of the rgb8 image sent to the verifier on "
                                           "~/keyframes (0: full size)", range=(0, 8192))
    publish_patch_features: bool = setting(True, "send dense backbone features on ~/keyframes (SegVLAD "
                                           "needs them)")
    max_image_pixels: int = setting(4096 * 4096, "larger camera images are refused (counted in "
                                    "decode_errors), checked from the header before decoding",
                                    range=(1, 2**31 - 1))
    verifier_node: str = setting("verifier_node", "the verifier node whose state ~/save_map and ~/load_map "
                                 "save and load with the map, at the same path (one call does both); "
                                 "empty: the map only", read_only=True)
    map_frame: str = setting("map", "frame of the RViz markers when no odometry frame is known")
    fleet_topic: str = setting("", "inter-robot loops: absolute topic shared by the fleet (e.g. "
                               "/megaloc_fleet/keyframes) on which every accepted keyframe's compact descriptor "
                               "is shared and the peers' are received into this map; empty: off (one robot)",
                               read_only=True)
    fleet_robot: str = setting("", "this robot's name on the fleet topic; empty: the node's namespace (without "
                               "the leading /)", read_only=True)
    fleet_descriptor: str = setting("int8", "descriptor coding on the fleet topic: int8 (1 byte per dimension "
                                    "and a scale) or float16 (2 bytes)", choices=("int8", "float16"),
                                    read_only=True)
    fleet_backlog: int = setting(10000, "keyframes the fleet topic keeps for robots that start late "
                                 "(transient-local history depth)", range=(1, 1000000), read_only=True)
    fleet_settle_keyframes: int = setting(5, "n: when a keyframe retrieves peer keyframes among that robot's "
                                          "newest 2n (while it may still be on its way), they are not verified at "
                                          "once: the query is asked again of that robot's keyframes once it sent n "
                                          "more, until its places are behind its frontier (not a near miss on its "
                                          "way there); 0: off", range=(0, 1000))
    fleet_settle_s: float = setting(5.0, "... or once its status says it had no frame to process for this long, "
                                    "or it processed this much of its camera's time past its newest keyframe "
                                    "(it stays there) (s); also how long this robot's own queries are kept, to "
                                    "be asked again of a peer keyframe of their place that arrives just after "
                                    "(robots crossing)", range=(0.0, 3600.0))
    fleet_peer_timeout: float = setting(10.0, "... or once nothing (status or keyframe) came from it for this "
                                        "long: it is taken as gone (s; a robot that is only slow still sends "
                                        f"its status every {fleet.STATUS_PERIOD_S:g} s)", range=(0.0, 3600.0))


@dataclass
class VerifierNodeSettings(CommonNodeSettings):
    """verifier_node's own settings (its pipeline settings are ``verifier.*``)."""
    keyframes_topic: str = setting("loop_closure_node/keyframes", "megaloc_ros/Keyframe input", read_only=True)
    candidates_topic: str = setting("loop_closure_node/retrieved", "megaloc_ros/LoopClosureArray input: the "
                                    "raw top-k (loop_closure_node/candidates verifies only the detector's "
                                    "decisions)", read_only=True)
    candidate_wait: float = setting(5.0, "seconds a candidate waits for its query keyframe before it is "
                                    "dropped (counted)", range=(0.0, 600.0))
    camera_matrix: list[float] = setting([0.0], "camera intrinsics as [fx, fy, cx, cy, width, height] (valid "
                                         "for width x height images; rescaled to the keyframe images); [0.0]: "
                                         "from camera_info_topic, else unknown (loops without transform)",
                                         read_only=True)
    camera_distortion_model: str = setting("", "lens distortion of camera_matrix, as CameraInfo names it; "
                                           "empty: none", choices=("", "plumb_bob", "rational_polynomial",
                                                                   "equidistant"), read_only=True)
    camera_distortion: list[float] = setting([0.0], "its coefficients, CameraInfo's d (plumb_bob: k1 k2 p1 p2 "
                                             "k3; rational_polynomial: k1 k2 p1 p2 k3 k4 k5 k6; equidistant: "
                                             "k1 k2 k3 k4)", read_only=True)
    camera_info_topic: str = setting("", "sensor_msgs/CameraInfo giving the intrinsics and distortion when "
                                     "camera_matrix is not set (the first valid message is used); empty: "
                                     "none", read_only=True)
    peer_keyframes_topic: str = setting("loop_closure_node/peer_keyframes", "megaloc_ros/FleetKeyframe input: "
                                        "the peers' keyframes loop_closure_node put in the map (their verification "
                                        "data is asked for from the owner's ~/keyframe_data when they become "
                                        "candidates)", read_only=True)
    fleet_request_timeout: float = setting(5.0, "seconds to wait for a peer's ~/keyframe_data answer; then the "
                                           "candidate is rejected and the timeout counted", range=(0.1, 600.0))


def camera_to_params(camera) -> dict:
    """verifier_node's camera_matrix (and camera_distortion_model / camera_distortion when it has
    a lens model) for a ``geometry.Camera`` with its size: ``camera_from_params`` reversed."""
    K, (w, h), dist = camera.K, camera.size, camera.distortion
    out = {"camera_matrix": [float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]), float(w), float(h)]}
    if dist is not None:
        out.update(camera_distortion_model=dist.model, camera_distortion=list(dist.d))
    return out


def camera_from_params(camera_matrix, distortion_model: str = "", distortion=(0.0,)):
    """The ``geometry.Camera`` of verifier_node's camera_matrix [fx, fy, cx, cy, width, height],
    camera_distortion_model and camera_distortion; None when
    camera_matrix is unset ([0.0]). ValueError on a malformed one."""
    from megaloc_ros.verification.geometry import camera_from_info
    c = [float(v) for v in camera_matrix]
    if not c or c == [0.0]:
        return None
    if len(c) != 6 or min(c[0], c[1], c[4], c[5]) <= 0:
        raise ValueError(f"camera_matrix must be [fx, fy, cx, cy, width, height] with positive focal "
                         f"lengths and size, got {c}")
    try:
        return camera_from_info([c[0], 0, c[2], 0, c[1], c[3], 0, 0, 1], int(c[4]), int(c[5]),
                                distortion_model, distortion)
    except ValueError as exc:
        raise ValueError(f"camera_distortion: {exc}") from None


def node_sections(node: str) -> dict[str, type]:
    """``{prefix: settings class}`` of a node's parameters; prefix "" is the node's own settings."""
    if node == LOOP_CLOSURE_NODE:
        from megaloc_ros.mapping.detector import DetectorParams
        from megaloc_ros.mapping.place_map import MapSettings
        return {"": LoopClosureNodeSettings, "encoder": S.EncoderSettings, "map": MapSettings,
                "detector": DetectorParams}
    if node == VERIFIER_NODE:
        from megaloc_ros.verification.verifier import VerifierParams
        return {"": VerifierNodeSettings, "verifier": VerifierParams}
    raise ValueError(f"unknown node {node!r}")


# --- settings -> specs ------------------------------------------------------------------------

def dataclass_specs(cls, prefix: str) -> list[ParamSpec]:
    """One ParamSpec per setting of ``cls`` (nested sections expanded), named ``<prefix>.<field>``."""
    specs = []
    for leaf in S.leaves(cls, prefix):
        value = leaf.default
        if isinstance(value, tuple):
            value = list(value)
        if value is None or isinstance(value, dict):
            continue  # no ROS parameter type; the core default applies
        rng = leaf.range
        if rng is not None:
            top = INT_MAX if isinstance(value, int) else FLOAT_MAX
            lo = rng[0] if rng[0] is not None else -top
            hi = rng[1] if rng[1] is not None else top
            rng = (float(lo), float(hi)) if isinstance(value, float) else (int(lo), int(hi))
        specs.append(ParamSpec(leaf.name, value, leaf.help, leaf.read_only, rng, leaf.choices, leaf.type))
    return specs


def node_specs(node: str) -> list[ParamSpec]:
    return [s for prefix, cls in node_sections(node).items() for s in dataclass_specs(cls, prefix)]


def loop_closure_specs() -> list[ParamSpec]:
    return node_specs(LOOP_CLOSURE_NODE)


def verifier_node_specs() -> list[ParamSpec]:
    return node_specs(VERIFIER_NODE)


def all_node_specs() -> dict[str, list[ParamSpec]]:
    return {LOOP_CLOSURE_NODE: loop_closure_specs(), VERIFIER_NODE: verifier_node_specs()}


# --- declaring on a node ------------------------------------------------------------------

def declare(node, specs: Sequence[ParamSpec]) -> dict[str, Any]:
    """Declare every spec on ``node`` (descriptor, range, read-only) and return the values.

    A value out of range or of the wrong type (from a params file or override) raises
    rclpy's InvalidParameterValueException / InvalidParameterTypeException naming the parameter;
    a value outside ``choices`` raises ValueError.
    """
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
    from rclpy.parameter import Parameter

    values = {}
    for s in specs:
        d = ParameterDescriptor(name=s.name, description=s.description, read_only=s.read_only)
        if s.choices is not None:
            d.additional_constraints = "one of: " + ", ".join(str(c) for c in s.choices)
        if s.range is not None:
            if isinstance(s.default, float):
                d.floating_point_range = [FloatingPointRange(from_value=float(s.range[0]), to_value=float(s.range[1]))]
            elif isinstance(s.default, int) and not isinstance(s.default, bool):
                d.integer_range = [IntegerRange(from_value=int(s.range[0]), to_value=int(s.range[1]), step=1)]
        default = s.default
        d.type = Parameter.Type.from_parameter_value(default).value
        p = node.declare_parameter(s.name, default, d)
        v = p.value
        if isinstance(v, int) and not isinstance(v, bool) and isinstance(s.default, float):
            v = float(v)
        err = s.check(v)
        if err:
            raise ValueError(f"{node.get_name()}: {err}")
        values[s.name] = list(v) if isinstance(v, (tuple,)) or type(v).__name__ == "array" else v
    return values


def _in_section(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".") if prefix else "." not in name


def validator(specs: Sequence[ParamSpec], dataclasses_by_prefix: dict[str, type],
              current: Callable[[], dict[str, Any]]):
    """An ``add_on_set_parameters_callback`` callback: checks ranges and choices, and that the
    changed ``<prefix>.*`` values still build a valid dataclass (``validate`` and its own checks;
    prefix "" is the node's own settings); a refusal carries the reason."""
    from rcl_interfaces.msg import SetParametersResult

    by_name = {s.name: s for s in specs}

    def cb(params) -> SetParametersResult:
        changes = {}
        for p in params:
            s = by_name.get(p.name)
            if s is None:
                continue
            err = s.check(p.value)
            if err:
                return SetParametersResult(successful=False, reason=err)
            changes[p.name] = list(p.value) if type(p.value).__name__ == "array" else p.value
        values = dict(current())
        values.update(changes)
        for prefix, cls in dataclasses_by_prefix.items():
            if any(_in_section(k, prefix) for k in changes):
                try:
                    S.from_flat(cls, prefix, values)
                except Exception as exc:  # the dataclass's own checks say what is wrong
                    return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    return cb


# --- the parameters file ------------------------------------------------------------------------

def render_yaml() -> str:
    """config/loop_closure.yaml: every parameter of both nodes with its default and a comment."""
    import json

    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return str(v)

    def section(title, specs, indent="    "):
        lines = [f"{indent}# --- {title}"]
        for s in specs:
            extra = []
            if s.range is not None:
                lo, hi = s.range
                extra.append(f">= {fmt(lo)}" if hi >= INT_MAX else f"range [{fmt(lo)}, {fmt(hi)}]")
            if s.read_only:
                extra.append("read-only")
            note = f" ({'; '.join(extra)})" if extra else ""
            lines.append(f"{indent}# {s.description}{note}")
            lines.append(f"{indent}{s.name}: {fmt(s.default)}")
        return lines

    out = ["# Parameters of loop_closure_node and verifier_node with their defaults.",
           "# Generated by `python -m megaloc_ros.ros.params`; test_launch_file checks it is in sync.",
           "# Each node reads the names it declares and ignores the other's.",
           "/**:", "  ros__parameters:"]
    common_specs = dataclass_specs(CommonNodeSettings, "")
    common = {s.name for s in common_specs}
    out += section("both nodes", common_specs)
    out += section("loop_closure_node", [s for s in loop_closure_specs() if s.name not in common])
    out += section("verifier_node", [s for s in verifier_node_specs() if s.name not in common])
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render_yaml(), end="")
