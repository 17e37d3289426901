"""Run CPU work (PNG encode/decode, scaling) on a worker thread; hand the result to the UI thread.

Qt's image code runs in C++ and releases the GIL, so the UI keeps repainting meanwhile.
Krita objects are never touched from the worker.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from ..qt import QObject, pyqtSignal


class _Relay(QObject):
    # Emitted from the worker thread; Qt queues the call into the relay's (UI) thread.
    finished = pyqtSignal(object, object)


_running: set[_Relay] = set()


def run_in_background(work: Callable[[], Any], on_done: Callable[[Any], None],
                      on_error: Callable[[BaseException], None]) -> None:
    relay = _Relay()
    _running.add(relay)

    def deliver(result: Any, error: Any) -> None:
        _running.discard(relay)
        relay.deleteLater()
        # A Qt slot: nothing may escape it (callers guard too; this is the last line).
        try:
            if error is not None:
                on_error(error)
            else:
                on_done(result)
        except Exception:
            traceback.print_exc(file=sys.stderr)

    relay.finished.connect(deliver)

    def worker() -> None:
        try:
            result = work()
        except Exception as err:  # delivered to the UI thread as a message, never lost
            relay.finished.emit(None, err)
        else:
            relay.finished.emit(result, None)

    threading.Thread(target=worker, name="instruct-edit-worker", daemon=True).start()
