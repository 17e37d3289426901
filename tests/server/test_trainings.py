"""Training jobs on the engine (/v1/trainings): datasets refused before a start, the runner
process with the tiny InstructPix2Pix, pause while an edit runs, cancel and resume, a runner
crash, the trained LoRA in /v1/models and in an edit, and a restart of a real
`instruct-edit serve` process in the middle of a training."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_helpers import AUTH, FakeFactory, make_settings, png_bytes, submit, wait_finished
from test_process import child_env, serve_command, start_and_wait_for_url

from engine.server import create_app
from engine.server.datasets import extract_dataset_zip
from engine.server.errors import ApiError
from engine.server.trainings import (
    MIN_PAIRS,
    PRESETS,
    TrainingJob,
    check_memory,
    memory_need_bytes,
    thin,
)

LOCAL = ("127.0.0.1", 50000)
# A handful of steps of the tiny model at 32 px; a validation grid with 2 sampling steps.
TINY_RUN = {
    "max_steps": 4,
    "resolution": 32,
    "batch_size": 2,
    "grad_accum": 1,
    "lora_rank": 4,
    "learning_rate": 1e-3,
    "checkpoint_every": 1,
    "validate_every": 2,
    "validation_steps": 2,
}
RUN_TIMEOUT_S = 240.0


def write_pairs(
    folder: Path, count: int = MIN_PAIRS, size: tuple[int, int] = (32, 32), seed: int = 0
) -> Path:
    """A pairs folder: random before images; after = before with red at full."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        before = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        after = before.copy()
        after[..., 0] = 255
        Image.fromarray(before).save(folder / f"{i}_before.png")
        Image.fromarray(after).save(folder / f"{i}_after.png")
        lines.append(
            json.dumps(
                {
                    "input_image": f"{i}_before.png",
                    "edit_prompt": "make it red",
                    "edited_image": f"{i}_after.png",
                }
            )
        )
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def zip_folder(folder: Path, extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.iterdir()):
            archive.write(path, f"pairs/{path.name}")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def request(model: Path | str, name: str = "ink", **overrides: Any) -> dict[str, Any]:
    return {
        "name": name,
        "model": str(model),
        "preset": "quick",
        "overrides": {**TINY_RUN, **overrides},
    }


@pytest.fixture
def make_client(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Callable[..., TestClient]]:
    """`make_client(client=LOCAL, factory=None, **settings)` -> a started TestClient on an app
    whose data folder is tmp_path/data and whose default model is the tiny InstructPix2Pix."""
    clients: list[TestClient] = []

    def make(
        client: tuple[str, int] = LOCAL, factory: FakeFactory | None = None, **overrides: Any
    ) -> TestClient:
        settings = make_settings(model=str(tiny_model_dir), data_dir=tmp_path / "data", **overrides)
        app = create_app(settings, editor_factory=factory or FakeFactory())
        test_client = TestClient(app, client=client)
        test_client.__enter__()
        clients.append(test_client)
        return test_client

    yield make
    for test_client in clients:
        test_client.__exit__(None, None, None)


