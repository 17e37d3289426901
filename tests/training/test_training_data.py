"""Data formats, row checks, deterministic order and paired augmentation."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.cli import main
from training.data import (
    Columns,
    DataError,
    EpochShuffle,
    PairDataset,
    StreamBatchSampler,
    check_rows,
    load_pairs,
    paired_transform,
    split_range,
)
from training.train_loop import conditioning_dropout_masks


def break_some_rows(folder: Path) -> None:
    """Rows 2..6 of metadata.jsonl get one problem each (row 1 stays good)."""
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    (folder / "1_out.png").unlink()  # line 2: missing file
    (folder / "2_in.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # line 3: corrupt
    Image.new("RGB", (32, 24)).save(folder / "3_out.png")  # line 4: size mismatch
    row = json.loads(lines[4])
    row["edit_prompt"] = "   "  # line 5: empty instruction
    lines[4] = json.dumps(row)
    lines[5] = "{not json"  # line 6
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def test_pairs_folder_rows_and_captions(pairs_dir: Path) -> None:
    pairs = load_pairs(pairs_dir)
    assert pairs.format == "pairs" and len(pairs) == 6
    first = pairs.rows[0]
    assert first.where == "metadata.jsonl line 1"
    assert first.instruction == "make it red"
    assert first.input_image is not None and first.input_image.path == pairs_dir / "0_in.png"
    assert first.output_caption == "a red noisy picture"
    assert check_rows(pairs.rows) == []


def test_every_bad_row_is_reported_with_its_line(pairs_dir: Path) -> None:
    break_some_rows(pairs_dir)
    bad = check_rows(load_pairs(pairs_dir).rows)
    by_line = {b.where: b.problem for b in bad}
    assert set(by_line) == {f"metadata.jsonl line {n}" for n in (2, 3, 4, 5, 6)}
    assert "edited image not found" in by_line["metadata.jsonl line 2"]
    assert "unreadable or corrupt" in by_line["metadata.jsonl line 3"]
    assert (
        "size mismatch" in by_line["metadata.jsonl line 4"]
        and "32×24" in by_line["metadata.jsonl line 4"]
    )
    assert by_line["metadata.jsonl line 5"] == "empty instruction"
    assert "not valid JSON" in by_line["metadata.jsonl line 6"]


def test_check_data_command_reports_and_never_writes(
    pairs_dir: Path, capsys: pytest.CaptureFixture[str], fingerprint: Callable
) -> None:
    break_some_rows(pairs_dir)
    before = fingerprint(pairs_dir)
    assert main(["check-data", str(pairs_dir)]) == 1
    out = capsys.readouterr().out
    for n in (2, 3, 4, 5, 6):
        assert f"metadata.jsonl line {n}:" in out
    assert "1 usable rows, 5 bad" in out
    assert main(["check-data", str(pairs_dir), "--skip-bad"]) == 0
    assert fingerprint(pairs_dir) == before


def test_check_data_on_a_clean_folder_passes(
    pairs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-data", str(pairs_dir)]) == 0
    assert "6 usable rows, 0 bad" in capsys.readouterr().out


def test_unknown_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"metadata\.jsonl"):
        load_pairs(tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_pairs(tmp_path / "nowhere")


def write_generated(root: Path, pairs: int = 20, seeds: tuple[int, ...] = (11, 42)) -> Path:
    """The paper's layout: seeds.json + {i:07d}/prompt.json, {seed}_0.jpg, {seed}_1.jpg."""
    root.mkdir(parents=True)
    entries = []
    for i in range(pairs):
        folder = root / f"{i:07d}"
        folder.mkdir()
        prompt = {"input": f"a photo {i}", "edit": f"make it red {i}", "output": f"a red photo {i}"}
        (folder / "prompt.json").write_text(json.dumps(prompt))
        for seed in seeds:
            Image.new("RGB", (24, 24), (i, 0, 0)).save(folder / f"{seed}_0.jpg")
            Image.new("RGB", (24, 24), (255, 0, 0)).save(folder / f"{seed}_1.jpg")
        (folder / "metadata.jsonl").write_text(
            "\n".join(json.dumps({"seed": s}) for s in seeds) + "\n"
        )
        entries.append([folder.name, list(seeds)])
    (root / "seeds.json").write_text(json.dumps(entries))
    return root


