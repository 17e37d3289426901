"""EditPanel: the docker's contents. Shows EditState and calls EditController; no logic.

The model's own controls come from the engine (ui/params_form.py); this panel knows no
model family by name.
"""

from __future__ import annotations

from typing import Any

from .. import provenance
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
from ..specs import Limits, ModelInfo, ResolutionRule, StepsRule
from .bind import bind_check, bind_combo_data, bind_spin
from .params_form import ParamsForm

#: Working sizes offered in the resolution list (those inside the model's range).
RESOLUTION_CHOICES = (256, 384, 512, 640, 768, 896, 1024, 1280, 1536, 2048)


def model_label(info: ModelInfo) -> str:
    """A model as the model list shows it: name, family, and what to know before choosing."""
    label = info.name
    if info.family_label and info.family_label.lower() not in info.name.lower():
        label += f" · {info.family_label}"
    if info.default:
        label += " (default)"
    if info.non_commercial:
        label += " · non-commercial"
    if info.available_locally is False:
        label += " · downloads on first use"
    return label


def explore_tip(info: ModelInfo | None, reason: str | None) -> str:
    """The Explore button's tooltip: what it sweeps, or why it can't."""
    if reason or info is None:
        return reason or ""
    axes = info.explore_axes()
    names = " and ".join(spec.short for spec in axes)
    grid = " × ".join("3" for _ in axes)
    return (f"Try {grid} values of {names} around the current ones with the same seed: "
            f"{3 ** len(axes)} layers to compare")


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

        # Parameters: the source and model, the model's own parameters, then the shared ones
        form = QtWidgets.QFormLayout()
        self.source = QtWidgets.QComboBox()
        self.source.addItem("Current layer", "layer")
        self.source.addItem("Visible canvas", "canvas")
        self.source.setToolTip("What the engine sees. With a selection, only the selected area "
                               "(plus some context around it) is edited.")
        bind_combo_data(state, "source", self.source)
        form.addRow("Source", self.source)
        self.model = QtWidgets.QComboBox()
        self.model.currentIndexChanged.connect(
            lambda i: i >= 0 and setattr(state, "model", self.model.itemData(i) or ""))
        form.addRow("Model", self.model)
        self.licence_note = QtWidgets.QLabel()
        self.licence_note.setWordWrap(True)
        self.licence_note.setStyleSheet("color: #d9a520;")
        form.addRow(self.licence_note)
        self.preset_label = QtWidgets.QLabel("Preset")
        self.preset = QtWidgets.QComboBox()
        self.preset.setToolTip("Presets of this model (e.g. few-step LoRAs): they set steps, "
                               "parameters and LoRAs together")
        bind_combo_data(state, "preset", self.preset)
        form.addRow(self.preset_label, self.preset)
        self.params = ParamsForm(state)
        form.addRow(self.params)
        self.steps = QtWidgets.QSpinBox()
        form.addRow("Steps", self.steps)
        seed_row = QtWidgets.QHBoxLayout()
        self.seed = QtWidgets.QSpinBox()
        self.seed.setToolTip("The same seed and settings give the same result.")
        self.random_seed = QtWidgets.QCheckBox("new each time")
        self.random_seed.setToolTip("Pick a new seed for every edit (uncheck to keep this seed)")
        seed_row.addWidget(self.seed, 1)
        seed_row.addWidget(self.random_seed)
        form.addRow("Seed", seed_row)
        self.variants = QtWidgets.QSpinBox()
        self.variants.setToolTip("How many versions to make (seeds seed, seed+1, …); each becomes a "
                                 "layer in the result group, the first one visible.")
        form.addRow("Variants", self.variants)
        self.resolution = QtWidgets.QComboBox()
        self.resolution.currentIndexChanged.connect(
            lambda i: i >= 0 and setattr(state, "resolution", int(self.resolution.itemData(i) or 0)))
        form.addRow("Resolution", self.resolution)
        lora_row = QtWidgets.QHBoxLayout()
        self.lora = QtWidgets.QComboBox()
        self.lora.setToolTip("A LoRA adapter (style) from the engine's LoRA folder")
        self.lora.currentIndexChanged.connect(
            lambda i: i >= 0 and setattr(state, "lora_path", self.lora.itemData(i) or ""))
        self.lora_strength = QtWidgets.QDoubleSpinBox()
        self.lora_strength.setSingleStep(0.1)
        self.lora_strength.setToolTip("LoRA strength (1 = as trained)")
        lora_row.addWidget(self.lora, 1)
        lora_row.addWidget(self.lora_strength)
        form.addRow("LoRA", lora_row)
        layout.addLayout(form)

        # Ranges first (limits, the model's rules), then the values inside them.
        state.on_change("limits", self._show_limits, owner=self)
        state.on_change("engine_models", lambda _v: self._show_models(), owner=self)
        state.on_change("model", lambda _v: self._show_models(), owner=self)
        state.on_change("model_info", self._show_model_info, owner=self)
        state.on_change("resolution", self._show_resolution, owner=self)
        state.on_change("loras", self._show_loras, owner=self)
        state.on_change("lora_path", self._show_lora_path, owner=self)  # set elsewhere (Train tab)
        bind_spin(state, "steps", self.steps)
        bind_spin(state, "seed", self.seed)
        bind_check(state, "random_seed", self.random_seed)
        bind_spin(state, "variants", self.variants)
        bind_spin(state, "lora_strength", self.lora_strength)

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

        for name in ("job_state", "step", "total_steps", "seconds_left", "engine_note"):
            state.on_change(name, lambda _v: self._show_progress(), now=False, owner=self)
        self._show_progress()
        state.on_change("connection", lambda _v: self._show_connection(), owner=self)
        state.on_change("connection_message", lambda _v: self._show_connection(), owner=self)
        state.on_change("error", self._show_error, owner=self)
        state.on_change("message", self.message_label.setText, owner=self)
        state.on_change("preview", self._show_preview, owner=self)
        state.on_change("selected_provenance", self._show_provenance, owner=self)

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

    def _show_models(self) -> None:
        """The model list: every model the engine offers, the selected (or default) one chosen."""
        state = self.state
        catalogue = state.engine_models
        selected = catalogue.find(state.model)
        wanted = state.model or (selected.id if selected else "")
        self.model.blockSignals(True)
        self.model.clear()
        for info in catalogue.models:
            self.model.addItem(model_label(info), info.id)
            self.model.setItemData(self.model.count() - 1, info.tooltip(), Qt.ItemDataRole.ToolTipRole)
        if not catalogue.models:
            self.model.addItem("Engine default", "")
        index = self.model.findData(wanted)
        if index < 0:
            self.model.addItem(f"{wanted} (not offered by this engine)", wanted)
            index = self.model.count() - 1
        self.model.setCurrentIndex(index)
        self.model.blockSignals(False)
        self.model.setToolTip(selected.tooltip() if selected else "Edit model (from the engine's list)")

    def _show_model_info(self, info: ModelInfo | None) -> None:
        """The controls that follow the model: presets, steps, resolution, licence, Explore."""
        state = self.state
        self.preset.blockSignals(True)
        self.preset.clear()
        self.preset.addItem("None", "")
        for preset in info.presets if info else ():
            self.preset.addItem(preset.label, preset.id)
            self.preset.setItemData(self.preset.count() - 1, preset.describe(), Qt.ItemDataRole.ToolTipRole)
        self.preset.setCurrentIndex(max(0, self.preset.findData(state.preset)))
        self.preset.blockSignals(False)
        has_presets = bool(info and info.presets)
        self.preset.setVisible(has_presets)
        self.preset_label.setVisible(has_presets)

        steps = info.steps if info else StepsRule()
        recommended = info.default_steps if info else None
        self.steps.blockSignals(True)
        self.steps.setRange(0, steps.maximum)
        self.steps.setSpecialValueText(f"Auto ({recommended})" if recommended else "Auto")
        self.steps.setValue(int(state.steps))
        self.steps.blockSignals(False)
        self.steps.setToolTip(
            "Denoising steps: more = finer detail, slower. Auto uses "
            + (f"this model's recommended {recommended}" if recommended else "the model's own count")
            + (" (or the preset's)." if has_presets else "."))
        self._fill_resolutions(info.resolution if info else ResolutionRule(),
                               info.default_resolution if info else None)
        self._show_licence(info)
        self._show_progress()

    def _fill_resolutions(self, rule: ResolutionRule, default: int | None) -> None:
        self.resolution.blockSignals(True)
        self.resolution.clear()
        self.resolution.addItem(f"Auto ({default})" if default else "Auto", 0)
        for value in RESOLUTION_CHOICES:
            if rule.minimum <= value <= rule.maximum:
                self.resolution.addItem(str(value), value)
        self.resolution.blockSignals(False)
        self.resolution.setToolTip(
            f"Working size the engine edits at: {rule.describe()}. The result comes back at your "
            "canvas's size. Auto uses the model's own size" + (f" ({default})." if default else "."))
        value = self.state.resolution  # still the previous model's while the models switch
        if rule.minimum <= value <= rule.maximum:
            self._show_resolution(value)

    def _show_resolution(self, value: int) -> None:
        index = self.resolution.findData(value)
        if index < 0:  # a working size set elsewhere (saved settings, scripts) that the list lacks
            self.resolution.blockSignals(True)
            self.resolution.addItem(str(value), value)
            self.resolution.blockSignals(False)
            index = self.resolution.count() - 1
        if index != self.resolution.currentIndex():
            self.resolution.blockSignals(True)
            self.resolution.setCurrentIndex(index)
            self.resolution.blockSignals(False)

    def _show_licence(self, info: ModelInfo | None) -> None:
        flagged = bool(info and info.non_commercial)
        if info is not None and flagged:
            licence = f" ({info.licence})" if info.licence else ""
            self.licence_note.setText(f"Non-commercial licence{licence}: results may not be used "
                                      "commercially.")
        self.licence_note.setVisible(flagged)

    def _show_limits(self, limits: Limits) -> None:
        self.seed.setRange(0, limits.seed_widget_max)
        self.variants.setRange(1, limits.max_variants)
        self.lora_strength.setRange(*limits.lora_strength)

    def _show_loras(self, loras: list[str]) -> None:
        current = self.state.lora_path
        self.lora.blockSignals(True)
        self.lora.clear()
        self.lora.addItem("None", "")
        for name in loras:
            self.lora.addItem(name, name)
        self.lora.setCurrentIndex(max(0, self.lora.findData(current)))
        self.lora.blockSignals(False)

    def _show_lora_path(self, path: str) -> None:
        index = self.lora.findData(path)
        if index >= 0 and index != self.lora.currentIndex():
            self.lora.blockSignals(True)
            self.lora.setCurrentIndex(index)
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
        reason = state.explore_unavailable()
        self.edit_button.setEnabled(not busy and connected)
        self.explore_button.setEnabled(not busy and connected and reason is None)
        self.explore_button.setToolTip(explore_tip(state.model_info, reason))
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
        elif busy and state.engine_note:
            text = state.engine_note
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
            self.provenance_label.setText(provenance.describe(record))

    def _chain(self) -> None:
        self.controller.edit_this_result()
        self.instruction.setFocus()

    def open_settings(self) -> None:
        if self._open_settings is not None:
            self._open_settings()
