"""Generate before/after image pairs from caption triplets, the InstructPix2Pix paper's way.

For every line {"input", "edit", "output"} of --prompts, Stable Diffusion (text-to-image)
renders the input and the edited caption together with Prompt-to-Prompt self-attention
sharing for the first p of the steps, the same initial and ancestral noise for both images,
p ~ U(0.1, 0.9) and CFG ~ U(7.5, 15) per sample, --samples-per-pair seeds per line (paper:
100). CLIP scores each sample; those passing the thresholds are ranked by directional
similarity and the best --keep (4) are saved in the paper's layout (see docs/datagen.md),
which `instruct-edit-train train --data OUTPUT` reads directly.

Resumable: run the same command again and finished folders are skipped. Shardable: start
several processes with --shard 0/4 … 3/4 (or under `accelerate launch`, which shards by
process index) on one --output; each does its own lines and the last to finish writes
seeds.json and splits.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from engine.errors import InvalidInput, ModelNotFound

HELP = "generate before/after image pairs with Prompt-to-Prompt and CLIP filtering"
DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.datagen.clip_filter import DEFAULT_CLIP_MODEL

    parser.add_argument(
        "--prompts",
        required=True,
        type=Path,
        help="JSONL of {input, edit, output} (from generate-text)",
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="dataset folder to create or resume"
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_SD_MODEL,
        help=f"text-to-image SD 1.5-style model: hub id, diffusers folder or .safetensors (default {DEFAULT_SD_MODEL})",
    )
    parser.add_argument(
        "--clip-model",
        default=DEFAULT_CLIP_MODEL,
        help=f"CLIP for filtering: transformers id or folder (default {DEFAULT_CLIP_MODEL})",
    )
    parser.add_argument(
        "--samples-per-pair",
        type=int,
        default=100,
        help="seeds tried per caption pair (paper: 100)",
    )
    parser.add_argument(
        "--keep", type=int, default=4, help="best samples kept per pair after filtering (paper: 4)"
    )
    parser.add_argument(
        "--steps", type=int, default=100, help="sampling steps (paper: 100, Euler ancestral)"
    )
    parser.add_argument(
        "--resolution", type=int, default=512, help="image side in pixels (paper: 512)"
    )
    parser.add_argument(
        "--p2p-min",
        type=float,
        default=0.1,
        help="lowest fraction of steps with shared self-attention",
    )
    parser.add_argument(
        "--p2p-max",
        type=float,
        default=0.9,
        help="highest fraction of steps with shared self-attention",
    )
    parser.add_argument(
        "--cfg-min", type=float, default=7.5, help="lowest classifier-free guidance scale"
    )
    parser.add_argument(
        "--cfg-max", type=float, default=15.0, help="highest classifier-free guidance scale"
    )
    parser.add_argument(
        "--clip-threshold", type=float, default=0.2, help="minimum image-caption cosine, each image"
    )
    parser.add_argument(
        "--clip-dir-threshold", type=float, default=0.2, help="minimum directional similarity"
    )
    parser.add_argument(
        "--clip-img-threshold",
        type=float,
        default=0.75,
        help="minimum image-image cosine (reference script: 0.7)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="base seed; every sample's seed follows from it and the line number",
    )
    parser.add_argument(
        "--shard", default="0/1", help="i/n: do only lines with number mod n == i (default 0/1)"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="do at most this many pairs in this run"
    )
    parser.add_argument(
        "--scheduler",
        choices=("euler_a", "model"),
        default="euler_a",
        help="euler_a (the paper's) or the model's own scheduler",
    )
    parser.add_argument(
        "--jpeg-quality",
        type=int,
        default=100,
        help="JPEG quality of the saved images (reference: 100)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda, cuda:N or mps (under accelerate: the process's device)",
    )
    parser.add_argument(
        "--dtype", default="auto", help="auto (fp16 on GPU, bf16/fp32 on CPU), fp32, fp16 or bf16"
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="allow loading a pickle-based .ckpt model file"
    )


def load_text_to_image_pipeline(model: str, dtype: torch.dtype, allow_pickle: bool = False):
    """A diffusers StableDiffusionPipeline (4-channel UNet) from a hub id, folder or single file."""
    from diffusers import StableDiffusionPipeline

    from engine.models import resolve_model_source

    source = resolve_model_source(model, allow_pickle)
    common = {"dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    try:
        if source.kind == "single_file":
            pipeline = StableDiffusionPipeline.from_single_file(source.location, **common)
        else:
            pipeline = StableDiffusionPipeline.from_pretrained(source.location, **common)
    except (OSError, ValueError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise ModelNotFound(
            f"could not load the Stable Diffusion model {model!r}: {first_line}. Pass --model with a "
            "text-to-image SD 1.5-style hub id (in the local cache or downloadable), a diffusers "
            "folder or a .safetensors file",
            "model",
        ) from err
    in_channels = pipeline.unet.config.in_channels
    if in_channels != 4:
        raise InvalidInput(
            f"{model!r} has a UNet with {in_channels} input channels (an InstructPix2Pix or inpainting "
            "model); generate-images needs a text-to-image model with 4, e.g. "
            f"{DEFAULT_SD_MODEL}",
            "model",
        )
    return pipeline


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from engine.devices import resolve_device, resolve_dtype
    from training.datagen.clip_filter import ClipSimilarity, ClipThresholds
    from training.datagen.image_dataset import (
        GenerationSettings,
        PairOutcome,
        Shard,
        finalize,
        is_complete,
        pending_pairs,
        prepare_output,
        read_triplets,
        run_shard,
    )
    from training.datagen.prompt_to_prompt import PairGenerator

    state = PartialState()
    shard = Shard.parse(args.shard).within(state.process_index, state.num_processes)
    if args.limit is not None and args.limit < 1:
        raise InvalidInput("--limit must be at least 1", "limit")
    try:
        thresholds = ClipThresholds(
            args.clip_threshold, args.clip_dir_threshold, args.clip_img_threshold
        )
    except ValueError as err:
        raise InvalidInput(str(err), "clip_threshold") from err
    settings = GenerationSettings(
        model=args.model,
        clip_model=args.clip_model,
        samples_per_pair=args.samples_per_pair,
        keep=args.keep,
        steps=args.steps,
        resolution=args.resolution,
        p2p_range=(args.p2p_min, args.p2p_max),
        cfg_range=(args.cfg_min, args.cfg_max),
        thresholds=thresholds,
        base_seed=args.seed,
        scheduler=args.scheduler,
        jpeg_quality=args.jpeg_quality,
    )
    triplets = read_triplets(args.prompts)
    output: Path = args.output
    prepare_output(output, settings)
    todo = pending_pairs(output, triplets, shard, args.limit)
    owned = [i for i in range(len(triplets)) if shard.owns(i)]
    done = sum(1 for i in owned if is_complete(output, i))
    print(
        f"shard {shard.index}/{shard.count}: {len(owned)} of {len(triplets)} caption pairs are this "
        f"process's, {done} already done, {len(todo)} to do now",
        file=sys.stderr,
    )

    outcomes: list[PairOutcome] = []
    started = time.perf_counter()
    if todo:
        device = (
            state.device
            if state.num_processes > 1 and args.device == "auto"
            else resolve_device(args.device)
        )
        dtype = resolve_dtype(args.dtype, device)
        pipeline = load_text_to_image_pipeline(args.model, dtype, args.allow_pickle).to(device)
        clip = ClipSimilarity(args.clip_model, device=device, dtype=dtype)
        try:
            generator = PairGenerator(
                pipeline, args.steps, args.resolution, use_model_scheduler=args.scheduler == "model"
            )
        except ValueError as err:
            raise InvalidInput(str(err), "resolution") from err
        with (
            generator,
            tqdm(
                total=len(todo) * args.samples_per_pair,
                desc=f"samples (shard {shard.index})",
                unit="sample",
            ) as bar,
        ):

            def report(outcome: PairOutcome) -> None:
                bar.write(
                    f"{outcome.pair_index:07d}: {outcome.passed}/{outcome.tried} passed the CLIP filter, "
                    f"kept {len(outcome.kept_seeds)} ({outcome.seconds:.1f} s)"
                )

            outcomes = run_shard(
                output,
                triplets,
                todo,
                generator,
                clip,
                settings,
                on_pair=report,
                on_sample=lambda: bar.update(),
            )

    elapsed = time.perf_counter() - started
    tried = sum(o.tried for o in outcomes)
    passed = sum(o.passed for o in outcomes)
    kept = sum(len(o.kept_seeds) for o in outcomes)
    rate = f"{passed / tried:.1%}" if tried else "n/a"
    print(
        f"this process: {len(outcomes)} caption pairs, {tried} samples tried, {passed} passed ({rate}), "
        f"{kept} pairs kept, {elapsed:.0f} s",
        file=sys.stderr,
    )
    state.wait_for_everyone()
    if state.is_main_process or state.num_processes == 1:
        summary = finalize(output)
        total_rate = f"{summary.pass_rate:.1%}" if summary.samples_tried else "n/a"
        print(
            f"dataset {output}: {summary.folders_done} caption pairs done, {summary.folders_with_pairs} "
            f"with kept pairs, {summary.pairs_kept} pairs kept, pass rate {total_rate}; "
            "seeds.json and splits.json written"
        )
    return 0
