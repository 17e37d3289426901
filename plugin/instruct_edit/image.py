"""Pixels and geometry: Krita's raw bytes, the wire formats, PNG, crops and selection boxes.

Pure functions on bytes, QByteArray and QImage (no Krita, no widgets, no networking). QImage
operations run in C++ and release the GIL, so they may run on a worker thread.

Krita's 8-bit RGBA layers hand out pixels as B,G,R,A bytes, non-premultiplied, which is
exactly QImage.Format_ARGB32 on little-endian machines: no per-pixel Python work. The plugin
never scales: the region goes to the engine at full resolution and losslessly, and the
engine's answer is placed exactly as it comes back.

Wire formats (docs/api.md): raw pixels with their size declared in the part's Content-Type,
`image/x-raw; format=bgra8; width=W; height=H` (also rgba8, and gray8 for the selection), on
loopback; PNG at a fast zlib level to an engine elsewhere.
"""

from __future__ import annotations

import ipaddress
import sys
from typing import NamedTuple, Union
from urllib.parse import urlsplit

from .qt import QBuffer, QByteArray, QImage, QIODevice, image_bytes

ARGB32 = QImage.Format.Format_ARGB32
PREMULTIPLIED = QImage.Format.Format_ARGB32_Premultiplied
RGBA8888 = QImage.Format.Format_RGBA8888
GRAY8 = QImage.Format.Format_Grayscale8

#: Bytes per pixel of each raw format the API knows.
RAW_FORMATS = {"bgra8": 4, "rgba8": 4, "gray8": 1}
#: Qt's PNG "quality" 80 is zlib level 1: encoding time, not bytes, limits an upload.
PNG_FAST_QUALITY = 80

if sys.byteorder != "little":  # pragma: no cover - Krita ships for little-endian CPUs only
    raise ImportError("Instruct Edit needs a little-endian machine (Krita's BGRA = Qt's ARGB32)")

Pixels = Union[bytes, QByteArray]  # noqa: UP007 - Krita 5 on Windows bundles Python 3.8


class Bounds(NamedTuple):
    """A rectangle in document pixels."""

    x: int
    y: int
    width: int
    height: int

    @property
    def right(self) -> int:
        return self.x + self.width

    @property
    def bottom(self) -> int:
        return self.y + self.height

    @property
    def is_empty(self) -> bool:
        return self.width <= 0 or self.height <= 0

    def intersected(self, other: Bounds) -> Bounds:
        x, y = max(self.x, other.x), max(self.y, other.y)
        right, bottom = min(self.right, other.right), min(self.bottom, other.bottom)
        return Bounds(x, y, max(0, right - x), max(0, bottom - y))

    def contains(self, other: Bounds) -> bool:
        return (
            self.x <= other.x
            and self.y <= other.y
            and other.right <= self.right
            and other.bottom <= self.bottom
        )


