"""Settings: one dataclass field per setting, with its default, help text, range and choices.

Every component declares its settings with ``setting(...)`` (``DetectorParams``, ``VerifierParams``,
``SegmentParams``, ``MapSettings``, ``EncoderSettings``, the nodes' own settings in
megaloc_ros/ros/params.py). A setting has one name everywhere: its dotted field path under the
component's prefix (``detector.top_k``, ``verifier.segments.method``, ``encoder.model_path``),
which is the ROS parameter name, the ``--set NAME=VALUE`` key and the config file key.

Core module: it imports no rclpy and none of the component modules.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Optional

from megaloc_ros.errors import MegalocError

__all__ = ["EncoderSettings", "Leaf", "flatten", "from_flat", "leaves", "load_params_file",
           "parse_set", "section", "setting", "validate"]


def setting(default, help: str, *, range: Optional[tuple] = None, choices: Optional[tuple] = None,
            read_only: bool = False):
    """A dataclass field carrying its metadata. ``range``: inclusive ``(lo, hi)``, either end None
    for open; ``read_only``: cannot change while a node runs (needs a reconfigure)."""
    md = {"help": " ".join(help.split()), "range": range,
          "choices": tuple(choices) if choices is not None else None, "read_only": bool(read_only)}
    if isinstance(default, (list, tuple, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=md)
    return dataclasses.field(default=default, metadata=md)


def section(cls: type, help: str, *, read_only: bool = False):
    """A nested settings dataclass (its fields are named ``<prefix>.<field>.<subfield>``);
    ``read_only`` applies to every field in it."""
    return dataclasses.field(default_factory=cls, metadata={"help": " ".join(help.split()),
                                                            "read_only": bool(read_only), "section": True})


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One setting of a dataclass tree, by its flat name."""
    name: str
    default: Any
    help: str
    type: Any
    range: Optional[tuple] = None
    choices: Optional[tuple] = None
    read_only: bool = False


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def leaves(cls: type, prefix: str = "", read_only: bool = False) -> list[Leaf]:
    """Every setting of ``cls`` (nested sections expanded), with its default and metadata."""
    out = []
    hints = _hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        name = f"{prefix}.{f.name}" if prefix else f.name
        md = f.metadata or {}
        ro = read_only or bool(md.get("read_only", False))
        if dataclasses.is_dataclass(hints.get(f.name)):
            out += leaves(hints[f.name], name, ro)
            continue
        out.append(Leaf(name, getattr(defaults, f.name), md.get("help", ""), hints.get(f.name),
                        md.get("range"), md.get("choices"), ro))
    return out


def flatten(obj, prefix: str = "") -> dict[str, Any]:
    """``{"<prefix>.<field>": value}`` of a settings dataclass (nested sections expanded)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        name = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, name))
        else:
            out[name] = v
    return out


def _check(name: str, value, md) -> Optional[str]:
    """Why ``value`` is outside the field's range or choices, or None."""
    choices = md.get("choices")
    if choices is not None and value not in choices:
        return f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}"
    rng = md.get("range")
    if rng is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = rng
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if hi is None:
                return f"{name} must be >= {lo}; got {value}"
            if lo is None:
                return f"{name} must be <= {hi}; got {value}"
            return f"{name} must be in [{lo}, {hi}]; got {value}"
    return None


def validate(obj, prefix: Optional[str] = None) -> None:
    """Raise MegalocError naming every field of ``obj`` outside its range or choices (nested
    sections check themselves when built). Called by each settings class's ``__post_init__``;
    ``prefix``: of the names in messages ("" for bare field names, None for the class name)."""
    bad = []
    for f in dataclasses.fields(obj):
        head = f"{type(obj).__name__}." if prefix is None else (f"{prefix}." if prefix else "")
        name = head + f.name
        err = _check(name, getattr(obj, f.name), f.metadata or {})
        if err:
            bad.append(err)
    if bad:
        raise MegalocError("; ".join(bad))


