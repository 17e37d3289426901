"""TrainPanel: the docker's Train tab. Shows TrainingState and calls TrainingController.

Top to bottom: the dataset; "Add pair" from two layers of the current document (before /
after, the selected region of both if there is a selection) with the instruction; the
dataset's pairs with side-by-side thumbnails, a larger preview and Remove; the training
form (base model, preset with its settings, name, Start); the shown training's progress,
time left, loss curve, latest validation grid, Cancel / Resume; the trainings the engine
knows; when done, the LoRA's model card and "Use in Edit".
"""

from __future__ import annotations

from pathlib import Path

from ..client.trainings import TrainingOptions, TrainingStatus
from ..model.training import TrainingController
from ..qt import QImage, QPainter, QPixmap, Qt, QtGui, QtWidgets
from ..training_pair import PairEntry
from .bind import bind_spin
from .loss_curve import LossCurve

THUMB_HEIGHT = 48
PREVIEW_WIDTH = 256


def side_by_side(before: QImage, after: QImage, height: int) -> QPixmap:
    """Before | after, each scaled to `height` (display only: the files keep full size)."""
    if before.isNull() or after.isNull():
        return QPixmap()
    left = before.scaledToHeight(height, Qt.TransformationMode.SmoothTransformation)
    right = after.scaledToHeight(height, Qt.TransformationMode.SmoothTransformation)
    gap = 2
    canvas = QImage(
        left.width() + gap + right.width(), height, QImage.Format.Format_ARGB32_Premultiplied
    )
    canvas.fill(0)
    painter = QPainter(canvas)
    painter.drawImage(0, 0, left)
    painter.drawImage(left.width() + gap, 0, right)
    painter.end()
    return QPixmap.fromImage(canvas)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def format_seconds(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return ""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class TrainPanel(QtWidgets.QScrollArea):
    def __init__(
        self, controller: TrainingController, parent: QtWidgets.QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.controller = controller
        self.state = state = controller.state
        self._thumbs: dict[tuple[str, str, int, int], QPixmap] = {}  # paths, mtimes -> pixmap
        self.setWidgetResizable(True)
        self.setFrameShape(QtWidgets.QFrame.Shape.NoFrame)
        body = QtWidgets.QWidget()
        layout = QtWidgets.QVBoxLayout(body)
        layout.setContentsMargins(4, 4, 4, 4)
        self.setWidget(body)

        # Dataset
        row = QtWidgets.QHBoxLayout()
        self.dataset = QtWidgets.QComboBox()
        self.dataset.setToolTip(
            "A dataset is a folder of before/after pairs (in the datasets folder set in Settings)"
        )
        self.dataset.currentIndexChanged.connect(
            lambda i: i >= 0 and controller.select_dataset(self.dataset.itemData(i) or "")
        )
        self.new_dataset_button = QtWidgets.QPushButton("New…")
        self.new_dataset_button.setToolTip("Create a new dataset")
        self.new_dataset_button.clicked.connect(self._ask_new_dataset)
        # The label on its own line: the combo and its button keep a narrow docker narrow.
        layout.addWidget(QtWidgets.QLabel("Dataset"))
        row.addWidget(self.dataset, 1)
        row.addWidget(self.new_dataset_button)
        layout.addLayout(row)

        # Add a pair from two layers
        pair_box = QtWidgets.QGroupBox("Add a pair from two layers")
        pair_form = QtWidgets.QFormLayout(pair_box)
        pair_form.setRowWrapPolicy(QtWidgets.QFormLayout.RowWrapPolicy.WrapLongRows)
        self.before_layer = QtWidgets.QComboBox()
        self.before_layer.setToolTip("The picture before the change (e.g. your sketch or flats)")
        self.after_layer = QtWidgets.QComboBox()
        self.after_layer.setToolTip("The same picture after the change (e.g. inked or rendered)")
        pair_form.addRow("Before", self.before_layer)
        pair_form.addRow("After", self.after_layer)
        self.pair_instruction = QtWidgets.QLineEdit()
        self.pair_instruction.setPlaceholderText("Instruction, e.g. “ink the sketch”")
        self.pair_instruction.textChanged.connect(
            lambda text: setattr(state, "pair_instruction", text)
        )
        state.on_change("pair_instruction", self._show_pair_instruction, owner=self)
        pair_form.addRow("Instruction", self.pair_instruction)
        self.add_pair_button = QtWidgets.QPushButton("Add pair")
        self.add_pair_button.setToolTip(
            "Store both layers at full resolution (with a selection: only "
            "the selected area of both) and the instruction in the dataset"
        )
        self.add_pair_button.clicked.connect(lambda: controller.add_pair())
        pair_form.addRow(self.add_pair_button)
        layout.addWidget(pair_box)
        state.on_change("layers", self._show_layers, owner=self)
        for role, combo in (("before", self.before_layer), ("after", self.after_layer)):
            state.on_change(
                f"{role}_layer",
                lambda value, c=combo: self._show_layer_choice(c, value),
                owner=self,
            )
            combo.currentIndexChanged.connect(
                lambda i, r=role, c=combo: (
                    i >= 0 and controller.choose_layer(r, c.itemData(i) or "")
                )
            )

        # The dataset's pairs
        pairs_box = QtWidgets.QGroupBox("Pairs")
        pairs_layout = QtWidgets.QVBoxLayout(pairs_box)
        self.pairs = QtWidgets.QListWidget()
        self.pairs.setIconSize(QPixmap(THUMB_HEIGHT * 3, THUMB_HEIGHT).size())
        self.pairs.setSelectionMode(QtWidgets.QAbstractItemView.SelectionMode.ExtendedSelection)
        self.pairs.currentRowChanged.connect(self._show_preview)
        self.pairs.setMinimumHeight(THUMB_HEIGHT * 3)
        pairs_layout.addWidget(self.pairs)
        self.pair_preview = QtWidgets.QLabel()
        self.pair_preview.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.pair_preview.hide()
        pairs_layout.addWidget(self.pair_preview)
        pairs_row = QtWidgets.QHBoxLayout()
        self.pairs_count = QtWidgets.QLabel()
        self.pairs_count.setWordWrap(True)  # a narrow docker: wrap rather than widen it
        self.remove_pair_button = QtWidgets.QPushButton("Remove")
        self.remove_pair_button.setToolTip(
            "Remove the selected pairs from the dataset (their images are deleted)"
        )
        self.remove_pair_button.clicked.connect(self._remove_selected)
        pairs_row.addWidget(self.pairs_count, 1)
        pairs_row.addWidget(self.remove_pair_button)
        pairs_layout.addLayout(pairs_row)
        layout.addWidget(pairs_box)

        # Training form
        train_box = QtWidgets.QGroupBox("Train a LoRA")
        train_form = QtWidgets.QFormLayout(train_box)
        # Labels above their fields when the docker is narrow (Qt5's wider fonts too).
        train_form.setRowWrapPolicy(QtWidgets.QFormLayout.RowWrapPolicy.WrapLongRows)
        self.base_model = QtWidgets.QComboBox()
        self.base_model.setToolTip("The model to fine-tune (only those the engine can train)")
        train_form.addRow("Base model", self.base_model)
        self.preset = QtWidgets.QComboBox()
        train_form.addRow("Preset", self.preset)
        self.preset_info = QtWidgets.QLabel()
        self.preset_info.setWordWrap(True)
        train_form.addRow(self.preset_info)
        self.max_steps = QtWidgets.QSpinBox()
        self.max_steps.setRange(0, 20_000)
        self.max_steps.setSingleStep(50)
        self.max_steps.setSpecialValueText("Preset's")
        self.max_steps.setToolTip(
            "Training steps: the preset's, or your own number (more steps learn "
            "more, and take longer)"
        )
        bind_spin(state, "max_steps", self.max_steps)
        train_form.addRow("Steps", self.max_steps)
        self.name = QtWidgets.QLineEdit()
        self.name.setToolTip("The LoRA's name in the Edit tab's list (default: the dataset's name)")
        self.name.textChanged.connect(lambda text: setattr(state, "name", text))
        train_form.addRow("Name", self.name)
        # Start on its own line, Cancel and Resume beneath: fits a narrow docker (Qt5 fonts too).
        buttons = QtWidgets.QGridLayout()
        self.start_button = QtWidgets.QPushButton("Start training")
        self.start_button.clicked.connect(lambda: controller.start())
        self.cancel_button = QtWidgets.QPushButton("Cancel")
        self.cancel_button.setToolTip(
            "Stop the training; its last checkpoint is kept (Resume continues)"
        )
        self.cancel_button.clicked.connect(controller.cancel)
        self.resume_button = QtWidgets.QPushButton("Resume")
        self.resume_button.setToolTip(
            "Continue an interrupted or cancelled training from its last checkpoint"
        )
        self.resume_button.clicked.connect(lambda: controller.resume())
        buttons.addWidget(self.start_button, 0, 0, 1, 2)
        buttons.addWidget(self.cancel_button, 1, 0)
        buttons.addWidget(self.resume_button, 1, 1)
        train_form.addRow(buttons)
        layout.addWidget(train_box)
        state.on_change("options", self._show_options, owner=self)
        self.base_model.currentIndexChanged.connect(
            lambda i: i >= 0 and controller.choose_base_model(self.base_model.itemData(i) or "")
        )
        state.on_change("base_model", self._show_base_model, owner=self)
        self.preset.currentIndexChanged.connect(
            lambda i: i >= 0 and setattr(state, "preset", self.preset.itemData(i) or "")
        )
        state.on_change("preset", self._show_preset, owner=self)

        # The shown training
        progress_box = QtWidgets.QGroupBox("Training")
        progress_layout = QtWidgets.QVBoxLayout(progress_box)
        self.trainings = QtWidgets.QComboBox()
        self.trainings.setToolTip("Trainings on the engine (also those from before a restart)")
        self.trainings.activated.connect(
            lambda i: i >= 0 and controller.select_training(self.trainings.itemData(i) or "")
        )
        progress_layout.addWidget(self.trainings)
        self.progress = QtWidgets.QProgressBar()
        self.progress.setTextVisible(True)
        progress_layout.addWidget(self.progress)
        self.loss_curve = LossCurve()
        progress_layout.addWidget(self.loss_curve)
        self.validation_caption = QtWidgets.QLabel()
        self.validation_caption.setWordWrap(True)
        progress_layout.addWidget(self.validation_caption)
        self.validation = QtWidgets.QLabel()
        self.validation.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.validation.setToolTip(
            "The first pairs of the dataset: before | the model's after at that step"
        )
        progress_layout.addWidget(self.validation)
        self.card = QtWidgets.QTextBrowser()
        self.card.setMaximumHeight(140)
        progress_layout.addWidget(self.card)
        self.use_button = QtWidgets.QPushButton("Use in Edit")
        self.use_button.setToolTip("Choose this LoRA (and its base model) in the Edit tab")
        self.use_button.clicked.connect(lambda: controller.use_lora())
        progress_layout.addWidget(self.use_button)
        layout.addWidget(progress_box)

        # A docker is narrow: long entries (presets, model ids, layer names) shorten with an
        # ellipsis instead of making the tab wider than the docker (no sideways scrolling).
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        for combo in (
            self.dataset,
            self.before_layer,
            self.after_layer,
            self.base_model,
            self.preset,
            self.trainings,
        ):
            combo.setSizeAdjustPolicy(
                QtWidgets.QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
            )
            combo.setMinimumContentsLength(8)

        # Messages
        self.error_label = QtWidgets.QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet("color: #e0524a;")
        self.error_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.error_label)
        self.message_label = QtWidgets.QLabel()
        self.message_label.setWordWrap(True)
        layout.addWidget(self.message_label)
        layout.addStretch(1)

        state.on_change("datasets", lambda _v: self._show_datasets(), owner=self)
        state.on_change("dataset", lambda _v: self._show_datasets(), owner=self)
        state.on_change("pairs", self._show_pairs, owner=self)
        state.on_change("trainings", self._show_trainings, owner=self)
        state.on_change("current", self._show_current, owner=self)
        state.on_change("starting", lambda _v: self._show_buttons(), owner=self)
        state.on_change("validation_image", lambda _v: self._show_validation(), owner=self)
        state.on_change("error", self._show_error, owner=self)
        state.on_change("message", self.message_label.setText, owner=self)
        controller.edit.state.on_change("connection", lambda _v: self._show_buttons(), owner=self)
        # Model names (and "downloads first") come with the engine's model list.
        controller.edit.state.on_change(
            "engine_models", lambda _v: self._show_options(state.options), now=False, owner=self
        )

    # --- dataset and pairs -----------------------------------------------------------------

    def _ask_new_dataset(self) -> None:
        name, accepted = QtWidgets.QInputDialog.getText(self, "New dataset", "Name of the dataset:")
        if accepted and name.strip():
            self.controller.new_dataset(name)

    def _show_datasets(self) -> None:
        state = self.state
        self.dataset.blockSignals(True)
        self.dataset.clear()
        for label, folder in state.datasets:
            self.dataset.addItem(label, folder)
            self.dataset.setItemData(self.dataset.count() - 1, folder, Qt.ItemDataRole.ToolTipRole)
        if not state.datasets:
            self.dataset.addItem("No dataset yet: press New…", "")
        self.dataset.setCurrentIndex(max(0, self.dataset.findData(state.dataset)))
        self.dataset.blockSignals(False)
        self.name.setPlaceholderText(Path(state.dataset).name if state.dataset else "LoRA name")

    def _show_layers(self, layers: list[tuple[str, str]]) -> None:
        for combo, name in ((self.before_layer, "before_layer"), (self.after_layer, "after_layer")):
            combo.blockSignals(True)
            combo.clear()
            for node_id, label in layers:
                combo.addItem(label, node_id)
            combo.setCurrentIndex(combo.findData(getattr(self.state, name)))
            combo.blockSignals(False)

    @staticmethod
    def _show_layer_choice(combo: QtWidgets.QComboBox, layer_id: str) -> None:
        index = combo.findData(layer_id)
        if index != combo.currentIndex():
            combo.blockSignals(True)
            combo.setCurrentIndex(index)
            combo.blockSignals(False)

    def _show_pair_instruction(self, text: str) -> None:
        if self.pair_instruction.text() != text:
            self.pair_instruction.setText(text)

    def thumbnail(self, entry: PairEntry) -> QPixmap:
        before, after = self.controller.pair_paths(entry)
        # Keyed by modification time too: a removed pair's file names can be used again.
        key = (str(before), str(after), _mtime(before), _mtime(after))
        if key not in self._thumbs:
            self._thumbs[key] = side_by_side(QImage(str(before)), QImage(str(after)), THUMB_HEIGHT)
        return self._thumbs[key]

    def _show_pairs(self, pairs: list[PairEntry]) -> None:
        self.pairs.clear()
        for entry in pairs:
            item = QtWidgets.QListWidgetItem(QtGui.QIcon(self.thumbnail(entry)), entry.edit_prompt)
            item.setToolTip(f"{entry.input_image} → {entry.edited_image}")
            self.pairs.addItem(item)
        needed = self.state.options.min_pairs
        self.pairs_count.setText(
            f"{len(pairs)} pairs"
            + (f" (at least {needed} to train)" if len(pairs) < needed else "")
        )
        self.remove_pair_button.setEnabled(bool(pairs))
        self.pair_preview.hide()

    def _show_preview(self, row: int) -> None:
        pairs = self.state.pairs
        if not 0 <= row < len(pairs):
            self.pair_preview.hide()
            return
        before, after = self.controller.pair_paths(pairs[row])
        before_image, after_image = QImage(str(before)), QImage(str(after))
        height = min(before_image.height(), PREVIEW_WIDTH // 2) if not before_image.isNull() else 0
        pixmap = side_by_side(before_image, after_image, max(1, height))
        if pixmap.width() > PREVIEW_WIDTH:
            pixmap = pixmap.scaledToWidth(PREVIEW_WIDTH, Qt.TransformationMode.SmoothTransformation)
        self.pair_preview.setPixmap(pixmap)
        self.pair_preview.setToolTip(
            f"{pairs[row].edit_prompt}: {before_image.width()}×"
            f"{before_image.height()} (before | after)"
        )
        self.pair_preview.setVisible(not pixmap.isNull())

    def selected_pairs(self) -> list[PairEntry]:
        pairs = self.state.pairs
        rows = sorted({index.row() for index in self.pairs.selectedIndexes()})
        return [pairs[row] for row in rows if 0 <= row < len(pairs)]

    def _remove_selected(self) -> None:
        # Last row first: each removal is checked against the file, rows above stay in place.
        for entry in sorted(self.selected_pairs(), key=lambda e: -e.line):
            if not self.controller.remove_pair(entry):
                break

    # --- the form ----------------------------------------------------------------------------

    def _show_options(self, options: TrainingOptions) -> None:
        self.base_model.blockSignals(True)
        self.base_model.clear()
        catalogue = self.controller.edit.state.engine_models
        for model in options.trainable:
            info = catalogue.find(model.id)
            label = info.name if info is not None and info.name else model.id
            if model.family and model.family not in label:
                label += f" · {model.family}"
            if info is not None and info.available_locally is False:
                label += " · downloads first"
            self.base_model.addItem(label, model.id)
            self.base_model.setItemData(
                self.base_model.count() - 1, model.id, Qt.ItemDataRole.ToolTipRole
            )
        self.base_model.blockSignals(False)
        untrainable = [m for m in options.models if not m.trainable]
        self.base_model.setToolTip(
            "The model to fine-tune."
            + "".join(
                f"\nNot trainable: {m.id} — {m.why_not or 'not supported'}" for m in untrainable
            )
        )
        self._show_base_model(self.state.base_model)
        self.preset.blockSignals(True)
        self.preset.clear()
        for preset in options.presets:
            self.preset.addItem(preset.label or preset.id, preset.id)
            self.preset.setItemData(
                self.preset.count() - 1, preset.describe(), Qt.ItemDataRole.ToolTipRole
            )
        self.preset.blockSignals(False)
        self._show_preset(self.state.preset)
        self._show_pairs(self.state.pairs)

    def _show_base_model(self, model_id: str) -> None:
        index = self.base_model.findData(model_id)
        if index >= 0 and index != self.base_model.currentIndex():
            self.base_model.blockSignals(True)
            self.base_model.setCurrentIndex(index)
            self.base_model.blockSignals(False)

    def _show_preset(self, preset_id: str) -> None:
        index = self.preset.findData(preset_id)
        if index >= 0 and index != self.preset.currentIndex():
            self.preset.blockSignals(True)
            self.preset.setCurrentIndex(index)
            self.preset.blockSignals(False)
        preset = self.state.options.preset(preset_id)
        self.preset_info.setText(preset.describe() if preset else "")
        self.max_steps.setSpecialValueText(
            f"Preset's ({preset.max_steps})" if preset else "Preset's"
        )

    # --- the shown training ------------------------------------------------------------------

    def _show_trainings(self, trainings: list[TrainingStatus]) -> None:
        current = self.state.current
        self.trainings.blockSignals(True)
        self.trainings.clear()
        for status in trainings:
            self.trainings.addItem(status.describe(), status.id)
        if not trainings:
            self.trainings.addItem("No trainings yet", "")
        if current is not None:
            self.trainings.setCurrentIndex(max(0, self.trainings.findData(current.id)))
        self.trainings.blockSignals(False)

    def _show_current(self, status: TrainingStatus | None) -> None:
        self._show_buttons()
        if status is None:
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
            self.progress.setFormat("")
            self.loss_curve.set_points([])
            self.card.clear()
            self.card.hide()
            self._show_validation()
            return
        total = max(1, status.max_steps)
        self.progress.setRange(0, total)
        self.progress.setValue(min(status.step, total))
        left = format_seconds(status.eta_s) if status.state == "running" else ""
        words = {
            "queued": "Waiting to start…",
            "paused": "Paused while an edit runs",
            "done": "Done",
            "failed": "Failed",
            "cancelled": "Cancelled",
            "interrupted": "Interrupted (the engine stopped)",
        }
        text = words.get(status.state, f"Step {status.step} of {status.max_steps}")
        if status.state in ("running", "paused", "cancelled", "interrupted") and status.max_steps:
            text = (
                f"Step {status.step} of {status.max_steps}"
                if status.state == "running"
                else f"{text} · step {status.step} of {status.max_steps}"
            )
        self.progress.setFormat(text + (f" · {left} left" if left else ""))
        self.loss_curve.set_points(status.loss, status.max_steps)
        index = self.trainings.findData(status.id)
        if index >= 0:
            self.trainings.setItemText(index, status.describe())
            if index != self.trainings.currentIndex():
                self.trainings.setCurrentIndex(index)
        if status.state == "done" and status.lora_card:
            set_markdown = getattr(self.card, "setMarkdown", None)  # Qt ≥ 5.14
            if set_markdown is not None:
                set_markdown(status.lora_card)
            else:
                self.card.setPlainText(status.lora_card)
            self.card.show()
        else:
            self.card.clear()
            self.card.hide()
        self._show_validation()

    def _show_validation(self) -> None:
        picture = self.state.validation_image
        if picture is None or picture.isNull():
            self.validation.clear()
            self.validation.hide()
            self.validation_caption.hide()
            return
        width = max(64, min(self.viewport().width() - 24, PREVIEW_WIDTH))
        pixmap = QPixmap.fromImage(picture)
        if pixmap.width() > width:
            pixmap = pixmap.scaledToWidth(width, Qt.TransformationMode.SmoothTransformation)
        self.validation.setPixmap(pixmap)
        self.validation.show()
        self.validation_caption.setText(
            f"Validation at step {self.state.validation_step}: before | the model's after"
        )
        self.validation_caption.show()

    def _show_buttons(self) -> None:
        state = self.state
        current = state.current
        connected = self.controller.connection.ready
        self.start_button.setEnabled(connected and state.can_start)
        self.cancel_button.setEnabled(connected and current is not None and current.active)
        self.resume_button.setEnabled(
            connected and state.can_start and current is not None and current.can_resume()
        )
        self.use_button.setVisible(
            current is not None and current.state == "done" and bool(current.lora_path)
        )

    def _show_error(self, message: str) -> None:
        self.error_label.setText(message)
        self.error_label.setVisible(bool(message))

    def refresh(self) -> None:
        """The docker's poll while this tab is visible: the document's layers may have changed."""
        self.controller.refresh_layers()
