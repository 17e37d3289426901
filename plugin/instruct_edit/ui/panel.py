"""EditPanel: the docker's contents. Shows EditState and calls EditController; no logic."""

from __future__ import annotations

from typing import Any

from ..model import naming
from ..model.controller import EditController
from ..model.state import (
    BUSY_STATES,
    CONNECTED,
    FAILED,
    PREPARING,
    QUEUED,
    RECEIVING,
    STARTING,
)
from ..qt import QKeySequence, QPixmap, QShortcut, Qt, QtWidgets
from ..request import GUIDANCE_RANGE, MAX_SEED, MAX_STEPS, MAX_VARIANTS
from .bind import bind_check, bind_combo_data, bind_guidance, bind_spin

RESOLUTIONS = [(0, "Auto (512)"), (256, "256"), (384, "384"), (512, "512"), (640, "640"),
               (768, "768"), (1024, "1024")]

TEXT_GUIDANCE_TIP = (
    "Text guidance (s_T): how strongly the edit follows the instruction. Higher = a stronger "
    "edit, but too high looks overcooked. Default 7.5.")
IMAGE_GUIDANCE_TIP = (
    "Image guidance (s_I): how closely the result keeps to your picture. Higher = more "
    "faithful, less change. Default 1.5; try 1.0–1.2 for bigger changes.")


