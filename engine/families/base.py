"""The interface a model family implements, and the value types around it.

A family owns only the model maths: how its weights load, which parameters it takes, its
working-size rule and the denoising call. Everything around it (image preparation, alpha,
masks, detail preservation, variants in chunks, the out-of-memory ladder, LoRAs, progress and
cancel plumbing) is the family-agnostic `engine.editor.Editor`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image

from engine.errors import InvalidInput

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from engine.models import ModelSource

ParamKind = Literal["float", "int", "choice", "bool", "text"]
SizeRule = Literal["long_side", "area"]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a family takes: published by `GET /v1/models`, checked on every request.

    `explore` is the step of this parameter's axis in the docker's Explore grid (None: not an
    axis). `maximum`/`minimum` hold for float and int kinds; `choices` for the choice kind;
    `max_length` for text.
    """

    name: str
    kind: ParamKind
    default: Any
    label: str
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    max_length: int | None = None
    explore: float | None = None

    def check(self, value: Any) -> Any:
        """The value, normalised (int → float for floats); InvalidInput naming the field."""
        name = self.name
        if self.kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or not self._in_range(value):
                raise InvalidInput(f"{name} must be a number from {self.minimum} to {self.maximum} (got {value!r})", name)
            return float(value)
        if self.kind == "int":
            if not isinstance(value, int) or isinstance(value, bool) or not self._in_range(value):
                raise InvalidInput(
                    f"{name} must be a whole number from {self.minimum:g} to {self.maximum:g} (got {value!r})", name
                )
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise InvalidInput(f"{name} must be one of {', '.join(self.choices)} (got {value!r})", name)
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise InvalidInput(f"{name} must be true or false (got {value!r})", name)
            return value
        if not isinstance(value, str):
            raise InvalidInput(f"{name} must be text", name)
        if self.max_length is not None and len(value) > self.max_length:
            raise InvalidInput(f"{name} is {len(value)} characters long; the limit is {self.max_length}", name)
        return value

    def _in_range(self, value: float) -> bool:
        return (self.minimum is None or value >= self.minimum) and (self.maximum is None or value <= self.maximum)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "kind": self.kind, "default": self.default, "label": self.label,
                                "help": self.help}
        for key in ("minimum", "maximum", "step", "max_length", "explore"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.choices:
            data["choices"] = list(self.choices)
        return data


@dataclass(frozen=True)
class ResolutionRule:
    """How the working size follows from the input's size and `params.resolution`.

    `long_side`: the long side becomes `resolution` (InstructPix2Pix's reference rule).
    `area`: the working size has about `resolution`² pixels at the input's aspect ratio (the
    DiT families were trained on ~1 MP buckets of many aspect ratios).
    Both sides are multiples of `multiple`.
    """

    rule: SizeRule
    default: int
    multiple: int
    minimum: int = 64
    maximum: int = 2048

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "default": self.default, "multiple": self.multiple,
                "minimum": self.minimum, "maximum": self.maximum}


@dataclass(frozen=True)
class StepsRule:
    default: int
    minimum: int = 1
    maximum: int = 200

    def to_json(self) -> dict[str, Any]:
        return {"default": self.default, "minimum": self.minimum, "maximum": self.maximum}


@dataclass
class StepHooks:
    """What a family calls once per denoising step (from `callback_on_step_end` or its own loop).

    `step(i, total, latents)` reports progress and raises `EditCancelled` when the edit was
    cancelled; the family lets that propagate (cancel within one step, nothing decoded).
    `latents` are the family's own (packed or not); `preview` turns them into a small RGB image
    only when the editor wants one.
    """

    step: Callable[[int, int, torch.Tensor | None], None]


@dataclass(frozen=True)
class RunInputs:
    """One call of a family's denoising: a working-size RGB image and the resolved parameters."""

    image: np.ndarray  # H×W×3 float32 in [0, 1], H and W multiples of the family's multiple
    instruction: str
    steps: int
    seeds: Sequence[int]  # one per variant of this chunk: variant k uses seed + k
    options: Mapping[str, Any] = field(default_factory=dict)  # checked, defaults filled in


