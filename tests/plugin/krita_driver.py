"""Scenario run INSIDE real Krita by test_plugin_krita_e2e.py (installed as a pykrita plugin).

Drives the Instruct Edit docker like a painter would, checks the results with Krita's own
API, saves and reopens the .kra, and writes every observation to $E2E_RESULTS (JSON).
The pytest side makes the assertions. Standard library + PyQt5 only (Krita's Python).
"""

import json
import os
import sys
import time
import traceback

from krita import Extension, Krita, Selection
from PyQt5.QtCore import QByteArray, QTimer
from PyQt5.QtWidgets import QDockWidget

RESULTS = os.environ["E2E_RESULTS"]
ARTIFACTS = os.environ["E2E_ARTIFACTS"]
W, H = 256, 192
SEL = (96, 64, 64, 48)
observations = {"steps": []}


def note(key, value):
    observations[key] = value
    observations["steps"].append(key)
    with open(RESULTS, "w") as handle:
        json.dump(observations, handle, indent=1)


def quit_krita(code=0):
    note("exit", code)
    for document in Krita.instance().documents():
        document.setModified(False)
    action = Krita.instance().action("file_quit")
    if action is not None and code == 0:
        action.trigger()
    else:
        os._exit(code)


def excepthook(kind, value, tb):
    note("exception", "".join(traceback.format_exception(kind, value, tb)))
    os._exit(3)


sys.excepthook = excepthook


def layers_of(node):
    """Child layers, without masks (Krita keeps the global selection as a mask node)."""
    return [n for n in node.childNodes() if not n.type().endswith("mask")]


def pattern_bytes():
    data = bytearray(W * H * 4)
    for y in range(H):
        for x in range(W):
            i = (y * W + x) * 4
            data[i : i + 4] = bytes((x % 256, y % 256, (x * y) % 256, 255))
    return bytes(data)


def wait(condition, then, timeout, what):
    deadline = time.monotonic() + timeout

    def check():
        try:
            if condition():
                then()
            elif time.monotonic() > deadline:
                note("timeout", what)
                quit_krita(4)
            else:
                QTimer.singleShot(100, check)
        except Exception:
            excepthook(*sys.exc_info())

    QTimer.singleShot(100, check)


class Scenario:
    def start(self):
        app = Krita.instance()
        window = app.activeWindow()
        document = app.createDocument(W, H, "e2e", "RGBA", "U8", "", 72.0)
        window.addView(document)
        self.document = document
        background = document.activeNode()
        self.source_before = pattern_bytes()
        background.setPixelData(QByteArray(self.source_before), 0, 0, W, H)
        document.refreshProjection()
        selection = Selection()
        selection.select(*SEL, 255)
        document.setSelection(selection)
        self.background = background
        note("source_name", background.name())
        dock = window.qwindow().findChild(QDockWidget, "instruct_edit_docker")
        note("docker_found", dock is not None)
        panel = dock.widget()
        note("docker_visible", dock.isVisible())
        self.panel = panel
        self.controller = panel.controller
        wait(lambda: self.controller.state.connection == "connected", self.edit, 120,
             "engine connection: " + str(self.controller.state.connection_message))

    def edit(self):
        note("connection_message", self.controller.state.connection_message)
        panel = self.panel
        panel.instruction.lineEdit().setText("make it evening")
        panel.steps.setValue(3)
        panel.random_seed.setChecked(False)
        panel.seed.setValue(1234)
        panel.variants.setValue(2)
        # The tiny test model: a small working size keeps the engine's CPU work short.
        self.controller.state.resolution = 128
        panel.source.setCurrentIndex(panel.source.findData("layer"))
        self.started = time.monotonic()
        panel.edit_button.click()
        note("error_after_click", self.controller.state.error)
        wait(lambda: self.controller.state.job_state in ("done", "failed", "cancelled"), self.check, 120, "edit")

    def check(self):
        state = self.controller.state
        note("job_state", state.job_state)
        note("job_error", state.error)
        note("edit_seconds", round(time.monotonic() - self.started, 2))
        document = self.document
        top = layers_of(document.rootNode())
        note("top_names", [n.name() for n in top])
        group = [n for n in top if n.type() == "grouplayer"][-1]
        note("group_type", group.type())
        layers = list(reversed(group.childNodes()))
        note("layer_names", [n.name() for n in layers])
        note("layer_visible", [n.visible() for n in layers])
        note("layer_bounds", [[n.bounds().x(), n.bounds().y(), n.bounds().width(), n.bounds().height()] for n in layers])
        data = bytes(layers[0].pixelData(0, 0, W, H))
        x0, y0, w, h = SEL
        inside_alpha = [data[((y0 + h // 2) * W + x0 + w // 2) * 4 + 3]]
        outside = 0
        for y in range(H):
            for x in range(W):
                if not (x0 <= x < x0 + w and y0 <= y < y0 + h) and data[(y * W + x) * 4 + 3] != 0:
                    outside += 1
        note("inside_alpha", inside_alpha)
        note("opaque_pixels_outside_selection", outside)
        note("source_unchanged", bytes(self.background.pixelData(0, 0, W, H)) == self.source_before)
        from instruct_edit.krita_document import KritaDocument

        adapter = KritaDocument(document)
        records = adapter.provenance_records()
        note("provenance_seeds", sorted(r["seed"] for r in records.values()))
        document.setActiveNode(layers[0])
        self.panel.controller.refresh_selected_provenance()
        note("docker_provenance", self.panel.provenance_label.text())
        window = Krita.instance().activeWindow()
        window.qwindow().grab().save(os.path.join(ARTIFACTS, "krita-e2e.png"))
        self.result_ids = [n.uniqueId().toString() for n in layers]
        # One undo removes the whole group; redo brings it back.
        Krita.instance().action("edit_undo").trigger()
        QTimer.singleShot(500, self.after_undo)

    def after_undo(self):
        note("names_after_undo", [n.name() for n in layers_of(self.document.rootNode())])
        Krita.instance().action("edit_redo").trigger()
        QTimer.singleShot(500, self.save)

    def save(self):
        document = self.document
        note("names_after_redo", [n.name() for n in layers_of(document.rootNode())])
        path = os.path.join(ARTIFACTS, "e2e.kra")
        if os.path.exists(path):
            os.remove(path)
        document.setBatchmode(True)
        note("saved", bool(document.saveAs(path)))
        document.waitForDone()
        document.setModified(False)
        document.close()
        reopened = Krita.instance().openDocument(path)
        from instruct_edit.krita_document import KritaDocument

        adapter = KritaDocument(reopened)
        records = adapter.provenance_records()
        found = {}
        for node_id in self.result_ids:
            node = adapter.find_node(node_id)
            found[node_id] = None if node is None else adapter.provenance_of(node)
        note("reopened_records", len(records))
        note("reopened_provenance", found)
        reopened.setModified(False)
        reopened.close()
        quit_krita(0)


class E2EExtension(Extension):
    def setup(self):
        pass

    def createActions(self, window):
        self.scenario = Scenario()
        QTimer.singleShot(3000, self.run)

    def run(self):
        try:
            self.scenario.start()
        except Exception:
            excepthook(*sys.exc_info())


Krita.instance().addExtension(E2EExtension(Krita.instance()))
