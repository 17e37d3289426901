"""Plugin logic without Krita or widgets: requests, pixels, geometry, naming, state, client.

Runs under PyQt6 and PyQt5 (see test_bindings.py).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import fields
from pathlib import Path

import pytest
import qt_wait
from instruct_edit import image as px
from instruct_edit import provenance
from instruct_edit import request as plugin_request
from instruct_edit.client.engine_process import engine_command
from instruct_edit.client.errors import error_from_response
from instruct_edit.client.http import EngineClient, multipart_body
from instruct_edit.model import naming
from instruct_edit.model import settings as settings_module
from instruct_edit.model.state import EditState
from instruct_edit.qt import BINDING, QApplication, QImage
from instruct_edit.request import EditRequest, RequestError, explore_grid
from instruct_edit.training_pair import save_pair


def wait_for(condition, timeout: float = 10.0) -> None:
    qt_wait.wait_for(condition, timeout)


@pytest.fixture(scope="module", autouse=True)
def app():
    return QApplication.instance() or QApplication([])




def test_binding_follows_the_environment():
    wanted = os.environ.get("INSTRUCT_EDIT_QT")
    if wanted:
        assert BINDING.lower() == wanted


# --- the request: the engine's flat EditParams -----------------------------------------------


def test_request_mirrors_engine_edit_params():
    """The wire fields are the engine's; the family parameters travel flat beside them."""
    from engine import request as engine_request

    engine_fields = {f.name for f in fields(engine_request.EditParams)}
    plugin_fields = {f.name for f in fields(EditRequest) if f.name not in ("info", "limits")}
    assert plugin_fields == engine_fields
    defaults = {f.name: f.default for f in fields(EditRequest)}
    for f in fields(engine_request.EditParams):
        if f.name not in ("instruction", "options", "loras"):
            assert defaults[f.name] == f.default, f.name
    request = EditRequest("make it evening", seed=7, variants=2, steps=12,
                          loras=(plugin_request.Lora("style.safetensors", 0.8),),
                          options={"text_guidance": 6.0})
    data = json.loads(request.to_json())
    assert data == {"instruction": "make it evening", "seed": 7, "variants": 2, "steps": 12,
                    "loras": [{"path": "style.safetensors", "strength": 0.8}],
                    "preserve_detail": True, "text_guidance": 6.0}
    # The engine reads what the plugin sends: shared fields, and the rest as options.
    parsed = engine_request.EditParams.from_dict(data)
    assert parsed.instruction == "make it evening" and parsed.seed == 7 and parsed.loras[0].strength == 0.8
    assert parsed.steps == 12 and parsed.resolution is None and dict(parsed.options) == {"text_guidance": 6.0}
    assert EditRequest.from_dict(request.to_dict()) == request


@pytest.mark.parametrize(("changes", "field"), [
    ({"instruction": "  "}, "instruction"),
    ({"instruction": "x" * 1001}, "instruction"),
    ({"seed": -1}, "seed"),
    ({"steps": 0}, "steps"),
    ({"variants": 17}, "variants"),
    ({"resolution": 0}, "resolution"),
    ({"loras": (plugin_request.Lora("", 1.0),)}, "loras"),
    ({"options": {"seed": 3}}, "seed"),
])
def test_request_validation_names_the_field(changes, field):
    with pytest.raises(RequestError) as caught:
        EditRequest("ok").with_changes(**changes).validate()
    assert caught.value.field == field


def test_explore_grid_is_three_by_three_with_one_seed():
    state = EditState()
    state.learn_models({"models": [{"id": "old-engine-model", "name": "Old", "default": True}]})
    state.instruction, state.random_seed, state.seed, state.variants = "x", False, 11, 4
    grid = explore_grid(state.request())
    assert len(grid) == 9
    assert {r.options["image_guidance"] for r in grid} == {1.0, 1.5, 2.0}
    assert {r.options["text_guidance"] for r in grid} == {5.0, 7.5, 10.0}
    assert {r.seed for r in grid} == {11} and {r.variants for r in grid} == {1}
    state.options = {**state.options, "text_guidance": 0.0, "image_guidance": 0.0}
    low = explore_grid(state.request())
    assert all(r.options["text_guidance"] >= 0 and r.options["image_guidance"] >= 0 for r in low)
    with pytest.raises(RequestError, match="connect"):
        explore_grid(EditRequest("x"))  # no model known: nothing to sweep


# --- pixels ---------------------------------------------------------------------------------


