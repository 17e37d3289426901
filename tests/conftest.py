"""Settings every test needs: no network, no display, quiet libraries, shared tiny models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The tests' tiny models are imported as `tests.tiny_models.*` (pytest runs with
# --import-mode=importlib, which does not put the repository root on sys.path).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Set before any library import reads them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# The suite compares the PyTorch path with diffusers exactly, so `auto` means PyTorch here; the
# OpenVINO path is tested with the runtime named (tests/engine/test_openvino_runtime.py).
os.environ.setdefault("INSTRUCT_EDIT_RUNTIME", "torch")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random InstructPix2Pix saved as a diffusers folder (safetensors), built once."""
    from tests.tiny_models.sd import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-ip2p")
