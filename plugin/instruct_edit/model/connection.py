"""EngineConnection: which engine the plugin talks to, and keeping that link alive.

- Remote: the address and token from Settings.
- Managed (default): first looks for an engine of the same installation that already runs
  on the default port (for example `./scripts/run.sh`); its `GET /v1/health` names the
  installation and its token file. If it is ours, the plugin connects to it instead of
  loading the model a second time. Otherwise the plugin starts its own engine
  (ManagedEngine: a private port and token, restarted after a crash, stopped with Krita).

The connection's state is shown through EditState (`connection`, `connection_message`,
`models`, `loras`); `lost(message)` tells the job pipeline that an edit in flight is gone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..client.engine_process import (
    DEFAULT_ENGINE_URL,
    ManagedEngine,
    ask_install_id,
    instance_id,
    read_instance_token,
)
from ..client.errors import ApiError
from ..client.http import EngineClient
from ..image import is_loopback
from ..qt import QObject, pyqtSignal
from . import settings as settings_module
from .state import CONNECTED, DISCONNECTED, FAILED, STARTING, EditState


class EngineConnection(QObject):
    #: An edit in flight cannot finish (the engine stopped or was disconnected): the message.
    lost = pyqtSignal(str)

    def __init__(self, state: EditState, settings: Callable[[], settings_module.Settings],
                 parent_pid: int | None = None, parent: QObject | None = None,
                 default_url: str = DEFAULT_ENGINE_URL) -> None:
        super().__init__(parent)
        self.state = state
        self._settings = settings
        self.parent_pid = parent_pid
        self.default_url = default_url
        self.client: EngineClient | None = None
        self.engine: ManagedEngine | None = None
        #: True when managed mode found the installation's engine already running.
        self.attached = False
        self._probe: EngineClient | None = None

    @property
    def loopback(self) -> bool:
        """The engine runs on this machine: pixels travel raw (no PNG)."""
        return self.client is not None and is_loopback(self.client.base_url)

    @property
    def ready(self) -> bool:
        return self.client is not None and self.state.connection == CONNECTED

    # --- connecting ---------------------------------------------------------------------

    def connect_engine(self) -> None:
        self.disconnect_engine()
        settings = self._settings()
        problems = settings.problems()
        if problems:
            self._set(FAILED, problems[0] + " (Settings…)")
            return
        if settings.engine_mode == settings_module.REMOTE:
            self._use_engine(settings.remote_url, settings.remote_token)
            return
        self._set(STARTING, "Looking for a running engine…")
        self._look_for_running_engine(settings)

    def _look_for_running_engine(self, settings: settings_module.Settings) -> None:
        probe = EngineClient(self.default_url, parent=self, timeout_ms=2_000)
        self._probe = probe

        def answered(info: Any) -> None:
            if self._probe is not probe:
                return
            instance = info.get("instance") if isinstance(info, dict) else None
            theirs = instance_id(instance)
            if theirs is None:
                self._drop_probe()
                self._start_managed(settings)
                return

            def ours(our_id: str | None) -> None:
                if self._probe is not probe:
                    return
                self._drop_probe()
                token = read_instance_token(instance) if our_id == theirs else None
                if token:
                    self.attached = True
                    self._use_engine(self.default_url, token)
                else:
                    self._start_managed(settings)

            self._set(STARTING, "Checking the engine that is already running…")
            ask_install_id(settings.python_path, ours, parent=self)

        def absent(_err: ApiError) -> None:
            if self._probe is probe:
                self._drop_probe()
                self._start_managed(settings)

        probe.health(answered, absent)

    def _drop_probe(self) -> None:
        if self._probe is not None:
            probe, self._probe = self._probe, None
            probe.close()
            probe.deleteLater()

    def _start_managed(self, settings: settings_module.Settings) -> None:
        runtime = [] if settings.cpu_runtime == "auto" else ["--runtime", settings.cpu_runtime]
        engine = ManagedEngine(settings.python_path, settings.device,
                               settings.engine_model or None, self.parent_pid,
                               extra_args=runtime, parent=self)
        engine.status.connect(lambda text: self._set(STARTING, text))
        engine.started.connect(self._use_engine)
        engine.crashed.connect(self._engine_crashed)
        engine.stopped.connect(lambda text: self._set(FAILED, text))
        self.engine = engine
        self._set(STARTING, "Starting the engine…")
        engine.start()

    def disconnect_engine(self) -> None:
        if self.client is not None or self.engine is not None:
            self.lost.emit("The engine was disconnected during the edit.")
        self._drop_probe()
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.stopped.disconnect()
            engine.crashed.disconnect()
            engine.stop()
            engine.deleteLater()
        self._drop_client()
        self.attached = False
        self._set(DISCONNECTED, "Not connected")

    def _drop_client(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            client.close()
            client.deleteLater()

    def _use_engine(self, url: str, token: str) -> None:
        self._drop_client()
        client = EngineClient(url, token, parent=self)
        self.client = client
        self._set(STARTING, f"Connecting to {url}…")

        def healthy(info: Any) -> None:
            if self.client is not client:
                return
            info = info if isinstance(info, dict) else {}
            device = info.get("device") or "?"
            shared = " — the engine already running on this machine" if self.attached else ""
            self._set(CONNECTED, f"Connected to {url} ({device}){shared}")
            client.models(self._models_arrived, lambda err: None)

        def unhealthy(err: ApiError) -> None:
            if self.client is client:
                self._set(FAILED, err.message)

        client.health(healthy, unhealthy)

    def refresh_models(self) -> None:
        """Ask the engine's model and LoRA list again (e.g. a training just added a LoRA)."""
        if self.client is not None:
            self.client.models(self._models_arrived, lambda err: None)

    def _models_arrived(self, answer: Any) -> None:
        learn = getattr(self.state, "learn_models", None)
        if learn is not None:  # EditState reads the models' parameters (model/state.py)
            learn(answer)
            return
        models = answer.get("models", []) if isinstance(answer, dict) else answer
        loras = answer.get("loras", []) if isinstance(answer, dict) else []
        self.state.models = ([m for m in models if isinstance(m, dict) and m.get("id")]
                             if isinstance(models, list) else [])
        self.state.loras = [str(lo) for lo in loras] if isinstance(loras, list) else []

    def _engine_crashed(self, message: str) -> None:
        self._drop_client()
        self.lost.emit("The engine stopped unexpectedly during the edit; it is being restarted. "
                       "Press Edit again when it is connected.")
        self._set(STARTING, message)

    def connection_lost(self, message: str) -> None:
        """A request could not reach the engine: an attached engine (run.sh) was stopped."""
        if self.attached and self.state.connection == CONNECTED:
            self._set(FAILED, "The engine that was already running stopped. Press Connect to "
                              "start one from Krita (or start ./scripts/run.sh again).")

    def _set(self, status: str, message: str) -> None:
        self.state.connection = status
        self.state.connection_message = message
