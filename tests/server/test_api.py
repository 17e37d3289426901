"""The HTTP API in process (TestClient) with a fast fake editor: routes, auth, limits, the queue."""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib

import pytest
from service_helpers import (
    AUTH,
    TOKEN,
    FakeEditor,
    FakeFactory,
    decode,
    png_bytes,
    submit,
    wait_finished,
)

from engine.editor import Progress
from engine.errors import InvalidInput, ModelNotFound, OutOfMemory
from engine.manifest import API_VERSION, DEFAULT_MODEL, MANIFEST


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"status", "message", "field"}, body
    assert body["error"]["status"] == response.status_code
    assert body["error"]["message"]
    return body["error"]


# --- health, models, auth -------------------------------------------------------------------


def test_health_needs_no_token_and_reports_versions_and_model(client_factory):
    client = client_factory()
    deadline = time.monotonic() + 5
    while (health := client.get("/v1/health").json())[
        "status"
    ] == "loading" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert health["status"] == "ok"
    assert health["version"] == MANIFEST["version"]
    assert health["api_version"] == API_VERSION
    assert health["model"] == DEFAULT_MODEL
    assert health["devices"] == ["cpu"] and health["device"] == "cpu"
    assert health["loaded_models"] == [DEFAULT_MODEL]
    assert health["model_loads"][0]["state"] == "ready"


def test_every_v1_route_but_health_requires_the_token(client_factory):
    client = client_factory()
    routes = [
        ("GET", "/v1/models"),
        ("POST", "/v1/edits"),
        ("GET", "/v1/edits/abc"),
        ("DELETE", "/v1/edits/abc"),
        ("GET", "/v1/edits/abc/events"),
        ("GET", "/v1/edits/abc/results/0"),
    ]
    for method, path in routes:
        missing = client.request(method, path)
        assert missing.status_code == 401, (method, path)
        assert missing.headers["www-authenticate"] == "Bearer"
        assert error_of(missing)["field"] == "Authorization"
        wrong = client.request(method, path, headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 403, (method, path)
        basic = client.request(method, path, headers={"Authorization": f"Basic {TOKEN}"})
        assert basic.status_code == 401, (method, path)
    assert client.get("/v1/models", headers=AUTH).status_code == 200


def test_no_cors_headers(client_factory):
    client = client_factory()
    response = client.get("/v1/health", headers={"Origin": "https://evil.example"})
    assert not any(name.lower().startswith("access-control-") for name in response.headers)
    preflight = client.options(
        "/v1/edits",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_models_lists_catalogue_and_models_dir_and_loras(client_factory, tmp_path):
    models_dir, loras_dir = tmp_path / "models", tmp_path / "loras"
    (models_dir / "my-style").mkdir(parents=True)
    (models_dir / "my-style" / "model_index.json").write_text("{}")
    (models_dir / "single.safetensors").write_bytes(b"x")
    (models_dir / "unsafe.ckpt").write_bytes(b"x")  # pickle: not offered without --allow-pickle
    (loras_dir / "sub").mkdir(parents=True)
    (loras_dir / "sub" / "ink.safetensors").write_bytes(b"x")
    client = client_factory(models_dirs=(models_dir,), loras_dirs=(loras_dir,))
    body = client.get("/v1/models", headers=AUTH).json()
    ids = {m["id"]: m for m in body["models"]}
    assert (
        DEFAULT_MODEL in ids
        and ids[DEFAULT_MODEL]["source"] == "catalogue"
        and ids[DEFAULT_MODEL]["default"]
    )
    assert "osunlp/InstructPix2Pix-MagicBrush" in ids
    assert ids["my-style"]["source"] == "models-dir" and ids["my-style"]["available_locally"]
    assert "single.safetensors" in ids and "unsafe.ckpt" not in ids
    assert body["loras"] == ["sub/ink.safetensors"]


# --- a whole edit ---------------------------------------------------------------------------


def test_submit_stream_and_fetch_results(client_factory):
    gate = threading.Event()
    client = client_factory(FakeFactory(step_s=0.01, gate=gate))
    accepted = submit(
        client,
        {"instruction": "make it blue", "steps": 3, "variants": 2},
        png_bytes((40, 24)),
        preview_every=1,
    )
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    events = []
    with client.stream("GET", f"/v1/edits/{job_id}/events", headers=AUTH) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                gate.set()  # start the edit once the stream is surely open
    assert events[-1][0] == "done" and events[-1][1]["state"] == "done"
    steps = [data["progress"]["step"] for name, data in events if name == "progress"]
    # Updates may coalesce (a stream sends the latest state), but they never go backwards.
    assert steps == sorted(steps) and len(steps) >= 2
    assert events[-1][1]["progress"] == {"step": 3, "total": 3, "fraction": 1.0, "eta_s": None, "note": None}
    assert any(data["preview_png"] for _, data in events), "asked for previews, got none"
    running = [
        data for _, data in events if data["state"] == "running" and data["progress"]["step"] == 1
    ]
    assert running and running[0]["progress"]["eta_s"] is not None
    status = client.get(f"/v1/edits/{job_id}", headers=AUTH).json()
    assert status["state"] == "done" and len(status["results"]) == 2
    for k in range(2):
        response = client.get(f"/v1/edits/{job_id}/results/{k}", headers=AUTH)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert decode(response.content).size == (40, 24)
    assert error_of(client.get(f"/v1/edits/{job_id}/results/2", headers=AUTH))["field"] == "k"


def test_events_of_a_finished_job_end_at_once(client_factory):
    client = client_factory()
    job_id = submit(client).json()["id"]
    wait_finished(client, job_id)
    with client.stream("GET", f"/v1/edits/{job_id}/events", headers=AUTH) as stream:
        text = "".join(stream.iter_text())
    assert "event: done" in text


def test_unknown_job_is_404_everywhere(client_factory):
    client = client_factory()
    for method, path in [
        ("GET", "/v1/edits/nope"),
        ("DELETE", "/v1/edits/nope"),
        ("GET", "/v1/edits/nope/events"),
        ("GET", "/v1/edits/nope/results/0"),
    ]:
        response = client.request(method, path, headers=AUTH)
        assert response.status_code == 404, (method, path)
        assert error_of(response)["field"] == "id"


def test_mask_and_rgba_reach_the_editor(client_factory):
    factory = FakeFactory()
    client = client_factory(factory)
    image = png_bytes((32, 32), (1, 2, 3, 100), mode="RGBA")
    job_id = submit(client, image=image, mask=png_bytes((32, 32), 255, mode="L")).json()["id"]
    assert wait_finished(client, job_id)["state"] == "done"
    assert decode(client.get(f"/v1/edits/{job_id}/results/0", headers=AUTH).content).mode == "RGBA"


# --- request validation and limits -----------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"instruction": "x", "colour": "red"}, "colour"),
        ({"instruction": "x", "steps": 0}, "steps"),
        ({"instruction": "x", "steps": 10_000}, "steps"),
        ({"instruction": "x", "variants": 99}, "variants"),
        ({"instruction": "x", "resolution": 16}, "resolution"),
        ({"instruction": "x", "text_guidance": 1e9}, "text_guidance"),
        ({"instruction": "x" * 5000}, "instruction"),
        ({"steps": 3}, "instruction"),
        ({"instruction": "x", "model": "/etc"}, "model"),
        ({"instruction": "x", "model": "../../secret"}, "model"),
        ({"instruction": "x", "loras": [{"path": "a.safetensors"}]}, "loras"),
    ],
)
def test_bad_params_are_422_naming_the_field(client_factory, params, field):
    response = submit(client_factory(), params)
    assert response.status_code == 422, response.text
    assert error_of(response)["field"] == field


