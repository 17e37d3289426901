"""Waiting in plugin tests: run Qt's event loop until a condition holds."""

from __future__ import annotations

import time
from collections.abc import Callable

from instruct_edit.qt import QtCore, QTimer


def wait_for(condition: Callable[[], object], timeout: float = 15.0) -> None:
    """Run Qt's event loop (not processEvents + sleep: uploads stream a chunk per turn)."""
    deadline = time.monotonic() + timeout
    loop = QtCore.QEventLoop()
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        QTimer.singleShot(5, loop.quit)
        loop.exec()
