"""The launch file and config/loop_closure.yaml against what the package installs and declares.

`ros2 launch` is not installable here, so the launch file is evaluated against stand-ins for
launch/launch_ros: it must start only executables that CMakeLists installs, pass the parameters
file and only the arguments given (by the names the real nodes declare). The YAML must hold every
declared parameter with its default.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

rclpy = pytest.importorskip("rclpy")

from megaloc_ros.ros import params as P  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "loop_closure.launch.py"
CONFIG = ROOT / "config" / "loop_closure.yaml"
DOMAIN_ID = 140 + os.getpid() % 20

pytestmark = pytest.mark.ros


@pytest.fixture(scope="module")
def declared():
    """{node name: {parameter: default}} as declared by the real nodes (not started)."""
    from rclpy.parameter import Parameter

    from megaloc_ros.ros.loop_closure_node import LoopClosureNode
    from megaloc_ros.ros.pose_graph_node import PoseGraphNode
    from megaloc_ros.ros.verifier_node import VerifierNode

    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    out = {}
    try:
        for cls in (LoopClosureNode, VerifierNode, PoseGraphNode):
            node = cls(context=ctx, parameter_overrides=[Parameter("autostart", value=False)])
            names = [n for n in node._parameters if n not in ("use_sim_time", "start_type_description_service")]
            out[node.get_name()] = {n: node.get_parameter(n).value for n in names}
            node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)
    # the adapters need their back end's messages to start: read what they declare from the source
    for name, module in (("rtabmap_adapter", "rtabmap"), ("lio_sam_adapter", "lio_sam")):
        src = (ROOT / "megaloc_ros" / "ros" / "adapters" / f"{module}.py").read_text()
        out[name] = {n: None for n in re.findall(r"""(?:\bd|declare_parameter)\(\s*["']([\w.]+)["']""", src)}
        assert out[name], f"no parameters found in {module}.py"
    return out


def _installed_programs() -> set[str]:
    cmake = (ROOT / "CMakeLists.txt").read_text()
    progs = set()
    for block in re.findall(r"install\s*\(\s*PROGRAMS(.*?)DESTINATION", cmake, re.S):
        progs |= {Path(p).name for p in block.split()}
    return progs


# --- stand-ins for launch / launch_ros: just what the launch file uses, evaluated as `ros2 launch` would
class LaunchDescription:
    def __init__(self, entities):
        self.entities = list(entities)


class DeclareLaunchArgument:
    def __init__(self, name, default_value=None, description="", choices=None):
        if choices is not None and isinstance(default_value, str) and default_value not in choices:
            raise ValueError(f"{name}: default {default_value!r} not in choices {choices}")  # as launch does
        self.name, self.default_value, self.choices = name, default_value, choices


class OpaqueFunction:
    def __init__(self, function):
        self.function = function


class LaunchConfiguration:
    def __init__(self, name):
        self.name = name

    def perform(self, context):
        return context[self.name]


class PathJoinSubstitution:
    def __init__(self, parts):
        self.parts = parts

    def perform(self, context):
        return "/".join(p if isinstance(p, str) else p.perform(context) for p in self.parts)


class FindPackageShare:
    def __init__(self, package):
        self.package = package

    def perform(self, context):
        return f"/share/{self.package}"


class Node:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def _launch_module(monkeypatch):
    """launch/loop_closure.launch.py imported against the stand-ins above."""
    import importlib.util
    import sys
    import types
    here = sys.modules[__name__]
    for name, attrs in {"launch": ["LaunchDescription"], "launch.actions": ["DeclareLaunchArgument", "OpaqueFunction"],
                        "launch.substitutions": ["LaunchConfiguration", "PathJoinSubstitution"],
                        "launch_ros": [], "launch_ros.actions": ["Node"],
                        "launch_ros.substitutions": ["FindPackageShare"]}.items():
        mod = types.ModuleType(name)
        for a in attrs:
            setattr(mod, a, getattr(here, a))
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("loop_closure_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(monkeypatch, **arguments) -> dict[str, dict]:
    """Evaluate generate_launch_description() with ``name:=value`` arguments; {node name: Node kwargs}."""
    module = _launch_module(monkeypatch)
    context, nodes = {}, []
    for e in module.generate_launch_description().entities:
        if isinstance(e, DeclareLaunchArgument):
            value = arguments.get(e.name, e.default_value)
            assert value is not None, f"{e.name} has no default"
            value = value if isinstance(value, str) else value.perform(context)
            if e.choices is not None and value not in e.choices:
                raise ValueError(f"{e.name}:={value} not in {e.choices}")
            context[e.name] = value
        else:
            nodes += e.function(context)
    unknown = set(arguments) - set(context)
    assert not unknown, f"the launch file declares no {sorted(unknown)}"
    return {n.kwargs["name"]: n.kwargs for n in nodes}


PARAMS_FILE = "/share/megaloc_ros/config/loop_closure.yaml"


def test_launch_without_arguments_passes_only_the_params_file(monkeypatch):
    nodes = launch(monkeypatch)
    assert set(nodes) == {"loop_closure_node", "verifier_node"}
    for n in nodes.values():
        assert n["parameters"] == [PARAMS_FILE] and n["namespace"] == ""
    nodes = launch(monkeypatch, params_file="/robot.yaml", namespace="r1", use_verifier="false")
    assert list(nodes) == ["loop_closure_node"]
    assert nodes["loop_closure_node"]["parameters"] == ["/robot.yaml"] and nodes["loop_closure_node"]["namespace"] == "r1"


def test_launch_arguments_given_set_their_parameters_and_nothing_else(monkeypatch):
    nodes = launch(monkeypatch, image_topic="/cam/image")
    assert nodes["loop_closure_node"]["parameters"] == [PARAMS_FILE, {"image_topic": "/cam/image"}]
    assert nodes["verifier_node"]["parameters"] == [PARAMS_FILE]
    nodes = launch(monkeypatch, image_topic="/cam", image_transport="compressed", **{"encoder.model_path": "m.onnx"},
                   map_path="a.map", camera_info_topic="/cam/info")
    assert nodes["loop_closure_node"]["parameters"][1] == {
        "image_topic": "/cam", "image_transport": "compressed", "encoder.model_path": "m.onnx", "map_path": "a.map"}
    assert nodes["verifier_node"]["parameters"][1] == {"camera_info_topic": "/cam/info", "map_path": "a.map"}
    # an empty argument keeps the file's value: never passed as ""
    nodes = launch(monkeypatch, image_topic="", image_transport="", map_path="", **{"encoder.model_path": ""})
    assert all(n["parameters"] == [PARAMS_FILE] for n in nodes.values())
    with pytest.raises(ValueError, match="image_transport"):
        launch(monkeypatch, image_transport="theora")


def test_launch_starts_only_installed_executables(monkeypatch):
    nodes = launch(monkeypatch)
    installed = _installed_programs()
    for name, n in nodes.items():
        assert n["package"] == "megaloc_ros" and n["executable"] == name
        assert name in installed, f"launch file starts {name}, CMakeLists installs {sorted(installed)}"
        script = ROOT / "scripts" / name
        assert script.exists() and os.access(script, os.X_OK), f"{script} missing or not executable"


def test_launch_passes_only_declared_parameters(monkeypatch, declared):
    every = dict(image_topic="/cam", image_transport="raw", **{"encoder.model_path": "m.onnx"}, map_path="a.map",
                 camera_info_topic="/cam/info", odom_topic="/odom", rtabmap_namespace="rtabmap")
    seen = set()
    for backend in ("none", "gtsam", "rtabmap", "lio_sam"):
        for name, n in launch(monkeypatch, backend=backend, **every).items():
            seen.add(name)
            params = n["parameters"][1] if len(n["parameters"]) > 1 else {}
            unknown = set(params) - set(declared[name])
            assert not unknown, f"launch file sets {sorted(unknown)} that {name} does not declare"
    assert seen == set(declared), f"nodes the launch file can start: {sorted(seen)}"


def test_config_holds_every_parameter_with_its_default(declared):
    doc = yaml.safe_load(CONFIG.read_text())
    cfg = doc["/**"]["ros__parameters"]
    every = {}
    for node in ("loop_closure_node", "verifier_node"):  # the back-end nodes are documented in README
        every.update(declared[node])
    assert set(cfg) == set(every), (f"missing: {sorted(set(every) - set(cfg))}, "
                                    f"undeclared: {sorted(set(cfg) - set(every))}")
    for k, v in every.items():
        got = cfg[k]
        if k == "autostart":  # the fixture overrode it to keep the nodes unconfigured
            assert got is True
            continue
        if isinstance(v, float):
            assert got == pytest.approx(v), k
        else:
            assert (list(got) if isinstance(got, list) else got) == (list(v) if not isinstance(v, (str, bool, int)) else v), k
    # each parameter has a comment line right above it
    lines = CONFIG.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s{4}([\w.]+):", line)
        if m:
            assert lines[i - 1].strip().startswith("#"), f"{m.group(1)} has no comment"
    assert CONFIG.read_text() == P.render_yaml(), "regenerate: python -m megaloc_ros.ros.params > config/loop_closure.yaml"


def test_runner_reads_the_config_and_rejects_unknown_names():
    from megaloc_ros.errors import MegalocError
    from megaloc_ros.ros.runner import NodeSet, load_params

    p = load_params(str(CONFIG))
    assert p["image_topic"] == "image_raw" and "detector.similarity_threshold" in p
    assert p["encoder.model_path"] == "" and p["map.index"] == "flat" and "verifier.segments.method" in p
    assert NodeSet(p).unknown_params() == []
    with pytest.raises(MegalocError, match="detector.similarity_treshold"):
        NodeSet({"detector.similarity_treshold": 0.5}).start()
    for old in ("model_path", "map_index", "device", "verifier.segment_method"):  # one name per setting
        assert NodeSet({old: "x"}).unknown_params() == [old]


def test_run_command_line_goes_through_the_one_set_parser(tmp_path):
    import argparse

    from megaloc_ros.errors import MegalocError
    from megaloc_ros.ros.runner import _cli_params, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--params", str(CONFIG), "--model-path", "m.onnx", "-p", "map.index:=ivfpq",
                              "-p", "detector.top_k:=3", "-p", "camera_matrix:=[500, 500, 320, 240, 640, 480]"])
    p = _cli_params(args)
    assert (p["encoder.model_path"], p["map.index"], p["detector.top_k"]) == ("m.onnx", "ivfpq", 3)
    assert p["camera_matrix"] == [500, 500, 320, 240, 640, 480]
    for bad, msg in [("detector.top_k=3", "NAME:=VALUE"), ("detector.top_k:=three", "detector.top_k must be of type int"),
                     ("map.index:=lsh", "map.index must be one of"), ("detector.top_kk:=3", "unknown parameter")]:
        with pytest.raises(MegalocError, match=msg):
            _cli_params(parser.parse_args(["-p", bad]))


def test_readme_launch_argument_table_matches_the_launch_file(monkeypatch):
    """README's launch-argument table lists exactly the arguments the launch file declares."""
    import re
    text = (ROOT / "README.md").read_text()
    table = text[text.index("Launch arguments ("):]
    table = table[:table.index("\n\n", table.index("| argument"))]
    in_readme = re.findall(r"^\| `([\w.]+)` \|", table, re.M)
    declared = [a.name for a in _launch_module(monkeypatch).generate_launch_description().entities
                if type(a).__name__ == "DeclareLaunchArgument"]
    assert sorted(in_readme) == sorted(declared)