def test_generated_layout_and_the_papers_split(tmp_path: Path) -> None:
    root = write_generated(tmp_path / "gen")
    train = load_pairs(root, split="train")
    assert train.format == "generated"
    assert len(train) == 18 * 2  # 90 % of 20 caption pairs, two seeds each
    row = train.rows[1]
    assert row.where == "seeds.json entry 0 (0000000, seed 42)"
    assert row.instruction == "make it red 0" and row.input_caption == "a photo 0"
    assert row.input_image is not None and row.input_image.path == root / "0000000" / "42_0.jpg"
    assert row.edited_image is not None and row.edited_image.path == root / "0000000" / "42_1.jpg"
    assert [len(load_pairs(root, split=s)) for s in ("val", "test", "all")] == [2, 2, 40]
    assert check_rows(train.rows) == []
    assert list(split_range(20, "test")) == [19]


def test_hugging_face_dataset_with_custom_columns(tmp_path: Path, fingerprint: Callable) -> None:
    datasets = pytest.importorskip("datasets")
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    gray = Image.new("RGB", (16, 16), (90, 90, 90))
    small = Image.new("RGB", (8, 8), (90, 90, 90))
    table = datasets.Dataset.from_dict(
        {"before": [gray, small], "what": ["make it red", "make it red"], "after": [red, red]},
        features=datasets.Features(
            {
                "before": datasets.Image(),
                "what": datasets.Value("string"),
                "after": datasets.Image(),
            }
        ),
    )
    table.save_to_disk(str(tmp_path / "hf"))
    before = fingerprint(tmp_path / "hf")
    with pytest.raises(DataError, match="no column"):
        load_pairs(tmp_path / "hf")
    pairs = load_pairs(tmp_path / "hf", columns=Columns("before", "what", "after"))
    assert pairs.format == "hf" and len(pairs) == 2
    bad = check_rows(pairs.rows)
    assert [(b.where, "size mismatch" in b.problem) for b in bad] == [("row 1", True)]
    dataset = PairDataset(pairs.rows[:1], resolution=16, seed=0)
    item = dataset[0]
    assert item["edited_pixels"][0].mean() == pytest.approx(1.0)  # red channel at +1
    assert fingerprint(tmp_path / "hf") == before


def test_order_is_a_permutation_per_epoch_and_reproducible() -> None:
    order = EpochShuffle(7, seed=3)
    epoch0 = [order.index_at(p) for p in range(7)]
    epoch1 = [order.index_at(p) for p in range(7, 14)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(7))
    assert epoch0 != epoch1
    # Any position can be asked for directly (what resuming does), in any order.
    fresh = EpochShuffle(7, seed=3)
    assert [fresh.index_at(p) for p in (13, 2, 9)] == [epoch1[6], epoch0[2], epoch1[2]]
    assert [EpochShuffle(7, seed=4).index_at(p) for p in range(7)] != epoch0


def test_batch_sampler_shards_global_batches_and_resumes() -> None:
    def take(sampler: StreamBatchSampler, n: int) -> list[list[int]]:
        batches = iter(sampler)
        return [next(batches) for _ in range(n)]

    rank0 = take(StreamBatchSampler(2, world_size=2, rank=0), 2)
    rank1 = take(StreamBatchSampler(2, world_size=2, rank=1), 2)
    assert rank0 == [[0, 1], [4, 5]] and rank1 == [[2, 3], [6, 7]]
    assert take(StreamBatchSampler(2, world_size=2, rank=1, start=1), 1) == [[6, 7]]


def test_paired_augmentation_crops_and_flips_both_images_alike() -> None:
    gradient = np.tile(np.arange(48, dtype=np.uint8)[None, :, None] * 5, (32, 1, 3))
    source = Image.fromarray(gradient)
    flips = set()
    for seed in range(12):
        a, b = paired_transform(source, source.copy(), 16, np.random.default_rng(seed))
        assert a.shape == (3, 16, 16) and torch.equal(a, b)
        assert a.min() >= -1 and a.max() <= 1
        flips.add(bool(a[0, 0, 0] > a[0, 0, -1]))  # a left-to-right ramp, reversed when flipped
    assert flips == {True, False}


def test_conditioning_dropout_uses_one_draw_per_sample() -> None:
    count = 200_000
    drop_text, drop_image = conditioning_dropout_masks(
        count, 0.05, torch.Generator().manual_seed(1)
    )
    r = torch.rand(count, generator=torch.Generator().manual_seed(1))  # the same single draw
    assert torch.equal(drop_text, r < 0.10) and torch.equal(drop_image, (r >= 0.05) & (r < 0.15))
    text_only = (drop_text & ~drop_image).float().mean().item()
    both = (drop_text & drop_image).float().mean().item()
    image_only = (drop_image & ~drop_text).float().mean().item()
    for share in (text_only, both, image_only):
        assert share == pytest.approx(0.05, abs=0.003)
