"""Training jobs: LoRA fine-tunes started from the service, each in its own process.

A training lives in `<data-dir>/trainings/<id>/`: `job.json` (the request, state and timings,
written by the service), `data/` (its own copy of the dataset), `output/` (what
`instruct-edit-train train` writes: checkpoints, validation grids, the LoRA), `events.jsonl`
(written by the runner, `python -m training.job_runner job.json`, one JSON object a line) and
`log.txt` (the runner's stdout and stderr). The service never imports `training`: it starts
the runner and reads what it writes, so a crash of the training cannot take the service down.

Device sharing: an edit always goes first. While any edit is queued or running the manager
creates the job's `pause` file; the runner waits before its next step until the file is gone
(it finishes the step it is in). A `stop` file asks the runner to end after the current step;
the last checkpoint stays and the job can be resumed (`--resume`).

One training runs at a time. Jobs survive restarts of the service: one that was running when
the service stopped (or crashed) is `interrupted` and resumable when a checkpoint exists.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput
from engine.server.auth import default_token_path
from engine.server.catalog import ModelCatalog, ModelEntry
from engine.server.errors import ApiError
from engine.server.jobs import JobQueue
from engine.server.settings import ServerSettings

log = logging.getLogger(__name__)

MIN_PAIRS = 8
MAX_NAME_CHARS = 64
NAME_PATTERN = re.compile(r"^[A-Za-z0-9 _.\-]{1,64}$")
ID_PATTERN = re.compile(r"^[0-9A-Za-z\-]{1,64}$")
POLL_S = 0.2
# How long a cancel waits for the runner to end on its own (it stops after the step it is in)
# before its process group is terminated; the last checkpoint stays either way.
STOP_GRACE_S = 60.0
SHUTDOWN_GRACE_S = 5.0
LOG_TAIL_LINES = 20
MAX_LOSS_POINTS = 500
ETA_WINDOW = 20
ACTIVE_STATES = frozenset({"queued", "running", "paused"})
FINAL_STATES = frozenset({"done", "failed", "cancelled", "interrupted"})
RUNNER_MODULE = "training.job_runner"
LORA_FILE = "pytorch_lora_weights.safetensors"

# Which model families a training job of the service fine-tunes: None = trainable, else why
# not (a family that is not listed is not trainable either). The presets are shared; the
# memory estimate is SD 1.5's for InstructPix2Pix and FLOW_GPU_GIB's for the flow families.
TRAINABLE_FAMILIES: dict[str, str | None] = {
    "sd-ip2p": None,
    "sdxl-ip2p": "the training package does not fine-tune SDXL InstructPix2Pix models",
    "flux-kontext": None,
    "flux2-klein": None,
    "qwen-image-edit": None,
}
FLOW_FAMILIES = ("flux-kontext", "flux2-klein", "qwen-image-edit")

# GPU memory (GiB) of a LoRA fine-tune at 512 px, batch 1, gradient checkpointing, per frozen
# base precision: estimates from parameter counts and counted activations of the full-size
# architectures (benchmarks/bench_finetune.py, docs/training.md), not GPU measurements.
# The engine picks the first that fits the free VRAM; smaller (e.g. test) models scale down
# with their weights.
FLOW_GPU_GIB: dict[str, dict[str, float]] = {
    "flux-kontext": {"none": 35.3, "torchao-int8": 19.6, "bnb-4bit": 12.0},
    "flux2-klein": {"none": 18.2, "torchao-int8": 10.5, "bnb-4bit": 6.7},
    "qwen-image-edit": {"none": 59.5, "torchao-int8": 32.9, "bnb-4bit": 20.0},
}
# Their full-size weights on disk in bf16 (transformer + text encoders + VAE), the scale above.
FLOW_WEIGHTS_BYTES = {
    "flux-kontext": 33.7e9,
    "flux2-klein": 16.0e9,
    "qwen-image-edit": 57.5e9,
}


@dataclass(frozen=True)
class Preset:
    """A LoRA fine-tune of an InstructPix2Pix model on a painter's 10 to 50 pairs."""

    id: str
    label: str
    max_steps: int
    lora_rank: int
    resolution: int
    learning_rate: float
    batch_size: int
    grad_accum: int
    # Gradient checkpointing on a GPU: ~30 % slower, but 384-512 px fits in ~8 GB.
    gradient_checkpointing: bool
    minutes: dict[str, str]  # device kind -> what to expect

    def settings(self) -> dict[str, Any]:
        return {
            "max_steps": self.max_steps,
            "lora_rank": self.lora_rank,
            "resolution": self.resolution,
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
        }


