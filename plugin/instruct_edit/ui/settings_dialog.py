"""SettingsDialog: managed local engine (Python environment, device, model) or a remote URL + token."""

from __future__ import annotations

from dataclasses import replace

from ..model.settings import (
    CPU_RUNTIMES,
    DEVICES,
    MANAGED,
    REMOTE,
    Settings,
    default_datasets_folder,
)
from ..qt import QtWidgets


class SettingsDialog(QtWidgets.QDialog):
    def __init__(self, settings: Settings, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Instruct Edit settings")
        self._settings = settings
        layout = QtWidgets.QVBoxLayout(self)

        self.managed = QtWidgets.QRadioButton("Local engine, started and stopped with Krita")
        self.remote = QtWidgets.QRadioButton("Engine on another machine (or started by hand)")
        layout.addWidget(self.managed)
        managed_form = QtWidgets.QFormLayout()
        path_row = QtWidgets.QHBoxLayout()
        self.python_path = QtWidgets.QLineEdit(settings.python_path)
        self.python_path.setPlaceholderText("folder of the virtual environment with instruct-edit")
        self.python_path.setToolTip("The Python environment where `pip install instruct-edit` was run "
                                    "(its folder, its python, or the instruct-edit program)")
        browse = QtWidgets.QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        path_row.addWidget(self.python_path, 1)
        path_row.addWidget(browse)
        managed_form.addRow("Python environment", path_row)
        self.device = QtWidgets.QComboBox()
        for device in DEVICES:
            self.device.addItem(device, device)
        self.device.setCurrentIndex(max(0, self.device.findData(settings.device)))
        self.device.setToolTip("auto picks the GPU when there is one (CUDA or Apple), else the CPU")
        managed_form.addRow("Device", self.device)
        self.engine_model = QtWidgets.QLineEdit(settings.engine_model)
        self.engine_model.setPlaceholderText("default: timbrooks/instruct-pix2pix")
        self.engine_model.setToolTip("Model loaded at start: a hub id, a model folder or a .safetensors file")
        managed_form.addRow("Model", self.engine_model)
        self.cpu_runtime = QtWidgets.QComboBox()
        for runtime, label in CPU_RUNTIMES.items():
            self.cpu_runtime.addItem(label, runtime)
        self.cpu_runtime.setCurrentIndex(max(0, self.cpu_runtime.findData(settings.cpu_runtime)))
        self.cpu_runtime.setToolTip(
            "How InstructPix2Pix models run without a GPU. int8 is about 3× faster on recent "
            "CPUs (Intel 11th gen / Ice Lake and later, AMD Zen 4 and later) and changes results "
            "slightly; its first edit per model calibrates it (a few minutes and about 13 GB of free "
            "memory, once; then cached).")
        managed_form.addRow("On the CPU", self.cpu_runtime)
        layout.addLayout(managed_form)

        layout.addWidget(self.remote)
        remote_form = QtWidgets.QFormLayout()
        self.remote_url = QtWidgets.QLineEdit(settings.remote_url)
        self.remote_url.setToolTip("e.g. http://192.168.1.20:8765 — as printed by `instruct-edit serve`")
        remote_form.addRow("Address", self.remote_url)
        self.remote_token = QtWidgets.QLineEdit(settings.remote_token)
        self.remote_token.setEchoMode(QtWidgets.QLineEdit.EchoMode.Password)
        self.remote_token.setToolTip("The access token the engine was started with (--token / --token-file)")
        remote_form.addRow("Token", self.remote_token)
        layout.addLayout(remote_form)

        pairs_row = QtWidgets.QHBoxLayout()
        self.pairs_folder = QtWidgets.QLineEdit(settings.pairs_folder)
        self.pairs_folder.setToolTip("Where “Save as training pair” writes before/after images and metadata.jsonl")
        pick = QtWidgets.QPushButton("Browse…")
        pick.clicked.connect(self._browse_pairs)
        pairs_row.addWidget(self.pairs_folder, 1)
        pairs_row.addWidget(pick)
        pairs_form = QtWidgets.QFormLayout()
        pairs_form.addRow("Training pairs folder", pairs_row)
        datasets_row = QtWidgets.QHBoxLayout()
        self.datasets_folder = QtWidgets.QLineEdit(settings.datasets_folder)
        self.datasets_folder.setPlaceholderText(str(default_datasets_folder()))
        self.datasets_folder.setToolTip("Where the Train tab keeps its datasets: one folder per "
                                        "dataset, each with before/after images and metadata.jsonl")
        pick_datasets = QtWidgets.QPushButton("Browse…")
        pick_datasets.clicked.connect(self._browse_datasets)
        datasets_row.addWidget(self.datasets_folder, 1)
        datasets_row.addWidget(pick_datasets)
        pairs_form.addRow("Datasets folder", datasets_row)
        layout.addLayout(pairs_form)

        self.problem_label = QtWidgets.QLabel()
        self.problem_label.setStyleSheet("color: #e0524a;")
        self.problem_label.setWordWrap(True)
        layout.addWidget(self.problem_label)
        buttons = QtWidgets.QDialogButtonBox(
            QtWidgets.QDialogButtonBox.StandardButton.Ok | QtWidgets.QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self._accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)
        (self.managed if settings.engine_mode == MANAGED else self.remote).setChecked(True)

    def result_settings(self) -> Settings:
        return replace(
            self._settings,
            engine_mode=MANAGED if self.managed.isChecked() else REMOTE,
            python_path=self.python_path.text().strip(),
            device=self.device.currentData(),
            engine_model=self.engine_model.text().strip(),
            cpu_runtime=self.cpu_runtime.currentData(),
            remote_url=self.remote_url.text().strip().rstrip("/"),
            remote_token=self.remote_token.text().strip(),
            pairs_folder=self.pairs_folder.text().strip(),
            datasets_folder=self.datasets_folder.text().strip(),
        )

    def _accept(self) -> None:
        problems = self.result_settings().problems()
        if problems:
            self.problem_label.setText("\n".join(problems))
            return
        self.accept()

    def _browse(self) -> None:
        folder = QtWidgets.QFileDialog.getExistingDirectory(self, "Python environment with instruct-edit")
        if folder:
            self.python_path.setText(folder)

    def _browse_pairs(self) -> None:
        folder = QtWidgets.QFileDialog.getExistingDirectory(self, "Folder for training pairs")
        if folder:
            self.pairs_folder.setText(folder)

    def _browse_datasets(self) -> None:
        folder = QtWidgets.QFileDialog.getExistingDirectory(self, "Folder for training datasets")
        if folder:
            self.datasets_folder.setText(folder)
