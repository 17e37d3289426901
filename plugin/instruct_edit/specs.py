"""What the engine publishes about its models (`GET /v1/models`), as plugin value types.

The plugin never imports the engine, and it keeps no copy of any family's parameters: the
docker's form, the request checks, the Explore grid and the layer names all come from the
`ParamSpec`s the engine sends. Everything here is parsed defensively: an entry the plugin
cannot read is left out (never an exception), since a newer or older engine may send more,
less or something else.

Two fallbacks exist for engines that predate model families (they send no `limits`, and no
`family`/`params` per model): `Limits()` holds the shared limits of API version 1, and
`LEGACY_MODEL` describes what such an engine accepts (InstructPix2Pix's three parameters).
tests/plugin checks both against the engine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KINDS = ("float", "int", "choice", "bool", "text")
#: Fields of the request every model takes; a family parameter may not reuse these names.
SHARED_FIELDS = ("instruction", "seed", "variants", "steps", "resolution", "model", "loras",
                 "preserve_detail")
_INT32_MAX = 2**31 - 1


class RequestError(ValueError):
    """A setting the painter chose is out of range; `field` names it for the UI."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Lora:
    path: str
    strength: float = 1.0


def _number(value: Any) -> float | None:
    """A finite int/float (not bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _whole(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _text(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


def format_value(value: Any) -> str:
    """A parameter value as a painter reads it: 7.5, 4, euler-a, on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a model family, as `GET /v1/models` publishes it.

    `explore` is the step of this parameter's axis in the Explore grid (None: no axis).
    `short` is the name used in layer names ("s_T", "guidance"); for engines that do not
    send one it is derived from the label and help (`_short_name`).
    """

    name: str
    kind: str
    default: Any
    label: str
    short: str
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    max_length: int | None = None
    explore: float | None = None

    @property
    def numeric(self) -> bool:
        return self.kind in ("float", "int")

    @classmethod
    def from_json(cls, data: Any) -> ParamSpec | None:
        """The spec, or None when the entry is not one the plugin can show and check."""
        if not isinstance(data, Mapping):
            return None
        name, kind = data.get("name"), data.get("kind")
        if not isinstance(name, str) or not name.isidentifier() or name in SHARED_FIELDS:
            return None
        if kind not in KINDS:
            return None
        label = _text(data.get("label")).strip() or name.replace("_", " ").capitalize()
        help_text = _text(data.get("help"))
        short = _text(data.get("short")).strip() or _short_name(label, help_text)
        values: dict[str, Any] = {"name": name, "kind": kind, "label": label, "short": short,
                                  "help": help_text}
        default = data.get("default")
        if kind in ("float", "int"):
            read = _number if kind == "float" else _whole
            for key in ("minimum", "maximum"):
                if data.get(key) is not None:
                    bound = _number(data[key])
                    if bound is None:
                        return None
                    values[key] = bound
            if values.get("minimum") is not None and values.get("maximum") is not None \
                    and values["minimum"] > values["maximum"]:
                return None
            step = _number(data.get("step"))
            values["step"] = step if step is not None and step > 0 else None
            explore = _number(data.get("explore"))
            values["explore"] = explore if explore is not None and explore > 0 else None
            default = read(default)
            if default is None:
                return None
            values["default"] = float(default) if kind == "float" else default
        elif kind == "choice":
            choices = data.get("choices")
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                return None
            values["choices"] = tuple(choices)
            values["default"] = default if default in choices else choices[0]
        elif kind == "bool":
            if not isinstance(default, bool):
                return None
            values["default"] = default
        else:
            max_length = _whole(data.get("max_length"))
            values["max_length"] = max_length if max_length is not None and max_length >= 0 else None
            if not isinstance(default, str):
                return None
            values["default"] = default
        spec = cls(**values)
        try:
            spec.check(spec.default)
        except RequestError:
            return None  # a default outside its own range: not a spec to trust
        return spec

    def check(self, value: Any) -> Any:
        """The value, normalised (a whole number for a float becomes a float); RequestError naming
        the parameter when the engine would refuse it."""
        label = self.label
        if self.numeric:
            read = _number(value) if self.kind == "float" else _whole(value)
            if read is None or not self._in_range(read):
                kind = "a number" if self.kind == "float" else "a whole number"
                raise RequestError(f"{label} must be {kind}{self._range_text()}.", self.name)
            return float(read) if self.kind == "float" else int(read)
        if self.kind == "choice":
            if value not in self.choices:
                raise RequestError(f"{label} must be one of {', '.join(self.choices)}.", self.name)
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise RequestError(f"{label} must be on or off.", self.name)
            return value
        if not isinstance(value, str):
            raise RequestError(f"{label} must be text.", self.name)
        if self.max_length is not None and len(value) > self.max_length:
            raise RequestError(f"{label} is {len(value)} characters long; shorten it to "
                               f"{self.max_length} or fewer.", self.name)
        return value

    def coerce(self, value: Any) -> Any:
        """A stored value if it is still valid for this spec, else the default."""
        try:
            return self.check(value)
        except RequestError:
            return self.default

    def clamp(self, value: float) -> float | int:
        """A numeric value moved into the range (for the Explore grid)."""
        if self.minimum is not None:
            value = max(self.minimum, value)
        if self.maximum is not None:
            value = min(self.maximum, value)
        return round(value) if self.kind == "int" else float(value)

    def _in_range(self, value: float) -> bool:
        return (self.minimum is None or value >= self.minimum) and (
            self.maximum is None or value <= self.maximum)

    def _range_text(self) -> str:
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            return f" from {lo:g} to {hi:g}"
        if lo is not None:
            return f" of at least {lo:g}"
        if hi is not None:
            return f" of at most {hi:g}"
        return ""


def _short_name(label: str, help_text: str) -> str:
    """The short name of a spec that has none: "Text guidance (s_T)" -> "s_T"; a help text
    opening with a symbol ("s_T: how strongly …") -> "s_T"; else the label, lower-cased
    unless it starts with an acronym ("Guidance" -> "guidance", "CFG scale" stays)."""
    head, colon, _ = help_text.partition(":")
    if colon and head and len(head) <= 8 and not any(c.isspace() for c in head):
        return head
    if label.endswith(")") and "(" in label:
        inner = label[label.rindex("(") + 1 : -1].strip()
        if inner:
            return inner
    # "Guidance" -> "guidance", but keep acronyms ("CFG scale").
    if len(label) > 1 and label[0].isupper() and not label[1].isupper():
        return label[0].lower() + label[1:]
    return label


@dataclass(frozen=True)
class StepsRule:
    """The model's denoising steps: `default` is its recommended count (None: unknown)."""

    default: int | None = None
    minimum: int = 1
    maximum: int = 200

    @classmethod
    def from_json(cls, data: Any, maximum: int = 200) -> StepsRule:
        """`maximum`: the engine's shared limit, for a rule that does not say."""
        if not isinstance(data, Mapping):
            return cls(None, 1, maximum)
        lo, hi = _whole(data.get("minimum")), _whole(data.get("maximum"))
        lo = lo if lo is not None and lo >= 1 else cls.minimum
        hi = hi if hi is not None and hi >= lo else max(lo, maximum)
        default = _whole(data.get("default"))
        return cls(default if default is not None and lo <= default <= hi else None, lo, hi)