class Family:
    """Base class of a model family. Subclasses set the class attributes and implement
    `load`, `run` and (optionally) `preview`."""

    id: str = ""
    label: str = ""
    params: tuple[ParamSpec, ...] = ()
    resolution: ResolutionRule = ResolutionRule("long_side", 512, 8)
    steps: StepsRule = StepsRule(20)
    supports_loras: bool = True
    supports_negative_prompt: bool = False
    # Components a quantization config may touch (diffusers' `components_to_quantize`).
    quantizable: tuple[str, ...] = ()
    # Hub-style `_class_name`s in model_index.json that this family loads.
    pipeline_class_names: tuple[str, ...] = ()
    # Pipeline components by role, for the editor's memory plans (`offload-text` moves the text
    # encoders off the GPU after encoding; the denoiser and the VAE stay).
    denoiser: str = "transformer"
    # dtype on GPUs when the user says `auto` (None: fp16); the DiT families want bf16.
    preferred_dtype: torch.dtype | None = None
    text_encoders: tuple[str, ...] = ("text_encoder",)

    # ------------------------------------------------------------------ parameters
    def resolve_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check the request's family parameters and fill in defaults.

        A parameter this family does not take is an InvalidInput naming the field and the
        parameters it does take.
        """
        specs = {spec.name: spec for spec in self.params}
        for name in options:
            if name not in specs:
                takes = ", ".join(specs) or "no model-specific parameters"
                raise InvalidInput(f"{name} is not a parameter of {self.label} models; they take {takes}", name)
        return {name: spec.check(options[name]) if name in options else spec.default
                for name, spec in specs.items()}

    def describe(self) -> dict[str, Any]:
        """What `GET /v1/models` publishes about this family."""
        return {
            "family": self.id,
            "family_label": self.label,
            "params": [spec.to_json() for spec in self.params],
            "resolution": self.resolution.to_json(),
            "steps": self.steps.to_json(),
            "supports": {"mask": True, "loras": self.supports_loras,
                         "negative_prompt": self.supports_negative_prompt},
        }

    # ------------------------------------------------------------------ working size
    def working_size(self, width: int, height: int, resolution: int | None) -> tuple[int, int]:
        from engine.imaging import working_size_area, working_size_long_side

        target = resolution or self.resolution.default
        if self.resolution.rule == "long_side":
            return working_size_long_side(width, height, target, self.resolution.multiple)
        return working_size_area(width, height, target * target, self.resolution.multiple)

    # ------------------------------------------------------------------ the model
    def prepare(self, pipe: DiffusionPipeline, dtype: torch.dtype) -> DiffusionPipeline:
        """Make a pipeline (loaded here or handed over by a caller) ready for `run`: its dtype,
        no progress bars. Families override it for layout tweaks (channels-last, an fp32 VAE)."""
        pipe.set_progress_bar_config(disable=True)
        if getattr(pipe, "dtype", dtype) != dtype:
            pipe.to(dtype=dtype)
        return pipe

    def load(self, source: ModelSource, *, dtype: torch.dtype, quantization: str | None = None,
             config: str | None = None) -> DiffusionPipeline:
        """The pipeline on the CPU in `dtype` (the editor moves it / offloads it)."""
        raise NotImplementedError

    def run(self, pipe: DiffusionPipeline, inputs: RunInputs, hooks: StepHooks,
            device: torch.device) -> list[np.ndarray]:
        """One H×W×3 float32 array in [0, 1] per seed, at the input's working size."""
        raise NotImplementedError

    def preview(self, pipe: DiffusionPipeline, latents: torch.Tensor, size: tuple[int, int]) -> Image.Image | None:
        """A cheap RGB preview of the first sample's latents (None: the family has none)."""
        return None
