"""CPU speed of an InstructPix2Pix edit: plain diffusers fp32 vs the engine on PyTorch and on
OpenVINO, full-size architecture with random weights (the real model's compute, no download).

All contenders run alternating in one process on the same inputs; medians and each one's
ratio to plain diffusers fp32 are printed, with the CPU named. Quality: mean |Δ| (0–255) of
each engine result against the engine's own PyTorch fp32 result for the same seed (random
weights give noise-like images, so this is a strict bound: real pictures differ less).

    python benchmarks/bench_cpu_runtimes.py                       # 256 px, 4 steps, 3 repeats
    python benchmarks/bench_cpu_runtimes.py --default-edit        # + 512 px / 20 steps estimate
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_cpu_runtimes.py --dtype fp32
        # an AVX2-only CPU emulated on a newer one (PyTorch and oneDNN capped; labelled so)

The first OpenVINO use converts the UNet and VAE (reported separately, cached on disk).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PeakRSS, alternate, print_table

from engine import imaging
from engine.devices import cpu_name
from engine.editor import Editor
from engine.request import EditParams


def _params(steps: int, s_i: float = 1.5, scheduler: str = "default", s_t: float = 7.5) -> EditParams:
    return EditParams(
        "make it evening",
        steps=steps,
        seed=0,
        options={"text_guidance": s_t, "image_guidance": s_i, "scheduler": scheduler},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                        help="the engine's dtype (auto: bf16 where the CPU has it natively)")
    parser.add_argument("--default-edit", action="store_true",
                        help="also time the default edit (512 px, 20 steps) and the fast preset")
    parser.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("INSTRUCT_EDIT_CACHE", str(Path(tempfile.gettempdir()) / "ie-bench-cache"))

    from tests.tiny_models.sd import build_full_size_pipeline

    capped = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("ATEN_CPU_CAPABILITY")
    print(f"CPU: {cpu_name()}; threads {torch.get_num_threads()}"
          + (f"; ISA capped: ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}, "
             f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY')}" if capped else ""))
    print(f"sd-ip2p full size (UNet 859.5 M, VAE 83.7 M, CLIP-L 123.1 M), random weights; "
          f"{args.resolution} px, {args.steps} steps, {args.repeats} repeats alternating")

    pipe32 = build_full_size_pipeline(seed=0)
    pipe32.set_progress_bar_config(disable=True)
    reference_engine = Editor.from_pipeline(pipe32, device="cpu", dtype="fp32")
    engine_pipe = copy.deepcopy(pipe32) if args.dtype != "fp32" else pipe32
    torch_engine = Editor.from_pipeline(engine_pipe, device="cpu", dtype=args.dtype)
    started = time.perf_counter()
    with PeakRSS() as convert_peak:
        ov_engine = Editor.from_pipeline(engine_pipe, device="cpu", dtype=args.dtype,
                                         runtime="openvino")
        warm = np.random.default_rng(1).random((64, 64, 3)).astype(np.float32)
        ov_engine.edit_working_size(warm, _params(1))
    print(f"OpenVINO first use (convert + compile UNet and VAE, {ov_engine._accelerator.precision}): "
          f"{time.perf_counter() - started:.0f} s, peak RSS {convert_peak.peak / 2**30:.1f} GiB; "
          "cached for later runs")

    size = args.resolution
    image = np.random.default_rng(0).random((size, size, 3)).astype(np.float32)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None]
    params = _params(args.steps)

    def diffusers_fp32() -> np.ndarray:
        return pipe32(params.instruction, image=tensor, num_inference_steps=params.steps,
                      guidance_scale=7.5, image_guidance_scale=1.5,
                      generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    contenders = {
        "diffusers fp32": diffusers_fp32,
        f"engine torch {torch_engine.dtype}".replace("torch.", ""): lambda: torch_engine.edit_working_size(image, params)[0],
        f"engine openvino {ov_engine._accelerator.precision}": lambda: ov_engine.edit_working_size(image, params)[0],
        f"engine openvino {ov_engine._accelerator.precision}, s_I=1": lambda: ov_engine.edit_working_size(image, _params(args.steps, s_i=1.0))[0],
    }  # fmt: skip
    results = alternate(contenders, args.repeats)
    truth = reference_engine.edit_working_size(image, params)[0]
    truth_si1 = reference_engine.edit_working_size(image, _params(args.steps, s_i=1.0))[0]
    base = results["diffusers fp32"]["median_s"]
    rows = []
    for name, r in results.items():
        ref = truth_si1 if "s_I=1" in name else truth
        delta = float(np.abs(np.asarray(r["result"], np.float32) - ref).mean() * 255)
        rows.append([name, f"{r['median_s']:.2f}", f"{r['median_s'] / base:.2f}",
                     f"{delta:.2f}", f"{r['peak_rss'] / 2**30:.1f}"])
    print()
    print_table(rows, ["contender", "median s", "ratio to diffusers fp32", "mean |Δ| vs engine fp32", "peak RSS GiB"])
    ov_name = f"engine openvino {ov_engine._accelerator.precision}"
    print(f"\nOpenVINO s_I=1 / OpenVINO 3 rows: "
          f"{results[ov_name + ', s_I=1']['median_s'] / results[ov_name]['median_s']:.2f}")

    # Previews: the linear latent map the engine uses (no VAE decode), per call vs one step.
    latents = torch.randn(1, 4, size // 8, size // 8)
    factors, bias = ov_engine.family.latent_rgb
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        imaging.latent_preview(latents, factors, bias)
        times.append(time.perf_counter() - t0)
    step_s = results[ov_name]["median_s"] / args.steps
    print(f"preview (linear latent map): {statistics.median(times) * 1000:.2f} ms per preview "
          f"= {statistics.median(times) / step_s * 100:.2f} % of one OpenVINO step "
          "(one preview per step at most)")

    if args.default_edit:
        default_edit(ov_engine, torch_engine, pipe32)


def default_edit(ov_engine: Editor, torch_engine: Editor, pipe32: object) -> None:
    """The default edit (512 px, 20 steps) on OpenVINO, and the fast preset's shape
    (LCM scheduler, 4 steps, s_I = 1; the LCM-LoRA itself cannot be downloaded here, and a
    LoRA costs nothing extra once the converted UNet is cached)."""
    image = np.random.default_rng(0).random((512, 512, 3)).astype(np.float32)
    timings = {}
    for name, params in (
        ("default edit: 512 px, 20 steps, s_T 7.5, s_I 1.5", _params(20)),
        ("the same with s_I 1 (2 UNet rows)", _params(20, 1.0)),
        ("fast preset shape: 512 px, LCM 4 steps, s_T 1.5, s_I 1", _params(4, 1.0, "lcm", 1.5)),
    ):
        t0 = time.perf_counter()
        ov_engine.edit_working_size(image, params)
        timings[name] = time.perf_counter() - t0
    # PyTorch per-step time at 512 px for comparison (2 steps, extrapolated to 20).
    t0 = time.perf_counter()
    torch_engine.edit_working_size(image, _params(2))
    torch_two = time.perf_counter() - t0
    print()
    rows = [[name, f"{s:.1f}"] for name, s in timings.items()]
    rows.append([f"engine torch {str(torch_engine.dtype).replace('torch.', '')}, 2 steps (measured)", f"{torch_two:.1f}"])
    print_table(rows, ["512 px edit on OpenVINO", "seconds"])


if __name__ == "__main__":
    main()
