"""The deliverable of a run: the weights (EMA ones when kept), its settings and a model card."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from training.data import BadRow, PairRow
from training.ema import EMA
from training.objectives.base import Trainee


def export(
    config: Any,
    trainee: Trainee,
    denoiser: torch.nn.Module,
    trainable: list[torch.nn.Parameter],
    ema: EMA | None,
    rows: list[PairRow],
    bad: list[BadRow],
    step: int,
    main: bool,
) -> Path:
    """Write the result into `config.output`; returns the LoRA file or the model folder."""
    output = Path(config.output)
    if ema is not None:
        ema.swap_into(trainable)  # the paper samples with the EMA weights
    if trainee.use_lora:
        weights = output / "pytorch_lora_weights.safetensors"
        if main:
            trainee.save_lora(denoiser, output)
    else:
        weights = output
        if main:
            trainee.save_full(denoiser, output)
    if main:
        settings = {k: v for k, v in asdict(config).items() if k not in ("progress",)}
        settings["output"] = str(settings["output"])
        settings["columns"] = asdict(config.columns)
        settings["lora_rank"] = trainee.lora_rank
        settings["family"] = trainee.family
        (output / "training_config.json").write_text(
            json.dumps(settings, indent=2, default=str) + "\n"
        )
        (output / "README.md").write_text(model_card(config, trainee, rows, bad, step))
    return weights


def model_card(
    config: Any, trainee: Trainee, rows: list[PairRow], bad: list[BadRow], step: int
) -> str:
    info = trainee.card()
    effective_batch = config.batch_size * config.grad_accum
    pipeline = info.pipeline_class
    usage = (
        "Load it in the Krita plugin's LoRA list, or:\n\n"
        "```python\n"
        f"from diffusers import {pipeline}\n"
        f'pipe = {pipeline}.from_pretrained("{trainee.source}")\n'
        'pipe.load_lora_weights("pytorch_lora_weights.safetensors")\n'
        "```\n"
        if trainee.use_lora
        else "Use this folder as the model (`instruct-edit edit IMAGE -i TEXT --model THIS_FOLDER`), or:\n\n"
        "```python\n"
        f"from diffusers import {pipeline}\n"
        f'pipe = {pipeline}.from_pretrained("THIS_FOLDER")\n'
        "```\n"
    )
    tags = ", ".join([*info.tags, "image-editing", *(["lora"] if trainee.use_lora else [])])
    dropout = (
        f"- Conditioning dropout: {config.conditioning_dropout} text / both / image; "
        if trainee.family == "sd-ip2p"
        else "- "
    )
    return f"""---
base_model: {trainee.source}
library_name: diffusers
tags: [{tags}]
---
# {info.title}

- Base model: `{trainee.source}` ({trainee.kind})
- Method: {info.method}
- Data: `{config.data}` ({len(rows)} pairs used{f", {len({b.where for b in bad})} bad rows skipped" if bad else ""})
- Steps: {step}; batch {config.batch_size} × accumulation {config.grad_accum} = {effective_batch} per process
- Learning rate: {config.lr} (constant, AdamW{" 8-bit" if config.use_8bit_adam else ""}); resolution {config.resolution} px
{dropout}EMA: {f"yes ({config.ema_decay})" if config.ema else "no"}
- Mixed precision: {config.mixed_precision}; gradient checkpointing: {"yes" if config.gradient_checkpointing else "no"}; seed {config.seed}

Made with `instruct-edit-train train` (all settings in `training_config.json`).

## Use

{usage}"""
