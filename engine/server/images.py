"""The service's only image I/O: uploads (PNG or raw pixels) decoded safely, results encoded
on request (PNG, or raw BGRA/RGBA), both lossless.

Wire format (docs/api.md, "Pixels on the wire"): a part's Content-Type tells PNG from raw,
`image/x-raw; format=bgra8|rgba8|gray8; width=W; height=H` for raw pixels (8 bits per
channel, not premultiplied, rows top to bottom, tightly packed).
"""

from __future__ import annotations

import base64
import io
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.server.errors import ApiError

RAW_MEDIA_TYPE = "image/x-raw"
# Raw formats and their bytes per pixel. The image part takes bgra8/rgba8, the mask gray8.
RAW_BYTES_PER_PIXEL = {"bgra8": 4, "rgba8": 4, "gray8": 1}
IMAGE_RAW_FORMATS = ("bgra8", "rgba8")
MASK_RAW_FORMATS = ("gray8",)
RESULT_FORMATS = ("png", "bgra8", "rgba8")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# zlib level 1 with the run-length strategy: on a 2048² painting-like image ~1.5× faster
# than level 1's default strategy and ~2× faster than Pillow's default (level 6), at the size
# of level 6. Results usually travel over loopback, where encode time dominates.
RESULT_PNG_COMPRESS_LEVEL = 1
RESULT_PNG_STRATEGY = zlib.Z_RLE


def _too_many_pixels(field: str, width: int, height: int, max_pixels: int) -> ApiError:
    return ApiError(
        413,
        f"{field} is {width}×{height} = {width * height} pixels; this server accepts at most "
        f"{max_pixels} pixels (scale the image down or select a region)",
        field,
    )


def png_size(data: bytes | memoryview, field: str) -> tuple[int, int]:
    """(width, height) from a PNG's header (its IHDR chunk), without decoding anything."""
    head = bytes(data[:24])
    if not head:
        raise ApiError(422, f"{field} is empty; send a PNG file", field)
    if not head.startswith(PNG_SIGNATURE):
        raise ApiError(
            422, f"{field} is not a PNG file; export the image as PNG and send it again", field
        )
    if len(head) < 24 or head[12:16] != b"IHDR":
        raise ApiError(
            422, f"{field} is not a readable PNG (no IHDR header); export it again", field
        )
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if width < 1 or height < 1:
        raise ApiError(422, f"{field} is a PNG of {width}×{height} pixels; export it again", field)
    return width, height


def decode_png(data: bytes | memoryview, field: str, max_pixels: int) -> Image.Image:
    """A fully decoded RGB/RGBA (or, for masks, any mode) image; 422/413 errors name `field`.

    Safe in several threads at once: the pixel limit is checked from the header here (no
    `warnings.catch_warnings`, which swaps the process-wide filters and is not thread-safe),
    and nothing global is changed. Pillow's own bomb guard can only fire when the operator set
    a limit above Pillow's; its error becomes the same 413."""
    width, height = png_size(data, field)
    if width * height > max_pixels:
        raise _too_many_pixels(field, width, height, max_pixels)
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
        image.load()
    except Image.DecompressionBombError as err:
        raise ApiError(413, f"{field} has too many pixels to decode safely: {err}", field) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ApiError(
            422, f"{field} is not a readable PNG ({err}); export it again", field
        ) from err
    if image.size != (width, height):  # pragma: no cover - Pillow reads the same header
        raise ApiError(422, f"{field} is not a readable PNG; export it again", field)
    return image


@dataclass(frozen=True)
class RawSpec:
    """A raw part's declared layout."""

    format: str
    width: int
    height: int

    @property
    def byte_count(self) -> int:
        return self.width * self.height * RAW_BYTES_PER_PIXEL[self.format]


def parse_media_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    """`type/subtype` (lower case) and its parameters (keys lower case, quotes removed)."""
    if not content_type:
        return "", {}
    head, *rest = content_type.split(";")
    params: dict[str, str] = {}
    for item in rest:
        key, sep, value = item.partition("=")
        if sep:
            params[key.strip().lower()] = value.strip().strip('"')
    return head.strip().lower(), params


def raw_spec(
    content_type: str | None, field: str, formats: tuple[str, ...], max_pixels: int
) -> RawSpec | None:
    """The raw layout a part declares, or None when the part is not raw (then it must be PNG).

    Missing or malformed parameters are a 422 naming the part; more pixels than `max_pixels`
    a 413 (checked before anything is decoded)."""
    media_type, params = parse_media_type(content_type)
    if media_type != RAW_MEDIA_TYPE:
        return None
    example = f"{RAW_MEDIA_TYPE}; format={formats[0]}; width=W; height=H"
    fmt = params.get("format", "").lower()
    if fmt not in formats:
        raise ApiError(
            422,
            f"{field}: raw pixels need format={' or format='.join(formats)} in the part's "
            f"Content-Type (got {fmt or 'none'}), e.g. '{example}'",
            field,
        )
    sides: list[int] = []
    for name in ("width", "height"):
        text = params.get(name, "")
        if not (text.isascii() and text.isdigit()) or len(text) > 9 or int(text) < 1:
            raise ApiError(
                422,
                f"{field}: raw pixels need a positive whole {name} in the part's Content-Type "
                f"(got {text or 'none'}), e.g. '{example}'",
                field,
            )
        sides.append(int(text))
    width, height = sides
    if width * height > max_pixels:
        raise _too_many_pixels(field, width, height, max_pixels)
    return RawSpec(fmt, width, height)


