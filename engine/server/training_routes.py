"""The HTTP routes of training jobs (`/v1/trainings`, `/v1/training-options`; docs/api.md).

Thin handlers: parsing, the dataset's arrival (folder or zip) and the answers here; the
jobs, their processes and their state in `engine.server.trainings`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from engine.server.auth import is_loopback, require_token
from engine.server.datasets import (
    check_pairs_folder,
    extract_dataset_zip,
    snapshot_pairs,
)
from engine.server.errors import ApiError
from engine.server.images import parse_media_type
from engine.server.multipart import parse_multipart, read_body
from engine.server.schema import ErrorResponse
from engine.server.trainings import MIN_PAIRS, OVERRIDES, TrainingJob, TrainingManager

TrainingStateName = Literal[
    "queued", "running", "paused", "done", "failed", "cancelled", "interrupted"
]
MAX_PARAMS_BYTES = 64 * 1024


class TrainingSettings(BaseModel):
    max_steps: int
    lora_rank: int
    resolution: int
    learning_rate: float
    batch_size: int
    grad_accum: int


class TrainingValidation(BaseModel):
    step: int = Field(description="The training step the grid was made at.")
    index: int = Field(description="Its index for GET /v1/trainings/{id}/validations/{index}.")


class TrainedLora(BaseModel):
    path: str = Field(
        description="The LoRA's name in GET /v1/models `loras` and in an edit's params.loras[].path."
    )
    card: str = Field(description="The model card (markdown).")


class TrainingStatus(BaseModel):
    id: str
    name: str
    model: str
    preset: str
    settings: TrainingSettings
    pairs: int
    state: TrainingStateName = Field(
        description="paused: waiting between two steps while edits run (an edit always goes "
        "first); interrupted: the engine stopped while it ran."
    )
    step: int
    max_steps: int
    loss: list[tuple[int, float]] = Field(
        description="[step, loss] of every logged step, thinned evenly to at most 500 points."
    )
    eta_s: float | None
    validations: list[TrainingValidation]
    error: str | None
    field: str | None
    lora: TrainedLora | None
    created: float
    updated: float
    resumable: bool = Field(description="POST …/resume would continue it from a checkpoint.")
    cancel_requested: bool = Field(
        False, description="A cancel is under way (the runner ends after its current step)."
    )


class TrainingList(BaseModel):
    trainings: list[TrainingStatus]


class TrainableModel(BaseModel):
    id: str
    family: str | None
    trainable: bool
    why_not: str | None


class TrainingPreset(TrainingSettings):
    id: Literal["quick", "balanced", "thorough"]
    label: str
    minutes_hint: str = Field(description="How long it takes on this engine's kind of device.")


class KnownDataset(BaseModel):
    folder: str
    pairs: int


class TrainingOptions(BaseModel):
    models: list[TrainableModel]
    presets: list[TrainingPreset]
    min_pairs: int
    max_dataset_mb: int
    datasets: list[KnownDataset] = Field(
        description="Dataset folders the engine has (<data-dir>/datasets/*); loopback clients only."
    )
    device: str = Field(description="cuda, mps or cpu: where trainings run.")


class TrainingOverrides(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_steps: int | None = Field(None, ge=1, le=20_000)
    lora_rank: int | None = Field(None, ge=1, le=128)
    resolution: int | None = Field(None, ge=32, le=1024, multiple_of=8)
    learning_rate: float | None = Field(None, ge=1e-6, le=1e-2)
    batch_size: int | None = Field(None, ge=1, le=16)
    grad_accum: int | None = Field(None, ge=1, le=64)
    validate_every: int | None = Field(None, ge=0, description="Steps between validation grids.")
    checkpoint_every: int | None = Field(None, ge=1, description="Steps between checkpoints.")
    validation_steps: int | None = Field(
        None, ge=1, le=100, description="Sampling steps of each validation edit (default 20)."
    )


class TrainingRequest(BaseModel):
    """The create request (JSON body, or the `params` part of a multipart upload)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9 _.\-]+$")
    model: str = Field(description="A model id from GET /v1/training-options (trainable).")
    preset: Literal["quick", "balanced", "thorough"]
    overrides: TrainingOverrides | None = None
    dataset_folder: str | None = Field(
        None,
        description="JSON body only, loopback clients only: a pairs folder on the engine's "
        "machine (metadata.jsonl + images). Its checked pairs are copied into the training.",
    )


assert set(TrainingOverrides.model_fields) == set(OVERRIDES)

