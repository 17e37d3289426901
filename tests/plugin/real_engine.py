"""Starting the real `instruct-edit serve` for plugin tests (a module of its own, so tests
import it by a name no other test folder's conftest shares)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

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
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            return process, match.group(1)
    process.kill()
    raise RuntimeError("engine did not start:\n" + "".join(lines[-20:]))
