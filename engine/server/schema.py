"""The HTTP API's response bodies (pydantic models): the one place the wire format is defined.

Requests are multipart (image, mask, params JSON); `params` is `engine.request.EditParams`,
documented by `EditParamsSchema` below so the OpenAPI schema shows its fields.
"""

from __future__ import annotations

from typing import Any, Literal

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


FAMILY_PARAMETERS_NOTE = (
    "Any other key is a parameter of the chosen model's family, as `GET /v1/models` lists it "
    "in that model's `params` (name, kind, default, range): e.g. `text_guidance`, "
    "`image_guidance`, `scheduler` for InstructPix2Pix models, `guidance` for FLUX.1 Kontext and "
    "FLUX.2 klein, `true_cfg_scale` and `negative_prompt` for Qwen-Image-Edit. A key the model's "
    "family does not take is a 422 naming it."
)


class EditParamsSchema(BaseModel):
    """The JSON object sent as the `params` part of POST /v1/edits (documentation only: the
    server parses it with `EditParams.from_dict`, which enforces the same limits). Flat: the
    shared fields below, and the model family's own parameters beside them."""

    model_config = ConfigDict(
        extra="allow",
        title="EditParams",
        json_schema_extra={
            "additionalProperties": {"description": FAMILY_PARAMETERS_NOTE},
            "examples": [
                {"instruction": "make it evening", "seed": 7, "variants": 2},
                {
                    "instruction": "make it evening",
                    "model": "timbrooks/instruct-pix2pix",
                    "text_guidance": 7.5,
                    "image_guidance": 1.5,
                },
                {
                    "instruction": "make it evening",
                    "model": "black-forest-labs/FLUX.1-Kontext-dev",
                    "guidance": 2.5,
                },
            ],
        },
    )
    instruction: str = Field(
        max_length=limits.MAX_INSTRUCTION_CHARS,
        description="What to change; empty: the image comes back unchanged.",
    )
    seed: int = Field(0, ge=0, le=limits.MAX_SEED, description="Variant k uses seed + k.")
    variants: int = Field(1, ge=1, le=limits.MAX_VARIANTS)
    steps: int | None = Field(
        None, ge=1, le=limits.MAX_STEPS, description="null: the model's recommended steps."
    )
    resolution: int | None = Field(
        None,
        ge=limits.MIN_RESOLUTION,
        le=limits.MAX_RESOLUTION,
        description="The working size (the family's rule: long side, or √area for the DiT "
        "families); null: the model's default. Results come back at the input's size.",
    )
    model: str | None = Field(
        None, description="A model id or name from GET /v1/models; null: the server's default."
    )
    loras: list[LoraSchema] = Field(default_factory=list, max_length=limits.MAX_LORAS)
    preserve_detail: bool = Field(
        True, description="Apply the edit as a change on the full-resolution input."
    )
    preset: str | None = Field(
        None,
        max_length=64,
        description="A preset id of the model (GET /v1/models `presets`, e.g. lightning-8): its "
        "LoRAs, steps and parameters, under what the request sets itself.",
    )