# Estimates for SD 1.5 InstructPix2Pix (UNet 860 M): on a GPU of the RTX 3060/4060 class with
# fp16/bf16, and on a desktop CPU in fp32 (docs/notes: one 256 px UNet forward+backward of one
# sample takes ~4-8 s there, 512 px four times that). Validation grids add a little.
PRESETS: tuple[Preset, ...] = (
    Preset(
        "quick", "Quick: 300 steps, rank 8, 256 px", 300, 8, 256, 1e-4, 2, 2, False,
        {"cuda": "about 3-5 min on a GPU", "mps": "about 10-20 min on Apple silicon",
         "cpu": "about 1.5-3 h on a CPU"},
    ),
    Preset(
        "balanced", "Balanced: 1000 steps, rank 16, 384 px", 1000, 16, 384, 1e-4, 2, 2, True,
        {"cuda": "about 12-20 min on a GPU", "mps": "about 1-2 h on Apple silicon",
         "cpu": "more than 10 h on a CPU: use a GPU"},
    ),
    Preset(
        "thorough", "Thorough: 3000 steps, rank 32, 512 px", 3000, 32, 512, 1e-4, 1, 4, True,
        {"cuda": "about 45-75 min on a GPU", "mps": "several hours on Apple silicon",
         "cpu": "more than a day on a CPU: use a GPU"},
    ),
)  # fmt: skip
PRESETS_BY_ID = {preset.id: preset for preset in PRESETS}

# overrides: name -> (setting, type, minimum, maximum). The first four are the contract's;
# the others let a client (and the tests) size a run further.
OVERRIDES: dict[str, tuple[str, type, float, float]] = {
    "max_steps": ("max_steps", int, 1, 20_000),
    "lora_rank": ("lora_rank", int, 1, 128),
    "resolution": ("resolution", int, 32, 1024),
    "learning_rate": ("learning_rate", float, 1e-6, 1e-2),
    "batch_size": ("batch_size", int, 1, 16),
    "grad_accum": ("grad_accum", int, 1, 64),
    "validate_every": ("validate_every", int, 0, 20_000),
    "checkpoint_every": ("checkpoint_every", int, 1, 20_000),
    "validation_steps": ("validation_steps", int, 1, 100),
}


def default_data_dir() -> Path:
    return default_token_path().parent


def data_dir_of(settings: ServerSettings) -> Path:
    configured = getattr(settings, "data_dir", None)
    return Path(configured) if configured is not None else default_data_dir()


def training_available() -> bool:
    """Whether the training package is installed next to the engine (found, not imported)."""
    try:
        return importlib.util.find_spec("training.job_runner") is not None
    except (ImportError, ValueError):
        return False


def trainability(entry: ModelEntry) -> tuple[bool, str | None]:
    """(trainable, why not) for a model the service offers."""
    if not training_available():
        return False, "the training package is not installed with this engine"
    if entry.catalogue.get("single_file") or Path(entry.target).is_file():
        return False, "a single-file checkpoint; training needs a diffusers folder or hub id"
    if entry.family is None:
        return False, "its model family is unknown, so the training package cannot load it"
    if entry.family not in TRAINABLE_FAMILIES:
        return False, f"the training package does not fine-tune {entry.family} models"
    why_not = TRAINABLE_FAMILIES[entry.family]
    return why_not is None, why_not


# --------------------------------------------------------------------------------------
# Memory: what a preset needs, what is free


def _weights_bytes(target: str) -> int | None:
    """The weight files of a diffusers folder (every component), or None when not local."""
    folder = Path(target)
    if not folder.is_dir():
        return None
    total = 0
    for component in folder.iterdir():
        if component.is_dir():
            for path in component.glob("*"):
                if path.suffix in (".safetensors", ".bin"):
                    total += path.stat().st_size
    return total or None


def flow_plan(
    family: str, weights_bytes: int | None, free: int | None, device_kind: str
) -> tuple[str, int]:
    """(frozen base precision, bytes needed) for a flow family's LoRA fine-tune: on a GPU the
    lightest-on-quality plan that fits `free`; elsewhere the unquantized base in fp32 (bnb is
    CUDA-only), which fits only small models."""
    full = FLOW_WEIGHTS_BYTES[family]
    scale = min(1.0, (weights_bytes or full) / full)
    if device_kind != "cuda":
        # fp32 weights (twice the bf16 files), their gradients-free copy in autocast, data.
        return "none", int((weights_bytes or full) * 2.5 + 0.5e9 * scale)
    plans = FLOW_GPU_GIB[family]
    needs = {plan: int(gib * 2**30 * scale) for plan, gib in plans.items()}
    for plan, need in needs.items():
        if free is None or need <= free:
            return plan, need
    return "bnb-4bit", needs["bnb-4bit"]


SD15_WEIGHTS_BYTES = 4_300_000_000  # UNet + VAE + CLIP text in fp32
SD15_UNET_SHARE = 0.8
# Activations kept for the backward pass, per sample at 256 px, for the SD 1.5 UNet in
# 16-bit (measured figures of the diffusers LoRA scripts, rounded up); they grow with pixels.
ACTIVATIONS_256_BYTES = 1.2e9
CHECKPOINTING_SAVES = 0.3  # the share of activations gradient checkpointing keeps
GPU_OVERHEAD_BYTES = 0.8e9  # CUDA context, allocator slack


def memory_need_bytes(
    weights_bytes: int | None, settings: dict[str, Any], device_kind: str, checkpointing: bool
) -> int:
    """An estimate of the memory a LoRA training of this size needs on `device_kind`."""
    weights = weights_bytes or SD15_WEIGHTS_BYTES
    scale = weights / SD15_WEIGHTS_BYTES  # smaller models: smaller activations
    pixels = (settings["resolution"] / 256) ** 2
    activations = ACTIVATIONS_256_BYTES * pixels * settings["batch_size"] * scale
    if device_kind == "cpu":
        # fp32 weights and activations, no gradient checkpointing; plus the optimizer's
        # LoRA state (small) and the data.
        return int(weights * 1.1 + 2 * activations + 0.5e9 * min(scale, 1.0))
    if checkpointing:
        activations *= CHECKPOINTING_SAVES
    return int(weights / 2 + activations + GPU_OVERHEAD_BYTES * min(scale * 10, 1.0))


