"""Jobs and the bounded FIFO queue that holds them, with their results kept under a TTL and a memory cap.

Thread model: HTTP handlers (event loop and thread pool) and the device workers all go through
`JobQueue`, whose one lock guards every job's mutable state. Listeners (server-sent-event
streams) register a callback that is called, outside the lock, after each change.
"""

from __future__ import annotations

import contextlib
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from PIL import Image

from engine.request import EditParams
from engine.server.catalog import ModelEntry
from engine.server.errors import ApiError
from engine.server.images import stored_pixel_bytes

# Fetched results stay this long (at most the TTL) so a client can retry a failed download.
FETCHED_GRACE_S = 30.0
# Finished jobs' records (small: no images) are kept up to this many, then the oldest go.
MAX_FINISHED_RECORDS = 10_000

# Host memory of an edit, per pixel of its image. The decoded input (Pillow keeps RGB as 4
# bytes) and its mask (1); each result as 8-bit pixels (4), kept from the moment it is produced;
# and the Editor's float working copies while it runs (prepared input, alpha, mask weights,
# one variant being brought back to full size): measured as the peak RSS growth of the real
# Editor's edit, RGBA with a mask, 94 bytes per pixel at 2048² and 101 at 1024² (73 for RGB
# without alpha or mask); tests/server/test_memory_budget.py checks that the estimate stays
# above what the Editor takes.
INPUT_BYTES_PER_PIXEL = 5
RESULT_BYTES_PER_PIXEL = 4
WORKING_BYTES_PER_PIXEL = 112


@dataclass(frozen=True)
class JobMemory:
    """The host memory one edit is expected to take, from its pixel count and variants."""

    pixels: int
    variants: int

    @property
    def held(self) -> int:
        """Held from acceptance to the end: the input, the mask and the results."""
        return self.pixels * (INPUT_BYTES_PER_PIXEL + RESULT_BYTES_PER_PIXEL * self.variants)

    @property
    def working(self) -> int:
        """Taken only while a worker runs it."""
        return self.pixels * WORKING_BYTES_PER_PIXEL

    @property
    def peak(self) -> int:
        return self.held + self.working


# How far ahead a growing upload body is counted (see Admission.grow_body).
BODY_RESERVE_STEP_BYTES = 4 * 2**20


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f} MiB"


@dataclass
class StoredResult:
    """One result kept in memory as pixels (what the editor returned), plus its PNG once a
    client asked for PNG (encoded on request, cached for a second fetch, counted too)."""

    image: Image.Image
    png: bytes | None = None

    @property
    def nbytes(self) -> int:
        return stored_pixel_bytes(self.image) + (len(self.png) if self.png is not None else 0)


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


@dataclass
class Job:
    id: str
    params: EditParams  # LoRA names already resolved to paths
    model: ModelEntry
    image: Image.Image | None
    mask: Image.Image | None
    preview_every: int = 0
    created_at: float = field(default_factory=time.time)
    state: JobState = JobState.QUEUED
    step: int = 0
    total: int = 0
    note: str | None = None  # what the engine does before the steps (Progress.note)
    started_mono: float | None = None
    first_step_mono: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    finished_mono: float | None = None
    error: str | None = None
    error_field: str | None = None
    result_count: int = 0
    results: list[StoredResult] | None = None  # None before done and after release
    fetched: set[int] = field(default_factory=set)
    all_fetched_mono: float | None = None
    released_reason: str | None = None
    preview_b64: str | None = None
    preview_serial: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)
    version: int = 0
    listeners: list[Callable[[], None]] = field(default_factory=list)
    # What it counts against the queued-memory budget (None: worked out from the image).
    memory: JobMemory | None = None

    @property
    def result_bytes(self) -> int:
        return sum(result.nbytes for result in self.results) if self.results else 0

    def eta_s(self, now: float) -> float | None:
        if self.state is not JobState.RUNNING or self.first_step_mono is None or self.step < 1:
            return None
        per_step = (now - self.first_step_mono) / max(self.step - 1, 1) if self.step > 1 else None
        if per_step is None:
            # One step done: estimate from the time since the job started (includes set-up).
            per_step = (now - (self.started_mono or now)) / self.step
        return max(0.0, per_step * (self.total - self.step))


