"""JobQueue on its own, with a fake clock: FIFO order, result lifetime and the memory cap."""

from __future__ import annotations

import pytest
from PIL import Image

from engine.request import EditParams
from engine.server.catalog import ModelEntry
from engine.server.errors import ApiError
from engine.server.jobs import (
    FETCHED_GRACE_S,
    INPUT_BYTES_PER_PIXEL,
    RESULT_BYTES_PER_PIXEL,
    WORKING_BYTES_PER_PIXEL,
    Job,
    JobMemory,
    JobQueue,
    JobState,
    MemoryBusy,
    QueueFull,
    StoredResult,
)

MODEL = ModelEntry(id="m", source="catalogue", target="m", name="m")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_job(queue: JobQueue) -> Job:
    return Job(
        id=queue.new_id(),
        params=EditParams("x"),
        model=MODEL,
        image=Image.new("RGB", (8, 8)),
        mask=None,
    )


def stored(nbytes: int) -> StoredResult:
    """A result whose pixels take `nbytes` (a grey nbytes×1 image: one byte per pixel)."""
    return StoredResult(Image.new("L", (nbytes, 1)))


def run_to_done(queue: JobQueue, results: list[StoredResult]) -> Job:
    job = make_job(queue)
    queue.submit(job)
    assert queue.next_job(timeout=0) is job
    queue.finish_done(job, results)
    return job


def test_fifo_and_capacity():
    queue = JobQueue(capacity=2, result_ttl_s=60, result_memory_bytes=10_000, clock=Clock())
    first, second = make_job(queue), make_job(queue)
    queue.submit(first)
    queue.submit(second)
    with pytest.raises(QueueFull) as full:
        queue.submit(make_job(queue))
    assert full.value.status == 429 and int(full.value.headers["Retry-After"]) >= 1
    assert queue.next_job(timeout=0) is first and first.state is JobState.RUNNING
    assert first.image is not None
    assert queue.next_job(timeout=0) is second
    assert queue.next_job(timeout=0) is None


def test_results_live_until_ttl_then_410_with_the_reason():
    clock = Clock()
    queue = JobQueue(capacity=4, result_ttl_s=60, result_memory_bytes=10_000, clock=clock)
    results = [stored(4), stored(4)]
    job = run_to_done(queue, results)
    assert job.image is None, "inputs are dropped once the job ends"
    assert queue.stored_result_bytes == 8
    clock.now += 59
    assert queue.result(job.id, 1) is results[1]
    clock.now += 2
    with pytest.raises(ApiError) as gone:
        queue.result(job.id, 0)
    assert gone.value.status == 410 and "--result-ttl" in gone.value.message
    assert queue.stored_result_bytes == 0


def test_downloaded_results_are_released_after_a_grace_period():
    clock = Clock()
    queue = JobQueue(capacity=4, result_ttl_s=600, result_memory_bytes=10_000, clock=clock)
    results = [stored(1), stored(1)]
    job = run_to_done(queue, results)
    queue.result(job.id, 0)
    clock.now += FETCHED_GRACE_S + 1
    queue.sweep()
    assert job.results is not None, "one result is still unfetched"
    queue.result(job.id, 1)
    clock.now += FETCHED_GRACE_S - 1
    assert queue.result(job.id, 1) is results[1]  # a retried download still works
    clock.now += 2
    with pytest.raises(ApiError, match="downloaded"):
        queue.result(job.id, 1)


def test_memory_cap_evicts_fetched_then_oldest_and_refuses_oversized():
    queue = JobQueue(capacity=8, result_ttl_s=600, result_memory_bytes=10, clock=Clock())
    old = run_to_done(queue, [stored(4)])
    fetched = run_to_done(queue, [stored(4)])
    queue.result(fetched.id, 0)
    newest = run_to_done(queue, [stored(6)])  # 14 bytes stored: one must go, the fetched one first
    assert fetched.results is None and old.results is not None and newest.results is not None
    assert queue.stored_result_bytes == 10
    run_to_done(queue, [stored(5)])
    assert old.results is None and "--result-memory-mb" in old.released_reason
    huge = run_to_done(queue, [stored(11)])
    assert huge.results is None and "larger than" in huge.released_reason
    assert queue.stored_result_bytes <= 10


