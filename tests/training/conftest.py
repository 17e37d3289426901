"""Fixtures for the training tests: small data folders built on the fly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_pairs(
    folder: Path, count: int = 6, size: tuple[int, int] = (32, 32), seed: int = 0
) -> Path:
    """A pairs folder: random input images; the edited image is the input with red boosted."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        source = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        edited = source.copy()
        edited[..., 0] = 255
        Image.fromarray(source).save(folder / f"{i}_in.png")
        Image.fromarray(edited).save(folder / f"{i}_out.png")
        lines.append(
            json.dumps(
                {
                    "input_image": f"{i}_in.png",
                    "edit_prompt": "make it red",
                    "edited_image": f"{i}_out.png",
                    "input_caption": "a noisy picture",
                    "output_caption": "a red noisy picture",
                }
            )
        )
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def folder_fingerprint(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file's size and modification time: what changes if anything writes there."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture
def pairs_dir(tmp_path: Path) -> Path:
    return write_pairs(tmp_path / "pairs")


@pytest.fixture
def make_pairs() -> Callable[..., Path]:
    return write_pairs


@pytest.fixture
def fingerprint() -> Callable[[Path], dict[str, tuple[int, int]]]:
    return folder_fingerprint
