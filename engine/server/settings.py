"""Everything the service is configured with, in one immutable object (built by the CLI or tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.manifest import DEFAULT_MODEL

# Defaults sized for one painter's machine: a handful of queued edits, results for a few
# minutes, and uploads large enough for a 8192² layer as raw BGRA (256 MiB) with its raw
# selection mask (64 MiB).
DEFAULT_QUEUE_SIZE = 16
DEFAULT_RESULT_TTL_S = 600.0
DEFAULT_RESULT_MEMORY_MB = 1024
DEFAULT_MAX_UPLOAD_MB = 400
# 8192² pixels. Pillow warns from ~89 M pixels and refuses from twice that; our own limit
# is lower, so we answer with a clear 413 before Pillow decodes anything.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
DEFAULT_MAX_LOADED_MODELS = 2
# Host memory that accepted, unfinished edits may take (their inputs, their results as they
# are produced, and each worker's working copies; estimated per pixel, see
# engine.server.jobs.JobMemory). An 8192² edit is counted as ~7.6 GiB (the real Editor's
# working copies take ~100 bytes per pixel), so the default admits one such edit.
DEFAULT_MAX_QUEUED_MEMORY_MB = 8192
# Uploads decoded at the same time (each holds its body and its decoded pixels meanwhile).
DEFAULT_MAX_DECODING_UPLOADS = 2
# The image's pixels × variants: four 8192² results (each kept as 4 bytes per pixel).
DEFAULT_MAX_VARIANT_PIXELS = 4 * 8192 * 8192
# LoRA adapters kept loaded per model; the least recently used one is unloaded past this.
DEFAULT_MAX_LORAS_LOADED = 8
PREVIEW_MAX_SIDE = 256


@dataclass(frozen=True)
class ServerSettings:
    """Configuration of one service instance. `token` is always set (generated if not given)."""

    token: str
    model: str = DEFAULT_MODEL
    devices: tuple[str, ...] = ("auto",)
    dtype: str = "auto"
    # auto | torch | openvino (engine.runtimes); None: $INSTRUCT_EDIT_RUNTIME, else auto
    runtime: str | None = None
    # torch.compile mode for the InstructPix2Pix UNet (engine.runtimes.compiled); off by default
    compile: str = "off"
    # auto | full | offload-text | model-offload | sequential-offload (engine.devices)
    memory_plan: str = "auto"
    # none | bnb-8bit | bnb-4bit | torchao-int8 | gguf (engine.quantization)
    quantization: str = "none"
    allow_pickle: bool = False
    queue_size: int = DEFAULT_QUEUE_SIZE
    models_dirs: tuple[Path, ...] = ()
    loras_dirs: tuple[Path, ...] = ()
    result_ttl_s: float = DEFAULT_RESULT_TTL_S
    result_memory_mb: float = DEFAULT_RESULT_MEMORY_MB
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_loaded_models: int = DEFAULT_MAX_LOADED_MODELS
    max_queued_memory_mb: float = DEFAULT_MAX_QUEUED_MEMORY_MB
    max_decoding_uploads: int = DEFAULT_MAX_DECODING_UPLOADS
    max_variant_pixels: int = DEFAULT_MAX_VARIANT_PIXELS
    max_loras_loaded: int = DEFAULT_MAX_LORAS_LOADED
    # Load the default model when the workers start, so the first edit does not wait for it.
    preload: bool = True
    # Where the token was read from (None: given with --token); /v1/health shows it to local
    # clients so the Krita plugin can reuse a running engine.
    token_file: Path | None = None
    # The address the service is bound to, and further names clients may reach it by: the
    # Host header of every request must name one of them (DNS rebinding; middleware.HostCheck).
    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    # A client request may make the server fetch weights from the hub (the operator's own
    # --model is always fetched when missing: that is the operator's choice, not a client's).
    allow_downloads: bool = False
    # The engine's state folder (trainings/, loras/trained/, datasets/); None: the folder of
    # the default token file. Set by `--data-dir`; create_app adds <data_dir>/loras to the
    # LoRA folders only when it is set (so a test app never lists the user's own LoRAs).
    data_dir: Path | None = None
    # Largest dataset zip a training upload may send (also capped by max_upload_mb).
    max_dataset_mb: float = 400.0

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("the service needs a non-empty token")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be at least 1 (got {self.queue_size})")
        if not self.devices:
            raise ValueError("at least one device is needed")
        if self.result_ttl_s <= 0 or self.result_memory_mb <= 0:
            raise ValueError("result_ttl_s and result_memory_mb must be positive")
        if self.max_queued_memory_mb <= 0:
            raise ValueError(
                f"max_queued_memory_mb must be positive (got {self.max_queued_memory_mb})"
            )
        for name in ("max_decoding_uploads", "max_variant_pixels", "max_loras_loaded"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)})")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def result_memory_bytes(self) -> int:
        return int(self.result_memory_mb * 1024 * 1024)

    @property
    def max_queued_memory_bytes(self) -> int:
        return int(self.max_queued_memory_mb * 1024 * 1024)
