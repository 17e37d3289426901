"""The HTTP API's response bodies (pydantic models): the one place the wire format is defined.

Requests are multipart (image, mask, params JSON); `params` is `engine.request.EditParams`,
documented by `EditParamsSchema` below so the OpenAPI schema shows its fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine import request as limits

JobStateName = Literal["queued", "running", "done", "failed", "cancelled"]


class ErrorDetail(BaseModel):
    status: int = Field(description="The HTTP status, repeated for clients that lose it.")
    message: str = Field(description="What went wrong and what to do, for a person.")
    field: str | None = Field(description="The request field at fault, when one is.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class LoraSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(
        description="A LoRA name as listed by GET /v1/models (inside a configured LoRA folder)."
    )
    strength: float = Field(1.0, ge=limits.LORA_STRENGTH_RANGE[0], le=limits.LORA_STRENGTH_RANGE[1])


class EditParamsSchema(BaseModel):
    """The JSON object sent as the `params` part of POST /v1/edits (documentation only: the
    server parses it with `EditParams.from_dict`, which enforces the same limits)."""

    model_config = ConfigDict(extra="forbid", title="EditParams")
    instruction: str = Field(max_length=limits.MAX_INSTRUCTION_CHARS)
    text_guidance: float = Field(7.5, ge=limits.GUIDANCE_RANGE[0], le=limits.GUIDANCE_RANGE[1])
    image_guidance: float = Field(1.5, ge=limits.GUIDANCE_RANGE[0], le=limits.GUIDANCE_RANGE[1])
    steps: int = Field(20, ge=1, le=limits.MAX_STEPS)
    seed: int = Field(0, ge=0, le=limits.MAX_SEED)
    variants: int = Field(1, ge=1, le=limits.MAX_VARIANTS)
    resolution: int = Field(512, ge=limits.MIN_RESOLUTION, le=limits.MAX_RESOLUTION)
    model: str | None = Field(
        None, description="A model id or name from GET /v1/models; null: the server's default."
    )
    loras: list[LoraSchema] = Field(default_factory=list, max_length=limits.MAX_LORAS)
    scheduler: Literal[limits.SCHEDULERS] = "default"  # type: ignore[valid-type]
    preserve_detail: bool = True


class ModelLoadState(BaseModel):
    model: str
    device: str
    state: Literal["loading", "ready", "failed"]
    elapsed_s: float = Field(description="Seconds spent loading (so far, while loading).")
    error: str | None = None


class QueueStats(BaseModel):
    queued: int
    running: int
    capacity: int
    stored_result_bytes: int
    result_memory_limit_bytes: int


class Health(BaseModel):
    status: Literal["ok", "loading", "error"] = Field(
        description="ok: ready; loading: the default model is still loading; error: it failed to load."
    )
    name: str
    version: str
    api_version: int
    devices: list[str] = Field(description="One worker per device.")
    device: str = Field(description="The first worker's device.")
    model: str = Field(description="The default model (used when a request names none).")
    loaded_models: list[str]
    model_loads: list[ModelLoadState] = Field(description="Model loads per device, newest last.")
    queue: QueueStats


class ModelInfo(BaseModel):
    id: str = Field(description="What to send as params.model.")
    name: str
    source: Literal["catalogue", "models-dir", "command-line"]
    architecture: str | None = None
    licence: str | None = None
    description: str | None = None
    default: bool = Field(description="The server's default model.")
    available_locally: bool = Field(
        description="Its weights are on this machine (HF cache or a folder)."
    )
    loaded: bool = Field(description="Loaded on at least one device.")


class ModelsResponse(BaseModel):
    default_model: str
    models: list[ModelInfo]
    loras: list[str] = Field(description="LoRA names usable in params.loras[].path.")


class JobAccepted(BaseModel):
    id: str
    state: JobStateName
    status_url: str
    events_url: str


class JobProgress(BaseModel):
    step: int
    total: int
    fraction: float = Field(ge=0, le=1)
    eta_s: float | None = Field(description="Estimated seconds left while running.")


class ResultInfo(BaseModel):
    index: int
    url: str
    available: bool = Field(
        description="False once released (expired, evicted or discarded): the URL then answers 410."
    )


class JobStatus(BaseModel):
    id: str
    state: JobStateName
    progress: JobProgress
    error: str | None = None
    error_field: str | None = None
    queue_position: int | None = Field(None, description="0 = next, while queued.")
    cancel_requested: bool = False
    created_at: float = Field(description="Unix time.")
    started_at: float | None = None
    finished_at: float | None = None
    results: list[ResultInfo]
    results_expire_in_s: float | None = Field(
        None, description="Seconds until unfetched results are released."
    )
    results_released: str | None = Field(
        None, description="Why the results are gone, when they are."
    )


class JobEvent(JobStatus):
    """One server-sent event: the job's status, plus a preview thumbnail when a new one exists."""

    preview_png: str | None = Field(
        None, description="Base64 PNG thumbnail of variant 0, when asked for."
    )