def free_ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # not installed, or no answer on this system
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_kind(settings: ServerSettings) -> tuple[str, str]:
    """(kind, device) the runner will train on: the service's first device."""
    device = settings.devices[0] if settings.devices else "auto"
    if device == "cpu":
        return "cpu", "cpu"
    if device.startswith("cuda"):
        return "cuda", device
    if device == "mps":
        return "mps", "mps"
    try:
        import torch

        if torch.cuda.is_available():
            return "cuda", "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps", "mps"
    except ImportError:
        pass
    return "cpu", "cpu"


def free_device_bytes(kind: str, device: str) -> tuple[int | None, str]:
    """Free memory where the training will run, and what that memory is called."""
    if kind == "cuda":
        try:
            import torch

            free, _total = torch.cuda.mem_get_info(torch.device(device))
            return int(free), f"GPU memory on {device}"
        except Exception as err:  # no driver answer: do not block on an unknown
            log.warning("free GPU memory unknown (%s)", err)
            return None, f"GPU memory on {device}"
    return free_ram_bytes(), "RAM" if kind == "cpu" else "unified memory"


def check_memory(
    need: int, free: int | None, what: str, preset: str, device_hint: str = ""
) -> None:
    """422 (field `preset`) when the estimate does not fit into what is free."""
    if free is None or need <= free:
        return
    raise ApiError(
        422,
        f"this training needs about {need / 2**30:.1f} GiB of free {what}, but only "
        f"{free / 2**30:.1f} GiB are free{device_hint}. Choose a smaller preset than "
        f"{preset!r} (or a lower resolution), or close programs that use {what}.",
        "preset",
    )


# --------------------------------------------------------------------------------------
# The job record


def _now() -> float:
    return time.time()


@dataclass
class TrainingJob:
    """One training: what was asked, and what the runner reported so far."""

    id: str
    folder: Path
    name: str
    model: str
    model_target: str
    family: str | None
    preset: str
    settings: dict[str, Any]
    runner: dict[str, Any]
    pairs: int
    dataset: str  # relative to `folder`
    state: str = "queued"
    error: str | None = None
    error_field: str | None = None
    lora: dict[str, str] | None = None
    created: float = field(default_factory=_now)
    updated: float = field(default_factory=_now)
    started: float | None = None
    finished: float | None = None
    runner_pid: int | None = None
    service_pid: int | None = None
    # From events.jsonl (not stored in job.json: replayed from the file after a restart).
    step: int = 0
    loss: list[tuple[int, float]] = field(default_factory=list)
    validations: list[tuple[int, str]] = field(default_factory=list)
    step_times: list[tuple[int, float]] = field(default_factory=list)
    final_event: dict[str, Any] | None = None
    events_offset: int = 0
    events_partial: bytes = b""
    # Service-side only.
    process: subprocess.Popen | None = None
    stop_reason: str | None = None  # "cancel" or "shutdown" while a stop is pending
    stop_requested_at: float | None = None
    foreign: bool = False  # run by another live service on the same data folder
    version: int = 0
    listeners: list[Callable[[], None]] = field(default_factory=list)

    @property
    def max_steps(self) -> int:
        return int(self.settings["max_steps"])

    def stored(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "model": self.model,
            "model_target": self.model_target,
            "family": self.family,
            "preset": self.preset,
            "settings": self.settings,
            "runner": self.runner,
            "pairs": self.pairs,
            "dataset": self.dataset,
            "state": self.state,
            "error": self.error,
            "field": self.error_field,
            "lora": self.lora,
            "created": self.created,
            "updated": self.updated,
            "started": self.started,
            "finished": self.finished,
            "runner_pid": self.runner_pid,
            "service_pid": self.service_pid,
        }

    @classmethod
    def from_stored(cls, folder: Path, data: dict[str, Any]) -> TrainingJob:
        return cls(
            id=str(data["id"]),
            folder=folder,
            name=str(data["name"]),
            model=str(data["model"]),
            model_target=str(data.get("model_target") or data["model"]),
            family=data.get("family"),
            preset=str(data["preset"]),
            settings=dict(data["settings"]),
            runner=dict(data.get("runner") or {}),
            pairs=int(data.get("pairs") or 0),
            dataset=str(data.get("dataset") or "data"),
            state=str(data.get("state") or "interrupted"),
            error=data.get("error"),
            error_field=data.get("field"),
            lora=data.get("lora"),
            created=float(data.get("created") or 0.0),
            updated=float(data.get("updated") or 0.0),
            started=data.get("started"),
            finished=data.get("finished"),
            runner_pid=data.get("runner_pid"),
            service_pid=data.get("service_pid"),
        )

    # Files of the job.
    @property
    def job_file(self) -> Path:
        return self.folder / "job.json"

    @property
    def events_file(self) -> Path:
        return self.folder / "events.jsonl"

    @property
    def log_file(self) -> Path:
        return self.folder / "log.txt"

    @property
    def pause_file(self) -> Path:
        return self.folder / "pause"

    @property
    def stop_file(self) -> Path:
        return self.folder / "stop"

    @property
    def output(self) -> Path:
        return self.folder / "output"

    def has_checkpoint(self) -> bool:
        checkpoints = self.output / "checkpoints"
        try:
            return any(
                child.name.startswith("step-") and (child / "train_state.json").is_file()
                for child in checkpoints.iterdir()
            )
        except OSError:
            return False

    def eta_s(self) -> float | None:
        if self.state != "running" or len(self.step_times) < 2:
            return None
        deltas = sorted(
            (t2 - t1) / (s2 - s1)
            for (s1, t1), (s2, t2) in zip(self.step_times, self.step_times[1:], strict=False)
            if s2 > s1
        )
        if not deltas:
            return None
        per_step = deltas[len(deltas) // 2]
        return max(0.0, per_step * (self.max_steps - self.step))


def thin(points: list[tuple[int, float]], limit: int = MAX_LOSS_POINTS) -> list[tuple[int, float]]:
    """At most `limit` evenly spaced points, always with the first and the last."""
    if len(points) <= limit:
        return list(points)
    last = len(points) - 1
    indices = sorted({round(k * last / (limit - 1)) for k in range(limit)})
    return [points[i] for i in indices]


def _pid_alive(pid: int | None) -> bool:
    if not pid or pid <= 0:
        return False
    from engine.server.cli import pid_alive

    return pid_alive(pid)


def _is_our_runner(pid: int) -> bool:
    """On Linux, whether process `pid` is a training runner (pids are reused)."""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.exists():
        # Elsewhere we cannot tell, and a reused pid may be anyone's: never kill it. An
        # orphaned runner ends by itself at its next step (it watches its parent).
        return False
    try:
        return RUNNER_MODULE.encode() in cmdline.read_bytes()
    except OSError:
        return False


def _terminate_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        if os.name == "posix":
            os.killpg(pid, signal.SIGTERM)
        else:  # pragma: no cover - Windows
            os.kill(pid, signal.SIGTERM)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 16384))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def lora_folder_name(name: str) -> str:
    return re.sub(r"\s+", "-", name.strip())


