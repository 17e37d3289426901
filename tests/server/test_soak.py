"""Soak: a few hundred small edits against a real uvicorn server on loopback (fake editor),
with cancels, failures and queue-full retries mixed in. Nothing may be lost (every accepted
edit ends done, failed or cancelled, and every result of a done one downloads) and the
process's memory must stay flat once warm."""

from __future__ import annotations

import asyncio
import io
import json
import random
import threading

import httpx
from PIL import Image
from service_helpers import AUTH, FakeEditor, FakeFactory, make_settings, png_bytes
from test_load import ServerThread, rss_bytes

from engine.server import create_app

EDITS = 300
CLIENTS = 8
WARM_UP = 100  # edits before the first memory reading (imports, caches, pools filled)
MIB = 2**20
# Measured growth between the warm reading and the end: ~1-3 MiB. A leak of one input image
# (64×48) per edit would be ~2.4 MiB over 200 edits, of one result event listener far more.
RSS_GROWTH_BOUND = 16 * MIB
FINAL = {"done", "failed", "cancelled"}


class SoakEditor(FakeEditor):
    """Fails edits whose instruction says so; otherwise the fake editor's tinted copies."""

    def edit(self, image, params, mask=None, **kwargs):
        if params.instruction == "fail":
            raise ValueError("this edit fails on purpose")
        return super().edit(image, params, mask, **kwargs)


async def one_edit(client: httpx.AsyncClient, index: int, outcome: dict) -> None:
    kind = ("done", "done", "done", "fail", "cancel", "done")[index % 6]
    params = {
        "instruction": "fail" if kind == "fail" else "make it blue",
        "steps": 40 if kind == "cancel" else 4,  # a cancel mostly meets it queued or running
        "seed": index,
        "variants": 1 + index % 2,
    }
    image = png_bytes((64, 48), (index % 256, 80, 20))
    while True:
        answer = await client.post(
            "/v1/edits",
            headers=AUTH,
            files={"image": ("in.png", image, "image/png")},
            data={"params": json.dumps(params)},
        )
        if answer.status_code == 202:
            break
        assert answer.status_code == 429, answer.text
        outcome["429"] += 1
        await asyncio.sleep(random.uniform(0.005, 0.03))
    job_id = answer.json()["id"]
    outcome["accepted"][job_id] = kind
    if kind == "cancel":
        await asyncio.sleep(random.uniform(0, 0.02))
        assert (await client.delete(f"/v1/edits/{job_id}", headers=AUTH)).status_code == 200
    while True:
        status = (await client.get(f"/v1/edits/{job_id}", headers=AUTH)).json()
        if status["state"] in FINAL:
            break
        await asyncio.sleep(0.005)
    outcome["final"][job_id] = status["state"]
    if status["state"] == "done":
        assert len(status["results"]) == params["variants"]
        for result in status["results"]:
            png = await client.get(result["url"], headers=AUTH)
            if kind == "cancel":  # it finished first: the DELETE discarded its results
                assert png.status_code == 410 and "DELETE" in png.text, png.text
                continue
            assert png.status_code == 200, png.text
            assert Image.open(io.BytesIO(png.content)).size == (64, 48)
            outcome["downloaded"] += 1
    elif status["state"] == "failed":
        assert kind == "fail" and "on purpose" in status["error"]


async def run_edits(url: str, indices: range, outcome: dict) -> None:
    pending = iter(indices)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def worker() -> None:
            for index in pending:
                await one_edit(client, index, outcome)

        await asyncio.gather(*(worker() for _ in range(CLIENTS)))


def test_soak_hundreds_of_edits_lose_nothing_and_memory_stays_flat():
    random.seed(12)
    app = create_app(
        make_settings(devices=("cpu", "cpu"), queue_size=4, result_memory_mb=64),
        editor_factory=FakeFactory(step_s=0.001, editor=SoakEditor),
    )
    service = app.state.service
    outcome: dict = {"accepted": {}, "final": {}, "downloaded": 0, "429": 0}
    with ServerThread(app) as server:
        asyncio.run(run_edits(server.url, range(WARM_UP), outcome))
        threads_warm = threading.active_count()
        rss_warm = rss_bytes()
        asyncio.run(run_edits(server.url, range(WARM_UP, EDITS), outcome))
        rss_end = rss_bytes()
        stats = service.queue.stats()
    accepted, final = outcome["accepted"], outcome["final"]
    assert len(accepted) == EDITS and set(final) == set(accepted), "an accepted edit was lost"
    states = list(final.values())
    assert states.count("failed") == EDITS // 6
    assert states.count("done") + states.count("cancelled") + states.count("failed") == EDITS
    done_kept = [i for i, state in final.items() if state == "done" and accepted[i] != "cancel"]
    assert outcome["downloaded"] >= len(done_kept) > EDITS // 2
    assert outcome["429"] > 0, "the queue never filled: the soak did not test back-pressure"
    assert states.count("cancelled") > EDITS // 12, "too few cancels met a queued or running edit"
    assert stats["queued"] == stats["running"] == 0 and stats["edit_memory_bytes"] == 0
    assert threading.active_count() <= threads_warm + 2
    growth = rss_end - rss_warm
    print(
        f"\nsoak: {EDITS} edits ({states.count('done')} done, {states.count('cancelled')} "
        f"cancelled, {states.count('failed')} failed, {outcome['429']} × 429); RSS "
        f"{rss_warm / MIB:.0f} -> {rss_end / MIB:.0f} MiB"
    )
    assert growth < RSS_GROWTH_BOUND, f"RSS grew {growth / MIB:.1f} MiB"
