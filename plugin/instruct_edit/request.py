"""EditRequest: the plugin's serialisable mirror of the engine's EditParams.

The plugin runs in Krita's Python and never imports the engine, so the fields, defaults
and limits are repeated here (tests/plugin checks they match engine/request.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

MAX_INSTRUCTION_CHARS = 1000
MAX_STEPS = 200
MAX_VARIANTS = 16
MIN_RESOLUTION, MAX_RESOLUTION = 64, 2048
GUIDANCE_RANGE = (0.0, 30.0)
MAX_SEED = 2**32 - 1
MAX_LORAS = 8
LORA_STRENGTH_RANGE = (-4.0, 4.0)
SCHEDULERS = ("default", "euler-a", "euler", "dpm++", "ddim", "lcm")

#: The working size the plugin uses when resolution is "auto": SD 1.5 models were trained at 512.
AUTO_RESOLUTION = 512


class RequestError(ValueError):
    """A setting the painter chose is out of range; `field` names it for the UI."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Lora:
    path: str
    strength: float = 1.0


@dataclass(frozen=True)
class EditRequest:
    """Everything sent as the `params` JSON of `POST /v1/edits`."""

    instruction: str
    text_guidance: float = 7.5
    image_guidance: float = 1.5
    steps: int = 20
    seed: int = 0
    variants: int = 1
    resolution: int = AUTO_RESOLUTION
    model: str | None = None
    loras: tuple[Lora, ...] = field(default_factory=tuple)
    scheduler: str = "default"
    preserve_detail: bool = True

    def validate(self) -> EditRequest:
        """Raise RequestError naming the first bad field; return self when all are fine."""
        if not self.instruction.strip():
            raise RequestError("Type an instruction first, e.g. “make it evening”.", "instruction")
        if len(self.instruction) > MAX_INSTRUCTION_CHARS:
            raise RequestError(
                f"The instruction is {len(self.instruction)} characters long; "
                f"shorten it to {MAX_INSTRUCTION_CHARS} or fewer.",
                "instruction",
            )
        lo, hi = GUIDANCE_RANGE
        for name in ("text_guidance", "image_guidance"):
            value = getattr(self, name)
            if not (math.isfinite(value) and lo <= value <= hi):
                raise RequestError(f"{name.replace('_', ' ')} must be from {lo} to {hi}.", name)
        for name, low, high in (
            ("steps", 1, MAX_STEPS),
            ("seed", 0, MAX_SEED),
            ("variants", 1, MAX_VARIANTS),
            ("resolution", MIN_RESOLUTION, MAX_RESOLUTION),
        ):
            value = getattr(self, name)
            if not (isinstance(value, int) and low <= value <= high):
                raise RequestError(f"{name} must be a whole number from {low} to {high}.", name)
        if self.scheduler not in SCHEDULERS:
            raise RequestError(f"scheduler must be one of {', '.join(SCHEDULERS)}.", "scheduler")
        if len(self.loras) > MAX_LORAS:
            raise RequestError(f"Use at most {MAX_LORAS} LoRA adapters.", "loras")
        lo, hi = LORA_STRENGTH_RANGE
        for lora in self.loras:
            if not lora.path or not (lo <= lora.strength <= hi):
                raise RequestError(f"Each LoRA needs a file and a strength from {lo} to {hi}.", "loras")
        return self

    def with_changes(self, **changes: Any) -> EditRequest:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["loras"] = [asdict(lora) for lora in self.loras]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditRequest:
        """Rebuild from saved settings; unknown keys (from a newer plugin) are ignored."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["loras"] = tuple(
            Lora(str(item["path"]), float(item.get("strength", 1.0)))
            for item in values.get("loras") or ()
        )
        return cls(**values)


def explore_grid(base: EditRequest) -> list[EditRequest]:
    """The "Explore" grid: 3 image guidance × 3 text guidance values around the current ones.

    Every cell keeps the seed, so the cells differ only by guidance and can be compared.
    """
    lo, hi = GUIDANCE_RANGE

    def around(value: float, step: float) -> list[float]:
        values = [min(hi, max(lo, round(value + d * step, 2))) for d in (-1, 0, 1)]
        return sorted(set(values))

    return [
        replace(base, image_guidance=i, text_guidance=t, variants=1)
        for i in around(base.image_guidance, 0.5)
        for t in around(base.text_guidance, 2.5)
    ]
