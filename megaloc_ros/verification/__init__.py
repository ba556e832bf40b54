"""Stage 3, verification: candidate -> verified loop (or a rejection with its reason).

  segments.py   image segmentation (SLIC, Felzenszwalb, SAM)
  segvlad.py    SuperSegments over a Delaunay graph, VLAD per SuperSegment, voting
  geometry.py   local features, matching, RANSAC, relative pose
  verifier.py   per-keyframe storage and the decision rule
"""
