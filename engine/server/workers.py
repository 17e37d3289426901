"""One worker thread per device: takes jobs from the queue, keeps loaded models, runs edits.

A worker never dies of a job: every failure ends that job `failed` with a message. CUDA
out-of-memory (after the Editor's own smaller batches and memory savers) gets one more try
with every other model unloaded and the allocator's caches emptied, then fails with advice.
"""

from __future__ import annotations

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


class EditorLike(Protocol):
    """What the service needs of `engine.editor.Editor` (tests inject fast fakes)."""

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

        return Editor(
            model,
            device=device,
            dtype=settings.dtype,
            allow_pickle=settings.allow_pickle,
            memory_plan=settings.memory_plan,
            quantization=settings.quantization,
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

    def stop(self) -> None:
        self._stop_requested.set()

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        if self.default_model is not None:
            try:
                self._editor(self.default_model.target)
            except Exception as err:  # reported in health and again by the first job that needs it
                log.warning(
                    "could not load %s on %s: %s", self.default_model.target, self.device, err
                )
        while not self._stop_requested.is_set():
            job = self.queue.next_job(timeout=0.5)
            if job is None:
                continue
            self.busy = True
            try:
                self._run(job)
            except Exception as err:  # the worker must outlive any job
                log.exception("job %s crashed the worker loop", job.id)
                self.queue.finish_failed(job, f"internal error: {type(err).__name__}: {err}")
            finally:
                self.busy = False

    def _run(self, job: Job) -> None:
        try:
            results = self._edit_with_oom_retries(job)
        except EditCancelled:
            self.queue.finish_cancelled(job)
            return
        except EngineError as err:
            self.queue.finish_failed(job, err.message, err.field)
            return
        except Exception as err:
            log.exception("edit %s failed", job.id)
            self.queue.finish_failed(job, f"the edit failed: {type(err).__name__}: {err}")
            return
        if job.cancel.is_set():
            self.queue.finish_cancelled(job)
            return
        # Kept as pixels; PNG or raw is encoded when a client asks (GET …/results/k).
        self.queue.finish_done(job, [StoredResult(image) for image in results])

    def _edit_with_oom_retries(self, job: Job) -> list[Image.Image]:
        # The Editor itself already halves its batch and switches memory savers on when it runs
        # out of memory; what only the service can do is unload its other models.
        target = job.model.target
        try:
            return self._edit(job, self._editor(target))
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
            return self._edit(job, self._editor(target))
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

    def _edit(self, job: Job, editor: EditorLike) -> list[Image.Image]:
        if job.cancel.is_set():
            raise EditCancelled()
        assert job.image is not None

        def on_progress(progress: Any) -> None:
            preview = getattr(progress, "preview", None)
            thumb = thumbnail_base64(preview, PREVIEW_MAX_SIDE) if preview is not None else None
            self.queue.report_progress(job, progress.step, progress.total, thumb)

        return editor.edit(
            job.image,
            job.params,
            job.mask,
            on_progress=on_progress,
            cancel=job.cancel,
            preview_every=job.preview_every,
        )

    # --- the per-device model cache -----------------------------------------------------------

    def _editor(self, target: str) -> EditorLike:
        with self._editors_lock:
            if target in self._editors:
                self._editors.move_to_end(target)
                return self._editors[target]
        record = LoadRecord(
            model=target, device=self.device, state="loading", started=time.monotonic()
        )
        self.loads.append(record)
        del self.loads[:-10]
        # Make room first: the least recently used model goes before a new one loads.
        with self._editors_lock:
            evicted = False
            while len(self._editors) >= self.max_loaded_models:
                self._editors.popitem(last=False)
                evicted = True
        if evicted:
            # Model modules hold reference cycles; collect them before the new weights arrive.
            free_memory()
        try:
            with _LOAD_LOCK:
                editor = self.factory(target, self.device)
        except Exception as err:
            record.state, record.finished = "failed", time.monotonic()
            record.error = (
                err.message if isinstance(err, EngineError) else f"{type(err).__name__}: {err}"
            )
            raise
        record.state, record.finished = "ready", time.monotonic()
        with self._editors_lock:
            self._editors[target] = editor
        return editor

    def _drop_editors(self, keep: str | None) -> None:
        with self._editors_lock:
            for key in list(self._editors):
                if key != keep:
                    del self._editors[key]


class WorkerPool:
    """The device workers. `start`/`stop` nest (each app lifespan is one user), so an app run
    by a server and also entered by a test client keeps one set of workers; a stopped pool can
    start again with fresh threads (loaded models are then loaded again)."""

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
        queue.workers = len(self.workers)

    def start(self) -> None:
        with self._lock:
            self._users += 1
            if self._users > 1:
                return
            if any(worker.ident is not None for worker in self.workers):
                self.workers = self._make_workers()
            self.queue.reopen()
            for worker in self.workers:
                worker.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users > 0:
                return
            for worker in self.workers:
                worker.stop()
            self.queue.close()
            deadline = time.monotonic() + timeout
            for worker in self.workers:
                if worker.is_alive():
                    worker.join(max(0.0, deadline - time.monotonic()))

    def loaded_models(self) -> list[str]:
        seen: dict[str, None] = {}
        for worker in self.workers:
            for target in worker.loaded_models():
                seen[target] = None
        return list(seen)

    def load_records(self) -> list[LoadRecord]:
        return [record for worker in self.workers for record in list(worker.loads)]