CREATE_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/TrainingRequest"}},
        "multipart/form-data": {
            "schema": {
                "title": "TrainingUpload",
                "type": "object",
                "required": ["params", "dataset"],
                "properties": {
                    "params": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"$ref": "#/components/schemas/TrainingRequest"},
                        "description": "The request as JSON, without dataset_folder.",
                    },
                    "dataset": {
                        "type": "string",
                        "format": "binary",
                        "description": "A zip of a pairs folder (metadata.jsonl + images), at "
                        "most max_dataset_mb (GET /v1/training-options).",
                    },
                },
            },
            "encoding": {"dataset": {"contentType": "application/zip"}},
        },
    },
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        401: "No bearer token.",
        403: "Wrong token, or a dataset folder from a client that is not on this machine.",
        404: "No such training (or validation image).",
        409: "A training is already running, or this one cannot be resumed now.",
        413: "The dataset upload is over max_dataset_mb.",
        422: "A parameter or the dataset is not acceptable; `field` names it.",
        507: "The dataset could not be stored (disk full).",
    }
    return {s: {"model": ErrorResponse, "description": descriptions[s]} for s in statuses}


async def get_manager(request: Request) -> TrainingManager:
    return request.app.state.trainings


ManagerDep = Annotated[TrainingManager, Depends(get_manager)]
TrainingId = Annotated[
    str, PathParam(description="The id POST /v1/trainings returned.", max_length=64)
]

router = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], tags=["trainings"])


def _status(manager: TrainingManager, job: TrainingJob) -> TrainingStatus:
    return TrainingStatus.model_validate(manager.status(job))


def _local(request: Request) -> bool:
    return is_loopback(request.client.host if request.client is not None else "")


@router.get(
    "/training-options",
    response_model=TrainingOptions,
    responses=_errors(401, 403, 422),
    summary="Trainable models, presets and limits of training jobs",
)
def training_options(request: Request, manager: ManagerDep) -> TrainingOptions:
    return TrainingOptions.model_validate(manager.options(local_client=_local(request)))


def _json_params(text: str | bytes, where: str) -> dict[str, Any]:
    if len(text) > MAX_PARAMS_BYTES:
        raise ApiError(422, f"{where} is longer than {MAX_PARAMS_BYTES} bytes", where)
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ApiError(422, f"{where} is not valid JSON ({err})", where) from err
    if not isinstance(data, dict):
        raise ApiError(
            422,
            f'{where} must be a JSON object such as {{"name": "ink", "model": "…", '
            '"preset": "quick"}',
            where,
        )
    return data


@router.post(
    "/trainings",
    status_code=202,
    response_model=TrainingStatus,
    responses=_errors(401, 403, 409, 413, 422, 507),
    summary="Start a training: a LoRA fine-tune on a dataset (zip upload or engine folder)",
    openapi_extra={"requestBody": CREATE_REQUEST_BODY},
)
async def create_training(request: Request, manager: ManagerDep) -> TrainingStatus:
    media_type, _ = parse_media_type(request.headers.get("content-type"))
    body = await read_body(request)
    zip_data: memoryview | None = None
    folder: Path | None = None
    if media_type == "application/json":
        params = _json_params(bytes(body), "body")
        given = params.get("dataset_folder")
        if not isinstance(given, str) or not given.strip():
            raise ApiError(
                422,
                "dataset_folder is missing: give a pairs folder on the engine's machine, or "
                "upload the dataset as a zip (multipart parts params and dataset)",
                "dataset_folder",
            )
        if not _local(request):
            raise ApiError(
                403,
                "a dataset folder can only be given by a client on the engine's machine; upload "
                "the dataset as a zip (multipart parts params and dataset)",
                "dataset_folder",
            )
        folder = Path(given).expanduser()
        if not folder.is_absolute():
            raise ApiError(422, "dataset_folder must be an absolute path", "dataset_folder")
        params.pop("dataset_folder")
    elif media_type == "multipart/form-data":
        parts = await run_in_threadpool(parse_multipart, request.headers.get("content-type"), body)
        unknown = sorted(set(parts) - {"params", "dataset"})
        if unknown:
            raise ApiError(
                422, f"unknown part {unknown[0]!r}; the parts are params and dataset", unknown[0]
            )
        for required in ("params", "dataset"):
            if required not in parts:
                raise ApiError(422, f"{required}: the part is missing", required)
        params = _json_params(parts["params"].text(), "params")
        if "dataset_folder" in params:
            raise ApiError(
                422,
                "dataset_folder goes with a JSON body; a multipart upload sends the dataset part",
                "dataset_folder",
            )
        zip_data = parts["dataset"].data
        if len(zip_data) > manager.max_dataset_bytes:
            raise ApiError(
                413,
                f"the dataset zip is {len(zip_data) / 2**20:.1f} MiB; this engine accepts at "
                f"most {manager.max_dataset_bytes / 2**20:.0f} MiB (fewer or smaller images)",
                "dataset",
            )
    else:
        raise ApiError(
            422,
            "send application/json (with dataset_folder) or multipart/form-data (parts params "
            "and dataset, a zip)",
            "content-type",
        )

    name, entry, preset, sizes = manager.check_request(params)
    manager.ensure_none_running()
    await run_in_threadpool(
        manager.check_memory_for, entry, preset, sizes["settings"], sizes["runner"]
    )
    max_pixels = manager.settings.max_image_pixels

    def prepare() -> TrainingJob:
        job_id, job_folder = manager.new_job_folder()
        try:
            if zip_data is not None:
                root = extract_dataset_zip(zip_data, job_folder / "upload")
                pairs = check_pairs_folder(root, MIN_PAIRS, max_pixels)
                dataset = root
            else:
                assert folder is not None
                pairs = check_pairs_folder(folder, MIN_PAIRS, max_pixels)
                dataset = job_folder / "data"
                snapshot_pairs(folder, pairs, dataset)
            return manager.create(
                job_id, job_folder, name, entry, preset, sizes, dataset, len(pairs)
            )
        except OSError as err:
            shutil.rmtree(job_folder, ignore_errors=True)
            raise ApiError(
                507, f"the dataset could not be stored in {job_folder.parent}: {err}", "dataset"
            ) from err
        except BaseException:
            # Our own new folder: nothing of the painter's is in it.
            shutil.rmtree(job_folder, ignore_errors=True)
            raise

    job = await run_in_threadpool(prepare)
    return _status(manager, job)


