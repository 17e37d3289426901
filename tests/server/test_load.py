"""50 concurrent clients against a real uvicorn server running the real Editor on the tiny model:
submitting, polling, streaming, leaving streams early and cancelling, with a small queue."""

from __future__ import annotations

import asyncio
import io
import json
import random
import threading
import time

import httpx
import pytest
import uvicorn
from PIL import Image
from service_helpers import AUTH, make_settings, png_bytes

from engine.server import create_app
from engine.server.cli import bind_listening_socket

CLIENTS = 50
QUEUE_SIZE = 6
RESULT_MEMORY_MB = 4
FINAL = {"done", "failed", "cancelled"}


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 elsewhere, which passes the check)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ServerThread:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, app) -> None:
        self.sock = bind_listening_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


async def submit_with_retries(client: httpx.AsyncClient, stats: dict, seed: int) -> str:
    body = {"instruction": "make it blue", "steps": 2, "resolution": 64, "seed": seed}
    for _ in range(2000):
        response = await client.post(
            "/v1/edits",
            headers=AUTH,
            files={"image": ("in.png", png_bytes((64, 48), (seed % 256, 90, 30)), "image/png")},
            data={"params": json.dumps(body)},
        )
        if response.status_code == 202:
            return response.json()["id"]
        assert response.status_code == 429, response.text
        assert int(response.headers["retry-after"]) >= 1
        stats["429"] += 1
        await asyncio.sleep(
            random.uniform(0.02, 0.1)
        )  # shorter than Retry-After: keeps the test fast
    raise AssertionError("never got into the queue")


async def poll_until_final(client: httpx.AsyncClient, job_id: str) -> dict:
    while True:
        status = (await client.get(f"/v1/edits/{job_id}", headers=AUTH)).json()
        if status["state"] in FINAL:
            return status
        await asyncio.sleep(0.02)


async def stream_until_final(
    client: httpx.AsyncClient, job_id: str, leave_early: bool
) -> str | None:
    async with client.stream("GET", f"/v1/edits/{job_id}/events", headers=AUTH) as stream:
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                if leave_early:
                    return None  # hang up mid-stream
                if line[7:] in FINAL:
                    return line[7:]
    return None


async def one_client(url: str, index: int, stats: dict) -> tuple[str, dict]:
    mode = ("poll", "stream", "cancel", "leave")[index % 4]
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        job_id = await submit_with_retries(client, stats, index)
        if mode == "stream":
            assert await stream_until_final(client, job_id, leave_early=False) in FINAL
        elif mode == "leave":
            await stream_until_final(client, job_id, leave_early=True)
        elif mode == "cancel":
            await asyncio.sleep(random.uniform(0, 0.3))
            assert (await client.delete(f"/v1/edits/{job_id}", headers=AUTH)).status_code == 200
        status = await poll_until_final(client, job_id)
        if status["state"] == "done":
            for result in status["results"]:
                png = await client.get(result["url"], headers=AUTH)
                assert png.status_code == 200, png.text
                assert Image.open(io.BytesIO(png.content)).size == (64, 48)
        return mode, status


@pytest.mark.slow
def test_fifty_concurrent_clients(tiny_model_dir):
    settings = make_settings(
        model=str(tiny_model_dir),
        devices=("cpu", "cpu"),  # two workers share the queue
        dtype="fp32",
        queue_size=QUEUE_SIZE,
        result_memory_mb=RESULT_MEMORY_MB,
    )
    app = create_app(settings)
    service = app.state.service
    peak_stored = 0
    sampling = threading.Event()

    def sample_memory() -> None:
        nonlocal peak_stored
        while not sampling.is_set():
            peak_stored = max(peak_stored, service.queue.stored_result_bytes)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample_memory, daemon=True)
    stats = {"429": 0}
    random.seed(0)

    async def run_all(url: str) -> list[tuple[str, dict]]:
        return await asyncio.gather(*(one_client(url, i, stats) for i in range(CLIENTS)))

    with ServerThread(app) as server:
        deadline = time.monotonic() + 60
        while True:  # both workers have their model loaded
            health = httpx.get(f"{server.url}/v1/health").json()
            assert health["status"] in ("ok", "loading") and time.monotonic() < deadline, health
            if [load["state"] for load in health["model_loads"]] == ["ready", "ready"]:
                break
            time.sleep(0.05)
            time.sleep(0.05)
        sampler.start()
        rss_before = rss_bytes()
        outcomes = asyncio.run(run_all(server.url))
        rss_growth = rss_bytes() - rss_before
        sampling.set()
        health = httpx.get(f"{server.url}/v1/health").json()

    states = [status["state"] for _, status in outcomes]
    assert len(outcomes) == CLIENTS and set(states) <= {"done", "cancelled"}, states
    assert all(
        state == "done"
        for (mode, _), state in zip(outcomes, states, strict=True)
        if mode != "cancel"
    )
    assert "cancelled" in states, "no cancel landed before its edit ended"
    assert stats["429"] > 0, "the full queue never answered 429"
    assert 0 < peak_stored <= settings.result_memory_bytes
    print(f"RSS growth over the run: {rss_growth / 2**20:.1f} MiB")
    assert rss_growth < 300 * 2**20, (
        f"memory grew by {rss_growth / 2**20:.0f} MiB over 50 small edits"
    )
    assert health["queue"]["queued"] == 0 and health["queue"]["running"] == 0
    assert all(not job.listeners for job in service.queue._jobs.values()), (
        "a stream left a listener behind"
    )