@dataclass(frozen=True)
class ResolutionRule:
    """How the engine picks the working size: `long_side` (the long side becomes the
    resolution) or `area` (about resolution² pixels), sides multiples of `multiple`."""

    rule: str = "long_side"
    default: int | None = None
    multiple: int = 8
    minimum: int = 64
    maximum: int = 2048

    @classmethod
    def from_json(cls, data: Any, sizes: tuple[int, int] = (64, 2048)) -> ResolutionRule:
        """`sizes`: the engine's shared limits, for a rule that does not say."""
        if not isinstance(data, Mapping):
            return cls("long_side", None, 8, *sizes)
        rule = data.get("rule") if data.get("rule") in ("long_side", "area") else cls.rule
        lo, hi = _whole(data.get("minimum")), _whole(data.get("maximum"))
        lo = lo if lo is not None and lo >= 1 else sizes[0]
        hi = hi if hi is not None and hi >= lo else max(lo, sizes[1])
        multiple = _whole(data.get("multiple"))
        default = _whole(data.get("default"))
        return cls(rule, default if default is not None and lo <= default <= hi else None,
                   multiple if multiple is not None and multiple >= 1 else cls.multiple, lo, hi)

    def describe(self) -> str:
        if self.rule == "area":
            return "about this many pixels squared (the image keeps its shape)"
        return "the longer side"