@router.get(
    "/trainings",
    response_model=TrainingList,
    responses=_errors(401, 403, 422),
    summary="Every training of this engine's data folder, newest first",
)
async def list_trainings(manager: ManagerDep) -> TrainingList:
    return TrainingList(trainings=[_status(manager, job) for job in manager.list()])


@router.get(
    "/trainings/{training_id}",
    response_model=TrainingStatus,
    responses=_errors(401, 403, 404, 422),
    summary="A training's state, progress, loss curve and result",
)
async def training_status(training_id: TrainingId, manager: ManagerDep) -> TrainingStatus:
    return _status(manager, manager.get(training_id))


@router.delete(
    "/trainings/{training_id}",
    response_model=TrainingStatus,
    responses=_errors(401, 403, 404, 422),
    summary="Cancel a training (it stops after its step; the last checkpoint stays)",
    description="A finished training is left as it is (no-op).",
)
async def cancel_training(training_id: TrainingId, manager: ManagerDep) -> TrainingStatus:
    job = manager.cancel(training_id)
    # Usually the runner ends within a step: answer with the final state when it does.
    await run_in_threadpool(manager.wait_finished, job, 2.0)
    return _status(manager, job)


@router.post(
    "/trainings/{training_id}/resume",
    status_code=202,
    response_model=TrainingStatus,
    responses=_errors(401, 403, 404, 409, 422),
    summary="Continue an interrupted, cancelled or failed training from its last checkpoint",
)
async def resume_training(training_id: TrainingId, manager: ManagerDep) -> TrainingStatus:
    job = await run_in_threadpool(manager.resume, training_id)
    return _status(manager, job)


@router.get(
    "/trainings/{training_id}/validations/{index}",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "A validation grid: one row per validation pair (before | the "
            "model's after at that step), with the instruction underneath.",
        },
        **_errors(401, 403, 404, 422),
    },
    summary="Validation image `index` (0-based, in step order)",
)
async def training_validation(
    training_id: TrainingId,
    index: Annotated[int, PathParam(ge=0, le=100_000)],
    manager: ManagerDep,
) -> FileResponse:
    return FileResponse(manager.validation_path(training_id, index), media_type="image/png")


async def training_for_events(training_id: TrainingId, manager: ManagerDep) -> TrainingJob:
    return manager.get(training_id)


@router.get(
    "/trainings/{training_id}/events",
    response_class=EventSourceResponse,
    responses=_errors(401, 403, 404, 422),
    summary="Progress as server-sent events, ending with the final state",
    description="First a `state` event (TrainingStatus); then `progress` "
    '(`{"step", "max_steps", "loss", "eta_s"}`), `validation` (`{"step", "index"}`) and '
    "`state` (on each change of state); the stream ends after a `state` event whose state is "
    "done, failed, cancelled or interrupted.",
)
async def training_events(
    job: Annotated[TrainingJob, Depends(training_for_events)], manager: ManagerDep
) -> AsyncIterable[ServerSentEvent]:
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def on_change() -> None:
        loop.call_soon_threadsafe(changed.set)

    def event(name: str, data: dict[str, Any]) -> ServerSentEvent:
        return ServerSentEvent(event=name, raw_data=json.dumps(data, separators=(",", ":")))

    manager.add_listener(job, on_change)
    try:
        sent_state: str | None = None
        sent_step = -1
        sent_validations = 0
        while True:
            changed.clear()
            status = manager.status(job)
            for validation in status["validations"][sent_validations:]:
                yield event("validation", validation)
            sent_validations = len(status["validations"])
            if status["step"] != sent_step and status["loss"]:
                sent_step = status["step"]
                yield event(
                    "progress",
                    {
                        "step": status["step"],
                        "max_steps": status["max_steps"],
                        "loss": status["loss"][-1][1],
                        "eta_s": status["eta_s"],
                    },
                )
            if status["state"] != sent_state:
                sent_state = status["state"]
                yield event("state", TrainingStatus.model_validate(status).model_dump(mode="json"))
                if sent_state in ("done", "failed", "cancelled", "interrupted"):
                    return
            await changed.wait()
    finally:
        manager.remove_listener(job, on_change)
