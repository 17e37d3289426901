"""EditController: the docker's one entry point — glue between state, engine and document.

It checks and starts edits (the pipeline itself is model/jobs.py), keeps the connection
(model/connection.py), chains edits from a result layer, and persists the settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from ..krita_document import KritaDocument, UnsupportedDocument
from ..qt import QObject
from ..request import RequestError, explore_grid
from . import naming
from . import settings as settings_module
from .connection import EngineConnection
from .jobs import EditJob
from .state import BUSY_STATES, FAILED, IDLE, EditState


class EditController(QObject):
    def __init__(self, state: EditState, document_provider: Callable[[], KritaDocument | None],
                 settings: settings_module.Settings | None = None,
                 settings_path: Any = None, parent_pid: int | None = None,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.document_provider = document_provider
        self.settings_path = settings_path
        self.settings = settings or settings_module.load(settings_path)
        self.connection = EngineConnection(state, lambda: self.settings, parent_pid, parent=self)
        self.connection.lost.connect(self._connection_lost)
        self.job: EditJob | None = None
        self.inserted_groups: list[Any] = []  # for tests and "edit this result"
        state.restore(self.settings.state)

    # --- connection (model/connection.py) -----------------------------------------------

    @property
    def client(self) -> Any:
        return self.connection.client

    @property
    def engine(self) -> Any:
        return self.connection.engine

    def connect_engine(self) -> None:
        self.connection.connect_engine()

    def disconnect_engine(self) -> None:
        self.connection.disconnect_engine()

    def _connection_lost(self, message: str) -> None:
        if self.job is not None:
            self.job.fail(message)

    # --- editing (model/jobs.py) ---------------------------------------------------------

    def edit(self, explore: bool = False) -> bool:
        """Start an edit with the current settings; False (with state.error set) if it can't."""
        state = self.state
        if state.busy:
            return False
        state.error, state.error_field, state.message = "", "", ""
        try:
            request = state.request().validate()
            requests = explore_grid(request) if explore else [request]  # explore: may refuse
        except RequestError as err:
            return self._refuse(str(err), err.field)
        if not self.connection.ready:
            return self._refuse("The engine is not connected yet. "
                                + (state.connection_message if state.connection == FAILED else
                                   "Wait for it to start, or check Settings."), "engine")
        document = self.document_provider()
        if document is None:
            return self._refuse("Open a document first.", "document")
        try:
            region = document.plan_source(state.source)
        except UnsupportedDocument as err:
            return self._refuse(str(err), "source")
        state.remember_instruction(request.instruction)
        self._save_settings()
        model_name = self._model_name(request.model)

        def layer_for(req: Any, k: int) -> tuple[str, dict[str, Any]]:
            record = naming.provenance(req, k, region.source_name, region.source_kind,
                                       tuple(region.bounds), model_name, region.source_id)
            return naming.layer_name(req, k), record

        if self.job is not None:
            self.job.deleteLater()  # finished (not busy): its buffers are already released
        self.job = EditJob(state, self.connection, document, region, requests,
                           naming.group_name(request.instruction), layer_for,
                           self.inserted_groups.append, parent=self)
        self.job.start()
        return True

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def _refuse(self, message: str, field_name: str) -> bool:
        self.state.error, self.state.error_field = message, field_name
        return False

    def _model_name(self, model_id: str | None) -> str | None:
        if not model_id:
            return None
        for entry in self.state.models:
            if entry.get("id") == model_id:
                return str(entry.get("name") or model_id)
        return model_id

    # --- provenance / chaining --------------------------------------------------------

    def refresh_selected_provenance(self) -> None:
        document = self.document_provider()
        record = None
        if document is not None:
            try:
                record = document.provenance_of(document.active_layer())
            except Exception:  # a document being closed; the next poll will tell
                record = None
        if record != self.state.selected_provenance:
            self.state.selected_provenance = record

    def edit_this_result(self) -> None:
        """Chain: make the next edit start from the selected result layer."""
        record = self.state.selected_provenance
        self.state.source = "layer"
        if record:
            self.state.instruction = ""
            self.state.message = f"Next edit starts from the result of “{record.get('instruction', '')}”."

    # --- persistence ------------------------------------------------------------------

    def _save_settings(self) -> None:
        self.settings.state = self.state.snapshot()
        # Settings are a convenience; an edit must not fail because they can't be saved.
        with contextlib.suppress(OSError):
            settings_module.save(self.settings, self.settings_path)

    def apply_settings(self, new_settings: settings_module.Settings) -> None:
        new_settings.state = self.state.snapshot()
        self.settings = new_settings
        self._save_settings()
        self.connect_engine()

    def shutdown(self) -> None:
        self.cancel()
        self._save_settings()
        self.disconnect_engine()


__all__ = ["BUSY_STATES", "IDLE", "EditController"]
