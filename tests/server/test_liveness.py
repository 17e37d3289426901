"""Liveness: /v1/health reports each worker; a fatal device error or a dead worker thread ends
the worker, fails its edit, and makes `instruct-edit serve` exit non-zero (so the plugin's
managed mode starts a fresh engine). Also the model cache: a failed load keeps the loaded
model, and an edit waiting for a load can be cancelled."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from service_helpers import AUTH, FakeEditor, FakeFactory, submit, wait_finished

from engine.server.workers import is_fatal_device_error

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


class WorkerKiller(BaseException):
    """Escapes every `except Exception`: what a bug in the worker loop looks like."""


class CudaCrashEditor(FakeEditor):
    def edit(self, image, params, mask=None, **kwargs):
        if params.instruction == "crash the gpu":
            raise RuntimeError(
                "CUDA error: an illegal memory access was encountered\nCUDA kernel errors "
                "might be asynchronously reported at some other API call"
            )
        if params.instruction == "kill the worker":
            raise WorkerKiller("simulated escape from the worker loop")
        if params.instruction == "fail":
            raise ValueError("an ordinary failure")
        return super().edit(image, params, mask, **kwargs)


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_fatal_device_errors_are_told_from_ordinary_ones():
    assert is_fatal_device_error(RuntimeError("CUDA error: an illegal memory access"))
    assert is_fatal_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_fatal_device_error(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert not is_fatal_device_error(ValueError("steps must be positive"))


def test_health_lists_each_worker_alive_and_busy(client_factory):
    gate = threading.Event()
    client = client_factory(FakeFactory(gate=gate), devices=("cpu", "cpu"))
    workers = client.get("/v1/health").json()["workers"]
    assert [w["alive"] for w in workers] == [True, True]
    # Busy while the default model preloads, then idle.
    wait_until(lambda: not any(w["busy"] for w in client.get("/v1/health").json()["workers"]))
    job_id = submit(client).json()["id"]
    wait_until(lambda: any(w["busy"] for w in client.get("/v1/health").json()["workers"]))
    busy = [w for w in client.get("/v1/health").json()["workers"] if w["busy"]]
    assert [w["job"] for w in busy] == [job_id]
    gate.set()
    wait_finished(client, job_id)


def test_a_fatal_cuda_error_fails_the_edit_ends_the_worker_and_calls_on_fatal(client_factory):
    client = client_factory(FakeFactory(editor=CudaCrashEditor))
    pool = client.app.state.service.pool
    reasons: list[str] = []
    pool.on_fatal = reasons.append
    # An ordinary failure leaves the worker alive.
    status = wait_finished(client, submit(client, {"instruction": "fail"}).json()["id"])
    assert status["state"] == "failed" and "ordinary" in status["error"]
    assert client.get("/v1/health").json()["workers"][0]["alive"] is True
    status = wait_finished(client, submit(client, {"instruction": "crash the gpu"}).json()["id"])
    assert status["state"] == "failed"
    assert "fatal error" in status["error"] and "restart" in status["error"]
    wait_until(lambda: bool(reasons))
    assert "illegal memory access" in reasons[0]
    health = client.get("/v1/health").json()
    assert health["status"] == "error"
    assert health["workers"][0]["alive"] is False
    # The error text only with the token: health is public, the text can quote paths.
    assert "illegal memory access" not in health["workers"][0]["error"]
    assert "engine log" in health["workers"][0]["error"]
    token = client.app.state.service.settings.token
    with_token = client.get("/v1/health", headers={"Authorization": f"Bearer {token}"}).json()
    assert "illegal memory access" in with_token["workers"][0]["error"]


def test_a_worker_thread_that_dies_fails_its_edit_and_calls_on_fatal(client_factory):
    client = client_factory(FakeFactory(editor=CudaCrashEditor))
    reasons: list[str] = []
    client.app.state.service.pool.on_fatal = reasons.append
    status = wait_finished(client, submit(client, {"instruction": "kill the worker"}).json()["id"])
    assert status["state"] == "failed" and "stopped" in status["error"]
    wait_until(lambda: bool(reasons))
    assert "WorkerKiller" in reasons[0]
    assert client.get("/v1/health").json()["workers"][0]["alive"] is False


# --- the model cache -------------------------------------------------------------------------


class FlakyFactory(FakeFactory):
    """Fails to load models named 'broken'; holds loads of 'slow' until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.slow_started = threading.Event()

    def __call__(self, model: str, device: str):
        if model.endswith("broken"):
            raise OSError("the weights are damaged")
        if model.endswith("slow"):
            self.slow_started.set()
            assert self.release.wait(10)
        return super().__call__(model, device)


