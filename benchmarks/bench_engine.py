"""Engine speed vs a plain diffusers call, on the full-size InstructPix2Pix architecture.

Random weights with the configs of timbrooks/instruct-pix2pix: the same compute as the real
model, no download. Variants are run alternating in one process; medians and ratios printed.

    python benchmarks/bench_engine.py                      # CPU: 256 px, 4 steps
    python benchmarks/bench_engine.py --device cuda        # GPU: 512 px, 20 steps, fp16
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import alternate, print_table

from engine.editor import Editor
from engine.request import EditParams
from engine.testing import build_full_size_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-variants", action="store_true", help="skip the K=4 comparison")
    args = parser.parse_args()
    gpu = args.device != "cpu"
    resolution = args.resolution or (512 if gpu else 256)
    steps = args.steps or (20 if gpu else 4)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    reference_pipe = build_full_size_pipeline(seed=0)
    reference_pipe.set_progress_bar_config(disable=True)
    reference_pipe.to(args.device)  # diffusers defaults: fp32, no memory savers
    engine = Editor.from_pipeline(copy.deepcopy(reference_pipe), device=args.device, dtype="auto")

    rng = np.random.default_rng(0)
    image = rng.random((resolution, resolution, 3)).astype(np.float32)
    image_tensor = torch.from_numpy(image).permute(2, 0, 1)[None]
    params = EditParams("make it evening", steps=steps, seed=0, resolution=resolution)

    def plain_diffusers() -> np.ndarray:
        return reference_pipe(
            params.instruction, image=image_tensor, num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).images[0]

    def engine_default() -> np.ndarray:
        return engine.edit_working_size(image, params)[0]

    def engine_unit_image_guidance() -> np.ndarray:
        return engine.edit_working_size(image, EditParams(**{**params.__dict__, "image_guidance": 1.0}))[0]

    print(f"# bench_engine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {args.device}, engine dtype {str(engine.dtype).removeprefix('torch.')}, "
          f"{resolution}² px, {steps} steps, {args.repeats} repeats (medians)")
    runs = alternate(
        {"diffusers fp32 (plain call)": plain_diffusers, "engine default": engine_default,
         "engine s_I = 1 (2 rows)": engine_unit_image_guidance},
        repeats=args.repeats,
    )
    base = runs["diffusers fp32 (plain call)"]["median_s"]
    reference = runs["diffusers fp32 (plain call)"]["result"]
    rows = []
    for name, run in runs.items():
        mad = np.abs(run["result"] - reference).mean() * 255
        rows.append([name, f"{run['median_s']:.2f}", f"{base / run['median_s']:.2f}×",
                     f"{run['peak_rss'] / 2**30:.2f}", f"{mad:.2f}" if name == "engine default" else "-"])
    print_table(rows, ["path", "median s/edit", "speed-up vs diffusers", "peak RSS GiB",
                       "mean |Δpixel| vs fp32 (0-255)"])

    if not args.skip_variants:
        k = 4
        batched_params = EditParams(**{**params.__dict__, "variants": k})
        variant_runs = alternate(
            {
                f"K={k} batched": lambda: engine.edit_working_size(image, batched_params),
                f"{k} single runs": lambda: [
                    engine.edit_working_size(image, batched_params.for_variant(i))[0] for i in range(k)
                ],
            },
            repeats=max(1, args.repeats - 1), warmup=False,
        )
        b, s = (variant_runs[n]["median_s"] for n in variant_runs)
        print()
        print_table(
            [[n, f"{r['median_s']:.2f}", f"{r['peak_rss'] / 2**30:.2f}"] for n, r in variant_runs.items()],
            ["variants (engine default)", "median s", "peak RSS GiB"],
        )
        print(f"batched / singles time ratio: {b / s:.2f}")


if __name__ == "__main__":
    main()
