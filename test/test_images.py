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


def _mosaic(rgb, pattern, dtype=np.uint8):
    """The Bayer image a sensor with ``pattern`` (colours of its first 2x2 block, ROS naming)
    would give of ``rgb``."""
    ch = {"r": 0, "g": 1, "b": 2}
    out = np.zeros(rgb.shape[:2], dtype)
    for k, c in enumerate(pattern):
        y, x = divmod(k, 2)
        out[y::2, x::2] = rgb[y::2, x::2, ch[c]].astype(dtype) * (257 if dtype == np.uint16 else 1)
    return out


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
@pytest.mark.parametrize("bits", [8, 16])
def test_bayer_images_are_demosaiced_in_their_own_pattern(frame, pattern, bits):
    """A raw Bayer camera's image of a real frame comes back in colour; read with another
    pattern it would not (red and blue swapped, or green taken for them)."""
    dtype = np.uint16 if bits == 16 else np.uint8
    raw = _mosaic(frame, pattern, dtype)
    if bits == 16:
        raw[0, 0] = 65535  # the peak the 16-bit image is scaled by: full scale, as 8 bits had it
    data = raw.astype("<u2").tobytes() if bits == 16 else raw.tobytes()
    err = {}
    for other in ("rggb", "bggr", "gbrg", "grbg"):
        out = decode_raw(f"bayer_{other}{bits}", *raw.shape, raw.shape[1] * raw.itemsize, data)
        assert out.shape == frame.shape and out.dtype == np.uint8
        err[other] = np.abs(out[4:-4, 4:-4].astype(int) - frame[4:-4, 4:-4]).mean()
    assert err[pattern] < 2.0, err            # measured 0.74 (8 bits, rggb); a wrong pattern 9-13
    assert min(e for k, e in err.items() if k != pattern) > 2 * err[pattern], err


def _yuv422(rgb, order):
    """BT.601 limited-range YUV 4:2:2 bytes of ``rgb`` (U and V averaged over pixel pairs)."""
    f = rgb.astype(np.float64)
    y = 16 + 0.257 * f[..., 0] + 0.504 * f[..., 1] + 0.098 * f[..., 2]
    u = 128 - 0.148 * f[..., 0] - 0.291 * f[..., 1] + 0.439 * f[..., 2]
    v = 128 + 0.439 * f[..., 0] - 0.368 * f[..., 1] - 0.071 * f[..., 2]
    u, v = (u[:, 0::2] + u[:, 1::2]) / 2, (v[:, 0::2] + v[:, 1::2]) / 2
    planes = {"Y0": y[:, 0::2], "Y1": y[:, 1::2], "U": u, "V": v}
    out = np.stack([planes[k] for k in order], axis=2)   # 4 bytes per pixel pair
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(rgb.shape[0], -1)


@pytest.mark.parametrize("encoding, order", [("yuv422", "U Y0 V Y1"), ("uyvy", "U Y0 V Y1"),
                                             ("yuv422_yuy2", "Y0 U Y1 V"), ("yuyv", "Y0 U Y1 V")])
def test_yuv422_images_decode_to_the_colours_they_hold(frame, encoding, order):
    raw = _yuv422(frame, order.split())
    h, w = frame.shape[:2]
    out = decode_raw(encoding, h, w, raw.shape[1], raw.tobytes())
    assert out.shape == frame.shape
    assert np.abs(out.astype(int) - frame).mean() < 1.5   # measured 0.42; the other byte order 34
    swapped = "yuyv" if order.startswith("U") else "uyvy"
    assert np.abs(decode_raw(swapped, h, w, raw.shape[1], raw.tobytes()).astype(int) - frame).mean() > 20
    with pytest.raises(ImageDecodeError, match="even width"):
        decode_raw(encoding, h, w - 1, raw.shape[1], raw.tobytes())


def test_padded_rows_and_big_endian():
    img = (np.arange(2 * 3).reshape(2, 3) * 1000).astype(">u2")
    padded = np.zeros((2, 8), np.uint8)
    padded[:, :6] = img.view(np.uint8).reshape(2, 6)
    out = decode_raw("mono16", 2, 3, 8, padded.tobytes(), is_bigendian=True)
    np.testing.assert_array_equal(out[..., 0], np.round(img.astype(float) * 255 / 5000).astype(np.uint8))


@pytest.mark.parametrize("args, message", [
    (("nv21", 4, 4, 8, bytes(32)), "unsupported image encoding"),
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
