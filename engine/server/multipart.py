"""POST /v1/edits' multipart body, read into memory once and split without copying the parts.

Starlette's form parser (python-multipart) spools every file part above 1 MiB to a temporary
file, one thread-pool hop per network chunk, and the handler then reads it back: for a 64 MiB
raw 4096² upload that costs ~100-250 ms more than reading the body and cutting it at the
boundaries with `bytes.find` (measured in benchmarks/bench_service.py). The body is bounded by
`--max-upload-mb` (UploadLimit), so holding it in memory is what the old path did as well.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from engine.server.errors import ApiError
from engine.server.images import parse_media_type

MAX_PARTS = 16
MAX_HEADER_BYTES = 16 * 1024
# How much of the body's beginning `read_body` shows its `inspect` callback: enough for the
# params part (at most 64 KiB) and the image part's headers and first bytes (a PNG's header).
HEAD_SCAN_BYTES = 256 * 1024
# A request refused before its body was read still has its body received and dropped up to
# this size (see refuse_unread); a larger one is not read, and its connection is closed.
DRAIN_LIMIT_BYTES = 16 * 1024 * 1024
FORM_HINT = (
    "send multipart/form-data with the parts image, params and optionally mask and preview_every"
)


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: memoryview  # a view into the request body: no copy
    complete: bool = True  # False: the body was cut short inside this part (peek_parts)

    def text(self) -> str:
        try:
            return bytes(self.data).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ApiError(422, f"{self.name} is not UTF-8 text", self.name) from err


def declared_length(request: Request) -> int | None:
    declared = request.headers.get("content-length", "")
    # ASCII only: int("²") would raise
    return int(declared) if declared.isascii() and declared.isdigit() else None


def _drains(request: Request) -> bool:
    declared = declared_length(request)
    return declared is not None and declared <= DRAIN_LIMIT_BYTES


async def refuse_unread(request: Request, err: ApiError) -> ApiError:
    """Prepare `err` to be the answer to a request whose body has not been read. A small body
    is received and dropped chunk by chunk (no memory kept): the connection stays usable and
    the client, which may write its whole body before it reads, surely gets the answer. A
    larger one is left unread and the connection closed after the answer."""
    if _drains(request):
        async for _ in request.stream():
            pass
    else:
        err.headers.setdefault("Connection", "close")
    return err


async def read_body(
    request: Request,
    inspect: Callable[[bytes], bool] | None = None,
    on_grow: Callable[[int], None] | None = None,
) -> bytearray:
    """The whole body, in one buffer grown as the bytes arrive (never sized up front from
    Content-Length: a zero-filled buffer of the declared size would take that much memory
    before a byte has arrived, and a refused upload would cost it anyway).

    `inspect`, when given, is shown the body's first bytes (up to HEAD_SCAN_BYTES) after each
    chunk until it returns True. An ApiError it raises refuses the request before its pixels
    are kept: the rest is dropped as it arrives (bodies up to DRAIN_LIMIT_BYTES) or not read
    at all (larger ones; the answer then closes the connection), see `refuse_unread`.
    `on_grow` is told the body's length after each chunk (it may refuse the same way)."""
    buffer = bytearray()
    inspected = inspect is None
    refusal: ApiError | None = None
    drains = _drains(request)
    async for chunk in request.stream():
        if refusal is not None:
            continue  # received and dropped
        seen_before = len(buffer)
        buffer += chunk
        try:
            if on_grow is not None:
                on_grow(len(buffer))
            if not inspected and seen_before < HEAD_SCAN_BYTES:
                inspected = inspect(bytes(buffer[:HEAD_SCAN_BYTES]))  # type: ignore[misc]
        except ApiError as err:
            if not drains:
                err.headers.setdefault("Connection", "close")
                raise
            refusal, buffer = err, bytearray()
    if refusal is not None:
        raise refusal
    return buffer


def _headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise ApiError(422, f"a part has a malformed header line; {FORM_HINT}")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("utf-8", "replace")
    return headers


