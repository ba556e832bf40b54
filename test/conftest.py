"""Shared fixtures. Real data comes from the repository's data/ (see data/README.md)."""
from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import pytest

from megaloc_ros.io import datasets

ROOT = Path(__file__).resolve().parents[1]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Tests marked ``ros`` (DDS: rclpy nodes, live replays, the demo's nodes) run one after
    another on one pytest-xdist worker (`make test` runs two): their ROS domains are chosen per
    file, not per worker, and their discovery timeouts assume they do not compete with each other.
    The tests of the installed package share one worker, so its venv is installed once."""
    for item in items:
        if item.get_closest_marker("ros"):
            item.add_marker(pytest.mark.xdist_group("dds"))
        elif "installed_venv" in getattr(item, "fixturenames", ()):  # one worker: one install, not two
            item.add_marker(pytest.mark.xdist_group("installed_venv"))


def clean_env(**extra) -> dict:
    """The environment without the project's paths and caches (what a user's shell has)."""
    drop = ("PYTHONPATH", "LD_LIBRARY_PATH", "AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH", "VIRTUAL_ENV",
            "MEGALOC_CACHE", "MEGALOC_ROS_ROOT", "MEGALOC_MODEL", "XDG_CACHE_HOME", "COLCON_PREFIX_PATH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def installed_venv(tmp_path_factory):
    """`pip install .` of what a clone holds (package, requirements, setup.py; no data, no tests)
    into a venv of its own: only tools/requirements/runtime.txt, no torch, no ROS. Shared by the
    tests of the installed package (one install: ~1 min). (venv dir, its python, a user's
    environment with HOME and XDG_CACHE_HOME under the temporary directory)."""
    tmp = tmp_path_factory.mktemp("installed")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    env = clean_env(HOME=str(tmp / "home"), XDG_CACHE_HOME=str(tmp / "xdg"))
    src = tmp / "src"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if f.startswith(("megaloc_ros/", "tools/requirements/")) or f in ("setup.py", "MANIFEST.in", "README.md"):
            if (ROOT / f).is_file():
                (src / f).parent.mkdir(parents=True, exist_ok=True)
                (src / f).write_bytes((ROOT / f).read_bytes())
    r = subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", str(src)],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return env_dir, env_dir / "bin" / "python", env


@pytest.fixture(scope="session")
def rtabmap_seq():
    return datasets.rtabmap()


@pytest.fixture(scope="session")
def corridor_seq():
    return datasets.corridor()


# --- encoder fixtures (real model: MegaLoc if exported, else the offline DINOv2 ViT-S/14) -------
@pytest.fixture(scope="session")
def real_encoder():
    """The encoder `load_encoder()` picks; features of the shipped sets are cached on disk
    (.cache/features/, keyed by model and image hashes) so reruns are fast."""
    from megaloc_ros.encoding.loader import load_encoder
    return load_encoder(device="cpu")


@pytest.fixture(scope="session")
def rtabmap_features(real_encoder, rtabmap_seq):
    """list[ImageFeatures], one per rtabmap frame, from `real_encoder`."""
    from megaloc_ros.encoding.encoder import encode_files
    return encode_files(real_encoder, rtabmap_seq.image_paths)


@pytest.fixture(scope="session")
def corridor_features(real_encoder, corridor_seq):
    """list[ImageFeatures], one per corridor frame (reference then query), from `real_encoder`."""
    from megaloc_ros.encoding.encoder import encode_files
    return encode_files(real_encoder, corridor_seq.image_paths)
