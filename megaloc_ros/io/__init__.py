"""Input and output: rosbag2 files, image decoding, the shipped data sets, safe file writes."""