def _type_name(t) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _coerce(name: str, value, t):
    """``value`` as type ``t`` (int -> float, list -> tuple), or MegalocError naming ``name``."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0]) if len(inner) == 1 else value
    bad = MegalocError(f"{name} must be of type {_type_name(t)}, got {value!r} ({type(value).__name__})")
    if t is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        item = args[0] if args else None
        items = [_coerce(f"{name}[{i}]", v, item) if item not in (None, Ellipsis) else v
                 for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return value


def from_flat(cls: type, prefix: str, values: dict[str, Any]):
    """``cls`` built from flat ``{"<prefix>.<field>": value}`` values (others ignored; missing
    fields keep their defaults), values coerced to the field types (int -> float, list -> tuple).
    A wrong type, a value out of range or choices, or an unknown ``<prefix>.*`` name raises
    MegalocError naming the parameter; then the class's own ``__post_init__`` checks run."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    head = prefix + "." if prefix else ""
    kwargs = {}
    for key, v in values.items():
        if not key.startswith(head):
            continue
        rest = key[len(head):]
        name = rest.split(".", 1)[0]
        f = fields.get(name)
        if f is None:
            if prefix:
                known = ", ".join(x.name for x in leaves(cls, prefix))
                raise MegalocError(f"unknown parameter {key} (known: {known})")
            continue  # prefix "": the other names belong to other sections
        if dataclasses.is_dataclass(hints.get(name)):
            continue  # built below, from all of its names at once
        if "." in rest:
            raise MegalocError(f"unknown parameter {key}: {head}{name} has no sub-parameters")
        v = _coerce(key, v, hints.get(name))
        err = _check(key, v, f.metadata or {})
        if err:
            raise MegalocError(err)
        kwargs[name] = v
    for name, f in fields.items():
        if dataclasses.is_dataclass(hints.get(name)):
            sub = head + name
            if any(k.startswith(sub + ".") for k in values):
                kwargs[name] = from_flat(hints[name], sub, values)
    try:
        return cls(**kwargs)
    except MegalocError as exc:
        raise MegalocError(f"{prefix or cls.__name__} settings: {exc}") from None


# --- command lines and parameter files ------------------------------------------------------

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_set(items, sep: str = "=") -> dict[str, Any]:
    """``["detector.top_k=3", ...]`` -> ``{"detector.top_k": 3}``: THE parser of ``--set NAME=VALUE``
    (``-p NAME:=VALUE`` with ``sep=":="``). Values are YAML (``0.8``, ``true``, ``[1, 2]``,
    ``"quoted"``); an empty value is the empty string. Names are checked by whoever uses them."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, found, text = str(item).partition(sep)
        key = key.strip()
        if not found or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            raise MegalocError(f"expected NAME{sep}VALUE (e.g. detector.similarity_threshold{sep}0.8), "
                               f"got {item!r}")
        text = text.strip()
        if not text:
            out[key] = ""
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise MegalocError(f"{item!r}: the value is not valid YAML") from None
        if isinstance(value, str) and _FLOAT.fullmatch(value):
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
        if isinstance(value, dict):
            raise MegalocError(f"{item!r}: a setting takes a number, string, boolean or list")
        out[key] = value
    return out


def _flatten_dict(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten_dict(v, key + "."))
        else:
            out[key] = v
    return out


def load_params_file(path, node_name: Optional[str] = None, namespace: str = "") -> dict[str, Any]:
    """Flat ``{name: value}`` from a ROS 2 parameters YAML: the ``/**`` section, then sections
    naming this node (``node_name``, ``/node_name``, ``/<namespace>/node_name``, ``/**/node_name``)."""
    import yaml

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
        out.update(_flatten_dict(sec["ros__parameters"] or {}))
    return out


# --- settings of no component module of their own -------------------------------------------

@dataclasses.dataclass
class EncoderSettings:
    """Which exported encoder computes the descriptors, and where."""
    model_path: str = setting(
        "", "exported encoder: .onnx (ONNX Runtime: TensorRT, CUDA or CPU) or .xml (OpenVINO IR: "
        "the int8 CPU variant); empty: the default model search (MegaLoc when exported, else the "
        "offline backbone)", read_only=True)
    device: str = setting("auto", "encoder device: auto, cpu or cuda", choices=("auto", "cpu", "cuda"),
                          read_only=True)

    def __post_init__(self) -> None:
        validate(self)
