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
PREVIEW_MAX_SIDE = 256


@dataclass(frozen=True)
class ServerSettings:
    """Configuration of one service instance. `token` is always set (generated if not given)."""

    token: str
    model: str = DEFAULT_MODEL
    devices: tuple[str, ...] = ("auto",)
    dtype: str = "auto"
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
    # Load the default model when the workers start, so the first edit does not wait for it.
    preload: bool = True
    # Where the token was read from (None: given with --token); /v1/health shows it to local
    # clients so the Krita plugin can reuse a running engine.
    token_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("the service needs a non-empty token")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be at least 1 (got {self.queue_size})")
        if not self.devices:
            raise ValueError("at least one device is needed")
        if self.result_ttl_s <= 0 or self.result_memory_mb <= 0:
            raise ValueError("result_ttl_s and result_memory_mb must be positive")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def result_memory_bytes(self) -> int:
        return int(self.result_memory_mb * 1024 * 1024)
