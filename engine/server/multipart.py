"""POST /v1/edits' multipart body, read into memory once and split without copying the parts.

Starlette's form parser (python-multipart) spools every file part above 1 MiB to a temporary
file, one thread-pool hop per network chunk, and the handler then reads it back: for a 64 MiB
raw 4096² upload that costs ~100-250 ms more than reading the body and cutting it at the
boundaries with `bytes.find` (measured in benchmarks/bench_service.py). The body is bounded by
`--max-upload-mb` (UploadLimit), so holding it in memory is what the old path did as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from engine.server.errors import ApiError
from engine.server.images import parse_media_type

MAX_PARTS = 16
MAX_HEADER_BYTES = 16 * 1024
FORM_HINT = (
    "send multipart/form-data with the parts image, params and optionally mask and preview_every"
)


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: memoryview  # a view into the request body: no copy

    def text(self) -> str:
        try:
            return bytes(self.data).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ApiError(422, f"{self.name} is not UTF-8 text", self.name) from err


async def read_body(request: Request) -> bytearray:
    """The whole body, in one buffer sized from Content-Length when the client declared it."""
    declared = request.headers.get("content-length", "")
    known = declared.isascii() and declared.isdigit()  # ASCII only: int("²") would raise
    buffer = bytearray(int(declared)) if known else bytearray()
    filled = 0
    async for chunk in request.stream():
        end = filled + len(chunk)
        if end <= len(buffer):
            buffer[filled:end] = chunk
        else:  # undeclared (chunked) or longer than declared: grow
            del buffer[filled:]
            buffer += chunk
        filled = end
    del buffer[filled:]
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


def parse_multipart(content_type: str | None, body: bytes | bytearray) -> dict[str, Part]:
    """The parts by name. Malformed bodies, parts without a name, and a name sent twice are
    a 422 (naming the part where there is one)."""
    media_type, params = parse_media_type(content_type)
    if media_type == "application/x-www-form-urlencoded":
        # Text fields only (no image can come this way); parsed so the answer names what is
        # missing, as for a multipart body.
        return _urlencoded(bytes(body))
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
        if found < 0:
            raise ApiError(422, f"the multipart body has no boundary line; {FORM_HINT}")
        pos = found + len(delimiter)
    parts: dict[str, Part] = {}
    while True:
        if body[pos : pos + 2] == b"--":
            return parts  # the closing delimiter
        line_end = body.find(b"\r\n", pos)
        head_end = body.find(b"\r\n\r\n", line_end) if line_end >= 0 else -1
        if head_end < 0 or head_end - line_end > MAX_HEADER_BYTES:
            raise ApiError(422, f"the multipart body is truncated or malformed; {FORM_HINT}")
        headers = _headers(bytes(body[line_end + 2 : head_end]))
        data_start = head_end + 4
        data_end = body.find(delimiter, data_start)
        if data_end < 0:
            raise ApiError(422, f"the multipart body ends before its closing boundary; {FORM_HINT}")
        _, options = parse_options_header(headers.get("content-disposition", ""))
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
        )
        pos = data_end + len(delimiter)
