"""The ROS 2 side of megaloc_ros: thin adapters around the core objects.

  conversions        ROS messages <-> the shared types (megaloc_ros.types) and RGB arrays
  params             ROS parameters with descriptors, ranges and read-only flags; YAML loading
  diagnostics        counters and the /diagnostics status of each node
  loop_closure_node  camera -> encoder -> place map -> ~/candidates, ~/keyframes, markers
  verifier_node      ~/keyframes + ~/candidates -> ~/loop_closures (verified), ~/rejected
  runner             `megaloc-ros run`: both nodes in one process; ``NodeSet`` for Python callers

Only this package imports rclpy.
"""