@dataclass(frozen=True)
class Preset:
    """A few-step variant and the like: steps, options and LoRAs set together."""

    id: str
    label: str
    steps: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    loras: tuple[Lora, ...] = ()

    @classmethod
    def from_json(cls, data: Any) -> Preset | None:
        if not isinstance(data, Mapping) or not isinstance(data.get("id"), str) or not data["id"]:
            return None
        loras = []
        for item in data.get("loras") or ():
            lora = _preset_lora(item)
            if lora is None:
                return None  # a preset without all its LoRAs would be a different model
            loras.append(lora)
        options = data.get("options")
        steps = _whole(data.get("steps"))
        return cls(data["id"], _text(data.get("label")).strip() or data["id"],
                   steps if steps is not None and steps >= 1 else None,
                   dict(options) if isinstance(options, Mapping) else {}, tuple(loras))

    def describe(self) -> str:
        parts = [f"{self.steps} steps"] if self.steps else []
        parts += [f"{name} {format_value(value)}" for name, value in self.options.items()]
        parts += [f"LoRA {lora.path} × {lora.strength:g}" for lora in self.loras]
        return ", ".join(parts)


def _preset_lora(item: Any) -> Lora | None:
    """A preset's LoRA as the request sends it: its `path` if the engine gives one, else
    `repo/file` (the engine resolves catalogue LoRAs by that name)."""
    if not isinstance(item, Mapping):
        return None
    path = _text(item.get("path")).strip()
    if not path:
        repo, file = _text(item.get("repo")).strip(), _text(item.get("file")).strip()
        if not file:
            return None
        path = f"{repo}/{file}" if repo else file
    strength = _number(item.get("strength", 1.0))
    return Lora(path, 1.0 if strength is None else strength)


