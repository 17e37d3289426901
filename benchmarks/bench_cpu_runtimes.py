"""CPU speed of an InstructPix2Pix edit: plain diffusers fp32 vs the engine on PyTorch and on
OpenVINO, full-size architecture with random weights (the real model's compute, no download).

All contenders run alternating in one process on the same inputs; medians and each one's
ratio to plain diffusers fp32 are printed, with the CPU named. Quality: mean |Δ| (0–255) of
each engine result against the engine's own PyTorch fp32 result for the same seed (random
weights give noise-like images, so this is a strict bound: real pictures differ less).

    python benchmarks/bench_cpu_runtimes.py                       # 256 px, 4 steps, 3 repeats
    python benchmarks/bench_cpu_runtimes.py --default-edit        # + the default edit (512 px, 20 steps)
    python benchmarks/bench_cpu_runtimes.py --isa avx2            # an AVX2-only CPU, emulated
    python benchmarks/bench_cpu_runtimes.py --isa avx2-vnni       # AVX2 with VNNI (Alder Lake, Zen 5 class)

`--isa` runs the script again with PyTorch (ATen), oneDNN (PyTorch's and OpenVINO's) and MKL
capped to that instruction set, and fp32 (such CPUs have no native bf16); the table says so.
The first OpenVINO use converts the UNet and VAE, and the int8 runtime calibrates its UNet
(both reported separately, cached on disk).
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

# Environment caps that make PyTorch, oneDNN and MKL use only the named instruction set.
ISA_CAPS = {
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx2-vnni": {"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI", "ATEN_CPU_CAPABILITY": "avx2",
                  "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}  # fmt: skip


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
    parser.add_argument("--isa", default=None, choices=tuple(ISA_CAPS),
                        help="emulate an older CPU: cap the instruction set (implies --dtype fp32)")
    parser.add_argument("--no-int8", action="store_true", help="leave out the int8 runtime")
    args = parser.parse_args()
    if args.isa and os.environ.get("ONEDNN_MAX_CPU_ISA") != ISA_CAPS[args.isa]["ONEDNN_MAX_CPU_ISA"]:
        # The caps are read when the libraries load: run again with them set.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ISA_CAPS[args.isa]})
    if args.isa:
        args.dtype = "fp32"
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("INSTRUCT_EDIT_CACHE", str(Path(tempfile.gettempdir()) / "ie-bench-cache"))

    from tests.tiny_models.sd import build_full_size_pipeline

    capped = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("ATEN_CPU_CAPABILITY")
    print(f"CPU: {cpu_name()}; threads {torch.get_num_threads()}"
          + (f"; ISA capped (emulating an older CPU): ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}, "
             f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY')}, "
             f"MKL_ENABLE_INSTRUCTIONS={os.environ.get('MKL_ENABLE_INSTRUCTIONS')}" if capped else ""))
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
        # Warm up at the measured size: under an ISA cap OpenVINO's dynamic-shape UNet crashes
        # at most sizes but multiples of 256 px (benchmarks/README.md, issue 13).
        warm = np.random.default_rng(1).random((args.resolution, args.resolution, 3)).astype(np.float32)
        ov_engine.edit_working_size(warm, _params(1))
    print(f"OpenVINO first use (convert + compile UNet and VAE, {ov_engine._accelerator.precision}): "
          f"{time.perf_counter() - started:.0f} s, peak RSS {convert_peak.peak / 2**30:.1f} GiB; "
          "cached for later runs")
    int8_engine = None
    if not args.no_int8:
        started = time.perf_counter()
        with PeakRSS() as quantize_peak:
            int8_engine = Editor.from_pipeline(engine_pipe, device="cpu", dtype=args.dtype,
                                               runtime="openvino-int8")
            int8_engine._accelerator.report = print
            int8_engine.edit_working_size(warm, _params(1))
        error = next(iter(int8_engine._accelerator._compiled.values())).int8_error
        print(f"OpenVINO int8 UNet first use (record 4 short edits, calibrate, check): "
              f"{time.perf_counter() - started:.0f} s, peak RSS {quantize_peak.peak / 2**30:.1f} GiB; "
              f"UNet output change on held-out steps: "
              + (f"{error:.1%}" if error is not None else "no int8 UNet (see the line above)"))

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
    if int8_engine is not None:
        contenders["engine openvino int8 UNet"] = lambda: int8_engine.edit_working_size(image, params)[0]
        contenders["engine openvino int8 UNet, s_I=1"] = lambda: int8_engine.edit_working_size(image, _params(args.steps, s_i=1.0))[0]  # fmt: skip
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
    for name in (ov_name, "engine openvino int8 UNet"):
        if name in results:
            print(f"\n{name}: s_I=1 / 3 rows, whole edit: "
                  f"{results[name + ', s_I=1']['median_s'] / results[name]['median_s']:.2f}")

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
        engines = {f"openvino {ov_engine._accelerator.precision}": ov_engine}
        if int8_engine is not None:
            engines["openvino int8 UNet"] = int8_engine
        default_edit(engines, pipe32)


def default_edit(engines: dict[str, Editor], pipe32: object) -> None:
    """The default edit (512 px, 20 steps, s_I 1.5 and s_I 1) and the fast preset's shape
    (LCM scheduler, 4 steps, s_I = 1; the LCM-LoRA itself cannot be downloaded here, and a
    LoRA costs nothing extra once the converted UNet is cached), once each per engine,
    alternating. Plain diffusers fp32 is timed for 2 steps (its per-step cost at 512 px)."""
    image = np.random.default_rng(0).random((512, 512, 3)).astype(np.float32)
    shapes = {
        "default edit: 512 px, 20 steps, s_T 7.5, s_I 1.5": _params(20),
        "the same with s_I 1 (2 UNet rows)": _params(20, 1.0),
        "fast preset shape: 512 px, LCM 4 steps, s_T 1.5, s_I 1": _params(4, 1.0, "lcm", 1.5),
    }
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None]
    timings: dict[tuple[str, str], float] = {}
    for shape, params in shapes.items():
        for engine_name, engine in engines.items():
            t0 = time.perf_counter()
            engine.edit_working_size(image, params)
            timings[(shape, engine_name)] = time.perf_counter() - t0
    diffusers_two = {}
    for steps in (1, 2):  # the difference of 2 and 1 steps is one step; the rest is VAE + text
        t0 = time.perf_counter()
        pipe32("make it evening", image=tensor, num_inference_steps=steps, guidance_scale=7.5,  # type: ignore[operator]
               image_guidance_scale=1.5, generator=torch.Generator().manual_seed(0), output_type="np")
        diffusers_two[steps] = time.perf_counter() - t0
    per_step = diffusers_two[2] - diffusers_two[1]
    diffusers_20 = diffusers_two[1] + 19 * per_step
    print()
    rows = []
    for shape in shapes:
        row = [shape]
        for engine_name in engines:
            seconds = timings[(shape, engine_name)]
            row.append(f"{seconds:.1f}" + (f" ({seconds / diffusers_20:.2f})" if "20 steps" in shape and "s_I 1.5" in shape else ""))
        rows.append(row)
    print_table(rows, ["512 px edit", *[f"{n} s" for n in engines]])
    for engine_name in engines:
        ratio = timings[("the same with s_I 1 (2 UNet rows)", engine_name)] / timings[("default edit: 512 px, 20 steps, s_T 7.5, s_I 1.5", engine_name)]
        print(f"{engine_name}: s_I 1 / s_I 1.5, default edit: {ratio:.2f}")
    print(f"plain diffusers fp32 at 512 px: 1 step {diffusers_two[1]:.1f} s, 2 steps {diffusers_two[2]:.1f} s; "
          f"20 steps extrapolated {diffusers_20:.0f} s (the ratios in brackets are to this)")


if __name__ == "__main__":
    main()
