"""Installing the package: the runtime dependencies are declared once (tools/requirements/runtime.txt)
and cover what the runtime modules import; a clean venv with only them runs the encoder on an
exported model (no torch); the installed cache lives in the user's cache directory."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import clean_env

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "tools" / "requirements"
# setup.py: install_requires and one file per extra
DECLARED = {None: "runtime", "export": "export", "openvino": "openvino", "test": "test"}

# import name -> distribution that provides it
IMPORT_TO_DIST = {
    "numpy": "numpy", "cv2": "opencv-python-headless", "onnxruntime": "onnxruntime", "faiss": "faiss-cpu",
    "scipy": "scipy", "skimage": "scikit-image", "yaml": "pyyaml", "tqdm": "tqdm", "rosbags": "rosbags",
    "matplotlib": "matplotlib", "threadpoolctl": "threadpoolctl", "simplejpeg": "simplejpeg", "gtsam": "gtsam", "evo": "evo",
    "torch": "torch", "safetensors": "safetensors", "onnx": "onnx", "onnxscript": "onnxscript",
    "openvino": "openvino", "nncf": "nncf", "kornia": "kornia",
}
# Imports a runtime module may make inside a function (never at module level) for an optional
# feature, with the extra that provides them: the torch backend, an OpenVINO IR, exporting LighterGlue.
OPTIONAL_IMPORTS = {"torch": "export", "openvino": "openvino", "evo": "test", "kornia": "export"}
# Provided by the ROS 2 installation; each must be a package.xml dependency.
ROS_IMPORTS = {"rclpy", "rcl_interfaces", "builtin_interfaces", "std_msgs", "geometry_msgs", "sensor_msgs",
               "nav_msgs", "visualization_msgs", "diagnostic_msgs", "lifecycle_msgs", "launch", "launch_ros",
               "tf2_msgs"}
# Message packages of the back ends an adapter serves, imported only when present (not declared).
OPTIONAL_ROS_IMPORTS = {"rtabmap_msgs"}
# runtime distribution -> its rosdep key in package.xml, or None: pip only (named in package.xml's comment)
ROSDEP_KEYS = {
    "numpy": "python3-numpy", "opencv-python-headless": "python3-opencv", "scipy": "python3-scipy",
    "scikit-image": "python3-skimage", "pyyaml": "python3-yaml", "tqdm": "python3-tqdm",
    "matplotlib": "python3-matplotlib",
    "onnxruntime": None, "faiss-cpu": None, "rosbags": None, "threadpoolctl": None, "simplejpeg": None,
    "gtsam": None,
}


def read_requirements(path: Path) -> tuple[list[Requirement], list[str]]:
    """(requirements, included files) of a requirements file, without following -r."""
    reqs, includes = [], []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r"):
            includes.append(line[2:].strip())
        elif line:
            reqs.append(Requirement(line))
    return reqs, includes


def declared(name: str) -> dict[str, Requirement]:
    reqs, includes = read_requirements(REQ / f"{name}.txt")
    assert not includes, f"{name}.txt: a declared set includes nothing"
    return {canonicalize_name(r.name): r for r in reqs}


def runtime_modules() -> list[Path]:
    """What the nodes and the CLI run with an exported model: all but the PyTorch model
    definitions, the exporter and the benchmarks; the node executables and the launch file."""
    pkg = ROOT / "megaloc_ros"
    skip = (pkg / "encoding" / "model", pkg / "encoding" / "export.py", pkg / "bench")
    mods = [p for p in pkg.rglob("*.py") if not any(p == s or s in p.parents for s in skip)]
    return mods + sorted((ROOT / "scripts").iterdir()) + sorted((ROOT / "launch").glob("*.py"))


def third_party_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level name, line, at module level) of each absolute import outside the standard library."""
    tree = ast.parse(path.read_text(), str(path))
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in ("megaloc_ros", "__future__"):
                out.append((top, node.lineno, id(node) not in nested))
    return out