def test_bgra_rgba_round_trip_and_channel_order():
    rng = random.Random(1)
    w, h = 7, 5
    bgra = bytes(rng.randrange(256) for _ in range(w * h * 4))
    rgba = px.bgra_to_rgba(bgra, w, h)
    for i in range(0, len(bgra), 4):
        b, g, r, a = bgra[i : i + 4]
        assert rgba[i : i + 4] == bytes((r, g, b, a))
    assert px.rgba_to_bgra(rgba, w, h) == bgra
    # Krita's BGRA is QImage's ARGB32: a pure red pixel reads back as red.
    red = px.image_from_bgra(bytes((0, 0, 255, 255)) * 4, 2, 2)
    assert red.pixelColor(1, 1).red() == 255 and red.pixelColor(1, 1).blue() == 0
    assert px.bgra_from_image(red) == bytes((0, 0, 255, 255)) * 4


def test_png_round_trip_keeps_pixels_and_odd_widths():
    rng = random.Random(2)
    w, h = 13, 3  # odd width: rows are padded inside QImage, packed in the bytes
    bgra = bytes(rng.randrange(256) if i % 4 != 3 else 255 for i in range(w * h * 4))
    back = px.bgra_from_image(px.decode_png(px.encode_png(px.image_from_bgra(bgra, w, h))))
    assert back == bgra
    mask = bytes(rng.randrange(256) for _ in range(w * h))
    assert px.gray_bytes(px.decode_png(px.encode_png(px.mask_image(mask, w, h)))) == mask
    with pytest.raises(ValueError, match="not a readable PNG"):
        px.decode_png(b"not a png")
    with pytest.raises(ValueError, match="expected 16 bytes"):
        px.image_from_bgra(b"\0" * 15, 2, 2)


# --- selection geometry ------------------------------------------------------------------------


@pytest.mark.parametrize("selection", [
    px.Bounds(100, 80, 50, 30), px.Bounds(0, 0, 10, 10), px.Bounds(990, 700, 34, 68),
    px.Bounds(0, 0, 1024, 768), px.Bounds(500, 3, 7, 1),
])
def test_context_bounds_contain_the_selection_and_stay_on_canvas(selection):
    canvas = px.Bounds(0, 0, 1024, 768)
    region = px.context_bounds(selection, canvas)
    assert canvas.contains(region)
    assert region.contains(selection.intersected(canvas))
    assert region.width % 8 == 0 and region.height % 8 == 0
    pad = max(32, round(max(selection.width, selection.height) * 0.25))
    # Context on every side where the canvas allows it.
    assert region.x <= max(0, selection.x - pad) and region.right >= min(1024, selection.right + pad)


def test_context_bounds_on_small_canvas_and_outside():
    assert px.context_bounds(px.Bounds(2, 2, 5, 5), px.Bounds(0, 0, 20, 12)) == px.Bounds(0, 0, 20, 12)
    with pytest.raises(ValueError, match="outside the canvas"):
        px.context_bounds(px.Bounds(50, 50, 5, 5), px.Bounds(0, 0, 20, 20))


# --- names and provenance -----------------------------------------------------------------------


def test_layer_and_group_names():
    state = EditState()
    state.learn_models({"models": [{"id": "old-engine-model", "name": "Old", "default": True}]})
    state.instruction, state.random_seed, state.seed = "make   it\nevening", False, 40
    state.set_option("image_guidance", 1.25)
    request = state.request()
    assert naming.group_name(request.instruction) == "make it evening"
    assert naming.group_name("a" * 100).endswith("…") and len(naming.group_name("a" * 100)) == 60
    assert naming.layer_name(request, 2) == "make it evening · s_T 7.5 s_I 1.25 · seed 42"
    assert naming.layer_name(EditRequest("x", seed=1), 0) == "x · seed 1"  # no model parameters


def test_provenance_records_round_trip():
    request = EditRequest("turn the dragon red", seed=5, steps=12, options={"guidance": 2.5})
    record = provenance.provenance(request, 1, "Dragon", "layer", (1, 2, 3, 4), "Kontext", "{id}")
    assert record["seed"] == 6 and record["steps"] == 12 and record["source_layer"] == "Dragon"
    assert record["options"] == {"guidance": 2.5}
    data = provenance.encode_records({"{a}": record})
    assert provenance.decode_records(data) == {"{a}": record}
    assert provenance.decode_records(b"garbage") == {} and provenance.decode_records(None) == {}
    assert provenance.decode_records(b'{"layers": [1]}') == {}
    text = provenance.describe(record)
    assert "turn the dragon red" in text and "seed 6" in text and "Dragon" in text
    assert "guidance 2.5" in text
    assert naming.provenance is provenance.provenance  # the controller's name for it


# --- state and settings -----------------------------------------------------------------------


def test_state_signals_history_and_seed():
    state = EditState()
    seen = []
    state.on_change("variants", seen.append, now=False)
    state.variants = 3
    state.variants = 3  # same value: no signal
    state.seed = 2  # other field: not this callback
    assert seen == [3]
    for i in range(25):
        state.remember_instruction(f"instruction {i}")
    state.remember_instruction("instruction 3")
    assert state.history[0] == "instruction 3" and len(state.history) == 20
    assert state.history.count("instruction 3") == 1
    state.instruction, state.random_seed, state.seed = "x", False, 77
    assert state.request().seed == 77
    state.random_seed = True
    seeds = {state.request().seed for _ in range(5)}
    assert len(seeds) > 1 and state.seed in seeds
    with pytest.raises(AttributeError):
        state.on_change("no_such_field", print)