def model_card(job: TrainingJob, device: str) -> str:
    settings = job.settings
    last_loss = f"{job.loss[-1][1]:.4f}" if job.loss else "n/a"
    duration = ""
    if job.started and job.finished:
        duration = f", {max(job.finished - job.started, 0) / 60:.1f} min in the last run"
    return f"""---
base_model: {job.model}
library_name: diffusers
tags: [instruct-pix2pix, image-editing, lora]
---
# {job.name}

A LoRA fine-tuned from inside Krita (Instruct Edit) on a painter's own before/after pairs.

- Base model: `{job.model}` (family {job.family or "unknown"})
- Data: {job.pairs} before/after pairs
- Steps: {job.step} of {job.max_steps} (preset {job.preset})
- LoRA rank {settings["lora_rank"]}; resolution {settings["resolution"]} px; learning rate \
{settings["learning_rate"]}; batch {settings["batch_size"]} × accumulation {settings["grad_accum"]}
- Final loss: {last_loss}
- Trained on: {device}{duration}; finished {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(job.finished or _now()))}
- Training id: `{job.id}`

## Use

In the Krita docker's LoRA list, or in an edit request: `"loras": [{{"path": "{(job.lora or {}).get("path", "")}", "strength": 1.0}}]`.
"""


class TrainingManager:
    """The trainings of one data folder: creation, the runner processes, state, listeners."""

    def __init__(
        self,
        settings: ServerSettings,
        catalog: ModelCatalog,
        queue: JobQueue,
        data_dir: Path | None = None,
        python: str = sys.executable,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.queue = queue
        self.data_dir = Path(data_dir) if data_dir is not None else data_dir_of(settings)
        self.python = python
        self.trainings_dir = self.data_dir / "trainings"
        self.loras_dir = self.data_dir / "loras"
        self.datasets_dir = self.data_dir / "datasets"
        self.max_dataset_bytes = int(
            min(
                float(getattr(settings, "max_dataset_mb", 400.0)),
                float(settings.max_upload_mb),
            )
            * 2**20
        )
        self._lock = threading.RLock()
        self._jobs: dict[str, TrainingJob] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.device_kind, self.device = device_kind(settings)

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self._load_existing()
        self._thread = threading.Thread(
            target=self._monitor, name="instruct-edit-trainings", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """The service is stopping: running trainings stop after their step (interrupted,
        resumable); a runner that does not end within SHUTDOWN_GRACE_S is terminated."""
        self._stopping.set()
        with self._lock:
            active = [job for job in self._jobs.values() if job.process is not None]
            for job in active:
                job.stop_reason = "shutdown"
                with contextlib.suppress(OSError):
                    job.stop_file.write_text("shutdown\n")
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for job in active:
            assert job.process is not None
            try:
                job.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _terminate_group(job.process.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    job.process.wait(5)
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            for job in active:
                self._read_events(job)
                self._finish_process(job, shutting_down=True)

    def _load_existing(self) -> None:
        try:
            folders = sorted(self.trainings_dir.iterdir())
        except OSError:
            return
        for folder in folders:
            try:
                data = json.loads((folder / "job.json").read_text(encoding="utf-8"))
                job = TrainingJob.from_stored(folder, data)
            except (OSError, ValueError, KeyError, TypeError) as err:
                if folder.is_dir() and not folder.name.startswith("."):
                    log.warning("training folder %s unreadable (%s); skipped", folder, err)
                continue
            if job.id != folder.name:
                continue
            self._read_events(job)
            if job.state in ACTIVE_STATES:
                self._recover(job)
            self._jobs[job.id] = job

    def _recover(self, job: TrainingJob) -> None:
        """A job that was active when its service ended."""
        runner_alive = _pid_alive(job.runner_pid) and _is_our_runner(job.runner_pid or 0)
        owner = job.service_pid
        if runner_alive and owner not in (None, os.getpid()) and _pid_alive(owner):
            job.foreign = True  # another engine on this data folder runs it: leave it alone
            return
        if runner_alive and job.runner_pid:
            _terminate_group(job.runner_pid)  # orphaned: it would stop itself at its next step
        final = job.final_event or {}
        if final.get("event") == "done":
            self._register(job, Path(str(final.get("weights", ""))))
        elif final.get("event") == "failed":
            self._set_state(job, "failed", final.get("message"), final.get("field"))
        else:
            self._set_state(
                job,
                "interrupted",
                "the engine stopped while this training ran; resume it to continue from its "
                "last checkpoint"
                if job.has_checkpoint()
                else "the engine stopped before this training wrote a checkpoint; resume starts "
                "it again",
            )

    # --- options --------------------------------------------------------------------------

    def options(self, local_client: bool) -> dict[str, Any]:
        models = []
        for entry in self.catalog.entries():
            trainable, why_not = trainability(entry)
            models.append(
                {"id": entry.id, "family": entry.family, "trainable": trainable, "why_not": why_not}
            )
        presets = [
            {
                **preset.settings(),
                "id": preset.id,
                "label": preset.label,
                "minutes_hint": preset.minutes.get(self.device_kind, preset.minutes["cpu"]),
            }
            for preset in PRESETS
        ]
        datasets = []
        if local_client:
            from engine.server.datasets import METADATA, count_pairs

            try:
                children = sorted(self.datasets_dir.iterdir())
            except OSError:
                children = []
            for child in children:
                if (child / METADATA).is_file():
                    datasets.append({"folder": str(child), "pairs": count_pairs(child)})
        return {
            "models": models,
            "presets": presets,
            "min_pairs": MIN_PAIRS,
            "max_dataset_mb": self.max_dataset_bytes // 2**20,
            "datasets": datasets,
            "device": self.device_kind,
        }

    # --- creating -------------------------------------------------------------------------

    def check_request(self, params: dict[str, Any]) -> tuple[str, ModelEntry, Preset, dict]:
        """Name, model, preset and settings of a create request (422 naming the field)."""
        if not isinstance(params, dict):
            raise ApiError(422, "the training parameters must be a JSON object", "params")
        known = {"name", "model", "preset", "overrides", "dataset_folder"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ApiError(
                422,
                f"unknown parameter {unknown[0]!r}; the parameters are {', '.join(sorted(known))}",
                unknown[0],
            )
        name = params.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or not name.strip():
            raise ApiError(
                422,
                "name must be 1 to 64 characters of letters, digits, space, _ . or -",
                "name",
            )
        if name.strip().startswith(".") or not re.search(r"[A-Za-z0-9]", name):
            raise ApiError(
                422, "name must contain a letter or digit and not start with a dot", "name"
            )
        model_id = params.get("model")
        if not isinstance(model_id, str) or not model_id:
            raise ApiError(422, "model is missing; GET /v1/training-options lists them", "model")
        try:
            entry = self.catalog.resolve_model(model_id)
        except InvalidInput as err:
            raise ApiError(422, err.message, "model") from err
        trainable, why_not = trainability(entry)
        if not trainable:
            raise ApiError(422, f"model {model_id!r} cannot be fine-tuned here: {why_not}", "model")
        # As for edits: a client does not make the server download weights, unless the
        # operator allowed it; the operator's own default model is theirs to fetch.
        downloads = bool(getattr(self.catalog, "allow_downloads", True))
        operators_model = entry.target == self.catalog.default_model
        if not (downloads or operators_model or self.catalog.is_available_locally(entry)):
            raise ApiError(
                422,
                f"model {entry.id!r} is not on the server's machine, and this server does not "
                f"download models for its clients; on the server run `hf download {entry.target}`, "
                "or restart it with --allow-downloads",
                "model",
            )
        preset = PRESETS_BY_ID.get(str(params.get("preset")))
        if preset is None:
            raise ApiError(
                422,
                f"unknown preset {params.get('preset')!r}; use one of {', '.join(PRESETS_BY_ID)}",
                "preset",
            )
        settings = preset.settings()
        runner = {
            "checkpoint_every": None,
            "validate_every": None,
            "gradient_checkpointing": preset.gradient_checkpointing,
            "validation_steps": 20,
            "local_files_only": not (downloads or operators_model),
        }
        overrides = params.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise ApiError(422, "overrides must be a JSON object", "overrides")
        for key, value in overrides.items():
            if key not in OVERRIDES:
                raise ApiError(
                    422,
                    f"overrides.{key} is not a setting; use {', '.join(OVERRIDES)}",
                    f"overrides.{key}",
                )
            target, kind, low, high = OVERRIDES[key]
            number_ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind is int and number_ok and float(value) != int(value):
                number_ok = False
            if not number_ok or not math.isfinite(value) or not low <= value <= high:
                raise ApiError(
                    422,
                    f"overrides.{key} must be a {'whole ' if kind is int else ''}number from "
                    f"{low:g} to {high:g} (got {value!r})",
                    f"overrides.{key}",
                )
            if key == "resolution" and int(value) % 8:
                raise ApiError(
                    422, "overrides.resolution must be a multiple of 8", "overrides.resolution"
                )
            (settings if target in settings else runner)[target] = kind(value)
        if entry.family in FLOW_FAMILIES and settings["resolution"] % 16:
            raise ApiError(
                422,
                f"{entry.family} models pack 16-pixel patches: the resolution must be a "
                f"multiple of 16 (got {settings['resolution']})",
                "overrides.resolution",
            )
        steps = settings["max_steps"]
        if runner["validate_every"] is None:
            runner["validate_every"] = max(1, steps // 4)  # four grids over the run
        if runner["checkpoint_every"] is None:
            # Often enough that a cancel or crash loses little; a LoRA checkpoint is small.
            runner["checkpoint_every"] = max(1, min(50, steps // 10))
        return name.strip(), entry, preset, {"settings": settings, "runner": runner}

    def ensure_none_running(self) -> None:
        with self._lock:
            running = [j for j in self._jobs.values() if j.state in ACTIVE_STATES]
            if running:
                busy = running[0] if running else None
                raise ApiError(
                    409,
                    "a training is already running"
                    + (f" ({busy.name!r}, id {busy.id})" if busy else "")
                    + "; one training runs at a time: wait for it, or cancel it first",
                    "id",
                )

    def check_memory_for(
        self, entry: ModelEntry, preset: Preset, settings: dict, runner: dict | None = None
    ) -> None:
        """Refuse a training that does not fit; for a flow family also choose the frozen
        base's precision (written into `runner`) from the free memory."""
        free, what = free_device_bytes(self.device_kind, self.device)
        weights = _weights_bytes(entry.target)
        if entry.family in FLOW_FAMILIES:
            plan, need = flow_plan(entry.family, weights, free, self.device_kind)
            if runner is not None:
                runner["base_quantization"] = plan
                runner["cache_conditioning"] = True  # the big text encoders run once per pair
            check_memory(need, free, what, preset.id)
            return
        need = memory_need_bytes(weights, settings, self.device_kind, preset.gradient_checkpointing)
        check_memory(need, free, what, preset.id)

    def new_job_folder(self) -> tuple[str, Path]:
        self.trainings_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            job_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
            folder = self.trainings_dir / job_id
            try:
                folder.mkdir()
                return job_id, folder
            except FileExistsError:
                continue
        raise ApiError(500, "could not create a training folder")

    def create(
        self,
        job_id: str,
        folder: Path,
        name: str,
        entry: ModelEntry,
        preset: Preset,
        sizes: dict[str, Any],
        dataset: Path,
        pairs: int,
    ) -> TrainingJob:
        """Record the job and start its runner (the dataset is already in `folder`)."""
        job = TrainingJob(
            id=job_id,
            folder=folder,
            name=name,
            model=entry.id,
            model_target=entry.target,
            family=entry.family,
            preset=preset.id,
            settings=sizes["settings"],
            runner={
                **sizes["runner"],
                "validation_count": min(4, pairs),
                # Validation shows pairs the training never saw: one in eight, 1 to 4.
                "holdout": max(1, min(4, pairs // 8)),
                "device": self.device,
            },
            pairs=pairs,
            dataset=dataset.relative_to(folder).as_posix(),
        )
        with self._lock:
            self.ensure_none_running()
            self._jobs[job.id] = job
            self._spawn(job, resume=False)
        return job

    # --- the runner process ---------------------------------------------------------------

    def _runner_env(self) -> dict[str, str]:
        env = dict(os.environ)
        root = Path(__file__).resolve().parents[2]
        if (root / "training").is_dir():
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        if self.device_kind == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the service was told to use the CPU
        elif self.device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = self.device.split(":", 1)[1]
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _spawn(self, job: TrainingJob, resume: bool) -> None:
        for path in (job.pause_file, job.stop_file):
            path.unlink(missing_ok=True)
        job.state = "running"
        job.error = job.error_field = None
        job.stop_reason = job.stop_requested_at = None
        job.final_event = None
        job.step_times = []
        job.started = _now()
        job.finished = None
        job.service_pid = os.getpid()
        job.runner["resume"] = resume
        self._save(job)  # the runner reads job.json: written before it starts
        with open(job.log_file, "ab") as log_file:
            log_file.write(f"--- {'resume' if resume else 'start'} {time.ctime()} ---\n".encode())
            log_file.flush()
            options: dict[str, Any] = {
                "stdout": log_file,
                "stderr": subprocess.STDOUT,
                "stdin": subprocess.DEVNULL,
                "cwd": str(job.folder),
                "env": self._runner_env(),
            }
            if os.name == "posix":
                options["start_new_session"] = True  # its own process group, killed as one
            else:  # pragma: no cover - Windows
                options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
            try:
                job.process = subprocess.Popen(
                    [self.python, "-m", RUNNER_MODULE, str(job.job_file)], **options
                )
            except OSError as err:
                job.process = None
                self._set_state(job, "failed", f"the training process did not start: {err}")
                raise ApiError(500, f"the training process did not start: {err}") from err
        job.runner_pid = job.process.pid
        self._save(job)
        self._touch(job)

    def _monitor(self) -> None:
        while not self._stopping.wait(POLL_S):
            try:
                self._tick()
            except Exception:  # the monitor must survive anything one job does
                log.exception("training monitor")

    def _tick(self) -> None:
        stats = self.queue.stats()
        edits_busy = stats.get("queued", 0) + stats.get("running", 0) > 0
        with self._lock:
            active = [job for job in self._jobs.values() if job.process is not None]
        for job in active:
            # Device sharing: edits first; the runner waits between steps while the file exists.
            if edits_busy:
                if not job.pause_file.exists():
                    with contextlib.suppress(OSError):
                        job.pause_file.write_text("edits are running\n")
            else:
                job.pause_file.unlink(missing_ok=True)
            with self._lock:
                self._read_events(job)
                assert job.process is not None
                if job.process.poll() is not None:
                    self._read_events(job)
                    self._finish_process(job)
                elif (
                    job.stop_requested_at is not None
                    and time.monotonic() - job.stop_requested_at > STOP_GRACE_S
                ):
                    _terminate_group(job.process.pid)

    def _read_events(self, job: TrainingJob) -> None:
        try:
            with open(job.events_file, "rb") as handle:
                handle.seek(job.events_offset)
                chunk = handle.read()
        except OSError:
            return
        if not chunk:
            return
        job.events_offset += len(chunk)
        data = job.events_partial + chunk
        lines = data.split(b"\n")
        job.events_partial = lines.pop()  # an unfinished last line waits for its end
        changed = False
        for line in lines:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                changed |= self._apply(job, event)
        if changed:
            self._touch(job)

    def _apply(self, job: TrainingJob, event: dict[str, Any]) -> bool:
        kind = event.get("event")
        if kind == "started":
            job.step_times = []
            job.final_event = None
            return False
        if kind == "progress":
            try:
                step, loss = int(event["step"]), float(event["loss"])
            except (KeyError, TypeError, ValueError):
                return False
            # A resumed run repeats the steps after its checkpoint: they replace the old ones.
            while job.loss and job.loss[-1][0] >= step:
                job.loss.pop()
            job.loss.append((step, loss))
            job.step = step
            job.step_times.append((step, float(event.get("time") or _now())))
            del job.step_times[:-ETA_WINDOW]
            return True
        if kind == "validation":
            step, path = int(event.get("step") or 0), str(event.get("path") or "")
            job.validations = [v for v in job.validations if v[0] != step]
            job.validations.append((step, path))
            job.validations.sort()
            return True
        if kind in ("paused", "resumed"):
            if job.state in ("running", "paused") and job.process is not None:
                job.state = "paused" if kind == "paused" else "running"
                job.step_times = []  # a pause is no part of the pace
                return True
            return False
        if kind in ("done", "failed", "stopped", "interrupted"):
            job.final_event = event
            return False
        return False

    def _finish_process(self, job: TrainingJob, shutting_down: bool = False) -> None:
        """The runner ended: decide the job's state from its last event and the stop reason."""
        process = job.process
        if process is None:
            return
        code = process.poll()
        job.process = None
        job.pause_file.unlink(missing_ok=True)
        job.stop_file.unlink(missing_ok=True)
        job.finished = _now()
        final = job.final_event or {}
        kind = final.get("event")
        if kind == "done":
            self._register(job, Path(str(final.get("weights", ""))))
        elif kind == "failed":
            self._set_state(job, "failed", final.get("message"), final.get("field"))
        elif job.stop_reason == "cancel":
            self._set_state(
                job, "cancelled", "cancelled; resume continues from the last checkpoint"
            )
        elif job.stop_reason == "shutdown" or shutting_down or kind == "interrupted":
            self._set_state(
                job, "interrupted", "the engine stopped while this training ran; resume it"
            )
        else:
            tail = _log_tail(job.log_file)
            self._set_state(
                job,
                "failed",
                f"the training process ended unexpectedly (exit code {code}); the last lines of "
                f"its log ({job.log_file}):\n{tail}",
            )

    def _register(self, job: TrainingJob, weights: Path) -> None:
        """Copy the finished LoRA into `<data-dir>/loras/trained/<name>/` (a new folder: a name
        in use gets -2, -3 …) with its model card; the job is done."""
        if not weights.is_absolute():
            weights = job.folder / weights
        if not weights.is_file():
            self._set_state(job, "failed", f"the training ended but its LoRA {weights} is missing")
            return
        trained = self.loras_dir / "trained"
        base = lora_folder_name(job.name)
        try:
            trained.mkdir(parents=True, exist_ok=True)
            for number in range(1, 10_000):
                candidate = base if number == 1 else f"{base}-{number}"
                try:
                    (trained / candidate).mkdir()
                    break
                except FileExistsError:
                    continue
            folder = trained / candidate
            partial = folder / f".{LORA_FILE}.part"
            shutil.copyfile(weights, partial)
            os.replace(partial, folder / LORA_FILE)
            relative = (folder / LORA_FILE).relative_to(self.loras_dir).as_posix()
            job.lora = {"path": relative, "card": ""}
            job.state = "done"
            card = model_card(job, self.device)
            (folder / "README.md").write_text(card, encoding="utf-8")
            job.lora["card"] = card
        except OSError as err:
            self._set_state(
                job,
                "failed",
                f"the training finished but its LoRA could not be saved to {trained} ({err}); "
                f"the file is still at {weights}",
            )
            return
        self._set_state(job, "done")

    # --- client operations ----------------------------------------------------------------

    def get(self, job_id: str) -> TrainingJob:
        with self._lock:
            job = self._jobs.get(job_id) if ID_PATTERN.fullmatch(job_id) else None
        if job is None:
            raise ApiError(
                404, f"no training with id {job_id!r}; GET /v1/trainings lists them", "id"
            )
        return job

    def list(self) -> list[TrainingJob]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda job: job.created, reverse=True)

    def cancel(self, job_id: str) -> TrainingJob:
        job = self.get(job_id)
        with self._lock:
            if job.process is not None and job.stop_reason is None:
                job.stop_reason = "cancel"
                job.stop_requested_at = time.monotonic()
                try:
                    job.stop_file.write_text("cancel\n")
                except OSError:
                    _terminate_group(job.process.pid)
                self._touch(job)
        return job

    def wait_finished(self, job: TrainingJob, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if job.process is None:
                    return
            time.sleep(0.05)

    def resume(self, job_id: str) -> TrainingJob:
        job = self.get(job_id)
        with self._lock:
            if job.state not in ("interrupted", "cancelled", "failed"):
                raise ApiError(
                    409,
                    f"training {job.id} is {job.state}; only an interrupted, cancelled or failed "
                    "one can be resumed",
                    "id",
                )
            if job.state == "failed" and not job.has_checkpoint():
                raise ApiError(
                    409,
                    f"training {job.id} failed before writing a checkpoint; start a new one",
                    "id",
                )
            self.ensure_none_running()
            entry = self.catalog.resolve_model(job.model) if job.model else None
            if entry is not None and entry.target != job.model_target:
                job.model_target = entry.target
        preset = PRESETS_BY_ID.get(job.preset, PRESETS[0])
        if entry is not None:
            self.check_memory_for(entry, preset, job.settings, job.runner)
        with self._lock:
            self.ensure_none_running()
            self._spawn(job, resume=True)
        return job

    def validation_path(self, job_id: str, index: int) -> Path:
        job = self.get(job_id)
        with self._lock:
            validations = list(job.validations)
        if not 0 <= index < len(validations):
            raise ApiError(
                404,
                f"training {job.id} has {len(validations)} validation image(s); there is no "
                f"index {index}",
                "index",
            )
        path = Path(validations[index][1])
        if not path.is_absolute():
            path = job.folder / path
        if not path.resolve().is_relative_to(job.folder.resolve()) or not path.is_file():
            raise ApiError(404, f"validation image {index} of training {job.id} is gone", "index")
        return path

    # --- state and listeners --------------------------------------------------------------

    def status(self, job: TrainingJob) -> dict[str, Any]:
        with self._lock:
            return {
                "id": job.id,
                "name": job.name,
                "model": job.model,
                "preset": job.preset,
                "settings": dict(job.settings),
                "pairs": job.pairs,
                "state": job.state,
                "step": job.step,
                "max_steps": job.max_steps,
                "loss": thin(job.loss),
                "eta_s": job.eta_s(),
                "validations": [
                    {"step": step, "index": index}
                    for index, (step, _path) in enumerate(job.validations)
                ],
                "error": job.error,
                "field": job.error_field,
                "lora": dict(job.lora) if job.lora else None,
                "created": job.created,
                "updated": job.updated,
                "resumable": job.state in ("interrupted", "cancelled", "failed")
                and (job.state != "failed" or job.has_checkpoint()),
                "cancel_requested": job.stop_reason == "cancel" and job.process is not None,
            }

    def add_listener(self, job: TrainingJob, callback: Callable[[], None]) -> None:
        with self._lock:
            job.listeners.append(callback)

    def remove_listener(self, job: TrainingJob, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in job.listeners:
                job.listeners.remove(callback)

    def _set_state(
        self, job: TrainingJob, state: str, error: str | None = None, at: str | None = None
    ) -> None:
        job.state = state
        job.error, job.error_field = error, at
        if state in FINAL_STATES and job.finished is None:
            job.finished = _now()
        self._save(job)
        self._touch(job)

    def _save(self, job: TrainingJob) -> None:
        job.updated = _now()
        try:
            _write_json_atomic(job.job_file, job.stored())
        except OSError as err:  # e.g. a full disk: the state stays right in memory
            log.warning("cannot write %s: %s", job.job_file, err)

    def _touch(self, job: TrainingJob) -> None:
        job.version += 1
        job.updated = _now()
        for callback in list(job.listeners):
            with contextlib.suppress(Exception):
                callback()
