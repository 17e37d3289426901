"""What the training loop needs from a model family: a `Trainee`.

A trainee is one base model made trainable plus its objective. `train()` only sees this
interface, so the loop reads the same for InstructPix2Pix (a UNet, noise prediction, three-way
dropout) and for the flow-matching families (a transformer, velocity prediction on the target
tokens). Each family implements it in a module of its own beside this one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image


@dataclass
class CardInfo:
    """What the model card says about the family (the rest comes from the run's settings)."""

    title: str  # "InstructPix2Pix fine-tune"
    method: str  # "LoRA (rank 16) on the UNet attention projections"
    pipeline_class: str  # diffusers class that loads the result, e.g. "FluxKontextPipeline"
    tags: list[str] = field(default_factory=list)


class Trainee(ABC):
    """One base model, made trainable, with its training objective.

    Attributes set by the constructor of each family:
    - `family`: the engine's family id ("sd-ip2p", "flux-kontext", …)
    - `source`: the base model as given (hub id or folder)
    - `kind`: a short description of the base shown in logs and the model card
    - `denoiser`: the network the optimiser updates (UNet or transformer), with the LoRA
      adapter already added when `use_lora`
    - `use_lora`, `lora_rank`
    """

    family: str
    source: str
    kind: str
    denoiser: torch.nn.Module
    use_lora: bool
    lora_rank: int | None

    # ----------------------------------------------------------------------------------
    # Set-up

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    @abstractmethod
    def place(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Move the frozen parts to `device` in `weight_dtype`; the denoiser's frozen base
        weights too when training a LoRA (the adapter stays float32), all of it in float32
        when training fully."""

    def prepare(self, device: torch.device, weight_dtype: torch.dtype) -> None:  # noqa: B027
        """Anything computed once before the loop (e.g. the embedding of the empty text)."""

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match for `--resume` to continue the same run."""
        return {
            "family": self.family,
            "model": self.source,
            "lora": self.use_lora,
            "lora_rank": self.lora_rank,
        }

    # ----------------------------------------------------------------------------------
    # The objective

    @abstractmethod
    def loss(
        self,
        denoiser: torch.nn.Module,
        batch: dict[str, Any],
        generator: torch.Generator,
        *,
        dropout: float,
        device: torch.device,
        weight_dtype: torch.dtype,
    ) -> torch.Tensor:
        """The loss of one micro-batch. `denoiser` is the module accelerate prepared (it may be
        wrapped for distribution); every random draw comes from `generator` (CPU), so a
        resumed run repeats an uninterrupted one. `batch` has `input_pixels`, `edited_pixels`
        (N×3×H×W in [-1, 1]) and `instruction` (N strings)."""

    # ----------------------------------------------------------------------------------
    # Validation and the deliverable

    @abstractmethod
    def validation_edit(
        self,
        denoiser: torch.nn.Module,
        image: Image.Image,
        instruction: str,
        *,
        seed: int,
        steps: int,
    ) -> Image.Image:
        """One edit with the current weights through the family's diffusers pipeline."""

    @abstractmethod
    def save_lora(self, denoiser: torch.nn.Module, folder: Path) -> Path:
        """Write the adapter as `pytorch_lora_weights.safetensors` in the format the family's
        diffusers pipeline's `load_lora_weights` reads; return the file."""

    def save_full(self, denoiser: torch.nn.Module, folder: Path) -> Path:
        raise NotImplementedError(f"full fine-tuning is not offered for the {self.family} family")

    @abstractmethod
    def card(self) -> CardInfo: ...
