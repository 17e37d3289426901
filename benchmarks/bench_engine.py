"""Engine speed vs a plain diffusers call, per model family, on full-size architectures.

Random weights with the real configs: the same compute as the real model, no download. Per
family the engine (`Editor.edit_working_size`) and the family's plain diffusers pipeline run
alternating in one process on the same inputs; medians and the engine/diffusers time ratio are
printed (≤ 1.0: the engine is not slower). The CPU is named in the header (figures differ a lot
between machines). A GPU table is printed as "not run" unless CUDA is available.

    python benchmarks/bench_engine.py                              # CPU: sd-ip2p, 256 px, 4 steps
    python benchmarks/bench_engine.py --family sdxl-ip2p --dtype bf16   # SDXL (~7 GB in bf16)
    python benchmarks/bench_engine.py --resolution 128 --steps 2 --repeats 1   # smoke run
    python benchmarks/bench_engine.py --device cuda                # GPU: each family's size and steps

Adding a family: write `case_<family>(args) -> Case` below (or in your own module and add it to
CASES): a full-size random pipeline, the params, and the plain diffusers call on the same inputs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import alternate, print_table

from engine.devices import DTYPES, cpu_name
from engine.editor import Editor
from engine.request import EditParams


@dataclass
class Case:
    """One family's benchmark: a full-size random pipeline and how plain diffusers calls it."""

    family: str
    pipe: object
    params: EditParams
    # plain diffusers on (pipe, H×W×3 float image, params) → H×W×3 float result
    reference: Callable[[object, np.ndarray, EditParams], np.ndarray]
    note: str = ""
    resolution: int = 256  # used when --resolution is not given


def _ip2p_reference(pipe, image: np.ndarray, params: EditParams, sdxl: bool = False) -> np.ndarray:
    extra = {"height": image.shape[0], "width": image.shape[1]} if sdxl else {}
    return pipe(
        params.instruction, image=torch.from_numpy(image).permute(2, 0, 1)[None],
        num_inference_steps=params.steps, guidance_scale=params.options["text_guidance"],
        image_guidance_scale=params.options["image_guidance"],
        generator=torch.Generator().manual_seed(params.seed), output_type="np", **extra,
    ).images[0]


def case_sd_ip2p(args: argparse.Namespace) -> Case:
    from tests.tiny_models.sd import build_full_size_pipeline

    gpu = args.device != "cpu"
    params = EditParams("make it evening", steps=args.steps or (20 if gpu else 4), seed=0,
                        options={"text_guidance": 7.5, "image_guidance": 1.5})
    return Case("sd-ip2p", build_full_size_pipeline(seed=0), params, _ip2p_reference,
                "UNet 859.5 M, VAE 83.7 M, CLIP-L 123.1 M", resolution=512 if gpu else 256)


def case_sdxl_ip2p(args: argparse.Namespace) -> Case:
    from tests.tiny_models.sdxl import build_full_size_sdxl_pipeline

    gpu = args.device != "cpu"
    params = EditParams("make it evening", steps=args.steps or (30 if gpu else 4), seed=0,
                        options={"text_guidance": 7.5, "image_guidance": 1.5})
    pipe = build_full_size_sdxl_pipeline(seed=0, dtype=DTYPES[args.dtype])
    return Case("sdxl-ip2p", pipe, params, lambda p, i, q: _ip2p_reference(p, i, q, sdxl=True),
                "UNet 2.6 B, CLIP-L + bigG", resolution=768 if gpu else 256)


# Families add their rows here (the FLUX and Qwen helpers keep their own scripts for now:
# benchmarks/bench_families_flux.py, benchmarks/bench_family_qwen.py).
CASES: dict[str, Callable[[argparse.Namespace], Case]] = {
    "sd-ip2p": case_sd_ip2p,
    "sdxl-ip2p": case_sdxl_ip2p,
}


def gpu_peak(fn: Callable[[], object], peaks: dict[str, float], name: str) -> Callable[[], object]:
    """`fn`, recording the CUDA peak allocation (GiB) of its last run under `name`."""

    def run() -> object:
        if not torch.cuda.is_available():
            return fn()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30
        return result

    return run


