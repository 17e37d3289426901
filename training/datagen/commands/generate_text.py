"""Write an edit instruction and an edited caption for each caption, the InstructPix2Pix way.

With a model fine-tuned by `finetune-text` (prompt: caption + "\\n##\\n"), or with
--few-shot and any instruction-tuned causal LM (shown seed edits, no fine-tuning). Samples
with temperature 0.7 and frequency penalty 0.1, up to 256 new tokens, stopping at "\\nEND".
Output lines are {"input", "edit", "output"}, ready for `generate-images --prompts`.

Malformed or truncated completions are retried (--retries), then dropped; edited captions
equal to the input (ignoring case and punctuation) are dropped; duplicate captions are done
once; --content-filter (word list file or module:function) drops what it rejects. Re-run the
same command to resume: captions finished before (kept or dropped) are skipped, using the
OUTPUT.progress.jsonl file written next to OUTPUT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "write edit instructions and edited captions for captions with a language model"
DEFAULT_SEED_DATA = Path(__file__).resolve().parents[3] / "resources" / "seed_edits.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--captions",
        required=True,
        type=Path,
        help="captions: .txt (one per line) or .jsonl with a caption/input/text key",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="causal LM: a finetune-text folder, or with --few-shot any transformers id/folder",
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="JSONL file to write (or resume)"
    )
    parser.add_argument(
        "--few-shot",
        action="store_true",
        help="prompt with seed examples instead of using a fine-tuned model",
    )
    parser.add_argument(
        "--seed-data",
        type=Path,
        default=DEFAULT_SEED_DATA,
        help="seed triplets for --few-shot (default: the bundled set)",
    )
    parser.add_argument(
        "--shots", type=int, default=8, help="seed examples shown per caption with --few-shot"
    )
    parser.add_argument(
        "--chat",
        choices=("auto", "yes", "no"),
        default="auto",
        help="with --few-shot: use the tokenizer's chat template (auto: if it has one)",
    )
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument(
        "--frequency-penalty",
        type=float,
        default=0.1,
        help="OpenAI-style: logit minus penalty × times generated so far",
    )
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="new tries for a malformed completion before it is dropped",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--content-filter",
        default=None,
        help="word list file, or module:function / file.py:function returning True to keep a text",
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N captions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from engine.devices import resolve_device, resolve_dtype
    from engine.errors import InvalidInput
    from training.datagen.content_filter import load_content_filter
    from training.datagen.text_generation import (
        TransformersSampler,
        generate_edits,
        load_causal_lm,
        print_stats,
        read_captions,
        read_seed_examples,
    )

    if args.max_new_tokens < 1 or args.shots < 1:
        raise InvalidInput("--max-new-tokens and --shots must be at least 1", "max_new_tokens")
    captions = read_captions(args.captions)
    if args.limit is not None:
        captions = captions[: args.limit]
    content_filter = load_content_filter(args.content_filter) if args.content_filter else None
    few_shot = read_seed_examples(args.seed_data) if args.few_shot else None
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load_causal_lm(args.model, device, dtype)
    sampler = TransformersSampler(
        model,
        tokenizer,
        temperature=args.temperature,
        frequency_penalty=args.frequency_penalty,
        max_new_tokens=args.max_new_tokens,
        few_shot=few_shot,
        shots=args.shots,
        use_chat_template={"auto": None, "yes": True, "no": False}[args.chat],
        seed=args.seed,
    )
    with tqdm(total=len(captions), desc="captions", unit="caption", file=sys.stderr) as bar:
        stats = generate_edits(
            captions,
            sampler,
            args.output,
            retries=args.retries,
            batch_size=args.batch_size,
            content_filter=content_filter,
            on_progress=bar.update,
        )
    print_stats(stats, args.output)
    return 0
