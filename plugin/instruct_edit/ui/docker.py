"""The Krita docker: an Edit tab (EditPanel) and a Train tab (TrainPanel), kept pointed at
the active document."""

from __future__ import annotations

import os
from typing import Any

from krita import DockWidget, Krita

from ..krita_document import KritaDocument
from ..model.controller import EditController
from ..model.state import EditState
from ..model.training import TrainingController
from ..qt import QApplication, QTimer, QtWidgets
from .panel import EditPanel
from .settings_dialog import SettingsDialog
from .train_panel import TrainPanel

DOCKER_ID = "instruct_edit_docker"
TITLE = "Instruct Edit"

# One engine serves every Krita window: the controller is shared by all dockers.
_shared: dict[str, Any] = {}


def shared_controller() -> EditController:
    if "controller" not in _shared:

        def active_document() -> KritaDocument | None:
            document = Krita.instance().activeDocument()
            return KritaDocument(document) if document is not None else None

        controller = EditController(EditState(), active_document, parent_pid=os.getpid())
        _shared["controller"] = controller
        # Stop the managed engine with Krita (the engine also watches Krita's pid).
        QApplication.instance().aboutToQuit.connect(controller.shutdown)
        QTimer.singleShot(0, controller.connect_engine)
    return _shared["controller"]


def shared_training() -> TrainingController:
    """The Train tab's controller: one for all windows, on the shared engine connection."""
    if "training" not in _shared:
        controller = shared_controller()
        training = TrainingController(controller)
        _shared["training"] = training
        QApplication.instance().aboutToQuit.connect(training.shutdown)
    return _shared["training"]


class InstructEditDocker(DockWidget):
    def __init__(self) -> None:
        super().__init__()
        self.setWindowTitle(TITLE)
        self.controller = shared_controller()
        self.training = shared_training()
        self.panel = EditPanel(self.controller, open_settings=self.open_settings)
        self.train_panel = TrainPanel(self.training)
        self.tabs = QtWidgets.QTabWidget()
        self.tabs.addTab(self.panel, "Edit")
        self.tabs.addTab(self.train_panel, "Train")
        self.tabs.currentChanged.connect(lambda _i: self._refresh())
        self.setWidget(self.tabs)
        # Krita has no signal for "active layer changed": poll, cheaply, while visible.
        self._poll = QTimer(self)
        self._poll.timeout.connect(self._refresh)
        self._poll.start(500)

    def canvasChanged(self, canvas: Any) -> None:
        self._refresh()

    def _refresh(self) -> None:
        if not self.isVisible():
            return
        if self.tabs.currentWidget() is self.train_panel:
            self.train_panel.refresh()
        else:
            self.controller.refresh_selected_provenance()

    def open_settings(self) -> None:
        dialog = SettingsDialog(self.controller.settings, self)
        if dialog.exec():
            self.controller.apply_settings(dialog.result_settings())
            self.training.refresh_datasets()  # the datasets folder may have changed
