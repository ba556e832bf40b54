"""ROS parameters of the two nodes: one table of ``ParamSpec`` per node, declared with descriptors.

The core's parameter dataclasses (``DetectorParams``, ``VerifierParams``) are mapped field by
field to ROS parameters ``detector.<field>`` / ``verifier.<field>`` with the dataclass defaults
and the field's comment as description, so the YAML file, the launch file and the core stay in
sync. A field may carry ``metadata={"help": ..., "range": (lo, hi), "read_only": True,
"choices": (...)}``; otherwise durations, distances, angles and counts get a lower bound of 0.
Bad values are rejected with a message (rclpy checks ranges and read-only flags; ``validate``
checks choices and the dataclass's own ``__post_init__`` checks).

``python -m megaloc_ros.ros.params`` prints config/loop_closure.yaml.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from megaloc_ros.mapping.place_map import INDEX_KINDS

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


def _spec(name, default, description, read_only=False, range=None, choices=None):
    return ParamSpec(name, default, description, read_only, range, choices)


# Shared by both nodes (a `/**` YAML section sets them once).
COMMON = [
    _spec("autostart", True, "configure and activate at start (as a plain node); false: wait for "
          "lifecycle transitions", read_only=True),
    _spec("map_path", "", "map file: loaded at start when it exists, saved on shutdown; the verifier "
          "keeps its state in <map_path>.verifier. Empty: in-memory only"),
    _spec("save_map_on_shutdown", True, "save to map_path on deactivate, cleanup and shutdown"),
    _spec("diagnostics_period", 1.0, "seconds between /diagnostics messages", read_only=True,
          range=(0.1, 60.0)),
]

LOOP_CLOSURE = COMMON + [
    _spec("image_topic", "image_raw", "camera topic (relative names resolve in the node's namespace); "
          "with image_transport compressed, <image_topic>/compressed is subscribed", read_only=True),
    _spec("image_transport", "raw", "raw: sensor_msgs/Image (rgb8, bgr8, rgba8, bgra8, mono8, mono16); "
          "compressed: sensor_msgs/CompressedImage (jpeg, png)", read_only=True, choices=("raw", "compressed")),
    _spec("image_qos", "sensor_data", "camera subscription QoS: sensor_data (best effort) or reliable",
          read_only=True, choices=("sensor_data", "reliable")),
    _spec("image_qos_depth", 5, "camera subscription history depth", read_only=True, range=(1, 1000)),
    _spec("odom_topic", "", "nav_msgs/Odometry for keyframe selection and keyframe poses; empty: none",
          read_only=True),
    _spec("odom_max_dt", 0.1, "largest stamp difference (s) between an image and the odometry used "
          "for it", range=(0.0, 10.0)),
    _spec("model_path", "", "exported encoder: .onnx (ONNX Runtime: TensorRT, CUDA or CPU) or .xml "
          "(OpenVINO IR: the int8 CPU variant); empty: the default model search "
          "(MegaLoc when exported, else the offline backbone)", read_only=True),
    _spec("device", "auto", "encoder device: auto, cpu or cuda", read_only=True, choices=("auto", "cpu", "cuda")),
    _spec("map_index", "flat", "place-map index kind (see megaloc_ros.mapping.place_map), used when no map is "
          "loaded", read_only=True, choices=INDEX_KINDS),
    _spec("session", -1, "session id of new keyframes; -1: one more than the highest session of the "
          "loaded map (0 for a new map)", read_only=True, range=(-1, INT_MAX)),
    _spec("queue_size", 4, "frames waiting for the encoder; under load the oldest is dropped and counted",
          read_only=True, range=(1, 1000)),
    _spec("keyframe_image_max_side", 640, "longest side of the rgb8 image sent to the verifier on "
          "~/keyframes (0: full size)", range=(0, 8192)),
    _spec("publish_patch_features", True, "send dense backbone features on ~/keyframes (SegVLAD needs them)"),
    _spec("map_frame", "map", "frame of the RViz markers when no odometry frame is known"),
]

VERIFIER = COMMON + [
    _spec("keyframes_topic", "loop_closure_node/keyframes", "megaloc_ros/Keyframe input", read_only=True),
    _spec("candidates_topic", "loop_closure_node/retrieved", "megaloc_ros/LoopClosureArray input: "
          "the raw top-k (loop_closure_node/candidates verifies only the detector's decisions)",
          read_only=True),
    _spec("candidate_wait", 5.0, "seconds a candidate waits for its query keyframe before it is "
          "dropped (counted)", range=(0.0, 600.0)),
    _spec("camera_matrix", [0.0], "camera intrinsics as [fx, fy, cx, cy, width, height] (valid for "
          "width x height images; rescaled to the keyframe images); [0.0]: from camera_info_topic, "
          "else unknown (loops without transform)", read_only=True),
    _spec("camera_info_topic", "", "sensor_msgs/CameraInfo giving the intrinsics when camera_matrix "
          "is not set (the first valid message is used); empty: none", read_only=True),
]


# --- dataclass fields -> specs ------------------------------------------------------------

def _field_comments(cls) -> dict[str, str]:
    """Trailing ``# comments`` and attribute docstrings of a dataclass's fields."""
    out: dict[str, str] = {}
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return out
    lines = src.splitlines()
    body = ast.parse(src).body[0].body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
            line = lines[node.end_lineno - 1]
            if "#" in line:
                col = line.index("#")
                text = [line[col + 1:].strip()]
                # continuation lines: comments aligned with this one (section headers are not)
                for nxt_line in lines[node.end_lineno:]:
                    if nxt_line.find("#") == col and not nxt_line[:col].strip():
                        text.append(nxt_line[col + 1:].strip())
                    else:
                        break
                out[name] = " ".join(text)
            nxt = body[i + 1] if i + 1 < len(body) else None
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                    and isinstance(nxt.value.value, str):
                out[name] = " ".join(nxt.value.value.split())
    # fields without a comment: the sentence of the class or module docstring that names them
    import re
    import sys
    docs = (cls.__doc__ or "") + "\n" + (getattr(sys.modules.get(cls.__module__), "__doc__", "") or "")
    sentences = re.split(r"(?<=[.;])\s+", " ".join(docs.split()))
    for f in dataclasses.fields(cls):
        if f.name not in out:
            hit = next((x for x in sentences if f"``{f.name}``" in x), None)
            if hit:
                out[f.name] = hit.replace("``", "").strip()
    return out


