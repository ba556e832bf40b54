"""pip-installable core library and the `megaloc-ros` command line (no ROS needed).

The ROS 2 package (messages, nodes, launch) is built with colcon from CMakeLists.txt.
Dependencies come from tools/requirements/: runtime.txt (install_requires) and one file per extra.
"""
from pathlib import Path

from setuptools import find_packages, setup

REQUIREMENTS = Path(__file__).resolve().parent / "tools" / "requirements"


def requirements(name: str) -> list[str]:
    """The requirement lines of tools/requirements/<name>.txt (comments and blanks dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in (REQUIREMENTS / f"{name}.txt").read_text().splitlines())
    return [line for line in lines if line]


setup(
    name="megaloc_ros",
    version="0.1.0",
    description="MegaLoc loop-closure detection: encoder, incremental FAISS map, SegVLAD verification",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megaloc_ros", "megaloc_ros.*"]),
    package_data={"megaloc_ros": ["py.typed", "verification/vocabularies/*.npz"]},
    install_requires=requirements("runtime"),
    extras_require={
        # `megaloc-ros export` and the PyTorch fallback; pick the torch build for your machine yourself.
        "export": requirements("export"),
        # The fastest CPU variant (an OpenVINO IR, static int8): runtime, and NNCF to quantise it.
        "openvino": requirements("openvino"),
        "test": requirements("test"),
    },
    entry_points={"console_scripts": ["megaloc-ros = megaloc_ros.cli:main"]},
)
