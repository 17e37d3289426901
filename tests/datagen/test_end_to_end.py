"""finetune-text → generate-text → generate-images → the training package reads and trains on it."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from datagen_helpers import TINY_RESOLUTION

from training.cli import main
from training.datagen.text_finetune import IGNORE_INDEX, tokenize_example
from training.datagen.text_format import format_completion, format_prompt
from training.datagen.text_generation import SeedExample, read_seed_examples

SEED_FILE = Path(__file__).resolve().parents[2] / "resources" / "seed_edits.jsonl"


def test_loss_is_on_the_completion_only(tiny_lm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    example = SeedExample("a cat on a mat", "make it a dog", "a dog on a mat")
    item = tokenize_example(tokenizer, example, max_length=256)
    masked = [label == IGNORE_INDEX for label in item["labels"]]
    prompt_length = masked.index(False)
    assert all(masked[:prompt_length]) and not any(masked[prompt_length:])
    assert tokenizer.decode(item["input_ids"][:prompt_length]) == format_prompt(example.input)
    learned = tokenizer.decode(item["labels"][prompt_length:], skip_special_tokens=True)
    assert learned == format_completion(example.edit, example.output)
    assert item["labels"][-1] == tokenizer.eos_token_id
    assert len(tokenize_example(tokenizer, example, max_length=10)["input_ids"]) == 10


def test_finetune_text_lora_trains_only_the_adapter_and_saves_a_plain_model(tiny_lm_dir, tmp_path):
    from safetensors.torch import load_file

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "".join(SEED_FILE.read_text(encoding="utf-8").splitlines(keepends=True)[:8]),
        encoding="utf-8",
    )
    out = tmp_path / "lm-lora"
    assert main(["finetune-text", "--seed-data", str(seeds), "--model", str(tiny_lm_dir), "--output", str(out),
                 "--epochs", "2", "--batch-size", "4", "--learning-rate", "1e-2"]) == 0  # fmt: skip
    summary = json.loads((out / "finetune_text.json").read_text())
    assert (
        summary["lora"] is True and summary["examples"] == 8 and len(summary["epoch_losses"]) == 2
    )
    before, after = (
        load_file(tiny_lm_dir / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert not any("lora" in key for key in after)  # merged: a plain transformers folder
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert changed and all("attn.c_attn" in k for k in changed)  # peft's GPT-2 default target
    # nothing is written over
    assert (
        main(
            [
                "finetune-text",
                "--seed-data",
                str(seeds),
                "--model",
                str(tiny_lm_dir),
                "--output",
                str(out),
            ]
        )
        == 2
    )


def test_captions_to_a_trainable_dataset(
    tiny_lm_dir, tiny_sd_dir, tiny_clip_dir, tiny_model_dir, tmp_path
):
    from training.data import load_pairs

    examples = read_seed_examples(SEED_FILE)[:4]
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(e.__dict__) + "\n" for e in examples), encoding="utf-8")
    # 1. a language model learns the format (a tiny one can only memorise: it is shown the
    #    captions it will be asked about, which is enough to exercise every stage for real)
    lm = tmp_path / "lm"
    assert main(["finetune-text", "--seed-data", str(seeds), "--model", str(tiny_lm_dir), "--output", str(lm),
                 "--full", "--learning-rate", "1e-2", "--epochs", "80", "--batch-size", "4"]) == 0  # fmt: skip
    # 2. captions → instructions + edited captions
    captions = tmp_path / "captions.txt"
    captions.write_text(
        "".join(e.input + "\n" for e in examples) + examples[0].input.upper() + "\n"
    )
    edits = tmp_path / "edits.jsonl"
    assert main(["generate-text", "--captions", str(captions), "--model", str(lm), "--output", str(edits),
                 "--device", "cpu", "--dtype", "fp32"]) == 0  # fmt: skip
    triplets = [json.loads(line) for line in edits.read_text().splitlines()]
    assert 2 <= len(triplets) <= 4  # the upper-case duplicate is done once
    expected = {e.input: (e.edit, e.output) for e in examples}
    assert all((t["edit"], t["output"]) == expected[t["input"]] for t in triplets)
    # 3. triplets → image pairs in the paper's layout
    dataset = tmp_path / "dataset"
    assert main(["generate-images", "--prompts", str(edits), "--output", str(dataset),
                 "--model", str(tiny_sd_dir), "--clip-model", str(tiny_clip_dir),
                 "--samples-per-pair", "2", "--keep", "1", "--steps", "2", "--resolution", str(TINY_RESOLUTION),
                 "--clip-threshold", "-1", "--clip-dir-threshold", "-1", "--clip-img-threshold", "-1",
                 "--device", "cpu", "--dtype", "fp32"]) == 0  # fmt: skip
    # 4. the training package reads it and trains on it
    rows = load_pairs(dataset, split="all").rows
    assert [r.instruction for r in rows] == [t["edit"] for t in triplets]
    out = tmp_path / "trained"
    assert main(["train", "--data", str(dataset), "--model", str(tiny_model_dir), "--output", str(out),
                 "--max-steps", "2", "--resolution", str(TINY_RESOLUTION), "--batch-size", "2",
                 "--lora-rank", "4", "--no-progress"]) == 0  # fmt: skip
    assert (out / "pytorch_lora_weights.safetensors").is_file()
