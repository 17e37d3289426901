"""Issue 14, plugin side: pairs from layers, datasets, the training routes, the Train tab.

Against the stand-in engine (fake_engine.py simulates the training routes of the contract,
with progress, validations, cancel, resume and the LoRA registered when done) and a fake
`krita` document. Runs under PyQt6 and PyQt5 (test_plugin_bindings.py).
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from instruct_edit import image as px
from instruct_edit.client.http import EngineClient
from instruct_edit.client.trainings import TrainingOptions, TrainingStatus, statuses_from_json
from instruct_edit.krita_document import KritaDocument, UnsupportedDocument
from instruct_edit.model.connection import EngineConnection
from instruct_edit.model.controller import EditController
from instruct_edit.model.settings import REMOTE, Settings
from instruct_edit.model.state import CONNECTED, EditState
from instruct_edit.model.training import TrainingController
from instruct_edit.qt import QImage
from instruct_edit.training_pair import METADATA, dataset_zip, list_pairs, remove_pair, save_pair
from qt_wait import wait_for

W, H = 40, 32


def solid(width: int, height: int, bgra: tuple[int, int, int, int]) -> bytes:
    return bytes(bgra) * (width * height)


def gradient(x: int, y: int) -> tuple[int, int, int, int]:
    return ((x * 5) % 256, (y * 7) % 256, 90, 255)


def inked(x: int, y: int) -> tuple[int, int, int, int]:
    return (20, 20, 20, 255) if (x + y) % 5 == 0 else (240, 240, 240, 255)


# --- the dataset folder ---------------------------------------------------------------------


def make_pairs(folder: Path, count: int, size: tuple[int, int] = (8, 6)) -> list[dict[str, str]]:
    w, h = size
    return [
        save_pair(
            folder, f"make it {k}", solid(w, h, (k, 0, 0, 255)), solid(w, h, (0, k, 0, 255)), w, h
        )
        for k in range(count)
    ]


def test_pairs_are_listed_and_removed_atomically_keeping_other_rows(tmp_path):
    entries = make_pairs(tmp_path, 3)
    # A hand-written line the plugin does not understand, and a row sharing an image.
    with open(tmp_path / METADATA, "a", encoding="utf-8") as handle:
        handle.write("not json at all\n")
        handle.write(
            json.dumps(
                {
                    "input_image": entries[1]["input_image"],
                    "edit_prompt": "again",
                    "edited_image": entries[2]["edited_image"],
                }
            )
            + "\n"
        )
    pairs = list_pairs(tmp_path)
    assert [p.edit_prompt for p in pairs] == ["make it 0", "make it 1", "make it 2", "again"]
    assert [p.line for p in pairs] == [0, 1, 2, 4]
    before_lines = (tmp_path / METADATA).read_text().splitlines(keepends=True)

    remove_pair(tmp_path, pairs[1])
    after_lines = (tmp_path / METADATA).read_text().splitlines(keepends=True)
    assert after_lines == before_lines[:1] + before_lines[2:]  # every other line byte for byte
    # Its edited image went; its input image stays (the "again" row still names it).
    assert not (tmp_path / entries[1]["edited_image"]).exists()
    assert (tmp_path / entries[1]["input_image"]).exists()
    for other in (entries[0], entries[2]):
        assert (tmp_path / other["input_image"]).exists() and (
            tmp_path / other["edited_image"]
        ).exists()
    assert not list(tmp_path.glob(".metadata-*"))  # no temporary file left behind

    # A stale entry (the file changed since it was listed) removes nothing.
    with pytest.raises(ValueError, match="changed on disk"):
        remove_pair(tmp_path, pairs[2])  # pairs[2] was on line 2, now line 1
    assert (tmp_path / METADATA).read_text().splitlines(keepends=True) == after_lines
    fresh = list_pairs(tmp_path)
    remove_pair(tmp_path, fresh[1])
    assert [p.edit_prompt for p in list_pairs(tmp_path)] == ["make it 0", "again"]
    assert (tmp_path / entries[2]["edited_image"]).exists()  # still used by "again"


def test_a_new_pair_never_overwrites_and_fixes_a_missing_final_newline(tmp_path):
    first = make_pairs(tmp_path, 1)[0]
    (tmp_path / METADATA).write_text((tmp_path / METADATA).read_text().rstrip("\n"))
    second = save_pair(
        tmp_path, "make it 0", solid(4, 4, (1, 2, 3, 255)), solid(4, 4, (3, 2, 1, 255)), 4, 4
    )
    assert second["input_image"] != first["input_image"]
    assert [p.edit_prompt for p in list_pairs(tmp_path)] == ["make it 0", "make it 0"]
    assert list_pairs(tmp_path / "missing") == []


def test_dataset_zip_holds_metadata_and_named_images_only(tmp_path):
    entries = make_pairs(tmp_path, 2)
    (tmp_path / "unrelated.txt").write_text("private notes")
    archive = zipfile.ZipFile(io.BytesIO(dataset_zip(tmp_path)))
    names = sorted(archive.namelist())
    assert names == sorted(
        [METADATA, *(e[k] for e in entries for k in ("input_image", "edited_image"))]
    )
    assert archive.read(METADATA) == (tmp_path / METADATA).read_bytes()
    with pytest.raises(ValueError, match="at most"):
        dataset_zip(tmp_path, max_bytes=10)
    (tmp_path / entries[0]["edited_image"]).unlink()
    with pytest.raises(ValueError, match="missing"):
        dataset_zip(tmp_path)
    with pytest.raises(ValueError, match="no pairs"):
        dataset_zip(tmp_path / "empty")


# --- reading two layers ------------------------------------------------------------------


@pytest.fixture
def document(fake_krita):
    doc = fake_krita.Document(W, H)
    doc.add_paint_layer("Sketch", gradient)
    doc.add_paint_layer("Ink", inked)
    fake_krita.Krita.instance().document = doc
    return doc


def test_layers_are_offered_and_read_at_full_resolution(fake_krita, document):
    adapter = KritaDocument(document)
    sketch, ink = document.rootNode().childNodes()
    ids = {n.name(): n.uniqueId().toString() for n in (sketch, ink)}
    assert adapter.paint_layers() == [(ids["Ink"], "Ink"), (ids["Sketch"], "Sketch")]
    # Current = Ink (on top): before = the layer below it, after = Ink.
    assert adapter.default_pair_layers() == (ids["Sketch"], ids["Ink"])
    document.setActiveNode(sketch)
    assert adapter.default_pair_layers() == (ids["Sketch"], ids["Ink"])
    before, after, area = adapter.read_layer_pair(ids["Sketch"], ids["Ink"])
    assert tuple(area) == (0, 0, W, H)
    assert before == bytes(sketch.pixelData(0, 0, W, H)) and after == bytes(
        ink.pixelData(0, 0, W, H)
    )
    # A selection: exactly its bounding box of both layers, no scaling.
    document.setSelection(fake_krita.Selection(W, H).select_rect(5, 4, 13, 9))
    before, after, area = adapter.read_layer_pair(ids["Sketch"], ids["Ink"])
    assert tuple(area) == (5, 4, 13, 9) and len(before) == len(after) == 13 * 9 * 4
    assert before == bytes(sketch.pixelData(5, 4, 13, 9))


def test_unusable_layer_pairs_are_refused_with_what_to_do(fake_krita, document):
    adapter = KritaDocument(document)
    sketch, ink = document.rootNode().childNodes()
    sid, iid = sketch.uniqueId().toString(), ink.uniqueId().toString()
    with pytest.raises(UnsupportedDocument, match="same"):
        adapter.read_layer_pair(sid, sid)
    small = document.createNode("Patch", "paintlayer")
    small.setPixelData(solid(10, 10, (1, 2, 3, 255)), 3, 3, 10, 10)
    document.rootNode().addChildNode(small, ink)
    with pytest.raises(UnsupportedDocument, match=r"different areas.*Select All"):
        adapter.read_layer_pair(sid, small.uniqueId().toString())
    ink.color = ("RGBA", "U16")
    with pytest.raises(UnsupportedDocument, match=r"16-bit integer.*8-bit"):
        adapter.read_layer_pair(sid, iid)
    ink.color = ("RGBA", "U8")
    empty = document.createNode("Empty", "paintlayer")
    document.rootNode().addChildNode(empty, small)
    with pytest.raises(UnsupportedDocument, match="empty"):
        adapter.read_layer_pair(sid, empty.uniqueId().toString())
    with pytest.raises(UnsupportedDocument, match="gone"):
        adapter.read_layer_pair(sid, "{no-such-layer}")


# --- the client against the stand-in engine ------------------------------------------------------


def call(method, *args, **kwargs):
    """Run one asynchronous client call to its end: (answer, error)."""
    box: dict = {}
    method(
        *args,
        lambda value: box.setdefault("done", value),
        lambda err: box.setdefault("error", err),
        **kwargs,
    )
    wait_for(lambda: box)
    return box.get("done"), box.get("error")


def test_client_training_routes(qapp, fake_engine, tmp_path):
    make_pairs(tmp_path, 3)
    fake_engine.trainings.validation_every = 2
    client = EngineClient(fake_engine.url, "secret")
    answer, error = call(client.training_options)
    options = TrainingOptions.from_json(answer)
    assert error is None and [m.id for m in options.trainable] == ["fake-model"]
    assert options.preset("quick").describe().startswith("6 steps · rank 4 · 256 px")
    assert options.min_pairs == 2

    params = {"name": "ink", "model": "fake-model", "preset": "quick"}
    answer, error = call(client.start_training, params, dataset_folder=str(tmp_path))
    assert error is None, error and error.message
    status = TrainingStatus.from_json(answer)
    assert status.pairs == 3 and status.max_steps == 6
    assert fake_engine.trainings.posts[-1]["folder"] == str(tmp_path)
    events: list = []
    ended: dict = {}
    client.training_events(
        status.id,
        lambda name, data: events.append((name, data)),
        lambda err: ended.setdefault("error", err),
    )
    wait_for(lambda: ended)
    assert ended["error"] is None
    names = [name for name, _ in events]
    assert names.count("progress") >= 1 and "validation" in names and names[-1] == "state"
    final = TrainingStatus.from_json(events[-1][1])
    assert (
        final.state == "done" and final.lora_path == "trained/ink/pytorch_lora_weights.safetensors"
    )
    assert "fake-model" in final.lora_card and [s for s, _ in final.loss] == list(range(1, 7))
    png, error = call(client.validation_image, status.id, 0)
    assert error is None and not px.decode_png(png).isNull()
    listed, _ = call(client.trainings)
    assert [t.id for t in statuses_from_json(listed)] == [status.id]

    # A zip upload; then a second training while none runs gets a new LoRA name.
    answer, error = call(client.start_training, params, dataset_zip=dataset_zip(tmp_path))
    assert error is None and fake_engine.trainings.posts[-1]["kind"] == "zip"
    assert METADATA in fake_engine.trainings.posts[-1]["files"]
    wait_for(lambda: fake_engine.trainings.jobs["train1"]["state"] == "done")
    assert fake_engine.trainings.jobs["train1"]["lora"]["path"].startswith("trained/ink-2/")

    # Refusals keep the engine's words; a 403 about the dataset is not "the token is wrong".
    fake_engine.trainings.allow_folder = False
    _, error = call(client.start_training, params, dataset_folder=str(tmp_path))
    assert error.status == 403 and "zip" in error.message and error.kind == "engine"
    _, error = call(
        client.start_training, {**params, "preset": "nope"}, dataset_zip=dataset_zip(tmp_path)
    )
    assert error.status == 422 and error.message.startswith("Preset:")
    client.close()


# --- the Train tab's model (no widgets) ------------------------------------------------------


@pytest.fixture
def controllers(qapp, fake_engine, document, tmp_path):
    settings = Settings(
        engine_mode=REMOTE,
        remote_url=fake_engine.url,
        remote_token="secret",
        datasets_folder=str(tmp_path / "datasets"),
    )
    edit = EditController(
        EditState(),
        lambda: KritaDocument(document),
        settings,
        settings_path=tmp_path / "settings.json",
    )
    training = TrainingController(edit)
    edit.connect_engine()
    wait_for(lambda: edit.state.connection == CONNECTED and training.state.options.presets)
    yield edit, training
    training.shutdown()
    edit.shutdown()


def add_two_pairs(training: TrainingController) -> None:
    training.refresh_layers()
    for instruction in ("ink the sketch", "ink it again"):
        training.state.pair_instruction = instruction
        assert training.add_pair(), training.state.error


def test_pairs_from_layers_into_a_new_dataset(controllers, document, tmp_path):
    _, training = controllers
    state = training.state
    assert state.datasets == [] and not training.add_pair() and "dataset" in state.error
    assert training.new_dataset("inking")
    folder = tmp_path / "datasets" / "inking"
    assert state.dataset == str(folder) and folder.is_dir()
    assert not training.new_dataset("../escape") and "letters" in state.error
    training.refresh_layers()
    sketch, ink = document.rootNode().childNodes()
    assert (state.before_layer, state.after_layer) == (
        sketch.uniqueId().toString(),
        ink.uniqueId().toString(),
    )
    assert not training.add_pair() and "instruction" in state.error.lower()
    # Until the painter picks, the choice follows the current layer; a pick is kept.
    colour = document.add_paint_layer("Colour", gradient)  # on top, and now the current layer
    training.refresh_layers()
    ids = {n.name(): n.uniqueId().toString() for n in (sketch, ink, colour)}
    assert (state.before_layer, state.after_layer) == (ids["Ink"], ids["Colour"])
    training.choose_layer("before", ids["Sketch"])
    document.setActiveNode(ink)
    training.refresh_layers()
    assert (state.before_layer, state.after_layer) == (ids["Sketch"], ids["Colour"])
    colour.remove()  # a chosen layer is gone: back to following the current layer
    training.refresh_layers()
    assert (state.before_layer, state.after_layer) == (ids["Sketch"], ids["Ink"])
    add_two_pairs(training)
    assert [p.edit_prompt for p in state.pairs] == ["ink the sketch", "ink it again"]
    before_file, after_file = training.pair_paths(state.pairs[0])
    before, after = QImage(str(before_file)), QImage(str(after_file))
    assert (before.width(), before.height()) == (W, H)  # full resolution
    assert px.bgra_from_image(after) == bytes(ink.pixelData(0, 0, W, H))
    assert "2 pairs" in state.message
    assert training.remove_pair(state.pairs[0])
    assert [p.edit_prompt for p in state.pairs] == ["ink it again"] and not before_file.exists()
    # The dataset is remembered in the settings.
    assert json.loads((tmp_path / "settings.json").read_text())["training"]["dataset"] == str(
        folder
    )


def test_train_follow_done_and_the_lora_is_offered(controllers, fake_engine):
    edit, training = controllers
    state = training.state
    assert state.base_model == "fake-model" and state.preset == "balanced"
    training.new_dataset("inking")
    training.refresh_layers()
    state.pair_instruction = "ink the sketch"
    assert training.add_pair()
    assert not training.start() and "at least 2" in state.error  # min_pairs from the engine
    state.pair_instruction = "ink it again"
    assert training.add_pair()
    seen_steps: list = []
    state.on_change("current", lambda s: s is not None and seen_steps.append(s.step), now=False)
    assert training.start(), state.error
    wait_for(lambda: fake_engine.trainings.posts)
    post = fake_engine.trainings.posts[-1]
    assert post["kind"] == "folder" and post["params"] == {
        "name": "inking",
        "model": "fake-model",
        "preset": "balanced",
    }
    wait_for(lambda: state.current is not None and state.current.state == "done")
    assert max(seen_steps) == 10 and len(set(seen_steps)) > 3  # progress arrived step by step
    assert [s for s, _ in state.current.loss] == list(range(1, 11))
    wait_for(lambda: state.validation_image is not None and state.validation_step == 10)
    lora = "trained/inking/pytorch_lora_weights.safetensors"
    wait_for(lambda: lora in edit.state.loras)  # the engine's list, refreshed at once
    assert "inking" in state.message
    assert training.use_lora() and edit.state.lora_path == lora and edit.state.model == "fake-model"
    assert edit.state.request(new_seed=False).loras[0].path == lora


def test_base_model_default_and_the_painters_choice(controllers):
    from instruct_edit.client.trainings import TrainableModel

    edit, training = controllers
    state = training.state
    # A hub model listed first (its weights may not be there): the engine's default wins.
    state.options = TrainingOptions(
        models=(
            TrainableModel("hub/other", trainable=True),
            TrainableModel("fake-model", trainable=True),
            TrainableModel("big", trainable=False, why_not="no"),
        )
    )
    training._pick_base_model()
    assert state.base_model == "fake-model"
    training.choose_base_model("hub/other")  # the painter's choice is kept from now on
    training._pick_base_model()
    assert state.base_model == "hub/other"
    assert edit.settings.training["base_model"] == "hub/other"
    state.options = TrainingOptions(
        models=(TrainableModel("big", trainable=False, why_not="needs a GPU"),)
    )
    training._pick_base_model()
    assert state.base_model == ""
    training.new_dataset("inking")
    add_two_pairs(training)
    assert not training.start() and "big: needs a GPU" in state.error


def test_an_engine_elsewhere_gets_a_zip(controllers, fake_engine, monkeypatch):
    _, training = controllers
    training.new_dataset("inking")
    add_two_pairs(training)
    monkeypatch.setattr(EngineConnection, "loopback", property(lambda self: False))
    training.state.max_steps = 4  # the painter's own number of steps: sent as an override
    assert training.start(), training.state.error
    wait_for(lambda: training.state.current is not None)
    assert fake_engine.trainings.posts
    post = fake_engine.trainings.posts[-1]
    assert post["kind"] == "zip" and len(post["files"]) == 5
    assert post["params"]["overrides"] == {"max_steps": 4}
    wait_for(lambda: training.state.current.state == "done")
    assert training.state.current.step == training.state.current.max_steps == 4
    training.state.max_steps = 0
    # An engine that does not see this machine's folders (403): the plugin uploads instead.
    monkeypatch.undo()
    fake_engine.trainings.allow_folder = False
    assert training.start(), training.state.error
    wait_for(lambda: len(fake_engine.trainings.posts) == 3)
    assert [p["kind"] for p in fake_engine.trainings.posts[1:]] == ["folder", "zip"]
    wait_for(
        lambda: training.state.current.id == "train1" and training.state.current.state == "done"
    )
    assert training.state.error == ""


def test_interrupted_training_is_resumed_after_an_engine_restart(
    controllers, fake_engine, document, tmp_path
):
    edit, training = controllers
    fake_engine.trainings.step_delay = 0.1
    training.new_dataset("inking")
    add_two_pairs(training)
    assert training.start()
    wait_for(lambda: training.state.current is not None and training.state.current.step >= 3)
    fake_engine.trainings.interrupt_all()  # the engine stopped mid-training
    wait_for(lambda: training.state.current.state == "interrupted")
    assert "interrupted" in training.state.error and "Resume" in training.state.error
    # A fresh plugin (Krita restarted) finds it in the engine's list, resumable.
    again = TrainingController(edit)
    again.fetch_trainings()
    wait_for(lambda: again.state.current is not None)
    assert again.state.current.can_resume() and again.state.current.step >= 2
    fake_engine.trainings.step_delay = 0.15
    assert again.resume(), again.state.error
    job = fake_engine.trainings.jobs[again.state.current.id]
    wait_for(lambda: "resumed_from" in job)
    repeated = job["resumed_from"] + 1  # a step that ran before the interruption too
    wait_for(
        lambda: again.state.current.state == "running" and again.state.current.step >= repeated
    )
    # While it runs, the live curve already holds the second run's value for that step.
    assert dict(again.state.current.loss)[repeated] == round(0.5 / (1 + 0.3 * repeated) * 0.9, 5)
    fake_engine.trainings.step_delay = 0.01
    wait_for(lambda: again.state.current.state == "done")
    assert job["resumes"] == 1 and job["resumed_from"] >= 2
    # The steps after the checkpoint ran twice: one point per step, the second run's value.
    assert [s for s, _ in again.state.current.loss] == list(range(1, 11))
    assert [list(point) for point in again.state.current.loss] == job["loss"]
    again.shutdown()


# --- the Train tab (pytest-qt, offscreen) -------------------------------------------------------


@pytest.fixture
def tabs(qtbot, controllers):
    from instruct_edit.ui.panel import EditPanel
    from instruct_edit.ui.train_panel import TrainPanel

    edit, training = controllers
    edit_panel, train_panel = EditPanel(edit), TrainPanel(training)
    for widget in (edit_panel, train_panel):
        qtbot.addWidget(widget)
        widget.show()
    return edit_panel, train_panel


def test_pair_list_add_preview_remove(qtbot, tabs, document, monkeypatch):
    from instruct_edit.qt import QtWidgets

    _, panel = tabs
    monkeypatch.setattr(QtWidgets.QInputDialog, "getText", lambda *a, **k: ("inking", True))
    panel.new_dataset_button.click()
    assert panel.dataset.currentText() == "inking"
    panel.refresh()  # the docker's poll: the document's layers
    assert [panel.before_layer.itemText(i) for i in range(panel.before_layer.count())] == [
        "Ink",
        "Sketch",
    ]
    assert (panel.before_layer.currentText(), panel.after_layer.currentText()) == ("Sketch", "Ink")
    panel.add_pair_button.click()
    assert "instruction" in panel.error_label.text().lower() and panel.pairs.count() == 0
    qtbot.keyClicks(panel.pair_instruction, "ink the sketch")
    panel.add_pair_button.click()
    assert panel.error_label.text() == "" and panel.pairs.count() == 1
    item = panel.pairs.item(0)
    assert item.text() == "ink the sketch" and not item.icon().isNull()
    thumb = panel.thumbnail(panel.state.pairs[0])
    assert thumb.height() == 48 and thumb.width() > 2 * 48  # before | after side by side
    # Choosing the same layer twice is refused in words, nothing written.
    panel.after_layer.setCurrentIndex(panel.after_layer.findText("Sketch"))
    panel.add_pair_button.click()
    assert "same" in panel.error_label.text() and panel.pairs.count() == 1
    panel.pairs.setCurrentRow(0)
    assert panel.pair_preview.isVisibleTo(panel) and not panel.pair_preview.pixmap().isNull()
    files = panel.controller.pair_paths(panel.state.pairs[0])
    panel.pairs.item(0).setSelected(True)
    panel.remove_pair_button.click()
    assert panel.pairs.count() == 0 and not any(f.exists() for f in files)
    assert "0 pairs" in panel.pairs_count.text()
    # It fits a narrow docker (long preset / model / layer names shorten instead).
    assert panel.widget().minimumSizeHint().width() <= 300


def test_train_tab_start_progress_validation_done_lora_in_edit_form(qtbot, tabs, fake_engine):
    edit_panel, panel = tabs
    training = panel.controller
    fake_engine.trainings.step_delay = 0.05
    training.new_dataset("inking")
    add_two_pairs(training)
    assert panel.base_model.count() == 1 and panel.base_model.currentData() == "fake-model"
    assert "big-model" in panel.base_model.toolTip() and "24 GB" in panel.base_model.toolTip()
    panel.preset.setCurrentIndex(panel.preset.findData("quick"))
    assert training.state.preset == "quick" and panel.preset_info.text().startswith(
        "6 steps · rank 4 · 256 px"
    )
    assert panel.start_button.isEnabled() and not panel.cancel_button.isEnabled()
    progress_values: list = []
    panel.progress.valueChanged.connect(progress_values.append)
    panel.start_button.click()
    qtbot.waitUntil(
        lambda: training.state.current is not None and training.state.current.step >= 2,
        timeout=10_000,
    )
    assert not panel.start_button.isEnabled() and panel.cancel_button.isEnabled()
    assert "left" in panel.progress.format()
    qtbot.waitUntil(lambda: training.state.current.state == "done", timeout=10_000)
    assert panel.progress.value() == panel.progress.maximum() == 6 and len(progress_values) >= 3
    assert len(panel.loss_curve.points) == 6 and len(panel.loss_curve.polyline()) == 6
    ys = [y for _, y in panel.loss_curve.polyline()]
    assert ys == sorted(ys)  # the fake's loss falls: the curve goes down the widget
    qtbot.waitUntil(lambda: "step 6" in panel.validation_caption.text(), timeout=5_000)
    assert panel.validation.isVisibleTo(panel) and not panel.validation.pixmap().isNull()
    lora = "trained/inking/pytorch_lora_weights.safetensors"
    qtbot.waitUntil(
        lambda: edit_panel.lora.findData(lora) >= 0, timeout=5_000
    )  # the Edit tab's list
    assert panel.card.isVisibleTo(panel) and "Base model: fake-model" in panel.card.toPlainText()
    assert panel.use_button.isVisibleTo(panel)
    panel.use_button.click()
    assert edit_panel.lora.currentData() == lora
    assert panel.trainings.currentText().startswith("inking · done")
    grab = panel.loss_curve.grab()  # paints without error
    assert not grab.isNull()


def test_train_tab_cancel_and_resume(qtbot, tabs, fake_engine):
    _, panel = tabs
    training = panel.controller
    fake_engine.trainings.step_delay = 0.1
    training.new_dataset("inking")
    add_two_pairs(training)
    panel.start_button.click()
    qtbot.waitUntil(
        lambda: training.state.current is not None and training.state.current.step >= 3,
        timeout=10_000,
    )  # past the first checkpoint (every 2 steps): resumable
    panel.cancel_button.click()
    # The event stream and the DELETE's answer both tell; the message comes with the answer.
    qtbot.waitUntil(
        lambda: (
            training.state.current.state == "cancelled"
            and "checkpoint" in panel.message_label.text()
        ),
        timeout=5_000,
    )
    assert "Cancelled" in panel.progress.format()
    assert panel.resume_button.isEnabled() and panel.start_button.isEnabled()
    stopped_at = training.state.current.step
    fake_engine.trainings.step_delay = 0.01
    panel.resume_button.click()
    qtbot.waitUntil(lambda: training.state.current.state == "done", timeout=10_000)
    assert training.state.current.step == 10 > stopped_at
    job = fake_engine.trainings.jobs[training.state.current.id]
    assert [list(point) for point in training.state.current.loss] == job["loss"]
    assert [s for s, _ in panel.loss_curve.points] == list(range(1, 11))
    assert not panel.resume_button.isEnabled()


def test_the_docker_has_an_edit_and_a_train_tab(qtbot, fake_krita, monkeypatch, tmp_path):
    import importlib

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    import instruct_edit.ui.docker as docker_module

    docker_module = importlib.reload(docker_module)
    doc = fake_krita.Document(W, H)
    doc.add_paint_layer("Sketch", gradient)
    doc.add_paint_layer("Ink", inked)
    fake_krita.Krita.instance().document = doc
    dock = docker_module.InstructEditDocker()
    qtbot.addWidget(dock)
    dock.show()
    try:
        assert [dock.tabs.tabText(i) for i in range(dock.tabs.count())] == ["Edit", "Train"]
        assert dock.panel.controller is dock.training.edit  # one engine connection for both
        dock.tabs.setCurrentWidget(dock.train_panel)  # the poll refreshes the layers at once
        assert dock.train_panel.before_layer.currentText() == "Sketch"
        assert dock.train_panel.after_layer.currentText() == "Ink"
        # The default datasets folder lives next to the settings, in Krita's data folder.
        assert dock.training.state.datasets_root.startswith(str(tmp_path))
    finally:
        dock.training.shutdown()
        dock.controller.shutdown()
        docker_module._shared.clear()