def test_settings_round_trip(tmp_path: Path):
    path = tmp_path / "settings.json"
    models = {"models": [{"id": "old-engine-model", "name": "Old", "default": True}]}
    state = EditState()
    state.learn_models(models)
    state.steps, state.history, state.variants = 33, ["a", "b"], 3
    state.set_option("text_guidance", 9.0)
    saved = settings_module.Settings(engine_mode="remote", remote_url="http://box:8765",
                                     remote_token="t", state=state.snapshot())
    settings_module.save(saved, path)
    loaded = settings_module.load(path)
    assert loaded == saved
    fresh = EditState()
    fresh.restore(loaded.state)
    assert fresh.history == ["a", "b"] and fresh.variants == 3
    fresh.learn_models(models)  # per-model values come back once the engine names its models
    assert fresh.steps == 33 and fresh.options["text_guidance"] == 9.0
    assert settings_module.load(tmp_path / "missing.json") == settings_module.Settings()
    assert settings_module.Settings(engine_mode="managed").problems()  # no python path
    assert settings_module.Settings(engine_mode="remote", remote_url="box").problems()
    assert settings_module.Settings(engine_mode="remote", cpu_runtime="onnx").problems()


# --- client ---------------------------------------------------------------------------------------


def test_error_messages_are_for_painters():
    err = error_from_response(422, json.dumps({"error": {"status": 422, "message": "steps must be a whole number from 1 to 200", "field": "steps"}}).encode())
    assert err.field == "steps" and err.message.startswith("Steps: steps must")
    assert "token" in error_from_response(401, b"{}").message.lower()
    assert "memory" in error_from_response(507, b'{"error": {"message": "CUDA OOM"}}').message
    assert "HTTP 500" in error_from_response(500, b"").message


def test_multipart_body_parses_as_form_data():
    import email.parser
    import email.policy

    body, content_type = multipart_body([("image", "image.png", "image/png", b"\x89PNG\0\1"),
                                         ("params", None, "application/json", b'{"a": 1}')])
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts = {p.get_param("name", header="content-disposition"): p.get_content() for p in message.iter_parts()}
    assert parts["image"] == b"\x89PNG\0\1" and json.loads(parts["params"]) == {"a": 1}


def test_client_talks_to_an_engine(fake_engine):
    client = EngineClient(fake_engine.url, "secret")
    answers: dict = {}
    client.health(lambda a: answers.setdefault("health", a), lambda e: answers.setdefault("error", e))
    client.models(lambda a: answers.setdefault("models", a), lambda e: answers.setdefault("error", e))
    wait_for(lambda: "models" in answers and "health" in answers)
    assert answers["health"]["status"] == "ok" and answers["models"]["models"][0]["id"] == "fake-model"

    image = px.encode_png(px.image_from_bgra(bytes((0, 0, 0, 255)) * 4, 2, 2))
    body, content_type = multipart_body([("image", "i.png", "image/png", image),
                                         ("params", None, "application/json", EditRequest("x", steps=3).to_json().encode())])
    client.submit(body, content_type, lambda job: answers.setdefault("job", job), answers.setdefault)
    wait_for(lambda: "job" in answers)
    events = []
    client.events(answers["job"], lambda name, data: events.append((name, data)),
                  lambda err: answers.setdefault("ended", err))
    wait_for(lambda: "ended" in answers)
    assert answers["ended"] is None
    assert [name for name, _ in events] == ["progress"] * 3 + ["done"]
    assert events[1][1]["progress"] == {"step": 2, "total": 3}
    client.result(answers["job"], 0, lambda data: answers.setdefault("png", data), answers.setdefault)
    wait_for(lambda: "png" in answers)
    result = px.decode_png(answers["png"])
    assert result.pixelColor(0, 0).red() == 255  # the fake engine inverts: black -> white
    client.close()


def test_client_errors(fake_engine):
    answers: dict = {}
    clients = [EngineClient(fake_engine.url, "wrong"), EngineClient(fake_engine.url, "secret")]
    clients[0].models(answers.setdefault, lambda e: answers.setdefault("auth", e))
    fake_engine.fail_with = (422, {"error": {"status": 422, "message": "instruction is 2000 characters long", "field": "instruction"}})
    clients[1].submit(b"", "multipart/form-data; boundary=x", answers.setdefault,
                                                   lambda e: answers.setdefault("invalid", e))
    # A port nobody listens on.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clients.append(EngineClient(f"http://127.0.0.1:{port}"))
    clients[2].health(answers.setdefault, lambda e: answers.setdefault("down", e))
    wait_for(lambda: {"auth", "invalid", "down"} <= answers.keys())
    assert answers["auth"].kind == "auth"
    assert answers["invalid"].field == "instruction" and "Instruction:" in answers["invalid"].message
    assert answers["down"].kind == "connection" and "Can't reach the engine" in answers["down"].message
    for client in clients:
        client.close()


