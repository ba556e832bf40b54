"""pip-installable core library and the `megaloc-ros` command line (no ROS needed).

The ROS 2 package (messages, nodes, launch) is built with colcon from CMakeLists.txt.
"""
from setuptools import find_packages, setup

setup(
    name="megaloc_ros",
    version="0.1.0",
    description="MegaLoc loop-closure detection: encoder, incremental FAISS map, SegVLAD verification",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megaloc_ros", "megaloc_ros.*"]),
    package_data={"megaloc_ros": ["py.typed"]},
    install_requires=[
        "numpy>=1.26",
        "onnxruntime>=1.20",
        "faiss-cpu>=1.9",
        "opencv-python-headless>=4.9",
        "scipy>=1.13",
        "scikit-image>=0.24",
        "pyyaml>=6",
        "tqdm>=4.66",
        "rosbags>=0.10",
        "matplotlib>=3.8",
    ],
    extras_require={
        # Export and the PyTorch fallback; pick the torch build for your machine yourself.
        "export": ["torch>=2.5", "safetensors>=0.4", "onnx>=1.17", "onnxscript>=0.2"],
        # The fastest CPU variant (an OpenVINO IR, static int8): runtime, and NNCF to quantise it.
        "openvino": ["openvino>=2025.0", "nncf>=2.16"],
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
    },
    entry_points={"console_scripts": ["megaloc-ros = megaloc_ros.cli:main"]},
)