def context_bounds(selection: Bounds, canvas: Bounds, padding_fraction: float = 0.25,
                   min_padding: int = 32, multiple: int = 8) -> Bounds:
    """The region sent to the engine for a selection: its bounding box plus context around it.

    The model sees some surroundings so the edit fits in (padding = a quarter of the
    selection's larger side, at least `min_padding`), the region is grown to a multiple
    of 8 pixels where the canvas allows, and it never leaves the canvas.
    """
    selection = selection.intersected(canvas)
    if selection.is_empty:
        raise ValueError("the selection lies outside the canvas")
    pad = max(min_padding, round(max(selection.width, selection.height) * padding_fraction))
    grown = Bounds(selection.x - pad, selection.y - pad,
                   selection.width + 2 * pad, selection.height + 2 * pad).intersected(canvas)
    # Round the size up to a multiple of 8, growing right/down then left/up within the canvas.
    x, y, w, h = grown
    w_target = min(canvas.width, -(-w // multiple) * multiple)
    h_target = min(canvas.height, -(-h // multiple) * multiple)
    extra_w, extra_h = w_target - w, h_target - h
    grow_right = min(extra_w, canvas.right - (x + w))
    grow_down = min(extra_h, canvas.bottom - (y + h))
    x -= extra_w - grow_right
    y -= extra_h - grow_down
    return Bounds(x, y, w_target, h_target)


def strip_rows(width: int, bytes_per_pixel: int = 4, target_bytes: int = 1 << 20) -> int:
    """Rows per strip so one strip is about `target_bytes` (at least one row).

    Big regions are read from and written to Krita a strip per event-loop turn, so the UI
    keeps repainting (one 64 MiB read can block it for longer than a frame).
    """
    return max(1, target_bytes // max(1, width * bytes_per_pixel))


def mask_coverage(mask: Pixels) -> str:
    """"full" (every pixel selected), "empty" (none) or "partial"."""
    data = QByteArray(mask) if not isinstance(mask, QByteArray) else mask
    size = data.size()
    if data.count(b"\xff") == size:
        return "full"
    if data.count(b"\x00") == size:
        return "empty"
    return "partial"


def is_full_selection(mask: Pixels) -> bool:
    """True when every pixel is fully selected (then the mask adds nothing)."""
    return mask_coverage(mask) == "full"


# --- addresses -----------------------------------------------------------------------------


def is_loopback(url: str) -> bool:
    """True for an engine on this machine (127.0.0.0/8, ::1, localhost): raw pixels go there."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- raw pixels on the wire ----------------------------------------------------------------


def raw_content_type(fmt: str, width: int, height: int) -> str:
    return f"image/x-raw; format={fmt}; width={width}; height={height}"


def parse_raw_content_type(value: str) -> tuple[str, int, int] | None:
    """`image/x-raw; format=bgra8; width=W; height=H` -> (format, W, H); None if not raw."""
    pieces = [p.strip() for p in value.split(";")]
    if not pieces or pieces[0].lower() != "image/x-raw":
        return None
    params = {}
    for piece in pieces[1:]:
        key, _, val = piece.partition("=")
        params[key.strip().lower()] = val.strip().strip('"')
    try:
        return params.get("format", "").lower(), int(params["width"]), int(params["height"])
    except (KeyError, ValueError):
        return params.get("format", "").lower(), -1, -1


class ResultError(ValueError):
    """The engine's result does not fit the region; the message says what came back."""


def result_to_bgra(data: QByteArray, content_type: str, width: int, height: int,
                   declared: tuple[int, int] | None = None) -> QByteArray:
    """An engine result (raw or PNG) -> Krita BGRA bytes of exactly width × height.

    Raw bgra8 comes back as is (no copy); rgba8 is swapped by Qt; PNG is decoded. Anything
    of another size, byte count or kind raises ResultError: nothing is ever scaled to fit.
    """
    raw = parse_raw_content_type(content_type or "")
    expected = width * height * 4
    if raw is not None:
        fmt, w, h = raw
        if declared is not None and declared != (w, h) and -1 not in declared:
            raise ResultError(f"the engine declared a {declared[0]}×{declared[1]} result in one "
                              f"header and {w}×{h} in another")
        if fmt not in ("bgra8", "rgba8"):
            raise ResultError(f"the engine sent pixels as {fmt or 'an unknown format'}; "
                              "expected bgra8 or rgba8")
        if (w, h) != (width, height):
            raise ResultError(f"the engine sent a {w}×{h} result for a {width}×{height} region")
        if data.size() != expected:
            raise ResultError(f"the engine sent {data.size()} bytes for a {width}×{height} "
                              f"result (expected {expected})")
        if fmt == "rgba8":
            image = QImage(data, width, height, width * 4, RGBA8888)
            return QByteArray(packed(image.convertToFormat(ARGB32), 4))
        return data
    image = QImage()
    if not image.loadFromData(data, "PNG"):
        raise ResultError("the engine sent a result that is neither raw pixels nor a readable PNG")
    if (image.width(), image.height()) != (width, height):
        raise ResultError(f"the engine sent a {image.width()}×{image.height()} result for a "
                          f"{width}×{height} region")
    return QByteArray(bgra_from_image(image))


# --- conversions -------------------------------------------------------------------


def image_from_bgra(data: Pixels, width: int, height: int) -> QImage:
    """Krita 8-bit BGRA bytes -> an independent ARGB32 QImage (same byte layout)."""
    size = data.size() if isinstance(data, QByteArray) else len(data)
    if size != width * height * 4:
        raise ValueError(f"expected {width * height * 4} bytes for {width}x{height} BGRA, got {size}")
    return QImage(data, width, height, width * 4, ARGB32).copy()


def view_bgra(data: Pixels, width: int, height: int) -> QImage:
    """Like image_from_bgra but without a copy: the caller keeps `data` alive meanwhile."""
    return QImage(data, width, height, width * 4, ARGB32)


def bgra_from_image(image: QImage) -> bytes:
    """A QImage -> Krita 8-bit BGRA bytes (tightly packed rows)."""
    if image.format() != ARGB32:
        image = image.convertToFormat(ARGB32)
    return packed(image, 4)


def mask_image(data: Pixels, width: int, height: int) -> QImage:
    """Selection bytes (1 per pixel, 255 = selected) -> a Grayscale8 QImage."""
    size = data.size() if isinstance(data, QByteArray) else len(data)
    if size != width * height:
        raise ValueError(f"expected {width * height} mask bytes for {width}x{height}, got {size}")
    return QImage(data, width, height, width, GRAY8).copy()


def gray_bytes(image: QImage) -> bytes:
    if image.format() != GRAY8:
        image = image.convertToFormat(GRAY8)
    return packed(image, 1)


def bgra_to_rgba(data: Pixels, width: int, height: int) -> bytes:
    return packed(view_bgra(data, width, height).convertToFormat(RGBA8888), 4)


def rgba_to_bgra(data: Pixels, width: int, height: int) -> bytes:
    image = QImage(data, width, height, width * 4, RGBA8888)
    return bgra_from_image(image)


def packed(image: QImage, bytes_per_pixel: int) -> bytes:
    """The image's pixels as tightly packed rows (Qt pads rows to 4 bytes)."""
    row = image.width() * bytes_per_pixel
    raw = image_bytes(image)
    stride = image.bytesPerLine()
    if stride == row:
        return raw
    return b"".join(raw[i * stride : i * stride + row] for i in range(image.height()))


def encode_png(image: QImage, quality: int = PNG_FAST_QUALITY) -> bytes:
    """Lossless PNG at a fast zlib level (quality 80 = level 1)."""
    buffer = QBuffer()
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    if not image.save(buffer, "PNG", quality):
        raise ValueError("could not encode the image as PNG")
    return bytes(buffer.data())


def png_from_bgra(data: Pixels, width: int, height: int) -> bytes:
    return encode_png(view_bgra(data, width, height))


def png_from_mask(data: Pixels, width: int, height: int) -> bytes:
    return encode_png(QImage(data, width, height, width, GRAY8))


def decode_png(data: Pixels) -> QImage:
    image = QImage()
    if not image.loadFromData(data if isinstance(data, QByteArray) else QByteArray(data), "PNG"):
        raise ValueError("the engine sent a result that is not a readable PNG image")
    return image


def alpha_bytes(image: QImage) -> bytes:
    """The alpha channel of an image, 1 byte per pixel."""
    return packed(image.convertToFormat(ARGB32).convertToFormat(QImage.Format.Format_Alpha8), 1)