def wait_for(
    client: TestClient | httpx.Client,
    training_id: str,
    done: Callable[[dict[str, Any]], bool],
    timeout: float = RUN_TIMEOUT_S,
    headers: dict[str, str] = AUTH,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = client.get(f"/v1/trainings/{training_id}", headers=headers).json()
        if done(status):
            return status
        time.sleep(0.1)
    raise AssertionError(f"training {training_id} did not get there in {timeout} s: {status}")


def read_events(client: TestClient, training_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The whole event stream of a training, until it ends."""
    events: list[tuple[str, dict[str, Any]]] = []
    name = None
    with client.stream("GET", f"/v1/trainings/{training_id}/events", headers=AUTH) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: ") and name is not None:
                events.append((name, json.loads(line[6:])))
    return events


# --- refused before any start ---------------------------------------------------------


def test_bad_datasets_and_parameters_are_refused_before_a_training_starts(
    make_client: Callable[..., TestClient], tmp_path: Path, tiny_model_dir: Path
) -> None:
    client = make_client(max_dataset_mb=0.05)
    remote = make_client(client=("203.0.113.9", 40000))

    def refused(body: dict[str, Any], status: int = 422) -> dict[str, Any]:
        answer = client.post("/v1/trainings", headers=AUTH, json=body)
        assert answer.status_code == status, answer.text
        return answer.json()["error"]

    good = write_pairs(tmp_path / "good")
    few = write_pairs(tmp_path / "few", count=MIN_PAIRS - 5)
    error = refused({**request(tiny_model_dir), "dataset_folder": str(few)})
    assert error["field"] == "dataset" and f"at least {MIN_PAIRS}" in error["message"]

    mismatched = write_pairs(tmp_path / "mismatched")
    Image.new("RGB", (40, 32)).save(mismatched / "2_after.png")
    error = refused({**request(tiny_model_dir), "dataset_folder": str(mismatched)})
    assert error["field"] == "dataset"
    assert "line 3" in error["message"] and "32×32" in error["message"]
    assert "40×32" in error["message"]

    unreadable = write_pairs(tmp_path / "unreadable")
    (unreadable / "5_before.png").write_bytes(b"not a png at all")
    error = refused({**request(tiny_model_dir), "dataset_folder": str(unreadable)})
    assert "line 6" in error["message"] and "not a readable image" in error["message"]

    error = refused({**request("diffusers/sdxl-instructpix2pix-768"), "dataset_folder": str(good)})
    assert error["field"] == "model" and "SDXL" in error["message"]
    error = refused({**request("timbrooks/instruct-pix2pix"), "dataset_folder": str(good)})
    assert error["field"] == "model" and "not on the server's machine" in error["message"]
    error = refused({**request(tiny_model_dir), "preset": "turbo", "dataset_folder": str(good)})
    assert error["field"] == "preset"
    error = refused({**request(tiny_model_dir, max_steps=0), "dataset_folder": str(good)})
    assert error["field"] == "overrides.max_steps"
    error = refused({**request(tiny_model_dir, name="../up"), "dataset_folder": str(good)})
    assert error["field"] == "name"

    # A folder on the engine's machine only for a client on it.
    answer = remote.post(
        "/v1/trainings", headers=AUTH, json={**request(tiny_model_dir), "dataset_folder": str(good)}
    )
    assert answer.status_code == 403 and "zip" in answer.json()["error"]["message"]

    def upload(data: bytes) -> httpx.Response:
        return client.post(
            "/v1/trainings",
            headers=AUTH,
            data={"params": json.dumps(request(tiny_model_dir))},
            files={"dataset": ("pairs.zip", data, "application/zip")},
        )

    escape = tmp_path / "escaped.txt"
    answer = upload(zip_folder(few, {"../../escaped.txt": b"outside"}))
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["field"] == "dataset"
    assert "outside" in answer.json()["error"]["message"] and not escape.exists()

    big = tmp_path / "big"
    write_pairs(big, size=(128, 128))  # random pixels do not compress: > 0.05 MiB zipped
    answer = upload(zip_folder(big))
    assert answer.status_code == 413 and answer.json()["error"]["field"] == "dataset"

    answer = upload(b"PK\x03\x04 but not a zip")
    assert answer.status_code == 422 and "not a zip" in answer.json()["error"]["message"]

    # Nothing was started or left behind.
    assert client.get("/v1/trainings", headers=AUTH).json() == {"trainings": []}
    trainings = tmp_path / "data" / "trainings"
    assert not trainings.exists() or not any(trainings.iterdir())


def test_a_zip_bomb_and_links_are_refused_while_unpacking(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("metadata.jsonl", b"\n" * (2 * 2**20))  # 2 MiB of newlines: ~2 KiB
    assert len(buffer.getvalue()) < 64 * 1024
    with pytest.raises(ApiError) as refused:
        extract_dataset_zip(buffer.getvalue(), tmp_path / "bomb", max_unpacked_bytes=2**20)
    assert refused.value.field == "dataset" and "MiB" in refused.value.message

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        link = zipfile.ZipInfo("metadata.jsonl")
        link.external_attr = 0o120777 << 16  # a symlink entry
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(ApiError) as refused:
        extract_dataset_zip(buffer.getvalue(), tmp_path / "link")
    assert "link" in refused.value.message


def test_a_training_that_does_not_fit_in_free_memory_is_refused_naming_what_is_free(
    make_client: Callable[..., TestClient],
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    quick, balanced, thorough = (p.settings() for p in PRESETS)
    sd15 = None  # unknown weights: the SD 1.5 sizes
    for kind in ("cpu", "cuda"):
        needs = [memory_need_bytes(sd15, s, kind, kind == "cuda") for s in (quick, thorough)]
        assert needs[0] < needs[1]
    assert 3 * 2**30 < memory_need_bytes(sd15, quick, "cuda", False) < 8 * 2**30
    assert memory_need_bytes(sd15, balanced, "cuda", True) < 8 * 2**30  # fits an 8 GB GPU
    with pytest.raises(ApiError) as refused:
        check_memory(10 * 2**30, 2**30, "RAM", "thorough")
    assert refused.value.field == "preset" and "1.0 GiB are free" in refused.value.message

    import engine.server.trainings as trainings

    monkeypatch.setattr(trainings, "free_device_bytes", lambda kind, device: (2**20, "RAM"))
    client = make_client()
    answer = client.post(
        "/v1/trainings",
        headers=AUTH,
        json={**request(tiny_model_dir), "dataset_folder": str(write_pairs(tmp_path / "p"))},
    )
    assert answer.status_code == 422 and answer.json()["error"]["field"] == "preset"
    assert "0.0 GiB are free" in answer.json()["error"]["message"]


def test_training_options_list_trainable_models_presets_and_local_datasets(
    make_client: Callable[..., TestClient], tmp_path: Path, tiny_model_dir: Path
) -> None:
    write_pairs(tmp_path / "data" / "datasets" / "inks", count=9)
    options = make_client().get("/v1/training-options", headers=AUTH).json()
    models = {model["id"]: model for model in options["models"]}
    assert models[str(tiny_model_dir)]["trainable"] and models[str(tiny_model_dir)]["family"] == (
        "sd-ip2p"
    )
    assert models["black-forest-labs/FLUX.1-Kontext-dev"]["trainable"]  # a flow family
    sdxl = models["diffusers/sdxl-instructpix2pix-768"]
    assert not sdxl["trainable"] and "SDXL" in sdxl["why_not"]
    assert [p["id"] for p in options["presets"]] == ["quick", "balanced", "thorough"]
    steps = [p["max_steps"] for p in options["presets"]]
    assert steps == sorted(steps) and all("CPU" in p["minutes_hint"] for p in options["presets"])
    assert options["min_pairs"] == MIN_PAIRS
    assert options["datasets"] == [
        {"folder": str(tmp_path / "data" / "datasets" / "inks"), "pairs": 9}
    ]
    remote = make_client(client=("203.0.113.9", 40000))
    assert remote.get("/v1/training-options", headers=AUTH).json()["datasets"] == []
    schema = make_client().get("/openapi.json").json()
    assert "TrainingStatus" in schema["components"]["schemas"]
    assert "TrainingRequest" in schema["components"]["schemas"]


def test_finished_loras_never_overwrite_each_other_and_the_loss_is_thinned(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = make_client()
    manager = client.app.state.trainings  # type: ignore[attr-defined]
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights")
    paths = []
    for number in range(3):
        job = TrainingJob(
            id=f"job-{number}", folder=tmp_path / f"job-{number}", name="my ink", model="m",
            model_target="m", family="sd-ip2p", preset="quick", settings=PRESETS[0].settings(),
            runner={}, pairs=9, dataset="data", step=300, loss=[(300, 0.1)],
        )  # fmt: skip
        job.folder.mkdir()
        manager._register(job, weights)
        assert job.state == "done", job.error
        paths.append(job.lora["path"])
        assert "Data: 9 before/after pairs" in job.lora["card"]
    assert paths == [
        "trained/my-ink/pytorch_lora_weights.safetensors",
        "trained/my-ink-2/pytorch_lora_weights.safetensors",
        "trained/my-ink-3/pytorch_lora_weights.safetensors",
    ]
    assert set(client.get("/v1/models", headers=AUTH).json()["loras"]) >= set(paths)
    points = [(step, 1.0 / step) for step in range(1, 3001)]
    thinned = thin(points)
    assert len(thinned) <= 500 and thinned[0] == points[0] and thinned[-1] == points[-1]


FAKE_RUNNER = """
import json, sys, time
from pathlib import Path

job_file = Path(sys.argv[1])
events = job_file.parent / "events.jsonl"
def write(**event):
    with open(events, "a") as out:
        out.write(json.dumps(event) + "\\n")
write(event="started", pid=0, time=time.time())
for step in (1, 2):
    write(event="progress", step=step, max_steps=4, loss=0.5 / step, time=time.time())
checkpoint = job_file.parent / "output" / "checkpoints" / "step-0000002"
checkpoint.mkdir(parents=True)
(checkpoint / "train_state.json").write_text("{}")
print("CUDA out of memory. Tried to allocate 2.00 GiB")
write(event="failed", message="out of memory at step 2: choose a smaller preset", field="preset")
sys.exit(1)
"""


def test_a_failure_the_runner_reports_keeps_its_message_field_and_checkpoint(
    make_client: Callable[..., TestClient],
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The state machine with a stand-in runner (no torch: fast): its events become the
    status, its failure event the error, and its checkpoint makes the job resumable."""
    import engine.server.trainings as trainings

    (tmp_path / "fake_runner.py").write_text(FAKE_RUNNER)
    monkeypatch.setattr(trainings, "RUNNER_MODULE", "fake_runner")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    client = make_client()
    body = {**request(tiny_model_dir), "dataset_folder": str(write_pairs(tmp_path / "pairs"))}
    answer = client.post("/v1/trainings", headers=AUTH, json=body)
    assert answer.status_code == 202, answer.text
    failed = wait_for(client, answer.json()["id"], lambda s: s["state"] == "failed", timeout=30)
    assert failed["error"].startswith("out of memory at step 2") and failed["field"] == "preset"
    assert failed["step"] == 2 and failed["loss"] == [[1, 0.5], [2, 0.25]]
    assert failed["resumable"] and failed["lora"] is None
    listed = client.get("/v1/trainings", headers=AUTH).json()["trainings"]
    assert [t["id"] for t in listed] == [answer.json()["id"]]
    # The snapshot: the training's own copy of the pairs, whatever happens to the folder.
    data = tmp_path / "data" / "trainings" / answer.json()["id"] / "data"
    assert len((data / "metadata.jsonl").read_text().splitlines()) == MIN_PAIRS
    assert len(list(data.glob("*.png"))) == 2 * MIN_PAIRS


STEPPING_RUNNER = """
import json, sys, time
from pathlib import Path

job_file = Path(sys.argv[1])
folder = job_file.parent
def write(**event):
    with open(folder / "events.jsonl", "a") as out:
        out.write(json.dumps(event) + "\\n")
write(event="started", pid=0, time=time.time())
checkpoint = folder / "output" / "checkpoints" / "step-0000001"
for step in range(1, 100000):
    time.sleep(0.05)
    write(event="progress", step=step, max_steps=100000, loss=1.0, time=time.time())
    if step == 1:
        checkpoint.mkdir(parents=True)
        (checkpoint / "train_state.json").write_text("{}")
    if (folder / "stop").exists():
        write(event="stopped", step=step)
        sys.exit(0)
"""


def test_an_engine_shutdown_interrupts_a_training_and_the_next_engine_offers_its_resume(
    make_client: Callable[..., TestClient],
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import engine.server.trainings as trainings

    (tmp_path / "stepping_runner.py").write_text(STEPPING_RUNNER)
    monkeypatch.setattr(trainings, "RUNNER_MODULE", "stepping_runner")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    client = make_client()
    body = {**request(tiny_model_dir), "dataset_folder": str(write_pairs(tmp_path / "pairs"))}
    training_id = client.post("/v1/trainings", headers=AUTH, json=body).json()["id"]
    running = wait_for(client, training_id, lambda s: s["step"] >= 3, timeout=30)
    assert running["state"] == "running" and running["eta_s"] is not None
    client.__exit__(None, None, None)  # the engine stops: its lifespan ends

    job = json.loads((tmp_path / "data" / "trainings" / training_id / "job.json").read_text())
    assert job["state"] == "interrupted"
    again = make_client()
    status = again.get(f"/v1/trainings/{training_id}", headers=AUTH).json()
    assert status["state"] == "interrupted" and status["resumable"]
    assert status["step"] >= running["step"]  # replayed from events.jsonl
    resumed = again.post(f"/v1/trainings/{training_id}/resume", headers=AUTH)
    assert resumed.status_code == 202 and resumed.json()["state"] == "running"
    cancelled = again.delete(f"/v1/trainings/{training_id}", headers=AUTH).json()
    if cancelled["state"] != "cancelled":
        cancelled = wait_for(again, training_id, lambda s: s["state"] == "cancelled", timeout=30)
    assert cancelled["resumable"] and not cancelled["cancel_requested"]


def test_the_runner_names_out_of_memory_and_a_full_disk() -> None:
    import errno

    import torch

    from training.job_runner import failure_message

    message, field = failure_message(torch.OutOfMemoryError("CUDA out of memory"), 7)
    assert "out of memory at step 7" in message and "checkpoint is kept" in message
    assert field == "preset"
    message, _ = failure_message(OSError(errno.ENOSPC, "No space left on device", "ckpt"), 3)
    assert "disk is full" in message and "checkpoint is kept" in message


# --- with the runner process -----------------------------------------------------------


@pytest.mark.slow
def test_an_edit_pauses_the_training_cancel_keeps_the_checkpoint_and_resume_finishes(
    make_client: Callable[..., TestClient], tmp_path: Path, tiny_model_dir: Path
) -> None:
    gate = threading.Event()
    client = make_client(factory=FakeFactory(gate=gate))
    pairs = write_pairs(tmp_path / "pairs")
    body = {**request(tiny_model_dir), "dataset_folder": str(pairs)}
    # The edit first (held by the gate): the training then pauses after its first step,
    # whatever the machine's speed (a 4-step tiny training can finish before a later edit).
    edit = submit(client, {"instruction": "make it blue", "steps": 2})
    assert edit.status_code == 202
    answer = client.post("/v1/trainings", headers=AUTH, json=body)
    assert answer.status_code == 202, answer.text
    training_id = answer.json()["id"]
    assert answer.json()["state"] == "running" and answer.json()["pairs"] == MIN_PAIRS
    again = client.post("/v1/trainings", headers=AUTH, json={**body, "name": "other"})
    assert again.status_code == 409 and training_id in again.json()["error"]["message"]

    paused = wait_for(client, training_id, lambda s: s["state"] == "paused")
    time.sleep(1.0)
    still = client.get(f"/v1/trainings/{training_id}", headers=AUTH).json()
    assert still["state"] == "paused" and still["step"] == paused["step"]

    client.delete(f"/v1/trainings/{training_id}", headers=AUTH)
    cancelled = wait_for(client, training_id, lambda s: s["state"] == "cancelled")
    assert cancelled["resumable"] and cancelled["step"] == paused["step"]
    gate.set()
    assert wait_finished(client, edit.json()["id"])["state"] == "done"

    resumed = client.post(f"/v1/trainings/{training_id}/resume", headers=AUTH)
    assert resumed.status_code == 202 and resumed.json()["state"] == "running"
    events = read_events(client, training_id)
    progress = [data["step"] for name, data in events if name == "progress"]
    assert progress and progress[-1] == 4 and progress == sorted(progress)
    assert min(progress) >= paused["step"]  # continued from the checkpoint, not from 0
    final = [data for name, data in events if name == "state"][-1]
    assert final["state"] == "done" and final["step"] == 4 and not final["resumable"]
    assert [step for step, _loss in final["loss"]] == [1, 2, 3, 4]
    assert [v["step"] for v in final["validations"]] == [2, 4]
    grid = client.get(f"/v1/trainings/{training_id}/validations/1", headers=AUTH)
    assert grid.status_code == 200 and grid.content.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(grid.content)).width == 3 * 32  # before | model | own after
    assert client.get(f"/v1/trainings/{training_id}/validations/2", headers=AUTH).status_code == 404
    lora = final["lora"]["path"]
    assert lora == "trained/ink/pytorch_lora_weights.safetensors"
    assert lora in client.get("/v1/models", headers=AUTH).json()["loras"]
    assert "Steps: 4 of 4" in final["lora"]["card"]
    log = (tmp_path / "data" / "trainings" / training_id / "log.txt").read_text()
    assert "resuming from" in log
    # A finished training: DELETE changes nothing.
    assert client.delete(f"/v1/trainings/{training_id}", headers=AUTH).json()["state"] == "done"


def test_a_runner_crash_fails_the_job_with_its_log_tail_and_the_service_keeps_serving(
    make_client: Callable[..., TestClient], tmp_path: Path, tiny_model_dir: Path
) -> None:
    client = make_client()
    upload = zip_folder(write_pairs(tmp_path / "pairs"))
    answer = client.post(
        "/v1/trainings",
        headers=AUTH,
        data={"params": json.dumps(request(tiny_model_dir))},
        files={"dataset": ("pairs.zip", upload, "application/zip")},
    )
    assert answer.status_code == 202, answer.text
    training_id = answer.json()["id"]
    job = client.app.state.trainings.get(training_id)  # type: ignore[attr-defined]
    os.kill(job.process.pid, signal.SIGKILL)
    failed = wait_for(client, training_id, lambda s: s["state"] == "failed", timeout=30)
    assert "ended unexpectedly (exit code -9)" in failed["error"]
    assert "--- start" in failed["error"]  # the log's last lines
    assert not failed["resumable"]
    edit = submit(client, {"instruction": "make it blue", "steps": 2})
    assert wait_finished(client, edit.json()["id"])["state"] == "done"
    assert client.get("/v1/health").json()["status"] in ("ok", "loading")


@pytest.mark.slow
def test_real_engine_restart_interrupts_a_paused_training_and_resume_then_edit_with_the_lora(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """In `instruct-edit serve`: a zip upload trains; an edit pauses it; the engine is killed;
    the next engine shows it interrupted; resume finishes it; the LoRA edits."""
    data_dir = tmp_path / "data"
    token_file = tmp_path / "token"
    token_file.write_text("real-engine-token-0123456789\n")
    token_file.chmod(0o600)
    headers = {"Authorization": "Bearer real-engine-token-0123456789"}
    command = serve_command(
        "--port", "0", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32",
        "--token-file", str(token_file), "--data-dir", str(data_dir),
    )  # fmt: skip

    def start() -> tuple[subprocess.Popen, str]:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=child_env(tmp_path),
        )
        return process, start_and_wait_for_url(process, timeout=120)

    engine, url = start()
    try:
        with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
            # A long edit first (the tiny model at 512 px, many steps) holds the device, so the
            # training pauses after its first step however fast the machine is.
            long_edit = client.post(
                "/v1/edits",
                files={"image": ("in.png", png_bytes((512, 512)), "image/png")},
                data={"params": json.dumps({"instruction": "x", "steps": 150, "resolution": 512})},
            )
            assert long_edit.status_code == 202, long_edit.text
            answer = client.post(
                "/v1/trainings",
                data={"params": json.dumps(request(tiny_model_dir, name="my ink", max_steps=4))},
                files={
                    "dataset": (
                        "pairs.zip",
                        zip_folder(write_pairs(tmp_path / "pairs")),
                        "application/zip",
                    )
                },
            )
            assert answer.status_code == 202, answer.text
            training_id = answer.json()["id"]
            paused = wait_for(
                client, training_id, lambda s: s["state"] == "paused", headers=headers
            )
    finally:
        engine.kill()  # a crash: no shutdown of anything
        engine.wait()

    engine, url = start()
    try:
        with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
            status = client.get(f"/v1/trainings/{training_id}").json()
            assert status["state"] == "interrupted" and status["resumable"], status
            assert status["step"] == paused["step"]
            listed = client.get("/v1/trainings").json()["trainings"]
            assert [t["id"] for t in listed] == [training_id]
            assert client.post(f"/v1/trainings/{training_id}/resume").status_code == 202
            done = wait_for(
                client, training_id, lambda s: s["state"] in ("done", "failed"), headers=headers
            )
            assert done["state"] == "done", done["error"]
            lora = done["lora"]["path"]
            assert lora == "trained/my-ink/pytorch_lora_weights.safetensors"
            assert lora in client.get("/v1/models").json()["loras"]
            edit = client.post(
                "/v1/edits",
                files={"image": ("in.png", png_bytes((64, 64)), "image/png")},
                data={
                    "params": json.dumps(
                        {
                            "instruction": "make it red",
                            "steps": 2,
                            "resolution": 64,
                            "loras": [{"path": lora, "strength": 1.0}],
                        }
                    )
                },
            )
            assert edit.status_code == 202, edit.text
            final = wait_for_edit(client, edit.json()["id"])
            assert final["state"] == "done", final
    finally:
        engine.terminate()
        engine.wait(30)
    assert (data_dir / "loras" / "trained" / "my-ink" / "README.md").is_file()


def wait_for_edit(client: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/edits/{job_id}").json()
        if status["state"] in ("done", "failed", "cancelled"):
            return status
        time.sleep(0.1)
    raise AssertionError(f"edit {job_id} did not finish")


def test_flow_families_get_the_frozen_base_precision_that_fits_the_free_memory() -> None:
    from engine.server.trainings import ApiError, check_memory, flow_plan
    from training.job_runner import build_config

    gib = 2**30
    full = None  # a hub model not on disk: its full size
    assert flow_plan("flux-kontext", full, 40 * gib, "cuda")[0] == "none"
    assert flow_plan("flux-kontext", full, 20 * gib, "cuda")[0] == "torchao-int8"
    assert flow_plan("flux-kontext", full, 13 * gib, "cuda")[0] == "bnb-4bit"
    plan, need = flow_plan("qwen-image-edit", full, 16 * gib, "cuda")
    assert plan == "bnb-4bit" and need > 16 * gib
    with pytest.raises(ApiError, match=r"needs about 20\.0 GiB"):
        check_memory(need, 16 * gib, "GPU memory", "quick")
    # A small model scales down: a tiny test model trains anywhere; the CPU never quantizes.
    assert flow_plan("flux2-klein", 50_000_000, 1 * gib, "cuda") == ("none", pytest.approx(
        18.2 * gib * 50e6 / 16e9, rel=0.01))  # fmt: skip
    assert flow_plan("flux2-klein", 50_000_000, 1 * gib, "cpu")[0] == "none"
    # The runner hands the choice to the training package.
    job = {"settings": {"lora_rank": 4, "max_steps": 2, "resolution": 32, "batch_size": 1,
                        "grad_accum": 1, "learning_rate": 1e-4},
           "runner": {"base_quantization": "torchao-int8", "cache_conditioning": True},
           "model": "m"}  # fmt: skip
    config = build_config(job, Path("/tmp/job"))
    assert config.base_quantization == "torchao-int8" and config.cache_conditioning
