"""Training objectives, one module per model family, behind `Trainee` (objectives/base.py).

`load_trainee` picks the family from the base model (the engine's own detection) and builds
that family's trainee. Families the training package cannot fine-tune get a clear refusal.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.errors import InvalidInput
from training.objectives.base import CardInfo, Trainee

__all__ = ["TRAINABLE_FAMILIES", "CardInfo", "Trainee", "family_of", "load_trainee"]


def _ip2p(model: str, **options: object) -> Trainee:
    from training.objectives.ip2p import InstructPix2PixTrainee

    return InstructPix2PixTrainee(model, **options)  # type: ignore[arg-type]


# family id -> builder(model, lora_rank=, lora_alpha=, full=, local_files_only=)
TRAINABLE_FAMILIES: dict[str, Callable[..., Trainee]] = {
    "sd-ip2p": _ip2p,
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
) -> Trainee:
    family = family_of(model)
    builder = TRAINABLE_FAMILIES.get(family)
    if builder is None:
        raise InvalidInput(
            f"models of the {family} family cannot be fine-tuned by this version; trainable "
            f"families: {', '.join(sorted(TRAINABLE_FAMILIES))}",
            field="model",
        )
    return builder(
        model,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        full=full,
        local_files_only=local_files_only,
    )
