"""Lossless full-resolution round trip, malformed engine answers, and finding a running engine.

An engine that answers with its input ("echo") must give back a result layer byte-identical
to the source: odd sizes, transparency, soft selections, raw on loopback and PNG to an
engine elsewhere, and 8192² within bounded memory. Runs under PyQt6 and PyQt5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import qt_wait
from instruct_edit.krita_document import KritaDocument
from instruct_edit.model import connection as connection_module
from instruct_edit.model import jobs as jobs_module
from instruct_edit.model.controller import EditController
from instruct_edit.model.settings import MANAGED, REMOTE, Settings
from instruct_edit.model.state import CONNECTED, EditState
from instruct_edit.qt import QApplication

HERE = Path(__file__).resolve().parent


def wait_for(condition, timeout: float = 30.0) -> None:
    qt_wait.wait_for(condition, timeout)


@pytest.fixture(scope="module", autouse=True)
def app():
    return QApplication.instance() or QApplication([])




def line_art(width: int, height: int, seed: int = 0, alpha: bool = True) -> bytes:
    """BGRA line art: 1-px lines on paper, lettering-like noise, and transparent/soft areas."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 4), 255, np.uint8)
    image[::7, :, :3] = 20  # horizontal 1-px lines
    image[:, ::11, :3] = (30, 60, 200)  # vertical coloured lines
    speckle = rng.random((height, width)) < 0.02
    image[speckle, :3] = rng.integers(0, 256, (int(speckle.sum()), 3), dtype=np.uint8)
    if alpha:
        image[: height // 4, : width // 3, 3] = 0  # a transparent corner
        image[: height // 4, : width // 3, :3] = rng.integers(0, 256, (height // 4, width // 3, 3),
                                                              dtype=np.uint8)
        ramp = np.linspace(0, 255, width, dtype=np.float32).astype(np.uint8)
        image[height // 2 : height // 2 + 40, :, 3] = ramp  # a soft edge
    return image.tobytes()


def soft_selection(width: int, height: int, box: tuple[int, int, int, int], feather: int) -> bytes:
    x, y, w, h = box
    ys, xs = np.mgrid[0:height, 0:width]
    dx = np.maximum(np.maximum(x - xs, xs - (x + w - 1)), 0)
    dy = np.maximum(np.maximum(y - ys, ys - (y + h - 1)), 0)
    distance = np.hypot(dx, dy)
    mask = np.clip(255 * (1 - distance / feather), 0, 255).astype(np.uint8)
    return mask.tobytes()


def make_controller(document, url: str, tmp_path: Path, token: str = "secret") -> tuple:
    state = EditState()
    settings = Settings(engine_mode=REMOTE, remote_url=url, remote_token=token)
    controller = EditController(state, lambda: KritaDocument(document), settings,
                                settings_path=tmp_path / "settings.json")
    controller.connect_engine()
    wait_for(lambda: state.connection in (CONNECTED, "failed"))
    assert state.connection == CONNECTED, state.connection_message
    state.instruction, state.random_seed, state.seed = "keep it as it is", False, 3
    return state, controller


def run_edit(state, controller, timeout: float = 60.0) -> None:
    assert controller.edit(), state.error
    wait_for(lambda: state.job_state in ("done", "failed", "cancelled"), timeout)


def source_document(fake_krita, width: int, height: int, data: bytes):
    document = fake_krita.Document(width, height)
    layer = document.createNode("Line art", "paintlayer")
    layer.setPixelData(data, 0, 0, width, height)
    layer.writes = 0
    document.rootNode().addChildNode(layer, None)
    document.setActiveNode(layer)
    fake_krita.Krita.instance().document = document
    return document, layer


@pytest.fixture
def echo_engine():
    import fake_engine

    server = fake_engine.FakeEngine(mode="echo")
    yield server
    server.close()


@pytest.mark.parametrize("remote", [False, True], ids=["loopback-raw", "remote-png"])
@pytest.mark.parametrize("selection", [None, "hard", "soft"])
def test_echo_engine_gives_back_the_source_byte_for_byte(fake_krita, echo_engine, tmp_path,
                                                        monkeypatch, remote, selection):
    if remote:  # an engine elsewhere: PNG both ways
        monkeypatch.setattr(connection_module, "is_loopback", lambda url: False)
    w, h = 3001, 1999
    source = line_art(w, h)
    document, layer = source_document(fake_krita, w, h, source)
    from fake_krita import Selection

    if selection == "hard":
        document.setSelection(Selection(w, h).select_rect(1200, 700, 1200, 800))
    elif selection == "soft":
        box = (900, 300, 1300, 900)
        mask = soft_selection(w, h, box, feather=60)
        document.setSelection(Selection(w, h).set_mask(mask, box[0] - 60, box[1] - 60,
                                                      box[2] + 120, box[3] + 120))
    state, controller = make_controller(document, echo_engine.url, tmp_path)
    run_edit(state, controller)
    assert state.job_state == "done", state.error
    types = echo_engine.upload_types[-1]
    expected_kind = "image/png" if remote else "image/x-raw; format=bgra8"
    assert types["image"].startswith(expected_kind)
    assert ("mask" in types) == (selection is not None)
    assert all(("format=png" in p) == remote for p in echo_engine.result_requests)

    result_node = document.activeNode()
    record = KritaDocument(document).provenance_of(result_node)
    x, y, rw, rh = record["bounds"]
    if selection is None:
        assert (x, y, rw, rh) == (0, 0, w, h)
    # The region comes back exactly: every byte of every pixel, alpha included.
    assert bytes(result_node.pixelData(x, y, rw, rh)) == bytes(layer.pixelData(x, y, rw, rh))
    if selection is not None:
        # Nothing outside the region.
        everything = np.frombuffer(bytes(result_node.pixelData(0, 0, w, h)), np.uint8).reshape(h, w, 4)
        outside = np.ones((h, w), bool)
        outside[y : y + rh, x : x + rw] = False
        assert not everything[outside, 3].any()
    assert layer.writes == 0
    controller.shutdown()


def test_soft_selection_blends_at_full_resolution(fake_krita, fake_engine, tmp_path):
    """The (inverting) engine blends by the 8-bit selection; the plugin places that exactly."""
    w, h = 641, 479
    source = line_art(w, h, seed=1, alpha=False)
    document, _layer = source_document(fake_krita, w, h, source)
    from fake_krita import Selection

    box = (200, 150, 240, 160)
    mask = soft_selection(w, h, box, feather=30)
    document.setSelection(Selection(w, h).set_mask(mask, 170, 120, 300, 220))
    state, controller = make_controller(document, fake_engine.url, tmp_path)
    run_edit(state, controller)
    assert state.job_state == "done", state.error
    result = np.frombuffer(bytes(document.activeNode().pixelData(0, 0, w, h)), np.uint8).reshape(h, w, 4)
    src = np.frombuffer(source, np.uint8).reshape(h, w, 4).astype(np.float32)
    weight = np.frombuffer(mask, np.uint8).reshape(h, w).astype(np.float32)[..., None] / 255
    expected = np.rint(src[..., :3] + weight * ((255 - src[..., :3]) - src[..., :3]))
    x, y, rw, rh = KritaDocument(document).provenance_of(document.activeNode())["bounds"]
    region = (slice(y, y + rh), slice(x, x + rw))
    assert np.array_equal(result[region][..., :3], expected[region].astype(np.uint8))
    partial = (weight[..., 0] > 0) & (weight[..., 0] < 1)
    assert partial[region].sum() > 1000  # the soft edge really was soft
    controller.shutdown()


def test_an_engine_without_raw_uploads_gets_png(fake_krita, echo_engine, tmp_path):
    echo_engine.legacy = True  # 422 on raw parts, PNG results only
    w, h = 257, 129
    source = line_art(w, h, seed=2)
    document, _layer = source_document(fake_krita, w, h, source)
    state, controller = make_controller(document, echo_engine.url, tmp_path)
    run_edit(state, controller)
    assert state.job_state == "done", state.error
    assert [t["image"].split(";")[0] for t in echo_engine.upload_types] == ["image/x-raw", "image/png"]
    assert bytes(document.activeNode().pixelData(0, 0, w, h)) == source
    assert controller.client.raw_refused
    controller.shutdown()


# --- malformed answers --------------------------------------------------------------------


def small_setup(fake_krita, engine, tmp_path):
    w, h = 64, 48
    document, _layer = source_document(fake_krita, w, h, line_art(w, h, seed=3))
    state, controller = make_controller(document, engine.url, tmp_path)
    return document, state, controller


@pytest.mark.parametrize(("knob", "value", "words"), [
    ("bad_preview", "%%% not base64 %%%", "not valid base64"),
    ("bad_preview", "aGVsbG8=", "not an image"),
    ("bad_progress", "three", "progress the plugin cannot read"),
    ("bad_progress", 2.5, "progress the plugin cannot read"),
    ("extra_results", 1, "reported 2 results for an edit of 1"),
    ("result_size_delta", 3, "67×48 result for a 64×48 region"),
])
def test_malformed_answers_fail_the_edit_with_a_message(fake_krita, fake_engine, tmp_path,
                                                        knob, value, words):
    document, state, controller = small_setup(fake_krita, fake_engine, tmp_path)
    setattr(fake_engine, knob, value)
    run_edit(state, controller, timeout=15)
    assert state.job_state == "failed"
    assert words in state.error, state.error
    assert [n.name() for n in document.rootNode().childNodes()] == ["Line art"]
    assert not state.busy
    # The next edit works once the engine behaves.
    setattr(fake_engine, knob, type(value)() if not isinstance(value, str) else None)
    fake_engine.extra_results = fake_engine.result_size_delta = 0
    fake_engine.bad_progress = fake_engine.bad_preview = None
    run_edit(state, controller, timeout=15)
    assert state.job_state == "done", state.error
    controller.shutdown()


def test_the_engines_first_use_note_is_shown_until_the_steps_start(fake_krita, fake_engine, tmp_path):
    _document, state, controller = small_setup(fake_krita, fake_engine, tmp_path)
    fake_engine.first_use_note = "Converting the model for this CPU (first use only, about a minute)…"
    seen = []
    state.on_change("engine_note", seen.append, now=False)
    run_edit(state, controller, timeout=15)
    assert state.job_state == "done", state.error
    assert seen[0] == fake_engine.first_use_note and state.engine_note == ""
    controller.shutdown()


def test_a_stalled_event_stream_is_noticed(fake_krita, fake_engine, tmp_path, monkeypatch):
    monkeypatch.setattr(jobs_module, "WATCHDOG_MS", 300)
    _document, state, controller = small_setup(fake_krita, fake_engine, tmp_path)
    fake_engine.stall_events = True
    run_edit(state, controller, timeout=15)
    assert state.job_state == "done", state.error
    assert "stalled" in state.message
    # The same, but the engine is gone meanwhile: the edit fails instead of hanging.
    state.message = ""
    assert controller.edit()
    wait_for(lambda: fake_engine.jobs and list(fake_engine.jobs.values())[-1]["step"] >= 1)
    fake_engine.close()
    wait_for(lambda: state.job_state in ("done", "failed"), 15)
    assert state.job_state == "failed" and "stopped answering" in state.error, state.error
    controller.shutdown()


def test_a_wrong_token_says_so(fake_krita, fake_engine, tmp_path):
    w, h = 16, 16
    document, _ = source_document(fake_krita, w, h, line_art(w, h))
    state = EditState()
    settings = Settings(engine_mode=REMOTE, remote_url=fake_engine.url, remote_token="wrong")
    controller = EditController(state, lambda: KritaDocument(document), settings,
                                settings_path=tmp_path / "settings.json")
    controller.connect_engine()
    wait_for(lambda: state.connection == CONNECTED)
    errors = {}
    controller.client.models(lambda a: None, lambda e: errors.setdefault("e", e))
    wait_for(lambda: "e" in errors)
    assert errors["e"].status == 403 and "token" in errors["e"].message and "wrong" in errors["e"].message
    controller.shutdown()


# --- one engine -----------------------------------------------------------------------------


def test_managed_mode_connects_to_the_running_engine_of_this_installation(fake_krita, tmp_path):
    import fake_engine

    from engine.server.instance import current_install_id

    venv = Path(sys.executable).parent.parent  # this environment: the engine is installed here
    token_file = tmp_path / "state" / "token"
    token_file.parent.mkdir()
    token_file.write_text("run-sh-token\n")
    server = fake_engine.FakeEngine(token="run-sh-token")
    server.instance = {"install_id": current_install_id(), "token_file": str(token_file),
                       "pid": os.getpid()}
    document, _ = source_document(fake_krita, 32, 32, line_art(32, 32))
    state = EditState()
    settings = Settings(engine_mode=MANAGED, python_path=str(venv), device="cpu",
                        engine_model="/nonexistent-model")
    controller = EditController(state, lambda: KritaDocument(document), settings,
                                settings_path=tmp_path / "settings.json")
    controller.connection.default_url = server.url
    controller.connect_engine()
    wait_for(lambda: state.connection in (CONNECTED, "failed") or controller.engine is not None)
    assert state.connection == CONNECTED, state.connection_message
    assert controller.engine is None and controller.connection.attached  # nothing started
    assert controller.client.token == "run-sh-token"
    assert "already running" in state.connection_message
    state.instruction = "keep it"
    run_edit(state, controller)
    assert state.job_state == "done", state.error
    controller.shutdown()

    # Another installation's engine (or none) on that port: the plugin starts its own.
    server.instance = {"install_id": "0" * 16, "token_file": str(token_file), "pid": 1}
    state = EditState()
    controller = EditController(state, lambda: KritaDocument(document), settings,
                                settings_path=tmp_path / "settings.json")
    controller.connection.default_url = server.url
    controller.connect_engine()
    wait_for(lambda: controller.engine is not None or state.connection == "failed", 20)
    assert controller.engine is not None and not controller.connection.attached
    controller.shutdown()
    server.close()


# --- 8192², memory-bounded -------------------------------------------------------------------


def _rss() -> int:
    with open(f"/proc/{os.getpid()}/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures RSS from /proc")
def test_8192_square_round_trip_is_exact_and_memory_bounded(fake_krita, tmp_path):
    side = 8192
    region_bytes = side * side * 4
    # The engine in its own process, as in real use: its memory is not the plugin's.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1] / "plugin"), str(HERE)]))
    engine = subprocess.Popen([sys.executable, str(HERE / "fake_engine.py"), "secret", "--mode", "echo"],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = engine.stdout.readline().strip()
        rows = np.arange(side, dtype=np.uint32)[:, None] * 2654435761 + np.arange(side, dtype=np.uint32)
        source = rows.view(np.uint8).reshape(side, side, 4).copy()
        source[:100, :, 3] = 0  # some transparency
        data = source.tobytes()
        del rows, source
        document, _layer = source_document(fake_krita, side, side, data)
        state, controller = make_controller(document, url, tmp_path)
        baseline = _rss()
        peak = [baseline]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        run_edit(state, controller, timeout=120)
        seconds = time.monotonic() - started
        stop.set()
        sampler.join()
        assert state.job_state == "done", state.error
        result = document.activeNode()
        # The result layer's pixels live in "Krita" (here: the fake document), so they count
        # in this process's RSS as well; the bound holds even with them.
        grown = peak[0] - baseline
        print(f"8192²: {seconds:.1f} s, peak RSS +{grown / 2**20:.0f} MiB "
              f"({grown / region_bytes:.2f}× the region's RGBA bytes)")
        assert grown <= 4 * region_bytes, grown / region_bytes
        assert bytes(result.pixelData(0, 0, side, side)) == data
        controller.shutdown()
    finally:
        engine.terminate()
        engine.wait(10)


def test_settings_file_is_private_and_tolerates_non_objects(tmp_path):
    from instruct_edit.model import settings as settings_module

    path = tmp_path / "krita" / "instruct_edit" / "settings.json"
    settings_module.save(Settings(engine_mode=REMOTE, remote_token="secret-token"), path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert settings_module.load(path).remote_token == "secret-token"
    assert not [p for p in path.parent.iterdir() if p.name != "settings.json"]  # no temp left
    for text in ("[1, 2]", '"text"', "42", "null"):
        path.write_text(text)
        assert settings_module.load(path) == Settings()
    path.write_text(json.dumps({"remote_token": 7, "device": "cpu"}))
    loaded = settings_module.load(path)
    assert loaded.remote_token == "" and loaded.device == "cpu"


# --- wire-format helpers, errors, installation id ----------------------------------------------


def test_raw_wire_format_helpers():
    from instruct_edit import image as px

    assert px.raw_content_type("bgra8", 3001, 1999) == "image/x-raw; format=bgra8; width=3001; height=1999"
    assert px.parse_raw_content_type("image/x-raw; format=bgra8; width=3; height=2") == ("bgra8", 3, 2)
    assert px.parse_raw_content_type("Image/X-Raw;format=rgba8;width=1;height=1") == ("rgba8", 1, 1)
    assert px.parse_raw_content_type("image/png") is None
    assert px.parse_raw_content_type("image/x-raw; format=bgra8") == ("bgra8", -1, -1)
    for url in ("http://127.0.0.1:8765", "http://localhost:1/", "http://[::1]:8765", "http://127.3.2.1"):
        assert px.is_loopback(url), url
    for url in ("http://192.168.1.20:8765", "https://gpu-box:8765", "http://10.0.0.1"):
        assert not px.is_loopback(url), url
    assert px.mask_coverage(b"\xff" * 6) == "full" and px.is_full_selection(b"\xff" * 6)
    assert px.mask_coverage(b"\0" * 6) == "empty"
    assert px.mask_coverage(b"\0\xff\x80") == "partial"


def test_results_are_placed_only_at_the_region_size():
    from instruct_edit import image as px
    from instruct_edit.qt import QByteArray

    w, h = 5, 3
    bgra = bytes(range(w * h * 4))
    raw = QByteArray(bgra)
    assert bytes(px.result_to_bgra(raw, px.raw_content_type("bgra8", w, h), w, h, (w, h))) == bgra
    rgba = px.bgra_to_rgba(bgra, w, h)
    assert bytes(px.result_to_bgra(QByteArray(rgba), px.raw_content_type("rgba8", w, h), w, h)) == bgra
    png = px.encode_png(px.image_from_bgra(bgra, w, h))
    assert bytes(px.result_to_bgra(QByteArray(png), "image/png", w, h)) == bgra
    with pytest.raises(px.ResultError, match="6×3 result for a 5×3 region"):
        px.result_to_bgra(raw, px.raw_content_type("bgra8", 6, 3), w, h)
    with pytest.raises(px.ResultError, match="bytes"):
        px.result_to_bgra(QByteArray(bgra[:-4]), px.raw_content_type("bgra8", w, h), w, h)
    with pytest.raises(px.ResultError, match="gray8"):
        px.result_to_bgra(raw, px.raw_content_type("gray8", w, h), w, h)
    with pytest.raises(px.ResultError, match="one header"):
        px.result_to_bgra(raw, px.raw_content_type("bgra8", w, h), w, h, (4, 3))
    small = px.encode_png(px.image_from_bgra(bgra[: 4 * 3 * 4], 4, 3))
    with pytest.raises(px.ResultError, match="4×3 result"):
        px.result_to_bgra(QByteArray(small), "image/png", w, h)
    with pytest.raises(px.ResultError, match="neither raw pixels nor a readable PNG"):
        px.result_to_bgra(QByteArray(b"garbage"), "application/octet-stream", w, h)


def test_auth_errors_say_what_is_wrong():
    from instruct_edit.client.errors import error_from_response

    missing = error_from_response(401, b"{}")
    wrong = error_from_response(403, b'{"error": {"message": "the token is wrong"}}')
    assert missing.kind == wrong.kind == "auth"
    assert "none was sent" in missing.message
    assert "wrong" in wrong.message and "Settings" in wrong.message


def test_install_id_follows_the_engines_recipe(tmp_path: Path):
    from instruct_edit.client.engine_process import (
        ask_install_id,
        engine_python,
        install_id,
        instance_id,
        read_instance_token,
    )

    from engine.server import instance as engine_instance

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    assert engine_python(str(venv)) == str(python)
    assert engine_python(str(venv / "bin" / "instruct-edit")) == str(python)
    assert install_id(str(python), "/pkg") == engine_instance.install_id(str(python), "/pkg")
    # The configured environment answers with the engine's own function.
    answers = []
    ask_install_id(str(Path(sys.executable).parent.parent), answers.append)
    wait_for(lambda: answers, 20)
    assert answers == [engine_instance.current_install_id()]
    ask_install_id(str(venv), answers.append)  # no Python there
    wait_for(lambda: len(answers) == 2)
    assert answers[1] is None
    ours = {"install_id": "ab" * 8, "token_file": str(tmp_path / "token"), "pid": 1}
    assert instance_id(ours) == "ab" * 8 and instance_id(None) is None and instance_id({}) is None
    assert read_instance_token(ours) is None  # no file yet
    (tmp_path / "token").write_text("tok\n")
    assert read_instance_token(ours) == "tok"


@pytest.mark.slow
def test_managed_mode_reuses_a_real_engine_of_this_installation(fake_krita, tiny_model_dir, tmp_path):
    """Like ./scripts/run.sh: a real `instruct-edit serve` from this environment is running."""
    from real_engine import start_engine

    token_file = tmp_path / "token"
    token_file.write_text("served-token-0123456789")  # the engine wants >= 16 characters, private
    token_file.chmod(0o600)
    process, url = start_engine(tiny_model_dir, token_file)
    try:
        document, _ = source_document(fake_krita, 24, 16, line_art(24, 16))
        state = EditState()
        settings = Settings(engine_mode=MANAGED, python_path=str(Path(sys.executable).parent.parent),
                            device="cpu", engine_model=str(tiny_model_dir))
        controller = EditController(state, lambda: KritaDocument(document), settings,
                                    settings_path=tmp_path / "settings.json")
        controller.connection.default_url = url
        controller.connect_engine()
        wait_for(lambda: state.connection in (CONNECTED, "failed") or controller.engine is not None, 30)
        assert controller.engine is None, "started a second engine instead of reusing the running one"
        assert state.connection == CONNECTED and controller.connection.attached, state.connection_message
        assert controller.client.token == "served-token-0123456789"
        # And the real engine takes the raw upload and answers with raw pixels of the region.
        wait_for(lambda: state.models, 10)
        state.instruction, state.random_seed, state.steps, state.resolution = "make it red", False, 2, 64
        run_edit(state, controller, timeout=120)
        assert state.job_state == "done", state.error
        assert not controller.client.raw_refused
        controller.shutdown()
        assert process.poll() is None  # not the plugin's engine: still running
    finally:
        process.terminate()
        process.wait(10)
