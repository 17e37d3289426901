"""Pixels and geometry: Krita's raw bytes <-> QImage <-> PNG, crops, masks, scaling.

Pure functions on bytes and QImage (no Krita, no widgets). QImage operations run in C++
and release the GIL, so they may run on a worker thread.

Krita's 8-bit RGBA layers hand out pixels as B,G,R,A bytes, non-premultiplied, which is
exactly QImage.Format_ARGB32 on little-endian machines: no per-pixel Python work.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

from .qt import QBuffer, QByteArray, QImage, QIODevice, QPainter, Qt, image_bytes

ARGB32 = QImage.Format.Format_ARGB32
PREMULTIPLIED = QImage.Format.Format_ARGB32_Premultiplied
RGBA8888 = QImage.Format.Format_RGBA8888
GRAY8 = QImage.Format.Format_Grayscale8
ALPHA8 = QImage.Format.Format_Alpha8

if sys.byteorder != "little":  # pragma: no cover - Krita ships for little-endian CPUs only
    raise ImportError("Instruct Edit needs a little-endian machine (Krita's BGRA = Qt's ARGB32)")


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


def working_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """The upload size: the image scaled down (never up) so its longer side is `long_side`."""
    scale = min(1.0, long_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def is_full_selection(mask: bytes) -> bool:
    """True when every pixel is fully selected (then the mask adds nothing)."""
    return mask.count(b"\xff") == len(mask)


# --- conversions -------------------------------------------------------------------


def image_from_bgra(data: bytes, width: int, height: int) -> QImage:
    """Krita 8-bit BGRA bytes -> an independent ARGB32 QImage (same byte layout)."""
    if len(data) != width * height * 4:
        raise ValueError(f"expected {width * height * 4} bytes for {width}x{height} BGRA, got {len(data)}")
    return QImage(data, width, height, width * 4, ARGB32).copy()


def bgra_from_image(image: QImage) -> bytes:
    """A QImage -> Krita 8-bit BGRA bytes (tightly packed rows)."""
    image = image.convertToFormat(ARGB32)
    return _packed(image, 4)


def mask_image(data: bytes, width: int, height: int) -> QImage:
    """Selection bytes (1 per pixel, 255 = selected) -> a Grayscale8 QImage."""
    if len(data) != width * height:
        raise ValueError(f"expected {width * height} mask bytes for {width}x{height}, got {len(data)}")
    return QImage(data, width, height, width, GRAY8).copy()


def gray_bytes(image: QImage) -> bytes:
    return _packed(image.convertToFormat(GRAY8), 1)


def bgra_to_rgba(data: bytes, width: int, height: int) -> bytes:
    return _packed(image_from_bgra(data, width, height).convertToFormat(RGBA8888), 4)


def rgba_to_bgra(data: bytes, width: int, height: int) -> bytes:
    image = QImage(data, width, height, width * 4, RGBA8888)
    return bgra_from_image(image)


def _packed(image: QImage, bytes_per_pixel: int) -> bytes:
    row = image.width() * bytes_per_pixel
    raw = image_bytes(image)
    stride = image.bytesPerLine()
    if stride == row:
        return raw
    return b"".join(raw[i * stride : i * stride + row] for i in range(image.height()))


def encode_png(image: QImage) -> bytes:
    buffer = QBuffer()
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    # Qt maps PNG "quality" 80 to zlib level 1: uploads to a local engine are limited by
    # encoding time, not by bytes.
    if not image.save(buffer, "PNG", 80):
        raise ValueError("could not encode the image as PNG")
    return bytes(buffer.data())


def decode_png(data: bytes) -> QImage:
    image = QImage()
    if not image.loadFromData(QByteArray(data), "PNG"):
        raise ValueError("the engine sent a result that is not a readable PNG image")
    return image


def scaled(image: QImage, width: int, height: int) -> QImage:
    if image.width() == width and image.height() == height:
        return image
    return image.scaled(width, height, Qt.AspectRatioMode.IgnoreAspectRatio,
                        Qt.TransformationMode.SmoothTransformation)


def restrict_alpha(image: QImage, alpha: bytes | None, width: int, height: int) -> QImage:
    """Multiply the image's alpha by `alpha` (1 byte per pixel): 0 = fully transparent.

    Used to keep a result inside the selection and inside the source layer's shape.
    """
    result = image.convertToFormat(PREMULTIPLIED)
    if alpha is not None:
        alpha_image = QImage(alpha, width, height, width, ALPHA8).copy()
        painter = QPainter(result)
        painter.setCompositionMode(QPainter.CompositionMode.CompositionMode_DestinationIn)
        painter.drawImage(0, 0, alpha_image)
        painter.end()
    return result.convertToFormat(ARGB32)


def alpha_bytes(image: QImage) -> bytes:
    """The alpha channel of an image, 1 byte per pixel."""
    return _packed(image.convertToFormat(ARGB32).convertToFormat(ALPHA8), 1)


def multiply_masks(a: bytes | None, b: bytes | None, width: int, height: int) -> bytes | None:
    """Pixel-wise product of two 0..255 masks (None = all 255), done by Qt, not Python."""
    if a is None:
        return b
    if b is None:
        return a
    first = QImage(a, width, height, width, ALPHA8).copy()
    painter = QPainter(first)
    painter.setCompositionMode(QPainter.CompositionMode.CompositionMode_DestinationIn)
    painter.drawImage(0, 0, QImage(b, width, height, width, ALPHA8))
    painter.end()
    return _packed(first, 1)
