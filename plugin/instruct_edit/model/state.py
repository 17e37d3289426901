"""EditState: everything the docker shows, as observable fields."""

from __future__ import annotations

import random
from typing import Any

from ..request import AUTO_RESOLUTION, MAX_SEED, EditRequest, Lora
from .observable import Field, Observable

HISTORY_LENGTH = 20

# Connection states
DISCONNECTED, STARTING, CONNECTED, FAILED = "disconnected", "starting", "connected", "failed"
# Job states
IDLE, PREPARING, QUEUED, RUNNING, RECEIVING, DONE, ERROR, CANCELLED = (
    "idle", "preparing", "queued", "running", "receiving", "done", "failed", "cancelled")
BUSY_STATES = (PREPARING, QUEUED, RUNNING, RECEIVING)


class EditState(Observable):
    # What to do
    instruction = Field("")
    history = Field([])  # recent instructions, newest first
    text_guidance = Field(7.5)
    image_guidance = Field(1.5)
    steps = Field(20)
    seed = Field(0)
    random_seed = Field(True)  # a new seed for every edit, or the fixed `seed`
    variants = Field(1)
    resolution = Field(0)  # 0 = auto
    source = Field("layer")  # "layer" (the current layer) or "canvas" (everything visible)
    model = Field("")  # "" = the engine's default
    lora_path = Field("")
    lora_strength = Field(1.0)

    # What the engine offers
    models = Field([])  # [{"id", "name", ...}]
    loras = Field([])  # LoRA names the engine offers

    # Connection
    connection = Field(DISCONNECTED)
    connection_message = Field("Not connected")

    # The running edit
    job_state = Field(IDLE)
    step = Field(0)
    total_steps = Field(0)
    seconds_left = Field(-1.0)  # -1 = unknown
    preview = Field(None)  # a QImage while streaming, else None
    error = Field("")  # inline message for the painter; "" = none
    error_field = Field("")  # which input it concerns, for highlighting
    message = Field("")  # last success / info message

    # The selected layer's provenance (a dict) when it is an Instruct Edit result
    selected_provenance = Field(None)

    @property
    def busy(self) -> bool:
        return self.job_state in BUSY_STATES

    def request(self, *, new_seed: bool = True) -> EditRequest:
        """The request for the current settings; picks a fresh seed if asked and configured."""
        if self.random_seed and new_seed:
            self.seed = random.randint(0, min(MAX_SEED, 2**31 - 1))
        loras = (Lora(self.lora_path, float(self.lora_strength)),) if self.lora_path else ()
        return EditRequest(
            instruction=self.instruction.strip(),
            text_guidance=round(float(self.text_guidance), 3),
            image_guidance=round(float(self.image_guidance), 3),
            steps=int(self.steps),
            seed=int(self.seed),
            variants=int(self.variants),
            resolution=int(self.resolution) or AUTO_RESOLUTION,
            model=self.model or None,
            loras=loras,
        )

    def remember_instruction(self, text: str) -> None:
        text = text.strip()
        if text:
            self.history = [text, *[h for h in self.history if h != text]][:HISTORY_LENGTH]

    # Persisted between sessions (by Settings)
    PERSISTED = ("history", "text_guidance", "image_guidance", "steps", "seed", "random_seed",
                 "variants", "resolution", "source", "model", "lora_path", "lora_strength")

    def snapshot(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.PERSISTED}

    def restore(self, data: dict[str, Any]) -> None:
        for name in self.PERSISTED:
            if name in data and isinstance(data[name], type(getattr(type(self), name).default)):
                setattr(self, name, data[name])
