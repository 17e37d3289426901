from __future__ import annotations

import numpy as np
import pytest

from engine.editor import Editor
from tests.tiny_models.sd import build_tiny_pipeline


@pytest.fixture
def editor() -> Editor:
    """A tiny model on the CPU in fp32, where results are compared to diffusers exactly."""
    return Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="fp32")


@pytest.fixture
def working_image() -> np.ndarray:
    return np.random.default_rng(0).random((32, 48, 3)).astype(np.float32)