@dataclass(frozen=True)
class ModelInfo:
    """One model of `GET /v1/models`: who it is, and the parameters it takes."""

    id: str
    name: str
    family: str = ""
    family_label: str = ""
    params: tuple[ParamSpec, ...] = ()
    steps: StepsRule = field(default_factory=StepsRule)
    resolution: ResolutionRule = field(default_factory=ResolutionRule)
    supports: Mapping[str, bool] = field(default_factory=dict)
    licence: str = ""
    non_commercial: bool = False
    download_gb: float | None = None
    vram_gb: Mapping[str, float] = field(default_factory=dict)
    recommended_steps: int | None = None
    recommended_resolution: int | None = None
    recommended_options: Mapping[str, Any] = field(default_factory=dict)
    presets: tuple[Preset, ...] = ()
    description: str = ""
    default: bool = False
    available_locally: bool | None = None
    legacy: bool = False  # an engine from before model families: LEGACY_MODEL's parameters

    @classmethod
    def from_json(cls, data: Any, limits: Limits | None = None) -> ModelInfo | None:
        if not isinstance(data, Mapping):
            return None
        limits = limits or Limits()
        model_id = data.get("id")
        if not isinstance(model_id, str) or not model_id:
            return None
        legacy = "family" not in data and "params" not in data
        source = {**LEGACY_MODEL, **data} if legacy else data
        params, seen = [], set()
        for item in source.get("params") if isinstance(source.get("params"), list) else ():
            spec = ParamSpec.from_json(item)
            if spec is not None and spec.name not in seen:
                params.append(spec)
                seen.add(spec.name)
        supports = source.get("supports")
        vram = source.get("vram_gb")
        recommended = source.get("recommended") if isinstance(source.get("recommended"), Mapping) else {}
        steps = StepsRule.from_json(source.get("steps"), limits.max_steps)
        resolution = ResolutionRule.from_json(source.get("resolution"), limits.resolution)
        rec_steps = _whole(recommended.get("steps"))
        rec_resolution = _whole(recommended.get("resolution"))
        rec_options = recommended.get("options") if isinstance(recommended.get("options"), Mapping) else {}
        by_name = {spec.name: spec for spec in params}
        presets = []
        for item in source.get("presets") if isinstance(source.get("presets"), list) else ():
            preset = Preset.from_json(item)
            if preset is not None and all(k in by_name for k in preset.options) \
                    and preset.id not in {p.id for p in presets}:
                presets.append(preset)
        download = _number(source.get("download_gb"))
        available = source.get("available_locally")
        return cls(
            id=model_id,
            name=_text(source.get("name")).strip() or model_id,
            family=_text(source.get("family")),
            family_label=_text(source.get("family_label")) or _text(source.get("family")),
            params=tuple(params),
            steps=steps,
            resolution=resolution,
            supports={k: v for k, v in supports.items() if isinstance(k, str) and isinstance(v, bool)}
            if isinstance(supports, Mapping) else {},
            licence=_text(source.get("licence")),
            non_commercial=source.get("non_commercial") is True,
            download_gb=download if download is not None and download >= 0 else None,
            vram_gb={k: float(v) for k, v in vram.items() if isinstance(k, str) and _number(v) is not None}
            if isinstance(vram, Mapping) else {},
            recommended_steps=rec_steps if rec_steps is not None
            and steps.minimum <= rec_steps <= steps.maximum else None,
            recommended_resolution=rec_resolution if rec_resolution is not None
            and resolution.minimum <= rec_resolution <= resolution.maximum else None,
            recommended_options={k: by_name[k].coerce(v) for k, v in rec_options.items() if k in by_name},
            presets=tuple(presets),
            description=_text(source.get("description")),
            default=source.get("default") is True,
            available_locally=available if isinstance(available, bool) else None,
            legacy=legacy,
        )

    def spec(self, name: str) -> ParamSpec | None:
        return next((spec for spec in self.params if spec.name == name), None)

    def preset(self, preset_id: str) -> Preset | None:
        return next((preset for preset in self.presets if preset.id == preset_id), None)

    def default_options(self) -> dict[str, Any]:
        """The values a fresh form shows: the catalogue's recommended ones, else the spec's."""
        return {spec.name: self.recommended_options.get(spec.name, spec.default) for spec in self.params}

    @property
    def default_steps(self) -> int | None:
        return self.recommended_steps or self.steps.default

    @property
    def default_resolution(self) -> int | None:
        return self.recommended_resolution or self.resolution.default

    def explore_axes(self) -> tuple[ParamSpec, ...]:
        """The parameters the Explore grid sweeps: those with an explore step, at most two."""
        return tuple(spec for spec in self.params if spec.numeric and spec.explore)[:2]

    def explore_unavailable(self) -> str | None:
        """Why Explore cannot run for this model (None: it can)."""
        if self.explore_axes():
            return None
        family = self.family_label or self.name
        return (f"Explore sweeps a model's guidance values; {family} models publish none to "
                "sweep. Try a few seeds with Variants instead.")

    def tooltip(self) -> str:
        lines = [self.name]
        if self.family_label:
            lines.append(f"Family: {self.family_label}")
        if self.description:
            lines.append(self.description)
        if self.licence:
            lines.append(f"Licence: {self.licence}" + (" (non-commercial use only)" if self.non_commercial else ""))
        elif self.non_commercial:
            lines.append("Licence: non-commercial use only")
        if self.vram_gb:
            plans = ", ".join(f"{plan} {gb:g} GB" for plan, gb in self.vram_gb.items())
            lines.append(f"GPU memory: {plans}")
        if self.download_gb is not None:
            lines.append(f"Download: {self.download_gb:g} GB"
                         + (" (already on the engine's machine)" if self.available_locally else ""))
        elif self.available_locally is False:
            lines.append("Downloads on first use")
        return "\n".join(lines)


