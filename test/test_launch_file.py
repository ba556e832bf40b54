"""The launch file and config/loop_closure.yaml against what the package installs and declares.

`ros2 launch` is not installable here, so the launch file is read as Python source (AST): it
must start only executables that CMakeLists installs, and pass only parameters the real nodes
declare. The YAML must hold every declared parameter with its default.
"""
from __future__ import annotations

import ast
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
    from megaloc_ros.ros.verifier_node import VerifierNode

    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=DOMAIN_ID)
    out = {}
    try:
        for cls in (LoopClosureNode, VerifierNode):
            node = cls(context=ctx, parameter_overrides=[Parameter("autostart", value=False)])
            names = [n for n in node._parameters if n not in ("use_sim_time", "start_type_description_service")]
            out[node.get_name()] = {n: node.get_parameter(n).value for n in names}
            node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)
    return out


def _installed_programs() -> set[str]:
    cmake = (ROOT / "CMakeLists.txt").read_text()
    progs = set()
    for block in re.findall(r"install\s*\(\s*PROGRAMS(.*?)DESTINATION", cmake, re.S):
        progs |= {Path(p).name for p in block.split()}
    return progs


def _launch_nodes():
    """(executable, name, [parameter names]) of each launch_ros Node(...) in the launch file."""
    tree = ast.parse(LAUNCH.read_text())
    dict_keys: dict[str, set[str]] = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Assign):
            for t in n.targets:
                if isinstance(t, ast.Name) and isinstance(n.value, ast.Dict):
                    dict_keys.setdefault(t.id, set()).update(
                        k.value for k in n.value.keys if isinstance(k, ast.Constant))
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name) and isinstance(t.slice, ast.Constant):
                    dict_keys.setdefault(t.value.id, set()).add(t.slice.value)
    nodes = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Node":
            kw = {k.arg: k.value for k in n.keywords}
            names = set()
            for item in getattr(kw.get("parameters"), "elts", []):
                if isinstance(item, ast.Name) and item.id in dict_keys:
                    names |= dict_keys[item.id]
                elif isinstance(item, ast.Dict):
                    names |= {k.value for k in item.keys if isinstance(k, ast.Constant)}
            nodes.append((kw["executable"].value, kw["name"].value, kw["package"].value, names))
    return nodes


def test_launch_starts_only_installed_executables():
    nodes = _launch_nodes()
    assert {n[0] for n in nodes} == {"loop_closure_node", "verifier_node"}
    installed = _installed_programs()
    for exe, _, package, _ in nodes:
        assert package == "megaloc_ros"
        assert exe in installed, f"launch file starts {exe}, CMakeLists installs {sorted(installed)}"
        script = ROOT / "scripts" / exe
        assert script.exists() and os.access(script, os.X_OK), f"{script} missing or not executable"


def test_launch_passes_only_declared_parameters(declared):
    nodes = _launch_nodes()
    for exe, name, _, params in nodes:
        assert params, f"{name}: no parameters found in the launch file (parser out of date?)"
        unknown = params - set(declared[name])
        assert not unknown, f"launch file sets {sorted(unknown)} that {name} does not declare"
    # the arguments of the issue are all there
    src = LAUNCH.read_text()
    for arg in ("image_topic", "image_transport", "encoder.model_path", "params_file", "namespace", "use_verifier",
                "map_path"):
        assert f'DeclareLaunchArgument("{arg}"' in src


def test_config_holds_every_parameter_with_its_default(declared):
    doc = yaml.safe_load(CONFIG.read_text())
    cfg = doc["/**"]["ros__parameters"]
    every = {}
    for node_params in declared.values():
        every.update(node_params)
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
