"""One training job of the engine service: `python -m training.job_runner JOB_JSON`.

The service (engine/server/trainings.py) writes `job.json` and starts this in a process of its
own; this builds a `TrainConfig`, calls `train()` and reports through `events.jsonl` next to
job.json, one JSON object a line:

    {"event": "started", "pid", "resume", "time"}
    {"event": "progress", "step", "max_steps", "loss", "time"}
    {"event": "validation", "step", "path"}        (a grid in output/validation/)
    {"event": "paused"|"resumed", "step", "time"}  (edits had the device)
    {"event": "done", "weights", "step"}
    {"event": "stopped", "step"}                   (the stop file asked for it)
    {"event": "interrupted", "step"}               (the service is gone)
    {"event": "failed", "message", "field"}

Between two steps it looks at two files next to job.json: `pause` (exists: wait) and `stop`
(exists: end now; the last checkpoint stays for a resume). It also ends when the service that
started it is gone, so an orphaned training does not hold the device.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from training.train_loop import StopTraining

PAUSE_POLL_S = 0.2


class StopRequested(StopTraining):
    """The stop file appeared: end the run after this step (train() checkpoints it first)."""


class ServiceGone(StopTraining):
    """The service that started this runner ended (checkpointed too: resume continues here)."""


def service_alive(pid: int | None) -> bool:
    if not pid:
        return True
    if os.name == "posix":
        # Our parent is the service; when it dies we are re-parented.
        return os.getppid() == pid
    from engine.server.cli import pid_alive  # Windows: os.kill(pid, 0) would end the process

    return pid_alive(pid)  # pragma: no cover - Windows


class Events:
    """Appends events to events.jsonl, one flushed line each (the service tails the file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}, separators=(",", ":"), default=str)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()


def build_config(job: dict[str, Any], folder: Path) -> Any:
    import torch

    from training.train_loop import TrainConfig

    settings, runner = job["settings"], job.get("runner") or {}
    cuda = torch.cuda.is_available()
    # fp32 on a CPU (and MPS): 16-bit autocast there is slow or unsupported.
    precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    return TrainConfig(
        data=str(folder / job.get("dataset", "data")),
        model=str(job.get("model_target") or job["model"]),
        output=folder / "output",
        data_format="pairs",
        lora_rank=int(settings["lora_rank"]),
        max_steps=int(settings["max_steps"]),
        resolution=int(settings["resolution"]),
        batch_size=int(settings["batch_size"]),
        grad_accum=int(settings["grad_accum"]),
        lr=float(settings["learning_rate"]),
        # Always --resume: a first run finds no checkpoint and starts at step 0; a run after
        # a cancel, crash or restart continues from the last one.
        resume=True,
        checkpoint_every=int(runner.get("checkpoint_every") or 50),
        keep_checkpoints=2,
        validate_every=int(runner.get("validate_every") or 0),
        validation_count=int(runner.get("validation_count") or 4),
        holdout=int(runner.get("holdout") or 0),
        validation_steps=int(runner.get("validation_steps") or 20),
        mixed_precision=precision,
        gradient_checkpointing=bool(runner.get("gradient_checkpointing")) and cuda,
        # Flow families: the engine chose the frozen base's precision from the free memory.
        base_quantization=str(runner.get("base_quantization") or "none"),
        cache_conditioning=bool(runner.get("cache_conditioning")),
        local_files_only=bool(runner.get("local_files_only")),
        progress=False,
    )


class StepHook:
    """`on_step_end`: report progress and new validation grids, honour pause and stop."""

    def __init__(self, folder: Path, events: Events, max_steps: int, service_pid: int | None):
        self.folder = folder
        self.events = events
        self.max_steps = max_steps
        self.service_pid = service_pid
        self.validation_dir = folder / "output" / "validation"
        self.seen: set[str] = set()
        self.step = 0

    def __call__(self, step: int, loss: float) -> None:
        self.step = step
        self.events.write(
            "progress", step=step, max_steps=self.max_steps, loss=loss, time=time.time()
        )
        self.report_validations()
        self.between_steps()

    def report_validations(self) -> None:
        try:
            grids = sorted(self.validation_dir.glob("step-*.png"))
        except OSError:
            return
        for grid in grids:
            key = f"{grid.name}:{grid.stat().st_mtime_ns}"
            if key in self.seen:
                continue
            self.seen.add(key)
            step = int(grid.stem.split("-")[1])
            self.events.write(
                "validation", step=step, path=grid.relative_to(self.folder).as_posix()
            )

    def between_steps(self) -> None:
        pause, stop = self.folder / "pause", self.folder / "stop"
        paused = False
        while True:
            if stop.exists():
                raise StopRequested()
            if not service_alive(self.service_pid):
                raise ServiceGone()
            if not pause.exists():
                break
            if not paused:
                paused = True
                self.events.write("paused", step=self.step, time=time.time())
            time.sleep(PAUSE_POLL_S)
        if paused:
            self.events.write("resumed", step=self.step, time=time.time())


def failure_message(err: BaseException, step: int) -> tuple[str, str | None]:
    import torch

    from engine.errors import InvalidInput

    kept = "; the last checkpoint is kept, so the training can be resumed"
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        return (
            f"out of memory at step {step}: choose a smaller preset or a lower resolution, or "
            f"close programs using the GPU{kept}",
            "preset",
        )
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return (
            f"the disk is full ({err.filename or 'while writing'}): free some space{kept}",
            None,
        )
    if isinstance(err, InvalidInput):
        return err.message, err.field
    return f"{type(err).__name__}: {err}{kept if step else ''}", None


def run(job_file: Path) -> int:
    folder = job_file.parent
    job = json.loads(job_file.read_text(encoding="utf-8"))
    events = Events(folder / "events.jsonl")
    service_pid = job.get("service_pid")
    events.write(
        "started", pid=os.getpid(), resume=bool((job.get("runner") or {}).get("resume")),
        time=time.time(),
    )  # fmt: skip
    hook: StepHook | None = None
    try:
        from training.train_loop import train

        config = build_config(job, folder)
        hook = StepHook(folder, events, config.max_steps, service_pid)
        result = train(config, on_step_end=hook, report=lambda text: print(text, flush=True))
        hook.report_validations()
        events.write("done", weights=str(Path(result.weights).resolve()), step=result.step)
        return 0
    except StopRequested:
        events.write("stopped", step=hook.step if hook else 0)
        return 0
    except ServiceGone:
        events.write("interrupted", step=hook.step if hook else 0)
        return 0
    except BaseException as err:  # everything ends as an event the service can show
        traceback.print_exc()
        message, field = failure_message(err, hook.step if hook else 0)
        events.write("failed", message=message, field=field)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m training.job_runner JOB_JSON", file=sys.stderr)
        return 2
    return run(Path(args[0]).resolve())


if __name__ == "__main__":
    sys.exit(main())
