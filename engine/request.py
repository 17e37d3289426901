"""EditParams: the one description of an edit, shared by the library, the CLI and the API.

Limits live here, next to the fields they guard, so every entry point enforces the same ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from engine.errors import InvalidInput

MAX_INSTRUCTION_CHARS = 1000
MAX_STEPS = 200
MAX_VARIANTS = 16
MIN_RESOLUTION, MAX_RESOLUTION = 64, 2048
GUIDANCE_RANGE = (0.0, 30.0)
MAX_SEED = 2**32 - 1
MAX_LORAS = 8
LORA_STRENGTH_RANGE = (-4.0, 4.0)
SCHEDULERS = ("default", "euler-a", "euler", "dpm++", "ddim", "lcm")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter (`.safetensors` file, or a name the catalogue/config resolves) and its strength."""

    path: str
    strength: float = 1.0


@dataclass(frozen=True)
class EditParams:
    """Everything that determines an edit's result (with the image, mask and model weights).

    `text_guidance` is s_T and `image_guidance` is s_I of the InstructPix2Pix paper.
    Variant k of a request is seeded with `seed + k`.
    """

    instruction: str
    text_guidance: float = 7.5
    image_guidance: float = 1.5
    steps: int = 20
    seed: int = 0
    variants: int = 1
    resolution: int = 512
    model: str | None = None
    loras: tuple[LoraSpec, ...] = field(default_factory=tuple)
    scheduler: str = "default"
    preserve_detail: bool = True

    def __post_init__(self) -> None:
        _check(isinstance(self.instruction, str), "instruction", "must be text")
        _check(
            len(self.instruction) <= MAX_INSTRUCTION_CHARS,
            "instruction",
            f"is {len(self.instruction)} characters long; the limit is {MAX_INSTRUCTION_CHARS}",
        )
        for name in ("text_guidance", "image_guidance"):
            value = getattr(self, name)
            lo, hi = GUIDANCE_RANGE
            _check(
                isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi,
                name,
                f"must be a number from {lo} to {hi} (got {value!r})",
            )
        _int_in("steps", self.steps, 1, MAX_STEPS)
        _int_in("seed", self.seed, 0, MAX_SEED)
        _int_in("variants", self.variants, 1, MAX_VARIANTS)
        _int_in("resolution", self.resolution, MIN_RESOLUTION, MAX_RESOLUTION)
        _check(
            self.scheduler in SCHEDULERS,
            "scheduler",
            f"must be one of {', '.join(SCHEDULERS)} (got {self.scheduler!r})",
        )
        _check(len(self.loras) <= MAX_LORAS, "loras", f"at most {MAX_LORAS} LoRA adapters")
        for lora in self.loras:
            lo, hi = LORA_STRENGTH_RANGE
            _check(
                isinstance(lora, LoraSpec) and math.isfinite(lora.strength) and lo <= lora.strength <= hi,
                "loras",
                f"each LoRA needs a path and a strength from {lo} to {hi}",
            )

    @property
    def is_empty(self) -> bool:
        """An empty instruction means "no edit": the input comes back unchanged."""
        return not self.instruction.strip()

    def for_variant(self, k: int) -> EditParams:
        """The single-image request equal to variant k of this one."""
        return replace(self, seed=self.seed + k, variants=1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["loras"] = [asdict(lora) for lora in self.loras]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditParams:
        """Build from JSON-like data; unknown fields are an error, not silently ignored."""
        if not isinstance(data, dict):
            raise InvalidInput("params must be a JSON object", field="params")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInput(
                f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(known))}",
                field=unknown[0],
            )
        if "instruction" not in data:
            raise InvalidInput("instruction is required", field="instruction")
        values = dict(data)
        loras = values.get("loras") or []
        if not isinstance(loras, list):
            raise InvalidInput("loras must be a list of {path, strength}", field="loras")
        try:
            values["loras"] = tuple(
                LoraSpec(path=str(item["path"]), strength=float(item.get("strength", 1.0)))
                for item in loras
            )
        except (TypeError, KeyError, ValueError, AttributeError) as err:
            raise InvalidInput("loras must be a list of {path, strength}", field="loras") from err
        return cls(**values)


def _check(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise InvalidInput(f"{name} {problem}", field=name)


def _int_in(name: str, value: object, lo: int, hi: int) -> None:
    _check(
        isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
        name,
        f"must be a whole number from {lo} to {hi} (got {value!r})",
    )
