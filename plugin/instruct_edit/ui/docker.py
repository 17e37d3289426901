"""The Krita docker: hosts EditPanel and keeps the controller pointed at the active document."""

from __future__ import annotations

import os
from typing import Any

from krita import DockWidget, Krita

from ..krita_document import KritaDocument
from ..model.controller import EditController
from ..model.state import EditState
from ..qt import QApplication, QTimer
from .panel import EditPanel
from .settings_dialog import SettingsDialog

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


class InstructEditDocker(DockWidget):
    def __init__(self) -> None:
        super().__init__()
        self.setWindowTitle(TITLE)
        self.controller = shared_controller()
        self.panel = EditPanel(self.controller, open_settings=self.open_settings)
        self.setWidget(self.panel)
        # Krita has no signal for "active layer changed": poll, cheaply, while visible.
        self._poll = QTimer(self)
        self._poll.timeout.connect(self._refresh)
        self._poll.start(500)

    def canvasChanged(self, canvas: Any) -> None:
        self._refresh()

    def _refresh(self) -> None:
        if self.isVisible():
            self.controller.refresh_selected_provenance()

    def open_settings(self) -> None:
        dialog = SettingsDialog(self.controller.settings, self)
        if dialog.exec():
            self.controller.apply_settings(dialog.result_settings())