def test_results_are_counted_as_pixels_and_a_cached_png_only_when_it_fits():
    queue = JobQueue(capacity=4, result_ttl_s=600, result_memory_bytes=100, clock=Clock())
    rgb = StoredResult(Image.new("RGB", (4, 3)))
    assert rgb.nbytes == 4 * 3 * 4  # Pillow keeps RGB with 4 bytes per pixel
    job = run_to_done(queue, [rgb, stored(10)])
    assert queue.stored_result_bytes == 58
    queue.cache_png(job.id, rgb, b"p" * 40)
    assert rgb.png == b"p" * 40 and queue.stored_result_bytes == 98
    other = stored(10)
    queue.cache_png(job.id, other, b"q")  # not one of this job's results: ignored
    assert other.png is None
    second = job.results[1]
    queue.cache_png(job.id, second, b"q" * 3)  # would exceed the limit: not kept
    assert second.png is None and queue.stored_result_bytes == 98
    queue.cancel(job.id)  # a finished job: its results (cached PNG included) are released
    assert queue.stored_result_bytes == 0


def test_cancel_removes_a_queued_job_and_flags_a_running_one():
    queue = JobQueue(capacity=4, result_ttl_s=60, result_memory_bytes=100, clock=Clock())
    running, waiting = make_job(queue), make_job(queue)
    queue.submit(running)
    queue.submit(waiting)
    queue.next_job(timeout=0)
    assert queue.cancel(waiting.id).state is JobState.CANCELLED
    assert queue.next_job(timeout=0) is None
    assert queue.cancel(running.id).state is JobState.RUNNING and running.cancel.is_set()
    queue.finish_cancelled(running)
    assert queue.stats()["running"] == 0


# --- admissions and the memory budget -----------------------------------------------------------


def test_an_admission_holds_a_place_before_the_body_is_read():
    queue = JobQueue(capacity=2, result_ttl_s=60, result_memory_bytes=100, clock=Clock())
    reading = queue.admit(body_bytes=10)
    queue.submit(make_job(queue))
    with pytest.raises(QueueFull):
        queue.admit()  # one queued + one upload being read fill the queue
    with pytest.raises(QueueFull):
        queue.submit(make_job(queue))
    reading.release()
    with queue.admit() as admission:
        job = make_job(queue)
        queue.submit(job, admission)  # the admission's place becomes the job's
    assert queue.stats()["queued"] == 2
    with pytest.raises(QueueFull):
        queue.admit()


def test_the_memory_budget_counts_inputs_results_and_one_working_copy_per_worker():
    pixels = 1000
    one = JobMemory(pixels, variants=1)
    assert one.held == pixels * (INPUT_BYTES_PER_PIXEL + RESULT_BYTES_PER_PIXEL)
    assert one.working == pixels * WORKING_BYTES_PER_PIXEL
    budget = 3 * one.held + one.working
    queue = JobQueue(4, 60, 100, clock=Clock(), memory_budget_bytes=budget)
    jobs = []
    for _ in range(3):  # three fit: their inputs and results, and one worker's working copies
        job = make_job(queue)
        job.memory = one
        queue.submit(job)
        jobs.append(job)
    assert queue.memory_in_use == budget
    with pytest.raises(MemoryBusy) as busy, queue.admit() as admission:
        admission.expect(one)
    assert busy.value.status == 429 and "Retry-After" in busy.value.headers
    with pytest.raises(ApiError) as never:
        queue.admit().expect(JobMemory(pixels * 100, variants=2))
    assert never.value.status == 413 and never.value.field == "variants"
    queue.next_job(timeout=0)
    queue.finish_failed(jobs[0], "x")  # a finished job's memory is no longer counted
    assert queue.memory_in_use == budget - one.held
    # A second worker: two working copies may coexist.
    queue.workers = 2
    assert queue.memory_in_use == 2 * one.held + 2 * one.working
