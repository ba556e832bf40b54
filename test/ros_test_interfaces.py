"""Builds the test-only interface packages of test/interfaces/ with colcon (cached) and makes
them importable in this process (see test/interfaces/README.md)."""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "test" / "interfaces"
PACKAGES = ("rtabmap_msgs", "tf2_msgs")


def missing() -> tuple[str, ...]:
    """The packages of PACKAGES that this environment does not have (a sourced ROS 2 has tf2_msgs)."""
    import importlib.util
    return tuple(p for p in PACKAGES if importlib.util.find_spec(p) is None)


def _digest(packages) -> str:
    h = hashlib.sha256((sys.version + " ".join(packages)).encode())
    for p in sorted(SRC.rglob("*")):
        if p.is_file() and p.relative_to(SRC).parts[0] in packages:
            h.update(str(p.relative_to(SRC)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def build(packages=None) -> Path:
    """The merged install folder of the test interfaces (default: the ``missing()`` ones), built
    once per change of their files."""
    packages = tuple(missing() if packages is None else packages)
    cache = Path(os.environ.get("MEGALOC_CACHE") or ROOT / ".cache") / "test_interfaces"
    base = cache / _digest(packages)
    install = base / "install"
    if (base / "built").exists():
        return install
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # one build at a time; the others wait and reuse it
        if (base / "built").exists():
            return install
        shutil.rmtree(base, ignore_errors=True)
        (base / "src").mkdir(parents=True)
        for pkg in packages:
            shutil.copytree(SRC / pkg, base / "src" / pkg)
        env = dict(os.environ)
        cmake_args = [f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF"]
        if not env.get("ROS_DISTRO"):   # ROS 2 from the PyPI wheels in this venv (tools/setup_env.sh)
            env["CMAKE_PREFIX_PATH"] = env["AMENT_PREFIX_PATH"] = sys.prefix
            numpy_inc = Path("/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include")
            if numpy_inc.exists():
                cmake_args.append(f"-DPython3_NumPy_INCLUDE_DIR={numpy_inc}")
        colcon = shutil.which("colcon", path=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))
        if colcon is None:
            raise RuntimeError("colcon not found: run tools/setup_env.sh")
        cmd = [colcon, "--log-base", str(base / "log"), "build", "--merge-install",
               "--base-paths", str(base / "src"), "--build-base", str(base / "build"),
               "--install-base", str(install), "--cmake-args", *cmake_args]
        r = subprocess.run(cmd, env=env, cwd=base, capture_output=True, text=True, timeout=1200)
        if r.returncode != 0:
            raise RuntimeError(f"building the test interfaces failed:\n{(r.stdout + r.stderr)[-4000:]}")
        (base / "built").write_text("ok\n")
    return install


def activate(install: Path) -> None:
    """Make the built packages importable here: Python path, library path, and the libraries
    loaded up front (the dynamic loader read LD_LIBRARY_PATH when this process started)."""
    lib = install / "lib"
    for var, val in (("LD_LIBRARY_PATH", str(lib)), ("AMENT_PREFIX_PATH", str(install))):
        parts = [p for p in os.environ.get(var, "").split(os.pathsep) if p]
        if val not in parts:
            os.environ[var] = os.pathsep.join([val] + parts)
    for site in sorted(lib.glob("python3*/site-packages")):
        if str(site) not in sys.path:
            sys.path.insert(0, str(site))
    todo = sorted(lib.glob("*.so"))
    while todo:   # load in dependency order: retry what failed until nothing more loads
        failed = []
        for p in todo:
            try:
                ctypes.CDLL(str(p), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                failed.append(p)
        if len(failed) == len(todo):
            raise RuntimeError(f"cannot load {[p.name for p in failed]}")
        todo = failed
