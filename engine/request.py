"""EditParams: the one description of an edit, shared by the library, the CLI and the API.

The shared limits live here, next to the fields they guard, so every entry point enforces the
same ones (and `GET /v1/models` publishes them through `limits_json`). A model family's own
parameters (InstructPix2Pix's guidance scales, Kontext's distilled guidance, Qwen's true CFG …)
travel in `options` and are checked by the family (`Family.resolve_options`).

Wire format (the `params` JSON of POST /v1/edits, `to_dict`/`from_dict`): FLAT. The shared
fields sit at the top level; every other key is a family parameter and goes into `options`.
Old clients that send `text_guidance`/`image_guidance`/`scheduler` keep working unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from engine.errors import InvalidInput

MAX_INSTRUCTION_CHARS = 1000
MAX_STEPS = 200
MAX_VARIANTS = 16
MIN_RESOLUTION, MAX_RESOLUTION = 64, 2048
MAX_SEED = 2**32 - 1
MAX_LORAS = 8
LORA_STRENGTH_RANGE = (-4.0, 4.0)
MAX_OPTIONS = 32  # family parameters per request (no family has more than a handful)
MAX_OPTION_TEXT = 4000

# The InstructPix2Pix families' guidance range and schedulers (engine/families/sd_ip2p.py builds
# its ParamSpecs from these; kept here as the one copy the older server schema also reads).
GUIDANCE_RANGE = (0.0, 30.0)
SCHEDULERS = ("default", "euler-a", "euler", "dpm++", "ddim", "lcm")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter (`.safetensors` file, or a name the catalogue/config resolves) and its strength."""

    path: str
    strength: float = 1.0


def _copied(options: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(options or {})


@dataclass(frozen=True)
class EditParams:
    """Everything that determines an edit's result (with the image, mask and model weights).

    `steps` / `resolution` None: the model's recommended value (its family's StepsRule /
    ResolutionRule, or the catalogue entry's recommendation). `options`: the family's own
    parameters by ParamSpec name; missing ones take the model's defaults.
    Variant k of a request is seeded with `seed + k`.
    """

    instruction: str
    seed: int = 0
    variants: int = 1
    steps: int | None = None
    resolution: int | None = None
    model: str | None = None
    loras: tuple[LoraSpec, ...] = field(default_factory=tuple)
    preserve_detail: bool = True
    preset: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(isinstance(self.instruction, str), "instruction", "must be text")
        _check(
            len(self.instruction) <= MAX_INSTRUCTION_CHARS,
            "instruction",
            f"is {len(self.instruction)} characters long; the limit is {MAX_INSTRUCTION_CHARS}",
        )
        if self.steps is not None:
            _int_in("steps", self.steps, 1, MAX_STEPS)
        _int_in("seed", self.seed, 0, MAX_SEED)
        _int_in("variants", self.variants, 1, MAX_VARIANTS)
        if self.resolution is not None:
            _int_in("resolution", self.resolution, MIN_RESOLUTION, MAX_RESOLUTION)
        _check(self.model is None or isinstance(self.model, str), "model", "must be text or null")
        _check(isinstance(self.preserve_detail, bool), "preserve_detail", "must be true or false")
        _check(
            self.preset is None or (isinstance(self.preset, str) and 0 < len(self.preset) <= 64),
            "preset",
            "must be a preset id from GET /v1/models (the model's presets) or null",
        )
        _check(isinstance(self.loras, tuple), "loras", "must be a tuple of LoraSpec")
        _check(len(self.loras) <= MAX_LORAS, "loras", f"at most {MAX_LORAS} LoRA adapters")
        for lora in self.loras:
            lo, hi = LORA_STRENGTH_RANGE
            _check(
                isinstance(lora, LoraSpec)
                and isinstance(lora.strength, (int, float))
                and math.isfinite(lora.strength)
                and lo <= lora.strength <= hi,
                "loras",
                f"each LoRA needs a path and a strength from {lo} to {hi}",
            )
        _check_options(self.options)
        object.__setattr__(self, "options", _copied(self.options))  # a private copy

    @property
    def is_empty(self) -> bool:
        """An empty instruction means "no edit": the input comes back unchanged."""
        return not self.instruction.strip()

    def for_variant(self, k: int) -> EditParams:
        """The single-image request equal to variant k of this one."""
        return replace(self, seed=self.seed + k, variants=1)

    def with_options(self, **options: Any) -> EditParams:
        """A copy with these family parameters set (the others kept)."""
        return replace(self, options={**self.options, **options})

    def to_dict(self) -> dict[str, Any]:
        """The flat wire form: shared fields, then the family parameters at the same level."""
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
        data.update(self.options)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> EditParams:
        """Build from the flat JSON form; keys that are not shared fields become `options`.

        Whether the chosen model's family takes those options is checked where the model is
        known (`Family.resolve_options`), naming the field.
        """
        if not isinstance(data, dict):
            raise InvalidInput("params must be a JSON object", field="params")
        if "instruction" not in data:
            raise InvalidInput("instruction is required", field="instruction")
        shared = set(SHARED_FIELDS)
        values = {key: value for key, value in data.items() if key in shared}
        options = {key: value for key, value in data.items() if key not in shared}
        nested = data.get("options")
        if nested is not None:  # tolerated: {"options": {...}} as well as the flat form
            if not isinstance(nested, dict):
                raise InvalidInput("options must be a JSON object", field="options")
            options.pop("options", None)
            options.update(nested)
        values["loras"] = _loras_from_json(values.get("loras", []))
        return cls(**values, options=options)

    @classmethod
    def from_json(cls, text: str) -> EditParams:
        """`from_dict` of a JSON text; InvalidInput (naming `params`) for text that is not a
        JSON object, including one nested too deeply to parse."""
        try:
            data = json.loads(text)
        except RecursionError as err:
            raise InvalidInput(
                "params is nested too deeply; send a flat JSON object of parameters", "params"
            ) from err
        except ValueError as err:
            raise InvalidInput(f"params is not valid JSON ({err}); send a JSON object", "params") from err
        if not isinstance(data, dict):
            raise InvalidInput(
                'params must be a JSON object such as {"instruction": "make it evening"}', "params"
            )
        return cls.from_dict(data)


SHARED_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(EditParams) if f.name != "options")
LORA_KEYS = frozenset({"path", "strength"})


