"""Training data: the three formats we read, the checks we run on them, and the torch dataset.

Formats (picked automatically, or with `format=`):

- ``pairs``: a folder with ``metadata.jsonl``; each line is
  ``{"input_image": "a/1.png", "edit_prompt": "make it red", "edited_image": "b/1.png"}``
  with paths relative to the folder. Optional ``input_caption``/``output_caption`` keys
  are used by `evaluate` for CLIP directional similarity.
- ``generated``: the InstructPix2Pix paper's generated layout: ``seeds.json`` (a list of
  ``[folder_name, [seed, ...]]``), and per caption pair a folder ``{i:07d}/`` with
  ``prompt.json`` (``input``, ``edit``, ``output``), ``{seed}_0.jpg`` (before) and
  ``{seed}_1.jpg`` (after). Every (folder, seed) is one sample. The paper splits the
  seeds.json list 0.9/0.05/0.05 into train/val/test, in order; so do we.
- ``hf``: a Hugging Face dataset, either a folder written by ``Dataset.save_to_disk`` or a
  dataset name that ``datasets.load_dataset`` resolves (the hub or its local cache).

Nothing here writes to the data folder.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from engine.errors import InvalidInput

FORMATS = ("auto", "pairs", "generated", "hf")
SPLITS = ("train", "val", "test", "all")
# The paper's train/val/test fractions of seeds.json.
GENERATED_SPLIT_FRACTIONS = (0.9, 0.05, 0.05)


class DataError(InvalidInput):
    """The data can't be used as given (wrong format, bad rows, missing columns)."""


@dataclass(frozen=True)
class Columns:
    """Names of the three fields (metadata.jsonl keys or dataset columns)."""

    input_image: str = "input_image"
    edit_prompt: str = "edit_prompt"
    edited_image: str = "edited_image"
    input_caption: str = "input_caption"
    output_caption: str = "output_caption"


@dataclass(frozen=True)
class ImageRef:
    """Where one image comes from: a file, or a cell of a Hugging Face dataset."""

    path: Path | None = None
    loader: Callable[[], Any] | None = field(default=None, compare=False, repr=False)
    label: str = ""

    def describe(self) -> str:
        return str(self.path) if self.path is not None else self.label

    def open(self) -> Image.Image:
        """Decode fully (so truncated files fail here, not in the middle of training).

        Raises `ImageTooLarge` for an image over Pillow's pixel limit (a decompression bomb,
        or a picture far larger than any training resolution) before decoding it.
        """
        try:
            return self._open()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            # Pillow raises the error past twice its limit; the warning only when warnings are
            # errors (otherwise `_decoded` refuses the image itself).
            raise ImageTooLarge(f"{err} Scale the image down.") from err

    def _open(self) -> Image.Image:
        if self.path is not None:
            with Image.open(self.path) as img:
                return _decoded(img)
        assert self.loader is not None
        value = self.loader()
        if isinstance(value, Image.Image):
            return _decoded(value)
        if isinstance(value, dict) and value.get("bytes"):
            with Image.open(io.BytesIO(value["bytes"])) as img:
                return _decoded(img)
        if isinstance(value, dict) and value.get("path"):
            return ImageRef(path=Path(value["path"]))._open()
        if isinstance(value, str):
            return ImageRef(path=Path(value))._open()
        raise ValueError(f"not an image: {type(value).__name__}")


class ImageTooLarge(ValueError):
    """An image over Pillow's pixel limit (`Image.MAX_IMAGE_PIXELS`)."""


def _decoded(img: Image.Image) -> Image.Image:
    """The image decoded as RGB, refused before decoding when its header claims too many pixels.

    Pillow only warns between its limit and twice the limit and would then allocate and
    decode the whole image (a few hundred MB per image, several images at once in
    `check_rows`'s threads).
    """
    limit = Image.MAX_IMAGE_PIXELS
    width, height = img.size
    if limit is not None and width * height > limit:
        raise ImageTooLarge(
            f"{width}×{height} = {width * height} pixels, over Pillow's limit of {limit} "
            "(a decompression bomb, or far larger than training needs); scale it down"
        )
    img.load()
    return img.convert("RGB")


