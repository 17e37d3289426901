"""EditRequest: what the plugin sends as the `params` JSON of `POST /v1/edits`.

The wire form is flat (the engine's EditParams): the shared fields at the top level, and
every other key a parameter of the chosen model's family (`options`). The plugin keeps no
copy of any family's parameters or ranges: a request carries the `ModelInfo` and `Limits`
the engine published (`specs.py`), and `validate()` checks against those.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .specs import (
    SHARED_FIELDS,
    Limits,
    Lora,
    ModelInfo,
    ParamSpec,
    RequestError,
    format_value,
)

__all__ = ["EditRequest", "Lora", "RequestError", "explore_grid", "explore_values"]


@dataclass(frozen=True)
class EditRequest:
    """One edit. `steps`/`resolution` None: the model's own choice (the engine decides).

    `info` and `limits` are what the request is checked against; they are not sent.
    """

    instruction: str
    seed: int = 0
    variants: int = 1
    steps: int | None = None
    resolution: int | None = None
    model: str | None = None
    loras: tuple[Lora, ...] = ()
    preserve_detail: bool = True
    preset: str | None = None  # a preset id of the model: the engine adds its LoRAs
    options: Mapping[str, Any] = field(default_factory=dict)
    info: ModelInfo | None = field(default=None, compare=False, repr=False)
    limits: Limits = field(default_factory=Limits, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", dict(self.options))
        object.__setattr__(self, "loras", tuple(self.loras))

    # --- checks ---------------------------------------------------------------------------

    def validate(self) -> EditRequest:
        """Raise RequestError naming the first bad field; return self when all are fine."""
        limits, info = self.limits, self.info
        if not self.instruction.strip():
            raise RequestError("Type an instruction first, e.g. “make it evening”.", "instruction")
        if len(self.instruction) > limits.max_instruction_chars:
            raise RequestError(
                f"The instruction is {len(self.instruction)} characters long; "
                f"shorten it to {limits.max_instruction_chars} or fewer.", "instruction")
        checks: list[tuple[str, Any, int, int]] = [
            ("seed", self.seed, 0, limits.max_seed),
            ("variants", self.variants, 1, limits.max_variants),
        ]
        if self.steps is not None:  # the model's rule, else the engine's shared limit
            low, high = (info.steps.minimum, info.steps.maximum) if info else (1, limits.max_steps)
            checks.append(("steps", self.steps, low, high))
        if self.resolution is not None:
            low, high = (info.resolution.minimum, info.resolution.maximum) if info else limits.resolution
            checks.append(("resolution", self.resolution, low, high))
        for name, value, low, high in checks:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise RequestError(f"{name.capitalize()} must be a whole number from {low} to {high}.", name)
        if len(self.loras) > limits.max_loras:
            raise RequestError(f"Use at most {limits.max_loras} LoRA adapters.", "loras")
        lo, hi = limits.lora_strength
        for lora in self.loras:
            if not lora.path or not lo <= lora.strength <= hi:
                raise RequestError(f"Each LoRA needs a file and a strength from {lo:g} to {hi:g}.", "loras")
        for name in self.options:
            if name in SHARED_FIELDS:
                raise RequestError(f"{name} is not a model parameter.", name)
        if info is not None:
            takes = ", ".join(spec.name for spec in info.params) or "no model-specific parameters"
            for name, value in self.options.items():
                spec = info.spec(name)
                if spec is None:
                    raise RequestError(f"{name} is not a parameter of {info.name}; it takes {takes}.", name)
                spec.check(value)
        return self

    # --- changes --------------------------------------------------------------------------

    def with_changes(self, **changes: Any) -> EditRequest:
        return replace(self, **changes)

    def with_options(self, **values: Any) -> EditRequest:
        return replace(self, options={**self.options, **values})

    # --- wire -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The flat `params` JSON; fields left to the model (None) are not sent."""
        data: dict[str, Any] = {
            "instruction": self.instruction,
            "seed": self.seed,
            "variants": self.variants,
            "steps": self.steps,
            "resolution": self.resolution,
            "model": self.model,
            "loras": [{"path": lora.path, "strength": lora.strength} for lora in self.loras],
            "preserve_detail": self.preserve_detail,
            "preset": self.preset,
        }
        data = {key: value for key, value in data.items() if value is not None}
        data.update(self.options)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], info: ModelInfo | None = None,
                  limits: Limits | None = None) -> EditRequest:
        """Rebuild from the flat form; keys other than the shared fields are options."""
        values: dict[str, Any] = {k: v for k, v in data.items() if k in SHARED_FIELDS and k != "loras"}
        values["loras"] = tuple(
            Lora(str(item["path"]), float(item.get("strength", 1.0)))
            for item in data.get("loras") or () if isinstance(item, Mapping) and "path" in item)
        values["options"] = {k: v for k, v in data.items() if k not in SHARED_FIELDS}
        return cls(**values, info=info, limits=limits or Limits())

    # --- how it reads ---------------------------------------------------------------------

    def labelled_options(self) -> list[tuple[ParamSpec | None, str, Any]]:
        """(spec, short name, value) per option, in the model's own order."""
        info = self.info
        known = [(spec, spec.short, self.options[spec.name]) for spec in (info.params if info else ())
                 if spec.name in self.options]
        names = {spec.name for spec, _, _ in known}
        known += [(None, name, value) for name, value in self.options.items() if name not in names]
        return known

    def describe_options(self) -> str:
        """The parameters that tell results apart, e.g. `s_T 7.5 s_I 1.5` or `guidance 2.5`:
        numbers always, choices and switches when not at their default, never free text."""
        parts = []
        for spec, short, value in self.labelled_options():
            if spec is None or spec.kind == "text":
                continue
            if spec.numeric or value != spec.default:
                parts.append(f"{short} {format_value(value)}")
        return " ".join(parts)


def explore_values(spec: ParamSpec, value: Any) -> list[float | int]:
    """Three values of one axis around `value`, clamped to the range (fewer at its ends)."""
    step = spec.explore or 0.0
    base = value if isinstance(value, (int, float)) and not isinstance(value, bool) else spec.default
    values = [spec.clamp(round(base + d * step, 4)) for d in (-1, 0, 1)]
    return sorted(set(values))


def explore_grid(base: EditRequest) -> list[EditRequest]:
    """The Explore grid: 3 × 3 values of the model's two explore axes around the current ones
    (3 for a model with one axis). Every cell keeps the seed, so cells differ only by those
    parameters. RequestError (field "explore") when the model has nothing to sweep."""
    info = base.info
    if info is None:
        raise RequestError("Explore needs the engine's model list; connect to the engine first.",
                           "explore")
    axes = info.explore_axes()
    if not axes:
        raise RequestError(info.explore_unavailable() or "Nothing to explore.", "explore")
    cells: list[dict[str, Any]] = [{}]
    for spec in axes:
        current = base.options.get(spec.name, spec.default)
        cells = [{**cell, spec.name: v} for cell in cells for v in explore_values(spec, current)]
    return [replace(base, options={**base.options, **cell}, variants=1) for cell in cells]