def test_malformed_requests_are_422(client_factory):
    client = client_factory()
    bad_json = client.post(
        "/v1/edits",
        headers=AUTH,
        files={"image": ("a.png", png_bytes(), "image/png")},
        data={"params": "{not json"},
    )
    assert error_of(bad_json)["field"] == "params"
    not_object = client.post(
        "/v1/edits",
        headers=AUTH,
        files={"image": ("a.png", png_bytes(), "image/png")},
        data={"params": "[1]"},
    )
    assert error_of(not_object)["field"] == "params"
    no_image = client.post("/v1/edits", headers=AUTH, data={"params": '{"instruction": "x"}'})
    assert error_of(no_image)["field"] == "image"
    extra_field = submit(client, colour="red")
    assert error_of(extra_field)["field"] == "colour"
    jpeg = submit(client, image=b"\xff\xd8\xff\xe0 not a png")
    assert error_of(jpeg)["field"] == "image"
    truncated = submit(client, image=png_bytes()[:60])
    assert error_of(truncated)["field"] == "image"
    mismatched = submit(client, mask=png_bytes((10, 10), 255, mode="L"))
    assert error_of(mismatched)["field"] == "mask"
    assert error_of(client.get("/v1/edits/x/results/-1", headers=AUTH))["status"] == 422


