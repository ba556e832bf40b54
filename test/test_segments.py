"""Segmentation: label maps that follow image structure, small-region merging, errors."""
import numpy as np
import pytest

from megaloc_ros.verification import segments
from megaloc_ros.errors import ImageDecodeError, MegalocError, WeightsError


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
    with pytest.raises(MegalocError, match="verifier.segments.method must be one of slic, felzenszwalb, sam"):
        segments.SegmentParams(method="watershed")
    with pytest.raises(MegalocError, match="verifier.segments.n_segments"):
        segments.SegmentParams(n_segments=0)


def test_real_image_gives_a_few_dozen_segments(rtabmap_seq):
    lab = segments.segment_image(rtabmap_seq.load_rgb(0))
    assert lab.shape == (120, 160)
    assert 15 <= lab.max() + 1 <= 80


def _tiny_sam(tmp_path):
    """A stand-in for a SAM/MobileSAM ONNX export with the official inputs and outputs: the
    'encoder' pools the normalised red channel to a 64x64 grid, the 'decoder' returns a sharp
    mask of red pixels (for any point) at the original size, with predicted IoU 0.95."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w = np.zeros((256, 3, 1, 1), np.float32)
    w[0, 0] = 1.0
    enc = helper.make_graph(
        [helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[16, 16], strides=[16, 16]),
         helper.make_node("Conv", ["pooled", "w"], ["image_embeddings"])],
        "enc", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 1024, 1024])],
        [helper.make_tensor_value_info("image_embeddings", TensorProto.FLOAT, [1, 256, 64, 64])],
        [numpy_helper.from_array(w, "w")])
    f = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info("image_embeddings", f, [1, 256, 64, 64]),
           helper.make_tensor_value_info("point_coords", f, [1, None, 2]),
           helper.make_tensor_value_info("point_labels", f, [1, None]),
           helper.make_tensor_value_info("mask_input", f, [1, 1, 256, 256]),
           helper.make_tensor_value_info("has_mask_input", f, [1]),
           helper.make_tensor_value_info("orig_im_size", f, [2])]
    consts = [numpy_helper.from_array(np.array(x, dtype), n) for n, x, dtype in [
        ("starts", [0], np.int64), ("ends", [1], np.int64), ("axes", [1], np.int64),
        ("lead", [1, 1], np.int64), ("thr", 0.0, np.float32), ("gain", 100.0, np.float32),
        ("iou", [[0.95]], np.float32)]]
    nodes = [
        helper.make_node("Slice", ["image_embeddings", "starts", "ends", "axes"], ["red"]),
        helper.make_node("Cast", ["orig_im_size"], ["hw"], to=TensorProto.INT64),
        helper.make_node("Concat", ["lead", "hw"], ["sizes"], axis=0),
        helper.make_node("Resize", ["red", "", "", "sizes"], ["up"], mode="nearest"),
        helper.make_node("Sub", ["up", "thr"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["masks"]),
        helper.make_node("Identity", ["iou"], ["iou_predictions"]),
        helper.make_node("Identity", ["red"], ["low_res_masks"])]
    outs = [helper.make_tensor_value_info("masks", f, [1, 1, None, None]),
            helper.make_tensor_value_info("iou_predictions", f, [1, 1]),
            helper.make_tensor_value_info("low_res_masks", f, [1, 1, 64, 64])]
    dec = helper.make_graph(nodes, "dec", ins, outs, consts)
    paths = []
    for name, g in (("enc.onnx", enc), ("dec.onnx", dec)):
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        onnx.save(m, tmp_path / name)
        paths.append(str(tmp_path / name))
    return paths


def test_sam_masks_become_a_label_map(tmp_path):
    enc, dec = _tiny_sam(tmp_path)
    img = quadrants(128, 128)  # square, so no padding in the encoder
    lab = segments.segment_image(img, segments.SegmentParams(
        method="sam", sam_encoder=enc, sam_decoder=dec, sam_points_per_side=2, max_side=128))
    q = quadrant_of(128, 128)
    red = (q == 0) | (q == 3)  # red (220, 30, 30) and yellow (220, 220, 30) quadrants
    # the mask (two diagonal quadrants) is one segment; the uncovered rest falls apart into
    # its two 4-connected regions
    assert lab.max() + 1 == 3
    assert len(np.unique(lab[red])) == 1
    assert lab[0, 127] != lab[127, 0] and lab[0, 127] != lab[0, 0] != lab[127, 0]
    for quad in (1, 2):
        assert len(np.unique(lab[q == quad])) == 1


def test_sam_decoder_with_other_inputs_is_refused(tmp_path):
    enc, _ = _tiny_sam(tmp_path)
    with pytest.raises(WeightsError, match="not a SAM prompt decoder"):
        segments.SamSegmenter(enc, enc)
