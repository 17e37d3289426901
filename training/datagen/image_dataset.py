"""Filling the paper's generated-dataset layout with before/after pairs, resumably and in shards.

Layout (what `training.data` reads as format ``generated``)::

    OUTPUT/
      generation_config.json   settings every process and every resumed run must share
      seeds.json               [[folder, [seed, ...]], ...]: folders with kept samples, sorted
      splits.json              {"train": [...], "val": [...], "test": [...]}: folder names,
                               the paper's 0.9/0.05/0.05 cut of seeds.json, in order
      0000000/
        prompt.json            {"input": ..., "edit": ..., "output": ...}
        {seed}_0.jpg           before (input caption)
        {seed}_1.jpg           after (edited caption)
        metadata.jsonl         one line per TRIED sample: seed, p2p_threshold, cfg_scale,
                               clip_sim_0/1/dir/image, passed_filter, kept

Folder `{i:07d}` belongs to line i of the prompts file. A folder is written under a temporary
name and renamed when complete, so any folder with its final name is finished: a restarted
run skips it, and a crash leaves only a `.tmp-…` folder that its owner redoes. Pair i belongs
to shard i mod n, and its seeds depend only on (base seed, i), so any number of processes
fill one dataset without overlap and produce what one uninterrupted run would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput

from .clip_filter import ClipScores, ClipSimilarity, ClipThresholds, TopK
from .prompt_to_prompt import PairGenerator, draw_sample_params, pair_seeds

CONFIG_FILE = "generation_config.json"
SEEDS_FILE = "seeds.json"
SPLITS_FILE = "splits.json"
PROMPT_FILE = "prompt.json"
METADATA_FILE = "metadata.jsonl"
_FOLDER_NAME = re.compile(r"^\d{7}$")
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Triplet:
    input: str
    edit: str
    output: str

    def as_dict(self) -> dict[str, str]:
        return {"input": self.input, "edit": self.edit, "output": self.output}


def read_triplets(path: str | Path) -> list[Triplet]:
    """A JSONL file of {"input", "edit", "output"} (what `generate-text` writes)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"prompts file not found: {path}", "prompts")
    triplets: list[Triplet] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                raise InvalidInput(
                    f"{path} line {number} is empty; folder numbers follow line numbers, so "
                    "remove blank lines (or give every line a triplet)",
                    "prompts",
                )
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise InvalidInput(
                    f"{path} line {number} is not valid JSON ({err.msg})", "prompts"
                ) from err
            if not isinstance(entry, dict):
                raise InvalidInput(f"{path} line {number} must be a JSON object", "prompts")
            values = {key: entry.get(key) for key in ("input", "edit", "output")}
            bad = [
                key
                for key, value in values.items()
                if not isinstance(value, str) or not value.strip()
            ]
            if bad:
                raise InvalidInput(
                    f"{path} line {number} needs non-empty text for {', '.join(bad)} "
                    '(each line: {"input": caption, "edit": instruction, "output": edited caption})',
                    "prompts",
                )
            triplets.append(
                Triplet(values["input"].strip(), values["edit"].strip(), values["output"].strip())
            )  # type: ignore[union-attr]
    return triplets


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise InvalidInput(
                f"shard {self.index}/{self.count} is impossible: use i/n with 0 <= i < n", "shard"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise InvalidInput(f"--shard must look like i/n (e.g. 0/4), got {text!r}", "shard")
        return cls(int(match.group(1)), int(match.group(2)))

    def within(self, process_index: int, process_count: int) -> Shard:
        """Split this shard further over `process_count` processes (e.g. `accelerate launch`)."""
        return Shard(self.index * process_count + process_index, self.count * process_count)

    def owns(self, pair_index: int) -> bool:
        return pair_index % self.count == self.index


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides what a folder contains; stored in generation_config.json."""

    model: str
    clip_model: str
    samples_per_pair: int = 100
    keep: int = 4
    steps: int = 100
    resolution: int = 512
    p2p_range: tuple[float, float] = (0.1, 0.9)
    cfg_range: tuple[float, float] = (7.5, 15.0)
    thresholds: ClipThresholds = field(default_factory=ClipThresholds)
    base_seed: int = 0
    scheduler: str = "euler_a"
    jpeg_quality: int = 100

    def __post_init__(self) -> None:
        if self.samples_per_pair < 1:
            raise InvalidInput("--samples-per-pair must be at least 1", "samples_per_pair")
        if self.keep < 1:
            raise InvalidInput("--keep must be at least 1", "keep")
        for name, (low, high) in (("p2p", self.p2p_range), ("cfg", self.cfg_range)):
            if low > high:
                raise InvalidInput(f"--{name}-min ({low}) is above --{name}-max ({high})", name)
        if not 0 <= self.p2p_range[0] <= self.p2p_range[1] <= 1:
            raise InvalidInput("the prompt-to-prompt fraction range must lie within [0, 1]", "p2p")
        if not 1 <= self.jpeg_quality <= 100:
            raise InvalidInput("--jpeg-quality must be within 1..100", "jpeg_quality")

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["p2p_range"] = list(self.p2p_range)
        data["cfg_range"] = list(self.cfg_range)
        return data


def prepare_output(output: Path, settings: GenerationSettings) -> None:
    """Create OUTPUT or check it is a dataset made with the same settings.

    Refuses a non-empty folder that is not ours: nothing the user made is written over.
    """
    wanted = settings.as_json()
    config_path = output / CONFIG_FILE
    if output.exists() and not output.is_dir():
        raise InvalidInput(f"--output {output} is a file; give a folder", "output")
    output.mkdir(parents=True, exist_ok=True)
    if not config_path.exists():
        others = [p.name for p in output.iterdir() if not p.name.startswith(_TMP_PREFIX)]
        if others:
            raise InvalidInput(
                f"--output {output} is not empty and has no {CONFIG_FILE}, so it is not a dataset "
                "this command started; give a new or empty folder",
                "output",
            )
        try:  # exclusive create: of several processes starting together, one writes it
            with open(config_path, "x", encoding="utf-8") as handle:
                json.dump(wanted, handle, indent=2)
            return
        except FileExistsError:
            pass
    for _ in range(50):  # another process may be writing it right now
        try:
            existing = json.loads(config_path.read_text(encoding="utf-8"))
            break
        except json.JSONDecodeError:
            time.sleep(0.1)
    else:
        raise InvalidInput(f"{config_path} is not valid JSON; fix or delete it", "output")
    differences = sorted(
        key for key in set(wanted) | set(existing) if wanted.get(key) != existing.get(key)
    )
    if differences:
        detail = ", ".join(
            f"{k}: {existing.get(k)!r} there, {wanted.get(k)!r} now" for k in differences
        )
        raise InvalidInput(
            f"--output {output} was started with other settings ({detail}); resume with the same "
            "settings or write to a new folder",
            "output",
        )


def folder_name(pair_index: int) -> str:
    return f"{pair_index:07d}"


def is_complete(output: Path, pair_index: int) -> bool:
    return (output / folder_name(pair_index) / METADATA_FILE).is_file()


def _check_prompt_unchanged(folder: Path, triplet: Triplet) -> None:
    try:
        stored = json.loads((folder / PROMPT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return
    if stored != triplet.as_dict():
        raise InvalidInput(
            f"{folder / PROMPT_FILE} holds {stored!r} but that line of the prompts file now reads "
            f"{triplet.as_dict()!r}: the prompts file changed since this dataset was started. "
            "Only append new lines to it, or write to a new --output folder",
            "prompts",
        )


@dataclass
class PairOutcome:
    pair_index: int
    tried: int
    passed: int
    kept_seeds: list[int]
    seconds: float


def generate_pair_folder(
    output: Path,
    pair_index: int,
    triplet: Triplet,
    generator: PairGenerator,
    clip: ClipSimilarity,
    settings: GenerationSettings,
    on_sample: Callable[[], None] | None = None,
) -> PairOutcome:
    """Generate, score and filter one caption pair's samples and write its folder atomically."""
    started = time.perf_counter()
    final = output / folder_name(pair_index)
    work = output / f"{_TMP_PREFIX}{folder_name(pair_index)}"
    if final.exists():  # not made by us (ours appear complete, all at once): keep it
        raise InvalidInput(
            f"{final} exists but is incomplete (no {METADATA_FILE}); move it away to regenerate it",
            "output",
        )
    if work.exists():  # left by a crashed run of the shard that owns this pair
        shutil.rmtree(work)
    work.mkdir()
    (work / PROMPT_FILE).write_text(
        json.dumps(triplet.as_dict(), ensure_ascii=False), encoding="utf-8"
    )

    captions = (triplet.input, triplet.output)
    sd_embeddings = generator.encode_captions(captions)
    clip_text = clip.text_embeddings(captions)
    top: TopK[tuple[int, Any, Any]] = TopK(settings.keep, settings.thresholds)
    rows: list[dict[str, Any]] = []
    for seed in pair_seeds(settings.base_seed, pair_index, settings.samples_per_pair):
        params = draw_sample_params(seed, settings.p2p_range, settings.cfg_range)
        image_0, image_1 = generator.generate(captions, params, sd_embeddings)
        scores: ClipScores = clip.pair_scores(image_0, image_1, clip_text)
        passed = top.offer((seed, image_0, image_1), scores)
        rows.append(
            {
                "seed": seed,
                "p2p_threshold": params.p2p_threshold,
                "cfg_scale": params.cfg_scale,
                **scores.as_dict(),
                "passed_filter": passed,
            }
        )
        if on_sample:
            on_sample()

    kept = top.best()
    for seed, image_0, image_1 in kept:
        image_0.save(work / f"{seed}_0.jpg", quality=settings.jpeg_quality)
        image_1.save(work / f"{seed}_1.jpg", quality=settings.jpeg_quality)
    kept_seeds = [seed for seed, _, _ in kept]
    with open(work / METADATA_FILE, "w", encoding="utf-8") as handle:
        for row in rows:
            row["kept"] = row["seed"] in kept_seeds
            handle.write(json.dumps(row) + "\n")
    os.replace(work, final)
    return PairOutcome(pair_index, len(rows), top.passed, kept_seeds, time.perf_counter() - started)


def pending_pairs(
    output: Path, triplets: Sequence[Triplet], shard: Shard, limit: int | None = None
) -> list[int]:
    """This shard's pair indices still to do (finished folders are checked, then skipped)."""
    todo: list[int] = []
    for index, triplet in enumerate(triplets):
        if not shard.owns(index):
            continue
        if is_complete(output, index):
            _check_prompt_unchanged(output / folder_name(index), triplet)
            continue
        todo.append(index)
        if limit is not None and len(todo) >= limit:
            break
    return todo


def _kept_seeds(folder: Path) -> list[int]:
    """Kept seeds of a finished folder, best directional similarity first."""
    kept: list[tuple[float, int]] = []
    with open(folder / METADATA_FILE, encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            if row.get("kept"):
                kept.append((row["clip_sim_dir"], row["seed"]))
    return [seed for _, seed in sorted(kept, key=lambda item: -item[0])]


@dataclass
class DatasetSummary:
    folders_done: int
    folders_with_pairs: int
    samples_tried: int
    samples_passed: int
    pairs_kept: int

    @property
    def pass_rate(self) -> float:
        return self.samples_passed / self.samples_tried if self.samples_tried else 0.0


def finalize(output: Path) -> DatasetSummary:
    """(Re)write seeds.json and splits.json from the finished folders; safe to run any time.

    Each process writes through a temporary file and an atomic rename, so concurrent shards
    never leave a torn file; the last one to finish writes the complete list.
    """
    from training.data import split_range  # the training package's own cut, so both agree

    entries: list[list[Any]] = []
    tried = passed = kept = done = 0
    for folder in sorted(output.iterdir()):
        if not (
            folder.is_dir()
            and _FOLDER_NAME.match(folder.name)
            and (folder / METADATA_FILE).is_file()
        ):
            continue
        done += 1
        with open(folder / METADATA_FILE, encoding="utf-8") as lines:
            for line in lines:
                row = json.loads(line)
                tried += 1
                passed += bool(row.get("passed_filter"))
        seeds = _kept_seeds(folder)
        kept += len(seeds)
        if seeds:
            entries.append([folder.name, seeds])
    names = [name for name, _ in entries]
    splits = {
        split: [names[i] for i in split_range(len(names), split)]
        for split in ("train", "val", "test")
    }
    _write_json_atomically(output / SEEDS_FILE, entries)
    _write_json_atomically(output / SPLITS_FILE, splits)
    return DatasetSummary(done, len(entries), tried, passed, kept)


def _write_json_atomically(path: Path, data: Any) -> None:
    temporary = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(data), encoding="utf-8")
    os.replace(temporary, path)


def run_shard(
    output: Path,
    triplets: Sequence[Triplet],
    pair_indices: Iterable[int],
    generator: PairGenerator,
    clip: ClipSimilarity,
    settings: GenerationSettings,
    on_pair: Callable[[PairOutcome], None] | None = None,
    on_sample: Callable[[], None] | None = None,
) -> list[PairOutcome]:
    outcomes = []
    for index in pair_indices:
        outcome = generate_pair_folder(
            output, index, triplets[index], generator, clip, settings, on_sample
        )
        outcomes.append(outcome)
        if on_pair:
            on_pair(outcome)
    return outcomes
