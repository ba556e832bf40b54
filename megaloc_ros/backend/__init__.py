"""A pose-graph back end for users who have no SLAM back end of their own (no ROS here).

  pose_graph.py  keyframes from odometry + verified metric loops -> optimised trajectory (GTSAM iSAM2)
"""
