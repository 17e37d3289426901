"""What the engine's training routes answer (`/v1/training-options`, `/v1/trainings`), parsed.

The parsers accept any JSON: a missing or malformed part becomes a neutral value, so an
engine a little older or newer than the plugin never makes the Train tab fail. The wire
format is the contract in docs/api.md ("Training jobs").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: States after which a training changes no more (the event stream ends after them).
FINAL_STATES = ("done", "failed", "cancelled", "interrupted")
#: States in which a training occupies the engine.
ACTIVE_STATES = ("queued", "running", "paused")


def _int(value: Any, default: int = 0) -> int:
    return (
        int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default
    )


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _str(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


@dataclass(frozen=True)
class TrainableModel:
    id: str
    family: str = ""
    trainable: bool = False
    why_not: str = ""


@dataclass(frozen=True)
class TrainingPreset:
    id: str
    label: str = ""
    max_steps: int = 0
    lora_rank: int = 0
    resolution: int = 0
    learning_rate: float | None = None
    batch_size: int = 0
    grad_accum: int = 0
    minutes_hint: str = ""

    def describe(self) -> str:
        """The preset's settings in one line, as the Train form shows them."""
        parts = [f"{self.max_steps} steps", f"rank {self.lora_rank}", f"{self.resolution} px"]
        if self.learning_rate:
            parts.append(f"learning rate {self.learning_rate:g}")
        if self.batch_size:
            batch = self.batch_size * max(1, self.grad_accum)
            parts.append(f"batch {batch}")
        text = " · ".join(parts)
        return f"{text} — {self.minutes_hint}" if self.minutes_hint else text


@dataclass(frozen=True)
class EngineDataset:
    """A dataset folder the engine itself knows (offered to loopback clients)."""

    folder: str
    pairs: int = 0


@dataclass(frozen=True)
class TrainingOptions:
    models: tuple[TrainableModel, ...] = ()
    presets: tuple[TrainingPreset, ...] = ()
    min_pairs: int = 1
    max_dataset_mb: int = 0
    datasets: tuple[EngineDataset, ...] = ()

    @property
    def trainable(self) -> tuple[TrainableModel, ...]:
        return tuple(m for m in self.models if m.trainable)

    def preset(self, preset_id: str) -> TrainingPreset | None:
        return next((p for p in self.presets if p.id == preset_id), None)

    @classmethod
    def from_json(cls, answer: Any) -> TrainingOptions:
        answer = answer if isinstance(answer, dict) else {}
        models = tuple(
            TrainableModel(
                m["id"], _str(m.get("family")), m.get("trainable") is True, _str(m.get("why_not"))
            )
            for m in _list(answer.get("models"))
            if isinstance(m, dict) and isinstance(m.get("id"), str)
        )
        presets = tuple(
            TrainingPreset(
                p["id"],
                _str(p.get("label"), p["id"]),
                _int(p.get("max_steps")),
                _int(p.get("lora_rank")),
                _int(p.get("resolution")),
                _float(p.get("learning_rate")),
                _int(p.get("batch_size")),
                _int(p.get("grad_accum")),
                _str(p.get("minutes_hint")),
            )
            for p in _list(answer.get("presets"))
            if isinstance(p, dict) and isinstance(p.get("id"), str)
        )
        datasets = tuple(
            EngineDataset(d["folder"], _int(d.get("pairs")))
            for d in _list(answer.get("datasets"))
            if isinstance(d, dict) and isinstance(d.get("folder"), str)
        )
        return cls(
            models,
            presets,
            max(1, _int(answer.get("min_pairs"), 1)),
            _int(answer.get("max_dataset_mb")),
            datasets,
        )


@dataclass(frozen=True)
class TrainingStatus:
    """One training job as `GET /v1/trainings/{id}` describes it."""

    id: str
    name: str = ""
    model: str = ""
    preset: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    pairs: int = 0
    state: str = "queued"
    step: int = 0
    max_steps: int = 0
    loss: tuple[tuple[int, float], ...] = ()
    eta_s: float | None = None
    validations: tuple[tuple[int, int], ...] = ()  # (step, index)
    error: str = ""
    field: str = ""
    lora_path: str = ""
    lora_card: str = ""
    created: float = 0.0
    updated: float = 0.0
    resumable: bool = False

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def can_resume(self) -> bool:
        return self.resumable and self.state in ("interrupted", "cancelled", "failed")

    def describe(self) -> str:
        """One line for the list of trainings: name, model, state, progress."""
        words = {
            "queued": "waiting",
            "running": "training",
            "paused": "paused for an edit",
            "done": "done",
            "failed": "failed",
            "cancelled": "cancelled",
            "interrupted": "interrupted",
        }
        text = f"{self.name or self.id} · {words.get(self.state, self.state)}"
        if self.max_steps and self.state != "done":
            text += f" · step {self.step}/{self.max_steps}"
        if self.can_resume():
            text += " · can resume"
        return text

    @classmethod
    def from_json(cls, answer: Any) -> TrainingStatus | None:
        """None for an answer without an id (not a training)."""
        if not isinstance(answer, dict) or not isinstance(answer.get("id"), (str, int)):
            return None
        loss = []
        for point in _list(answer.get("loss")):
            if isinstance(point, (list, tuple)) and len(point) == 2:
                step, value = _float(point[0]), _float(point[1])
                if step is not None and value is not None:
                    loss.append((int(step), value))
        validations = []
        for item in _list(answer.get("validations")):
            if isinstance(item, dict) and _float(item.get("index")) is not None:
                validations.append((_int(item.get("step")), _int(item.get("index"))))
        lora = answer.get("lora") if isinstance(answer.get("lora"), dict) else {}
        settings = answer.get("settings") if isinstance(answer.get("settings"), dict) else {}
        return cls(
            id=str(answer["id"]),
            name=_str(answer.get("name")),
            model=_str(answer.get("model")),
            preset=_str(answer.get("preset")),
            settings=dict(settings),
            pairs=_int(answer.get("pairs")),
            state=_str(answer.get("state"), "queued"),
            step=_int(answer.get("step")),
            max_steps=_int(answer.get("max_steps")),
            loss=tuple(loss),
            eta_s=_float(answer.get("eta_s")),
            validations=tuple(validations),
            error=_str(answer.get("error")),
            field=_str(answer.get("field")),
            lora_path=_str(lora.get("path")),
            lora_card=_str(lora.get("card")),
            created=_float(answer.get("created")) or 0.0,
            updated=_float(answer.get("updated")) or 0.0,
            resumable=answer.get("resumable") is True,
        )


def statuses_from_json(answer: Any) -> list[TrainingStatus]:
    """`GET /v1/trainings` → its trainings, newest first as the engine sent them."""
    items = answer.get("trainings") if isinstance(answer, dict) else answer
    found = [TrainingStatus.from_json(item) for item in _list(items)]
    return [status for status in found if status is not None]
