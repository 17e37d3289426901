"""Qwen-Image-Edit family: the engine's run vs the plain diffusers QwenImageEditPlusPipeline.

CPU (default): the real 20B/7B model cannot run on a 2-core, 24 GiB machine, so this builds a
*reduced-depth* model of the real WIDTH with random weights: QwenImageTransformer2DModel at its
real width (24 heads × 128 = 3072, joint dim 3584, RoPE axes 16/56/56, 2511's zero_cond_t) with
`--layers` blocks (the real model has 60), a Qwen2.5-VL text encoder of the real width (hidden
3584, MLP 18944, 28 heads / 4 KV heads) with `--text-layers` layers (real: 28) and a vision tower
of the real width (1280, 16 heads) with `--vision-layers` blocks (real: 32), the real
AutoencoderKLQwenImage (base 96, full depth) and the real processor settings. The tokenizer is
the tests' small byte-level BPE (so the vocabulary, an embedding lookup, is tiny, and the
prompt template is ~300 tokens instead of ~90). The pipeline encodes the reference image at
`VAE_IMAGE_SIZE` (1 MP) whatever the output size; here that constant is set to the working
size (`--size`²) so a run fits the CPU budget — both paths run with the same setting.

Alternating runs (A B C A B C …), medians, ratio vs the plain pipeline, the CPU named.
`--device cuda`: the GPU section (1 MP, 40 steps with true CFG / Lightning-style 8 steps with
true_cfg_scale 1, each quantization of `--model` when real weights are at hand, else the
full-size random architecture in bf16 unquantized); without CUDA it prints "not run".
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import alternate, print_table  # noqa: E402


def cpu_name() -> str:
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        extras = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in flags]
        name += f" ({', '.join(extras[:2])})" if extras else ""
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def build_reduced_pipeline(layers: int, text_layers: int, vision_layers: int, dtype: torch.dtype,
                           device: str = "cpu"):
    """Random weights, built directly on `device` in `dtype` (no fp32 copy of a 20B model)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return _build(layers, text_layers, vision_layers, dtype)
    finally:
        torch.set_default_dtype(previous)


