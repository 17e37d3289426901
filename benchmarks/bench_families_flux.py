"""FLUX.1 Kontext and FLUX.2 klein: the engine vs a plain diffusers call, and quantized loading.

CPU (default): the real models' WIDTH with REDUCED DEPTH (random weights; see
tests/tiny_models/flux.py): Kontext 1 double + 1 single block of 24×128 (the real one has
19 + 38), klein 4B 1 + 1 blocks of 24×128 (real 5 + 20). Text encoders keep the width the
transformer reads but few layers; the VAEs are the real configs. A step costs the real
step × blocks kept / real blocks, so absolute times are NOT the real model's; the ratio
engine / plain diffusers is what this measures (same pipeline object, alternating runs, medians).

    python benchmarks/bench_families_flux.py                      # CPU: 256², 2 steps, both
    python benchmarks/bench_families_flux.py --family kontext --repeats 2
    python benchmarks/bench_families_flux.py --device cuda        # GPU: 1 MP, recommended
                                                                  # steps, each quantization

GPU section: the full-depth architectures (random weights, bf16) saved once to a scratch
folder and loaded through the family with each quantization; prints "not run" without CUDA.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import alternate, print_table

from engine.editor import Editor
from engine.families.base import RunInputs, StepHooks
from engine.families.flux2_klein import Flux2KleinFamily
from engine.families.flux_kontext import FluxKontextFamily
from engine.quantization import QUANTIZATIONS, available_quantizations
from engine.request import EditParams


def cpu_name() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            text = info.read()
        name = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        found = sorted({f for f in text.split() if f.startswith(("avx512_bf16", "amx_bf16", "avx512f"))})
        flags = f" [{', '.join(found) or 'no avx512'}]"
    except (OSError, StopIteration):
        name = "unknown CPU"
    return name + flags


FAMILIES = {"kontext": FluxKontextFamily(), "klein": Flux2KleinFamily()}
INSTRUCTION = "make it evening"


def build(name: str, full_depth: bool) -> Any:
    from tests.tiny_models import flux

    if name == "kontext":
        depth = {"num_layers": 19, "num_single_layers": 38} if full_depth else {"num_layers": 1, "num_single_layers": 1}
        return flux.build_reduced_depth_kontext(**depth)
    depth = {"num_layers": 5, "num_single_layers": 20} if full_depth else {"num_layers": 1, "num_single_layers": 1}
    return flux.build_reduced_depth_klein(**depth)


def plain_call(name: str, pipe: Any, image: np.ndarray, steps: int, guidance: float, seed: int) -> np.ndarray:
    """diffusers as its docs show it: a PIL image, one generator, explicit size."""
    height, width = image.shape[:2]
    pil = Image.fromarray((image * 255).round().astype(np.uint8), "RGB")
    extra = {"max_area": height * width, "_auto_resize": False} if name == "kontext" else {}
    return pipe(image=pil, prompt=INSTRUCTION, height=height, width=width, num_inference_steps=steps,
                guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np", **extra).images[0]


def cpu_section(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    size, steps = args.resolution or 256, args.steps or 2
    print(f"# bench_families_flux (CPU): {cpu_name()}, {torch.get_num_threads()} threads, fp32, "
          f"{size}² px, {steps} steps, {args.repeats} repeats alternating (medians); REDUCED-DEPTH "
          "models of the real width (1 double + 1 single block): the ratio is the result, not the times")
    for name in args.family:
        bench_cpu_family(name, size, steps, args)
        gc.collect()


def bench_cpu_family(name: str, size: int, steps: int, args: argparse.Namespace) -> None:
    family = FAMILIES[name]
    start = time.perf_counter()
    pipe = family.prepare(build(name, full_depth=False), torch.float32)
    built = time.perf_counter() - start
    blocks = sum(p.numel() for p in pipe.transformer.parameters()) / 1e6
    editor = Editor.from_pipeline(pipe, family=family, device="cpu", dtype="fp32")
    image = np.random.default_rng(0).random((size, size, 3)).astype(np.float32)
    source = Image.fromarray((image * 255).round().astype(np.uint8), "RGB")
    guidance = family.params[0].default
    params = EditParams(INSTRUCTION, seed=0, steps=steps, resolution=size)

    def engine_family_run() -> np.ndarray:
        inputs = RunInputs(image, INSTRUCTION, steps, [0], family.resolve_options({}))
        return family.run(pipe, inputs, StepHooks(step=lambda *a: None), torch.device("cpu"))[0]

    def engine_edit() -> np.ndarray:
        return np.asarray(editor.edit(source, params)[0], dtype=np.float32) / 255

    if args.no_warmup:  # still exercise every path once, cheaply (lazy imports, kernels)
        small = image[:64, :64]
        plain_call(name, pipe, small, 1, guidance, 0)
        editor.edit(source.crop((0, 0, 64, 64)), EditParams(INSTRUCTION, steps=1, resolution=64))
    runs = alternate({
        "diffusers (plain call)": lambda: plain_call(name, pipe, image, steps, guidance, 0),
        "engine: family.run": engine_family_run,
        "engine: Editor.edit (full path)": engine_edit,
    }, repeats=args.repeats, warmup=not args.no_warmup)
    base = runs["diffusers (plain call)"]["median_s"]
    reference = runs["diffusers (plain call)"]["result"]
    rows = []
    for label, run in runs.items():
        delta = np.abs(np.asarray(run["result"], np.float32) - reference).mean() * 255
        rows.append([label, f"{run['median_s']:.1f}", " ".join(f"{t:.1f}" for t in run["times"]),
                     f"{run['median_s'] / base:.2f}", f"{run['peak_rss'] / 2**30:.2f}", f"{delta:.2f}"])
    print(f"\n## {family.label}: transformer {blocks:.0f} M parameters (reduced depth), built in {built:.0f} s")
    print_table(rows, ["path", "median s", "runs s", "ratio vs diffusers", "peak RSS GiB",
                       "mean |Δ| vs plain (0-255)"])


def overhead_section(args: argparse.Namespace) -> None:
    """The engine's own cost, visible: tiny random models where the model costs milliseconds."""
    from tests.tiny_models import flux

    print(f"\n## Engine overhead on the tiny test models (64×96 px, 2 steps, {args.overhead_repeats} "
          "repeats alternating, medians, 1 thread)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    for name in args.family:
        family = FAMILIES[name]
        pipe = family.prepare(flux.build_tiny_kontext() if name == "kontext" else flux.build_tiny_klein(),
                              torch.float32)
        image = np.random.default_rng(0).random((64, 96, 3)).astype(np.float32)
        guidance = family.params[0].default

        def engine_run(family: Any = family, pipe: Any = pipe, image: np.ndarray = image) -> np.ndarray:
            inputs = RunInputs(image, INSTRUCTION, 2, [0], family.resolve_options({}))
            return family.run(pipe, inputs, StepHooks(step=lambda *a: None), torch.device("cpu"))[0]

        runs = alternate({
            "plain": lambda name=name, pipe=pipe, image=image, guidance=guidance: plain_call(
                name, pipe, image, 2, guidance, 0),
            "engine": engine_run,
        }, repeats=args.overhead_repeats)
        plain_s, engine_s = runs["plain"]["median_s"], runs["engine"]["median_s"]
        rows.append([family.label, f"{plain_s * 1000:.1f}", f"{engine_s * 1000:.1f}",
                     f"{(engine_s - plain_s) * 1000:+.1f}", f"{engine_s / plain_s:.3f}"])
    torch.set_num_threads(threads)
    print_table(rows, ["family", "plain ms", "engine family.run ms", "difference ms", "ratio"])


def gpu_section(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print("\n## GPU: not run (no CUDA device). On a GPU: --device cuda (1 MP, recommended steps, "
              f"each of {', '.join(QUANTIZATIONS)} where its backend runs)")
        rows = [[name, q, "not run", "-", "-"] for name in args.family for q in QUANTIZATIONS]
        print_table(rows, ["family", "quantization", "s/edit", "s/step", "peak VRAM GiB"])
        return
    device = torch.device(args.device)
    print(f"\n## GPU: {torch.cuda.get_device_name(device)}, bf16, ~1 MP, full-depth random weights")
    rows = []
    for name in args.family:
        family = FAMILIES[name]
        steps = args.steps or family.steps.default
        with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
            folder = Path(scratch) / name
            with torch.device(device):  # random init on the GPU: minutes faster for 12 B
                pipe = build(name, full_depth=True)
            pipe.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
            del pipe
            gc.collect()
            torch.cuda.empty_cache()
            for quantization in QUANTIZATIONS:
                if quantization == "gguf":
                    rows.append([name, quantization, "not run", "-", "not run: needs a real .gguf transformer file"])
                    continue
                if quantization not in available_quantizations():
                    rows.append([name, quantization, "not run", "-", "backend not installed / no CUDA"])
                    continue
                try:
                    rows.append([name, quantization, *gpu_edit(family, folder, quantization, steps, device, args.repeats)])
                except Exception as err:  # one backend failing must not hide the others
                    rows.append([name, quantization, "failed", "-", f"{type(err).__name__}: {str(err)[:60]}"])
                gc.collect()
                torch.cuda.empty_cache()
    print_table(rows, ["family", "quantization", "s/edit", "s/step", "peak VRAM GiB"])


def gpu_edit(family: Any, folder: Path, quantization: str, steps: int, device: torch.device,
             repeats: int) -> list[str]:
    from engine.sources import ModelSource

    pipe = family.load(ModelSource("folder", str(folder)), dtype=torch.bfloat16, quantization=quantization)
    pipe.to(device)
    width, height = family.working_size(1024, 1024, None)
    image = np.random.default_rng(0).random((height, width, 3)).astype(np.float32)
    inputs = RunInputs(image, INSTRUCTION, steps, [0], family.resolve_options({}))
    stamps: list[float] = []

    def stamp(i: int, total: int, latents: Any) -> None:
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    hooks = StepHooks(step=stamp)
    family.run(pipe, inputs, hooks, device)  # warm-up
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        stamps.clear()
        torch.cuda.synchronize()
        start = time.perf_counter()
        family.run(pipe, inputs, hooks, device)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    per_step = float(np.median(np.diff(stamps))) if len(stamps) > 1 else float("nan")
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    del pipe
    return [f"{np.median(times):.2f}", f"{per_step:.3f}", f"{peak:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--family", nargs="+", choices=sorted(FAMILIES), default=["kontext", "klein"])
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-warmup", action="store_true",
                        help="warm up with a 1-step 64² edit instead of a full run per path")
    parser.add_argument("--overhead-repeats", type=int, default=25)
    parser.add_argument("--only-overhead", action="store_true", help="skip the reduced-depth section")
    parser.add_argument("--scratch", default=None, help="folder for the GPU section's saved models")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device == "cpu":
        overhead_section(args)
        if not args.only_overhead:
            cpu_section(args)
    gpu_section(args)


if __name__ == "__main__":
    main()