@dataclass(frozen=True)
class PairRow:
    """One training example as found in the data, before any check."""

    where: str  # e.g. "metadata.jsonl line 7": how a person finds the row
    instruction: str
    input_image: ImageRef | None
    edited_image: ImageRef | None
    input_caption: str | None = None
    output_caption: str | None = None
    parse_problem: str | None = None  # a row that could not even be read


@dataclass(frozen=True)
class BadRow:
    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclass
class PairData:
    """The rows of one data source, with a description of where they came from."""

    source: str
    format: str
    rows: list[PairRow]

    def __len__(self) -> int:
        return len(self.rows)


# --------------------------------------------------------------------------------------
# Reading the formats


def detect_format(data: str | Path) -> str:
    path = Path(data)
    if path.is_dir():
        if (path / "seeds.json").is_file():
            return "generated"
        if (path / "metadata.jsonl").is_file():
            return "pairs"
        if any(
            (path / name).is_file()
            for name in ("dataset_info.json", "dataset_dict.json", "state.json")
        ):
            return "hf"
        raise DataError(
            f"{path} is neither a pairs folder (needs metadata.jsonl), the paper's generated "
            "layout (needs seeds.json) nor a saved Hugging Face dataset (needs dataset_info.json "
            "or dataset_dict.json); see docs/training.md for the formats",
            field="data",
        )
    if path.exists():
        raise DataError(
            f"{path} is a file; pass the folder that holds metadata.jsonl", field="data"
        )
    if "/" in str(data) and not str(data).startswith((".", "/")) and str(data).count("/") == 1:
        return "hf"  # looks like a hub dataset name: owner/name
    raise DataError(f"data folder not found: {path}", field="data")


def load_pairs(
    data: str | Path,
    *,
    format: str = "auto",
    columns: Columns | None = None,
    split: str = "train",
) -> PairData:
    """Read the rows of a data source (no image is opened here; see `check_rows`)."""
    columns = columns or Columns()
    if format not in FORMATS:
        raise DataError(
            f"unknown data format {format!r}; use one of {', '.join(FORMATS)}", field="format"
        )
    kind = detect_format(data) if format == "auto" else format
    if kind == "generated" and split not in SPLITS:
        raise DataError(
            f"unknown split {split!r} for the generated layout; use one of {', '.join(SPLITS)}",
            field="split",
        )
    if kind == "pairs":
        return PairData(str(data), kind, _read_pairs_folder(Path(data), columns))
    if kind == "generated":
        return PairData(str(data), kind, _read_generated(Path(data), split))
    return PairData(str(data), kind, _read_hf(str(data), columns, split))


