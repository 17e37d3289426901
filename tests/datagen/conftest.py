"""Tiny random models for the data-generation tests, built once per session and saved like real ones."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from datagen_helpers import build_tiny_clip, build_tiny_lm, build_tiny_sd_pipeline


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-clip")
    model, tokenizer, processor = build_tiny_clip()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-lm")
    model, tokenizer = build_tiny_lm()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
