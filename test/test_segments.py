"""Segmentation: label maps that follow image structure, small-region merging, errors."""
import numpy as np
import pytest

from megaloc_ros import segments
from megaloc_ros.errors import ImageDecodeError, WeightsError


def quadrants(h=120, w=160):
    img = np.zeros((h, w, 3), np.uint8)
    img[: h // 2, : w // 2] = (220, 30, 30)
    img[: h // 2, w // 2:] = (30, 220, 30)
    img[h // 2:, : w // 2] = (30, 30, 220)
    img[h // 2:, w // 2:] = (220, 220, 30)
    return img


def quadrant_of(h, w):
    yy, xx = np.indices((h, w))
    return (yy >= h // 2) * 2 + (xx >= w // 2)


@pytest.mark.parametrize("method", ["slic", "felzenszwalb"])
def test_segments_never_straddle_colour_boundaries(method):
    # fz_sigma 0: no pre-blur, which would leave two-pixel seam segments along the sharp edges
    lab = segments.segment_image(quadrants(), segments.SegmentParams(method=method, fz_sigma=0.0))
    q = quadrant_of(*lab.shape)
    assert lab.dtype == np.int32 and lab.min() == 0
    assert set(np.unique(lab)) == set(range(lab.max() + 1))  # contiguous
    for s in range(lab.max() + 1):
        # blurred edge pixels may join either side: allow a one-pixel seam, not a crossing
        share = np.bincount(q[lab == s], minlength=4).max() / np.count_nonzero(lab == s)
        assert share > 0.95, f"segment {s} crosses a colour edge"
    if method == "felzenszwalb":  # flat regions: exactly the four quadrants
        assert lab.max() + 1 == 4


def test_segment_at_reduced_resolution():
    img = np.ascontiguousarray(np.tile(quadrants(), (4, 4, 1)))  # 480 x 640
    lab = segments.segment_image(img, segments.SegmentParams(max_side=160))
    assert lab.shape == (120, 160)


def test_merge_small_joins_a_speck_to_its_surrounding_region():
    lab = np.zeros((20, 20), np.int64)
    lab[:, 10:] = 1
    lab[4:6, 2:4] = 2  # 4-pixel speck inside region 0
    out = segments.merge_small(lab, min_size=10)
    assert out.max() == 1
    assert np.all(out[4:6, 2:4] == out[0, 0])
    assert np.all(out[:, 10:] != out[0, 0])


def test_bad_image_and_missing_sam_models():
    with pytest.raises(ImageDecodeError):
        segments.segment_image(np.zeros((10, 10), np.uint8))
    with pytest.raises(WeightsError, match="not found"):
        segments.segment_image(quadrants(), segments.SegmentParams(method="sam"))
    with pytest.raises(ValueError):
        segments.segment_image(quadrants(), segments.SegmentParams(method="watershed"))


def test_real_image_gives_a_few_dozen_segments(rtabmap_seq):
    lab = segments.segment_image(rtabmap_seq.load_rgb(0))
    assert lab.shape == (120, 160)
    assert 15 <= lab.max() + 1 <= 80
