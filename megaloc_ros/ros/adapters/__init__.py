"""Thin nodes that hand the verifier's loops to an existing SLAM back end.

  lio_sam.py   LIO-SAM's external loop input: std_msgs/Float64MultiArray [t_query, t_match]
  rtabmap.py   RTAB-Map's add_link service (rtabmap_msgs, imported only when installed)
  frames.py    camera -> base transforms and covariances shared by them (numpy only)
"""
