"""“Save as training pair”: before layer, after layer and instruction into a pairs folder.

The folder format is the training package's: images as PNG next to `metadata.jsonl`, one
JSON object per line: {"input_image", "edit_prompt", "edited_image"} (paths relative to the
folder). Existing files are never overwritten: names get the next free number.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass
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
    metadata = folder / METADATA
    with contextlib.suppress(OSError), open(metadata, "rb") as existing:
        existing.seek(0, os.SEEK_END)
        if existing.tell() > 0:
            existing.seek(-1, os.SEEK_END)
            if existing.read(1) != b"\n":  # a hand-edited file without a final newline
                line = "\n" + line
    with open(metadata, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
    return entry


# --- a dataset folder: listing and removing pairs ------------------------------------------


@dataclass(frozen=True)
class PairEntry:
    """One row of `metadata.jsonl`: its line number (0-based) and its three fields."""

    line: int
    input_image: str
    edit_prompt: str
    edited_image: str

    def paths(self, folder: str | Path) -> tuple[Path, Path]:
        base = Path(folder)
        return base / self.input_image, base / self.edited_image


def list_pairs(folder: str | Path) -> list[PairEntry]:
    """The pairs a dataset folder holds, in file order (lines that are not pairs are skipped).

    A missing folder or metadata file is an empty dataset, not an error.
    """
    path = Path(folder).expanduser() / METADATA
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    pairs = []
    for number, line in enumerate(text.splitlines()):
        entry = _parse_row(line)
        if entry is not None:
            pairs.append(PairEntry(number, *entry))
    return pairs


def _parse_row(line: str) -> tuple[str, str, str] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict):
        return None
    values = (row.get("input_image"), row.get("edit_prompt"), row.get("edited_image"))
    if not all(isinstance(value, str) and value for value in values):
        return None
    return values  # type: ignore[return-value]


def remove_pair(folder: str | Path, entry: PairEntry) -> None:
    """Remove one pair: its metadata row, then its two images (unless another row uses them).

    The row is found by line number AND content, so a file changed since it was listed never
    loses the wrong row. `metadata.jsonl` is rewritten atomically (a temporary file in the
    same folder, fsync'd, then os.replace): a crash leaves the old or the new file, never half
    of one. Every other line — even one that is not a pair — is kept byte for byte.
    """
    folder = Path(folder).expanduser()
    path = folder / METADATA
    with open(path, encoding="utf-8", newline="") as handle:
        lines = handle.read().splitlines(keepends=True)
    wanted = (entry.input_image, entry.edit_prompt, entry.edited_image)
    if entry.line >= len(lines) or _parse_row(lines[entry.line]) != wanted:
        raise ValueError(f"The pair “{entry.edit_prompt}” is no longer at its place in {path}: "
                         "the dataset changed on disk. Refresh the list and try again.")
    kept = lines[: entry.line] + lines[entry.line + 1 :]
    fd, temporary = tempfile.mkstemp(prefix=".metadata-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write("".join(kept))
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(OSError):  # keep the original's permissions
            os.chmod(temporary, path.stat().st_mode & 0o777)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    # Only after the new metadata is in place: a crash before this leaves unused files, never
    # a row whose images are gone. Images another row still names are kept.
    still_used = set()
    for line in kept:
        row = _parse_row(line)
        if row is not None:
            still_used.update((row[0], row[2]))
    for name in (entry.input_image, entry.edited_image):
        target = (folder / name).resolve()
        if name in still_used or target.parent != folder.resolve():
            continue  # shared with another row, or outside the dataset folder: not ours to delete
        with contextlib.suppress(FileNotFoundError):
            target.unlink()


def dataset_zip(folder: str | Path, max_bytes: int = 0) -> bytes:
    """The dataset as a zip for an engine elsewhere: metadata.jsonl + the images it names.

    PNGs are already compressed: they are stored, not deflated (fast, same size). Raises
    ValueError with what to do when an image is missing or the zip would exceed max_bytes.
    """
    folder = Path(folder).expanduser()
    pairs = list_pairs(folder)
    if not pairs:
        raise ValueError(f"The dataset {folder} has no pairs yet: add pairs first.")
    names: list[str] = []
    total = 0
    for pair in pairs:
        for name in (pair.input_image, pair.edited_image):
            if name in names:
                continue
            path = folder / name
            if not path.is_file():
                raise ValueError(f"The image {name} named in {folder / METADATA} is missing: "
                                 "remove that pair or put the image back.")
            total += path.stat().st_size
            names.append(name)
    if max_bytes and total > max_bytes:
        raise ValueError(f"The dataset is {total / 2**20:.0f} MB; the engine accepts at most "
                         f"{max_bytes / 2**20:.0f} MB. Use fewer or smaller pairs.")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.write(folder / METADATA, METADATA)
        for name in names:
            archive.write(folder / name, name)
    return buffer.getvalue()