def _read_pairs_folder(root: Path, columns: Columns) -> list[PairRow]:
    metadata = root / "metadata.jsonl"
    if not metadata.is_file():
        raise DataError(f"{metadata} not found: a pairs folder needs metadata.jsonl", field="data")
    with metadata.open("rb") as head:
        start = head.read(4)
    if start[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(
            f'{metadata} is UTF-16 text (e.g. Notepad\'s "Unicode"); save it as UTF-8',
            field="data",
        )
    rows: list[PairRow] = []
    # Undecodable bytes become surrogates, so one bad line is a bad row instead of stopping
    # the whole read with a UnicodeDecodeError.
    with metadata.open(encoding="utf-8", errors="surrogateescape") as lines:
        for number, line in enumerate(lines, start=1):
            where = f"metadata.jsonl line {number}"
            if number == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark (Windows editors)
            if not line.strip():
                continue
            not_utf8 = _not_utf8(line)
            if not_utf8:
                rows.append(PairRow(where, "", None, None, parse_problem=not_utf8))
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                rows.append(
                    PairRow(where, "", None, None, parse_problem=f"not valid JSON ({err.msg})")
                )
                continue
            if not isinstance(entry, dict):
                rows.append(PairRow(where, "", None, None, parse_problem="not a JSON object"))
                continue
            missing = [
                key
                for key in (columns.input_image, columns.edit_prompt, columns.edited_image)
                if key not in entry
            ]
            if missing:
                rows.append(
                    PairRow(
                        where, "", None, None, parse_problem=f"missing key(s) {', '.join(missing)}"
                    )
                )
                continue
            rows.append(
                PairRow(
                    where=where,
                    instruction=str(entry[columns.edit_prompt] or ""),
                    input_image=ImageRef(path=root / str(entry[columns.input_image])),
                    edited_image=ImageRef(path=root / str(entry[columns.edited_image])),
                    input_caption=entry.get(columns.input_caption),
                    output_caption=entry.get(columns.output_caption),
                )
            )
    return rows


def _not_utf8(line: str) -> str | None:
    """What is wrong with a line read with errors="surrogateescape", or None if it was UTF-8."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as err:
        byte = ord(line[err.start]) - 0xDC00  # surrogateescape maps byte b to U+DC00 + b
        return (
            f"not UTF-8 text (byte 0x{byte:02x} at character {err.start + 1}); "
            "save metadata.jsonl as UTF-8"
        )
    return None


def split_range(count: int, split: str) -> range:
    """The paper's split of seeds.json: the first 90 % train, then 5 % val, 5 % test."""
    if split == "all":
        return range(count)
    train_end = math.floor(count * GENERATED_SPLIT_FRACTIONS[0])
    val_end = math.floor(count * (GENERATED_SPLIT_FRACTIONS[0] + GENERATED_SPLIT_FRACTIONS[1]))
    return {
        "train": range(0, train_end),
        "val": range(train_end, val_end),
        "test": range(val_end, count),
    }[split]


def _read_generated(root: Path, split: str) -> list[PairRow]:
    try:
        seeds = json.loads((root / "seeds.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON, or not UTF-8
        raise DataError(f"cannot read {root / 'seeds.json'}: {err}", field="data") from err
    if not isinstance(seeds, list):
        raise DataError(f"{root / 'seeds.json'} must be a list of [folder, [seeds…]]", field="data")
    rows: list[PairRow] = []
    for number in split_range(len(seeds), split):
        entry = seeds[number]
        where = f"seeds.json entry {number}"
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)):
            rows.append(PairRow(where, "", None, None, parse_problem="expected [folder, [seeds…]]"))
            continue
        name, entry_seeds = str(entry[0]), entry[1]
        folder = root / name
        prompt_file = folder / "prompt.json"
        try:
            prompt = json.loads(prompt_file.read_text(encoding="utf-8"))
            instruction = str(prompt.get("edit") or "")
        except (OSError, ValueError, AttributeError) as err:  # ValueError: bad JSON, not UTF-8
            rows.append(
                PairRow(
                    f"{where} ({name})",
                    "",
                    None,
                    None,
                    parse_problem=f"cannot read {prompt_file}: {err}",
                )
            )
            continue
        for seed in entry_seeds:
            rows.append(
                PairRow(
                    where=f"{where} ({name}, seed {seed})",
                    instruction=instruction,
                    input_image=ImageRef(path=folder / f"{seed}_0.jpg"),
                    edited_image=ImageRef(path=folder / f"{seed}_1.jpg"),
                    input_caption=prompt.get("input"),
                    output_caption=prompt.get("output"),
                )
            )
    return rows


class _DatasetCell:
    """A picklable pointer to one image cell (data-loader workers may be spawned processes)."""

    def __init__(self, dataset: Any, row: int, column: str) -> None:
        self.dataset, self.row, self.column = dataset, row, column

    def __call__(self) -> Any:
        return self.dataset[self.row][self.column]


def _read_hf(name: str, columns: Columns, split: str) -> list[PairRow]:
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            "reading a Hugging Face dataset needs the `datasets` package: pip install datasets",
            field="data",
        ) from err
    try:
        if Path(name).is_dir():
            loaded = datasets.load_from_disk(name)
        else:
            loaded = datasets.load_dataset(name)
    except Exception as err:  # datasets raises many types (FileNotFoundError, ConnectionError, …)
        raise DataError(
            f"no data folder {name!r} and no Hugging Face dataset of that name could be loaded "
            f"({err}); check the path, or the dataset name and your network/cache",
            field="data",
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"dataset {name!r} has no split {split!r}; it has {', '.join(loaded)}",
                field="split",
            )
        loaded = loaded[split]
    missing = [
        c
        for c in (columns.input_image, columns.edit_prompt, columns.edited_image)
        if c not in loaded.column_names
    ]
    if missing:
        raise DataError(
            f"dataset {name!r} has no column(s) {', '.join(missing)}; its columns are "
            f"{', '.join(loaded.column_names)}. Name yours with --input-column, "
            "--instruction-column and --edited-column",
            field="data",
        )
    instructions = loaded[columns.edit_prompt]
    has_captions = (
        columns.input_caption in loaded.column_names
        and columns.output_caption in loaded.column_names
    )
    # One-column views, so reading an image cell decodes that image only, not the whole row.
    input_view = loaded.select_columns([columns.input_image])
    edited_view = loaded.select_columns([columns.edited_image])
    in_captions = loaded[columns.input_caption] if has_captions else [None] * len(loaded)
    out_captions = loaded[columns.output_caption] if has_captions else [None] * len(loaded)

    return [
        PairRow(
            where=f"row {row}",
            instruction=str(instructions[row] or ""),
            input_image=ImageRef(
                loader=_DatasetCell(input_view, row, columns.input_image),
                label=f"row {row} {columns.input_image}",
            ),
            edited_image=ImageRef(
                loader=_DatasetCell(edited_view, row, columns.edited_image),
                label=f"row {row} {columns.edited_image}",
            ),
            input_caption=in_captions[row],
            output_caption=out_captions[row],
        )
        for row in range(len(loaded))
    ]