_UNIT_SUFFIXES = ("_s", "_m", "_deg", "_px", "_ms")


def dataclass_specs(cls, prefix: str) -> list[ParamSpec]:
    """One ParamSpec per field of a parameter dataclass (see the module docstring)."""
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    defaults = cls()
    specs = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        value = getattr(defaults, f.name)
        if isinstance(value, tuple):
            value = list(value)
        if value is None or isinstance(value, dict):
            continue  # no ROS parameter type; the core default applies
        md = f.metadata or {}
        choices = md.get("choices")
        if choices is None and isinstance(value, str):  # a comment like `"slic" | "sam"` lists them
            import re
            c = comments.get(f.name, "")
            if re.fullmatch(r'\s*"[^"]*"(\s*\|\s*"[^"]*")+\s*', c):
                choices = tuple(re.findall(r'"([^"]*)"', c))
                comments[f.name] = "one of: " + ", ".join(choices)
        desc = md.get("help") or md.get("description") or comments.get(f.name) or f.name.replace("_", " ")
        rng = md.get("range")
        if rng is None and isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            if isinstance(value, int) or f.name.endswith(_UNIT_SUFFIXES):
                rng = (0, INT_MAX if isinstance(value, int) else FLOAT_MAX)
        if rng is not None and isinstance(value, float):
            rng = (float(rng[0]), float(rng[1]))
        specs.append(ParamSpec(f"{prefix}.{f.name}", value, desc, bool(md.get("read_only", False)), rng,
                               tuple(choices) if choices else None, hints.get(f.name)))
    return specs