def test_upload_over_the_limit_is_413_declared_or_streamed(client_factory):
    client = client_factory(max_upload_mb=0.05)
    big = png_bytes((400, 400), None)  # noise-free but still > 50 KiB once padded below
    big = big + b"\0" * 60_000
    declared = submit(client, image=big)
    assert declared.status_code == 413 and error_of(declared)["field"] == "image"

    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="params"\r\n\r\n{}\r\n'
        for _ in range(20):
            yield (
                b'--b\r\nContent-Disposition: form-data; name="pad"\r\n\r\n' + b"x" * 8000 + b"\r\n"
            )
        yield b"--b--\r\n"

    streamed = client.post(
        "/v1/edits",
        headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"},
        content=chunks(),
    )
    assert streamed.status_code == 413, streamed.text
    assert "limit" in error_of(streamed)["message"]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size in its header (a decompression bomb's first bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


def test_pixel_count_limit_and_decompression_bombs_are_413(client_factory):
    client = client_factory(max_image_pixels=100 * 100)
    over = submit(client, image=png_bytes((101, 100)))
    assert over.status_code == 413 and error_of(over)["field"] == "image"
    bomb = submit(client, image=_png_header_only(60_000, 60_000))
    assert bomb.status_code == 413
    client_default = client_factory()
    assert submit(client_default, image=_png_header_only(60_000, 60_000)).status_code == 413


# --- queue, cancel, results lifetime --------------------------------------------------------


def test_full_queue_answers_429_with_retry_after(client_factory):
    gate = threading.Event()
    client = client_factory(FakeFactory(gate=gate), queue_size=2)
    first = submit(client).json()["id"]
    deadline = time.monotonic() + 5
    while client.get(f"/v1/edits/{first}", headers=AUTH).json()["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    queued = [submit(client).json()["id"] for _ in range(2)]
    rejected = submit(client)
    assert rejected.status_code == 429
    assert int(rejected.headers["retry-after"]) >= 1
    assert "queue is full" in error_of(rejected)["message"]
    assert client.get(f"/v1/edits/{queued[1]}", headers=AUTH).json()["queue_position"] == 1
    gate.set()
    for job_id in [first, *queued]:
        assert wait_finished(client, job_id)["state"] == "done"
    assert submit(client).status_code == 202


def test_cancel_queued_and_running_jobs(client_factory):
    gate = threading.Event()
    factory = FakeFactory(step_s=0.02, gate=gate)
    client = client_factory(factory)
    running = submit(client, {"instruction": "x", "steps": 200}).json()["id"]
    queued = submit(client).json()["id"]
    deadline = time.monotonic() + 5
    while client.get(f"/v1/edits/{running}", headers=AUTH).json()["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cancelled = client.delete(f"/v1/edits/{queued}", headers=AUTH).json()
    assert cancelled["state"] == "cancelled"
    gate.set()
    time.sleep(0.05)  # a few steps in
    assert client.delete(f"/v1/edits/{running}", headers=AUTH).status_code == 200
    started = time.monotonic()
    status = wait_finished(client, running)
    assert status["state"] == "cancelled"
    assert time.monotonic() - started < 1.0, "cancel took longer than a few steps"
    assert status["progress"]["step"] < 200
    # The worker goes on with the next job.
    assert wait_finished(client, submit(client).json()["id"])["state"] == "done"
    assert factory.editors[DEFAULT_MODEL].calls[-1].instruction == "make it blue"


def test_delete_of_a_finished_job_discards_its_results(client_factory):
    client = client_factory()
    job_id = submit(client).json()["id"]
    wait_finished(client, job_id)
    status = client.delete(f"/v1/edits/{job_id}", headers=AUTH).json()
    assert status["state"] == "done" and status["results"][0]["available"] is False
    gone = client.get(f"/v1/edits/{job_id}/results/0", headers=AUTH)
    assert gone.status_code == 410 and "DELETE" in error_of(gone)["message"]


def test_results_expire_after_the_ttl_with_410(client_factory):
    client = client_factory(result_ttl_s=0.3)
    job_id = submit(client).json()["id"]
    assert wait_finished(client, job_id)["results_expire_in_s"] <= 0.3
    time.sleep(0.4)
    gone = client.get(f"/v1/edits/{job_id}/results/0", headers=AUTH)
    assert gone.status_code == 410
    assert "--result-ttl" in error_of(gone)["message"]
    assert client.get(f"/v1/edits/{job_id}", headers=AUTH).json()["results_released"]


def test_result_memory_cap_evicts_oldest_with_410(client_factory):
    one_result = 64 * 48 * 4  # what the fake returns: RGB pixels, kept with 4 bytes each
    client = client_factory(result_memory_mb=1.5 * one_result / 2**20)  # room for one result
    service = client.app.state.service
    first = submit(client).json()["id"]
    wait_finished(client, first)
    second = submit(client).json()["id"]
    wait_finished(client, second)
    assert service.queue.stored_result_bytes <= service.settings.result_memory_bytes
    gone = client.get(f"/v1/edits/{first}/results/0", headers=AUTH)
    assert gone.status_code == 410 and "--result-memory-mb" in error_of(gone)["message"]
    assert client.get(f"/v1/edits/{second}/results/0", headers=AUTH).status_code == 200


def test_results_not_ready_yet_is_409(client_factory):
    gate = threading.Event()
    client = client_factory(FakeFactory(gate=gate))
    job_id = submit(client).json()["id"]
    assert client.get(f"/v1/edits/{job_id}/results/0", headers=AUTH).status_code == 409
    gate.set()
    wait_finished(client, job_id)


# --- models, LoRAs, failures -----------------------------------------------------------------


def test_model_switching_loads_each_model_once(client_factory, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text("{}")
    factory = FakeFactory()
    # allow_downloads: the catalogue model is not in this machine's cache (the fake loads it).
    client = client_factory(factory, models_dirs=(tmp_path,), allow_downloads=True)
    for model in [None, "other", None, "other", "osunlp/InstructPix2Pix-MagicBrush", "other"]:
        params = {"instruction": "x", "steps": 1, "model": model}
        assert wait_finished(client, submit(client, params).json()["id"])["state"] == "done"
    assert [m for m, _ in factory.loaded] == [
        DEFAULT_MODEL,
        str((tmp_path / "other").resolve()),
        "osunlp/InstructPix2Pix-MagicBrush",
    ]
    loaded = client.get("/v1/health").json()["loaded_models"]
    assert len(loaded) == 2  # max_loaded_models: the least recently used one was unloaded


def test_loras_resolve_only_inside_the_loras_dir(client_factory, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "ink.safetensors").write_bytes(b"x")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (loras / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    factory = FakeFactory()
    client = client_factory(factory, loras_dirs=(loras,))
    for name in [
        "../outside.safetensors",
        str(tmp_path / "outside.safetensors"),
        "link.safetensors",
        "nope.safetensors",
    ]:
        response = submit(client, {"instruction": "x", "loras": [{"path": name}]})
        assert response.status_code == 422 and error_of(response)["field"] == "loras", name
    ok = submit(
        client,
        {"instruction": "x", "steps": 1, "loras": [{"path": "ink.safetensors", "strength": 0.5}]},
    )
    assert wait_finished(client, ok.json()["id"])["state"] == "done"
    lora = factory.editors[DEFAULT_MODEL].calls[-1].loras[0]
    assert lora.path == str((loras / "ink.safetensors").resolve()) and lora.strength == 0.5


def test_a_failing_job_fails_with_a_message_and_the_worker_survives(client_factory):
    class Exploding(FakeEditor):
        def edit(self, image, params, mask=None, **kwargs):
            if params.instruction == "boom":
                raise RuntimeError("kaboom")
            if params.instruction == "bad":
                raise InvalidInput("the mask is upside down", "mask")
            return super().edit(image, params, mask, **kwargs)

    client = client_factory(lambda model, device: Exploding(model, device))
    boom = wait_finished(client, submit(client, {"instruction": "boom"}).json()["id"])
    assert boom["state"] == "failed" and "kaboom" in boom["error"]
    bad = wait_finished(client, submit(client, {"instruction": "bad"}).json()["id"])
    assert bad["state"] == "failed" and bad["error_field"] == "mask"
    assert wait_finished(client, submit(client).json()["id"])["state"] == "done"


def test_out_of_memory_unloads_other_models_then_retries_then_fails_clearly(
    client_factory, tmp_path
):
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "model_index.json").write_text("{}")
    loaded_now: list[str] = []

    class Hungry(FakeEditor):
        def edit(self, image, params, mask=None, **kwargs):
            # Fits only when it is the sole model loaded, unless asked for the impossible.
            if (
                params.instruction == "huge"
                or len(client.app.state.service.pool.loaded_models()) > 1
            ):
                raise OutOfMemory("CUDA out of memory", "resolution")
            return super().edit(image, params, mask, **kwargs)

    def make(model, device):
        loaded_now.append(model)
        return Hungry(model, device)

    client = client_factory(make, models_dirs=(tmp_path,))
    status = wait_finished(
        client, submit(client, {"instruction": "x", "steps": 1, "model": "big"}).json()["id"]
    )
    assert status["state"] == "done", status
    huge = wait_finished(
        client, submit(client, {"instruction": "huge", "model": "big"}).json()["id"]
    )
    assert (
        huge["state"] == "failed"
        and "out of memory" in huge["error"]
        and huge["error_field"] == "resolution"
    )
    assert (
        wait_finished(client, submit(client, {"instruction": "x", "steps": 1}).json()["id"])[
            "state"
        ]
        == "done"
    )


def test_model_that_fails_to_load_reports_error_in_health_and_job(client_factory):
    def make(model, device):
        raise ModelNotFound(
            f"model {model} is not on this machine and the hub is unreachable", "model"
        )

    client = client_factory(make)
    deadline = time.monotonic() + 5
    while (health := client.get("/v1/health").json())["status"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert health["status"] == "error"
    # Without the token health says only that it failed (the reason may quote paths).
    assert "see the engine log" in health["model_loads"][0]["error"]
    health = client.get("/v1/health", headers=AUTH).json()
    assert "unreachable" in health["model_loads"][0]["error"]
    failed = wait_finished(client, submit(client).json()["id"])
    assert (
        failed["state"] == "failed"
        and "unreachable" in failed["error"]
        and failed["error_field"] == "model"
    )


def test_a_client_leaving_mid_stream_harms_nothing(client_factory):
    client = client_factory(FakeFactory(step_s=0.01))
    job_id = submit(client, {"instruction": "x", "steps": 30}).json()["id"]
    with client.stream("GET", f"/v1/edits/{job_id}/events", headers=AUTH) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first event
    assert wait_finished(client, job_id)["state"] == "done"
    job = client.app.state.service.queue.get(job_id)
    deadline = time.monotonic() + 2
    while job.listeners and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.listeners == []
    assert client.get(f"/v1/edits/{job_id}/results/0", headers=AUTH).status_code == 200


def test_openapi_describes_every_route_and_the_token(client_factory):
    schema = client_factory().get("/openapi.json").json()
    assert set(schema["paths"]) == {
        "/v1/health",
        "/v1/models",
        "/v1/edits",
        "/v1/edits/{job_id}",
        "/v1/edits/{job_id}/events",
        "/v1/edits/{job_id}/results/{k}",
        "/v1/training-options",
        "/v1/trainings",
        "/v1/trainings/{training_id}",
        "/v1/trainings/{training_id}/events",
        "/v1/trainings/{training_id}/resume",
        "/v1/trainings/{training_id}/validations/{index}",
    }
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "security" not in schema["paths"]["/v1/health"]["get"]
    post = schema["paths"]["/v1/edits"]["post"]
    assert {"202", "401", "403", "413", "422", "429"} <= set(post["responses"])
    edit_params = schema["components"]["schemas"]["EditParams"]
    assert "description" in edit_params["additionalProperties"]  # the family's parameters
    assert edit_params["properties"]["steps"]["anyOf"][1] == {"type": "null"}
    body = post["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["required"] == ["image", "params"]
    assert "image/x-raw" in body["encoding"]["image"]["contentType"]
    result = schema["paths"]["/v1/edits/{job_id}/results/{k}"]["get"]
    assert {"image/png", "image/x-raw"} <= set(result["responses"]["200"]["content"])
    assert any(p["name"] == "format" for p in result["parameters"])
    assert {"Health", "ModelsResponse", "ParamSpecSchema", "Limits"} <= set(
        schema["components"]["schemas"]
    )
    assert (
        "text/event-stream"
        in schema["paths"]["/v1/edits/{job_id}/events"]["get"]["responses"]["200"]["content"]
    )


def test_a_long_first_use_is_named_in_the_progress_note_until_the_steps_start(client_factory):
    release = threading.Event()
    seen: list[dict] = []

    class Converting(FakeEditor):
        def edit(self, image, params, mask=None, *, on_progress=None, **kwargs):
            on_progress(Progress(step=0, total=params.steps, note="Converting the model…"))
            assert release.wait(10)
            return super().edit(image, params, mask, on_progress=on_progress, **kwargs)

    client = client_factory(lambda model, device: Converting(model, device))
    job = submit(client, {"instruction": "x", "steps": 2}).json()["id"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        seen.append(client.get(f"/v1/edits/{job}", headers=AUTH).json())
        if seen[-1]["progress"]["note"]:
            break
        time.sleep(0.02)
    assert seen[-1]["state"] == "running"
    assert seen[-1]["progress"] == {"step": 0, "total": 2, "fraction": 0.0, "eta_s": None,
                                    "note": "Converting the model…"}  # fmt: skip
    release.set()
    done = wait_finished(client, job)
    assert done["state"] == "done" and done["progress"]["note"] is None
