"""The InstructPix2Pix training loop, in one file.

Read top to bottom: configuration, the loss (the paper's recipe), EMA, checkpoints, then
`train()`, which wires data, model, optimiser and accelerate together. accelerate owns
devices, mixed precision and distribution (`accelerate launch` for several GPUs/nodes);
everything that decides *what* is computed is here.

Determinism: the data order, the augmentation and every random draw of a step are functions
of (seed, step, process), not of a running RNG. A run that is killed and resumed from a
checkpoint therefore computes exactly the steps an uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.errors import InvalidInput
from training import model_init
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

DEFAULT_LORA_RANK = 16
CHECKPOINT_PREFIX = "step-"


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
    validation_steps: int = 20
    mixed_precision: str | None = None  # None: what `accelerate launch`/config says, else "no"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    seed: int = 0
    dataloader_workers: int = 0
    local_files_only: bool = False
    progress: bool = True


@dataclass
class TrainResult:
    output: Path
    step: int
    losses: dict[int, float]  # step -> loss of the steps run by this call
    weights: Path  # the LoRA file or the model folder
    skipped_rows: list[BadRow]
    main_process: bool = True  # False in the other processes of a distributed run


# --------------------------------------------------------------------------------------
# The loss: the paper's training objective


def conditioning_dropout_masks(
    count: int, probability: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One uniform draw r per sample: r<p drops the text, p≤r<2p both, 2p≤r<3p the image.

    This is what teaches the model the unconditional branches that three-way
    classifier-free guidance needs at inference time.
    """
    r = torch.rand(count, generator=generator)
    drop_text = r < 2 * probability
    drop_image = (r >= probability) & (r < 3 * probability)
    return drop_text, drop_image


def diffusion_loss(
    batch: dict[str, Any],
    *,
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    noise_scheduler: Any,
    null_text: torch.Tensor,
    generator: torch.Generator,
    dropout: float,
    device: torch.device,
    weight_dtype: torch.dtype,
) -> torch.Tensor:
    """Noise-prediction loss of one micro-batch; all random draws come from `generator` (CPU)."""
    edited = batch["edited_pixels"].to(device, weight_dtype)
    source = batch["input_pixels"].to(device, weight_dtype)
    count = edited.shape[0]
    with torch.no_grad():
        # Target: a posterior SAMPLE, scaled. Conditioning: the posterior MODE, unscaled.
        latents = vae.encode(edited).latent_dist.sample(generator=generator)
        latents = latents.float() * vae.config.scaling_factor
        image_latents = vae.encode(source).latent_dist.mode().float()
        token_ids = tokenizer(
            batch["instruction"],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        text = text_encoder(token_ids)[0].float()

    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (count,), generator=generator
    ).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)

    drop_text, drop_image = conditioning_dropout_masks(count, dropout, generator)
    # Dropped text is the embedding of "" (what inference uses), not zeros; a dropped image
    # is a zero latent.
    text = torch.where(drop_text.to(device)[:, None, None], null_text.float().to(device), text)
    image_latents = (
        image_latents * (~drop_image).to(device, image_latents.dtype)[:, None, None, None]
    )

    prediction = unet(torch.cat([noisy, image_latents], dim=1), timesteps, text).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float())


