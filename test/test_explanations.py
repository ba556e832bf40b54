"""Why a loop was accepted: verification.explain's details and picture, on the real pipeline's
verdicts for the shipped rtabmap sequence, and ros.explanations publishing them over real DDS.

The verdicts come from ``pipeline.build()`` run on the rtabmap frames (the real encoder's
features, cached on disk by ``encode_files``); nothing of ours is replaced.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from megaloc_ros import pipeline as PL
from megaloc_ros.errors import MegalocError
from megaloc_ros.types import Candidate, Keyframe
from megaloc_ros.verification import explain as X
from megaloc_ros.verification.geometry import Camera


@pytest.fixture(scope="module")
def verdicts(real_encoder, rtabmap_seq, rtabmap_features):
    """(pipeline, every verdict, keyframe id -> rgb) of the default pipeline over rtabmap."""
    pipe = PL.build(PL.PipelineSettings(), real_encoder)
    loops, images = [], {}
    for i, f in enumerate(rtabmap_features):
        rgb = rtabmap_seq.load_rgb(i)
        res = pipe.process(rgb, int(rtabmap_seq.stamps_ns[i]), features=f)
        if res.detection.keyframe is not None:
            images[res.detection.keyframe.id] = rgb
        loops += res.loops
    assert any(l.accepted for l in loops) and any(not l.accepted for l in loops)
    return pipe, loops, images


def test_details_agree_with_every_verdict(verdicts):
    """Recomputed for each candidate, the inliers and the SegVLAD score are the verifier's."""
    pipe, loops, _ = verdicts
    with_segvlad = 0
    for l in loops:
        d = X.explain_details(pipe.verifier, l.candidate)
        assert d.verdict_inliers == l.inliers
        assert d.inliers == l.inliers, l.reason  # the drawn pairs are the ones it counted
        assert d.inlier_pairs.shape == (l.inliers, 2, 2)
        assert d.matches >= d.inliers
        if d.segvlad_score is None:
            continue
        with_segvlad += 1
        if l.verification_score:  # 0 when the verifier stopped before SegVLAD
            assert d.segvlad_score == pytest.approx(l.verification_score, abs=1e-5)
        assert float(d.votes.mean()) == pytest.approx(d.segvlad_score, abs=1e-5)
        assert np.all(np.maximum(d.best, 0) >= d.votes - 1e-6)  # a vote is a mean of clipped top-k
        assert d.similarity[np.arange(len(d.best)), d.partner] == pytest.approx(d.best)
    assert with_segvlad > len(loops) // 2
    # inlier keypoints lie inside the images they belong to
    d = X.explain_details(pipe.verifier, next(l for l in loops if l.accepted).candidate)
    for side, (w, h) in ((0, d.query_size), (1, d.match_size)):
        xy = d.inlier_pairs[:, side]
        assert xy.min() >= 0 and np.all(xy[:, 0] < w) and np.all(xy[:, 1] < h)
    ghost = Candidate(Keyframe(10 ** 6, 0), Keyframe(0, 0), 0.9, 0)
    with pytest.raises(MegalocError, match="never added"):
        X.explain_details(pipe.verifier, ghost)


def test_details_agree_with_the_verdicts_with_intrinsics(real_encoder, rtabmap_seq, rtabmap_features):
    """With a camera matrix the verifier fits an essential matrix: the refit agrees there too,
    on images the verifier saw at half the calibrated size (intrinsics scaled)."""
    settings = PL.PipelineSettings()
    K = np.array([[900.0, 0, 512], [0, 900.0, 384], [0, 0, 1]])  # calibrated at 1024x768
    pipe = PL.LoopClosurePipeline(PL.build_encoding(settings.encoder, real_encoder),
                                  PL.build_mapping(settings, real_encoder.model_name, real_encoder.descriptor_dim),
                                  PL.build_verification(settings.verifier, Camera(K, (1024, 768))))
    loops = []
    for i in range(0, len(rtabmap_features), 2):
        loops += pipe.process(rtabmap_seq.load_rgb(i), int(rtabmap_seq.stamps_ns[i]),
                              features=rtabmap_features[i]).loops
    accepted = [l for l in loops if l.accepted]
    assert accepted and all(l.transform is not None for l in accepted)
    for l in loops:
        d = X.explain_details(pipe.verifier, l.candidate)
        assert d.inliers == d.verdict_inliers == l.inliers, l.reason


def _band_box_colour(pic: np.ndarray, height: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in pic[height + 10, 6])


