"""Image decoding shared by the nodes and the bag reader: every supported encoding, and bad input."""
import numpy as np
import pytest

from megaloc_ros.errors import ImageDecodeError
from megaloc_ros.io.images import RAW_ENCODINGS, decode_compressed, decode_raw, downscale, encode_jpeg, encode_raw


@pytest.fixture(scope="module")
def frame(rtabmap_seq):
    return rtabmap_seq.load_rgb(0)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_colour_encodings_round_trip_exactly(frame, encoding):
    h, w, step, data = encode_raw(frame, encoding)
    np.testing.assert_array_equal(decode_raw(encoding, h, w, step, data), frame)


@pytest.mark.parametrize("encoding", ["mono8", "mono16"])
def test_mono_encodings_give_grey_rgb(frame, encoding):
    h, w, step, data = encode_raw(frame, encoding)
    out = decode_raw(encoding, h, w, step, data)
    grey = frame.mean(axis=2)
    assert out.shape == frame.shape
    assert np.array_equal(out[..., 0], out[..., 2])
    # mono16 is rescaled by its own peak, so compare up to that scale
    scale = 255.0 / grey.max() if encoding == "mono16" else 1.0
    assert np.abs(out[..., 0] - np.clip(grey * scale, 0, 255)).max() <= 1.01


def test_padded_rows_and_big_endian():
    img = (np.arange(2 * 3).reshape(2, 3) * 1000).astype(">u2")
    padded = np.zeros((2, 8), np.uint8)
    padded[:, :6] = img.view(np.uint8).reshape(2, 6)
    out = decode_raw("mono16", 2, 3, 8, padded.tobytes(), is_bigendian=True)
    np.testing.assert_array_equal(out[..., 0], np.round(img.astype(float) * 255 / 5000).astype(np.uint8))


@pytest.mark.parametrize("args, message", [
    (("yuv422", 4, 4, 8, bytes(32)), "unsupported image encoding"),
    (("rgb8", 4, 4, 6, bytes(48)), "step 6 is smaller"),
    (("rgb8", 0, 4, 12, b""), "zero size"),
    (("rgb8", 4, 4, 12, bytes(20)), "needs 48"),
])
def test_bad_raw_images_raise_clear_errors(args, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_raw(*args)


def test_jpeg_and_png(frame):
    import cv2
    jpg = decode_compressed("jpeg", encode_jpeg(frame, 95))
    assert jpg.shape == frame.shape and np.abs(jpg.astype(int) - frame).mean() < 3
    ok, png = cv2.imencode(".png", frame[:, :, ::-1])
    np.testing.assert_array_equal(decode_compressed("png", png.tobytes()), frame)


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"GIF89a....", "neither JPEG nor PNG"),
])
def test_bad_compressed_images(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_compressed("jpeg", data)


def test_truncated_and_corrupt_jpeg(frame):
    jpg = encode_jpeg(frame)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_compressed("jpeg", jpg[: len(jpg) // 2])
    garbage = jpg[:2] + bytes(200) + b"\xff\xd9"
    with pytest.raises(ImageDecodeError, match="corrupt"):
        decode_compressed("jpeg", garbage)


def test_jpeg_corrupt_in_the_middle_is_refused(frame):
    """End marker intact, bytes in the middle zeroed: OpenCV decodes it to garbage rows without
    a word; the strict decoder refuses it."""
    import cv2
    jpg = bytearray(encode_jpeg(frame))
    mid = len(jpg) // 2
    jpg[mid:mid + 500] = bytes(500)
    assert cv2.imdecode(np.frombuffer(bytes(jpg), np.uint8), cv2.IMREAD_COLOR) is not None  # the old path
    with pytest.raises(ImageDecodeError, match="corrupt JPEG"):
        decode_compressed("jpeg", bytes(jpg))


def test_images_above_max_pixels_are_refused_from_the_header(frame):
    import cv2
    png = bytearray(cv2.imencode(".png", frame)[1].tobytes())
    png[16:24] = (12000).to_bytes(4, "big") + (12000).to_bytes(4, "big")  # IHDR says 12000x12000
    with pytest.raises(ImageDecodeError, match="12000x12000 px exceeds max_image_pixels"):
        decode_compressed("png", bytes(png))
    h, w = frame.shape[:2]
    with pytest.raises(ImageDecodeError, match="exceeds max_image_pixels"):
        decode_compressed("jpeg", encode_jpeg(frame), max_pixels=h * w - 1)
    assert decode_compressed("jpeg", encode_jpeg(frame), max_pixels=h * w).shape == frame.shape
    with pytest.raises(ImageDecodeError, match="exceeds max_image_pixels"):  # raw: before touching data
        decode_raw("rgb8", 12000, 12000, 36000, b"")


def test_format_mismatch(frame):
    with pytest.raises(ImageDecodeError, match="holds JPEG"):
        decode_compressed("png", encode_jpeg(frame))


def test_supported_encodings_are_the_documented_ones():
    assert {"rgb8", "bgr8", "rgba8", "bgra8", "mono8", "mono16"} <= set(RAW_ENCODINGS)


def test_downscale_keeps_aspect_and_never_enlarges():
    rgb = np.random.default_rng(0).integers(0, 256, (384, 512, 3), np.uint8)
    small = downscale(rgb, 256)
    assert small.shape == (192, 256, 3) and small.dtype == np.uint8
    assert abs(float(small.mean()) - float(rgb.mean())) < 1.0  # area averaging keeps the brightness
    assert downscale(rgb, 512) is rgb and downscale(rgb, 0) is rgb and downscale(rgb, 4096) is rgb
    assert downscale(rgb[..., 0], 100).shape == (75, 100)  # grey images too
    assert downscale(np.zeros((1000, 3, 3), np.uint8), 10).shape == (10, 1, 3)  # never a zero side
