"""EditState: everything the docker shows, as observable fields.

The selected model's own parameters live in `options`; which ones exist, their ranges and
defaults come from the engine (`model_info`, a `specs.ModelInfo`). Values are kept per model
id in `model_values`: switching models shows that model's last values (or its defaults), and
switching back restores them. `steps`/`resolution` 0 mean "auto": the model's recommended
value (or the chosen preset's steps).
"""

from __future__ import annotations

import random
from typing import Any

from ..request import EditRequest, Lora
from ..specs import EngineModels, Limits, ModelInfo
from .observable import Field, Observable

HISTORY_LENGTH = 20

# Connection states
DISCONNECTED, STARTING, CONNECTED, FAILED = "disconnected", "starting", "connected", "failed"
# Job states
IDLE, PREPARING, QUEUED, RUNNING, RECEIVING, DONE, ERROR, CANCELLED = (
    "idle", "preparing", "queued", "running", "receiving", "done", "failed", "cancelled")
BUSY_STATES = (PREPARING, QUEUED, RUNNING, RECEIVING)

#: The per-model values (kept in `model_values[model id]`, restored on switching back).
PER_MODEL = ("steps", "resolution", "options", "preset")


class EditState(Observable):
    # What to do
    instruction = Field("")
    history = Field([])  # recent instructions, newest first
    steps = Field(0)  # 0 = auto: the preset's or the model's recommended steps
    seed = Field(0)
    random_seed = Field(True)  # a new seed for every edit, or the fixed `seed`
    variants = Field(1)
    resolution = Field(0)  # 0 = auto: the model's own working size
    source = Field("layer")  # "layer" (the current layer) or "canvas" (everything visible)
    model = Field("")  # "" = the engine's default
    options = Field({})  # the selected model's own parameters {ParamSpec name: value}
    preset = Field("")  # "" = none; else an id of model_info.presets
    lora_path = Field("")
    lora_strength = Field(1.0)
    model_values = Field({})  # {model id: {steps, resolution, options, preset}}

    # What the engine offers (GET /v1/models)
    engine_models = Field(EngineModels())  # all of it, parsed
    models = Field([])  # the raw model entries [{"id", "name", ...}]
    loras = Field([])  # LoRA names the engine offers
    limits = Field(Limits())  # the shared limits it enforces
    model_info = Field(None)  # ModelInfo of the selected model (None: unknown)
    non_commercial = Field(False)  # the selected model's licence forbids commercial use

    # Connection
    connection = Field(DISCONNECTED)
    connection_message = Field("Not connected")

    # The running edit
    job_state = Field(IDLE)
    step = Field(0)
    total_steps = Field(0)
    seconds_left = Field(-1.0)  # -1 = unknown
    engine_note = Field("")  # what the engine does before the steps (first-use conversion …)
    preview = Field(None)  # a QImage while streaming, else None
    error = Field("")  # inline message for the painter; "" = none
    error_field = Field("")  # which input it concerns, for highlighting
    message = Field("")  # last success / info message

    # The selected layer's provenance (a dict) when it is an Instruct Edit result
    selected_provenance = Field(None)

    def __init__(self) -> None:
        super().__init__()
        self._values_of: str | None = None  # whose values the per-model fields hold now
        self._learning = False
        self.changed.connect(self._follow)

    @property
    def busy(self) -> bool:
        return self.job_state in BUSY_STATES

    # --- the engine's models ----------------------------------------------------------------

    def learn_models(self, answer: Any) -> None:
        """Take in a `GET /v1/models` answer (any shape; unreadable parts are left out)."""
        parsed = EngineModels.from_json(answer)
        self._learning = True
        try:
            self.limits = parsed.limits
            self.loras = list(parsed.loras)
            raw = answer.get("models") if isinstance(answer, dict) else answer
            known = {info.id for info in parsed.models}
            self.models = [m for m in raw if isinstance(m, dict) and m.get("id") in known] \
                if isinstance(raw, list) else []
        finally:
            self._learning = False
        if parsed == self.engine_models:  # the same answer again (a reconnect): no signal,
            self._follow("engine_models", parsed)  # but a remembered model may be gone
        else:
            self.engine_models = parsed

    @property
    def catalogue(self) -> tuple[ModelInfo, ...]:
        return self.engine_models.models

    def set_option(self, name: str, value: Any) -> None:
        if self.options.get(name) != value or name not in self.options:
            self.options = {**self.options, name: value}

    def explore_unavailable(self) -> str | None:
        """Why Explore can't run with the selected model (None: it can)."""
        info = self.model_info
        if info is None:
            return "Explore needs the engine's model list; connect to the engine first."
        return info.explore_unavailable()

    def _follow(self, name: str, value: Any) -> None:
        if name == "models" and not self._learning:
            # Set directly (by a controller that predates learn_models): keep the limits.
            parsed = EngineModels.from_json({"models": value if isinstance(value, list) else []})
            self.engine_models = EngineModels(parsed.models, self.limits, tuple(self.loras),
                                              parsed.default_model)
        elif name == "engine_models":
            if self.model and value.models and value.find(self.model) is None:
                self.model = ""  # a remembered model this engine lacks: use its default
            else:
                self._select()
        elif name == "model":
            self._select()
        elif name == "preset" and self._values_of is not None:
            self._apply_preset(value)
        elif name in PER_MODEL and self._values_of is not None:
            self._store()

    def _select(self) -> None:
        """Show the selected model: its ModelInfo and its last values (or defaults)."""
        info = self.engine_models.find(self.model)
        if info is not None and info == self.model_info and self._values_of == info.id:
            return
        self._values_of = None
        self.model_info = info
        self.non_commercial = bool(info and info.non_commercial)
        if info is None:
            self.options, self.preset = {}, ""
            return
        stored = self.model_values.get(info.id)
        stored = stored if isinstance(stored, dict) else {}
        saved_options = stored.get("options") if isinstance(stored.get("options"), dict) else {}
        defaults = info.default_options()
        self.options = {spec.name: spec.coerce(saved_options[spec.name]) if spec.name in saved_options
                        else defaults[spec.name] for spec in info.params}
        self.steps = _auto_or_within(stored.get("steps"), info.steps.minimum, info.steps.maximum)
        self.resolution = _auto_or_within(stored.get("resolution"), info.resolution.minimum,
                                          info.resolution.maximum)
        preset = stored.get("preset")
        self.preset = preset if isinstance(preset, str) and info.preset(preset) else ""
        self._values_of = info.id
        self._store()

    def _store(self) -> None:
        key = self._values_of
        if key is not None:
            values = {name: getattr(self, name) for name in PER_MODEL}
            if self.model_values.get(key) != values:
                self.model_values = {**self.model_values, key: values}

    def _apply_preset(self, preset_id: str) -> None:
        """Choosing a preset sets its steps and options; choosing none returns to defaults."""
        info = self.model_info
        if info is None:
            return
        preset = info.preset(preset_id)
        options = dict(self.options)
        if preset is None:
            defaults = info.default_options()
            for other in info.presets:
                options.update({k: defaults[k] for k in other.options if k in defaults})
            self.steps = 0
        else:
            for name, value in preset.options.items():
                spec = info.spec(name)
                if spec is not None:
                    options[name] = spec.coerce(value)
            self.steps = preset.steps or 0
        self.options = options

    # --- the request --------------------------------------------------------------------------

    def request(self, *, new_seed: bool = True) -> EditRequest:
        """The request for the current settings; picks a fresh seed if asked and configured.

        "Auto" steps and resolution are filled in from the preset and the model's published
        recommendation, so layer names and provenance record what ran (None only when the
        engine published nothing: then the engine decides).
        """
        info, limits = self.model_info, self.limits
        if self.random_seed and new_seed:
            self.seed = random.randint(0, limits.seed_widget_max)
        preset = info.preset(self.preset) if info else None
        # The preset's own LoRAs come from the engine's catalogue: only its id travels.
        loras = []
        if self.lora_path:
            loras.append(Lora(self.lora_path, float(self.lora_strength)))
        options: dict[str, Any] = {}
        for spec in info.params if info else ():
            value = self.options.get(spec.name, spec.default)
            options[spec.name] = round(value, 4) if isinstance(value, float) else value
        return EditRequest(
            instruction=self.instruction.strip(),
            seed=int(self.seed),
            variants=int(self.variants),
            steps=int(self.steps) or (preset.steps if preset else None) or (info.default_steps if info else None),
            resolution=int(self.resolution) or (info.default_resolution if info else None),
            model=self.model or None,
            loras=tuple(loras),
            preset=preset.id if preset else None,
            options=options,
            info=info,
            limits=limits,
        )

    def remember_instruction(self, text: str) -> None:
        text = text.strip()
        if text:
            self.history = [text, *[h for h in self.history if h != text]][:HISTORY_LENGTH]

    # --- persisted between sessions (by Settings) ---------------------------------------------
    PERSISTED = ("history", "seed", "random_seed", "variants", "source", "model", "lora_path",
                 "lora_strength", "model_values")

    def snapshot(self) -> dict[str, Any]:
        self._store()
        return {name: getattr(self, name) for name in self.PERSISTED}

    def restore(self, data: dict[str, Any]) -> None:
        for name in self.PERSISTED:
            if name in data and isinstance(data[name], type(getattr(type(self), name).default)):
                setattr(self, name, data[name])
        self._values_of = None
        self._select()


def _auto_or_within(value: Any, low: int, high: int) -> int:
    """A stored steps/resolution value if still valid, else 0 (auto)."""
    if isinstance(value, int) and not isinstance(value, bool) and (value == 0 or low <= value <= high):
        return value
    return 0
