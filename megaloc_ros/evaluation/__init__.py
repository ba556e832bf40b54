"""Scoring a loop-closure run against ground truth: `megaloc-ros eval` and the demo.

ground_truth  which frame pairs are the same place (poses, loop matrices, trajectories)
metrics       PR curve, AUC, max recall at 100% precision, recall@K, latency (pure numpy)
replay        a rosbag through the core pipeline, offline (what the nodes run, without DDS)
report        metrics.json, PNG plots and one HTML page
(the `eval` command itself is megaloc_ros/eval_cli.py: its --live mode starts the ROS nodes)
"""
