"""Decoding camera images to RGB uint8 arrays, shared by the nodes, the bag reader and the CLI.

Works on the plain fields of ``sensor_msgs/Image`` and ``sensor_msgs/CompressedImage`` (so it
serves rclpy messages and rosbags' messages alike) and raises ImageDecodeError on bad input.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from megaloc_ros.errors import ImageDecodeError

# encoding -> (channels, dtype, channel order to reach RGB; for the layouts OpenCV converts,
# ``_CONVERTED``, the name of its cv2 conversion code instead)
RAW_ENCODINGS = {
    "rgb8": (3, np.uint8, (0, 1, 2)),
    "bgr8": (3, np.uint8, (2, 1, 0)),
    "rgba8": (4, np.uint8, (0, 1, 2)),
    "bgra8": (4, np.uint8, (2, 1, 0)),
    "mono8": (1, np.uint8, None),
    "8UC1": (1, np.uint8, None),
    "mono16": (1, np.uint16, None),
    "16UC1": (1, np.uint16, None),
}
# Raw sensor layouts (many industrial and USB cameras), converted by OpenCV: a Bayer mosaic,
# named by the colours of its first 2x2 block (OpenCV names it by the second row's, so ROS
# rggb is OpenCV's BG), and YUV 4:2:2 (2 bytes per pixel; ROS "yuv422" is UYVY).
_CONVERTED = {
    "bayer_rggb8": (1, np.uint8, "COLOR_BayerBG2RGB"), "bayer_bggr8": (1, np.uint8, "COLOR_BayerRG2RGB"),
    "bayer_gbrg8": (1, np.uint8, "COLOR_BayerGR2RGB"), "bayer_grbg8": (1, np.uint8, "COLOR_BayerGB2RGB"),
    "bayer_rggb16": (1, np.uint16, "COLOR_BayerBG2RGB"), "bayer_bggr16": (1, np.uint16, "COLOR_BayerRG2RGB"),
    "bayer_gbrg16": (1, np.uint16, "COLOR_BayerGR2RGB"), "bayer_grbg16": (1, np.uint16, "COLOR_BayerGB2RGB"),
    "yuv422": (2, np.uint8, "COLOR_YUV2RGB_UYVY"), "uyvy": (2, np.uint8, "COLOR_YUV2RGB_UYVY"),
    "yuv422_yuy2": (2, np.uint8, "COLOR_YUV2RGB_YUYV"), "yuyv": (2, np.uint8, "COLOR_YUV2RGB_YUYV"),
}
RAW_ENCODINGS.update(_CONVERTED)


# Larger images are refused before decoding (about 4096x4096): a node's memory stays bounded.
MAX_IMAGE_PIXELS = 4096 * 4096


def decode_raw(encoding: str, height: int, width: int, step: int, data, is_bigendian: bool = False,
               max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """``sensor_msgs/Image`` fields -> RGB uint8 [H, W, 3].

    16-bit mono and Bayer images are scaled by their own maximum: many cameras fill only 10-12
    bits.
    """
    spec = RAW_ENCODINGS.get(encoding)
    if spec is None:
        raise ImageDecodeError(f"unsupported image encoding '{encoding}' (supported: {', '.join(RAW_ENCODINGS)})")
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"image has zero size ({width}x{height})")
    check_pixels(width, height, max_pixels)
    channels, dtype, order = spec
    if channels == 2 and width % 2:
        raise ImageDecodeError(f"{encoding} needs an even width (2 pixels share U and V), got {width}")
    itemsize = np.dtype(dtype).itemsize
    row = width * channels * itemsize
    if step < row:
        raise ImageDecodeError(f"step {step} is smaller than width*channels*bytes = {row} for {encoding}")
    buf = np.frombuffer(memoryview(data), dtype=np.uint8)
    if buf.size < step * (height - 1) + row:
        raise ImageDecodeError(f"image data has {buf.size} bytes, {encoding} {width}x{height} step {step} needs {step * height}")
    rows = np.lib.stride_tricks.as_strided(buf, shape=(height, row), strides=(step, 1))
    dt = np.dtype(dtype).newbyteorder(">" if is_bigendian else "<") if itemsize > 1 else np.dtype(dtype)
    px = np.ascontiguousarray(rows).view(dt).reshape(height, width, channels)
    if itemsize > 1:
        peak = max(int(px.max()), 1)
        px = (px.astype(np.float32) * (255.0 / peak)).round().astype(np.uint8)
    if encoding in _CONVERTED:
        import cv2
        return cv2.cvtColor(px if channels == 2 else px[:, :, 0], getattr(cv2, order))
    if channels == 1:
        return np.repeat(px, 3, axis=2)
    return np.ascontiguousarray(px[:, :, list(order)])


def check_pixels(width: int, height: int, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """ImageDecodeError when an image is larger than ``max_pixels``: checked from the header,
    before decoding (a 431 KB PNG can hold 12000x12000 pixels, 432 MB decoded)."""
    if max_pixels and width * height > max_pixels:
        raise ImageDecodeError(f"image of {width}x{height} px exceeds max_image_pixels ({max_pixels}); "
                               "downscale it at the camera or raise the limit")


def compressed_size(buf: np.ndarray, is_jpeg: bool) -> tuple[int, int]:
    """(width, height) from a JPEG or PNG header."""
    if is_jpeg:
        import simplejpeg
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(buf.tobytes())
        except ValueError as exc:
            raise ImageDecodeError(f"corrupt JPEG header: {exc}") from None
        return int(width), int(height)
    if buf.size < 24 or buf[12:16].tobytes() != b"IHDR":
        raise ImageDecodeError("corrupt PNG header (no IHDR chunk)")
    return int.from_bytes(buf[16:20].tobytes(), "big"), int.from_bytes(buf[20:24].tobytes(), "big")


def decode_compressed(fmt: str, data, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """``sensor_msgs/CompressedImage`` (jpeg or png) -> RGB uint8 [H, W, 3].

    JPEG is decoded strictly (libjpeg-turbo through simplejpeg, its warnings are errors): OpenCV
    turns a JPEG corrupted in the middle, with its end marker intact, into a picture of garbage
    rows without a word."""
    import cv2

    buf = np.frombuffer(memoryview(data), dtype=np.uint8)
    f = (fmt or "").lower()
    if buf.size == 0:
        raise ImageDecodeError("compressed image is empty")
    is_jpeg = buf[:2].tobytes() == b"\xff\xd8"
    is_png = buf[:8].tobytes() == b"\x89PNG\r\n\x1a\n"
    if not (is_jpeg or is_png):
        raise ImageDecodeError(f"compressed image (format '{fmt}') is neither JPEG nor PNG")
    if ("jpeg" in f or "jpg" in f) and not is_jpeg or "png" in f and not is_png:
        raise ImageDecodeError(f"compressed image says format '{fmt}' but holds {'JPEG' if is_jpeg else 'PNG'} data")
    if is_jpeg and b"\xff\xd9" not in buf[-64:].tobytes():
        raise ImageDecodeError("JPEG data is truncated (no end-of-image marker)")
    check_pixels(*compressed_size(buf, is_jpeg), max_pixels)
    if is_jpeg:
        import simplejpeg
        try:
            return simplejpeg.decode_jpeg(buf.tobytes(), colorspace="RGB", strict=True)
        except ValueError as exc:
            raise ImageDecodeError(f"corrupt JPEG data ({buf.size} bytes): {str(exc).splitlines()[0]}") from None
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise ImageDecodeError(f"corrupt PNG data ({buf.size} bytes)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_image_file(path: str | Path) -> np.ndarray:
    """An image file -> RGB uint8 [H, W, 3]."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read image {p}: {exc.strerror}") from exc
    try:
        return decode_compressed(p.suffix.lstrip("."), data)
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{p}: {exc}") from exc


