"""ManagedEngine: starts and watches a local `instruct-edit serve` process.

The engine picks a free port (`--port 0`) and prints `listening on http://HOST:PORT` once
it is ready; it watches Krita's process id (`--parent-pid`) and exits with Krita even
after a crash. The access token is random per start and passed in a private file, so it
never shows in the process list.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..qt import QObject, QProcess, QTimer, pyqtSignal

LISTENING = re.compile(r"listening on (https?://\S+)")
MAX_RESTARTS = 3
RESTART_WINDOW_S = 120.0
#: Where `./scripts/run.sh` (plain `instruct-edit serve`) listens: checked before starting one.
DEFAULT_ENGINE_URL = "http://127.0.0.1:8765"


def engine_python(python_path: str) -> str | None:
    """The Python executable of the environment a Settings path names (venv, python, script)."""
    path = Path(os.path.expanduser(str(python_path).strip()))
    if not str(python_path).strip():
        return None
    if path.is_dir():
        bin_dir = path / ("Scripts" if sys.platform == "win32" else "bin")
        return str(bin_dir / ("python.exe" if sys.platform == "win32" else "python"))
    if path.name.startswith("instruct-edit"):
        return str(path.parent / ("python.exe" if sys.platform == "win32" else "python"))
    return str(path)


#: Asks an environment for its installation id with the engine's own recipe
#: (engine/server/instance.py, docs/api.md "One engine per installation").
INSTALL_ID_CODE = "import engine.server.instance as i; print(i.current_install_id())"


def install_id(python_executable: str, package_dir: str) -> str:
    """The recipe of docs/api.md, for clients that know both folders (tests use it)."""

    def canonical(path: str) -> str:
        return os.path.normcase(os.path.realpath(path))

    environment = canonical(os.path.dirname(os.path.abspath(python_executable)))
    return hashlib.sha256(f"{environment}\n{canonical(package_dir)}".encode()).hexdigest()[:16]


def ask_install_id(python_path: str, on_done: Callable[[str | None], None],
                   parent: QObject | None = None, timeout_ms: int = 15_000) -> QProcess | None:
    """Run the configured Python once (asynchronously) to learn its installation id.

    on_done(id), or on_done(None) when it cannot say (no Python there, an engine too old).
    """
    python = engine_python(python_path)
    if not python or not Path(python).exists():
        QTimer.singleShot(0, lambda: on_done(None))
        return None
    process = QProcess(parent)
    timer = QTimer(process)
    timer.setSingleShot(True)
    answered = {"done": False}

    def finish(value: str | None) -> None:
        if answered["done"]:
            return
        answered["done"] = True
        timer.stop()
        process.deleteLater()
        on_done(value)

    def finished(*_args: object) -> None:
        text = bytes(process.readAllStandardOutput()).decode("utf-8", "replace").strip()
        ok = process.exitCode() == 0 and re.fullmatch(r"[0-9a-f]{16}", text) is not None
        finish(text if ok else None)

    def too_slow() -> None:
        process.kill()
        finish(None)

    timer.timeout.connect(too_slow)
    process.finished.connect(finished)
    process.errorOccurred.connect(lambda _error: finish(None))
    timer.start(timeout_ms)
    process.start(python, ["-c", INSTALL_ID_CODE])
    return process


def instance_id(instance: object) -> str | None:
    """The install_id a health answer's `instance` names, if any."""
    if not isinstance(instance, dict):
        return None
    value = instance.get("install_id")
    return value if isinstance(value, str) and value else None


