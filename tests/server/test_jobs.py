"""JobQueue on its own, with a fake clock: FIFO order, result lifetime and the memory cap."""

from __future__ import annotations

import pytest
from PIL import Image

from engine.request import EditParams
from engine.server.catalog import ModelEntry
from engine.server.errors import ApiError
from engine.server.jobs import FETCHED_GRACE_S, Job, JobQueue, JobState, QueueFull

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


def run_to_done(queue: JobQueue, results: list[bytes]) -> Job:
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
    job = run_to_done(queue, [b"png0", b"png1"])
    assert job.image is None, "inputs are dropped once the job ends"
    clock.now += 59
    assert queue.result_png(job.id, 1) == b"png1"
    clock.now += 2
    with pytest.raises(ApiError) as gone:
        queue.result_png(job.id, 0)
    assert gone.value.status == 410 and "--result-ttl" in gone.value.message
    assert queue.stored_result_bytes == 0


def test_downloaded_results_are_released_after_a_grace_period():
    clock = Clock()
    queue = JobQueue(capacity=4, result_ttl_s=600, result_memory_bytes=10_000, clock=clock)
    job = run_to_done(queue, [b"a", b"b"])
    queue.result_png(job.id, 0)
    clock.now += FETCHED_GRACE_S + 1
    queue.sweep()
    assert job.results is not None, "one result is still unfetched"
    queue.result_png(job.id, 1)
    clock.now += FETCHED_GRACE_S - 1
    assert queue.result_png(job.id, 1) == b"b"  # a retried download still works
    clock.now += 2
    with pytest.raises(ApiError, match="downloaded"):
        queue.result_png(job.id, 1)


def test_memory_cap_evicts_fetched_then_oldest_and_refuses_oversized():
    queue = JobQueue(capacity=8, result_ttl_s=600, result_memory_bytes=10, clock=Clock())
    old = run_to_done(queue, [b"1234"])
    fetched = run_to_done(queue, [b"1234"])
    queue.result_png(fetched.id, 0)
    newest = run_to_done(queue, [b"123456"])  # 14 bytes stored: one must go, the fetched one first
    assert fetched.results is None and old.results is not None and newest.results is not None
    assert queue.stored_result_bytes == 10
    run_to_done(queue, [b"12345"])
    assert old.results is None and "--result-memory-mb" in old.released_reason
    huge = run_to_done(queue, [b"x" * 11])
    assert huge.results is None and "larger than" in huge.released_reason
    assert queue.stored_result_bytes <= 10


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
