"""Fine-tune an edit model on before/after pairs.

The base is a model of any trainable family: an InstructPix2Pix model (LoRA on the UNet
attention by default, --full for all UNet weights), a Stable Diffusion 1.x text-to-image model
(its UNet gets the paper's 8-channel input and is trained fully), or a flow-matching edit model
(FLUX.1 Kontext, FLUX.2 klein, Qwen-Image-Edit: a LoRA on the transformer's attention and MLP
projections, rectified-flow loss). Every row of the data is checked first; bad rows stop the
run before training unless --skip-bad is given.

examples:
  # a FLUX.1 Kontext LoRA on one 24 GB GPU: bf16, int8 frozen base, checkpointing, cache
  instruct-edit-train train --data my_pairs --model black-forest-labs/FLUX.1-Kontext-dev \\
      --output my_kontext_lora --resolution 512 --batch-size 1 --mixed-precision bf16 \\
      --base-quantization torchao-int8 --gradient-checkpointing --cache-conditioning

  # LoRA on the paper's model, a pairs folder (metadata.jsonl), one consumer GPU
  instruct-edit-train train --data my_pairs --model timbrooks/instruct-pix2pix \\
      --output my_lora --max-steps 2000 --mixed-precision fp16 --gradient-checkpointing

  # continue that run after a crash (same data order and random state)
  instruct-edit-train train --data my_pairs --model timbrooks/instruct-pix2pix \\
      --output my_lora --max-steps 2000 --mixed-precision fp16 --gradient-checkpointing --resume

  # the paper's recipe from SD 1.5 on its generated data, several GPUs
  accelerate launch --config_file resources/accelerate/multi_gpu.yaml -m training.cli train \\
      --data generated_data --model stable-diffusion-v1-5/stable-diffusion-v1-5 --full \\
      --output ip2p --batch-size 32 --grad-accum 4 --ema --mixed-precision bf16

  # a Hugging Face dataset with other column names
  instruct-edit-train train --data osunlp/MagicBrush --input-column source_img \\
      --instruction-column instruction --edited-column target_img --model ... --output ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.commands.check_data import add_data_arguments, columns_from
from training.objectives.flow import BASE_QUANTIZATIONS
from training.train_loop import DEFAULT_LORA_RANK, TrainConfig, train

HELP = "fine-tune an edit model of any trainable family on before/after pairs (LoRA or full)"


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (got {value})")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return number


def _resolution(value: str) -> int:
    number = int(value)
    if number < 8 or number % 8:
        raise argparse.ArgumentTypeError(
            f"must be a multiple of 8 (got {value}); 256 is the paper's"
        )
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, positional=False)
    parser.add_argument("--model", required=True, help="base model: hub id or diffusers folder")
    parser.add_argument(
        "--output", required=True, type=Path, help="folder for the result, checkpoints and logs"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--lora-rank",
        type=_positive,
        help=f"train a LoRA adapter of this rank (default {DEFAULT_LORA_RANK} for an "
        "InstructPix2Pix or flow-matching base)",
    )
    mode.add_argument(
        "--full",
        action="store_true",
        help="train every weight of the UNet/transformer (the default for a text-to-image base)",
    )
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    parser.add_argument(
        "--max-steps", type=_positive, default=1000, help="optimiser steps (default 1000)"
    )
    parser.add_argument(
        "--resolution", type=_resolution, default=256, help="training size in pixels (default 256)"
    )
    parser.add_argument(
        "--batch-size", type=_positive, default=4, help="per process and micro-batch (default 4)"
    )
    parser.add_argument(
        "--grad-accum",
        type=_positive,
        default=1,
        help="micro-batches per optimiser step (default 1)",
    )
    parser.add_argument(
        "--lr", type=float, default=1e-4, help="constant learning rate (default 1e-4)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in --output"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace what is in --output")
    parser.add_argument(
        "--checkpoint-every",
        type=_non_negative,
        default=500,
        help="steps between checkpoints (0: only at the end)",
    )
    parser.add_argument(
        "--keep-checkpoints", type=_positive, default=2, help="how many recent checkpoints to keep"
    )
    parser.add_argument(
        "--validate-every",
        type=_non_negative,
        default=0,
        help="steps between validation grids (0: never)",
    )
    parser.add_argument(
        "--holdout",
        type=_non_negative,
        default=0,
        help="keep the last N pairs out of training and validate on them (default 0: validate "
        "on the first --validation-count training pairs)",
    )
    parser.add_argument(
        "--validation-count",
        type=_positive,
        default=4,
        help="rows of the data edited for validation",
    )
    parser.add_argument(
        "--validation-steps", type=_positive, default=20, help="sampling steps of validation edits"
    )
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        help="default: the accelerate config's, else no",
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="less memory, ~30%% slower"
    )
    parser.add_argument(
        "--use-8bit-adam",
        action="store_true",
        help="bitsandbytes AdamW8bit (CUDA; must be installed)",
    )
    parser.add_argument(
        "--ema", action="store_true", help="keep an EMA of the weights and save it (the paper's)"
    )
    parser.add_argument("--ema-decay", type=float, default=0.9999)
    parser.add_argument(
        "--conditioning-dropout",
        type=float,
        default=0.05,
        help="InstructPix2Pix only: probability of each of: no text, no image, neither "
        "(default 0.05)",
    )
    parser.add_argument(
        "--no-flip",
        action="store_true",
        help="no random horizontal flip (e.g. for text or left/right edits)",
    )
    parser.add_argument(
        "--base-quantization",
        choices=BASE_QUANTIZATIONS,
        default="none",
        help="flow-matching families: keep the frozen base weights quantized, QLoRA-style "
        "(torchao-int8 runs anywhere; bnb-8bit/bnb-4bit need CUDA); default none",
    )
    parser.add_argument(
        "--cache-conditioning",
        action="store_true",
        help="flow-matching families: encode each row's text and reference image once and "
        "reuse them (turns random crop/flip off)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dataloader-workers",
        type=_non_negative,
        default=0,
        help="image-decoding worker processes",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="never contact the model hub (local folders and cache only)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data=args.data,
        model=args.model,
        output=args.output,
        data_format=args.format,
        columns=columns_from(args),
        split=args.split,
        skip_bad=args.skip_bad,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        full=args.full,
        max_steps=args.max_steps,
        resolution=args.resolution,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        resume=args.resume,
        overwrite=args.overwrite,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        validate_every=args.validate_every,
        validation_count=args.validation_count,
        holdout=args.holdout,
        validation_steps=args.validation_steps,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        use_8bit_adam=args.use_8bit_adam,
        ema=args.ema,
        ema_decay=args.ema_decay,
        conditioning_dropout=args.conditioning_dropout,
        base_quantization=args.base_quantization,
        cache_conditioning=args.cache_conditioning,
        random_flip=not args.no_flip,
        seed=args.seed,
        dataloader_workers=args.dataloader_workers,
        local_files_only=args.offline,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    result = train(config_from(args))
    if not result.main_process:
        return 0
    if result.losses:
        last = max(result.losses)
        print(
            f"done: step {result.step}, last loss {result.losses[last]:.4f}; result in {result.weights}"
        )
    else:
        print(f"nothing to do: {args.output} is already at step {result.step}")
    return 0