def _build(layers: int, text_layers: int, vision_layers: int, dtype: torch.dtype):
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from tiny_models.qwen import (
        LATENTS_MEAN,
        LATENTS_STD,
        SCHEDULER_CONFIG,
        SPECIAL_TOKENS,
        build_tokenizer,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from engine.families.qwen_edit import processor_without_video

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    with processor_without_video():  # the real Qwen-Image-Edit processor settings
        processor = Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056,
                                                     patch_size=14, temporal_patch_size=2,
                                                     merge_size=2),
            tokenizer=tokenizer)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=3584, intermediate_size=18944,
            num_hidden_layers=text_layers, num_attention_heads=28, num_key_value_heads=4,
            rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
            rope_theta=1_000_000.0, rms_norm_eps=1e-6, bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=vision_layers, hidden_size=1280, intermediate_size=3420,
                           num_heads=16, out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    transformer = QwenImageTransformer2DModel(num_layers=layers, zero_cond_t=True)  # real widths
    vae = AutoencoderKLQwenImage(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                 temperal_downsample=[False, True, True],
                                 latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    pipe = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, processor=processor,
        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def params_billion(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e9


def cpu_section(args: argparse.Namespace) -> None:
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_module
    from PIL import Image

    from engine.editor import Editor
    from engine.families.base import RunInputs, StepHooks
    from engine.families.qwen_edit import QWEN_IMAGE_EDIT as family
    from engine.request import EditParams

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    start = time.perf_counter()
    pipe = build_reduced_pipeline(args.layers, args.text_layers, args.vision_layers, dtype)
    built = time.perf_counter() - start
    plus_module.VAE_IMAGE_SIZE = args.size * args.size  # see the module docstring
    width, height = family.working_size(args.size * 3 // 2, args.size, args.size)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    working = image.astype(np.float32) / 255.0
    options = family.resolve_options({"true_cfg_scale": args.cfg})
    instruction = "make the sky purple"
    editor = Editor.from_pipeline(pipe, device="cpu", dtype=args.dtype)

    def plain() -> np.ndarray:
        return pipe(image=Image.fromarray(image), prompt=instruction,
                    negative_prompt=" " if args.cfg > 1 else None, true_cfg_scale=args.cfg,
                    height=height, width=width, num_inference_steps=args.steps,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]

    def engine_run() -> np.ndarray:
        inputs = RunInputs(image=working, instruction=instruction, steps=args.steps, seeds=[0],
                           options=options)
        return family.run(pipe, inputs, StepHooks(step=lambda *_: None), torch.device("cpu"))[0]

    def engine_editor() -> np.ndarray:
        params = EditParams(instruction=instruction, seed=0, steps=args.steps, resolution=args.size,
                            options={"true_cfg_scale": args.cfg})
        return editor.edit_working_size(working, params)[0]

    print(f"CPU: {cpu_name()}; torch {torch.__version__}; dtype {args.dtype}")
    print(f"model: transformer {args.layers}/60 blocks at full width "
          f"({params_billion(pipe.transformer):.2f} B params), text encoder {args.text_layers}/28 "
          f"layers + vision {args.vision_layers}/32 blocks "
          f"({params_billion(pipe.text_encoder):.2f} B),"
          f" VAE full ({params_billion(pipe.vae):.3f} B); built in {built:.1f} s")
    print(f"edit: {width}×{height} working size, reference for the VAE at {width}×{height} "
          f"(VAE_IMAGE_SIZE lowered from 1 MP), {args.steps} steps, true_cfg_scale {args.cfg} "
          f"({'2 branches' if args.cfg > 1 else '1 branch'}), {args.repeats} repeats alternating")
    paths = {"diffusers pipeline": plain, "engine family.run": engine_run,
             "engine Editor.edit_working_size": engine_editor}
    cpu_times: dict[str, list[float]] = {name: [] for name in paths}

    def with_cpu_time(name: str):  # process CPU seconds too: less sensitive to other load
        def run() -> np.ndarray:
            start = time.process_time()
            result = paths[name]()
            cpu_times[name].append(time.process_time() - start)
            return result
        return run

    if args.warmup:  # one warm-up run (oneDNN kernels, first-touch memory), shared by all paths
        plain()
    stats = alternate({name: with_cpu_time(name) for name in paths}, repeats=args.repeats,
                      warmup=False)
    base = stats["diffusers pipeline"]["median_s"]
    base_cpu = float(np.median(cpu_times["diffusers pipeline"]))
    rows = []
    for name, s in stats.items():
        diff = np.abs(s["result"] - stats["diffusers pipeline"]["result"]).max()
        cpu = float(np.median(cpu_times[name]))
        rows.append([name, f"{s['median_s']:.2f}", " ".join(f"{t:.1f}" for t in s["times"]),
                     f"{s['median_s'] / base:.3f}", f"{cpu:.1f}", f"{cpu / base_cpu:.3f}",
                     f"{diff:.1e}", f"{s['peak_rss'] / 2**30:.2f}"])
    print_table(rows, ["path", "median s", "runs s", "ratio", "median CPU s", "CPU ratio",
                       "max |Δ| vs diffusers", "peak RSS GiB"])
    print(f"load average during the run: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
          f"(on {os.cpu_count()} cores)")
    # What the engine adds around the pipeline call, measured alone (deterministic, unlike the
    # wall times above): preparing the call (float image → PIL, generators) at 1 MP, and the
    # per-step callback.
    w1, h1 = family.working_size(1536, 1024, None)
    big = RunInputs(image=np.random.default_rng(1).random((h1, w1, 3), dtype=np.float32),
                    instruction=instruction, steps=40, seeds=[0, 1], options=options)
    prep = []
    for _ in range(20):
        start = time.perf_counter()
        family.pipeline_kwargs(big)
        prep.append(time.perf_counter() - start)
    print(f"engine-only work per edit at {w1}×{h1}: preparing the call "
          f"{np.median(prep) * 1e3:.1f} ms (median of 20); per step one Python callback")


def gpu_section(args: argparse.Namespace) -> None:
    print("\nGPU section: Qwen-Image-Edit at ~1 MP")
    header = ["setting", "quantization", "steps", "true_cfg_scale", "median s", "peak VRAM GiB"]
    settings = [("recommended", 40, 4.0), ("Lightning 8-step LoRA (preset)", 8, 1.0)]
    quantizations = ("none", "bnb-8bit", "bnb-4bit", "torchao-int8", "gguf")
    if not torch.cuda.is_available():
        print_table([[name, q, str(steps), str(cfg), "not run", "not run"]
                     for name, steps, cfg in settings for q in quantizations], header)
        print("(not run: no CUDA device on this machine)")
        return
    from engine.families.qwen_edit import QWEN_IMAGE_EDIT as family
    from engine.sources import resolve_model_source

    device = torch.device("cuda")
    width, height = family.working_size(1536, 1024, None)
    rng = np.random.default_rng(0)
    working = rng.random((height, width, 3), dtype=np.float32)
    rows = []
    for quantization in quantizations:
        if quantization == "gguf" and not (args.model or "").endswith(".gguf"):
            rows += [[n, quantization, str(s), str(c), "not run (needs a .gguf --model)", "-"]
                     for n, s, c in settings]
            continue
        try:
            if args.model:
                pipe = family.load(resolve_model_source(args.model), dtype=torch.bfloat16,
                                   quantization=quantization, config=args.config)
            elif quantization == "none":
                pipe = build_reduced_pipeline(60, 28, 32, torch.bfloat16, "cuda")
            else:
                rows += [[n, quantization, str(s), str(c), "not run (needs real weights: --model)",
                          "-"] for n, s, c in settings]
                continue
        except Exception as err:  # a backend missing on this machine
            rows += [[n, quantization, str(s), str(c), f"not run ({type(err).__name__})", "-"]
                     for n, s, c in settings]
            continue
        pipe.to(device)
        from engine.families.base import RunInputs, StepHooks

        for name, steps, cfg in settings:
            inputs = RunInputs(image=working, instruction="make the sky purple", steps=steps,
                               seeds=[0], options=family.resolve_options({"true_cfg_scale": cfg}))
            times = []
            torch.cuda.reset_peak_memory_stats()
            for _ in range(1 + args.repeats):  # the first is warm-up
                torch.cuda.synchronize()
                start = time.perf_counter()
                family.run(pipe, inputs, StepHooks(step=lambda *_: None), device)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            rows.append([name, quantization, str(steps), str(cfg), f"{np.median(times[1:]):.2f}",
                         f"{torch.cuda.max_memory_allocated() / 2**30:.1f}"])
        del pipe
        torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()} — {width}×{height}")
    print_table(rows, header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1, help="transformer blocks (real: 60)")
    parser.add_argument("--text-layers", type=int, default=1, help="text layers (real: 28)")
    parser.add_argument("--vision-layers", type=int, default=1, help="vision blocks (real: 32)")
    parser.add_argument("--size", type=int, default=256, help="working size ~size² pixels")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cfg", type=float, default=4.0, help="true_cfg_scale (1: one branch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16",
                        help="bf16: ~2× faster on CPUs with AVX512-BF16/AMX, same for both paths")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--model", default=None, help="GPU: real weights (hub id, folder, .gguf)")
    parser.add_argument("--config", default=None, help="GPU: base model of a single file")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_cpu:
        cpu_section(args)
    gpu_section(args)


if __name__ == "__main__":
    main()
