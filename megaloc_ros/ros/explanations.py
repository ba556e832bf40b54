"""``~/explanations``: a picture of each verdict for RViz (an Image display), rendered only while
someone subscribes.

``ExplanationPublisher`` holds a bounded cache of downscaled keyframe images (the verifier keeps
none) and, for the verdicts handed to ``publish``, renders ``verification.explain``'s picture
(query | match, SuperSegment similarities, inlier matches, the decision and its reason; layout
in megaloc_ros/verification/explain.py) and publishes it as sensor_msgs/Image (rgb8), stamped
with the query keyframe's stamp. With no subscriber nothing is rendered (``rendered`` counts the
pictures made). A verdict whose images have left the cache is skipped (``missing`` counts them).

Rendering recomputes the SuperSegment similarities and the inlier pairs
(``explain.explain_details``, ~20 ms) and segments both images (~100 ms per picture on a busy
CPU), in the caller's thread: by default only accepted loops are drawn.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable, Optional

import numpy as np
from rclpy.qos import QoSDurabilityPolicy, QoSHistoryPolicy, QoSProfile, QoSReliabilityPolicy
from sensor_msgs.msg import Image

from megaloc_ros.io.images import downscale
from megaloc_ros.ros import conversions as conv
from megaloc_ros.types import VerifiedLoop
from megaloc_ros.verification.explain import PANEL_HEIGHT, explain_details, render_explanation

# RViz's Image display subscribes reliable or best effort; a reliable publisher serves both
EXPLANATION_QOS = QoSProfile(history=QoSHistoryPolicy.KEEP_LAST, depth=5,
                             reliability=QoSReliabilityPolicy.RELIABLE,
                             durability=QoSDurabilityPolicy.VOLATILE)


class ExplanationPublisher:
    """See the module docstring.

    ``max_images``: keyframe images kept (oldest dropped first); ``max_side``: their longest
    side (the picture's panels are ``panel_height`` px high); ``include_rejected``: also draw
    rejected verdicts."""

    def __init__(self, node, topic: str = "~/explanations", max_images: int = 500, max_side: int = 320,
                 panel_height: int = PANEL_HEIGHT, include_rejected: bool = False, frame_id: str = ""):
        self.node = node
        self.publisher = node.create_publisher(Image, topic, EXPLANATION_QOS)
        self.max_images = int(max_images)
        self.max_side = int(max_side)
        self.panel_height = int(panel_height)
        self.include_rejected = include_rejected
        self.frame_id = frame_id
        self.rendered = 0     # pictures made
        self.published = 0    # pictures published
        self.missing = 0      # verdicts skipped: an image had left the cache
        self._images: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def topic(self) -> str:
        return self.publisher.topic_name

    def remember(self, keyframe_id: int, rgb: np.ndarray) -> None:
        """Keep ``rgb`` (downscaled to ``max_side``) for the pictures of ``keyframe_id``."""
        small = np.ascontiguousarray(downscale(np.asarray(rgb), self.max_side))
        with self._lock:
            self._images[int(keyframe_id)] = small
            self._images.move_to_end(int(keyframe_id))
            while len(self._images) > self.max_images:
                self._images.popitem(last=False)

    def image(self, keyframe_id: int) -> Optional[np.ndarray]:
        with self._lock:
            return self._images.get(int(keyframe_id))

    def __len__(self) -> int:
        with self._lock:
            return len(self._images)

    def wanted(self) -> bool:
        """Whether anyone subscribes (the only case in which pictures are rendered)."""
        return self.publisher.get_subscription_count() > 0

    def publish(self, loops: Iterable[VerifiedLoop], verifier) -> int:
        """Render and publish the picture of each verdict in ``loops`` (accepted ones only unless
        ``include_rejected``) decided by ``verifier``; returns how many were published. Nothing is
        rendered while no one subscribes."""
        if not self.wanted():
            return 0
        n = 0
        for loop in loops:
            if not (loop.accepted or self.include_rejected):
                continue
            c = loop.candidate
            q, m = self.image(c.query.id), self.image(c.match.id)
            if q is None or m is None:
                self.missing += 1
                continue
            picture = render_explanation(q, m, loop, explain_details(verifier, c), self.panel_height)
            self.rendered += 1
            self.publisher.publish(conv.rgb_to_image_msg(picture, c.query.stamp_ns,
                                                         self.frame_id or c.query.frame_id))
            self.published += 1
            n += 1
        return n

    def destroy(self) -> None:
        self.node.destroy_publisher(self.publisher)
