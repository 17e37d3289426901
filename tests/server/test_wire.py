"""Pixels on the wire (raw and PNG, both ways, lossless) and per-model parameters, through the
HTTP API with an editor that answers with its input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_helpers import (
    AUTH,
    EchoEditor,
    FakeFactory,
    decode,
    make_settings,
    png_bytes,
    raw_type,
    submit,
    wait_finished,
)

from engine.cli import build_parser
from engine.devices import MEMORY_PLAN_CHOICES
from engine.manifest import DEFAULT_MODEL
from engine.quantization import QUANTIZATIONS
from engine.server import cli, create_app
from engine.server.instance import ENGINE_PACKAGE_DIR, install_id


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["status"] == response.status_code
    return body["error"]


def bgra_image(width: int, height: int, seed: int, partial_alpha: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    if partial_alpha:
        pixels[: height // 2, :, 3] = 255  # opaque top half, every alpha value below
    else:
        pixels[..., 3] = 255
    return pixels


def result(client, job_id: str, fmt: str | None, k: int = 0):
    query = f"?format={fmt}" if fmt else ""
    response = client.get(f"/v1/edits/{job_id}/results/{k}{query}", headers=AUTH)
    assert response.status_code == 200, response.text
    return response


def echo_client(client_factory, **settings):
    factory = FakeFactory(editor=EchoEditor)
    return client_factory(factory, **settings), factory


def run_edit(client, **kwargs) -> str:
    accepted = submit(client, {"instruction": "x", "steps": 1}, **kwargs)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    assert wait_finished(client, job_id)["state"] == "done"
    return job_id


# --- raw uploads and results ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "partial_alpha"),
    [(3001, 1999, True), (37, 23, False), (1, 1, True)],
)
def test_raw_bgra8_round_trip_is_byte_identical(client_factory, width, height, partial_alpha):
    client, factory = echo_client(client_factory)
    bgra = bgra_image(width, height, seed=width, partial_alpha=partial_alpha)
    job_id = run_edit(client, image=bgra.tobytes(), image_type=raw_type("bgra8", width, height))
    received = factory.editors[DEFAULT_MODEL].inputs[0]
    # RGBA iff some alpha < 255: opaque stays opaque (RGB), alpha comes through exactly.
    assert received.mode == ("RGBA" if (bgra[..., 3] < 255).any() else "RGB")
    assert received.mode == ("RGBA" if partial_alpha else "RGB")
    raw = result(client, job_id, "bgra8")
    assert raw.content == bgra.tobytes()
    assert raw.headers["content-type"] == raw_type("bgra8", width, height)
    assert raw.headers["x-image-width"] == str(width)
    assert raw.headers["x-image-height"] == str(height)
    rgba = result(client, job_id, "rgba8")
    assert rgba.content == bgra[..., [2, 1, 0, 3]].tobytes()
    assert rgba.headers["content-type"] == raw_type("rgba8", width, height)
    png = decode(result(client, job_id, None).content)
    assert png.size == (width, height)
    assert np.array_equal(np.asarray(png.convert("RGBA")), bgra[..., [2, 1, 0, 3]])


def test_raw_rgba8_upload_and_opaque_results_have_alpha_255(client_factory):
    client, factory = echo_client(client_factory)
    rgba = bgra_image(31, 17, seed=1, partial_alpha=False)
    job_id = run_edit(client, image=rgba.tobytes(), image_type=raw_type("rgba8", 31, 17))
    assert factory.editors[DEFAULT_MODEL].inputs[0].mode == "RGB"
    assert result(client, job_id, "rgba8").content == rgba.tobytes()
    bgra = np.frombuffer(result(client, job_id, "bgra8").content, np.uint8).reshape(17, 31, 4)
    assert np.array_equal(bgra[..., [2, 1, 0, 3]], rgba) and (bgra[..., 3] == 255).all()
    png = decode(result(client, job_id, "png").content)
    assert png.mode == "RGB" and np.array_equal(np.asarray(png), rgba[..., :3])


def test_png_upload_can_be_fetched_raw_and_png_results_are_cached(client_factory):
    client, _ = echo_client(client_factory)
    pixels = bgra_image(40, 30, seed=2, partial_alpha=True)[..., [2, 1, 0, 3]]  # RGBA
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buffer, format="PNG")
    job_id = run_edit(client, image=buffer.getvalue())
    stored = client.app.state.service.queue.stored_result_bytes
    first = result(client, job_id, "png").content
    assert client.app.state.service.queue.stored_result_bytes == stored + len(first)
    assert result(client, job_id, "png").content == first  # the cached copy
    assert np.array_equal(np.asarray(decode(first)), pixels)
    assert result(client, job_id, "rgba8").content == pixels.tobytes()
    bad = client.get(f"/v1/edits/{job_id}/results/0?format=jpeg", headers=AUTH)
    assert bad.status_code == 422 and error_of(bad)["field"] == "format"


def test_a_soft_gray8_mask_reaches_the_editor_exactly(client_factory):
    client, factory = echo_client(client_factory)
    width, height = 33, 21
    image = bgra_image(width, height, seed=3, partial_alpha=True)
    ramp = (np.arange(width * height) % 256).astype(np.uint8).reshape(height, width)
    run_edit(
        client,
        image=image.tobytes(),
        image_type=raw_type("bgra8", width, height),
        mask=ramp.tobytes(),
        mask_type=raw_type("gray8", width, height),
    )
    mask = factory.editors[DEFAULT_MODEL].inputs[1]
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), ramp)


def test_png_mask_with_a_raw_image_and_the_reverse(client_factory):
    client, factory = echo_client(client_factory)
    image = bgra_image(8, 6, seed=4, partial_alpha=False)
    run_edit(
        client,
        image=image.tobytes(),
        image_type=raw_type("bgra8", 8, 6),
        mask=png_bytes((8, 6), 128, mode="L"),
    )
    assert np.asarray(factory.editors[DEFAULT_MODEL].inputs[1]).max() == 128
    run_edit(
        client,
        image=png_bytes((8, 6)),
        mask=np.full((6, 8), 7, np.uint8).tobytes(),
        mask_type=raw_type("gray8", 8, 6),
    )
    assert np.asarray(factory.editors[DEFAULT_MODEL].inputs[1]).max() == 7


@pytest.mark.parametrize(
    ("content_type", "size", "status", "field"),
    [
        (raw_type("bgra8", 10, 10), 10 * 10 * 4 - 1, 422, "image"),  # one byte short
        (raw_type("bgra8", 10, 10), 10 * 10 * 4 + 4, 422, "image"),  # one pixel too many
        (raw_type("rgba8", 10, 10), 10 * 10 * 3, 422, "image"),  # RGB bytes declared as rgba8
        ("image/x-raw; format=bgra8; width=10", 400, 422, "image"),  # no height
        ("image/x-raw; format=bgra8; width=0; height=10", 0, 422, "image"),
        ("image/x-raw; format=bgra8; width=-4; height=10", 400, 422, "image"),
        ("image/x-raw; format=bgra8; width=ten; height=10", 400, 422, "image"),
        ("image/x-raw; width=10; height=10", 400, 422, "image"),  # no format
        (raw_type("gray8", 10, 10), 100, 422, "image"),  # gray8 is for masks
        (raw_type("bgra16", 10, 10), 800, 422, "image"),
        (raw_type("bgra8", 101, 100), 101 * 100 * 4, 413, "image"),  # over max_image_pixels
        (raw_type("bgra8", 10**8, 10**8), 16, 413, "image"),  # absurd: refused before reading
    ],
)
def test_bad_raw_uploads_name_the_part(client_factory, content_type, size, status, field):
    client, _ = echo_client(client_factory, max_image_pixels=100 * 100)
    response = submit(client, image=b"\xff" * size, image_type=content_type)
    assert response.status_code == status, response.text
    assert error_of(response)["field"] == field


@pytest.mark.parametrize(
    ("mask_type", "size"),
    [
        (raw_type("gray8", 10, 10), 99),  # byte count
        (raw_type("gray8", 10, 9), 90),  # another size than the image
        (raw_type("bgra8", 10, 10), 400),  # masks are gray8
    ],
)
def test_bad_raw_masks_name_the_mask(client_factory, mask_type, size):
    client, _ = echo_client(client_factory)
    response = submit(
        client,
        image=bgra_image(10, 10, 0, False).tobytes(),
        image_type=raw_type("bgra8", 10, 10),
        mask=b"\x80" * size,
        mask_type=mask_type,
    )
    assert response.status_code == 422, response.text
    assert error_of(response)["field"] == "mask"


def test_a_png_declared_as_octet_stream_still_works(client_factory):
    client, _ = echo_client(client_factory)
    job_id = run_edit(client, image=png_bytes((5, 4)), image_type="application/octet-stream")
    assert decode(result(client, job_id, None).content).size == (5, 4)


# --- the multipart body ---------------------------------------------------------------------


def multipart(*parts: tuple[str, bytes, str | None], preamble: bytes = b"") -> bytes:
    body = preamble
    for name, data, content_type in parts:
        body += b"--XyZ\r\n"
        body += f'Content-Disposition: form-data; name="{name}"; filename="f"\r\n'.encode()
        if content_type:
            body += f"Content-Type: {content_type}\r\n".encode()
        body += b"\r\n" + data + b"\r\n"
    return body + b"--XyZ--\r\n"


def post_body(client, body: bytes):
    headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=XyZ"}
    return client.post("/v1/edits", headers=headers, content=body)


def test_hand_made_multipart_bodies(client_factory):
    client, _ = echo_client(client_factory)
    params = ("params", b'{"instruction": "x", "steps": 1}', None)
    # Data that contains the boundary text without the leading CRLF is data.
    image = bgra_image(4, 4, 5, False).tobytes()[:-8] + b"--XyZ\x00\x00\x00"
    ok = post_body(
        client, multipart(("image", image, raw_type("bgra8", 4, 4)), params, preamble=b"hi\r\n")
    )
    assert ok.status_code == 202, ok.text
    job_id = ok.json()["id"]
    wait_finished(client, job_id)
    assert result(client, job_id, "bgra8").content == image
    twice = post_body(client, multipart(("image", b"a", None), ("image", b"b", None), params))
    assert twice.status_code == 422 and error_of(twice)["field"] == "image"
    truncated = post_body(client, multipart(("image", b"a", None), params)[:-12])
    assert truncated.status_code == 422 and "boundary" in error_of(truncated)["message"]
    no_boundary = client.post(
        "/v1/edits", headers={**AUTH, "Content-Type": "multipart/form-data"}, content=b"x"
    )
    assert no_boundary.status_code == 422
    missing = post_body(client, multipart(params))
    assert missing.status_code == 422 and error_of(missing)["field"] == "image"
    bad_preview = submit(client, preview_every="-1")
    assert bad_preview.status_code == 422 and error_of(bad_preview)["field"] == "preview_every"


# --- per-model parameters -------------------------------------------------------------------


def test_old_v1_client_png_and_flat_guidance_still_works(client_factory):
    client, factory = echo_client(client_factory)
    params = {
        "instruction": "make it blue",
        "text_guidance": 5,
        "image_guidance": 1.2,
        "scheduler": "euler",
        "steps": 3,
        "resolution": 256,
    }
    accepted = submit(client, params, png_bytes((12, 10), (9, 8, 7)))
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    assert wait_finished(client, job_id)["state"] == "done"
    response = result(client, job_id, None)
    assert response.headers["content-type"] == "image/png"
    assert decode(response.content).getpixel((0, 0)) == (9, 8, 7)
    sent = factory.editors[DEFAULT_MODEL].calls[-1]
    assert sent.steps == 3 and sent.resolution == 256
    assert dict(sent.options) == {"text_guidance": 5.0, "image_guidance": 1.2, "scheduler": "euler"}


@pytest.mark.parametrize(
    ("params", "field", "hint"),
    [
        ({"guidance": 2.5}, "guidance", "text_guidance"),  # a FLUX knob sent to IP2P
        ({"text_guidance": 99}, "text_guidance", "0"),
        ({"scheduler": "karras"}, "scheduler", "euler"),
        ({"true_cfg_scale": 4.0}, "true_cfg_scale", "image_guidance"),
    ],
)
def test_a_family_parameter_the_model_does_not_take_is_422_naming_it(
    client_factory, params, field, hint
):
    client, _ = echo_client(client_factory)
    response = submit(client, {"instruction": "x", **params})
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["field"] == field and hint in error["message"]


def test_a_preset_the_model_does_not_offer_is_422_naming_it(client_factory):
    client, _ = echo_client(client_factory)
    response = submit(client, {"instruction": "x", "preset": "lightning-8"})
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["field"] == "preset" and "not offered" in error["message"]


def test_the_models_family_decides_which_parameters_it_takes(client_factory, tmp_path):
    (tmp_path / "kontext").mkdir()
    (tmp_path / "kontext" / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxKontextPipeline"})
    )
    client, factory = echo_client(client_factory, models_dirs=(tmp_path,))
    ip2p_knob = submit(client, {"instruction": "x", "model": "kontext", "text_guidance": 7})
    assert ip2p_knob.status_code == 422 and error_of(ip2p_knob)["field"] == "text_guidance"
    assert "guidance" in error_of(ip2p_knob)["message"]
    job_id = run_edit_with(client, {"instruction": "x", "model": "kontext", "guidance": 3})
    assert wait_finished(client, job_id)["state"] == "done"
    target = str((tmp_path / "kontext").resolve())
    assert dict(factory.editors[target].calls[-1].options) == {"guidance": 3.0}


def run_edit_with(client, params) -> str:
    accepted = submit(client, params)
    assert accepted.status_code == 202, accepted.text
    return accepted.json()["id"]


def test_models_publish_family_parameters_catalogue_facts_and_limits(client_factory, tmp_path):
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "model_index.json").write_text(
        json.dumps({"_class_name": "QwenImageEditPlusPipeline"})
    )
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "model_index.json").write_text(json.dumps({"_class_name": "Nope"}))
    (tmp_path / "single.safetensors").write_bytes(b"x")
    client, _ = echo_client(client_factory, models_dirs=(tmp_path,))
    body = client.get("/v1/models", headers=AUTH).json()
    models = {model["id"]: model for model in body["models"]}
    ip2p = models[DEFAULT_MODEL]
    assert ip2p["family"] == "sd-ip2p" and ip2p["family_label"]
    params = {spec["name"]: spec for spec in ip2p["params"]}
    assert set(params) == {"text_guidance", "image_guidance", "scheduler"}
    assert params["text_guidance"]["kind"] == "float"
    assert params["text_guidance"]["minimum"] == 0 and params["text_guidance"]["maximum"] == 30
    assert "euler" in params["scheduler"]["choices"]
    assert ip2p["resolution"]["rule"] == "long_side" and ip2p["steps"]["default"] >= 1
    assert ip2p["supports"]["mask"] is True
    assert ip2p["non_commercial"] is False and ip2p["licence"] == "MIT"
    assert ip2p["download_gb"] > 0 and "full" in ip2p["vram_gb"]
    assert ip2p["recommended"]["options"]["text_guidance"] == params["text_guidance"]["default"]
    kontext = models["black-forest-labs/FLUX.1-Kontext-dev"]
    assert kontext["family"] == "flux-kontext" and kontext["non_commercial"] is True
    assert [spec["name"] for spec in kontext["params"]] == ["guidance"]
    assert models["qwen"]["family"] == "qwen-image-edit"
    assert {spec["name"] for spec in models["qwen"]["params"]} >= {"true_cfg_scale"}
    assert models["single.safetensors"]["family"] == "sd-ip2p"
    assert models["odd"]["family"] is None and models["odd"]["params"] == []
    presets = [p for model in body["models"] for p in model["presets"]]
    assert any(preset["steps"] for preset in presets), "Qwen's Lightning presets"
    limits = body["limits"]
    assert limits["max_variants"] >= 1 and limits["max_loras"] >= 1
    assert limits["lora_strength"][0] < 0 < limits["lora_strength"][1]


# --- health: memory and the engine instance -------------------------------------------------


def test_health_reports_memory_per_device_and_the_instance(client_factory, tmp_path):

    token_file = tmp_path / "token"
    app = create_app(make_settings(token_file=token_file), editor_factory=FakeFactory())
    with TestClient(app, client=("127.0.0.1", 50000)) as local:
        health = local.get("/v1/health").json()
    (memory,) = health["memory"]
    assert memory["device"] == "cpu" and memory["quantization"] == "none"
    assert memory["plan"] == "full"  # a CPU has nothing to offload to
    assert memory["total_bytes"] > 0 and 0 < memory["free_bytes"] <= memory["total_bytes"]
    instance = health["instance"]
    assert instance["install_id"] == install_id(sys.executable, ENGINE_PACKAGE_DIR)
    assert instance["token_file"] == str(token_file) and instance["pid"] == os.getpid()
    forced = client_factory(FakeFactory(), memory_plan="model-offload").get("/v1/health").json()
    assert forced["memory"][0]["plan"] == "model-offload"


def test_health_hides_local_details_from_remote_clients(client_factory, tmp_path):

    app = create_app(make_settings(token_file=tmp_path / "t"), editor_factory=FakeFactory())
    with TestClient(app, client=("192.0.2.7", 50000)) as remote:
        instance = remote.get("/v1/health").json()["instance"]
    assert instance["token_file"] is None and instance["pid"] is None
    assert len(instance["install_id"]) == 16


def test_install_id_recipe(tmp_path):

    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python3").write_text("")
    os.symlink(venv / "python3", venv / "python")
    package = tmp_path / "src" / "engine"
    package.mkdir(parents=True)
    expected = hashlib.sha256(
        f"{os.path.realpath(venv)}\n{os.path.realpath(package)}".encode()
    ).hexdigest()[:16]
    assert install_id(str(venv / "python"), str(package)) == expected
    assert install_id(str(venv / "python3"), str(package)) == expected  # one environment
    other = tmp_path / "other" / "bin"
    other.mkdir(parents=True)
    assert install_id(str(other / "python"), str(package)) != expected
    assert install_id(str(venv / "python"), str(tmp_path / "src")) != expected


def test_serve_flags_match_the_engine_names(tmp_path):

    assert cli.MEMORY_PLANS == MEMORY_PLAN_CHOICES and cli.QUANTIZATIONS == QUANTIZATIONS
    token_file = tmp_path / "token"
    token_file.write_text("secret-0123456789abcdef\n")
    token_file.chmod(0o600)
    base = ["serve", "--token-file", str(token_file), "--device", "cpu"]
    settings, _ = cli._settings_from_args(
        build_parser().parse_args([*base, "--memory-plan", "sequential-offload"])
    )
    assert settings.memory_plan == "sequential-offload" and settings.quantization == "none"
    assert settings.token_file == token_file.resolve()
    old, _ = cli._settings_from_args(build_parser().parse_args([*base, "--memory-saving", "off"]))
    assert old.memory_plan == "full"


def test_the_real_editor_factory_gives_the_editor_the_memory_flags(tiny_model_dir):
    from engine.server.workers import real_editor_factory

    settings = make_settings(model=str(tiny_model_dir), dtype="fp32", memory_plan="offload-text")
    editor = real_editor_factory(settings)(str(tiny_model_dir), "cpu")
    # On a CPU every plan runs as "full" (nothing to offload to); the request is kept for CUDA.
    assert editor.requested_plan == "offload-text" and editor.memory_report()["plan"] == "full"


def test_the_family_ranges_of_steps_and_resolution_apply(client_factory):
    # allow_downloads: Qwen is not in this machine's cache (the fake editor loads nothing).
    client, _ = echo_client(client_factory, allow_downloads=True)
    qwen = "Qwen/Qwen-Image-Edit-2511"
    one_step = submit(client, {"instruction": "x", "model": qwen, "steps": 1})
    assert one_step.status_code == 422 and error_of(one_step)["field"] == "steps"
    assert "Qwen" in error_of(one_step)["message"]
    assert submit(client, {"instruction": "x", "model": qwen, "steps": 2}).status_code == 202


def test_default_limits_take_an_8192_square_raw_layer_and_its_mask():
    settings = make_settings()
    assert settings.max_image_pixels >= 8192 * 8192
    assert settings.max_upload_bytes >= 8192 * 8192 * (4 + 1) + 64 * 1024


def test_health_shows_the_loaded_editors_own_memory_report(client_factory):
    class Reporting(EchoEditor):
        def memory_report(self):
            return {
                "device": "cpu",
                "plan": "offload-text",
                "free_bytes": 5,
                "total_bytes": 9,
                "quantization": "torchao-int8",
            }

    client = client_factory(FakeFactory(editor=Reporting))
    deadline = time.monotonic() + 5
    while not client.get("/v1/health").json()["loaded_models"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (memory,) = client.get("/v1/health").json()["memory"]
    assert memory == {
        "device": "cpu",
        "plan": "offload-text",
        "free_bytes": 5,
        "total_bytes": 9,
        "quantization": "torchao-int8",
    }


@pytest.mark.parametrize("value", ["²", "٣", "1e3", " ", "9" * 20])
def test_odd_numbers_in_raw_sizes_and_preview_every_are_422_not_500(client_factory, value):
    client, _ = echo_client(client_factory)
    raw = submit(
        client, image=b"\0" * 16, image_type=f"image/x-raw; format=bgra8; width={value}; height=1"
    )
    assert raw.status_code == 422 and error_of(raw)["field"] == "image"
    preview = submit(client, preview_every=value)
    assert preview.status_code == 422 and error_of(preview)["field"] == "preview_every"
