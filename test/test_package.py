"""Packaging: the core imports without ROS, and `pip install .` works in a plain venv."""
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import megaloc_ros

ROOT = Path(__file__).resolve().parents[1]
ROS_MODULES = ["rclpy", "std_msgs", "sensor_msgs", "geometry_msgs", "nav_msgs", "builtin_interfaces",
               "visualization_msgs", "diagnostic_msgs", "lifecycle_msgs", "megaloc_ros.msg", "megaloc_ros.srv"]


def core_modules():
    return sorted(m.name for m in pkgutil.walk_packages(megaloc_ros.__path__[:1], "megaloc_ros.")
                  if not m.name.startswith("megaloc_ros.ros") and m.name != "megaloc_ros.__main__")


def test_core_imports_without_ros():
    mods = core_modules()
    assert "megaloc_ros.io.images" in mods and "megaloc_ros.pipeline" in mods
    # A None entry in sys.modules makes `import rclpy` raise ImportError.
    code = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in ROS_MODULES)
            + "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in mods))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_setup_py_declares_the_cli():
    text = (ROOT / "setup.py").read_text()
    assert "megaloc-ros = megaloc_ros.cli:main" in text


# need PyTorch (the exporter, the model definitions, the encoder benchmark) or ROS (ros/)
NOT_CORE = ("megaloc_ros.ros", "megaloc_ros.encoding.model", "megaloc_ros.encoding.export",
            "megaloc_ros.bench.encoder", "megaloc_ros.__main__")

# Run in the plain venv: every core module imports without torch and ROS; with a model given,
# the Encoder runs it there.
CORE_CHECK = """
import importlib, importlib.util, pkgutil, sys
import megaloc_ros
assert importlib.util.find_spec("torch") is None and importlib.util.find_spec("rclpy") is None
skip = tuple(sys.argv[1].split(","))
mods = sorted(m.name for m in pkgutil.walk_packages(megaloc_ros.__path__, "megaloc_ros.", onerror=print)
              if not m.name.startswith(skip))
for m in mods:
    importlib.import_module(m)
if len(sys.argv) > 2:
    from megaloc_ros.encoding.encoder import Encoder
    from megaloc_ros.io.images import read_image_file
    f = Encoder(sys.argv[2], device="cpu").encode([read_image_file(sys.argv[3])])[0]
    print("descriptor", f.descriptor.shape[0])
assert "torch" not in sys.modules and "rclpy" not in sys.modules
print("core modules", len(mods))
print(megaloc_ros.__version__)
"""


def exported_model():
    """The cached offline ONNX model when this machine has it (tools/setup_env.sh), else None."""
    from megaloc_ros.encoding import loader
    from megaloc_ros.errors import WeightsError
    try:
        return loader.offline_model_path()
    except WeightsError:  # no backbone here: the import check still runs
        return None


@pytest.mark.slow
def test_pip_install_in_plain_venv(installed_venv, tmp_path):
    """`pip install .` with no ROS and no torch, then import every core module, run the Encoder
    on an exported model (when there is one) and the CLI."""
    env_dir, py, clean = installed_venv
    model = exported_model()
    args = [",".join(NOT_CORE)] + ([str(model), str(ROOT / "data" / "rtabmap" / "1.jpg")] if model else [])
    r = subprocess.run([str(py), "-c", CORE_CHECK, *args], env=clean, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == megaloc_ros.__version__ and int(lines[-2].split()[-1]) > 30, r.stdout
    assert not model or lines[-3].startswith("descriptor "), r.stdout
    r = subprocess.run([str(env_dir / "bin" / "megaloc-ros"), "--help"], env=clean, cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "make-bag" in r.stdout, r.stderr[-2000:]
