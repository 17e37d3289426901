"""Settings: how to reach the engine, where training pairs and datasets go, and the last-used values.

Stored as JSON in Krita's data folder (next to pykrita/). It may hold a remote engine's
token, so it is owner-only (0600) from the first byte, and never written mid-way: a private
temporary file is written, flushed and moved over the old one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..qt import QStandardPaths

MANAGED, REMOTE = "managed", "remote"
DEVICES = ("auto", "cuda", "mps", "cpu")
#: What runs InstructPix2Pix models on a CPU (the engine's --runtime), with the words the
#: Settings dialog shows. int8 is much faster where the CPU has VNNI and changes results a little.
CPU_RUNTIMES = {
    "auto": "Automatic (OpenVINO)",
    "openvino-int8": "Faster: int8 (small changes; the first edit calibrates, a few minutes)",
    "torch": "PyTorch (slowest; the reference)",
}


@dataclass
class Settings:
    engine_mode: str = MANAGED
    python_path: str = ""  # the venv (or its python) where instruct-edit is installed
    device: str = "auto"
    engine_model: str = ""  # model the managed engine loads at start ("" = its default)
    cpu_runtime: str = "auto"  # the managed engine's --runtime (CPU_RUNTIMES)
    remote_url: str = "http://127.0.0.1:8765"
    remote_token: str = ""
    pairs_folder: str = ""
    #: Where the Train tab keeps its datasets, one subfolder each ("" = default_datasets_folder()).
    datasets_folder: str = ""
    state: dict[str, Any] = field(default_factory=dict)  # EditState.snapshot()
    training: dict[str, Any] = field(default_factory=dict)  # TrainingState.snapshot()

    def problems(self) -> list[str]:
        """What must be fixed before connecting, in words for the Settings dialog."""
        found = []
        if self.engine_mode not in (MANAGED, REMOTE):
            found.append(f"Engine mode must be {MANAGED!r} or {REMOTE!r}.")
        if self.engine_mode == REMOTE and not self.remote_url.startswith(("http://", "https://")):
            found.append("The remote engine address must start with http:// or https://.")
        if self.engine_mode == MANAGED and not self.python_path.strip():
            found.append("Choose the Python environment where instruct-edit is installed.")
        if self.device not in DEVICES:
            found.append(f"Device must be one of {', '.join(DEVICES)}.")
        if self.cpu_runtime not in CPU_RUNTIMES:
            found.append(f"CPU runtime must be one of {', '.join(CPU_RUNTIMES)}.")
        return found


def _plugin_data_folder() -> Path:
    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.GenericDataLocation)
    return Path(base or Path.home()) / "krita" / "instruct_edit"


def default_path() -> Path:
    return _plugin_data_folder() / "settings.json"


def default_datasets_folder() -> Path:
    return _plugin_data_folder() / "datasets"


def datasets_folder(settings: Settings) -> Path:
    """The folder holding the Train tab's datasets (one subfolder per dataset)."""
    chosen = settings.datasets_folder.strip()
    return Path(chosen).expanduser() if chosen else default_datasets_folder()


def load(path: Path | None = None) -> Settings:
    """The saved settings; defaults for a missing or unreadable file, or one that is not an
    object; a field of the wrong type keeps its default."""
    path = path or default_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Settings()
    if not isinstance(data, dict):
        return Settings()
    defaults = Settings()
    values = {}
    for item in fields(Settings):
        if item.name in data and isinstance(data[item.name], type(getattr(defaults, item.name))):
            values[item.name] = data[item.name]
    return Settings(**values)


def save(settings: Settings, path: Path | None = None) -> None:
    path = path or default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(asdict(settings), indent=2)
    # mkstemp creates the file 0600 in the same folder, so os.replace is atomic.
    fd, temporary = tempfile.mkstemp(prefix=".settings-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o600)  # mkstemp already did; say it where it matters
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
