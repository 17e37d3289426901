"""Training objectives, one module per model family, behind `Trainee` (objectives/base.py).

`load_trainee` picks the family from the base model (the engine's own detection) and builds
that family's trainee. Families the training package cannot fine-tune get a clear refusal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.errors import InvalidInput
from training.objectives.base import CardInfo, Trainee

__all__ = ["TRAINABLE_FAMILIES", "CardInfo", "Trainee", "family_of", "load_trainee"]


def _ip2p(model: str, **options: object) -> Trainee:
    from training.objectives.ip2p import InstructPix2PixTrainee

    # The flow families' options (weight dtype, base quantization, conditioning cache) do
    # not apply; load_trainee refuses non-default ones before this.
    for name in FLOW_OPTIONS:
        options.pop(name, None)
    return InstructPix2PixTrainee(model, **options)  # type: ignore[arg-type]


def _flux_kontext(model: str, **options: object) -> Trainee:
    from training.objectives.flux_kontext import FluxKontextTrainee

    return FluxKontextTrainee(model, **options)  # type: ignore[arg-type]


def _flux2_klein(model: str, **options: object) -> Trainee:
    from training.objectives.flux2_klein import Flux2KleinTrainee

    return Flux2KleinTrainee(model, **options)  # type: ignore[arg-type]


def _qwen_edit(model: str, **options: object) -> Trainee:
    from training.objectives.qwen_edit import QwenImageEditTrainee

    return QwenImageEditTrainee(model, **options)


# Options only the flow-matching families take (FlowTrainee's keyword arguments).
FLOW_OPTIONS = ("weight_dtype", "base_quantization", "cache_conditioning")

# family id -> builder(model, lora_rank=, lora_alpha=, full=, local_files_only=,
#                      weight_dtype=, base_quantization=, cache_conditioning=)
TRAINABLE_FAMILIES: dict[str, Callable[..., Trainee]] = {
    "sd-ip2p": _ip2p,
    "flux-kontext": _flux_kontext,
    "flux2-klein": _flux2_klein,
    "qwen-image-edit": _qwen_edit,
}


def family_of(model: str) -> str:
    """The engine's family id of a base model (hub id, folder or file); SD 1.x text-to-image
    folders count as InstructPix2Pix (training widens their UNet the paper's way)."""
    from engine.families import detect_family

    try:
        return detect_family(model).id
    except Exception:  # an SD 1.x text-to-image folder, or something load_base will explain
        return "sd-ip2p"


def load_trainee(
    model: str,
    *,
    lora_rank: int | None,
    lora_alpha: float | None,
    full: bool,
    local_files_only: bool,
    weight_dtype: torch.dtype = torch.float32,
    base_quantization: str = "none",
    cache_conditioning: bool = False,
) -> Trainee:
    family = family_of(model)
    builder = TRAINABLE_FAMILIES.get(family)
    if builder is None:
        raise InvalidInput(
            f"models of the {family} family cannot be fine-tuned by this version; trainable "
            f"families: {', '.join(sorted(TRAINABLE_FAMILIES))}",
            field="model",
        )
    if family == "sd-ip2p" and (base_quantization != "none" or cache_conditioning):
        flag = "--base-quantization" if base_quantization != "none" else "--cache-conditioning"
        raise InvalidInput(
            f"{flag} is offered for the flow-matching families (FLUX.1 Kontext, FLUX.2 klein, "
            "Qwen-Image-Edit), not for InstructPix2Pix; leave it out",
            field="base_quantization" if base_quantization != "none" else "cache_conditioning",
        )
    return builder(
        model,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        full=full,
        local_files_only=local_files_only,
        weight_dtype=weight_dtype,
        base_quantization=base_quantization,
        cache_conditioning=cache_conditioning,
    )
