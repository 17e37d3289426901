"""Throughput of `generate-images` on the real architecture with random weights.

Builds SD 1.5's text-to-image architecture (4-channel UNet 859.5 M, VAE, CLIP-L text) and a
CLIP ViT-L/14 (the filter) with random weights, then runs the real per-pair code path
(Prompt-to-Prompt generation of every sample, CLIP scoring, filtering, JPEG writing) and
prints a table: seconds per sample, samples (= generated pairs) per minute, kept pairs per
minute, filter pass rate, and the share of time spent in CLIP.

With random weights the CLIP scores, and so the pass rate, carry no meaning about image
quality; the pass rate is printed with the default thresholds and with everything accepted
(which is what the kept-pairs rate then measures). Timings are what real weights cost.

    python benchmarks/bench_datagen.py                      # CPU: 256 px, 4 steps, bf16 if fast
    python benchmarks/bench_datagen.py --resolution 512 --steps 100 --samples 8   # paper, GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.devices import resolve_device, resolve_dtype
from tests.tiny_models.sd import (
    build_full_size_components,
    build_tiny_tokenizer,
    full_size_text_config,
)
from training.datagen.clip_filter import ClipScores, ClipSimilarity, ClipThresholds
from training.datagen.image_dataset import GenerationSettings, Triplet, generate_pair_folder
from training.datagen.prompt_to_prompt import PairGenerator, SampleParams

CLIP_VISION_L14 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
}
TRIPLETS = [
    Triplet(
        "a red car parked on a city street",
        "make it a watercolor painting",
        "a watercolor painting of a red car parked on a city street",
    ),
    Triplet(
        "a wooden cabin in a snowy forest",
        "make it night",
        "a wooden cabin in a snowy forest at night",
    ),
    Triplet(
        "a cat sleeping on a windowsill",
        "turn the cat into a tiger",
        "a tiger sleeping on a windowsill",
    ),
]


def build_full_size_text_to_image(seed: int = 0):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **build_full_size_components(seed, in_channels=4), requires_safety_checker=False
    )


def save_full_size_clip(folder: Path, seed: int = 0) -> Path:
    """CLIP ViT-L/14's architecture with random weights, saved so ClipSimilarity loads it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    text_config = full_size_text_config(tokenizer)
    CLIPModel(
        CLIPConfig(text_config=text_config, vision_config=CLIP_VISION_L14, projection_dim=768)
    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    ).save_pretrained(folder)
    return folder


class TimedClip(ClipSimilarity):
    """ClipSimilarity that adds up the seconds spent embedding images."""

    seconds = 0.0

    def image_embeddings(self, images):
        started = time.perf_counter()
        try:
            return super().image_embeddings(images)
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--samples", type=int, default=2, help="samples per caption pair")
    parser.add_argument("--pairs", type=int, default=1, help="caption pairs (folders) to generate")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    built = time.perf_counter()
    pipeline = build_full_size_text_to_image().to(device, dtype)
    with tempfile.TemporaryDirectory() as scratch:
        clip = TimedClip(
            str(save_full_size_clip(Path(scratch) / "clip")), device=device, dtype=dtype
        )
        print(f"built the full-size models in {time.perf_counter() - built:.0f} s", file=sys.stderr)
        settings = GenerationSettings(
            model="random-full-size", clip_model="random-vit-l-14",
            samples_per_pair=args.samples, keep=4, steps=args.steps, resolution=args.resolution,
            thresholds=ClipThresholds(-1, -1, -1),  # keep everything: we time the whole path
        )  # fmt: skip
        default = ClipThresholds()
        per_sample: list[float] = []
        tried = passed_default = kept = 0
        clip_seconds = total_seconds = 0.0
        output = Path(scratch) / "dataset"
        output.mkdir()
        with PairGenerator(pipeline, args.steps, args.resolution) as generator:
            # warm-up sample: first-call allocation and kernel selection are not throughput
            generator.generate((TRIPLETS[0].input, TRIPLETS[0].output), SampleParams(0, 0.5, 7.5))
            for index in range(args.pairs):
                triplet = TRIPLETS[index % len(TRIPLETS)]
                clip.seconds = 0.0
                last = [time.perf_counter()]

                def tick(last=last) -> None:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    now = time.perf_counter()
                    per_sample.append(now - last[0])
                    last[0] = now

                outcome = generate_pair_folder(
                    output, index, triplet, generator, clip, settings, on_sample=tick
                )
                tried += outcome.tried
                kept += len(outcome.kept_seeds)
                total_seconds += outcome.seconds
                clip_seconds += clip.seconds
                for line in (output / f"{index:07d}" / "metadata.jsonl").read_text().splitlines():
                    row = json.loads(line)
                    scores = ClipScores(
                        row["clip_sim_0"],
                        row["clip_sim_1"],
                        row["clip_sim_dir"],
                        row["clip_sim_image"],
                    )
                    passed_default += scores.passes(default)

    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    median = statistics.median(per_sample)
    rows = [
        ("device", device_name),
        ("dtype", str(dtype).removeprefix("torch.")),
        ("resolution / steps", f"{args.resolution} px / {args.steps}"),
        ("caption pairs × samples", f"{args.pairs} × {args.samples}"),
        ("seconds per sample (median)", f"{median:.2f}"),
        ("samples (pairs generated) per minute", f"{60 / median:.1f}"),
        ("kept pairs per minute (k=4, all accepted)", f"{60 * kept / total_seconds:.1f}"),
        ("CLIP share of the time", f"{clip_seconds / total_seconds:.1%}"),
        ("pass rate, default thresholds (random weights!)", f"{passed_default}/{tried}"),
        ("projected s per caption pair at 100 samples", f"{100 * median:.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"| {'measure':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
