"""Stage 2, mapping: descriptor -> keyframe in the place map -> loop-closure candidates.

  place_map.py  the incremental FAISS map of keyframe descriptors
  map_file.py   its file format (versioned, checksummed)
  detector.py   keyframe selection, exclusion windows, threshold, temporal consistency
"""
