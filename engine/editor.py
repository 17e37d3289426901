"""PLACEHOLDER — being written now (engine core). Interface contract below is final."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from engine.request import EditParams


@dataclass(frozen=True)
class Progress:
    step: int  # 1-based, steps done so far
    total: int
    preview: Image.Image | None = None  # cheap latent preview of variant 0 (when asked for)


class Editor:
    """One loaded model, ready to edit. Thread-safe for one edit at a time."""

    def __init__(
        self,
        model: str | Path | None = None,  # hub id, diffusers folder, .safetensors file; None = default
        *,
        device: str = "auto",  # auto|cpu|cuda|cuda:N|mps
        dtype: str = "auto",  # auto|fp32|fp16|bf16
        allow_pickle: bool = False,
        memory_saving: str = "auto",  # auto|off|slicing|offload
    ) -> None:
        raise NotImplementedError

    def edit(
        self,
        image: Image.Image,
        params: EditParams,
        mask: Image.Image | None = None,
        *,
        on_progress: Callable[[Progress], None] | None = None,
        cancel: threading.Event | None = None,
        preview_every: int = 0,
    ) -> list[Image.Image]:
        """Return `params.variants` images of the input's exact size and mode (RGB or RGBA).

        Raises EditCancelled within one step after `cancel` is set; InvalidInput for bad
        images/masks; OutOfMemory when even a batch of one does not fit.
        """
        raise NotImplementedError
