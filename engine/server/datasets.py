"""Training datasets as the service receives them: a pairs folder checked row by row, a zip
upload extracted safely, and a snapshot copied into a training's own folder.

The pairs format is the training package's (docs/training.md): `metadata.jsonl`, one JSON
object a line with `input_image`, `edit_prompt`, `edited_image` (paths relative to the
folder). The service checks it here itself, because the engine never imports `training`.
Every problem is answered before a training starts, as a 422 naming the field `dataset`.
"""

from __future__ import annotations

import io
import json
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from engine.server.errors import ApiError

METADATA = "metadata.jsonl"
KEYS = ("input_image", "edit_prompt", "edited_image")
# Named in messages: how many bad rows one answer lists.
LISTED_PROBLEMS = 5
MAX_PAIRS = 5000
MAX_METADATA_BYTES = 16 * 2**20
# Zip uploads: caps on what an archive may unpack to (a "zip bomb" is a small upload that
# expands to gigabytes) and on its number of entries.
MAX_UNPACKED_BYTES = 2 * 2**30
MAX_ZIP_ENTRIES = 4 * MAX_PAIRS + 16
COPY_CHUNK = 1 << 20
# Files archivers add that are no part of a dataset.
_IGNORED_PREFIXES = ("__MACOSX/",)
_IGNORED_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def dataset_error(message: str, status: int = 422) -> ApiError:
    return ApiError(status, message, "dataset")


@dataclass(frozen=True)
class Pair:
    """One usable row: where it is, and its two images relative to the folder."""

    line: int
    instruction: str
    input_image: str
    edited_image: str


def _relative_inside(folder: Path, name: object) -> tuple[Path | None, str | None]:
    """The file a row names, when it is a relative path that stays inside `folder`."""
    if not isinstance(name, str) or not name.strip():
        return None, "the image path is empty or not text"
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts or ":" in posix.parts[0]:
        return None, f"{name!r} is not a path inside the dataset folder"
    path = folder / Path(*posix.parts)
    try:
        if not path.resolve().is_relative_to(folder.resolve()):
            return None, f"{name!r} leads out of the dataset folder"
    except OSError as err:
        return None, f"{name!r}: {err}"
    return path, None


def _image_size(path: Path, max_pixels: int) -> tuple[tuple[int, int] | None, str | None]:
    if not path.is_file():
        return None, f"{path.name} not found"
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                return None, (
                    f"{path.name} is {width}×{height}, more than this server's "
                    f"{max_pixels} pixels per image"
                )
            image.load()  # decode fully: a truncated file fails here, not during training
            return (width, height), None
    except (
        OSError,
        UnidentifiedImageError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
    ) as err:
        return None, f"{path.name} is not a readable image ({err})"


def check_pairs_folder(folder: Path, min_pairs: int, max_pixels: int) -> list[Pair]:
    """Every row of `folder`'s metadata.jsonl, checked; 422 (field `dataset`) listing up to
    five bad rows, or when fewer than `min_pairs` pairs are there."""
    metadata = folder / METADATA
    if not folder.is_dir():
        raise dataset_error(f"the dataset folder {folder} does not exist")
    if not metadata.is_file():
        raise dataset_error(
            f"{folder} has no {METADATA}; a dataset is a folder in the pairs format "
            "(metadata.jsonl with input_image, edit_prompt, edited_image; see docs/training.md)"
        )
    if metadata.stat().st_size > MAX_METADATA_BYTES:
        raise dataset_error(f"{METADATA} is larger than {MAX_METADATA_BYTES // 2**20} MiB")
    pairs: list[Pair] = []
    problems: list[str] = []
    rows = 0
    text = metadata.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        rows += 1
        if rows > MAX_PAIRS:
            raise dataset_error(f"the dataset has more than {MAX_PAIRS} pairs; split it")
        where = f"line {number}"
        try:
            entry = json.loads(line)
        except ValueError:
            problems.append(f"{where}: not valid JSON")
            continue
        if not isinstance(entry, dict) or any(key not in entry for key in KEYS):
            problems.append(f"{where}: needs the keys {', '.join(KEYS)}")
            continue
        instruction = str(entry["edit_prompt"] or "").strip()
        row_problems: list[str] = [] if instruction else ["empty instruction (edit_prompt)"]
        sizes: list[tuple[int, int]] = []
        for key in ("input_image", "edited_image"):
            path, problem = _relative_inside(folder, entry[key])
            if path is not None:
                size, problem = _image_size(path, max_pixels)
                if size is not None:
                    sizes.append(size)
            if problem is not None:
                row_problems.append(f"{key.replace('_', ' ')}: {problem}")
        if len(sizes) == 2 and sizes[0] != sizes[1]:
            (iw, ih), (ew, eh) = sizes
            row_problems.append(
                f"before is {iw}×{ih} but after is {ew}×{eh}; both must be the same size"
            )
        if row_problems:
            problems.append(f"{where}: {'; '.join(row_problems)}")
            continue
        pairs.append(
            Pair(number, instruction, str(entry["input_image"]), str(entry["edited_image"]))
        )
    if problems:
        shown = "; ".join(problems[:LISTED_PROBLEMS])
        more = len(problems) - LISTED_PROBLEMS
        raise dataset_error(
            f"{len(problems)} of {rows} pairs in {METADATA} are unusable: {shown}"
            + (f"; and {more} more" if more > 0 else "")
            + ". Fix or remove them, then start again."
        )
    if len(pairs) < min_pairs:
        raise dataset_error(
            f"the dataset has {len(pairs)} pair{'s' if len(pairs) != 1 else ''}; a training needs "
            f"at least {min_pairs} (10 to 50 work well). Add more before/after pairs."
        )
    return pairs