def test_engine_command_finds_the_console_script(tmp_path: Path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text("")
    program, args = engine_command(str(venv))
    assert program == str(python) and args[0] == "-c"
    (venv / "bin" / "instruct-edit").write_text("")
    assert engine_command(str(venv)) == (str(venv / "bin" / "instruct-edit"), [])
    assert engine_command(str(python))[0] == str(venv / "bin" / "instruct-edit")
    with pytest.raises(FileNotFoundError, match="No Python found"):
        engine_command(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="Settings"):
        engine_command("")


# --- training pairs -------------------------------------------------------------------------------


def test_save_pair_appends_and_never_overwrites(tmp_path: Path):
    w, h = 3, 2
    before, after = bytes((0, 0, 255, 255)) * 6, bytes((255, 0, 0, 255)) * 6
    folder = tmp_path / "pairs"
    first = save_pair(folder, "Make it blue!", before, after, w, h)
    (folder / "make-it-blue-0002-input.png").write_bytes(b"user's own file")
    second = save_pair(folder, "Make it blue!", before, after, w, h)
    assert first["input_image"] == "make-it-blue-0001-input.png"
    assert second["input_image"] == "make-it-blue-0003-input.png"
    assert (folder / "make-it-blue-0002-input.png").read_bytes() == b"user's own file"
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert lines == [first, second] and lines[0]["edit_prompt"] == "Make it blue!"
    edited = QImage(str(folder / second["edited_image"]))
    assert edited.pixelColor(0, 0).blue() == 255 and edited.width() == 3
    with pytest.raises(ValueError, match="instruction"):
        save_pair(folder, " ", before, after, w, h)


# --- packaging ------------------------------------------------------------------------------


def test_build_zip_and_install_into_a_profile(tmp_path: Path):
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "scripts"))
    import build_plugin
    import install_plugin

    plugin_zip = build_plugin.build(tmp_path / "dist")
    version = json.loads((root / "manifest.json").read_text())["version"]
    assert plugin_zip.name == f"instruct_edit-{version}.zip"
    names = set(zipfile.ZipFile(plugin_zip).namelist())
    assert {"instruct_edit.desktop", "instruct_edit.action", "manual.html", "instruct_edit/__init__.py",
            "instruct_edit/qt.py", "instruct_edit/ui/panel.py", "instruct_edit/VERSION"} <= names
    assert not any("__pycache__" in n for n in names)

    resources = tmp_path / "krita"
    install_plugin.install(plugin_zip, resources)
    assert (resources / "pykrita" / "instruct_edit.desktop").exists()
    assert (resources / "pykrita" / "instruct_edit" / "client" / "http.py").exists()
    assert (resources / "actions" / "instruct_edit.action").exists()

    kritarc = tmp_path / "kritarc"
    kritarc.write_text("[General]\nAutoSaveInterval=0\n\n[python]\nenable_other=true\n"
                       "enable_instruct_edit=false\n\n[theme]\nTheme=Dark\n")
    install_plugin.enable_in_kritarc(kritarc)
    text = kritarc.read_text()
    assert "enable_instruct_edit=true" in text and "enable_instruct_edit=false" not in text
    assert "enable_other=true" in text and "Theme=Dark" in text and "AutoSaveInterval=0" in text
    fresh = tmp_path / "new" / "kritarc"
    install_plugin.enable_in_kritarc(fresh)
    assert fresh.read_text() == "[python]\nenable_instruct_edit=true\n"


def test_install_points_the_managed_engine_at_this_python_without_overriding_the_user(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import install_plugin

    settings_file = tmp_path / "krita" / "instruct_edit" / "settings.json"
    assert install_plugin.point_managed_engine_at("/venv/bin/python", settings_file)
    assert json.loads(settings_file.read_text())["python_path"] == "/venv/bin/python"
    settings_file.write_text(json.dumps({"python_path": "/mine/python", "device": "cpu"}))
    assert not install_plugin.point_managed_engine_at("/venv/bin/python", settings_file)
    assert json.loads(settings_file.read_text()) == {"python_path": "/mine/python", "device": "cpu"}


def test_cpu_runtime_choices_are_the_engines():
    from engine.runtimes import RUNTIMES

    assert set(settings_module.CPU_RUNTIMES) <= set(RUNTIMES)
    assert settings_module.Settings().cpu_runtime == "auto"