@dataclass(frozen=True)
class Limits:
    """The shared limits every request obeys; `GET /v1/models` publishes them as `limits`.

    The defaults are API version 1's limits, used when an older engine does not send them
    (tests/plugin checks they equal engine/request.py's).
    """

    max_instruction_chars: int = 1000
    max_variants: int = 16
    max_seed: int = 2**32 - 1
    max_loras: int = 8
    lora_strength: tuple[float, float] = (-4.0, 4.0)
    max_steps: int = 200
    resolution: tuple[int, int] = (64, 2048)

    @classmethod
    def from_json(cls, data: Any) -> Limits:
        if not isinstance(data, Mapping):
            return cls()
        values: dict[str, Any] = {}
        for key in ("max_instruction_chars", "max_variants", "max_seed", "max_loras", "max_steps"):
            value = _whole(data.get(key))
            if value is not None and value >= 1:
                values[key] = value
        strength = data.get("lora_strength")
        if isinstance(strength, (list, tuple)) and len(strength) == 2:
            lo, hi = _number(strength[0]), _number(strength[1])
            if lo is not None and hi is not None and lo <= hi:
                values["lora_strength"] = (lo, hi)
        sizes = data.get("resolution")
        if isinstance(sizes, (list, tuple)) and len(sizes) == 2:
            lo, hi = _whole(sizes[0]), _whole(sizes[1])
            if lo is not None and hi is not None and 1 <= lo <= hi:
                values["resolution"] = (lo, hi)
        return cls(**values)

    @property
    def seed_widget_max(self) -> int:
        """Qt's spin boxes hold 32-bit signed values."""
        return min(self.max_seed, _INT32_MAX)


@dataclass(frozen=True)
class EngineModels:
    """All of `GET /v1/models`, parsed."""

    models: tuple[ModelInfo, ...] = ()
    limits: Limits = field(default_factory=Limits)
    loras: tuple[str, ...] = ()
    default_model: str = ""

    @classmethod
    def from_json(cls, answer: Any) -> EngineModels:
        """Never raises; an unreadable answer is an engine with no models."""
        if isinstance(answer, list):  # the oldest engines answered with the bare list
            answer = {"models": answer}
        if not isinstance(answer, Mapping):
            return cls()
        models, seen = [], set()
        limits = Limits.from_json(answer.get("limits"))
        entries = answer.get("models")
        for entry in entries if isinstance(entries, list) else ():
            info = ModelInfo.from_json(entry, limits)
            if info is not None and info.id not in seen:
                models.append(info)
                seen.add(info.id)
        loras = answer.get("loras")
        default = _text(answer.get("default_model"))
        if not default:
            default = next((m.id for m in models if m.default), "")
        return cls(tuple(models), limits,
                   tuple(str(name) for name in loras if isinstance(name, str)) if isinstance(loras, list) else (),
                   default)

    def find(self, model_id: str) -> ModelInfo | None:
        """The model a request's `model` names ("": the engine's default)."""
        wanted = model_id or self.default_model
        found = next((m for m in self.models if m.id == wanted), None)
        if found is None and not model_id:
            found = next((m for m in self.models if m.default), self.models[0] if self.models else None)
        return found


#: What an engine from before model families accepts (API version 1 as first published):
#: InstructPix2Pix's guidance pair and scheduler. Used only for model entries that carry no
#: `family` and no `params`.
LEGACY_MODEL: dict[str, Any] = {
    "family": "sd-ip2p",
    "family_label": "InstructPix2Pix",
    "params": [
        {"name": "text_guidance", "kind": "float", "default": 7.5, "minimum": 0.0, "maximum": 30.0,
         "step": 0.5, "explore": 2.5, "label": "Text guidance", "short": "s_T",
         "help": "s_T: how strongly the edit follows the instruction. Higher = a stronger edit, "
                 "but too high looks overcooked."},
        {"name": "image_guidance", "kind": "float", "default": 1.5, "minimum": 0.0, "maximum": 30.0,
         "step": 0.1, "explore": 0.5, "label": "Image guidance", "short": "s_I",
         "help": "s_I: how closely the result keeps to your picture. Higher = more faithful, "
                 "less change; try 1.0-1.2 for bigger changes."},
        {"name": "scheduler", "kind": "choice", "default": "default",
         "choices": ["default", "euler-a", "euler", "dpm++", "ddim", "lcm"], "label": "Scheduler",
         "help": "The sampler; 'default' is the model's own."},
    ],
    "steps": {"default": 20, "minimum": 1, "maximum": 200},
    "resolution": {"rule": "long_side", "default": 512, "multiple": 8, "minimum": 64, "maximum": 2048},
    "supports": {"mask": True, "loras": True, "negative_prompt": False},
}