def _urlencoded(body: bytes) -> dict[str, Part]:
    parts: dict[str, Part] = {}
    try:
        fields = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_PARTS)
    except (UnicodeDecodeError, ValueError) as err:
        raise ApiError(422, f"the form is not valid; {FORM_HINT}") from err
    for name, value in fields:
        if name in parts:
            raise ApiError(422, f"the part {name!r} was sent twice", name)
        parts[name] = Part(name, None, None, memoryview(value.encode("utf-8")))
    return parts


def peek_parts(content_type: str | None, head: bytes) -> dict[str, Part]:
    """The parts that the beginning `head` of a body already shows: whole ones, and the one it
    is cut short in (`complete=False`, its data so far) once that part's headers are in.
    Anything malformed ends the peek quietly: the full parse of the whole body reports it."""
    try:
        return _split(content_type, head, partial=True)
    except (ApiError, ValueError):
        return {}


def parse_multipart(content_type: str | None, body: bytes | bytearray) -> dict[str, Part]:
    """The parts by name. Malformed bodies, parts without a name, and a name sent twice are
    a 422 (naming the part where there is one)."""
    return _split(content_type, body, partial=False)


def _split(content_type: str | None, body: bytes | bytearray, partial: bool) -> dict[str, Part]:
    media_type, params = parse_media_type(content_type)
    if media_type == "application/x-www-form-urlencoded":
        # Text fields only (no image can come this way); parsed so the answer names what is
        # missing, as for a multipart body.
        return {} if partial else _urlencoded(bytes(body))
    boundary = params.get("boundary", "")
    if media_type != "multipart/form-data" or not 0 < len(boundary) <= 200:
        raise ApiError(422, f"the request body is not multipart/form-data; {FORM_HINT}")
    dash = b"--" + boundary.encode("latin-1")
    delimiter = b"\r\n" + dash
    view = memoryview(body)
    if body.startswith(dash):
        pos = len(dash)
    else:  # a preamble before the first boundary
        found = body.find(delimiter)
        if found < 0 and partial:
            return {}
        if found < 0:
            raise ApiError(422, f"the multipart body has no boundary line; {FORM_HINT}")
        pos = found + len(delimiter)
    parts: dict[str, Part] = {}
    while True:
        if body[pos : pos + 2] == b"--":
            return parts  # the closing delimiter
        line_end = body.find(b"\r\n", pos)
        head_end = body.find(b"\r\n\r\n", line_end) if line_end >= 0 else -1
        if head_end < 0 and partial:
            return parts
        if head_end < 0 or head_end - line_end > MAX_HEADER_BYTES:
            raise ApiError(422, f"the multipart body is truncated or malformed; {FORM_HINT}")
        headers = _headers(bytes(body[line_end + 2 : head_end]))
        data_start = head_end + 4
        data_end = body.find(delimiter, data_start)
        complete = data_end >= 0
        if not complete and partial:
            data_end = len(body)
        elif not complete:
            raise ApiError(422, f"the multipart body ends before its closing boundary; {FORM_HINT}")
        # As bytes: python-multipart re-encodes a str value as latin-1, which fails on a
        # non-latin-1 name; bytes keep the name's UTF-8 bytes, decoded below.
        disposition = headers.get("content-disposition", "").encode("utf-8")
        _, options = parse_options_header(disposition)
        name = options.get(b"name")
        if not name:
            raise ApiError(422, f"a part has no name in its Content-Disposition; {FORM_HINT}")
        field = name.decode("utf-8", "replace")
        if field in parts:
            raise ApiError(422, f"the part {field!r} was sent twice", field)
        if len(parts) >= MAX_PARTS:
            raise ApiError(422, f"too many parts; {FORM_HINT}")
        filename = options.get(b"filename")
        parts[field] = Part(
            name=field,
            filename=filename.decode("utf-8", "replace") if filename is not None else None,
            content_type=headers.get("content-type"),
            data=view[data_start:data_end],
            complete=complete,
        )
        if not complete:
            return parts
        pos = data_end + len(delimiter)