# --------------------------------------------------------------------------------------
# Checking


def check_row(row: PairRow) -> list[str]:
    """Every problem with one row: missing file, unreadable image, size mismatch, no instruction."""
    if row.parse_problem:
        return [row.parse_problem]
    problems: list[str] = []
    if not row.instruction.strip():
        problems.append("empty instruction")
    sizes: dict[str, tuple[int, int]] = {}
    for role, ref in (("input image", row.input_image), ("edited image", row.edited_image)):
        assert ref is not None
        if ref.path is not None and not ref.path.is_file():
            problems.append(f"{role} not found: {ref.describe()}")
            continue
        try:
            sizes[role] = ref.open().size
        except ImageTooLarge as err:
            problems.append(f"{role} too large: {ref.describe()} ({err})")
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            problems.append(f"{role} unreadable or corrupt: {ref.describe()} ({err})")
    if len(sizes) == 2 and sizes["input image"] != sizes["edited image"]:
        (iw, ih), (ew, eh) = sizes["input image"], sizes["edited image"]
        problems.append(f"size mismatch: input image is {iw}×{ih}, edited image is {ew}×{eh}")
    return problems


def check_rows(
    rows: Sequence[PairRow], *, workers: int = 4, progress: Callable[[int], None] | None = None
) -> list[BadRow]:
    """Check every row (in parallel threads: image decoding releases the GIL); report in order."""
    bad: list[BadRow] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for row, problems in zip(rows, pool.map(check_row, rows), strict=True):
            bad.extend(BadRow(row.where, problem) for problem in problems)
            if progress:
                progress(1)
    return bad