def read_instance_token(instance: dict) -> str | None:
    """The token of a running engine, from the token file its health answer names."""
    token_file = instance.get("token_file")
    if not isinstance(token_file, str) or not token_file:
        return None
    try:
        token = Path(token_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token or None


def engine_command(python_path: str) -> tuple[str, list[str]]:
    """The program and leading arguments that run `instruct-edit` for a Python or venv path.

    Accepts a venv folder, its python executable, or the `instruct-edit` script itself.
    """
    path = Path(os.path.expanduser(python_path.strip()))
    if not str(python_path).strip():
        raise FileNotFoundError(
            "Set the engine's Python (the virtual environment where instruct-edit is "
            "installed) in Settings.")
    if path.is_dir():
        bin_dir = path / ("Scripts" if sys.platform == "win32" else "bin")
        python = bin_dir / ("python.exe" if sys.platform == "win32" else "python")
    else:
        python = path
        bin_dir = path.parent
    if python.name.startswith("instruct-edit") and python.exists():
        return str(python), []
    script = bin_dir / ("instruct-edit.exe" if sys.platform == "win32" else "instruct-edit")
    if script.exists():
        return str(script), []
    if python.exists():
        # No console script (e.g. a source checkout on PYTHONPATH): run the CLI's main().
        return str(python), ["-c", "import sys; from engine.cli import main; sys.exit(main())"]
    raise FileNotFoundError(
        f"No Python found at {path}. In Settings, choose the virtual environment where "
        "instruct-edit is installed (pip install instruct-edit).")


class ManagedEngine(QObject):
    """Signals: started(url, token), status(text), stopped(message), crashed(message)."""

    started = pyqtSignal(str, str)
    status = pyqtSignal(str)
    stopped = pyqtSignal(str)
    crashed = pyqtSignal(str)

    def __init__(self, python_path: str, device: str = "auto", model: str | None = None,
                 parent_pid: int | None = None, extra_args: list[str] | None = None,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.python_path = python_path
        self.device = device
        self.model = model
        self.parent_pid = parent_pid or os.getpid()
        self.extra_args = list(extra_args or [])
        self.url: str | None = None
        self.token: str | None = None
        self._process: QProcess | None = None
        self._stopping = False
        self._restarts: list[float] = []
        self._log: list[str] = []
        self._token_dir: str | None = None  # private folder for the token file, per start

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.state() != QProcess.ProcessState.NotRunning

    @property
    def log_tail(self) -> str:
        return "\n".join(self._log[-15:])

    def start(self) -> None:
        if self.is_running:
            return
        try:
            program, leading = engine_command(self.python_path)
        except FileNotFoundError as err:
            self.stopped.emit(str(err))
            return
        self.token = secrets.token_urlsafe(24)
        if self._token_dir is None or not Path(self._token_dir).is_dir():
            self._token_dir = tempfile.mkdtemp(prefix="instruct-edit-")  # mode 0700
        token_file = Path(self._token_dir) / "token"
        token_file.write_text(self.token, encoding="utf-8")
        os.chmod(token_file, 0o600)
        # --allow-downloads: this engine is the painter's own (loopback, private token); a
        # model they pick in the docker may be fetched ("downloads on first use").
        args = [*leading, "serve", "--host", "127.0.0.1", "--port", "0",
                "--parent-pid", str(self.parent_pid), "--token-file", str(token_file),
                "--allow-downloads"]
        if self.device and self.device != "auto":
            args += ["--device", self.device]
        if self.model:
            args += ["--model", self.model]
        args += self.extra_args
        self.url = None
        self._stopping = False
        self._log = []
        process = QProcess(self)
        process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        process.readyReadStandardOutput.connect(self._read_output)
        process.finished.connect(self._finished)
        process.errorOccurred.connect(self._error)
        self._process = process
        self.status.emit("Starting the engine…")
        process.start(program, args)

    def stop(self) -> None:
        """Ask the engine to exit (kill it if it has not after 3 s); remove the token file."""
        self._stopping = True
        process = self._process
        if process is not None and process.state() != QProcess.ProcessState.NotRunning:
            process.terminate()
            if not process.waitForFinished(3000):
                process.kill()
                process.waitForFinished(2000)
        if self._token_dir is not None:
            shutil.rmtree(self._token_dir, ignore_errors=True)
            self._token_dir = None

    def _read_output(self) -> None:
        process = self._process
        if process is None:
            return
        text = bytes(process.readAllStandardOutput()).decode("utf-8", "replace")
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            self._log.append(line)
            match = LISTENING.search(line)
            if match and self.url is None:
                self.url = match.group(1).rstrip("/")
                self.started.emit(self.url, self.token or "")
            elif self.url is None:
                # Start-up progress (loading the model, …) for the status line.
                self.status.emit(f"Starting the engine: {line[:120]}")

    def _error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self._process = None
            self.stopped.emit(
                f"The engine could not be started ({self.python_path}). Check the engine's "
                "Python in Settings.")

    def _finished(self, exit_code: int, _status: QProcess.ExitStatus) -> None:
        self._read_output()
        self._process = None
        self.url = None
        if self._stopping:
            self.stopped.emit("The engine was stopped.")
            return
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
        tail = self._log[-1] if self._log else "no output"
        if len(self._restarts) >= MAX_RESTARTS:
            self.stopped.emit(
                f"The engine keeps stopping (exit code {exit_code}: {tail}). Check Settings "
                "(Python path, device, model) and start it again.")
            return
        self._restarts.append(now)
        self.crashed.emit(f"The engine stopped unexpectedly (exit code {exit_code}: {tail}); restarting it.")
        QTimer.singleShot(500, self.start)
