"""Plugin tests: pure logic, widgets against a fake `krita` module, and real Krita.

The Qt binding follows PYTEST_QT_API (pyqt6 by default): run the suite a second time with
`PYTEST_QT_API=pyqt5` to test Krita 5's binding. test_bindings.py does that automatically.
"""

from __future__ import annotations

import os
import subprocess
import sys
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

from real_engine import start_engine  # noqa: E402


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real engine on the tiny model: (url, token)."""
    token_file = tmp_path_factory.mktemp("engine") / "token"
    token = "test-token-0123456789"  # the engine wants >= 16 characters, in a private file
    token_file.write_text(token)
    token_file.chmod(0o600)
    process, url = start_engine(tiny_model_dir, token_file)
    yield url, token
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
