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
# The training phase: a small document with a sketch and its inked version.
TW, TH = 128, 96
TRAIN_STEPS = int(os.environ.get("E2E_TRAIN_STEPS") or 4)
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
        self.dock = dock
        panel = getattr(dock, "panel", None) or dock.widget()  # the Edit tab
        note("docker_visible", dock.isVisible())
        self.panel = panel
        self.controller = panel.controller
        # Connected, and the engine's model list (with each model's parameters) is in.
        wait(lambda: self.controller.state.connection == "connected" and self.controller.state.models,
             self.edit, 120,
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
        t0 = time.perf_counter()
        panel.edit_button.click()  # the session's first edit: what the click costs the UI
        note("first_click_ms", round((time.perf_counter() - t0) * 1000, 1))
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
        # Several variants: a pass-through group shows without a full projection refresh.
        note("group_pass_through", group.passThroughMode() if hasattr(group, "passThroughMode") else None)
        layers = list(reversed(group.childNodes()))
        note("layer_names", [n.name() for n in layers])
        note("layer_visible", [n.visible() for n in layers])
        note("layer_bounds", [[n.bounds().x(), n.bounds().y(), n.bounds().width(), n.bounds().height()] for n in layers])
        data = bytes(layers[0].pixelData(0, 0, W, H))
        x0, y0, w, h = SEL
        inside_alpha = [data[((y0 + h // 2) * W + x0 + w // 2) * 4 + 3]]
        from instruct_edit.krita_document import KritaDocument

        record = KritaDocument(document).provenance_of(layers[0])
        rx, ry, rw, rh = record["bounds"]
        outside_region = 0
        for y in range(H):
            for x in range(W):
                if not (rx <= x < rx + rw and ry <= y < ry + rh) and data[(y * W + x) * 4 + 3] != 0:
                    outside_region += 1
        # Inside the region but outside the selection: the source's own bytes (the engine
        # blended the selection at full resolution; the plugin placed its pixels exactly).
        kept = differing = 0
        for y in range(ry, ry + rh):
            for x in range(rx, rx + rw):
                if not (x0 <= x < x0 + w and y0 <= y < y0 + h):
                    i = (y * W + x) * 4
                    kept += 1
                    differing += data[i : i + 4] != self.source_before[i : i + 4]
        note("region", [rx, ry, rw, rh])
        note("inside_alpha", inside_alpha)
        note("opaque_pixels_outside_region", outside_region)
        note("region_pixels_outside_selection", kept)
        note("changed_pixels_outside_selection", differing)
        note("source_unchanged", bytes(self.background.pixelData(0, 0, W, H)) == self.source_before)
        # Krita shows the new layers (the projection is refreshed).
        document.waitForDone()
        shown = bytes(document.pixelData(x0, y0, w, h))
        original = b"".join(self.source_before[((y0 + r) * W + x0) * 4 : ((y0 + r) * W + x0 + w) * 4]
                            for r in range(h))
        note("projection_shows_result", shown != original)
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
        self.document.waitForDone()
        note("source_unchanged_after_undo", bytes(self.background.pixelData(0, 0, W, H)) == self.source_before)
        note("projection_is_source_after_undo", bytes(self.document.pixelData(0, 0, W, H)) == self.source_before)
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
        if os.environ.get("E2E_TRAIN", "1") != "0":
            QTimer.singleShot(200, self.train_phase)
        else:
            self.after_training()

    def after_training(self):
        if os.environ.get("E2E_ECHO_URL"):
            QTimer.singleShot(200, self.echo_phase)
        else:
            quit_krita(0)

    # --- fine-tuning from inside Krita: pairs from layers, a training, the LoRA in an edit ---

    def train_phase(self):
        app = Krita.instance()
        document = app.createDocument(TW, TH, "train", "RGBA", "U8", "", 72.0)
        app.activeWindow().addView(document)
        self.train_document = document
        root = document.rootNode()
        sketch = document.createNode("Sketch", "paintlayer")
        sketch.setPixelData(QByteArray(train_pattern(False)), 0, 0, TW, TH)
        ink = document.createNode("Ink", "paintlayer")
        ink.setPixelData(QByteArray(train_pattern(True)), 0, 0, TW, TH)
        background = layers_of(root)[-1]  # the new document's own layer
        root.addChildNode(sketch, background)
        root.addChildNode(ink, sketch)
        document.setActiveNode(ink)
        document.refreshProjection()
        self.train_layers = (sketch, ink)
        dock = self.dock
        train_panel = dock.train_panel
        self.train_panel = train_panel
        self.training = dock.training
        dock.tabs.setCurrentWidget(train_panel)  # the docker's poll lists the layers
        note("train_tabs", [dock.tabs.tabText(i) for i in range(dock.tabs.count())])
        # Krita makes a node current through its view, a moment later.
        wait(lambda: self.training.state.options.presets and document.activeNode() is not None
             and document.activeNode().name() == "Ink", self.add_pairs, 60,
             "training options: " + str(self.training.state.error))

    def add_pairs(self):
        panel, training = self.train_panel, self.training
        state = training.state
        note("train_options", {"min_pairs": state.options.min_pairs,
                               "trainable": [m.id for m in state.options.trainable],
                               "presets": [p.id for p in state.options.presets]})
        note("train_new_dataset", training.new_dataset("e2e-ink"))
        panel.refresh()
        note("train_layer_choices", [panel.before_layer.itemText(i) for i in range(panel.before_layer.count())])
        note("train_default_layers", [panel.before_layer.currentText(), panel.after_layer.currentText()])
        document = self.train_document
        # Two pairs of the whole layers, then (to reach the engine's minimum) selected regions
        # of both layers: each a pair of its own, at full resolution.
        regions = [None, None] + [((k * 13) % (TW - 48), (k * 7) % (TH - 40), 48, 40)
                                  for k in range(max(0, state.options.min_pairs - 2))]
        errors, sizes = [], []
        for k, region in enumerate(regions):
            if region is None:
                document.setSelection(None)
            else:
                selection = Selection()
                selection.select(*region, 255)
                document.setSelection(selection)
            panel.pair_instruction.setText("ink the sketch" if k % 2 == 0 else "ink it cleanly")
            panel.add_pair_button.click()
            errors.append(state.error)
            if state.pairs:
                last = state.pairs[-1]
                before, _ = training.pair_paths(last)
                from PyQt5.QtGui import QImage

                image = QImage(str(before))
                sizes.append([image.width(), image.height()])
        document.setSelection(None)
        note("train_pair_errors", errors)
        note("train_pairs", len(state.pairs))
        note("train_pair_sizes", sizes)
        note("train_pair_list_rows", panel.pairs.count())
        # A refusal: the same layer as before and after.
        panel.after_layer.setCurrentIndex(panel.after_layer.findText("Sketch"))
        panel.before_layer.setCurrentIndex(panel.before_layer.findText("Sketch"))
        panel.add_pair_button.click()
        note("train_same_layer_error", state.error)
        # Train a few steps on the tiny model: the quick preset, sized down for a CPU.
        panel.preset.setCurrentIndex(panel.preset.findData("quick"))
        panel.max_steps.setValue(TRAIN_STEPS)
        state.overrides = {"resolution": 64, "lora_rank": 4, "batch_size": 1, "grad_accum": 1,
                           "validate_every": 2, "checkpoint_every": 2}
        panel.name.setText("e2e-ink")
        self.train_states = []
        state.on_change("current", lambda s: s is not None and self.train_states.append([s.state, s.step]),
                        now=False)
        self.train_started = time.monotonic()
        panel.start_button.click()
        note("train_error_after_start", state.error)
        wait(lambda: state.current is not None and state.current.final, self.trained, 400,
             "training: " + str(state.error))

    def trained(self):
        panel, state = self.train_panel, self.training.state
        current = state.current
        note("train_seconds", round(time.monotonic() - self.train_started, 1))
        note("train_state", current.state)
        note("train_error", state.error or current.error)
        note("train_states_seen", sorted({s for s, _ in self.train_states}))
        note("train_max_step_seen", max([n for _, n in self.train_states], default=0))
        note("train_loss_points", len(current.loss))
        note("train_loss_curve_points", len(panel.loss_curve.points))
        note("train_progress", [panel.progress.value(), panel.progress.maximum()])
        note("train_lora", current.lora_path)
        note("train_card", current.lora_card[:400])
        if current.state != "done":
            self.after_training()  # the failure is noted; the echo phase still runs
            return
        trained_at = time.monotonic()
        wait(lambda: state.validation_image is not None or time.monotonic() - trained_at > 20,
             self.trained_lora, 30, "validation image")

    def trained_lora(self):
        panel, state = self.train_panel, self.training.state
        note("train_validation_shown", panel.validation.pixmap() is not None
             and not panel.validation.pixmap().isNull())
        note("train_validation_step", state.validation_step)
        lora = state.current.lora_path
        edit_panel = self.panel
        wait(lambda: bool(lora) and edit_panel.lora.findData(lora) >= 0, self.edit_with_lora, 30,
             "the trained LoRA in the Edit tab's list")

    def edit_with_lora(self):
        edit_panel = self.panel
        note("train_lora_in_edit_list", True)
        self.train_panel.use_button.click()
        note("train_lora_chosen", edit_panel.lora.currentData())
        self.dock.tabs.setCurrentWidget(edit_panel)
        document = self.train_document
        document.setActiveNode(self.train_layers[0])
        edit_panel.instruction.lineEdit().setText("ink the sketch")
        edit_panel.steps.setValue(2)
        edit_panel.variants.setValue(1)
        self.controller.state.resolution = 64
        edit_panel.source.setCurrentIndex(edit_panel.source.findData("layer"))
        edit_panel.edit_button.click()
        note("lora_edit_error_after_click", self.controller.state.error)
        wait(lambda: self.controller.state.job_state in ("done", "failed", "cancelled"),
             self.lora_edit_done, 120, "edit with the trained LoRA")

    def lora_edit_done(self):
        state = self.controller.state
        note("lora_edit_state", state.job_state)
        note("lora_edit_error", state.error)
        if state.job_state == "done":
            from instruct_edit.krita_document import KritaDocument

            group = self.controller.inserted_groups[-1]
            layer = group.childNodes()[-1]
            record = KritaDocument(self.train_document).provenance_of(layer) or {}
            note("lora_edit_loras", record.get("loras"))
            note("lora_edit_layer", layer.name())
        window = Krita.instance().activeWindow()
        self.dock.tabs.setCurrentWidget(self.train_panel)
        self.train_panel.ensureWidgetVisible(self.train_panel.loss_curve)  # the training's part
        window.qwindow().grab().save(os.path.join(ARTIFACTS, "krita-e2e-train.png"))
        self.dock.tabs.setCurrentWidget(self.panel)
        self.train_document.setModified(False)
        self.after_training()


    # --- lossless round trip at full resolution, against an engine that echoes its input ---

    def echo_phase(self):
        from instruct_edit.model.settings import Settings

        self.controller.apply_settings(Settings(
            engine_mode="remote", remote_url=os.environ["E2E_ECHO_URL"],
            remote_token=os.environ["E2E_ECHO_TOKEN"],
            python_path=self.controller.settings.python_path))
        wait(lambda: self.controller.state.connection == "connected", self.big_document, 30,
             "echo engine connection: " + str(self.controller.state.connection_message))

    def big_document(self):
        bw, bh = (int(v) for v in os.environ.get("E2E_BIG", "3000x2000").split("x"))
        self.big_size = (bw, bh)
        app = Krita.instance()
        document = app.createDocument(bw, bh, "echo", "RGBA", "U8", "", 72.0)
        started = time.perf_counter()
        app.activeWindow().addView(document)
        self.big = document
        self.big_created = time.perf_counter()
        note("big_add_view_ms", round((self.big_created - started) * 1000, 1))
        node = document.activeNode()
        started = time.perf_counter()
        data = line_art(bw, bh)
        node.setPixelData(QByteArray(data), 0, 0, bw, bh)
        document.refreshProjection()
        document.waitForDone()
        note("big_setup_seconds", round(time.perf_counter() - started, 2))
        self.big_source = data
        self.big_node = node
        # How long one read of the whole layer would block the UI thread in Krita.
        reads = []
        for _ in range(3):
            t0 = time.perf_counter()
            node.pixelData(0, 0, bw, bh)
            reads.append(round((time.perf_counter() - t0) * 1000, 1))
        note("krita_whole_read_ms", reads)
        selection_side = int(os.environ.get("E2E_SELECTION", "0"))
        if selection_side:  # the benchmark's case: a square selection in the middle
            box = ((bw - selection_side) // 2, (bh - selection_side) // 2, selection_side, selection_side)
            self.echo_runs = [("none", None), ("hard", box), ("none", None), ("hard", box)]
        else:
            self.echo_runs = [("none", None), ("soft", (bw // 3, bh // 4, bw // 3, bh // 3))]
        self.echo_results = {}
        self.next_echo()

    def next_echo(self):
        if not self.echo_runs:
            self.big.setModified(False)
            quit_krita(0)
            return
        kind, box = self.echo_runs.pop(0)
        bw, bh = self.big_size
        document = self.big
        if box is None:
            document.setSelection(None)
        elif kind == "hard":
            selection = Selection()
            selection.select(*box, 255)
            document.setSelection(selection)
        else:
            selection = Selection()
            selection.setPixelData(QByteArray(soft_mask(bw, bh, box, 48)), 0, 0, bw, bh)
            document.setSelection(selection)
        document.setActiveNode(self.big_node)
        self.panel.instruction.lineEdit().setText("keep it exactly")
        instrument()
        # The heartbeat runs a moment before the edit: a stall there is Krita's own work
        # (e.g. drawing the new document), not the edit's.
        self.heartbeat_start()
        self.phase = "before edit"
        QTimer.singleShot(int(os.environ.get("E2E_SETTLE_MS") or 400), lambda: self.start_echo(kind))

    def start_echo(self, kind):
        controller = self.controller
        self.phase = None
        self.echo_started = time.perf_counter()
        profile = None
        if os.environ.get("E2E_PROFILE") and not getattr(self, "profiled", False):
            import cProfile

            self.profiled = True
            profile = cProfile.Profile()
            profile.enable()
        t0 = time.perf_counter()
        controller.edit()
        TIMES["edit() call"] = time.perf_counter() - t0
        if profile is not None:
            profile.disable()
            import io
            import pstats

            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(40)
            with open(os.path.join(ARTIFACTS, "krita-e2e-first-edit-profile.txt"), "w") as handle:
                handle.write(text.getvalue())
        note("echo_error_after_click_" + kind, controller.state.error)
        wait(lambda: controller.state.job_state in ("done", "failed", "cancelled"),
             lambda: self.check_echo(kind), 120, "echo edit " + kind)

    def heartbeat_start(self):
        self.beat_last = time.perf_counter()
        self.beat_worst = 0.0
        self.rss_start = self.rss_peak = rss()
        timer = QTimer()
        timer.setInterval(10)

        self.gaps = []

        def beat():
            now = time.perf_counter()
            if now - self.beat_last > 0.04:
                # [stall ms, what was going on, ms since the big document was created]
                self.gaps.append([round((now - self.beat_last) * 1000),
                                  self.phase or self.controller.state.job_state,
                                  round((now - self.big_created) * 1000)])
            self.beat_worst = max(self.beat_worst, now - self.beat_last)
            self.beat_last = now
            self.rss_peak = max(self.rss_peak, rss())

        timer.timeout.connect(beat)
        timer.start()
        self.heartbeat = timer

    def check_echo(self, kind):
        self.heartbeat.stop()
        state = self.controller.state
        bw, bh = self.big_size
        out = {"state": state.job_state, "error": state.error,
               "seconds": round(time.perf_counter() - self.echo_started, 2),
               "longest_stall_ms": round(self.beat_worst * 1000, 1),
               "stalls_over_40ms": self.gaps,
               # From the click on: the stalls "before edit" are Krita's own (drawing the
               # new document, marching ants), with no plugin code running.
               "longest_stall_after_click_ms": max(
                   [g[0] for g in self.gaps if g[1] != "before edit"], default=0),
               "rss_growth_mb": round((self.rss_peak - self.rss_start) / 2**20, 1),
               "timing_ms": {k: round(v * 1000, 1) for k, v in TIMES.items()}}
        TIMES.clear()
        if state.job_state == "done":
            from instruct_edit.krita_document import KritaDocument

            group = self.controller.inserted_groups[-1]
            result = next(n for n in group.childNodes() if n.visible())
            record = KritaDocument(self.big).provenance_of(result)
            x, y, w, h = record["bounds"]
            out["region"] = [x, y, w, h]
            out["region_mb"] = round(w * h * 4 / 2**20, 1)
            got = bytes(result.pixelData(x, y, w, h))
            want = bytes(self.big_node.pixelData(x, y, w, h))
            out["identical"] = got == want
            if got != want:
                out["differing_bytes"] = sum(a != b for a, b in zip(got, want, strict=False))
            alpha = bytes(result.pixelData(0, 0, bw, bh))[3::4]
            outside = 0
            for row in range(bh):
                line = alpha[row * bw : (row + 1) * bw]
                if y <= row < y + h:
                    outside += len(line[:x].strip(b"\0")) + len(line[x + w :].strip(b"\0"))
                else:
                    outside += len(line.strip(b"\0"))
            out["nonempty_outside_region"] = outside
            out["source_unchanged"] = bytes(self.big_node.pixelData(0, 0, bw, bh)) == self.big_source
        self.echo_results.setdefault(kind, []).append(out)
        note("echo", self.echo_results)
        QTimer.singleShot(100, self.next_echo)


TIMES = {}


def instrument():
    """Add up the time the plugin spends in Krita calls and its own steps (UI thread)."""
    from instruct_edit.krita_document import KritaDocument
    from instruct_edit.model import jobs

    if getattr(KritaDocument, "_e2e_wrapped", False):
        return
    KritaDocument._e2e_wrapped = True

    def timed(function, key):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t0
                TIMES[key] = TIMES.get(key, 0.0) + spent
                TIMES[key + " max"] = max(TIMES.get(key + " max", 0.0), spent)

        return wrapper

    class TimedDocument:
        """Times each Krita Document call made while inserting (where does insert spend?)."""

        def __init__(self, document):
            self._document = document

        def __getattr__(self, name):
            attribute = getattr(self._document, name)
            return timed(attribute, "insert: doc." + name) if callable(attribute) else attribute

    original_insert = KritaDocument.insert_layers

    def insert_layers(self, *args):
        real = self.document
        self.document = TimedDocument(real)
        try:
            return original_insert(self, *args)
        finally:
            self.document = real

    KritaDocument.insert_layers = insert_layers
    KritaDocument.read_rows = timed(KritaDocument.read_rows, "read")
    KritaDocument.insert_layers = timed(KritaDocument.insert_layers, "insert")
    KritaDocument.write_rows = staticmethod(timed(KritaDocument.write_rows, "write"))
    from instruct_edit.model import controller as controller_module

    # The synchronous steps of EditController.edit() (the click), and the first strip read.
    settings_module = controller_module.settings_module
    settings_module.save = timed(settings_module.save, "edit: settings save")
    KritaDocument.plan_source = timed(KritaDocument.plan_source, "edit: plan source")
    jobs.EditJob.__init__ = timed(jobs.EditJob.__init__, "edit: job setup")
    jobs.EditJob.start = timed(jobs.EditJob.start, "edit: job start")
    jobs.EditJob._read_strip = timed(jobs.EditJob._read_strip, "read strip (with encode+submit)")
    jobs.EditJob._encode = timed(jobs.EditJob._encode, "build upload")
    from instruct_edit.client import http

    http.EngineClient.submit = timed(http.EngineClient.submit, "submit call")
    # The docker's 500 ms poll (provenance of the active layer) runs on the UI thread too.
    controller_module.EditController.refresh_selected_provenance = timed(
        controller_module.EditController.refresh_selected_provenance, "docker poll")
    jobs.EditJob._checked = timed(jobs.EditJob._checked, "check result")


def rss():
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def train_pattern(inked):
    """A sketch (soft grey strokes on paper) or its inked version (the same strokes, black)."""
    paper = bytes((245, 245, 245, 255))
    stroke = bytes((20, 20, 20, 255)) if inked else bytes((170, 170, 170, 255))
    rows = []
    for y in range(TH):
        row = bytearray(paper * TW)
        for x in range(TW):
            if (x + 2 * y) % 17 < (2 if inked else 3) or (x - y) % 23 == 0:
                row[x * 4 : x * 4 + 4] = stroke
        rows.append(bytes(row))
    return b"".join(rows)


def line_art(width, height):
    """BGRA line art without numpy: 1-px lines, dots, a transparent band, a soft alpha band."""
    paper = bytes((250, 248, 245, 255))
    ink = bytes((20, 20, 20, 255))
    blue = bytes((200, 60, 30, 255))
    plain = bytearray(paper * width)
    for x in range(0, width, 11):
        plain[x * 4 : x * 4 + 4] = blue
    plain = bytes(plain)
    line = ink * width
    half_clear = plain[: width * 2] + bytes(width * 2)
    soft = bytearray(plain)
    soft[3::4] = bytes(i * 255 // max(1, width - 1) for i in range(width))
    soft = bytes(soft)
    rows = []
    for y in range(height):
        if y % 7 == 0:
            rows.append(line)
        elif y % 13 == 5:
            row = bytearray(plain)
            for x in range((y * 7) % 5, width, 5):
                row[x * 4 : x * 4 + 3] = bytes((x % 256, y % 256, (x * y) % 256))
            rows.append(bytes(row))
        elif height // 2 <= y < height // 2 + 30:
            rows.append(half_clear)
        elif height // 3 <= y < height // 3 + 20:
            rows.append(soft)
        else:
            rows.append(plain)
    return b"".join(rows)


def soft_mask(width, height, box, feather):
    """An 8-bit selection: 255 inside `box`, fading to 0 over `feather` pixels."""
    x, y, w, h = box
    ramp = bytes(255 * (i + 1) // (feather + 1) for i in range(feather))
    row = bytes(x - feather) + ramp + b"\xff" * w + ramp[::-1]
    row = row + bytes(width - len(row))
    blank = bytes(width)
    rows = []
    for yy in range(height):
        if y <= yy < y + h:
            rows.append(row)
        elif y - feather <= yy < y or y + h <= yy < y + h + feather:
            distance = y - yy if yy < y else yy - (y + h - 1)
            factor = 1 - distance / (feather + 1)
            rows.append(row.translate(bytes(round(i * factor) for i in range(256))))
        else:
            rows.append(blank)
    return b"".join(rows)


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
