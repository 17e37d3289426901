"""Training throughput (samples/s) and peak memory: LoRA vs full UNet training.

Runs the real training step (`training.train_loop.diffusion_loss` + backward + AdamW, under
accelerate) on random data. Each variant runs in its own process so its peak memory is its
own (CPU: peak RSS, weights included; CUDA: torch's peak allocated). Variants alternate
(LoRA, full, LoRA, full, …) over --repeats so machine noise hits both; medians are printed.

    python benchmarks/bench_training.py                  # tiny model, 64 px, CPU: seconds
    python benchmarks/bench_training.py --full           # real SD 1.5 / InstructPix2Pix
                                                         # architecture, random weights, 256 px
                                                         # (CPU: minutes, ~20 GB for full)
    python benchmarks/bench_training.py --full --device cuda --mixed-precision fp16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(args: argparse.Namespace) -> None:
    """One variant: build, warm up, time --steps training steps, print one JSON line."""
    import torch
    from _common import PeakRSS
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from tests.tiny_models.sd import build_full_size_pipeline, build_tiny_components
    from training.model_init import add_lora
    from training.train_loop import diffusion_loss, step_generator

    if args.full:
        pipe = build_full_size_pipeline(seed=0)
        parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder,
                 "tokenizer": pipe.tokenizer, "scheduler": pipe.scheduler}  # fmt: skip
    else:
        parts = build_tiny_components(seed=0)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    unet, vae, text_encoder, tokenizer = (
        parts["unet"],
        parts["vae"],
        parts["text_encoder"],
        parts["tokenizer"],
    )
    vae.requires_grad_(False).to(device, dtype=weight_dtype)
    text_encoder.requires_grad_(False).to(device, dtype=weight_dtype)
    if args.variant == "lora":
        add_lora(unet, args.lora_rank)
        unet.to(device, dtype=weight_dtype)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        unet.requires_grad_(True).to(device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    noise_scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
    with torch.no_grad():
        empty = tokenizer(
            [""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        )
        null_text = text_encoder(empty.input_ids.to(device))[0]
    generator = torch.Generator().manual_seed(0)
    pixels = (
        torch.rand(2, args.batch_size, 3, args.resolution, args.resolution, generator=generator) * 2
        - 1
    )
    batch = {
        "input_pixels": pixels[0],
        "edited_pixels": pixels[1],
        "instruction": ["make it evening"] * args.batch_size,
    }

    def step(number: int) -> float:
        with accelerator.autocast():
            loss = diffusion_loss(
                batch, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                noise_scheduler=noise_scheduler, null_text=null_text,
                generator=step_generator(0, number, 0), dropout=0.05, device=device, weight_dtype=weight_dtype,
            )  # fmt: skip
            accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    cuda = device.type == "cuda"
    for number in range(args.warmup):
        step(number)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    with PeakRSS() as peak:
        for number in range(args.steps):
            start = time.perf_counter()
            step(args.warmup + number)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    print(json.dumps({
        "variant": args.variant, "times": times,
        "peak_bytes": torch.cuda.max_memory_allocated() if cuda else peak.peak,
        "memory_kind": "CUDA peak allocated" if cuda else "peak RSS",
        "trainable": sum(p.numel() for p in trainable),
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--full", action="store_true", help="the full-size architecture (random weights) at 256 px"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--resolution", type=int, help="default: 64 tiny, 256 full")
    parser.add_argument(
        "--batch-size", type=int, help="default: 8 tiny, 1 full (CPU) / 4 full (GPU)"
    )
    parser.add_argument("--steps", type=int, help="timed steps per run (default: 10 tiny, 3 full)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--repeats", type=int, help="runs per variant, alternating (default: 3 tiny, 1 full)"
    )
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--variants", default="lora,full", help="comma-separated: lora,full")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", dest="variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    gpu = args.device != "cpu"
    args.resolution = args.resolution or (256 if args.full else 64)
    args.batch_size = args.batch_size or ((4 if gpu else 1) if args.full else 8)
    args.steps = args.steps or (3 if args.full else 10)
    args.repeats = args.repeats or (1 if args.full else 3)
    if args.variant:
        child(args)
        return

    from _common import print_table

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    shared = ["--device", args.device, "--mixed-precision", args.mixed_precision,
              "--lora-rank", str(args.lora_rank), "--warmup", str(args.warmup),
              "--resolution", str(args.resolution), "--batch-size", str(args.batch_size),
              "--steps", str(args.steps)]  # fmt: skip
    shared += ["--full"] * args.full + ["--gradient-checkpointing"] * args.gradient_checkpointing
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            done = subprocess.run(
                [sys.executable, __file__, *shared, "--child", variant],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                sys.exit(f"variant {variant} failed:\n{done.stderr[-3000:]}")
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))

    model = "full-size SD1.5 IP2P (random)" if args.full else "tiny IP2P"
    rows, results = [], []
    for variant, results_of in runs.items():
        step_s = statistics.median(t for r in results_of for t in r["times"])
        peak = statistics.median(r["peak_bytes"] for r in results_of)
        result = {
            "variant": variant, "model": model, "device": args.device, "resolution": args.resolution,
            "batch_size": args.batch_size, "mixed_precision": args.mixed_precision,
            "median_step_s": step_s, "samples_per_s": args.batch_size / step_s, "peak_bytes": peak,
            "memory_kind": results_of[0]["memory_kind"], "trainable_params": results_of[0]["trainable"],
        }  # fmt: skip
        results.append(result)
        rows.append([
            variant, model, f"{args.resolution}", f"{args.batch_size}", f"{step_s:.3f}",
            f"{result['samples_per_s']:.2f}", f"{peak / 2**30:.2f} GiB", f"{result['trainable_params'] / 1e6:.2f} M",
        ])  # fmt: skip
    print(f"{args.steps} timed steps × {args.repeats} runs per variant, {args.device}, "
          f"mixed precision {args.mixed_precision}; memory = {results[0]['memory_kind']}")  # fmt: skip
    print_table(
        rows,
        [
            "variant",
            "model",
            "px",
            "batch",
            "median step s",
            "samples/s",
            "peak memory",
            "trainable",
        ],
    )
    if len(results) == 2:
        print(f"{results[1]['variant']} / {results[0]['variant']} step time: "
              f"{results[1]['median_step_s'] / results[0]['median_step_s']:.2f}×")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