def build_dataclass(cls, prefix: str, values: dict[str, Any]):
    """The dataclass from ROS parameter values ``{"<prefix>.<field>": value}``; its own
    ``__post_init__`` checks apply (they raise with a message)."""
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key, v in values.items():
        if not key.startswith(prefix + "."):
            continue
        name = key[len(prefix) + 1:]
        if name not in names:
            continue
        if isinstance(v, list) and typing.get_origin(hints.get(name)) is tuple:
            v = tuple(v)
        kwargs[name] = v
    return cls(**kwargs)


def detector_specs() -> list[ParamSpec]:
    from megaloc_ros.mapping.detector import DetectorParams
    return dataclass_specs(DetectorParams, "detector")


# Verifier fields that change decisions only; the others shape the stored keyframe data (a
# loaded verifier state keeps its own), so they are read-only here.
VERIFIER_LIVE_FIELDS = ("min_global_score", "min_segvlad_score", "min_inliers", "ratio", "mutual",
                        "ransac_threshold_px", "vote_top_k", "max_accepted_per_query")


def verifier_specs() -> list[ParamSpec]:
    from megaloc_ros.verification.verifier import VerifierParams
    return [s if s.name.split(".", 1)[1] in VERIFIER_LIVE_FIELDS else dataclasses.replace(s, read_only=True)
            for s in dataclass_specs(VerifierParams, "verifier")]


def loop_closure_specs() -> list[ParamSpec]:
    return LOOP_CLOSURE + detector_specs()


def verifier_node_specs() -> list[ParamSpec]:
    return VERIFIER + verifier_specs()


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


def validator(specs: Sequence[ParamSpec], dataclasses_by_prefix: dict[str, type],
              current: Callable[[], dict[str, Any]]):
    """An ``add_on_set_parameters_callback`` callback: checks choices and that the changed
    ``<prefix>.*`` values still build a valid dataclass."""
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
            changes[p.name] = p.value
        values = dict(current())
        values.update(changes)
        for prefix, cls in dataclasses_by_prefix.items():
            if any(k.startswith(prefix + ".") for k in changes):
                try:
                    build_dataclass(cls, prefix, values)
                except Exception as exc:  # the dataclass's own checks say what is wrong
                    return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    return cb


# --- parameter files ------------------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_params_file(path, node_name: Optional[str] = None, namespace: str = "") -> dict[str, Any]:
    """Flat ``{name: value}`` from a ROS 2 parameters YAML: the ``/**`` section, then sections
    naming this node (``node_name``, ``/node_name``, ``/<namespace>/node_name``, ``/**/node_name``)."""
    import yaml

    from megaloc_ros.errors import MegalocError

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except OSError as exc:
        raise MegalocError(f"cannot read parameters file {p}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise MegalocError(f"parameters file {p} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise MegalocError(f"parameters file {p}: expected `<node>: ros__parameters: ...` sections")
    ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
    wanted = ["/**"]
    if node_name:
        wanted += [node_name, f"/{node_name}", f"/**/{node_name}", f"{ns}/{node_name}"]
    out: dict[str, Any] = {}
    for key in wanted:
        sec = doc.get(key)
        if sec is None:
            continue
        if not isinstance(sec, dict) or "ros__parameters" not in sec:
            raise MegalocError(f"parameters file {p}: section '{key}' has no ros__parameters")
        out.update(_flatten(sec["ros__parameters"] or {}))
    return out


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
    common = {s.name for s in COMMON}
    out += section("both nodes", COMMON)
    out += section("loop_closure_node", [s for s in loop_closure_specs() if s.name not in common])
    out += section("verifier_node", [s for s in verifier_node_specs() if s.name not in common])
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render_yaml(), end="")
