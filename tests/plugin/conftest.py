"""Plugin tests: pure logic, widgets against a fake `krita` module, and real Krita.

The Qt binding follows PYTEST_QT_API (pyqt6 by default): run the suite a second time with
`PYTEST_QT_API=pyqt5` to test Krita 5's binding. test_bindings.py does that automatically.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = ROOT / "plugin"

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
_api = os.environ.get("PYTEST_QT_API", "").lower()
if _api in ("pyqt5", "pyqt6"):
    os.environ["INSTRUCT_EDIT_QT"] = _api
# The plugin package (as Krita sees it) and this folder's helpers (fake_krita, fake_engine).
for _path in (PLUGIN_DIR, Path(__file__).resolve().parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

VENV_BIN = Path(sys.executable).parent


def start_engine(model_dir: Path, token_file: Path, extra: list[str] | None = None,
                 timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    """Start the real `instruct-edit serve` on a free port; return (process, base URL)."""
    program = VENV_BIN / "instruct-edit"
    command = [str(program), "serve", "--port", "0", "--token-file", str(token_file),
               "--model", str(model_dir), *(extra or [])]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    deadline = time.monotonic() + timeout
    lines = []
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            # Keep draining output so the engine never blocks on a full pipe.
            import threading

            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return process, match.group(1)
    process.kill()
    raise RuntimeError("engine did not start:\n" + "".join(lines[-20:]))


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real engine on the tiny model: (url, token)."""
    token_file = tmp_path_factory.mktemp("engine") / "token"
    token_file.write_text("test-token-123")
    process, url = start_engine(tiny_model_dir, token_file)
    yield url, "test-token-123"
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture
def fake_krita():
    import fake_krita as module

    module.install()
    yield module
    sys.modules.pop("krita", None)


@pytest.fixture
def fake_engine():
    import fake_engine as module

    server = module.FakeEngine()
    yield server
    server.close()
