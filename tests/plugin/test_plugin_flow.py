"""The core flow without widgets: fake Krita document -> controller -> fake engine -> layers.

Checks the layer results exactly (the fake engine inverts colours), so every pixel that
comes back can be predicted. Runs under PyQt6 and PyQt5.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import qt_wait
from instruct_edit.krita_document import KritaDocument
from instruct_edit.model import naming
from instruct_edit.model.controller import EditController
from instruct_edit.model.settings import REMOTE, Settings
from instruct_edit.model.state import CONNECTED, EditState
from instruct_edit.qt import QApplication

W, H = 96, 64


def wait_for(condition, timeout: float = 15.0) -> None:
    qt_wait.wait_for(condition, timeout)


@pytest.fixture(scope="module", autouse=True)
def app():
    return QApplication.instance() or QApplication([])




def pattern(x: int, y: int) -> tuple[int, int, int, int]:
    return (x * 2 % 256, y * 3 % 256, (x + y) % 256, 255)


@pytest.fixture
def setup(fake_krita, fake_engine, tmp_path: Path):
    document = fake_krita.Document(W, H)
    background = document.add_paint_layer("Background", pattern)
    fake_krita.Krita.instance().document = document
    state = EditState()
    settings = Settings(engine_mode=REMOTE, remote_url=fake_engine.url, remote_token="secret")
    controller = EditController(state, lambda: KritaDocument(document), settings,
                                settings_path=tmp_path / "settings.json")
    controller.connect_engine()
    wait_for(lambda: state.connection == CONNECTED)
    wait_for(lambda: state.models)
    state.instruction, state.steps, state.random_seed, state.seed = "invert it", 3, False, 40
    yield document, background, state, controller, fake_engine
    controller.shutdown()


def test_edit_with_selection_adds_one_group_inside_the_selection(setup):
    document, background, state, controller, engine = setup
    from fake_krita import Selection

    document.setSelection(Selection(W, H).select_rect(40, 20, 16, 12))
    state.variants = 2
    before = bytes(background.pixelData(0, 0, W, H))
    assert controller.edit()
    wait_for(lambda: state.job_state in ("done", "failed"))
    assert state.job_state == "done", state.error

    # Upload: only the region (selection + context) at full size, raw on loopback, with the
    # selection as a gray8 mask of the same size.
    upload, types = engine.uploads[-1], engine.upload_types[-1]
    record = KritaDocument(document).provenance_of(document.activeNode())
    x0, y0, rw, rh = record["bounds"]
    assert types["image"] == f"image/x-raw; format=bgra8; width={rw}; height={rh}"
    assert types["mask"] == f"image/x-raw; format=gray8; width={rw}; height={rh}"
    assert upload["image"] == bytes(background.pixelData(x0, y0, rw, rh))
    assert upload["mask"] == bytes(document.selection().pixelData(x0, y0, rw, rh))
    assert int(upload["preview_every"]) >= 2
    params = __import__("json").loads(upload["params"])
    assert params["seed"] == 40 and params["variants"] == 2 and params["instruction"] == "invert it"
    assert all("format=bgra8" in path for path in engine.result_requests)

    # One new group above the source, named after the instruction, 2 layers, first visible.
    top = document.rootNode().childNodes()
    assert [n.name() for n in top] == ["Background", "invert it"]
    group = top[1]
    layers = list(reversed(group.childNodes()))  # top first
    request = state.request(new_seed=False)
    assert [n.name() for n in layers] == [naming.layer_name(request, 0), naming.layer_name(request, 1)]
    assert "seed 40" in layers[0].name() and "seed 41" in layers[1].name()
    assert [n.visible() for n in layers] == [True, False]

    # Result pixels, exactly what the engine blended: inverted inside the selection, the
    # source's own bytes in the rest of the region, nothing outside the region.
    result = bytes(layers[0].pixelData(0, 0, W, H))
    for y in range(H):
        for x in range(W):
            i = (y * W + x) * 4
            b, g, r, a = pattern(x, y)
            if 40 <= x < 56 and 20 <= y < 32:
                assert result[i : i + 4] == bytes((255 - b, 255 - g, 255 - r, 255)), (x, y)
            elif x0 <= x < x0 + rw and y0 <= y < y0 + rh:
                assert result[i : i + 4] == bytes((b, g, r, a)), (x, y)
            else:
                assert result[i + 3] == 0, (x, y)

    # Source untouched, provenance stored, one undo removes everything.
    assert bytes(background.pixelData(0, 0, W, H)) == before and background.writes == 0
    records = KritaDocument(document).provenance_records()
    assert records[layers[1].uniqueId().toString()]["seed"] == 41
    assert records[layers[0].uniqueId().toString()]["source_layer"] == "Background"
    assert len(document.undo_stack) == 1
    document.undo()
    assert [n.name() for n in document.rootNode().childNodes()] == ["Background"]
    assert state.history[0] == "invert it"


def test_canvas_source_without_selection_and_provenance_display(setup):
    document, background, state, controller, engine = setup
    state.source = "canvas"
    assert controller.edit()
    wait_for(lambda: state.job_state in ("done", "failed"))
    assert state.job_state == "done", state.error
    assert "mask" not in engine.uploads[-1]
    group = document.rootNode().childNodes()[-1]
    layer = group.childNodes()[-1]
    data = bytes(layer.pixelData(0, 0, W, H))
    assert data[3::4] == b"\xff" * (W * H)  # full canvas, opaque
    document.setActiveNode(layer)
    controller.refresh_selected_provenance()
    assert state.selected_provenance["instruction"] == "invert it"
    assert state.selected_provenance["source"] == "canvas"
    # Chain: the next edit uses the selected result layer as its source.
    controller.edit_this_result()
    assert state.source == "layer"
    state.instruction = "invert again"
    assert controller.edit()
    wait_for(lambda: state.job_state in ("done", "failed"))
    chained = KritaDocument(document).provenance_of(document.activeNode())
    assert chained["source_layer"] == layer.name() and chained["instruction"] == "invert again"
    # Inverting twice gives the original back.
    twice = bytes(document.activeNode().pixelData(0, 0, W, H))
    original = bytes(background.pixelData(0, 0, W, H))
    assert max(abs(a - b) for a, b in zip(twice[:4000], original[:4000], strict=True)) <= 4


def test_explore_makes_nine_layers_with_one_seed(setup):
    document, _, state, controller, _ = setup
    state.steps = 1
    assert controller.edit(explore=True)
    wait_for(lambda: state.job_state in ("done", "failed"), timeout=30)
    assert state.job_state == "done", state.error
    group = document.rootNode().childNodes()[-1]
    names = [n.name() for n in group.childNodes()]
    assert len(names) == 9 and all(n.endswith("seed 40") or "seed 40" in n for n in names)
    assert len(set(names)) == 9
    assert sum(n.visible() for n in group.childNodes()) == 1


def test_refusals_and_engine_errors_are_inline_messages(setup, fake_krita):
    document, background, state, controller, engine = setup
    state.instruction = ""
    assert not controller.edit()
    assert state.error_field == "instruction" and "instruction" in state.error.lower()
    state.instruction = "x"
    document.color = ("RGBA", "U16")
    background.color = ("RGBA", "U16")
    assert not controller.edit()
    assert "8-bit" in state.error and "Convert Image Color Space" in state.error
    background.color = document.color = ("RGBA", "U8")
    engine.fail_with = (422, {"error": {"status": 422, "message": "unknown model 'x'", "field": "model"}})
    assert controller.edit()
    wait_for(lambda: state.job_state == "failed")
    assert state.error == "Model: unknown model 'x'" and state.error_field == "model"
    assert [n.name() for n in document.rootNode().childNodes()] == ["Background"]


def test_cancel_adds_nothing(setup):
    document, _, state, controller, engine = setup
    engine.steps_delay = 0.05
    state.steps = 40
    assert controller.edit()
    wait_for(lambda: state.job_state == "running")
    controller.cancel()
    assert state.job_state == "cancelled"
    wait_for(lambda: engine.jobs and next(iter(engine.jobs.values()))["state"] == "cancelled")
    for _ in range(50):
        QApplication.processEvents()
        time.sleep(0.01)
    assert [n.name() for n in document.rootNode().childNodes()] == ["Background"]


def test_layer_source_reads_only_the_layer(fake_krita, setup):
    document, background, state, controller, _ = setup
    # A small layer on top: its own pixels (not the canvas) are the source, over its bounds.
    top = document.createNode("Patch", "paintlayer")
    top.setPixelData(bytes((0, 0, 255, 255)) * (8 * 8), 10, 10, 8, 8)
    document.rootNode().addChildNode(top, background)
    document.setActiveNode(top)
    assert controller.edit()
    wait_for(lambda: state.job_state in ("done", "failed"))
    assert state.job_state == "done", state.error
    record = KritaDocument(document).provenance_of(document.activeNode())
    assert record["bounds"] == [10, 10, 8, 8] and record["source_layer"] == "Patch"
    result = bytes(document.activeNode().pixelData(10, 10, 8, 8))
    assert result[:4] == bytes((255, 255, 0, 255))  # inverted red = cyan (B,G,R,A)
    assert naming.group_name("invert it") == document.activeNode().parentNode().name()


def test_save_result_as_training_pair(setup, tmp_path):
    document, background, state, controller, _ = setup
    from fake_krita import Selection
    from instruct_edit.training_pair import save_pair

    document.setSelection(Selection(W, H).select_rect(8, 8, 20, 10))
    assert controller.edit()
    wait_for(lambda: state.job_state in ("done", "failed"))
    adapter = KritaDocument(document)
    instruction, before, after, w, h = adapter.training_pair(document.activeNode())
    x, y, _, _ = adapter.provenance_of(document.activeNode())["bounds"]
    assert instruction == "invert it"
    assert before == bytes(background.pixelData(x, y, w, h))
    inside = ((12 - y) * w + (15 - x)) * 4
    outside = ((30 - y) * w + (40 - x)) * 4 if (30 - y) < h and (40 - x) < w else 0
    assert abs(after[inside + 2] - (255 - before[inside + 2])) <= 3  # edited inside
    assert after[outside : outside + 4] == before[outside : outside + 4]  # kept outside
    entry = save_pair(tmp_path / "pairs", instruction, before, after, w, h)
    assert (tmp_path / "pairs" / entry["edited_image"]).exists()
    document.setActiveNode(background)
    from instruct_edit.krita_document import UnsupportedDocument

    with pytest.raises(UnsupportedDocument, match="result layer"):
        adapter.training_pair(background)