def test_setup_py_declares_the_requirement_files(tmp_path):
    """The built metadata (PEP 517, as pip sees it) holds exactly runtime.txt and the extras' files."""
    src = tmp_path / "src"
    for f in ["setup.py", "MANIFEST.in"] + [str(p.relative_to(ROOT)) for p in REQ.glob("*.txt")]:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_bytes((ROOT / f).read_bytes())
    (src / "megaloc_ros").mkdir()
    (src / "megaloc_ros" / "__init__.py").write_text("")
    (tmp_path / "meta").mkdir()
    code = ("import sys; from setuptools import build_meta as b; "
            "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "meta")], cwd=src, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = (tmp_path / "meta" / r.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    got: dict = {}
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            extra = re.search(r'extra == "([^"]+)"', str(req.marker)) if req.marker else None
            got.setdefault(extra.group(1) if extra else None, {})[canonicalize_name(req.name)] = req.specifier
    for extra, name in DECLARED.items():
        want = {k: r.specifier for k, r in declared(name).items()}
        assert got.get(extra) == want, f"setup.py {extra or 'install_requires'} != tools/requirements/{name}.txt"


def test_each_requirement_is_listed_once():
    """runtime/export/openvino/test are disjoint; core.txt and dev.txt only include them (and pin)."""
    seen: dict[str, str] = {}
    for name in DECLARED.values():
        for dist in declared(name):
            assert dist not in seen, f"{dist} in both {seen[dist]}.txt and {name}.txt"
            seen[dist] = name
    assert set(ROSDEP_KEYS) == set(declared("runtime")), "ROSDEP_KEYS must name every runtime dependency"
    for top, want in (("core", {"runtime.txt", "export.txt", "openvino.txt"}), ("dev", {"test.txt"})):
        reqs, includes = read_requirements(REQ / f"{top}.txt")
        assert set(includes) == want, f"{top}.txt includes {includes}"
        for r in reqs:  # a pin of a declared package for these machines, never a new requirement
            assert canonicalize_name(r.name) in seen and str(r.specifier).startswith("=="), \
                f"{top}.txt lists {r}: declare it in runtime/export/openvino/test.txt instead"


def test_runtime_modules_import_only_declared_packages():
    runtime = set(declared("runtime"))
    extras = {name: set(declared(name)) for name in ("export", "openvino", "test")}
    problems = []
    for path in runtime_modules():
        rel = path.relative_to(ROOT)
        for top, line, module_level in third_party_imports(path):
            if top in ROS_IMPORTS or top in OPTIONAL_ROS_IMPORTS and not module_level:
                continue
            dist = IMPORT_TO_DIST.get(top)
            if dist is None:
                problems.append(f"{rel}:{line}: `{top}` is in no map: add its distribution to "
                                "tools/requirements/runtime.txt and IMPORT_TO_DIST")
            elif dist in runtime:
                continue
            elif top in OPTIONAL_IMPORTS and not module_level and dist in extras[OPTIONAL_IMPORTS[top]]:
                continue  # lazy, for an optional feature: the extra provides it
            else:
                problems.append(f"{rel}:{line}: imports `{top}` ({dist}), not a runtime dependency"
                                + (" (at module level)" if module_level else ""))
    assert not problems, "\n".join(problems)


def test_package_xml_declares_the_runtime_dependencies():
    text = (ROOT / "package.xml").read_text()
    root = ET.fromstring(text)
    depends = {e.text.strip() for tag in ("depend", "exec_depend") for e in root.iter(tag)}
    comments = " ".join(re.findall(r"<!--(.*?)-->", text, re.S))
    for dist, key in ROSDEP_KEYS.items():
        if key:
            assert key in depends, f"package.xml: exec_depend {key} ({dist}) missing"
        else:
            assert re.search(rf"\b{re.escape(dist)}\b", comments), f"package.xml: name pip-only {dist} in its comment"
    used = {top for p in runtime_modules() for top, _, _ in third_party_imports(p) if top in ROS_IMPORTS}
    assert used <= depends, f"ROS packages imported but not in package.xml: {sorted(used - depends)}"


def _pip_lines(text: str) -> list[str]:
    """Each `pip install` command, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [m.group(0) for m in re.finditer(r"pip3? install[^\n&;|#]*", joined)]


def _named_runtime_packages(line: str) -> set[str]:
    """Runtime packages a pip line names itself (a numpy cap is allowed: ROS debs need numpy 1.x)."""
    runtime = set(declared("runtime"))
    words = [w.strip("\"'") for w in line.split()[2:] if not w.startswith("-")]
    prev_opt = re.findall(r"(-[rc])\s+(\S+)", line)
    files = {f for _, f in prev_opt}
    names = set()
    for w in words:
        if w in files or "/" in w or w == ".":
            continue
        try:
            names.add(canonicalize_name(Requirement(w).name))
        except Exception:
            continue
    return (names & runtime) - {"numpy"}


def test_dockerfile_installs_runtime_txt():
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r"^COPY\s+tools/requirements/runtime\.txt\s+(\S+)", text, re.M)
    assert m, "the Dockerfile copies tools/requirements/runtime.txt"
    lines = _pip_lines(text)
    assert any(re.search(rf"-r\s+{re.escape(m.group(1))}\b", ln) for ln in lines), "and pip installs it"
    for ln in lines:
        assert not _named_runtime_packages(ln), f"Dockerfile names runtime packages itself: {ln}"


def test_readme_install_line_uses_runtime_txt():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Use it from an existing ROS 2 workspace\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, "README: section 'Use it from an existing ROS 2 workspace'"
    lines = _pip_lines(m.group(1))
    assert any("tools/requirements/runtime.txt" in ln or re.search(r"pip3? install\s+(\S*/)?(\.|megaloc_ros)(\s|$)", ln)
               for ln in lines), f"README's install line must install tools/requirements/runtime.txt: {lines}"
    for ln in _pip_lines(text):
        assert not _named_runtime_packages(ln), f"README names runtime packages itself: {ln}"


def test_megaloc_ros_command_is_installed_by_colcon():
    script = ROOT / "scripts" / "megaloc-ros"
    assert os.access(script, os.X_OK) and "megaloc_ros.cli" in script.read_text()
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"install\(PROGRAMS[^)]*scripts/megaloc-ros", cmake)



def test_default_cache_is_the_users_cache_directory(tmp_path):
    code = "from megaloc_ros.encoding.cache import cache_root; print(cache_root())"

    def root(**env):
        r = subprocess.run([sys.executable, "-c", code], env=clean_env(PYTHONPATH=str(ROOT), **env),
                           cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        return Path(r.stdout.strip())

    assert root(HOME=str(tmp_path)) == tmp_path / ".cache" / "megaloc_ros"
    assert root(HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "xdg")) == tmp_path / "xdg" / "megaloc_ros"
    assert root(HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "xdg"), MEGALOC_CACHE="/somewhere") == Path("/somewhere")
    # tools/with_env.sh (make test, make demo) keeps the repository's cache
    r = subprocess.run([str(ROOT / "tools" / "with_env.sh"), "python", "-c", code],
                       env=clean_env(), cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and Path(r.stdout.strip()) == ROOT / ".cache", r.stderr[-2000:]


def offline_model() -> Path:
    """The cached offline ONNX model (tools/setup_env.sh builds it), found by the model search."""
    from megaloc_ros.encoding.loader import offline_model_path
    return offline_model_path()


ENCODE = """
import importlib.util, json, sys
assert importlib.util.find_spec("torch") is None, "torch is installed"
from megaloc_ros.encoding.cache import cache_root
from megaloc_ros.encoding.encoder import Encoder
from megaloc_ros.io.images import read_image_file
enc = Encoder(sys.argv[1], device="cpu")
f = enc.encode([read_image_file(sys.argv[2])])[0]
assert "torch" not in sys.modules
print(json.dumps({"descriptor": f.descriptor.tolist(), "patches": list(f.patch_features.shape),
                  "cache": str(cache_root()), "file": sys.modules["megaloc_ros"].__file__}))
"""


@pytest.mark.slow
def test_clean_venv_with_the_runtime_dependencies_encodes_with_an_exported_model(installed_venv, tmp_path):
    """`pip install .` into a venv of its own (only runtime.txt, no torch, no ROS), then the node's
    encoder on the offline ONNX model gives the descriptor the development environment gives."""
    model = offline_model()
    image = ROOT / "data" / "rtabmap" / "1.jpg"
    env_dir, py, env = installed_venv
    r = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], env=env, capture_output=True, text=True)
    installed = {canonicalize_name(d["name"]) for d in json.loads(r.stdout)}
    assert set(declared("runtime")) <= installed and "torch" not in installed
    r = subprocess.run([str(py), "-c", ENCODE, str(model), str(image)], env=env, cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(str(env_dir)), out["file"]  # the installed copy, not the working tree
    assert Path(out["cache"]) == Path(env["XDG_CACHE_HOME"]) / "megaloc_ros"
    from megaloc_ros.encoding.encoder import Encoder
    from megaloc_ros.io.images import read_image_file
    ref = Encoder(model, device="cpu").encode([read_image_file(image)])[0]
    assert out["patches"] == list(ref.patch_features.shape)
    assert float(np.dot(np.asarray(out["descriptor"], np.float32), ref.descriptor)) > 0.999