def encode_raw(rgb: np.ndarray, encoding: str = "rgb8") -> tuple[int, int, int, bytes]:
    """RGB uint8 -> (height, width, step, data) in ``encoding``; the inverse of ``decode_raw``."""
    h, w = rgb.shape[:2]
    if encoding == "rgb8":
        px = rgb
    elif encoding == "bgr8":
        px = rgb[:, :, ::-1]
    elif encoding in ("rgba8", "bgra8"):
        c = rgb if encoding == "rgba8" else rgb[:, :, ::-1]
        px = np.concatenate([c, np.full((h, w, 1), 255, np.uint8)], axis=2)
    elif encoding in ("mono8", "8UC1"):
        px = rgb.mean(axis=2).round().astype(np.uint8)
    elif encoding in ("mono16", "16UC1"):
        px = (rgb.mean(axis=2) * 257).round().astype("<u2")
    else:
        raise ImageDecodeError(f"unsupported image encoding '{encoding}'")
    px = np.ascontiguousarray(px)
    return h, w, px.strides[0], px.tobytes()


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    import cv2
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ImageDecodeError("JPEG encoding failed")
    return buf.tobytes()


def downscale(image: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink ``image`` (HxW or HxWxC) so that its longer side is at most ``max_side`` (area
    averaging, aspect kept); returned as is when it already fits or ``max_side`` <= 0. Never
    enlarges."""
    h, w = image.shape[:2]
    if max_side <= 0 or max(h, w) <= max_side:
        return image
    import cv2
    s = max_side / max(h, w)
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