def _models_dir(tmp_path: Path, *names: str) -> Path:
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")
    return tmp_path


def test_a_failed_load_keeps_the_loaded_model(client_factory, tmp_path):
    factory = FlakyFactory()
    client = client_factory(
        factory, models_dirs=(_models_dir(tmp_path, "broken"),), max_loaded_models=1
    )
    service = client.app.state.service
    first = wait_finished(client, submit(client).json()["id"])
    assert first["state"] == "done"
    loaded = service.pool.loaded_models()
    assert len(loaded) == 1
    failed = wait_finished(
        client, submit(client, {"instruction": "x", "model": "broken"}).json()["id"]
    )
    assert failed["state"] == "failed" and "damaged" in failed["error"]
    assert service.pool.loaded_models() == loaded, "the old model was evicted before the load"
    assert wait_finished(client, submit(client).json()["id"])["state"] == "done"
    assert len(factory.loaded) == 1, "the default model had to be loaded again"


def test_cancelling_an_edit_that_waits_for_its_model_load(client_factory, tmp_path):
    factory = FlakyFactory()
    client = client_factory(factory, models_dirs=(_models_dir(tmp_path, "slow"),))
    service = client.app.state.service
    assert wait_finished(client, submit(client).json()["id"])["state"] == "done"
    waiting = submit(client, {"instruction": "x", "model": "slow"}).json()["id"]
    assert factory.slow_started.wait(5)
    started = time.monotonic()
    client.delete(f"/v1/edits/{waiting}", headers=AUTH)
    assert wait_finished(client, waiting, timeout=5)["state"] == "cancelled"
    assert time.monotonic() - started < 2.0, "the cancel waited for the load"
    # The worker goes on with models it has while the abandoned load still runs.
    assert wait_finished(client, submit(client).json()["id"], timeout=5)["state"] == "done"
    factory.release.set()
    time.sleep(0.2)
    assert not any(m.endswith("slow") for m in service.pool.loaded_models()), (
        "the abandoned load's model was kept"
    )
    records = [r for r in service.pool.load_records() if r.model.endswith("slow")]
    assert records[-1].state == "failed" and "cancelled" in records[-1].error


# --- the real process --------------------------------------------------------------------------

SERVE_WITH_A_CRASHING_EDITOR = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {helpers!r})
    from test_liveness import CudaCrashEditor
    from service_helpers import FakeFactory
    import engine.server.app as app_module

    # The real `instruct-edit serve`, with the fast fake editor in place of model loading.
    app_module.real_editor_factory = lambda settings: FakeFactory(editor=CudaCrashEditor)
    from engine.cli import main
    sys.exit(main(["serve", "--port", "0", "--device", "cpu", "--token", "t" * 32]))
    """
)


def _serve_and_crash(tmp_path: Path, instruction: str) -> tuple[int, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", XDG_STATE_HOME=str(tmp_path / "state"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    script = SERVE_WITH_A_CRASHING_EDITOR.format(helpers=str(HERE))
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("listening on "), (line, process.stderr.read())
        url = line.removeprefix("listening on ")
        headers = {"Authorization": "Bearer " + "t" * 32}
        with httpx.Client(base_url=url, headers=headers, timeout=10) as http:
            assert http.get("/v1/health").json()["workers"][0]["alive"] is True
            accepted = http.post(
                "/v1/edits",
                files={"image": ("i.png", _png(), "image/png")},
                data={"params": f'{{"instruction": "{instruction}", "steps": 1}}'},
            )
            assert accepted.status_code == 202, accepted.text
        code = process.wait(timeout=30)
        return code, process.stderr.read() if process.stderr else ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _png() -> bytes:
    from service_helpers import png_bytes

    return png_bytes((16, 16))


@pytest.mark.slow
def test_serve_exits_non_zero_when_a_worker_thread_dies(tmp_path):
    # One process test (~15 s, most of it start-up): a fatal GPU error takes the same path
    # (the worker ends, the supervisor calls on_fatal), tested above without a process.
    code, stderr = _serve_and_crash(tmp_path, "kill the worker")
    assert code == 3, stderr
    assert "WorkerKiller" in stderr
