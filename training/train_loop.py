"""The training loop: one run, read top to bottom.

`train()` wires data, model, optimiser and accelerate together. What is computed for each
model family (the loss, the validation edit, the saved adapter) lives in
`training/objectives/` behind `Trainee`; EMA in `ema.py`, checkpoints in `checkpoints.py`,
the deliverable in `export.py`. accelerate owns devices, mixed precision and distribution
(`accelerate launch` for several GPUs/nodes).

Determinism: the data order, the augmentation and every random draw of a step are functions
of (seed, step, process), not of a running RNG. A run that is killed and resumed from a
checkpoint therefore computes exactly the steps an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine.errors import InvalidInput
from training.checkpoints import (
    checkpoint_dirs,
    prepare_output,
    save_lora_in_checkpoints,
    write_checkpoint,
)
from training.data import (
    BadRow,
    Columns,
    DataError,
    PairData,
    PairDataset,
    PairRow,
    StreamBatchSampler,
    check_rows,
    collate,
    drop_bad_rows,
    load_pairs,
)
from training.ema import EMA
from training.export import export
from training.objectives import load_trainee
from training.objectives.flow import BASE_QUANTIZATIONS
from training.objectives.ip2p import (  # re-exported: the paper's loss is part of this API
    DEFAULT_LORA_RANK,
    conditioning_dropout_masks,
    diffusion_loss,
)

__all__ = [
    "DEFAULT_LORA_RANK", "EMA", "TrainConfig", "TrainResult", "checkpoint_dirs",
    "conditioning_dropout_masks", "diffusion_loss", "step_generator", "train",
]  # fmt: skip


@dataclass
class TrainConfig:
    data: str
    model: str
    output: Path
    data_format: str = "auto"
    columns: Columns = field(default_factory=Columns)
    split: str = "train"
    skip_bad: bool = False
    lora_rank: int | None = None  # None: LoRA rank 16 for an InstructPix2Pix base, full for SD
    lora_alpha: float | None = None
    full: bool = False
    max_steps: int = 1000
    resolution: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4  # the paper's constant learning rate, no warm-up
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    conditioning_dropout: float = 0.05  # per case: text only, both, image only
    random_flip: bool = True
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 0
    validation_count: int = 4
    # Rows kept out of training and used for the validation images (0: validate on the first
    # `validation_count` training rows, as the paper's script does).
    holdout: int = 0
    validation_steps: int = 20
    mixed_precision: str | None = None  # None: what `accelerate launch`/config says, else "no"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    # Flow-matching families only: the frozen base weights quantized (QLoRA-style), and the
    # conditioning (text embeddings, reference latents) of each row computed once.
    base_quantization: str = "none"  # none | torchao-int8 | bnb-8bit | bnb-4bit
    cache_conditioning: bool = False
    seed: int = 0
    dataloader_workers: int = 0
    local_files_only: bool = False
    progress: bool = True


class StopTraining(Exception):
    """Raised by `on_step_end` to end the run after the current step; `train()` writes a
    checkpoint of that step first and re-raises."""


@dataclass
class TrainResult:
    output: Path
    step: int
    losses: dict[int, float]  # step -> loss of the steps run by this call
    weights: Path  # the LoRA file or the model folder
    skipped_rows: list[BadRow]
    main_process: bool = True  # False in the other processes of a distributed run


# --------------------------------------------------------------------------------------
# Random draws


def step_generator(seed: int, micro_batch: int, rank: int) -> torch.Generator:
    """A fresh CPU generator per (seed, micro-batch, process): resumable and device-independent."""
    state = np.random.SeedSequence([seed, micro_batch, rank]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# --------------------------------------------------------------------------------------
# Validation images


def _square(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize(
        (size, size), Image.Resampling.BICUBIC
    )


def validation_grid(
    pairs: list[tuple[Image.Image, Image.Image, Image.Image | None, str]],
) -> Image.Image:
    """One row per validation pair: input | the model's result | the pair's own after (when
    there is one), with the instruction underneath."""
    from PIL import ImageDraw

    size = pairs[0][0].width
    caption = 14
    columns = 3 if any(target is not None for _, _, target, _ in pairs) else 2
    grid = Image.new("RGB", (columns * size, len(pairs) * (size + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for row, (source, result, target, instruction) in enumerate(pairs):
        top = row * (size + caption)
        grid.paste(source, (0, top))
        grid.paste(result.resize((size, size)), (size, top))
        if target is not None:
            grid.paste(target.resize((size, size)), (2 * size, top))
        draw.text((2, top + size + 1), instruction[:80], fill="black")
    return grid


# --------------------------------------------------------------------------------------
# The run


def select_rows(
    pairs: PairData, bad: list[BadRow], skip_bad: bool, report: Callable[[str], None]
) -> list[PairRow]:
    """Report every bad row; stop before training unless told to skip them."""
    if bad:
        for problem in bad:
            report(f"  bad row: {problem}")
        rows_hit = len({b.where for b in bad})
        if not skip_bad:
            raise DataError(
                f"{rows_hit} of {len(pairs)} rows are unusable (listed above); fix them or pass "
                "--skip-bad to train without them",
                field="data",
            )
        report(f"skipping {rows_hit} bad rows (--skip-bad)")
    rows = drop_bad_rows(pairs.rows, bad)
    if not rows:
        raise DataError(f"no usable rows in {pairs.source}", field="data")
    return rows


def rows_fingerprint(rows: list[PairRow]) -> str:
    """A hash of which pairs are trained on, in which order (not of the image bytes)."""
    digest = hashlib.sha256()
    for row in rows:
        images = (row.input_image, row.edited_image)
        # File names, not full paths: the same folder reached by another path is the same data.
        names = [Path(i.describe()).name if i is not None else "" for i in images]
        for part in (row.where, row.instruction, *names):
            digest.update(part.encode("utf-8", "replace") + b"\0")
    return digest.hexdigest()[:16]


def check_resumable(saved: dict[str, Any], order: dict[str, Any], identity: dict[str, Any]) -> None:
    """Refuse a resume that would not continue the same run, naming what changed."""
    changed = {
        k: (saved.get("order", {}).get(k), v)
        for k, v in order.items()
        if k in saved.get("order", {}) and saved["order"][k] != v
    }
    # Checkpoints written before identities were recorded only know the LoRA rank.
    saved_identity = saved.get("identity") or {"lora_rank": saved.get("lora_rank")}
    changed.update(
        {
            k: (saved_identity[k], v)
            for k, v in identity.items()
            if k in saved_identity and saved_identity[k] != v
        }
    )
    if changed:
        names = {"data": "the data rows", "lora": "LoRA (vs --full)", "model": "the base model"}
        raise InvalidInput(
            "cannot resume: these settings differ from the checkpoint's run: "
            + ", ".join(
                f"{names.get(k, k)} was {old!r}, now {new!r}" for k, (old, new) in changed.items()
            )
            + "; use the original values or start a new output folder",
            field="resume",
        )


def check_config(config: TrainConfig) -> None:
    """Settings no run could use, refused before anything is loaded."""
    problems = {
        "max_steps": config.max_steps >= 1,
        "batch_size": config.batch_size >= 1,
        "grad_accum": config.grad_accum >= 1,
        "lr": math.isfinite(config.lr) and config.lr > 0,
        "resolution": config.resolution >= 8 and config.resolution % 8 == 0,
        "conditioning_dropout": 0.0 <= config.conditioning_dropout <= 1 / 3,
        "ema_decay": 0.0 <= config.ema_decay < 1.0,
        "lora_rank": config.lora_rank is None or config.lora_rank >= 1,
        "holdout": config.holdout >= 0,
        "base_quantization": config.base_quantization in BASE_QUANTIZATIONS,
    }
    hints = {
        "resolution": "a multiple of 8 (the paper: 256)",
        "conditioning_dropout": "from 0 to 1/3 (each of its three cases gets this probability)",
        "ema_decay": "from 0 to below 1 (the paper: 0.9999)",
        "base_quantization": "one of " + ", ".join(BASE_QUANTIZATIONS),
    }
    for name, ok in problems.items():
        if not ok:
            value = getattr(config, name)
            raise InvalidInput(
                f"{name.replace('_', '-')} {value!r} is not usable; it must be "
                + hints.get(name, "a positive number"),
                field=name,
            )


def train(
    config: TrainConfig,
    *,
    on_step_end: Callable[[int, float], None] | None = None,
    report: Callable[[str], None] = print,
) -> TrainResult:
    """Train and save the result into `config.output`; see the module docstring."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
    from tqdm.auto import tqdm

    check_config(config)
    output = Path(config.output)
    try:
        accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            log_with="tensorboard",
            project_config=ProjectConfiguration(
                project_dir=str(output), logging_dir=str(output / "logs")
            ),
        )
    except ValueError as err:  # e.g. fp16 on a machine without a GPU
        raise InvalidInput(
            f"--mixed-precision {config.mixed_precision}: {err}", field="mixed_precision"
        ) from err
    config = replace(config, mixed_precision=accelerator.mixed_precision)  # what is really used
    main = accelerator.is_main_process
    say = report if main else (lambda _msg: None)

    # 1. Output folder and data, checked before anything expensive.
    resume_from = prepare_output(config) if main else None
    resume_from = (
        broadcast_object_list([resume_from])[0] if accelerator.num_processes > 1 else resume_from
    )
    pairs = load_pairs(
        config.data, format=config.data_format, columns=config.columns, split=config.split
    )
    say(f"data: {pairs.source} ({pairs.format} format, {len(pairs)} rows); checking every row…")
    # Only the main process opens every image; the others get its verdict.
    bad: list[BadRow] = check_rows(pairs.rows) if main else []
    if accelerator.num_processes > 1:
        bad = broadcast_object_list([bad])[0]
    rows = select_rows(pairs, bad, config.skip_bad, say)
    held_out: list[PairRow] = []
    if config.holdout:
        if config.holdout >= len(rows):
            raise DataError(
                f"--holdout {config.holdout} leaves no rows to train on ({len(rows)} usable); "
                "hold out fewer pairs",
                field="holdout",
            )
        held_out, rows = rows[-config.holdout :], rows[: -config.holdout]
        say(f"validation on {len(held_out)} held-out pairs, training on {len(rows)}")

    # 2. Model: the family's trainee (frozen encoders; the denoiser fully or through a LoRA).
    set_seed(config.seed)  # e.g. the adapter's random init must not depend on earlier draws
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    trainee = load_trainee(
        config.model,
        lora_rank=config.lora_rank,
        lora_alpha=config.lora_alpha,
        full=config.full,
        local_files_only=config.local_files_only,
        weight_dtype=weight_dtype,  # a 12B base must not pass through float32 on the way
        base_quantization=config.base_quantization,
        cache_conditioning=config.cache_conditioning,
    )
    # Latent packing needs more than the VAE's 8 (FLUX: 2×2 patches of 8× latents = 16).
    multiple = getattr(trainee, "resolution_multiple", 8)
    if config.resolution % multiple:
        raise InvalidInput(
            f"resolution {config.resolution} is not usable for {trainee.family} models; use a "
            f"multiple of {multiple} (e.g. {max(multiple, config.resolution // multiple * multiple)})",
            field="resolution",
        )
    device = accelerator.device
    trainee.place(device, weight_dtype)
    denoiser = trainee.denoiser
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    trainable = trainee.trainable_parameters()
    say(
        f"model: {trainee.source} ({trainee.kind}); training "
        + (f"a LoRA adapter of rank {trainee.lora_rank}" if trainee.use_lora else "all weights")
        + f" of the {type(denoiser).__name__}, {sum(p.numel() for p in trainable) / 1e6:.2f} M parameters"
    )

    # 3. Optimiser (constant learning rate, as the paper) and EMA.
    if config.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError as err:
            raise InvalidInput(
                "--use-8bit-adam needs the bitsandbytes package (pip install bitsandbytes; "
                "it needs a CUDA GPU); or leave the flag off",
                field="use_8bit_adam",
            ) from err
        optimizer_class: Any = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(
        trainable, lr=config.lr, betas=config.adam_betas, weight_decay=config.adam_weight_decay
    )
    ema = EMA(trainable, config.ema_decay) if config.ema else None

    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if trainee.use_lora:
        save_lora_in_checkpoints(accelerator)

    # 4. Resume: weights, optimiser, EMA and RNG through accelerate; the step is ours.
    world_size = accelerator.num_processes
    # Settings that decide which samples and random draws each step sees: a resumed run must
    # keep them, or it would not continue the same run.
    order = {
        "seed": config.seed,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "world_size": world_size,
        "resolution": config.resolution,
        "augmentation": not config.cache_conditioning,
        "rows": len(rows),
        "data": rows_fingerprint(rows),
        "ema": config.ema,  # the checkpoint holds an EMA state or not: accelerate needs the same
    }
    start_step = 0
    if resume_from is not None:
        state = json.loads((Path(resume_from) / "train_state.json").read_text())
        check_resumable(state, order, trainee.identity())
        accelerator.load_state(str(resume_from))
        start_step = int(state["step"])
        say(f"resuming from {resume_from} (step {start_step})")
    elif config.resume:
        say("no checkpoint to resume from: starting at step 0")

    # 5. Data in the fixed, resumable order. Cached conditioning is of one fixed view of each
    # row, so caching turns the random crop and flip off (a new view would be a cache miss).
    augment = not config.cache_conditioning
    if config.cache_conditioning:
        say("--cache-conditioning: each row is used centre-cropped and unflipped")
    dataset = PairDataset(
        rows,
        config.resolution,
        config.seed,
        random_flip=config.random_flip and augment,
        random_crop=augment,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=StreamBatchSampler(
            config.batch_size,
            world_size,
            accelerator.process_index,
            start=start_step * config.grad_accum,
        ),
        collate_fn=collate,
        num_workers=config.dataloader_workers,
    )
    batches = iter(loader)

    trainee.prepare(device, weight_dtype)

    run_config = {k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool))}
    if main:
        accelerator.init_trackers("instruct-edit-train", config=run_config)
    checkpoints = output / "checkpoints"
    validation_rows = held_out or rows[: config.validation_count]

    def save_state(step: int) -> None:
        write_checkpoint(
            accelerator,
            checkpoints,
            step,
            {
                "step": step,
                "order": order,
                "lora_rank": trainee.lora_rank,
                "identity": trainee.identity(),
                "time": time.time(),
            },
            config.keep_checkpoints,
        )

    def validate(step: int) -> None:
        model = accelerator.unwrap_model(denoiser)
        if ema is not None:
            ema.swap_into(trainable)
        model.eval()
        results = []
        for number, row in enumerate(validation_rows):
            assert row.input_image is not None
            source = _square(row.input_image.open(), config.resolution)
            with accelerator.autocast():
                edited = trainee.validation_edit(
                    model, source, row.instruction, seed=config.seed + number,
                    steps=config.validation_steps,
                )  # fmt: skip
            target = (
                _square(row.edited_image.open(), config.resolution)
                if row.edited_image is not None
                else None
            )
            results.append((source, edited, target, row.instruction))
        model.train()
        if ema is not None:
            ema.restore(trainable)
        grid = validation_grid(results)
        (output / "validation").mkdir(parents=True, exist_ok=True)
        grid.save(output / "validation" / f"step-{step:07d}.png")
        tracker = accelerator.get_tracker("tensorboard", unwrap=True)
        tracker.add_image("validation", np.asarray(grid), step, dataformats="HWC")

    # 6. The loop.
    losses: dict[int, float] = {}
    progress = tqdm(
        total=config.max_steps,
        initial=start_step,
        disable=not (main and config.progress),
        desc="training",
    )
    step = start_step
    while step < config.max_steps:
        step_loss = torch.zeros((), device=device)
        for micro in range(config.grad_accum):
            batch = next(batches)
            generator = step_generator(
                config.seed, step * config.grad_accum + micro, accelerator.process_index
            )
            last = micro == config.grad_accum - 1
            # Gradients are averaged across processes only on the last micro-batch.
            sync_context = accelerator.no_sync(denoiser) if not last else contextlib.nullcontext()
            with sync_context, accelerator.autocast():
                loss = trainee.loss(
                    denoiser, batch, generator, dropout=config.conditioning_dropout,
                    device=device, weight_dtype=weight_dtype,
                )  # fmt: skip
                accelerator.backward(loss / config.grad_accum)
            step_loss += loss.detach() / config.grad_accum
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(trainable)
        step += 1

        mean_loss = float(accelerator.gather(step_loss[None]).mean())
        if not math.isfinite(mean_loss):
            raise InvalidInput(
                f"the loss became {mean_loss} at step {step}; lower --lr, or use bf16/no instead of fp16",
                field="lr",
            )
        losses[step] = mean_loss
        accelerator.log({"loss": mean_loss, "lr": config.lr}, step=step)
        progress.update(1)
        progress.set_postfix(loss=f"{mean_loss:.4f}")
        if (
            config.checkpoint_every
            and step % config.checkpoint_every == 0
            and step < config.max_steps
        ):
            save_state(step)
        if config.validate_every and step % config.validate_every == 0 and main:
            validate(step)
        if on_step_end is not None:
            try:
                on_step_end(step, mean_loss)
            except StopTraining:
                # Asked to stop (e.g. a cancel in the docker): keep this very step, so that
                # `--resume` continues here instead of repeating the steps since the last
                # periodic checkpoint.
                progress.close()
                save_state(step)
                accelerator.end_training()
                raise
    progress.close()

    # 7. Final checkpoint (so a longer --max-steps can resume) and the deliverable.
    if start_step < config.max_steps:
        save_state(step)
    weights = export(
        config, trainee, accelerator.unwrap_model(denoiser), trainable, ema, rows, bad, step, main
    )
    accelerator.end_training()
    say(f"saved {weights}")
    return TrainResult(output, step, losses, weights, bad, main)