def _loras_from_json(loras: Any) -> tuple[LoraSpec, ...]:
    """The `loras` list of the wire form, each item type-checked (no silent conversions: a
    strength sent as text is an error, as is a path sent as a number)."""
    usage = 'loras must be a list of {"path": NAME, "strength": NUMBER}'
    if not isinstance(loras, list):
        raise InvalidInput(f"{usage} (got {type(loras).__name__})", field="loras")
    specs = []
    for item in loras:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise InvalidInput(f"{usage}; each needs a path as text", field="loras")
        unknown = sorted(set(item) - LORA_KEYS)
        if unknown:
            raise InvalidInput(f"{usage}; {unknown[0]!r} is not one of its keys", field="loras")
        strength = item.get("strength", 1.0)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)):
            raise InvalidInput(f"{usage}; strength must be a number (got {strength!r})", field="loras")
        specs.append(LoraSpec(path=item["path"], strength=float(strength)))
    return tuple(specs)


def limits_json() -> dict[str, Any]:
    """The shared limits, as `GET /v1/models` publishes them (`limits`)."""
    return {
        "max_instruction_chars": MAX_INSTRUCTION_CHARS,
        "max_variants": MAX_VARIANTS,
        "max_seed": MAX_SEED,
        "max_steps": MAX_STEPS,
        "max_loras": MAX_LORAS,
        "lora_strength": list(LORA_STRENGTH_RANGE),
        "resolution": [MIN_RESOLUTION, MAX_RESOLUTION],
    }


def _check_options(options: Any) -> None:
    if not isinstance(options, Mapping):
        raise InvalidInput("options must be a mapping of parameter names to values", "options")
    _check(len(options) <= MAX_OPTIONS, "options", f"at most {MAX_OPTIONS} model parameters")
    for name, value in options.items():
        if not isinstance(name, str) or not name or len(name) > 64:
            raise InvalidInput(f"unknown field {name!r}", "options")
        if name in SHARED_FIELDS:
            raise InvalidInput(f"{name} is a shared field, not a model parameter", name)
        ok = value is None or isinstance(value, (bool, int, str)) or (
            isinstance(value, float) and math.isfinite(value)
        )
        if not ok:
            raise InvalidInput(f"{name} must be a number, text or true/false (got {value!r})", name)
        if isinstance(value, str) and len(value) > MAX_OPTION_TEXT:
            raise InvalidInput(f"{name} is {len(value)} characters long; the limit is {MAX_OPTION_TEXT}", name)


def _check(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise InvalidInput(f"{name} {problem}", field=name)


def _int_in(name: str, value: object, lo: int, hi: int) -> None:
    _check(
        isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
        name,
        f"must be a whole number from {lo} to {hi} (got {value!r})",
    )
