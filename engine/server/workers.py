"""One worker thread per device: takes jobs from the queue, keeps loaded models, runs edits.

A worker never dies of a job: every failure ends that job `failed` with a message. CUDA
out-of-memory (after the Editor's own smaller batches and memory savers) gets one more try
with every other model unloaded and the allocator's caches emptied, then fails with advice.

Two things do end a worker, on purpose: a fatal device error (an illegal memory access, a
device-side assert: after one, every later CUDA call in the process fails too), and anything
that escapes its loop. The pool's supervisor then reports the dead worker (`/v1/health`
`workers`) and calls `on_fatal`, with which `instruct-edit serve` exits non-zero so that
whoever manages it (the Krita plugin) starts a fresh process.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from engine.devices import free_memory, is_out_of_memory
from engine.errors import EditCancelled, EngineError, OutOfMemory
from engine.request import EditParams
from engine.server.catalog import ModelEntry
from engine.server.images import thumbnail_base64
from engine.server.jobs import Job, JobQueue, StoredResult
from engine.server.settings import PREVIEW_MAX_SIDE, ServerSettings

log = logging.getLogger(__name__)

# How often a job waiting for its model checks whether it was cancelled, and how often the
# supervisor looks at the workers.
LOAD_CANCEL_POLL_S = 0.05
SUPERVISE_INTERVAL_S = 0.25

# What CUDA reports after an error that poisons the context: the process cannot use the GPU
# again (every later call fails), so the service must restart rather than fail edit after edit.
FATAL_DEVICE_ERRORS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "uncorrectable ecc error",
    "cuda error: an illegal",
    "cudaerrorlaunchfailure",
    "cublas_status_execution_failed",
)


def is_fatal_device_error(err: BaseException) -> bool:
    """A device error after which the process's GPU context is unusable (by message: CUDA
    raises these as RuntimeError, or torch.AcceleratorError on newer torch)."""
    if is_out_of_memory(err):
        return False
    text = str(err).lower()
    accelerator_error = type(err).__name__ in ("AcceleratorError", "CudaError")
    return any(sign in text for sign in FATAL_DEVICE_ERRORS) or (
        accelerator_error and "cuda" in text
    )


class FatalDeviceError(Exception):
    """Raised inside a worker to end it after a fatal device error."""


class EditorLike(Protocol):
    """What the service needs of `engine.editor.Editor` (tests inject fast fakes). An editor
    whose `edit` takes `on_variant` hands each finished variant over as it is produced (the
    worker stores it as 8-bit pixels at once) and returns an empty list."""

    def edit(
        self,
        image: Image.Image,
        params: EditParams,
        mask: Image.Image | None = None,
        *,
        on_progress: Callable[[Any], None] | None = None,
        cancel: threading.Event | None = None,
        preview_every: int = 0,
    ) -> list[Image.Image]: ...


# (model target: a hub id or an absolute path, device) -> a loaded editor
EditorFactory = Callable[[str, str], EditorLike]

# diffusers/accelerate load weights inside context managers that patch torch globally
# (`init_empty_weights`); two loads at once in one process corrupt each other ("Cannot copy
# out of meta tensor"). Workers on several devices therefore load one at a time.
_LOAD_LOCK = threading.Lock()


def real_editor_factory(settings: ServerSettings) -> EditorFactory:
    def make(model: str, device: str) -> EditorLike:
        from engine.editor import Editor
        from engine.sources import load_policy

        # Only the operator's own --model may be fetched from the hub unless downloads are
        # allowed (the catalogue refuses such requests first; this is the backstop).
        with load_policy(allow_downloads=settings.allow_downloads or model == settings.model):
            return Editor(
                model,
                device=device,
                dtype=settings.dtype,
                runtime=settings.runtime,
                compile=settings.compile,
                allow_pickle=settings.allow_pickle,
                memory_plan=settings.memory_plan,
                quantization=settings.quantization,
                max_loras_loaded=settings.max_loras_loaded,
            )

    return make


@dataclass
class LoadRecord:
    model: str
    device: str
    state: str  # loading | ready | failed
    started: float
    finished: float | None = None
    error: str | None = None

    def elapsed_s(self, now: float) -> float:
        return (self.finished or now) - self.started


class _Load(threading.Thread):
    """One model load in its own thread, so that the edit waiting for it can stop waiting when
    it is cancelled. `from_pretrained` cannot be interrupted: a load nobody waits for any more
    runs to its end (holding the load lock meanwhile, so loads never overlap) and its model is
    then dropped, not cached; its memory returns when the thread ends."""

    def __init__(self, factory: EditorFactory, target: str, device: str) -> None:
        super().__init__(name=f"instruct-edit-load-{device}", daemon=True)
        self.factory, self.target, self.device = factory, target, device
        self.editor: EditorLike | None = None
        self.error: BaseException | None = None
        self.abandoned = threading.Event()
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            with _LOAD_LOCK:
                if self.abandoned.is_set():
                    return  # cancelled while waiting for another load: never started
                editor = self.factory(self.target, self.device)
            if not self.abandoned.is_set():
                self.editor = editor
            del editor  # abandoned: dropped here, with the thread
        except BaseException as err:  # handed to the waiting worker
            self.error = err
        finally:
            self.finished.set()


class DeviceWorker(threading.Thread):
    def __init__(
        self,
        device: str,
        queue: JobQueue,
        factory: EditorFactory,
        default_model: ModelEntry | None,
        max_loaded_models: int,
    ) -> None:
        super().__init__(name=f"instruct-edit-worker-{device}", daemon=True)
        self.device = device
        self.queue = queue
        self.factory = factory
        self.default_model = default_model
        self.max_loaded_models = max(1, max_loaded_models)
        self._editors: OrderedDict[str, EditorLike] = OrderedDict()
        self._editors_lock = threading.Lock()
        self.loads: list[LoadRecord] = []
        self._stop_requested = threading.Event()
        self.busy = False
        self.current_job: Job | None = None
        # Why this worker stopped for good (a fatal device error, or an escaped exception).
        self.fatal: str | None = None

    # --- state for /v1/health ---------------------------------------------------------------

    def loaded_models(self) -> list[str]:
        with self._editors_lock:
            return list(self._editors)

    def memory_report(self) -> dict[str, Any] | None:
        """The most recently used loaded editor's memory report ({device, plan, free_bytes,
        total_bytes, quantization}: `Editor.memory_report()`), None when none is loaded or it
        has none."""
        with self._editors_lock:
            editors = list(self._editors.values())
        for editor in reversed(editors):
            report = getattr(editor, "memory_report", None)
            if callable(report):
                return dict(report())
        return None

    @property
    def alive(self) -> bool:
        """Started and still running (a worker not started yet counts as alive)."""
        return self.fatal is None and (self.ident is None or self.is_alive())

    def state(self) -> dict[str, Any]:
        job = self.current_job
        error = self.fatal
        if error is None and not self.alive:
            error = "the worker thread ended"
        return {
            "device": self.device,
            "alive": self.alive,
            "busy": self.busy,
            "job": job.id if job is not None else None,
            "error": error,
        }

    def stop(self) -> None:
        self._stop_requested.set()

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # recorded for the supervisor, which ends the service
            self.fatal = self.fatal or f"{type(err).__name__}: {err}"
            # The supervisor reports it (once, as the service's error line); the trace is here.
            log.debug("the worker on %s stopped: %s", self.device, self.fatal, exc_info=True)
        finally:
            self.busy = False

    def _loop(self) -> None:
        if self.default_model is not None:
            self.busy = True  # loading
            try:
                self._editor(self.default_model.target)
            except Exception as err:  # reported in health and again by the first job that needs it
                if is_fatal_device_error(err):
                    raise FatalDeviceError(str(err)) from err
                log.warning(
                    "could not load %s on %s: %s", self.default_model.target, self.device, err
                )
            finally:
                self.busy = False
        while not self._stop_requested.is_set():
            job = self.queue.next_job(timeout=0.5)
            if job is None:
                continue
            self.busy, self.current_job = True, job
            try:
                self._run(job)
            except FatalDeviceError:
                raise
            except Exception as err:  # the worker must outlive any job
                log.exception("job %s crashed the worker loop", job.id)
                self.queue.finish_failed(job, f"internal error: {type(err).__name__}: {err}")
            except BaseException as err:  # ends the worker: the job must not stay "running"
                if not job.state.finished:
                    self.queue.finish_failed(
                        job,
                        f"the engine's worker on {self.device} stopped ({type(err).__name__}); "
                        "the engine must be restarted, then send the edit again",
                    )
                raise
            finally:
                self.busy, self.current_job = False, None

    def _run(self, job: Job) -> None:
        produced: list[StoredResult] = []
        try:
            results = self._edit_with_oom_retries(job, produced)
        except EditCancelled:
            self.queue.finish_cancelled(job)
            return
        except EngineError as err:
            self.queue.finish_failed(job, err.message, err.field)
            return
        except Exception as err:
            if is_fatal_device_error(err):
                self.fatal = f"fatal device error on {self.device}: {err}"
                self.queue.finish_failed(
                    job,
                    f"the device {self.device} reported a fatal error ({str(err)[:200]}); the "
                    "engine restarts to recover, send the edit again",
                )
                raise FatalDeviceError(str(err)) from err
            log.exception("edit %s failed", job.id)
            self.queue.finish_failed(job, f"the edit failed: {type(err).__name__}: {err}")
            return
        if job.cancel.is_set():
            self.queue.finish_cancelled(job)
            return
        # Kept as 8-bit pixels; PNG or raw is encoded when a client asks (GET …/results/k).
        produced.extend(StoredResult(image) for image in results)
        self.queue.finish_done(job, produced)

    def _edit_with_oom_retries(self, job: Job, produced: list[StoredResult]) -> list[Image.Image]:
        # The Editor itself already halves its batch and switches memory savers on when it runs
        # out of memory; what only the service can do is unload its other models.
        target = job.model.target
        try:
            return self._edit(job, self._editor(target, job), produced)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            if len(self.loaded_models()) <= 1:
                raise OutOfMemory(self._oom_advice(job), field="resolution") from err
            log.warning(
                "out of memory on %s for edit %s; unloading other models", self.device, job.id
            )
        self._drop_editors(keep=target)
        free_memory()
        try:
            return self._edit(job, self._editor(target, job), produced)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            free_memory()
            raise OutOfMemory(self._oom_advice(job), field="resolution") from err

    def _oom_advice(self, job: Job) -> str:
        now = job.params.resolution or "the model's default"
        return (
            f"out of memory on {self.device} even one variant at a time with every memory saver on "
            f"and no other model loaded; try a smaller resolution (now {now}), a lighter "
            "--memory-plan or --quantization, or close other programs using the GPU"
        )

    def _edit(
        self, job: Job, editor: EditorLike, produced: list[StoredResult]
    ) -> list[Image.Image]:
        if job.cancel.is_set():
            raise EditCancelled()
        assert job.image is not None

        def on_progress(progress: Any) -> None:
            preview = getattr(progress, "preview", None)
            thumb = thumbnail_base64(preview, PREVIEW_MAX_SIDE) if preview is not None else None
            note = getattr(progress, "note", None)
            self.queue.report_progress(job, progress.step, progress.total, thumb, note)

        extra: dict[str, Any] = {}
        if _takes_on_variant(editor):
            # Each variant is stored as 8-bit pixels the moment it is finished, instead of
            # all of them being held until the last one is done.
            del produced[:]  # a retry after out-of-memory starts again

            def on_variant(_index: int, image: Image.Image) -> None:
                produced.append(StoredResult(image))

            extra["on_variant"] = on_variant
        return editor.edit(
            job.image,
            job.params,
            job.mask,
            on_progress=on_progress,
            cancel=job.cancel,
            preview_every=job.preview_every,
            **extra,
        )

    # --- the per-device model cache -----------------------------------------------------------

    def _editor(self, target: str, job: Job | None = None) -> EditorLike:
        """The loaded editor of `target`, loading it when needed. While it loads, `job`'s
        cancel is honoured (EditCancelled; the load is abandoned, see `_Load`). The least
        recently used model is evicted only once the new one has loaded: a failed load keeps
        every loaded model (unless it failed for lack of memory, when the others are unloaded
        and the load tried once more)."""
        with self._editors_lock:
            if target in self._editors:
                self._editors.move_to_end(target)
                return self._editors[target]
        record = LoadRecord(
            model=target, device=self.device, state="loading", started=time.monotonic()
        )
        self.loads.append(record)
        del self.loads[:-10]
        try:
            try:
                editor = self._load(target, job)
            except Exception as err:
                if not is_out_of_memory(err) or not self.loaded_models():
                    raise
                log.warning("out of memory loading %s; unloading the other models", target)
                self._drop_editors(keep=None)
                free_memory()
                editor = self._load(target, job)
        except EditCancelled:
            record.state, record.finished = "failed", time.monotonic()
            record.error = "cancelled: the edit waiting for it was cancelled"
            raise
        except Exception as err:
            record.state, record.finished = "failed", time.monotonic()
            record.error = (
                err.message if isinstance(err, EngineError) else f"{type(err).__name__}: {err}"
            )
            raise
        record.state, record.finished = "ready", time.monotonic()
        with self._editors_lock:
            self._editors[target] = editor
            evicted = False
            while len(self._editors) > self.max_loaded_models:
                self._editors.popitem(last=False)
                evicted = True
        if evicted:
            # Model modules hold reference cycles; collect them now rather than at random.
            free_memory()
        return editor

    def _load(self, target: str, job: Job | None) -> EditorLike:
        load = _Load(self.factory, target, self.device)
        load.start()
        while not load.finished.wait(LOAD_CANCEL_POLL_S):
            if job is not None and job.cancel.is_set():
                load.abandoned.set()
                raise EditCancelled()
        if load.error is not None:
            raise load.error
        assert load.editor is not None
        return load.editor

    def _drop_editors(self, keep: str | None) -> None:
        with self._editors_lock:
            for key in list(self._editors):
                if key != keep:
                    del self._editors[key]


def _takes_on_variant(editor: EditorLike) -> bool:
    try:
        return "on_variant" in inspect.signature(editor.edit).parameters
    except (TypeError, ValueError):
        return False


class WorkerPool:
    """The device workers. `start`/`stop` nest (each app lifespan is one user), so an app run
    by a server and also entered by a test client keeps one set of workers; a stopped pool can
    start again with fresh threads (loaded models are then loaded again).

    A supervisor thread watches the workers while the pool runs: the first one that dies (or
    meets a fatal device error) is logged and passed to `on_fatal` (set by `instruct-edit
    serve` to exit non-zero), once."""

    def __init__(
        self,
        settings: ServerSettings,
        queue: JobQueue,
        factory: EditorFactory,
        default_model: ModelEntry | None,
    ) -> None:
        self.queue = queue
        self._make_workers = lambda: [
            DeviceWorker(device, queue, factory, default_model, settings.max_loaded_models)
            for device in settings.devices
        ]
        self.workers: list[DeviceWorker] = self._make_workers()
        self._users = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.on_fatal: Callable[[str], None] | None = None
        self.failure: str | None = None
        queue.workers = len(self.workers)

    def start(self) -> None:
        with self._lock:
            self._users += 1
            if self._users > 1:
                return
            if any(worker.ident is not None for worker in self.workers):
                self.workers = self._make_workers()
            self.queue.reopen()
            self._stopping.clear()
            self.failure = None
            for worker in self.workers:
                worker.start()
            self._supervisor = threading.Thread(
                target=self._supervise, name="instruct-edit-supervisor", daemon=True
            )
            self._supervisor.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users > 0:
                return
            self._stopping.set()
            for worker in self.workers:
                worker.stop()
            self.queue.close()
            deadline = time.monotonic() + timeout
            for worker in self.workers:
                if worker.is_alive():
                    worker.join(max(0.0, deadline - time.monotonic()))

    def check(self) -> str | None:
        """Why a worker is gone, or None when all are alive."""
        for worker in self.workers:
            if not worker.alive:
                return (
                    f"the worker on {worker.device} stopped: "
                    f"{worker.fatal or 'its thread ended unexpectedly'}"
                )
        return None

    def _supervise(self) -> None:
        while not self._stopping.wait(SUPERVISE_INTERVAL_S):
            reason = self.check()
            if reason is None or self._stopping.is_set():
                continue
            self.failure = reason
            if self.on_fatal is None:
                log.critical("%s; restart the service", reason)
            else:  # it reports the reason itself
                try:
                    self.on_fatal(reason)
                except Exception:  # the supervisor must report, not crash
                    log.exception("on_fatal failed")
            return

    def worker_states(self) -> list[dict[str, Any]]:
        return [worker.state() for worker in self.workers]

    def loaded_models(self) -> list[str]:
        seen: dict[str, None] = {}
        for worker in self.workers:
            for target in worker.loaded_models():
                seen[target] = None
        return list(seen)

    def load_records(self) -> list[LoadRecord]:
        return [record for worker in self.workers for record in list(worker.loads)]