def snapshot_pairs(source: Path, pairs: list[Pair], destination: Path) -> None:
    """Copy the checked pairs (metadata and images only) into `destination`: a training and
    its resumes then read data that later changes of the painter's folder cannot alter."""
    destination.mkdir(parents=True, exist_ok=True)
    lines = []
    for pair in pairs:
        for name in (pair.input_image, pair.edited_image):
            relative = Path(*PurePosixPath(name.replace("\\", "/")).parts)
            target = destination / relative
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / relative, target)
        lines.append(
            json.dumps(
                {
                    "input_image": pair.input_image.replace("\\", "/"),
                    "edit_prompt": pair.instruction,
                    "edited_image": pair.edited_image.replace("\\", "/"),
                },
                ensure_ascii=False,
            )
        )
    (destination / METADATA).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _entry_path(name: str) -> PurePosixPath | None:
    """The archive member's relative path; None to skip it; 422 when it would leave the folder."""
    normal = name.replace("\\", "/")
    if normal.startswith(_IGNORED_PREFIXES) or PurePosixPath(normal).name in _IGNORED_NAMES:
        return None
    posix = PurePosixPath(normal)
    if normal.startswith("/") or ".." in posix.parts or (posix.parts and ":" in posix.parts[0]):
        raise dataset_error(
            f"the zip has an entry {name[:100]!r} that points outside the archive's folder; "
            "make the zip from the dataset folder itself (relative paths only)"
        )
    return posix


def extract_dataset_zip(
    data: bytes | bytearray | memoryview,
    destination: Path,
    *,
    max_unpacked_bytes: int = MAX_UNPACKED_BYTES,
    max_entries: int = MAX_ZIP_ENTRIES,
) -> Path:
    """Unpack a zipped pairs folder into `destination` (which must not exist) and return the
    folder that holds metadata.jsonl (the archive's root, or its one top folder).

    Refused with a 422 naming `dataset`: not a zip, an entry leaving the folder (zip-slip),
    links, more than `max_entries` entries, or more than `max_unpacked_bytes` once unpacked
    (counted while writing, so a lying size field does not help)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(bytes(data)))
    except (zipfile.BadZipFile, ValueError) as err:
        raise dataset_error(
            f"dataset is not a zip archive ({err}); send the pairs folder zipped"
        ) from err
    with archive:
        entries = archive.infolist()
        if len(entries) > max_entries:
            raise dataset_error(
                f"the zip has {len(entries)} entries; at most {max_entries} are accepted"
            )
        declared = sum(entry.file_size for entry in entries)
        if declared > max_unpacked_bytes:
            raise dataset_error(
                f"the zip would unpack to {declared / 2**20:.0f} MiB, more than the "
                f"{max_unpacked_bytes / 2**20:.0f} MiB a dataset may take"
            )
        planned: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        for entry in entries:
            path = _entry_path(entry.filename)
            if path is None or entry.is_dir():
                continue
            mode = entry.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise dataset_error(
                    f"the zip has a link {entry.filename[:100]!r}; links are not accepted"
                )
            planned.append((entry, path))
        destination.mkdir(parents=True)
        written = 0
        for entry, path in planned:
            target = destination.joinpath(*path.parts)
            if not target.resolve().is_relative_to(destination.resolve()):
                raise dataset_error(f"the zip entry {entry.filename[:100]!r} leaves its folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with archive.open(entry) as source, open(target, "wb") as out:
                    while chunk := source.read(COPY_CHUNK):
                        written += len(chunk)
                        if written > max_unpacked_bytes:
                            raise dataset_error(
                                f"the zip unpacks to more than {max_unpacked_bytes / 2**20:.0f} "
                                "MiB, the most a dataset may take"
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as err:
                raise dataset_error(
                    f"the zip entry {entry.filename[:100]!r} cannot be unpacked ({err})"
                ) from err
    return find_dataset_root(destination)


def find_dataset_root(folder: Path) -> Path:
    """`folder` when it holds metadata.jsonl, else its only subfolder that does (a zip made
    of the folder rather than of its contents)."""
    if (folder / METADATA).is_file():
        return folder
    candidates = [child for child in folder.iterdir() if (child / METADATA).is_file()]
    if len(candidates) == 1:
        return candidates[0]
    raise dataset_error(
        f"the zip holds no {METADATA} at its top (or in its one top folder); zip a dataset "
        "folder in the pairs format"
    )


def count_pairs(folder: Path) -> int:
    """Non-empty lines of metadata.jsonl (a cheap count for listings; nothing is opened)."""
    try:
        with (folder / METADATA).open(encoding="utf-8", errors="replace") as lines:
            return sum(1 for line in lines if line.strip())
    except OSError:
        return 0