class ParamSpecSchema(BaseModel):
    """One parameter a model family takes (engine.families.base.ParamSpec.to_json)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(description="The key to send in params.")
    kind: Literal["float", "int", "choice", "bool", "text"]
    default: Any = Field(description="Used when the key is not sent.")
    label: str
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: list[str] | None = None
    max_length: int | None = None
    explore: float | None = Field(
        None, description="Step of this parameter's axis in an exploration grid (absent: none)."
    )


class ResolutionRuleSchema(BaseModel):
    model_config = ConfigDict(extra="allow")
    rule: Literal["long_side", "area"] = Field(
        description="long_side: the long side becomes `resolution`; area: about resolution² "
        "pixels at the input's aspect ratio."
    )
    default: int
    multiple: int
    minimum: int
    maximum: int


class StepsRuleSchema(BaseModel):
    model_config = ConfigDict(extra="allow")
    default: int
    minimum: int
    maximum: int


class Supports(BaseModel):
    model_config = ConfigDict(extra="allow")
    mask: bool = True
    loras: bool = True
    negative_prompt: bool = False


class Recommended(BaseModel):
    model_config = ConfigDict(extra="allow")
    steps: int | None = None
    resolution: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class Preset(BaseModel):
    """A named set of values (e.g. a few-step Lightning LoRA with its steps)."""

    model_config = ConfigDict(extra="allow")
    id: str
    label: str
    loras: list[dict[str, Any]] = Field(default_factory=list)
    steps: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class Limits(BaseModel):
    """The shared limits of every edit (engine.request), published once."""

    model_config = ConfigDict(extra="allow")
    max_instruction_chars: int
    max_variants: int
    max_seed: int
    max_loras: int
    lora_strength: list[float] = Field(description="[lowest, highest] LoRA strength.")


class ModelLoadState(BaseModel):
    model: str = Field(description="The model's id (a local folder or file: its name only).")
    device: str
    state: Literal["loading", "ready", "failed"]
    elapsed_s: float = Field(description="Seconds spent loading (so far, while loading).")
    error: str | None = Field(
        None,
        description="Why the load failed: in full to a caller that sent the token, else only "
        "that it failed (the reason can quote paths).",
    )


class QueueStats(BaseModel):
    queued: int
    running: int
    capacity: int
    stored_result_bytes: int
    result_memory_limit_bytes: int
    edit_memory_bytes: int = Field(
        0,
        description="Host memory counted for waiting and running edits and uploads being read "
        "(estimated from their pixels: images, results, working copies).",
    )
    edit_memory_limit_bytes: int = Field(
        0, description="The budget for edit_memory_bytes (--max-queued-memory-mb)."
    )


class DeviceMemory(BaseModel):
    device: str
    plan: str | None = Field(
        description="full | offload-text | model-offload | sequential-offload: the plan chosen "
        "from free memory (or by --memory-plan); null while it cannot be told yet."
    )
    free_bytes: int | None = Field(description="Free device memory (host RAM for the CPU).")
    total_bytes: int | None
    quantization: str = Field(description="none | bnb-8bit | bnb-4bit | torchao-int8 | gguf")


class Instance(BaseModel):
    """Which installation and process answers: lets a client reuse a running engine."""

    install_id: str = Field(
        description="sha256 of the Python environment's folder and the engine package's folder "
        "(docs/api.md gives the recipe), first 16 hex digits."
    )
    token_file: str | None = Field(
        description="The file the token was read from (null: given on the command line, or "
        "the client is not on this machine)."
    )
    pid: int | None = Field(description="The service's process id (null for remote clients).")


class WorkerState(BaseModel):
    """One device worker, as the service's supervisor sees it."""

    device: str
    alive: bool = Field(
        description="The worker thread is running (false: it died, and the service exits)."
    )
    busy: bool = Field(description="Running an edit or loading a model now.")
    job: str | None = Field(None, description="The id of the edit it is running, if any.")
    error: str | None = Field(
        None, description="Why it stopped, when it did (a dead thread or a fatal device error)."
    )


class Health(BaseModel):
    status: Literal["ok", "loading", "error"] = Field(
        description="ok: ready; loading: the default model is still loading; error: it failed to load."
    )
    name: str
    version: str
    api_version: int
    devices: list[str] = Field(description="One worker per device.")
    device: str = Field(description="The first worker's device.")
    model: str = Field(
        description="The default model (used when a request names none): its id, or for a "
        "local folder or file its name only."
    )
    loaded_models: list[str] = Field(description="Ids (local models: names) of loaded models.")
    model_loads: list[ModelLoadState] = Field(description="Model loads per device, newest last.")
    queue: QueueStats
    memory: list[DeviceMemory] = Field(
        default_factory=list, description="Memory and the memory plan, per device."
    )
    workers: list[WorkerState] = Field(
        default_factory=list, description="Each device worker: alive, busy."
    )
    instance: Instance


class ModelInfo(BaseModel):
    id: str = Field(description="What to send as params.model.")
    name: str
    source: Literal["catalogue", "models-dir", "command-line"]
    architecture: str | None = None
    licence: str | None = None
    non_commercial: bool | None = Field(
        None, description="Its licence forbids commercial use (null: not known)."
    )
    description: str | None = None
    default: bool = Field(description="The server's default model.")
    available_locally: bool = Field(
        description="Its weights are on this machine (HF cache or a folder)."
    )
    loaded: bool = Field(description="Loaded on at least one device.")
    family: str | None = Field(
        None, description="The model family id (null: not known before loading)."
    )
    family_label: str | None = None
    params: list[ParamSpecSchema] = Field(
        default_factory=list,
        description="The family's own parameters, sent as extra keys of params.",
    )
    resolution: ResolutionRuleSchema | None = None
    steps: StepsRuleSchema | None = None
    supports: Supports | None = None
    download_gb: float | None = None
    vram_gb: dict[str, float] | None = Field(
        None, description="GB of device memory needed per memory plan."
    )
    recommended: Recommended | None = None
    presets: list[Preset] = Field(default_factory=list)


class ModelsResponse(BaseModel):
    default_model: str
    models: list[ModelInfo]
    loras: list[str] = Field(description="LoRA names usable in params.loras[].path.")
    limits: Limits


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
    note: str | None = Field(
        default=None,
        description="What the engine is doing before the steps start, when that takes long "
        "(converting a model for the CPU runtime or calibrating int8 on its first use), in "
        "words for the painter; null during the steps.",
    )


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
