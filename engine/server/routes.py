"""The HTTP routes of API version 1 (see docs/api.md). Handlers stay thin: parsing and limits
here, queueing and state in `jobs`, model work in `workers`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Path, Request, UploadFile
from fastapi.responses import Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from engine.errors import InvalidInput
from engine.request import MAX_STEPS, EditParams
from engine.server.auth import require_token
from engine.server.errors import ApiError
from engine.server.images import decode_png, to_edit_mode
from engine.server.jobs import Job
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
async def health(service: ServiceDep) -> Health:
    return service.health()


@protected.get(
    "/models",
    response_model=ModelsResponse,
    responses=_errors(*AUTH_ERRORS),
    summary="Models and LoRAs this server offers",
)
def models(service: ServiceDep) -> ModelsResponse:
    return service.models()


def _parse_params(text: str) -> EditParams:
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ApiError(
            422, f"params is not valid JSON ({err}); send a JSON object", "params"
        ) from err
    if not isinstance(data, dict):
        raise ApiError(
            422, 'params must be a JSON object such as {"instruction": "make it evening"}', "params"
        )
    return EditParams.from_dict(data)


@protected.post(
    "/edits",
    status_code=202,
    response_model=JobAccepted,
    responses=_errors(*AUTH_ERRORS, 413, 429),
    summary="Queue an edit",
)
async def submit_edit(
    request: Request,
    service: ServiceDep,
    image: Annotated[UploadFile, File(description="The image to edit (PNG, RGB or RGBA).")],
    params: Annotated[
        str,
        Form(
            description="A JSON object with the edit's parameters (schema EditParams): "
            'e.g. {"instruction": "make it evening", "steps": 20, "variants": 2}.',
            max_length=64 * 1024,
        ),
    ],
    mask: Annotated[
        UploadFile | None,
        File(description="Optional PNG mask of the image's size: white is edited, black kept."),
    ] = None,
    preview_every: Annotated[
        int,
        Form(
            ge=0,
            le=MAX_STEPS,
            description="Send a preview thumbnail in events every N steps (0: none).",
        ),
    ] = 0,
) -> JobAccepted:
    form = await request.form()
    unknown = sorted(set(form.keys()) - FORM_FIELDS)
    if unknown:
        raise ApiError(
            422,
            f"unknown form field {unknown[0]!r}; the fields are image, mask, params, preview_every",
            unknown[0],
        )
    try:
        edit_params, model = service.catalog.resolve_params(_parse_params(params))
    except InvalidInput as err:
        raise ApiError(422, err.message, err.field) from err
    max_pixels = service.settings.max_image_pixels
    image_bytes = await image.read()
    mask_bytes = await mask.read() if mask is not None else None

    def decode() -> tuple[Any, Any]:
        picture = to_edit_mode(decode_png(image_bytes, "image", max_pixels))
        mask_picture = None
        if mask_bytes is not None:
            mask_picture = decode_png(mask_bytes, "mask", max_pixels)
            if mask_picture.size != picture.size:
                raise ApiError(
                    422,
                    f"mask is {mask_picture.width}×{mask_picture.height} but the image is "
                    f"{picture.width}×{picture.height}; they must be the same size",
                    "mask",
                )
            mask_picture = mask_picture.convert("L")
        return picture, mask_picture

    # Decoding a large PNG takes tens of milliseconds: keep it off the event loop. A small one
    # decodes faster than the hop to the thread pool.
    small = len(image_bytes) + len(mask_bytes or b"") <= INLINE_DECODE_BYTES
    picture, mask_picture = decode() if small else await run_in_threadpool(decode)
    job = Job(
        id=service.queue.new_id(),
        params=edit_params,
        model=model,
        image=picture,
        mask=mask_picture,
        preview_every=preview_every,
    )
    service.queue.submit(job)
    return JobAccepted(
        id=job.id,
        state=job.state.value,  # type: ignore[arg-type]
        status_url=f"/v1/edits/{job.id}",
        events_url=f"/v1/edits/{job.id}/events",
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


@protected.get(
    "/edits/{job_id}/results/{k}",
    response_class=Response,
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The PNG.",
        },
        **_errors(*AUTH_ERRORS, 404, 409, 410),
    },
    summary="Result image k (0-based) as PNG",
)
async def edit_result(
    job_id: JobId,
    k: Annotated[int, Path(ge=0, le=1000, description="0-based variant index.")],
    service: ServiceDep,
) -> Response:
    return Response(service.queue.result_png(job_id, k), media_type="image/png")


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
