"""“Save as training pair”: before layer, after layer and instruction into a pairs folder.

The folder format is the training package's: images as PNG next to `metadata.jsonl`, one
JSON object per line: {"input_image", "edit_prompt", "edited_image"} (paths relative to the
folder). Existing files are never overwritten: names get the next free number.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from . import image as px

METADATA = "metadata.jsonl"


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "pair"


def _free_stem(folder: Path, stem: str) -> str:
    """The first `stem-NNNN` for which neither image exists yet."""
    number = 1
    while True:
        candidate = f"{stem}-{number:04d}"
        if not (folder / f"{candidate}-input.png").exists() and not (folder / f"{candidate}-edited.png").exists():
            return candidate
        number += 1


def save_pair(folder: str | Path, instruction: str, before_bgra: bytes, after_bgra: bytes,
              width: int, height: int) -> dict[str, str]:
    """Write both images (exclusive create: never overwrite) and append one metadata line."""
    if not instruction.strip():
        raise ValueError("The pair needs an instruction: type it in the instruction field first.")
    folder = Path(folder).expanduser()
    if not str(folder).strip() or str(folder) == ".":
        raise ValueError("Choose a training pairs folder in Settings first.")
    folder.mkdir(parents=True, exist_ok=True)
    stem = _free_stem(folder, _slug(instruction))
    entry = {
        "input_image": f"{stem}-input.png",
        "edit_prompt": instruction.strip(),
        "edited_image": f"{stem}-edited.png",
    }
    for key, data in (("input_image", before_bgra), ("edited_image", after_bgra)):
        png = px.encode_png(px.image_from_bgra(data, width, height))
        # "x" mode: fail rather than overwrite, even if another process raced us.
        with open(folder / entry[key], "xb") as handle:
            handle.write(png)
    line = json.dumps(entry, ensure_ascii=False) + "\n"
    with open(folder / METADATA, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
    return entry