class QueueFull(ApiError):
    def __init__(self, capacity: int, retry_after_s: int) -> None:
        super().__init__(
            429,
            f"the queue is full ({capacity} edits waiting); try again in about {retry_after_s} s",
            None,
            headers={"Retry-After": str(retry_after_s)},
        )


class MemoryBusy(ApiError):
    def __init__(self, in_use: int, budget: int, retry_after_s: int) -> None:
        super().__init__(
            429,
            f"the server's memory for waiting and running edits is in use ({_mib(in_use)} of "
            f"{_mib(budget)}: their images, results and working copies); try again in about "
            f"{retry_after_s} s",
            None,
            headers={"Retry-After": str(retry_after_s)},
        )


class Admission:
    """A place in the queue (and a share of the memory budget) held for one upload while its
    body is read and decoded, taken before the body is read. `JobQueue.submit(job, admission)`
    hands it to the job; `release()` (or leaving the `with` block) gives it back otherwise."""

    def __init__(self, queue: JobQueue, body_bytes: int) -> None:
        self._queue = queue
        self.body_bytes = body_bytes  # the request body, in memory until the job is queued
        self.memory: JobMemory | None = None  # the edit's, once its header is read

    @property
    def held(self) -> int:
        return self.body_bytes + (self.memory.held if self.memory is not None else 0)

    def expect(self, memory: JobMemory) -> None:
        """The edit's size is known (from the headers, before decoding): count it, or raise
        413 (it can never fit the budget) / 429 (it does not fit now)."""
        self._queue._expect(self, memory)

    def grow_body(self, nbytes: int) -> None:
        """The body has grown to `nbytes` (an upload without Content-Length, or a longer one
        than declared): count it, or raise like `JobQueue.admit`."""
        if nbytes > self.body_bytes:
            self._queue._grow_body(self, nbytes)

    def release(self) -> None:
        self._queue._release_admission(self)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class JobQueue:
    """Bounded FIFO of queued jobs + the records of running and finished ones.

    Memory budget: the jobs not yet finished (queued and running) and the uploads being read
    count against `memory_budget_bytes`: each one's input, mask and results, plus the working
    copies of as many of them as there are workers (the largest ones: a worker runs one at a
    time). None: no budget."""

    def __init__(
        self,
        capacity: int,
        result_ttl_s: float,
        result_memory_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        memory_budget_bytes: int | None = None,
    ) -> None:
        self.capacity = capacity
        self.result_ttl_s = result_ttl_s
        self.result_memory_bytes = result_memory_bytes
        self.memory_budget_bytes = memory_budget_bytes
        self._clock = clock
        self._lock = threading.Lock()
        # Readers that need a consistent view of a job (status answers) hold this too.
        self.lock = self._lock
        self._work_ready = threading.Condition(self._lock)
        self._queued: deque[Job] = deque()
        # Queued and running jobs (what the memory budget counts), and uploads being read.
        self._active: dict[str, Job] = {}
        self._admissions: list[Admission] = []
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._stored_bytes = 0
        # Jobs whose results are in memory, oldest finished first (what sweeps look at).
        self._holders: OrderedDict[str, Job] = OrderedDict()
        self._running = 0
        self._recent_durations: deque[float] = deque(maxlen=20)
        self._closed = False
        self.workers = 1  # set by the worker pool; used for Retry-After estimates

    # --- submitting and taking work ---------------------------------------------------------

    def new_id(self) -> str:
        return secrets.token_urlsafe(12)

    def admit(self, body_bytes: int = 0) -> Admission:
        """Hold a place for an upload before its body is read: 429 when the queue (counting
        the uploads already being read) is full or the memory budget has no room for the body;
        413 when the body alone is larger than the budget."""
        with self._lock:
            self._check_room_locked(body_bytes)
            admission = Admission(self, body_bytes)
            self._admissions.append(admission)
            return admission

    def _check_room_locked(self, body_bytes: int) -> None:
        if len(self._queued) + len(self._admissions) >= self.capacity:
            raise QueueFull(self.capacity, self._retry_after_locked())
        budget = self.memory_budget_bytes
        if budget is None:
            return
        if body_bytes > budget:
            raise ApiError(
                413,
                f"the upload ({_mib(body_bytes)}) is larger than this server's memory budget for "
                f"edits ({_mib(budget)}); send a smaller image or start the server with a larger "
                "--max-queued-memory-mb",
                "image",
            )
        in_use = self._memory_in_use_locked()
        if in_use + body_bytes > budget:
            raise MemoryBusy(in_use, budget, self._retry_after_locked())

    def _expect(self, admission: Admission, memory: JobMemory) -> None:
        with self._lock:
            budget = self.memory_budget_bytes
            if budget is not None and memory.peak > budget:
                raise ApiError(
                    413,
                    f"an edit of {memory.pixels} pixels with {memory.variants} variant(s) needs "
                    f"about {_mib(memory.peak)} of host memory; this server allows {_mib(budget)} "
                    "(--max-queued-memory-mb); send a smaller image (or select a region) or ask "
                    "for fewer variants",
                    "image" if memory.variants == 1 else "variants",
                )
            previous = admission.memory
            admission.memory = memory
            if budget is not None and self._memory_in_use_locked() > budget:
                admission.memory = previous
                raise MemoryBusy(self._memory_in_use_locked(), budget, self._retry_after_locked())

    def _grow_body(self, admission: Admission, nbytes: int) -> None:
        with self._lock:
            budget = self.memory_budget_bytes
            # Reserved a step ahead, so a long chunked upload takes the lock now and then only.
            wanted = nbytes + BODY_RESERVE_STEP_BYTES
            if budget is not None:
                if nbytes > budget:
                    raise ApiError(
                        413,
                        f"the upload (over {_mib(nbytes)}) is larger than this server's memory "
                        f"budget for edits ({_mib(budget)}); send a smaller image",
                        "image",
                    )
                in_use = self._memory_in_use_locked() - admission.body_bytes
                if in_use + nbytes > budget:
                    raise MemoryBusy(in_use, budget, self._retry_after_locked())
                wanted = min(wanted, budget - in_use)
            admission.body_bytes = max(nbytes, wanted)

    def _release_admission(self, admission: Admission) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._admissions.remove(admission)

    def submit(self, job: Job, admission: Admission | None = None) -> None:
        """Queue `job`. With an `admission` (from `admit`), its place and memory become the
        job's; without one, the capacity and the memory budget are checked now."""
        if job.memory is None:
            pixels = job.image.width * job.image.height if job.image is not None else 0
            job.memory = JobMemory(pixels, job.params.variants)
        with self._lock:
            if admission is not None and admission in self._admissions:
                self._admissions.remove(admission)
            else:
                self._check_room_locked(0)
                budget = self.memory_budget_bytes
                if budget is not None and self._memory_in_use_locked(job.memory) > budget:
                    raise MemoryBusy(
                        self._memory_in_use_locked(), budget, self._retry_after_locked()
                    )
            # Until the editor reports its own count (None: the model's recommended steps).
            job.total = job.params.steps or 0
            self._jobs[job.id] = job
            self._active[job.id] = job
            self._queued.append(job)
            self._work_ready.notify()

    def _memory_in_use_locked(self, extra: JobMemory | None = None) -> int:
        memories = [job.memory for job in self._active.values() if job.memory is not None]
        memories += [a.memory for a in self._admissions if a.memory is not None]
        if extra is not None:
            memories.append(extra)
        held = sum(memory.held for memory in memories)
        held += sum(admission.body_bytes for admission in self._admissions)
        # Each worker runs one edit at a time: the largest ones' working copies can coexist.
        working = sorted((memory.working for memory in memories), reverse=True)
        return held + sum(working[: max(self.workers, 1)])

    @property
    def memory_in_use(self) -> int:
        with self._lock:
            return self._memory_in_use_locked()

    def next_job(self, timeout: float | None = None) -> Job | None:
        """Block until a job is queued (then mark it running) or `timeout`/close; None if none."""
        with self._lock:
            deadline = None if timeout is None else self._clock() + timeout
            while not self._queued and not self._closed:
                remaining = None if deadline is None else deadline - self._clock()
                if remaining is not None and remaining <= 0:
                    return None
                self._work_ready.wait(remaining)
            if self._closed:
                return None
            job = self._queued.popleft()
            job.state = JobState.RUNNING
            job.started_mono = self._clock()
            job.started_at = time.time()
            self._running += 1
            listeners = self._touch(job)
        _notify(listeners)
        return job

    def reopen(self) -> None:
        with self._lock:
            self._closed = False

    def close(self) -> None:
        """Wake every waiting worker and stop handing out jobs; running jobs are asked to cancel."""
        with self._lock:
            self._closed = True
            for job in self._jobs.values():
                if job.state is JobState.RUNNING:
                    job.cancel.set()
            self._work_ready.notify_all()

    # --- progress and completion (called by workers) ----------------------------------------

    def report_progress(
        self,
        job: Job,
        step: int,
        total: int,
        preview_b64: str | None = None,
        note: str | None = None,
    ) -> None:
        with self._lock:
            job.step, job.total, job.note = step, total, note
            if job.first_step_mono is None and note is None:
                job.first_step_mono = self._clock()
            if preview_b64 is not None:
                job.preview_b64 = preview_b64
                job.preview_serial += 1
            listeners = self._touch(job)
        _notify(listeners)

    def finish_done(self, job: Job, results: list[StoredResult]) -> None:
        with self._lock:
            job.results = results
            job.result_count = len(results)
            job.step = job.total
            self._stored_bytes += job.result_bytes
            self._holders[job.id] = job
            self._finish_locked(job, JobState.DONE)
            self._enforce_memory_cap_locked(newest=job)
            listeners = self._touch(job)
        _notify(listeners)

    def finish_failed(self, job: Job, message: str, field: str | None = None) -> None:
        with self._lock:
            job.error, job.error_field = message, field
            self._finish_locked(job, JobState.FAILED)
            listeners = self._touch(job)
        _notify(listeners)

    def finish_cancelled(self, job: Job) -> None:
        with self._lock:
            self._finish_locked(job, JobState.CANCELLED)
            listeners = self._touch(job)
        _notify(listeners)

    def _finish_locked(self, job: Job, state: JobState) -> None:
        if job.state is JobState.RUNNING:
            self._running -= 1
            if job.started_mono is not None:
                self._recent_durations.append(self._clock() - job.started_mono)
        job.state = state
        job.finished_mono = self._clock()
        job.finished_at = time.time()
        self._active.pop(job.id, None)
        # The inputs are no longer needed; drop them now rather than with the record.
        job.image = job.mask = None
        job.preview_b64 = None
        self._prune_records_locked()

    # --- client operations ------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        self.sweep()
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(
                404,
                f"no edit with id {job_id!r} on this server (ids are forgotten when the server "
                "restarts, and the oldest finished ones after many jobs)",
                "id",
            )
        return job

    def cancel(self, job_id: str) -> Job:
        """Queued: removed and cancelled now. Running: asked to stop (within one step).
        Finished: its stored results are discarded (the client is done with them)."""
        job = self.get(job_id)
        with self._lock:
            if job.state is JobState.QUEUED:
                self._queued.remove(job)
                self._finish_locked(job, JobState.CANCELLED)
            elif job.state is JobState.RUNNING:
                job.cancel.set()
            elif job.results is not None:
                self._release_locked(job, "the results were discarded by a DELETE request")
            listeners = self._touch(job)
        _notify(listeners)
        return job

    def result(self, job_id: str, index: int) -> StoredResult:
        """Result `index` of a done job (409/404/410 otherwise); it counts as downloaded."""
        job = self.get(job_id)
        with self._lock:
            if job.state is not JobState.DONE:
                raise ApiError(
                    409,
                    f"edit {job_id} is {job.state.value}; results exist only once it is done",
                    "id",
                )
            if not 0 <= index < job.result_count:
                raise ApiError(
                    404,
                    f"edit {job_id} has results 0 to {job.result_count - 1}; there is no result {index}",
                    "k",
                )
            if job.results is None:
                raise ApiError(
                    410, f"result {index} of edit {job_id} is gone: {job.released_reason}", "k"
                )
            result = job.results[index]
            job.fetched.add(index)
            if len(job.fetched) == job.result_count and job.all_fetched_mono is None:
                job.all_fetched_mono = self._clock()
        return result

    def cache_png(self, job_id: str, result: StoredResult, png: bytes) -> None:
        """Keep a result's encoded PNG for another fetch, when it fits under the memory limit
        without releasing anything (else it is simply encoded again)."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.results is None or result.png is not None:
                return
            if not any(stored is result for stored in job.results):
                return
            if self._stored_bytes + len(png) > self.result_memory_bytes:
                return
            result.png = png
            self._stored_bytes += len(png)

    def queue_position(self, job: Job) -> int | None:
        with self._lock:
            if job.state is not JobState.QUEUED:
                return None
            try:
                return self._queued.index(job)
            except ValueError:
                return None

    # --- listeners ----------------------------------------------------------------------------

    def add_listener(self, job: Job, callback: Callable[[], None]) -> None:
        with self._lock:
            job.listeners.append(callback)

    def remove_listener(self, job: Job, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in job.listeners:
                job.listeners.remove(callback)

    def _touch(self, job: Job) -> list[Callable[[], None]]:
        job.version += 1
        return list(job.listeners)

    # --- keeping memory bounded ---------------------------------------------------------------

    def sweep(self) -> None:
        """Release results past their TTL or their post-download grace period."""
        notify: list[Callable[[], None]] = []
        with self._lock:
            now = self._clock()
            for job in list(self._holders.values()):
                if job.finished_mono is None:
                    continue
                if now - job.finished_mono >= self.result_ttl_s:
                    self._release_locked(
                        job,
                        f"results are kept for {self.result_ttl_s:g} s after an edit ends and this "
                        "one's time ran out; fetch results sooner, or start the server with a longer "
                        "--result-ttl",
                    )
                    notify += self._touch(job)
                elif job.all_fetched_mono is not None and now - job.all_fetched_mono >= min(
                    FETCHED_GRACE_S, self.result_ttl_s
                ):
                    self._release_locked(job, "every result was downloaded and then released")
                    notify += self._touch(job)
        _notify(notify)

    def _enforce_memory_cap_locked(self, newest: Job) -> None:
        if self._stored_bytes <= self.result_memory_bytes:
            return
        if newest.result_bytes > self.result_memory_bytes:
            self._release_locked(
                newest,
                f"the results ({newest.result_bytes / 2**20:.1f} MiB) are larger than the server's "
                f"result memory limit ({self.result_memory_bytes / 2**20:.1f} MiB); start it with a "
                "larger --result-memory-mb",
            )
            return
        # Downloaded ones go first, then the oldest unfetched ones.
        holders = [job for job in self._holders.values() if job is not newest]
        holders.sort(key=lambda job: (job.all_fetched_mono is None, job.finished_mono or 0.0))
        for job in holders:
            if self._stored_bytes <= self.result_memory_bytes:
                break
            if job.all_fetched_mono is not None:
                reason = (
                    "every result was downloaded and then released to make room for newer results"
                )
            else:
                reason = (
                    "released unfetched to keep the server's result memory under its limit "
                    f"({self.result_memory_bytes / 2**20:.0f} MiB); fetch results sooner, or start the "
                    "server with a larger --result-memory-mb"
                )
            self._release_locked(job, reason)
            self._touch(job)

    def _release_locked(self, job: Job, reason: str) -> None:
        if job.results is not None:
            self._stored_bytes -= job.result_bytes
            job.results = None
            job.released_reason = reason
        self._holders.pop(job.id, None)

    def _prune_records_locked(self) -> None:
        if len(self._jobs) <= MAX_FINISHED_RECORDS:
            return
        finished = [job for job in self._jobs.values() if job.state.finished]
        excess = len(finished) - MAX_FINISHED_RECORDS
        for job in finished[: max(excess, 0)]:
            self._release_locked(job, "forgotten")
            del self._jobs[job.id]

    # --- numbers ------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "queued": len(self._queued),
                "running": self._running,
                "capacity": self.capacity,
                "stored_result_bytes": self._stored_bytes,
                "result_memory_limit_bytes": self.result_memory_bytes,
                "edit_memory_bytes": self._memory_in_use_locked(),
                "edit_memory_limit_bytes": self.memory_budget_bytes or 0,
            }

    @property
    def stored_result_bytes(self) -> int:
        with self._lock:
            return self._stored_bytes

    def _retry_after_locked(self) -> int:
        typical = (
            sorted(self._recent_durations)[len(self._recent_durations) // 2]
            if self._recent_durations
            else 5.0
        )
        return max(
            1, math.ceil(typical * (len(self._queued) + self._running) / max(self.workers, 1))
        )


def _notify(listeners: list[Callable[[], None]]) -> None:
    for callback in listeners:
        # A listener whose client went away (closed event loop) must not hurt the worker.
        with contextlib.suppress(Exception):
            callback()