def run_case(case: Case, args: argparse.Namespace) -> list[list[str]]:
    rng = np.random.default_rng(0)
    resolution = args.resolution or case.resolution
    image = rng.random((resolution, resolution, 3)).astype(np.float32)
    pipe = case.pipe
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    if pipe.dtype != DTYPES[args.dtype]:
        pipe.to(dtype=DTYPES[args.dtype])
    # The engine works on the same weights when the dtype is the same (no second copy in RAM).
    engine_pipe = pipe if args.engine_dtype == args.dtype else copy.deepcopy(pipe)
    engine = Editor.from_pipeline(engine_pipe, device=args.device, dtype=args.engine_dtype)
    params = case.params
    unit = params.with_options(image_guidance=1.0)
    peaks: dict[str, float] = {}
    variants = {
        f"diffusers {args.dtype} (plain call)": lambda: case.reference(pipe, image, params),
        f"engine {args.engine_dtype}": lambda: engine.edit_working_size(image, params)[0],
        f"engine {args.engine_dtype}, s_I = 1 (2 rows)": lambda: engine.edit_working_size(image, unit)[0],
    }
    if args.compile != "off" and case.family in ("sd-ip2p", "sdxl-ip2p"):
        compiled = Editor.from_pipeline(engine_pipe, device=args.device, dtype=args.engine_dtype,
                                        compile=args.compile)
        started = time.perf_counter()
        compiled.edit_working_size(image, params)  # warm-up: the compilation itself
        print(f"# {case.family}: torch.compile ({args.compile}) warm-up {time.perf_counter() - started:.1f} s "
              "(first edit of the model; later sizes reuse the graph)")
        variants[f"engine {args.engine_dtype}, compiled ({args.compile})"] = (
            lambda: compiled.edit_working_size(image, params)[0])
    runs = alternate({name: gpu_peak(fn, peaks, name) for name, fn in variants.items()},
                     repeats=args.repeats, warmup=args.repeats > 1)
    names = list(runs)
    base = runs[names[0]]["median_s"]
    reference = runs[names[0]]["result"]
    rows = []
    for name in names:
        run = runs[name]
        mad = np.abs(run["result"] - reference).mean() * 255 if name == names[1] else None
        rows.append([case.family, f"{resolution}² px, {params.steps} steps", name, f"{run['median_s']:.2f}",
                     f"{run['median_s'] / base:.2f}", f"{run['peak_rss'] / 2**30:.2f}",
                     f"{peaks[name]:.2f}" if name in peaks else "-", f"{mad:.3f}" if mad is not None else "-"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="append", choices=sorted(CASES),
                        help="repeatable (default: sd-ip2p on the CPU, every family on a GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="diffusers' dtype (default fp32 on the CPU, fp16 on a GPU)")
    parser.add_argument("--engine-dtype", default=None, choices=sorted(DTYPES),
                        help="the engine's dtype (default: the same as --dtype)")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", default="off", choices=("off", "default", "max-autotune", "reduce-overhead"),
                        help="also time the engine with torch.compile (InstructPix2Pix families)")
    args = parser.parse_args()
    gpu = args.device != "cpu"
    args.dtype = args.dtype or ("fp16" if gpu else "fp32")
    args.engine_dtype = args.engine_dtype or args.dtype
    families = args.family or (sorted(CASES) if gpu else ["sd-ip2p"])
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    print(f"# bench_engine: CPU {cpu_name()}, {torch.get_num_threads()} threads, device {args.device}, "
          f"diffusers {args.dtype} / engine {args.engine_dtype}, {args.repeats} repeats (medians), alternating")
    rows = []
    for family in families:
        case = CASES[family](args)
        print(f"# {family}: {case.note}")
        rows.extend(run_case(case, args))
        del case
        gc.collect()
    print_table(rows, ["family", "size", "path", "median s/edit", "time vs diffusers", "peak RSS GiB",
                       "peak CUDA GiB", "mean |Δpixel| vs diffusers (0-255)"])
    if not gpu:
        print()
        print("## GPU (each family's recommended size and steps; quantizations: the families' own "
              "benchmarks): not run "
              f"({'CUDA available: run with --device cuda' if torch.cuda.is_available() else 'no CUDA here'})")


if __name__ == "__main__":
    main()