def drop_bad_rows(rows: Sequence[PairRow], bad: Sequence[BadRow]) -> list[PairRow]:
    bad_places = {b.where for b in bad}
    return [row for row in rows if row.where not in bad_places]


# --------------------------------------------------------------------------------------
# Order and augmentation: deterministic functions of (seed, position) so a resumed run
# sees exactly the batches an uninterrupted one would have seen.


class EpochShuffle:
    """An endless stream of row indices: epoch e is a permutation seeded by (seed, e).

    Position p of the stream is row `permutation(seed, p // n)[p % n]`, so any position can
    be found without replaying the ones before it (that is what makes resuming exact).
    """

    def __init__(self, count: int, seed: int) -> None:
        if count <= 0:
            raise DataError("no usable training rows", field="data")
        self.count = count
        self.seed = seed
        self._epoch = -1
        self._order: list[int] = []

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.count)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.count, generator=generator).tolist()
            self._epoch = epoch
        return self._order[offset]


class StreamBatchSampler:
    """Yields this process's share of each global batch, starting at micro-batch `start`.

    Global micro-batch k covers stream positions [k·B·W, (k+1)·B·W) for batch size B and
    W processes; process r takes [k·B·W + r·B, k·B·W + (r+1)·B).
    """

    def __init__(self, batch_size: int, world_size: int = 1, rank: int = 0, start: int = 0) -> None:
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.start = start

    def __iter__(self) -> Iterator[list[int]]:
        k = self.start
        while True:
            first = (k * self.world_size + self.rank) * self.batch_size
            yield list(range(first, first + self.batch_size))
            k += 1


def paired_transform(
    input_image: Image.Image,
    edited_image: Image.Image,
    resolution: int,
    rng: np.random.Generator,
    *,
    random_flip: bool = True,
    random_crop: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize both to `resolution` on the short side, then the SAME crop and flip on both."""
    if input_image.size != edited_image.size:
        edited_image = edited_image.resize(input_image.size, Image.Resampling.BICUBIC)
    width, height = input_image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    tensors = []
    if random_crop:
        left = int(rng.integers(0, new_size[0] - resolution + 1))
        top = int(rng.integers(0, new_size[1] - resolution + 1))
    else:
        left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    flip = random_flip and bool(rng.random() < 0.5)
    for img in (input_image, edited_image):
        if img.size != new_size:
            img = img.resize(new_size, Image.Resampling.BICUBIC)
        img = img.crop((left, top, left + resolution, top + resolution))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        tensors.append(torch.from_numpy(array).permute(2, 0, 1).contiguous())
    return tensors[0], tensors[1]


class PairDataset(torch.utils.data.Dataset):
    """Maps a stream position (from `StreamBatchSampler`) to an augmented training pair."""

    def __init__(
        self,
        rows: Sequence[PairRow],
        resolution: int,
        seed: int,
        *,
        random_flip: bool = True,
        random_crop: bool = True,
    ) -> None:
        self.rows = list(rows)
        self.order = EpochShuffle(len(self.rows), seed)
        self.resolution = resolution
        self.seed = seed
        self.random_flip = random_flip
        self.random_crop = random_crop

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        row = self.rows[self.order.index_at(position)]
        assert row.input_image is not None and row.edited_image is not None
        rng = np.random.default_rng([self.seed, position])
        source, target = paired_transform(
            row.input_image.open(),
            row.edited_image.open(),
            self.resolution,
            rng,
            random_flip=self.random_flip,
            random_crop=self.random_crop,
        )
        return {"input_pixels": source, "edited_pixels": target, "instruction": row.instruction}


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "input_pixels": torch.stack([i["input_pixels"] for i in items]),
        "edited_pixels": torch.stack([i["edited_pixels"] for i in items]),
        "instruction": [i["instruction"] for i in items],
    }
