"""Fine-tuning a causal LM on seed triplets in the paper's format (loss on the completion only).

prompt = caption + "\\n##\\n", completion = edit + "\\n%%\\n" + edited caption + "\\nEND".
LoRA (peft) by default; `full=True` trains every weight. The loop runs under accelerate, so
mixed precision and several GPUs work with `accelerate launch` unchanged.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import InvalidInput

from .text_format import format_completion, format_prompt
from .text_generation import SeedExample

IGNORE_INDEX = -100  # label value the transformers loss skips


@dataclass
class FinetuneSettings:
    epochs: int = 10
    batch_size: int = 8
    learning_rate: float = 1e-4
    lora: bool = True
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None  # None: peft's default for the architecture
    max_length: int = 256
    seed: int = 0
    mixed_precision: str = "no"


def tokenize_example(tokenizer: Any, example: SeedExample, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels with the prompt masked, so only the completion is learned.

    The prompt is tokenized on its own (with the tokenizer's special tokens, as at sampling
    time) and the completion appended; the boundary is therefore exact for any tokenizer.
    """
    prompt_ids = tokenizer(format_prompt(example.input), add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(
        format_completion(example.edit, example.output), add_special_tokens=False
    )["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids = [*completion_ids, tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def collate(batch: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"])
        labels[row, :n] = torch.tensor(item["labels"])
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def finetune(
    model_name: str,
    examples: Sequence[SeedExample],
    output: Path,
    settings: FinetuneSettings,
    log: Any = print,
) -> dict[str, Any]:
    """Train and save a self-contained model folder (LoRA merged in) plus the tokenizer."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_constant_schedule

    if output.exists() and any(output.iterdir()):
        raise InvalidInput(
            f"--output {output} is not empty; give a new folder so nothing is overwritten", "output"
        )
    if not examples:
        raise InvalidInput("no seed triplets to train on", "seed_data")
    accelerator = Accelerator(mixed_precision=settings.mixed_precision)
    torch.manual_seed(settings.seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        model = AutoModelForCausalLM.from_pretrained(model_name)
    except (OSError, ValueError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise InvalidInput(
            f"cannot load the language model {model_name!r}: {first_line}. Pass --model with a "
            "transformers causal LM id (cached or downloadable) or a local folder",
            "model",
        ) from err
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    if pad_id is None:
        raise InvalidInput(
            f"the tokenizer of {model_name!r} has neither a pad nor an EOS token", "model"
        )

    if settings.lora:
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=settings.lora_rank,
            lora_alpha=settings.lora_alpha,
            lora_dropout=settings.lora_dropout,
            target_modules=settings.lora_target_modules,
        )
        try:
            model = get_peft_model(model, config)
        except ValueError as err:
            raise InvalidInput(
                f"LoRA cannot find target modules in {model_name!r} ({err}); name them with "
                "--lora-target-modules (e.g. q_proj v_proj) or use --full",
                "lora_target_modules",
            ) from err
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"training {trainable:,} of {total:,} parameters ({'LoRA' if settings.lora else 'full'})")

    encoded = [tokenize_example(tokenizer, e, settings.max_length) for e in examples]
    order_rng = random.Random(settings.seed)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate
    )
    scheduler = get_constant_schedule(optimizer)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    # Each process takes its own slice of a global batch (wrapping round at the end of an
    # epoch so every process always has a full batch and DDP steps stay in lockstep).
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = settings.batch_size * world
    steps_per_epoch = math.ceil(len(encoded) / global_batch)
    losses: list[float] = []
    for epoch in range(settings.epochs):
        order = list(range(len(encoded)))
        order_rng.shuffle(order)
        epoch_losses = []
        for step in range(steps_per_epoch):
            start = step * global_batch + rank * settings.batch_size
            indices = [order[(start + j) % len(order)] for j in range(settings.batch_size)]
            batch = collate([encoded[i] for i in indices], pad_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            epoch_losses.append(float(loss.detach()))
        losses.append(sum(epoch_losses) / len(epoch_losses))
        log(f"epoch {epoch + 1}/{settings.epochs}: loss {losses[-1]:.4f}")

    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    if settings.lora:
        model = model.merge_and_unload()  # a plain model folder: any transformers loader reads it
    summary = {
        "model": model_name,
        "examples": len(encoded),
        "epoch_losses": losses,
        **asdict(settings),
    }
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output, safe_serialization=True)
        tokenizer.save_pretrained(output)
        (output / "finetune_text.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
