"""The docker's widgets against a fake `krita` document and the REAL engine (tiny model).

pytest-qt drives the panel like a painter: type an instruction, press Ctrl+Enter, watch
progress, get layers. Runs under PyQt6 and PyQt5.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path

import pytest
from instruct_edit.krita_document import KritaDocument
from instruct_edit.model.controller import EditController
from instruct_edit.model.settings import MANAGED, REMOTE, Settings
from instruct_edit.model.state import CONNECTED, EditState
from instruct_edit.qt import Qt
from instruct_edit.ui.panel import EditPanel

W, H = 80, 64


def pattern(x: int, y: int) -> tuple[int, int, int, int]:
    return ((x * 3) % 256, (y * 4) % 256, 128, 255)


@pytest.fixture
def document(fake_krita):
    doc = fake_krita.Document(W, H)
    doc.add_paint_layer("Sketch", pattern)
    fake_krita.Krita.instance().document = doc
    return doc


@pytest.fixture
def panel(qtbot, engine, document, tmp_path: Path):
    url, token = engine
    state = EditState()
    settings = Settings(engine_mode=REMOTE, remote_url=url, remote_token=token)
    controller = EditController(state, lambda: KritaDocument(document), settings,
                                settings_path=tmp_path / "settings.json")
    widget = EditPanel(controller)
    qtbot.addWidget(widget)
    widget.show()
    controller.connect_engine()
    qtbot.waitUntil(lambda: state.connection == CONNECTED, timeout=30_000)
    qtbot.waitUntil(lambda: state.model_info is not None, timeout=10_000)
    state.resolution = 64  # the tiny model: keep the engine's work small
    assert widget.resolution.currentData() == 64
    state.random_seed = False
    widget.seed.setValue(7)
    widget.steps.setValue(4)
    yield widget
    controller.shutdown()


def test_ctrl_enter_runs_an_edit_into_layers(qtbot, panel, document):
    state = panel.state
    assert panel.edit_button.isEnabled() and not panel.cancel_button.isEnabled()
    assert "Connected" in panel.connection_label.text()
    panel.variants.setValue(2)
    # The engine publishes its model's parameters (an InstructPix2Pix one): the form shows them.
    assert not state.model_info.legacy and state.model_info.family == "sd-ip2p"
    assert panel.params.labels()[:2] == ["Text guidance", "Image guidance"]
    slider = panel.params.sliders["text_guidance"]
    before = slider.value()
    panel.params.editor("text_guidance").setValue(6.0)
    assert slider.value() < before and state.options["text_guidance"] == 6.0
    qtbot.keyClicks(panel.instruction.lineEdit(), "make it evening")
    progress_seen, previews = [], []
    state.on_change("step", progress_seen.append, now=False)
    state.on_change("preview", lambda p: p is not None and previews.append(p), now=False)
    qtbot.keyClick(panel.instruction.lineEdit(), Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert not panel.edit_button.isEnabled() and panel.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: state.job_state in ("done", "failed"), timeout=60_000)
    assert state.job_state == "done", state.error
    assert progress_seen and max(progress_seen) == 4
    assert previews, "the engine streams previews every 2 steps"
    assert panel.progress.value() == panel.progress.maximum()
    assert "Added “make it evening” with 2 layers" in panel.message_label.text()
    group = document.rootNode().childNodes()[-1]
    assert group.name() == "make it evening"
    names = [n.name() for n in reversed(group.childNodes())]
    assert names == ["make it evening · s_T 6 s_I 1.5 · seed 7", "make it evening · s_T 6 s_I 1.5 · seed 8"]
    data = bytes(group.childNodes()[-1].pixelData(0, 0, W, H))
    assert data[3::4] == b"\xff" * (W * H)  # whole layer edited, opaque
    assert panel.instruction.itemText(0) == "make it evening"  # history
    # Provenance of the selected result is shown, with "Edit this result".
    document.setActiveNode(group.childNodes()[-1])
    panel.controller.refresh_selected_provenance()
    assert panel.provenance_box.isVisibleTo(panel)
    text = panel.provenance_label.text()
    assert "seed 7" in text and "Sketch" in text and "s_T 6" in text


def test_engine_errors_show_inline(qtbot, panel, document):
    panel.model.addItem("Gone", "no-such-model")  # listed once, since removed from the engine
    panel.model.setCurrentIndex(panel.model.count() - 1)
    assert panel.state.model == "no-such-model"
    qtbot.keyClicks(panel.instruction.lineEdit(), "make it red")
    panel.edit_button.click()
    qtbot.waitUntil(lambda: panel.state.job_state == "failed", timeout=30_000)
    assert panel.error_label.isVisibleTo(panel)
    assert "no-such-model" in panel.error_label.text()
    assert panel.edit_button.isEnabled()
    assert [n.name() for n in document.rootNode().childNodes()] == ["Sketch"]
    panel.instruction.lineEdit().clear()
    panel.edit_button.click()
    assert "instruction" in panel.error_label.text().lower()


def test_cancel_during_an_edit(qtbot, panel, document):
    panel.steps.setValue(200)
    panel.state.resolution = 128
    qtbot.keyClicks(panel.instruction.lineEdit(), "make it snow")
    panel.edit_button.click()
    qtbot.waitUntil(lambda: panel.state.job_state == "running" and panel.state.step >= 1, timeout=60_000)
    assert "left" in panel.progress.format()
    panel.state.engine_note = "Converting the model for this CPU (first use only)…"
    assert panel.progress.format() == panel.state.engine_note  # said instead of the steps
    panel.state.engine_note = ""
    panel.cancel_button.click()
    assert panel.state.job_state == "cancelled" and panel.edit_button.isEnabled()
    qtbot.wait(300)
    assert [n.name() for n in document.rootNode().childNodes()] == ["Sketch"]


@pytest.mark.slow
def test_managed_engine_starts_and_restarts_after_a_crash(qtbot, document, tiny_model_dir, tmp_path):
    state = EditState()
    settings = Settings(engine_mode=MANAGED, python_path=str(Path(sys.executable).parent.parent),
                        device="cpu", engine_model=str(tiny_model_dir), cpu_runtime="torch")
    controller = EditController(state, lambda: KritaDocument(document), settings,
                                settings_path=tmp_path / "settings.json")
    widget = EditPanel(controller)
    qtbot.addWidget(widget)
    messages = []
    state.on_change("connection_message", messages.append)
    controller.connect_engine()
    assert state.connection == "starting"
    qtbot.waitUntil(lambda: state.connection == CONNECTED, timeout=90_000)
    arguments = list(controller.engine._process.arguments())
    assert arguments[arguments.index("--runtime") + 1] == "torch"  # the CPU runtime setting
    first_url = controller.engine.url
    token_file = Path(str(controller.engine._token_dir)) / "token"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    # Crash the engine in the middle of an edit: the edit fails with a message, the
    # engine comes back by itself.
    state.resolution, state.steps, state.instruction = 128, 200, "make it rain"
    assert controller.edit()
    qtbot.waitUntil(lambda: state.job_state == "running", timeout=60_000)
    process = controller.engine._process
    pid = process.processId()
    os.kill(pid, signal.SIGKILL)
    qtbot.waitUntil(lambda: state.job_state == "failed", timeout=10_000)
    assert "stopped unexpectedly" in state.error and "Edit again" in state.error
    assert any("stopped unexpectedly" in m for m in messages)
    qtbot.waitUntil(lambda: state.connection == CONNECTED, timeout=90_000)
    new_process = controller.engine._process
    assert new_process.processId() != pid and controller.engine.url != first_url
    controller.shutdown()
    assert controller.engine is None
    assert new_process.state() == new_process.ProcessState.NotRunning
    assert not token_file.exists()  # the token does not outlive the engine


def test_settings_dialog_checks_and_returns_settings(qtbot):
    from instruct_edit.ui.settings_dialog import SettingsDialog

    dialog = SettingsDialog(Settings(engine_mode=MANAGED, python_path=""))
    qtbot.addWidget(dialog)
    dialog._accept()
    assert "Python environment" in dialog.problem_label.text() and not dialog.result()
    assert dialog.result_settings().cpu_runtime == "auto"
    dialog.cpu_runtime.setCurrentIndex(dialog.cpu_runtime.findData("openvino-int8"))
    assert dialog.result_settings().cpu_runtime == "openvino-int8"
    dialog.remote.setChecked(True)
    dialog.remote_url.setText("http://gpu-box:8765/")
    dialog.remote_token.setText(" tok ")
    dialog._accept()
    assert dialog.result() == 1
    chosen = dialog.result_settings()
    assert (chosen.engine_mode, chosen.remote_url, chosen.remote_token) == (REMOTE, "http://gpu-box:8765", "tok")


def test_plugin_registers_docker_and_actions(qtbot, fake_krita, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    import instruct_edit
    import instruct_edit.ui.docker as docker_module

    importlib.reload(instruct_edit)
    app = fake_krita.Krita.instance()
    assert [f.id for f in app.dock_factories] == ["instruct_edit_docker"]
    assert len(app.extensions) == 1
    docker_module = importlib.reload(docker_module)
    dock = app.dock_factories[0].cls()
    qtbot.addWidget(dock)
    assert dock.windowTitle() == "Instruct Edit"
    # No engine configured yet: the docker says what to do instead of failing.
    qtbot.waitUntil(lambda: dock.controller.state.connection == "failed", timeout=5_000)
    assert "Python environment" in dock.panel.connection_label.text()
    dock.controller.shutdown()
    docker_module._shared.clear()
