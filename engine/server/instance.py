"""Which installation a running engine is: `install_id`, shown by `GET /v1/health`.

The Krita plugin's managed mode compares it with the id of the Python it is configured to
start, and connects to an engine already running from the same installation (e.g. one started
by the README's run command) instead of starting a second one that loads the model again.

The recipe (docs/api.md, "One engine per installation"), which a client without the engine
computes the same way:

    environment = realpath(dirname(abspath(python executable)))   # the venv's bin/ or Scripts\\
    package     = realpath(folder of the `engine` package)
    install_id  = sha256(f"{environment}\\n{package}".encode("utf-8")).hexdigest()[:16]

with both paths case-folded (`os.path.normcase`) on Windows. The executable's folder rather
than the executable itself: `python` and `python3` of one virtual environment are the same
installation, while resolving the executable's own symlink would make every venv built from
one base Python look alike. This module imports nothing heavy, so
`python -c "import engine.server.instance as i; print(i.current_install_id())"` is cheap; a
client may also compute the package folder with
`python -c "import importlib.util as u, os; print(os.path.dirname(u.find_spec('engine').origin))"`.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

ENGINE_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)


def _canonical(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def install_id(python_executable: str, package_dir: str) -> str:
    """16 hex digits naming (Python environment, engine package); see the module docstring."""
    environment = _canonical(os.path.dirname(os.path.abspath(python_executable)))
    package = _canonical(package_dir)
    return hashlib.sha256(f"{environment}\n{package}".encode()).hexdigest()[:16]


def current_install_id() -> str:
    """The id of the running interpreter and the engine package it imported."""
    return install_id(sys.executable, ENGINE_PACKAGE_DIR)
