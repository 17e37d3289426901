"""Fine-tune a causal language model to write image edits, in the InstructPix2Pix format.

Trains on seed triplets {"input", "edit", "output"} (default: the bundled
resources/seed_edits.jsonl) with prompt caption + "\\n##\\n" and completion
edit + "\\n%%\\n" + edited caption + "\\nEND", the loss on the completion only. LoRA via
peft by default (--full trains every weight). The LoRA is merged and OUTPUT is a plain
transformers model folder that `generate-text --model OUTPUT` loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "fine-tune a language model on seed edits (caption -> instruction + edited caption)"
DEFAULT_SEED_DATA = Path(__file__).resolve().parents[3] / "resources" / "seed_edits.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="causal LM to start from: transformers id or folder"
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="new folder for the fine-tuned model"
    )
    parser.add_argument(
        "--seed-data",
        type=Path,
        default=DEFAULT_SEED_DATA,
        help="JSONL triplets (default: the bundled seed set)",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--learning-rate", type=float, default=None, help="default 1e-4 with LoRA, 2e-5 with --full"
    )
    parser.add_argument("--full", action="store_true", help="train all weights instead of a LoRA")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument(
        "--lora-target-modules",
        nargs="+",
        default=None,
        help="module names for LoRA (default: peft's choice for the architecture)",
    )
    parser.add_argument(
        "--max-length", type=int, default=256, help="tokens per example, prompt + completion"
    )
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from engine.errors import InvalidInput
    from training.datagen.text_finetune import FinetuneSettings, finetune
    from training.datagen.text_generation import read_seed_examples

    if args.epochs < 1 or args.batch_size < 1 or args.max_length < 8:
        raise InvalidInput(
            "--epochs and --batch-size must be at least 1, --max-length at least 8", "epochs"
        )
    examples = read_seed_examples(args.seed_data)
    settings = FinetuneSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate
        if args.learning_rate is not None
        else (2e-5 if args.full else 1e-4),
        lora=not args.full,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_target_modules=args.lora_target_modules,
        max_length=args.max_length,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
    )
    summary = finetune(args.model, examples, args.output, settings)
    print(
        f"saved {args.output} ({summary['examples']} examples, final loss {summary['epoch_losses'][-1]:.4f})"
    )
    return 0