def test_picture_layout(verdicts, rtabmap_seq):
    pipe, loops, images = verdicts
    acc = max((l for l in loops if l.accepted), key=lambda l: l.inliers)
    rej = next(l for l in loops if not l.accepted and l.inliers > 0)
    h = 240
    for loop, colour in ((acc, X.ACCEPT), (rej, X.REJECT)):
        q, m = images[loop.candidate.query.id], images[loop.candidate.match.id]
        d = X.explain_details(pipe.verifier, loop.candidate)
        pic = X.render_explanation(q, m, loop, d, height=h)
        pw = round(q.shape[1] * h / q.shape[0])
        assert pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[2] == 3
        assert pic.shape[1] == 2 * pw + X.GAP
        assert pic.shape[0] > h + 60  # the decision band below the panels
        assert _band_box_colour(pic, h) == colour
        # the gap between the panels is background except where inlier lines cross it
        gap = pic[:h, pw:pw + X.GAP].reshape(-1, 3)
        assert (gap == X.BAND_BG).all(axis=1).mean() > 0.5
        # inlier dots: cyan pixels in both panels
        cyan = np.all(pic[:h] == X.INLIER, axis=2)
        assert cyan[:, :pw].sum() > d.inliers and cyan[:, pw + X.GAP:].sum() > d.inliers
        # the query panel is tinted by similarity; below the label, the match panel keeps the image
        # wherever nothing is drawn
        plain = X._fit(m, h)
        diff = np.any(pic[:h, pw + X.GAP:] != plain, axis=2)
        assert 0.0 < diff.mean() < 0.5
        tint = np.any(pic[30:h, :pw] != X._fit(q, h)[30:], axis=2)
        assert tint.mean() > 0.3
    # without SegVLAD descriptors the picture still shows geometry and says why
    d = X.explain_details(pipe.verifier, acc.candidate)
    d.best = d.votes = d.partner = d.similarity = d.segvlad_score = None
    d.segvlad_note = "no SegVLAD yet"
    pic = X.render_explanation(images[acc.candidate.query.id], images[acc.candidate.match.id], acc, d, height=h)
    assert pic.shape[1] == 2 * round(512 * h / 384) + X.GAP
    # a smaller picture than the images the verifier saw: keypoints are scaled, not clipped
    small = {k: v[::2, ::2] for k, v in images.items()}
    d = X.explain_details(pipe.verifier, acc.candidate)
    a = X.render_explanation(images[acc.candidate.query.id], images[acc.candidate.match.id], acc, d, height=h)
    b = X.render_explanation(small[acc.candidate.query.id], small[acc.candidate.match.id], acc, d, height=h)
    ca, cb = np.all(a[:h] == X.INLIER, axis=2), np.all(b[:h] == X.INLIER, axis=2)
    assert a.shape == b.shape and (ca & cb).sum() > 0.5 * ca.sum()


# ----------------------------------------------------------------------------- ROS

def _spin_until(executor, cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        executor.spin_once(timeout_sec=0.05)
    return cond()


@pytest.mark.ros
def test_publisher_over_dds_renders_only_for_subscribers(verdicts):
    """A plain node publishes the real pipeline's verdicts through ExplanationPublisher; a second
    node receives them over DDS. (verifier_node itself does not construct one yet.)"""
    rclpy = pytest.importorskip("rclpy")
    from rclpy.executors import SingleThreadedExecutor
    from sensor_msgs.msg import Image

    from megaloc_ros.ros import conversions as conv
    from megaloc_ros.ros.explanations import EXPLANATION_QOS, ExplanationPublisher

    pipe, loops, images = verdicts
    first = min(images)  # its image will leave the cache
    cached = [l for l in loops if first not in (l.candidate.query.id, l.candidate.match.id)]
    accepted = [l for l in cached if l.accepted][:3]
    rejected = [l for l in cached if not l.accepted][:2]
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=140 + os.getpid() % 20)
    try:
        node = rclpy.create_node("explainer", namespace="/explain_test", context=ctx)
        viewer = rclpy.create_node("viewer", context=ctx)
        ex = SingleThreadedExecutor(context=ctx)
        ex.add_node(node)
        ex.add_node(viewer)
        pub = ExplanationPublisher(node, max_images=len(images) - 1, max_side=256, panel_height=200)
        assert pub.topic == "/explain_test/explainer/explanations"
        for kid, rgb in sorted(images.items()):
            pub.remember(kid, rgb)
        assert len(pub) == len(images) - 1 and pub.image(first) is None  # the oldest left
        assert max(pub.image(max(images)).shape[:2]) == 256
        # nobody listens: nothing is rendered
        assert pub.publish(accepted + rejected, pipe.verifier) == 0
        assert pub.rendered == 0 and pub.published == 0

        got = []
        sub = viewer.create_subscription(Image, pub.topic, got.append, EXPLANATION_QOS)
        # both ends matched (discovery completes on each side on its own)
        assert _spin_until(ex, lambda: pub.wanted() and sub.get_publisher_count() == 1, 15.0), \
            "no DDS discovery within 15 s"
        n = pub.publish(accepted + rejected, pipe.verifier)
        assert n == len(accepted) and pub.rendered == len(accepted)  # rejected ones not drawn by default
        assert _spin_until(ex, lambda: len(got) == n, 15.0)
        for msg, loop in zip(got, accepted):
            c = loop.candidate
            assert conv.stamp_to_ns(msg.header.stamp) == c.query.stamp_ns
            rgb = conv.image_msg_to_rgb(msg)
            expect = X.render_explanation(pub.image(c.query.id), pub.image(c.match.id), loop,
                                          X.explain_details(pipe.verifier, c), 200)
            assert msg.encoding == "rgb8" and rgb.shape == expect.shape
            assert rgb.shape[1] == 2 * round(512 * 200 / 384) + X.GAP and rgb.shape[0] > 260
            assert np.array_equal(rgb, expect)
            assert tuple(rgb[210, 6]) == X.ACCEPT
        # rejected verdicts on request; a verdict whose image left the cache is skipped
        pub.include_rejected = True
        gone = next(l for l in loops if l.candidate.match.id == first)
        assert pub.publish(rejected + [gone], pipe.verifier) == len(rejected)
        assert pub.missing == 1
        assert _spin_until(ex, lambda: len(got) == n + len(rejected), 15.0)
        assert tuple(conv.image_msg_to_rgb(got[-1])[210, 6]) == X.REJECT
        # the subscriber leaves: rendering stops again
        viewer.destroy_subscription(sub)
        assert _spin_until(ex, lambda: not pub.wanted(), 15.0)
        before = pub.rendered
        assert pub.publish(accepted, pipe.verifier) == 0 and pub.rendered == before
        pub.destroy()
        ex.shutdown()
    finally:
        rclpy.shutdown(context=ctx)