class EditPanel(QtWidgets.QWidget):
    def __init__(self, controller: EditController, open_settings: Any = None,
                 parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.controller = controller
        self.state = state = controller.state
        self._open_settings = open_settings
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)

        # Connection
        row = QtWidgets.QHBoxLayout()
        self.connection_label = QtWidgets.QLabel()
        self.connection_label.setWordWrap(True)
        self.settings_button = QtWidgets.QPushButton("Settings…")
        self.settings_button.clicked.connect(self.open_settings)
        self.reconnect_button = QtWidgets.QPushButton("Connect")
        self.reconnect_button.setToolTip("Start or reconnect to the engine")
        self.reconnect_button.clicked.connect(controller.connect_engine)
        row.addWidget(self.connection_label, 1)
        row.addWidget(self.reconnect_button)
        row.addWidget(self.settings_button)
        layout.addLayout(row)

        # Instruction + actions
        self.instruction = QtWidgets.QComboBox()
        self.instruction.setEditable(True)
        self.instruction.setInsertPolicy(QtWidgets.QComboBox.InsertPolicy.NoInsert)
        self.instruction.lineEdit().setPlaceholderText("Instruction, e.g. “make it evening”")
        self.instruction.setToolTip("What to change, as an instruction. Ctrl+Enter runs the edit; "
                                    "the list holds your recent instructions.")
        self.instruction.setSizePolicy(QtWidgets.QSizePolicy.Policy.Expanding,
                                       QtWidgets.QSizePolicy.Policy.Fixed)
        self.instruction.lineEdit().textChanged.connect(lambda text: setattr(state, "instruction", text))
        state.on_change("instruction", self._show_instruction, owner=self)
        state.on_change("history", self._show_history, owner=self)
        layout.addWidget(self.instruction)

        buttons = QtWidgets.QHBoxLayout()
        self.edit_button = QtWidgets.QPushButton("Edit")
        self.edit_button.setToolTip("Edit the source with the instruction (Ctrl+Enter)")
        self.edit_button.clicked.connect(lambda: controller.edit())
        self.explore_button = QtWidgets.QPushButton("Explore")
        self.explore_button.setToolTip("Try 3 image × 3 text guidance values around the current "
                                       "ones with the same seed: 9 layers to compare")
        self.explore_button.clicked.connect(lambda: controller.edit(explore=True))
        self.cancel_button = QtWidgets.QPushButton("Cancel")
        self.cancel_button.clicked.connect(controller.cancel)
        for button in (self.edit_button, self.explore_button, self.cancel_button):
            buttons.addWidget(button)
        layout.addLayout(buttons)
        for keys in ("Ctrl+Return", "Ctrl+Enter"):
            shortcut = QShortcut(QKeySequence(keys), self)
            shortcut.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            shortcut.activated.connect(lambda: controller.edit())

        # Progress, preview, messages
        self.progress = QtWidgets.QProgressBar()
        self.progress.setTextVisible(True)
        layout.addWidget(self.progress)
        self.preview = QtWidgets.QLabel()
        self.preview.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.preview.hide()
        layout.addWidget(self.preview)
        self.error_label = QtWidgets.QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet("color: #e0524a;")
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.error_label)
        self.message_label = QtWidgets.QLabel()
        self.message_label.setWordWrap(True)
        layout.addWidget(self.message_label)

        # Parameters
        form = QtWidgets.QFormLayout()
        self.source = QtWidgets.QComboBox()
        self.source.addItem("Current layer", "layer")
        self.source.addItem("Visible canvas", "canvas")
        self.source.setToolTip("What the engine sees. With a selection, only the selected area "
                               "(plus some context around it) is edited.")
        bind_combo_data(state, "source", self.source)
        form.addRow("Source", self.source)
        self.text_slider, self.text_spin = self._guidance_row(form, "Text guidance", "text_guidance",
                                                              TEXT_GUIDANCE_TIP)
        self.image_slider, self.image_spin = self._guidance_row(form, "Image guidance", "image_guidance",
                                                                IMAGE_GUIDANCE_TIP, maximum=5.0)
        self.steps = QtWidgets.QSpinBox()
        self.steps.setRange(1, MAX_STEPS)
        self.steps.setToolTip("Denoising steps: more = finer detail, slower. 20 is a good start.")
        bind_spin(state, "steps", self.steps)
        form.addRow("Steps", self.steps)
        seed_row = QtWidgets.QHBoxLayout()
        self.seed = QtWidgets.QSpinBox()
        self.seed.setRange(0, min(MAX_SEED, 2**31 - 1))
        self.seed.setToolTip("The same seed and settings give the same result.")
        bind_spin(state, "seed", self.seed)
        self.random_seed = QtWidgets.QCheckBox("new each time")
        self.random_seed.setToolTip("Pick a new seed for every edit (uncheck to keep this seed)")
        bind_check(state, "random_seed", self.random_seed)
        seed_row.addWidget(self.seed, 1)
        seed_row.addWidget(self.random_seed)
        form.addRow("Seed", seed_row)
        self.variants = QtWidgets.QSpinBox()
        self.variants.setRange(1, MAX_VARIANTS)
        self.variants.setToolTip("How many versions to make (seeds seed, seed+1, …); each becomes a "
                                 "layer in the result group, the first one visible.")
        bind_spin(state, "variants", self.variants)
        form.addRow("Variants", self.variants)
        self.resolution = QtWidgets.QComboBox()
        for value, label in RESOLUTIONS:
            self.resolution.addItem(label, value)
        self.resolution.setToolTip("Working size (longer side) the engine edits at; the result is "
                                   "scaled back to your canvas. Auto uses the model's native 512.")
        state.on_change("resolution", self._show_resolution, owner=self)
        bind_combo_data(state, "resolution", self.resolution)
        form.addRow("Resolution", self.resolution)
        self.model = QtWidgets.QComboBox()
        self.model.setToolTip("Edit model (from the engine's list)")
        self.model.currentIndexChanged.connect(
            lambda i: i >= 0 and setattr(state, "model", self.model.itemData(i) or ""))
        state.on_change("models", self._show_models, owner=self)
        form.addRow("Model", self.model)
        lora_row = QtWidgets.QHBoxLayout()
        self.lora = QtWidgets.QComboBox()
        self.lora.setToolTip("A LoRA adapter (style) from the engine's LoRA folder")
        self.lora.currentIndexChanged.connect(
            lambda i: i >= 0 and setattr(state, "lora_path", self.lora.itemData(i) or ""))
        state.on_change("loras", self._show_loras, owner=self)
        self.lora_strength = QtWidgets.QDoubleSpinBox()
        self.lora_strength.setRange(-4.0, 4.0)
        self.lora_strength.setSingleStep(0.1)
        self.lora_strength.setToolTip("LoRA strength (1 = as trained)")
        bind_spin(state, "lora_strength", self.lora_strength)
        lora_row.addWidget(self.lora, 1)
        lora_row.addWidget(self.lora_strength)
        form.addRow("LoRA", lora_row)
        layout.addLayout(form)

        # Provenance of the selected result layer
        self.provenance_box = QtWidgets.QGroupBox("Selected result")
        box_layout = QtWidgets.QVBoxLayout(self.provenance_box)
        self.provenance_label = QtWidgets.QLabel()
        self.provenance_label.setWordWrap(True)
        self.provenance_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.chain_button = QtWidgets.QPushButton("Edit this result")
        self.chain_button.setToolTip("Use this result layer as the source of the next edit")
        self.chain_button.clicked.connect(self._chain)
        box_layout.addWidget(self.provenance_label)
        box_layout.addWidget(self.chain_button)
        layout.addWidget(self.provenance_box)
        layout.addStretch(1)

        for name in ("job_state", "step", "total_steps", "seconds_left"):
            state.on_change(name, lambda _v: self._show_progress(), now=False, owner=self)
        self._show_progress()
        state.on_change("connection", lambda _v: self._show_connection(), owner=self)
        state.on_change("connection_message", lambda _v: self._show_connection(), owner=self)
        state.on_change("error", self._show_error, owner=self)
        state.on_change("message", self.message_label.setText, owner=self)
        state.on_change("preview", self._show_preview, owner=self)
        state.on_change("selected_provenance", self._show_provenance, owner=self)

    # --- rows --------------------------------------------------------------------------

    def _guidance_row(self, form: QtWidgets.QFormLayout, label: str, name: str, tip: str,
                      maximum: float = 20.0) -> tuple[QtWidgets.QSlider, QtWidgets.QDoubleSpinBox]:
        row = QtWidgets.QHBoxLayout()
        slider = QtWidgets.QSlider(Qt.Orientation.Horizontal)
        slider.setRange(0, round(maximum * 10))
        spin = QtWidgets.QDoubleSpinBox()
        spin.setRange(*GUIDANCE_RANGE)
        spin.setSingleStep(0.1 if maximum <= 5 else 0.5)
        spin.setDecimals(2)
        for widget in (slider, spin):
            widget.setToolTip(tip)
        bind_guidance(self.state, name, slider, spin)
        row.addWidget(slider, 1)
        row.addWidget(spin)
        form.addRow(label, row)
        return slider, spin

    # --- views of the state --------------------------------------------------------------

    def _show_instruction(self, text: str) -> None:
        if self.instruction.lineEdit().text() != text:
            self.instruction.lineEdit().setText(text)

    def _show_history(self, history: list[str]) -> None:
        text = self.instruction.lineEdit().text()
        self.instruction.blockSignals(True)
        self.instruction.clear()
        self.instruction.addItems(history)
        self.instruction.blockSignals(False)
        self.instruction.lineEdit().setText(text)

    def _show_models(self, models: list[dict]) -> None:
        current = self.state.model
        self.model.blockSignals(True)
        self.model.clear()
        self.model.addItem("Engine default", "")
        for entry in models:
            label = str(entry.get("name") or entry["id"])
            if entry.get("available_locally") is False:
                label += " (downloads on first use)"
            self.model.addItem(label, entry["id"])
        index = self.model.findData(current)
        self.model.setCurrentIndex(max(0, index))
        self.model.blockSignals(False)
        if index < 0:
            self.state.model = ""  # a remembered model this engine lacks: use its default

    def _show_resolution(self, value: int) -> None:
        # A working size set elsewhere (saved settings, scripts) that the list lacks.
        if self.resolution.findData(value) < 0:
            self.resolution.addItem(str(value), value)
            self.resolution.setCurrentIndex(self.resolution.count() - 1)

    def _show_loras(self, loras: list[str]) -> None:
        current = self.state.lora_path
        self.lora.blockSignals(True)
        self.lora.clear()
        self.lora.addItem("None", "")
        for name in loras:
            self.lora.addItem(name, name)
        self.lora.setCurrentIndex(max(0, self.lora.findData(current)))
        self.lora.blockSignals(False)

    def _show_connection(self) -> None:
        status = self.state.connection
        colour = {CONNECTED: "#3fae49", STARTING: "#d9a520", FAILED: "#e0524a"}.get(status, "#888888")
        self.connection_label.setText(f"<span style='color:{colour}'>●</span> {self.state.connection_message}")
        self.connection_label.setToolTip(self.state.connection_message)
        self._show_progress()

    def _show_progress(self) -> None:
        state = self.state
        busy = state.job_state in BUSY_STATES
        connected = state.connection == CONNECTED
        self.edit_button.setEnabled(not busy and connected)
        self.explore_button.setEnabled(not busy and connected)
        self.cancel_button.setEnabled(busy)
        total = max(1, state.total_steps)
        self.progress.setRange(0, total)
        self.progress.setValue(min(state.step, total))
        if state.job_state == PREPARING:
            text = "Preparing the image…"
        elif state.job_state == QUEUED:
            text = "Waiting for the engine…"
        elif state.job_state == RECEIVING:
            text = "Adding the result layers…"
        elif busy:
            left = f" · {state.seconds_left:.0f} s left" if state.seconds_left >= 0 else ""
            text = f"Step {state.step} of {state.total_steps}{left}"
        else:
            text = {"done": "Done", "failed": "Failed", "cancelled": "Cancelled"}.get(state.job_state, "")
        self.progress.setFormat(text)

    def _show_error(self, message: str) -> None:
        self.error_label.setText(message)
        self.error_label.setVisible(bool(message))

    def _show_preview(self, picture: Any) -> None:
        if picture is None or picture.isNull():
            self.preview.clear()
            self.preview.hide()
            return
        pixmap = QPixmap.fromImage(picture)
        width = max(64, min(self.width() - 16, 256))
        self.preview.setPixmap(pixmap.scaledToWidth(width, Qt.TransformationMode.SmoothTransformation))
        self.preview.show()

    def _show_provenance(self, record: dict | None) -> None:
        self.provenance_box.setVisible(bool(record))
        if record:
            self.provenance_label.setText(naming.describe(record))

    def _chain(self) -> None:
        self.controller.edit_this_result()
        self.instruction.setFocus()

    def open_settings(self) -> None:
        if self._open_settings is not None:
            self._open_settings()