def step_generator(seed: int, micro_batch: int, rank: int) -> torch.Generator:
    """A fresh CPU generator per (seed, micro-batch, process): resumable and device-independent."""
    state = np.random.SeedSequence([seed, micro_batch, rank]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# --------------------------------------------------------------------------------------
# EMA of the trained weights


class EMA:
    """Exponential moving average with the paper's warm-up: decay_n = min(d, (1+n)/(10+n)).

    n counts the updates (optimiser steps) so far, including this one. Written out rather
    than diffusers' EMAModel, whose warm-up is off by one step from the paper's.
    """

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in parameters]
        self._backup: list[torch.Tensor] | None = None

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, parameters: list[torch.nn.Parameter]) -> None:
        self.updates += 1
        decay = self.current_decay()
        for shadow, param in zip(self.shadow, parameters, strict=True):
            shadow.lerp_(param.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def swap_into(self, parameters: list[torch.nn.Parameter]) -> None:
        """Put the EMA weights into the model (keeping the live ones for `restore`)."""
        self._backup = [p.detach().clone() for p in parameters]
        for shadow, param in zip(self.shadow, parameters, strict=True):
            param.copy_(shadow.to(param.dtype))

    @torch.no_grad()
    def restore(self, parameters: list[torch.nn.Parameter]) -> None:
        assert self._backup is not None
        for saved, param in zip(self._backup, parameters, strict=True):
            param.copy_(saved)
        self._backup = None

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        self.shadow = [t.float() for t in state["shadow"]]


# --------------------------------------------------------------------------------------
# Checkpoints: written to a temporary folder, then renamed (a crash leaves the last intact)


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is complete once it has train_state.json)."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith(CHECKPOINT_PREFIX)
        and (p / "train_state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def write_checkpoint(
    accelerator: Any, root: Path, step: int, state: dict[str, Any], keep: int
) -> Path:
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    temporary = root / f".tmp-{CHECKPOINT_PREFIX}{step:07d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    if accelerator.is_main_process:
        with open(temporary / "train_state.json", "w", encoding="utf-8") as out:
            json.dump(state, out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        if final.exists():  # only when the same step is saved twice; keep the old until replaced
            old = root / f".old-{final.name}"
            os.replace(final, old)
            os.replace(temporary, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, final)
        for stale in checkpoint_dirs(root)[: -max(1, keep)]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# --------------------------------------------------------------------------------------
# Output folder rules


def prepare_output(config: TrainConfig) -> Path | None:
    """Refuse to overwrite; return the checkpoint to resume from (if resuming and one exists)."""
    output = Path(config.output)
    checkpoints = output / "checkpoints"
    occupied = output.exists() and any(output.iterdir())
    if output.exists() and not output.is_dir():
        raise InvalidInput(f"output {output} is a file; give a folder", field="output")
    if occupied and not (config.resume or config.overwrite):
        raise InvalidInput(
            f"output folder {output} already exists and is not empty; pass --resume to continue "
            "its training or --overwrite to replace it (or choose another folder)",
            field="output",
        )
    if checkpoints.is_dir():
        # Leftovers of a checkpoint that was being written when a run died: never complete.
        for partial in checkpoints.glob(f".tmp-{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(partial, ignore_errors=True)
    if config.resume:
        found = checkpoint_dirs(checkpoints)
        return found[-1] if found else None
    if config.overwrite and checkpoints.is_dir():
        shutil.rmtree(checkpoints)  # our own folder: the old run's checkpoints would clash
    return None


# --------------------------------------------------------------------------------------
# Validation images


def _square(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize(
        (size, size), Image.Resampling.BICUBIC
    )


def validation_grid(pairs: list[tuple[Image.Image, Image.Image, str]]) -> Image.Image:
    """One row per validation instruction: input | result, with the instruction underneath."""
    from PIL import ImageDraw

    size = pairs[0][0].width
    caption = 14
    grid = Image.new("RGB", (2 * size, len(pairs) * (size + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for row, (source, result, instruction) in enumerate(pairs):
        top = row * (size + caption)
        grid.paste(source, (0, top))
        grid.paste(result.resize((size, size)), (size, top))
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
    }
    hints = {
        "resolution": "a multiple of 8 (the paper: 256)",
        "conditioning_dropout": "from 0 to 1/3 (each of its three cases gets this probability)",
        "ema_decay": "from 0 to below 1 (the paper: 0.9999)",
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
    from diffusers import StableDiffusionInstructPix2PixPipeline
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

    # 2. Model: frozen VAE and text encoder; UNet fully or through a LoRA adapter.
    base = model_init.load_base(config.model, local_files_only=config.local_files_only)
    use_lora = not config.full and (
        config.lora_rank is not None or base.kind == model_init.INSTRUCT_PIX2PIX
    )
    if use_lora and base.kind == model_init.TEXT_TO_IMAGE:
        raise InvalidInput(
            "a text-to-image base (4-channel UNet) gets new image channels that start at zero; "
            "they must be trained fully: use --full instead of --lora-rank",
            field="lora_rank",
        )
    lora_rank = (config.lora_rank or DEFAULT_LORA_RANK) if use_lora else None
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    device = accelerator.device
    unet, vae, text_encoder, tokenizer = base.unet, base.vae, base.text_encoder, base.tokenizer
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    _move(vae, device, weight_dtype).eval()
    _move(text_encoder, device, weight_dtype).eval()
    set_seed(config.seed)  # e.g. the adapter's random init must not depend on earlier draws
    if use_lora:
        assert lora_rank is not None
        model_init.add_lora(unet, lora_rank, config.lora_alpha)
        # Frozen base weights in the low-precision dtype; the adapter stays float32.
        _move(unet, device, weight_dtype)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        unet.requires_grad_(True)
        unet.to(device)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    say(
        f"model: {base.source} ({base.kind}); training "
        + (f"a LoRA adapter of rank {lora_rank}" if use_lora else "the whole UNet")
        + f", {sum(p.numel() for p in trainable) / 1e6:.2f} M parameters"
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

    unet, optimizer = accelerator.prepare(unet, optimizer)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if use_lora:
        _save_lora_in_checkpoints(accelerator)

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
        "rows": len(rows),
    }
    start_step = 0
    if resume_from is not None:
        state = json.loads((Path(resume_from) / "train_state.json").read_text())
        changed = {
            k: (state["order"].get(k), v) for k, v in order.items() if state["order"].get(k) != v
        }
        if changed:
            raise InvalidInput(
                "cannot resume with different settings that change the data order: "
                + ", ".join(f"{k} was {old}, now {new}" for k, (old, new) in changed.items())
                + "; use the original values or start a new output folder",
                field="resume",
            )
        accelerator.load_state(str(resume_from))
        start_step = int(state["step"])
        say(f"resuming from {resume_from} (step {start_step})")
    elif config.resume:
        say("no checkpoint to resume from: starting at step 0")

    # 5. Data in the fixed, resumable order.
    dataset = PairDataset(rows, config.resolution, config.seed, random_flip=config.random_flip)
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

    with torch.no_grad():
        empty = tokenizer(
            [""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        )
        null_text = text_encoder(empty.input_ids.to(device))[0]

    run_config = {k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool))}
    if main:
        accelerator.init_trackers("instruct-edit-train", config=run_config)
    checkpoints = output / "checkpoints"
    validation_rows = rows[: config.validation_count]
    inference_scheduler = base.inference_scheduler

    def save_state(step: int) -> None:
        write_checkpoint(
            accelerator,
            checkpoints,
            step,
            {"step": step, "order": order, "lora_rank": lora_rank, "time": time.time()},
            config.keep_checkpoints,
        )

    def validate(step: int) -> None:
        model = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.swap_into(trainable)
        model.eval()
        pipe = StableDiffusionInstructPix2PixPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=model,
            scheduler=inference_scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        results = []
        for number, row in enumerate(validation_rows):
            assert row.input_image is not None
            source = _square(row.input_image.open(), config.resolution)
            with torch.no_grad(), accelerator.autocast():
                edited = pipe(
                    row.instruction,
                    image=source,
                    num_inference_steps=config.validation_steps,
                    guidance_scale=7.5,
                    image_guidance_scale=1.5,
                    generator=torch.Generator().manual_seed(config.seed + number),
                ).images[0]
            results.append((source, edited, row.instruction))
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
            sync_context = accelerator.no_sync(unet) if not last else contextlib.nullcontext()
            with sync_context, accelerator.autocast():
                loss = diffusion_loss(
                    batch, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                    noise_scheduler=base.noise_scheduler, null_text=null_text, generator=generator,
                    dropout=config.conditioning_dropout, device=device, weight_dtype=weight_dtype,
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
            on_step_end(step, mean_loss)
    progress.close()

    # 7. Final checkpoint (so a longer --max-steps can resume) and the deliverable.
    if start_step < config.max_steps:
        save_state(step)
    weights = _export(
        config,
        base,
        accelerator.unwrap_model(unet),
        trainable,
        ema,
        use_lora,
        lora_rank,
        rows,
        bad,
        step,
        main,
    )
    accelerator.end_training()
    say(f"saved {weights}")
    return TrainResult(output, step, losses, weights, bad, main)


def _move(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    module.to(device)
    if dtype != torch.float32:  # (casting to float32 again only makes diffusers warn)
        module.to(dtype=dtype)
    return module


def _save_lora_in_checkpoints(accelerator: Any) -> None:
    """Keep LoRA checkpoints small: save only the adapter, not a copy of the whole base UNet."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            for model in models:
                state = get_peft_model_state_dict(accelerator.unwrap_model(model))
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in state.items()},
                    Path(output_dir) / "unet_lora.safetensors",
                )
        while weights:
            weights.pop()

    def load_hook(models: list, input_dir: str) -> None:
        while models:
            model = accelerator.unwrap_model(models.pop())
            set_peft_model_state_dict(model, load_file(Path(input_dir) / "unet_lora.safetensors"))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _export(
    config: TrainConfig,
    base: model_init.BaseModel,
    unet: Any,
    trainable: list[torch.nn.Parameter],
    ema: EMA | None,
    use_lora: bool,
    lora_rank: int | None,
    rows: list[PairRow],
    bad: list[BadRow],
    step: int,
    main: bool,
) -> Path:
    output = Path(config.output)
    if ema is not None:
        ema.swap_into(trainable)  # the paper samples with the EMA weights
    if use_lora:
        weights = output / "pytorch_lora_weights.safetensors"
        if main:
            model_init.save_lora(unet, output)
    else:
        weights = output
        if main:
            base.vae.to("cpu", torch.float32)
            base.text_encoder.to("cpu", torch.float32)
            model_init.save_full(base, unet.to("cpu", torch.float32), output)
    if main:
        settings = {k: v for k, v in asdict(config).items() if k not in ("progress",)}
        settings["output"] = str(settings["output"])
        settings["columns"] = asdict(config.columns)
        settings["lora_rank"] = lora_rank
        (output / "training_config.json").write_text(
            json.dumps(settings, indent=2, default=str) + "\n"
        )
        (output / "README.md").write_text(
            model_card(config, base, use_lora, lora_rank, rows, bad, step)
        )
    return weights


def model_card(
    config: TrainConfig,
    base: model_init.BaseModel,
    use_lora: bool,
    lora_rank: int | None,
    rows: list[PairRow],
    bad: list[BadRow],
    step: int,
) -> str:
    kind = (
        f"LoRA (rank {lora_rank}) on the UNet attention projections"
        if use_lora
        else "full UNet fine-tune"
    )
    effective_batch = config.batch_size * config.grad_accum
    usage = (
        "Load it in the Krita plugin's LoRA list, or:\n\n"
        "```python\n"
        "from diffusers import StableDiffusionInstructPix2PixPipeline\n"
        f'pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained("{base.source}")\n'
        'pipe.load_lora_weights("pytorch_lora_weights.safetensors")\n'
        "```\n"
        if use_lora
        else "Use this folder as the model (`instruct-edit edit IMAGE -i TEXT --model THIS_FOLDER`), or:\n\n"
        "```python\n"
        "from diffusers import StableDiffusionInstructPix2PixPipeline\n"
        'pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained("THIS_FOLDER")\n'
        "```\n"
    )
    return f"""---
base_model: {base.source}
library_name: diffusers
tags: [instruct-pix2pix, image-editing{", lora" if use_lora else ""}]
---
# InstructPix2Pix fine-tune

- Base model: `{base.source}` ({base.kind})
- Method: {kind}
- Data: `{config.data}` ({len(rows)} pairs used{f", {len({b.where for b in bad})} bad rows skipped" if bad else ""})
- Steps: {step}; batch {config.batch_size} × accumulation {config.grad_accum} = {effective_batch} per process
- Learning rate: {config.lr} (constant, AdamW{" 8-bit" if config.use_8bit_adam else ""}); resolution {config.resolution} px
- Conditioning dropout: {config.conditioning_dropout} text / both / image; EMA: {f"yes ({config.ema_decay})" if config.ema else "no"}
- Mixed precision: {config.mixed_precision}; gradient checkpointing: {"yes" if config.gradient_checkpointing else "no"}; seed {config.seed}

Made with `instruct-edit-train train` (all settings in `training_config.json`).

## Use

{usage}"""
