"""The HTTP routes of API version 1 (see docs/api.md). Handlers stay thin: parsing and limits
here, queueing and state in `jobs`, model work in `workers`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from PIL import Image
from starlette.concurrency import run_in_threadpool

from engine.errors import InvalidInput
from engine.request import MAX_STEPS, EditParams
from engine.server.auth import is_loopback, require_token, token_matches
from engine.server.catalog import ModelEntry
from engine.server.errors import ApiError
from engine.server.images import (
    IMAGE_RAW_FORMATS,
    MASK_RAW_FORMATS,
    RAW_MEDIA_TYPE,
    DeclaredUpload,
    declared_upload,
    decode_declared,
    encode_png,
    encode_raw,
    parse_media_type,
    raw_media_type,
    to_edit_mode,
)
from engine.server.jobs import RESULT_BYTES_PER_PIXEL, Admission, Job, JobMemory
from engine.server.multipart import (
    Part,
    declared_length,
    parse_multipart,
    peek_parts,
    read_body,
    refuse_unread,
)
from engine.server.schema import (
    ErrorResponse,
    Health,
    JobAccepted,
    JobStatus,
    ModelsResponse,
)
from engine.server.service import Service

FORM_FIELDS = frozenset({"image", "mask", "params", "preview_every"})
INLINE_DECODE_BYTES = 64 * 1024
# Images up to this many pixels (image + mask) decode on the event loop (~1 ms).
INLINE_DECODE_PIXELS = 256 * 256
MAX_PARAMS_CHARS = 64 * 1024
RESULT_INLINE_PIXELS = 256 * 256

_PART_TYPES = (
    f"`image/png`, or raw pixels: `{RAW_MEDIA_TYPE}; format=bgra8|rgba8; width=W; height=H`"
)
EDIT_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "title": "EditRequest",
                "type": "object",
                "required": ["image", "params"],
                "additionalProperties": False,
                "properties": {
                    "image": {
                        "type": "string",
                        "format": "binary",
                        "description": "The image at full resolution, losslessly: the part's "
                        f"Content-Type is {_PART_TYPES} (8 bits per channel, not premultiplied, "
                        "rows top to bottom, tightly packed: W·H·4 bytes). Transparency is kept.",
                    },
                    "mask": {
                        "type": "string",
                        "format": "binary",
                        "description": "Optional mask of the image's size (white/255 = edit, "
                        "black/0 = keep, grey = blend): PNG, or raw "
                        f"`{RAW_MEDIA_TYPE}; format=gray8; width=W; height=H` (W·H bytes).",
                    },
                    "params": {
                        "type": "string",
                        "maxLength": MAX_PARAMS_CHARS,
                        "contentMediaType": "application/json",
                        "contentSchema": {"$ref": "#/components/schemas/EditParams"},
                        "description": "A JSON object with the edit's parameters (schema "
                        'EditParams), e.g. {"instruction": "make it evening", "variants": 2}.',
                    },
                    "preview_every": {
                        "type": "integer",
                        "minimum": 0,
                        "maximum": MAX_STEPS,
                        "default": 0,
                        "description": "Send a preview thumbnail in events every N steps "
                        "(0: none).",
                    },
                },
            },
            "encoding": {
                "image": {"contentType": f"image/png, {RAW_MEDIA_TYPE}"},
                "mask": {"contentType": f"image/png, {RAW_MEDIA_TYPE}"},
            },
        }
    },
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        401: "No bearer token.",
        403: "Wrong token.",
        404: "No such edit (or result index).",
        409: "The edit is not done yet.",
        410: "The result was released (expired, evicted or discarded); the message says why.",
        413: "The upload or the image's pixel count is over the limit.",
        422: "A parameter or image is not acceptable; `field` names it.",
        429: "The queue is full; retry after `Retry-After` seconds.",
    }
    headers = {
        401: {
            "WWW-Authenticate": {"schema": {"type": "string"}, "description": "Always `Bearer`."}
        },
        429: {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds to wait."}},
    }
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {"model": ErrorResponse, "description": descriptions[status]}
        if status in headers:
            responses[status]["headers"] = headers[status]
    return responses


AUTH_ERRORS = (401, 403, 422)


# Handlers and dependencies that only touch memory under the queue's short lock are `async`:
# a plain `def` would cost a thread-pool hop per request (~0.5-1 ms on a busy machine).


async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
JobId = Annotated[str, Path(description="The id POST /v1/edits returned.", max_length=64)]

public = APIRouter(prefix="/v1", tags=["service"])
protected = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], tags=["edits"])


@public.get(
    "/health", response_model=Health, summary="Is the service up, and which model is loaded"
)
async def health(request: Request, service: ServiceDep) -> Health:
    client = request.client.host if request.client is not None else ""
    # No token needed; one sent (and right) shows the model load errors in full.
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    authenticated = scheme.lower() == "bearer" and token_matches(
        given.strip(), service.settings.token
    )
    return service.health(local_client=is_loopback(client), authenticated=authenticated)


@protected.get(
    "/models",
    response_model=ModelsResponse,
    responses=_errors(*AUTH_ERRORS),
    summary="Models and LoRAs this server offers",
)
def models(service: ServiceDep) -> ModelsResponse:
    return service.models()


def _parse_params(text: str) -> EditParams:
    # InvalidInput (422) for bad JSON, too deep nesting and every field's type and range.
    return EditParams.from_json(text)


def _preview_every(text: str | None) -> int:
    if text is None:
        return 0
    value = text.strip()
    if not (value.isascii() and value.isdigit()) or int(value) > MAX_STEPS:
        raise ApiError(
            422,
            f"preview_every must be a whole number from 0 to {MAX_STEPS} (got {value[:20]!r})",
            "preview_every",
        )
    return int(value)


class _DecodeSlots:
    """At most `limit` uploads decode at once (each holds its body and its decoded pixels
    meanwhile). An asyncio semaphore per event loop: a TestClient and a server may run the same
    app on different loops, and an asyncio primitive must only be used on its own loop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._semaphore: asyncio.Semaphore | None = None

    def get(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._semaphore is None or self._loop is not loop:
            self._loop, self._semaphore = loop, asyncio.Semaphore(self.limit)
        return self._semaphore


def _decode_slots(request: Request, service: Service) -> asyncio.Semaphore:
    slots = getattr(request.app.state, "decode_slots", None)
    if slots is None:
        slots = request.app.state.decode_slots = _DecodeSlots(service.settings.max_decoding_uploads)
    return slots.get()


class _EditUpload:
    """The checks of one POST /v1/edits that need no decoded pixel, made as soon as the parts
    they read have arrived (often before the image's pixels have: see `read_body`): the
    params, the image's declared size against the pixel limits and the memory budget."""

    def __init__(self, service: Service, admission: Admission) -> None:
        self.service = service
        self.admission = admission
        self.params: EditParams | None = None
        self.model: ModelEntry | None = None
        self.image: DeclaredUpload | None = None

    def check_params(self, parts: dict[str, Part]) -> None:
        if self.params is not None:
            return
        params_text = parts["params"].text()
        if len(params_text) > MAX_PARAMS_CHARS:
            raise ApiError(422, f"params is longer than {MAX_PARAMS_CHARS} characters", "params")
        try:
            self.params, self.model = self.service.catalog.resolve_params(
                _parse_params(params_text)
            )
        except InvalidInput as err:
            raise ApiError(422, err.message, err.field) from err

    def check_image(self, image_part: Part) -> None:
        if self.image is not None:
            return
        assert self.params is not None
        settings = self.service.settings
        image = declared_upload(
            image_part.data,
            image_part.content_type,
            "image",
            settings.max_image_pixels,
            IMAGE_RAW_FORMATS,
        )
        variants = self.params.variants
        total = image.pixels * variants
        if total > settings.max_variant_pixels:
            most = max(1, settings.max_variant_pixels // image.pixels)
            raise ApiError(
                413,
                f"variants: {variants} variants of a {image.width}×{image.height} image are "
                f"{total} result pixels; this server makes at most {settings.max_variant_pixels} "
                f"per edit; ask for at most {most} variant(s), or send a smaller image",
                "variants",
            )
        result_bytes = total * RESULT_BYTES_PER_PIXEL
        if variants > 1 and result_bytes > settings.result_memory_bytes:
            most = max(1, settings.result_memory_bytes // (image.pixels * RESULT_BYTES_PER_PIXEL))
            raise ApiError(
                413,
                f"variants: {variants} results of {image.width}×{image.height} take "
                f"{result_bytes / 2**20:.0f} MiB, more than the {settings.result_memory_mb:g} MiB "
                f"this server keeps (--result-memory-mb); ask for at most {most} variant(s), or "
                "send a smaller image",
                "variants",
            )
        self.admission.expect(JobMemory(image.pixels, variants))
        self.image = image

    def inspect_head(self, content_type: str | None) -> Callable[[bytes], bool]:
        """For `read_body`: True once the params and the image's header have been checked."""

        def inspect(head: bytes) -> bool:
            parts = peek_parts(content_type, head)
            params, image = parts.get("params"), parts.get("image")
            if params is None or not params.complete or image is None:
                return False
            if image.complete or len(image.data) >= PNG_HEADER_BYTES or _is_raw(image):
                self.check_params(parts)
                self.check_image(image)
                return True
            return False

        return inspect


PNG_HEADER_BYTES = 24  # signature + IHDR's width and height


def _is_raw(part: Part) -> bool:
    return parse_media_type(part.content_type)[0] == RAW_MEDIA_TYPE


@protected.post(
    "/edits",
    status_code=202,
    response_model=JobAccepted,
    responses=_errors(*AUTH_ERRORS, 413, 429),
    summary="Queue an edit",
    openapi_extra={"requestBody": EDIT_REQUEST_BODY},
)
async def submit_edit(request: Request, service: ServiceDep) -> JobAccepted:
    # A place in the queue and the body's share of the memory budget are taken before a byte
    # of the body is kept: a full queue answers 429 at once (multipart.refuse_unread).
    content_type = request.headers.get("content-type")
    try:
        admission = service.queue.admit(declared_length(request) or 0)
    except ApiError as err:
        raise await refuse_unread(request, err) from None
    with admission:
        upload = _EditUpload(service, admission)
        # The body is read and split here (engine.server.multipart), not by FastAPI's form
        # parameters: a large raw upload then costs no temporary file and no extra copy. The
        # checks that need only headers run as soon as those have arrived.
        body = await read_body(
            request, upload.inspect_head(content_type), on_grow=admission.grow_body
        )
        job = await _job_from_body(request, service, upload, content_type, body)
        del body
        service.queue.submit(job, admission)
    return JobAccepted(
        id=job.id,
        state=job.state.value,  # type: ignore[arg-type]
        status_url=f"/v1/edits/{job.id}",
        events_url=f"/v1/edits/{job.id}/events",
    )


async def _job_from_body(
    request: Request,
    service: Service,
    upload: _EditUpload,
    content_type: str | None,
    body: bytearray,
) -> Job:
    if len(body) <= INLINE_DECODE_BYTES:
        parts = parse_multipart(content_type, body)
    else:  # splitting tens of MiB takes milliseconds: not on the event loop
        parts = await run_in_threadpool(parse_multipart, content_type, body)
    unknown = sorted(set(parts) - FORM_FIELDS)
    if unknown:
        raise ApiError(
            422,
            f"unknown form field {unknown[0]!r}; the fields are image, mask, params, preview_every",
            unknown[0],
        )
    for required in ("image", "params"):
        if required not in parts:
            raise ApiError(422, f"{required}: the part is missing", required)
    upload.check_params(parts)
    # Read from the whole body: the part may come after the image.
    preview_every = _preview_every(
        parts["preview_every"].text() if "preview_every" in parts else None
    )
    image_part, mask_part = parts["image"], parts.get("mask")
    upload.check_image(image_part)
    image = upload.image
    assert image is not None and upload.params is not None and upload.model is not None
    max_pixels = service.settings.max_image_pixels
    mask = None
    if mask_part is not None:
        mask = declared_upload(
            mask_part.data, mask_part.content_type, "mask", max_pixels, MASK_RAW_FORMATS
        )
        # Compared before either is decoded: a wrong mask costs no decoding.
        if (mask.width, mask.height) != (image.width, image.height):
            raise ApiError(
                422,
                f"mask is {mask.width}×{mask.height} but the image is {image.width}×"
                f"{image.height}; they must be the same size",
                "mask",
            )

    def decode() -> tuple[Image.Image, Image.Image | None]:
        picture = to_edit_mode(decode_declared(image_part.data, image, max_pixels))
        mask_picture = None
        if mask_part is not None and mask is not None:
            mask_picture = decode_declared(mask_part.data, mask, max_pixels)
            if mask_picture.mode != "L":
                mask_picture = mask_picture.convert("L")
        return picture, mask_picture

    # Decoding a large image takes tens of milliseconds: keep it off the event loop, and at
    # most `max_decoding_uploads` at once. A small one (by its declared pixel count: a tiny PNG
    # can hold a huge image) decodes faster than the hop to the thread pool.
    pixels = image.pixels + (mask.pixels if mask is not None else 0)
    if pixels <= INLINE_DECODE_PIXELS:
        picture, mask_picture = decode()
    else:
        async with _decode_slots(request, service):
            picture, mask_picture = await run_in_threadpool(decode)
    return Job(
        id=service.queue.new_id(),
        params=upload.params,
        model=upload.model,
        image=picture,
        mask=mask_picture,
        preview_every=preview_every,
        memory=upload.admission.memory,
    )


@protected.get(
    "/edits/{job_id}",
    response_model=JobStatus,
    responses=_errors(*AUTH_ERRORS, 404),
    summary="An edit's state, progress and results",
)
async def edit_status(job_id: JobId, service: ServiceDep) -> JobStatus:
    return service.status(service.queue.get(job_id))


@protected.delete(
    "/edits/{job_id}",
    response_model=JobStatus,
    responses=_errors(*AUTH_ERRORS, 404),
    summary="Cancel an edit (or discard a finished one's results)",
)
async def cancel_edit(job_id: JobId, service: ServiceDep) -> JobStatus:
    return service.status(service.queue.cancel(job_id))


_RAW_RESULT_HEADERS = {
    "X-Image-Width": {"schema": {"type": "string"}, "description": "Raw answers: the width."},
    "X-Image-Height": {"schema": {"type": "string"}, "description": "Raw answers: the height."},
}


@protected.get(
    "/edits/{job_id}/results/{k}",
    response_class=Response,
    responses={
        200: {
            "content": {
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                RAW_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
            },
            "description": "The result at the input's size: a PNG (RGBA when the input had "
            "transparency), or with format=bgra8|rgba8 raw pixels, always 4 channels (A = 255 "
            f"when opaque), Content-Type `{RAW_MEDIA_TYPE}; format=F; width=W; height=H`.",
            "headers": _RAW_RESULT_HEADERS,
        },
        **_errors(*AUTH_ERRORS, 404, 409, 410),
    },
    summary="Result image k (0-based): PNG, or raw BGRA/RGBA pixels",
)
async def edit_result(
    job_id: JobId,
    k: Annotated[int, Path(ge=0, le=1000, description="0-based variant index.")],
    service: ServiceDep,
    format: Annotated[
        Literal["png", "bgra8", "rgba8"],
        Query(description="png (default), or raw pixels: bgra8 (Krita's order) or rgba8."),
    ] = "png",
) -> Response:
    result = service.queue.result(job_id, k)
    image = result.image
    if format == "png":
        png = result.png
        if png is None:
            small = image.width * image.height <= RESULT_INLINE_PIXELS
            png = encode_png(image) if small else await run_in_threadpool(encode_png, image)
            service.queue.cache_png(job_id, result, png)
        return Response(png, media_type="image/png")
    if image.width * image.height <= RESULT_INLINE_PIXELS:
        pixels = encode_raw(image, format)
    else:
        pixels = await run_in_threadpool(encode_raw, image, format)
    return Response(
        pixels,
        media_type=raw_media_type(format, image.width, image.height),
        headers={"X-Image-Width": str(image.width), "X-Image-Height": str(image.height)},
    )


async def job_for_events(job_id: JobId, service: ServiceDep) -> Job:
    # Resolved before the stream starts, so an unknown id gets a proper 404 answer.
    return service.queue.get(job_id)


@protected.get(
    "/edits/{job_id}/events",
    response_class=EventSourceResponse,
    responses=_errors(*AUTH_ERRORS, 404),
    summary="Progress as server-sent events, ending with the final state",
    description="Events `progress` (queued/running; `data` is a JobEvent, with `preview_png` when "
    "a new preview exists) and then one of `done`, `failed`, `cancelled`, after which the stream ends.",
)
async def edit_events(
    job: Annotated[Job, Depends(job_for_events)], service: ServiceDep
) -> AsyncIterable[ServerSentEvent]:
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def on_change() -> None:
        # Called from worker threads; hand the wake-up to the event loop.
        loop.call_soon_threadsafe(changed.set)

    service.queue.add_listener(job, on_change)
    try:
        sent_version, sent_preview = -1, 0
        while True:
            changed.clear()
            if job.version != sent_version:
                sent_version = job.version
                status = service.status(job)
                preview = None
                if job.preview_serial != sent_preview:
                    sent_preview, preview = job.preview_serial, job.preview_b64
                # A JobEvent: the status plus the preview (serialised once, here).
                data = status.model_dump(mode="json")
                data["preview_png"] = preview
                final = status.state in ("done", "failed", "cancelled")
                yield ServerSentEvent(
                    event=status.state if final else "progress",
                    raw_data=json.dumps(data, separators=(",", ":")),
                    id=str(sent_version),
                )
                if final:
                    return
            await changed.wait()
    finally:
        # Runs on a client disconnect too (the generator is closed): nothing stays registered.
        service.queue.remove_listener(job, on_change)
