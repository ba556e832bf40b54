"""megaloc_ros: MegaLoc loop-closure detection for ROS 2.

The core (model, encoder, map, detector, verifier, evaluation) imports no rclpy;
the ROS 2 nodes live in ``megaloc_ros.ros``.
"""
# The generated interfaces (megaloc_ros.msg, megaloc_ros.srv) may be installed by colcon in
# another directory of the same package name; let them be found next to these sources.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)

__version__ = "0.1.0"
