"""Run the plugin's Qt tests a second time under the other binding (Krita 5 = PyQt5).

`pytest tests/plugin` runs under PyQt6; this test re-runs the logic, flow and widget
tests in a subprocess with PYTEST_QT_API=pyqt5, so one pytest call covers both bindings.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PYTEST_QT_API", "pyqt6").lower() == "pyqt5",
                    reason="already running under PyQt5")
@pytest.mark.skipif(importlib.util.find_spec("PyQt5") is None,
                    reason="PyQt5 is not installed (pip install PyQt5): Krita 5's binding is untested")
def test_plugin_tests_pass_under_pyqt5():
    env = dict(os.environ, PYTEST_QT_API="pyqt5", INSTRUCT_EDIT_QT="pyqt5")
    files = [str(HERE / name) for name in
             ("test_plugin_logic.py", "test_plugin_params.py", "test_plugin_flow.py",
              "test_plugin_roundtrip.py", "test_plugin_widgets.py", "test_plugin_training.py")]
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *files],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    # test_binding_follows_the_environment (in the logic tests) proves PyQt5 was used.
    assert " passed" in completed.stdout and "skipped" not in completed.stdout, completed.stdout[-2000:]
