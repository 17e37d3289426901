"""Krita Extension: menu actions (Edit, Save as training pair)."""

from __future__ import annotations

from typing import Any

from krita import Extension, Krita

from .krita_document import KritaDocument, UnsupportedDocument
from .qt import QtWidgets
from .training_pair import save_pair
from .ui.docker import shared_controller


class InstructEditExtension(Extension):
    def __init__(self, parent: Any) -> None:
        super().__init__(parent)

    def setup(self) -> None:
        pass

    def createActions(self, window: Any) -> None:
        edit = window.createAction("instruct_edit_run", "Instruct Edit: Edit", "tools/scripts")
        edit.triggered.connect(lambda: shared_controller().edit())
        pair = window.createAction("instruct_edit_save_pair", "Instruct Edit: Save as Training Pair",
                                   "tools/scripts")
        pair.triggered.connect(self.save_training_pair)

    def save_training_pair(self) -> None:
        controller = shared_controller()
        parent = Krita.instance().activeWindow().qwindow()
        document = Krita.instance().activeDocument()
        try:
            if document is None:
                raise UnsupportedDocument("Open a document first.")
            folder = controller.settings.pairs_folder
            if not folder:
                folder = QtWidgets.QFileDialog.getExistingDirectory(parent, "Folder for training pairs")
                if not folder:
                    return
                controller.settings.pairs_folder = folder
            adapter = KritaDocument(document)
            instruction, before, after, w, h = adapter.training_pair(adapter.active_layer())
            entry = save_pair(folder, instruction, before, after, w, h)
        except (UnsupportedDocument, ValueError, OSError) as err:
            QtWidgets.QMessageBox.warning(parent, "Save as training pair", str(err))
            return
        controller.state.message = f"Saved training pair {entry['edited_image']} in {folder}."