def decode_raw(data: bytes | memoryview, spec: RawSpec, field: str) -> Image.Image:
    """Raw pixels as an image the Editor takes: RGBA when any pixel has alpha < 255, else RGB
    (so alpha round-trips exactly and opaque images stay opaque); gray8 → L."""
    if len(data) != spec.byte_count:
        bpp = RAW_BYTES_PER_PIXEL[spec.format]
        raise ApiError(
            422,
            f"{field} has {len(data)} bytes but {spec.format} {spec.width}×{spec.height} needs "
            f"{spec.width}×{spec.height}×{bpp} = {spec.byte_count}; send the pixels tightly packed, "
            "rows top to bottom",
            field,
        )
    size = (spec.width, spec.height)
    if spec.format == "gray8":
        return Image.frombytes("L", size, data)
    opaque = bool(np.frombuffer(data, np.uint8)[3::4].min() == 255)
    # Pillow's C unpackers swap and drop channels in one pass (~25-40 ms at 4096²).
    source_order = "BGR" if spec.format == "bgra8" else "RGB"
    if opaque:
        return Image.frombytes("RGB", size, data, "raw", source_order + "X")
    return Image.frombytes("RGBA", size, data, "raw", source_order + "A")


@dataclass(frozen=True)
class DeclaredUpload:
    """An uploaded part's size as its header declares it (the raw part's Content-Type, or the
    PNG's IHDR), known before any pixel is decoded."""

    field: str
    width: int
    height: int
    raw: RawSpec | None  # None: a PNG

    @property
    def pixels(self) -> int:
        return self.width * self.height


def declared_upload(
    data: bytes | memoryview,
    content_type: str | None,
    field: str,
    max_pixels: int,
    raw_formats: tuple[str, ...],
) -> DeclaredUpload:
    """A part's declared layout: raw when its Content-Type says so, else a PNG (sniffed by its
    signature, so old clients sending application/octet-stream keep working). Over
    `max_pixels` is a 413 and an unreadable header a 422, both naming `field`."""
    spec = raw_spec(content_type, field, raw_formats, max_pixels)
    if spec is not None:
        return DeclaredUpload(field, spec.width, spec.height, spec)
    width, height = png_size(data, field)
    if width * height > max_pixels:
        raise _too_many_pixels(field, width, height, max_pixels)
    return DeclaredUpload(field, width, height, None)


def decode_declared(
    data: bytes | memoryview, declared: DeclaredUpload, max_pixels: int
) -> Image.Image:
    """Decode a part whose header `declared_upload` read. Thread-safe (see decode_png)."""
    if declared.raw is not None:
        return decode_raw(data, declared.raw, declared.field)
    return decode_png(data, declared.field, max_pixels)


def decode_upload(
    data: bytes | memoryview,
    content_type: str | None,
    field: str,
    max_pixels: int,
    raw_formats: tuple[str, ...],
) -> Image.Image:
    """A part as an image (its header checked first, then decoded)."""
    declared = declared_upload(data, content_type, field, max_pixels, raw_formats)
    return decode_declared(data, declared, max_pixels)


def to_edit_mode(image: Image.Image) -> Image.Image:
    """RGBA when the image has any transparency information, else RGB (what Editor accepts)."""
    if image.mode in ("RGB", "RGBA"):
        return image
    has_alpha = image.mode in ("LA", "PA", "La", "RGBa") or "transparency" in image.info
    return image.convert("RGBA" if has_alpha else "RGB")


def raw_media_type(fmt: str, width: int, height: int) -> str:
    return f"{RAW_MEDIA_TYPE}; format={fmt}; width={width}; height={height}"


def encode_raw(image: Image.Image, fmt: str) -> memoryview:
    """4-channel raw pixels (bgra8 or rgba8) of a result; an opaque image gets A = 255."""
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    if image.mode == "RGBA":
        return memoryview(image.tobytes("raw", "BGRA" if fmt == "bgra8" else "RGBA"))
    if fmt == "rgba8":
        return memoryview(image.tobytes("raw", "RGBX"))  # Pillow writes X = 255
    pixels = np.asarray(image)
    out = np.empty((*pixels.shape[:2], 4), np.uint8)
    out[..., 0] = pixels[..., 2]
    out[..., 1] = pixels[..., 1]
    out[..., 2] = pixels[..., 0]
    out[..., 3] = 255
    return memoryview(out).cast("B")


def stored_pixel_bytes(image: Image.Image) -> int:
    """Memory an image's pixels take in Pillow (RGB is stored with 4 bytes per pixel)."""
    per_pixel = 1 if image.mode in ("L", "P", "1") else 4
    return image.width * image.height * per_pixel


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(
        buffer,
        format="PNG",
        compress_level=RESULT_PNG_COMPRESS_LEVEL,
        compress_type=RESULT_PNG_STRATEGY,
    )
    return buffer.getvalue()


def thumbnail_base64(image: Image.Image, max_side: int) -> str:
    """A small PNG of a preview for progress events, base64-encoded for JSON."""
    thumb = image.copy()
    thumb.thumbnail((max_side, max_side))
    if thumb.mode not in ("RGB", "RGBA", "L"):
        thumb = thumb.convert("RGB")
    return base64.b64encode(encode_png(thumb)).decode("ascii")
