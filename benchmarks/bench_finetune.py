"""Fine-tuning cost of the flow-matching edit models at full size: s/step, memory, GPU plans.

The real models (FLUX.1 Kontext 12 B, …) do not fit this machine (24 GiB shared, ~6 GiB for
a benchmark), so each family's row function builds ONE transformer block of each kind with the
real widths and random weights, adds the same LoRA (rank 16) the trainer adds, and times a
training forward + backward at the real sequence length (512 px: 1024 target + 1024 reference
+ 512 text tokens for Kontext). The step of the whole transformer is extrapolated from the
blocks (× the real depth) and labelled so. The activation memory is COUNTED, not sampled: the
bytes of every tensor autograd saves for the backward pass (`saved_tensors_hooks`), so it is
the same on any device. With those and the parameter counts, the GPU table says which GPU
sizes hold a LoRA fine-tune with a bf16, int8 or 4-bit frozen base and gradient checkpointing
(estimates: weights + adapter with AdamW state + activations + a fixed CUDA overhead).

    python benchmarks/bench_finetune.py                       # every family, CPU, bf16
    python benchmarks/bench_finetune.py --family flux-kontext --repeats 3
    python benchmarks/bench_finetune.py --device cuda         # the same on a GPU
    flock /tmp/team/heavy.lock python benchmarks/bench_finetune.py   # on the shared machine

Other families add a row function to `FAMILIES` (name → function(args) → FamilyResult).
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PeakRSS, print_table

GIB = 1024**3
LORA_RANK = 16
# Per trainable parameter: fp32 weight + fp32 gradient + AdamW's two fp32 moments.
ADAPTER_BYTES_PER_PARAM = 16
# Frozen base weights, bytes per parameter: bf16; torchao/bnb int8 (+ per-row scales);
# bnb NF4 (4 bit + one absmax per 64 weights, double-quantized).
BASE_BYTES = {"bf16": 2.0, "int8": 1.0 + 0.01, "4-bit": 0.5 + 0.03}
CUDA_OVERHEAD = 1.5 * GIB  # CUDA context, cuBLAS workspaces, allocator slack (estimate)
GPU_SIZES_GB = (12, 16, 24, 32, 40, 48, 80)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                flags = Path("/proc/cpuinfo").read_text()
                extras = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
                return f"{name} ({', '.join(extras) or 'no bf16 units'})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------
# Measuring one block


@dataclass
class BlockMeasure:
    kind: str
    params: int
    lora_params: int
    median_s: float
    times: list[float]
    saved_bytes: int  # what autograd keeps for the backward pass (no checkpointing)
    input_bytes: int  # the block's inputs: all that checkpointing keeps per block
    peak_bytes: int  # CPU: peak RSS increase; CUDA: peak allocated increase


class SavedBytes:
    """Counts the bytes of the distinct tensors autograd saves for backward."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.total = 0
        # The frozen weights autograd keeps for the input gradient are not activations.
        self._seen: set[tuple[int, int]] = {
            (p.untyped_storage().data_ptr(), p.untyped_storage().nbytes())
            for p in module.parameters()
        }

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in self._seen:
            self._seen.add(key)
            self.total += storage.nbytes()
        return tensor

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def lora_wrap(block: torch.nn.Module, prefix: str, targets: str) -> torch.nn.Module:
    """Put `block` where it sits in the real transformer (`prefix`, e.g. transformer_blocks.0)
    and add the trainer's LoRA with the trainer's target expression."""
    from peft import LoraConfig, inject_adapter_in_model

    root = torch.nn.Module()
    parent = root
    parts = prefix.split(".")
    for part in parts[:-1]:
        child = torch.nn.ModuleList([block]) if part.endswith("blocks") else torch.nn.Module()
        parent.add_module(part, child)
        parent = child
    root.requires_grad_(False)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                        target_modules=targets)  # fmt: skip
    inject_adapter_in_model(config, root)
    for name, parameter in root.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return root


def measure_block(
    kind: str,
    block: torch.nn.Module,
    run: Callable[[torch.nn.Module], torch.Tensor],
    inputs: list[torch.Tensor],
    *,
    device: torch.device,
    repeats: int,
) -> BlockMeasure:
    """Time forward + backward of `run(block)` (the loss is the output's mean) `repeats` times
    after one warm-up; count saved activations once."""
    params = sum(p.numel() for p in block.parameters())
    lora_params = sum(p.numel() for p in block.parameters() if p.requires_grad)

    def step(counter: SavedBytes | None = None) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if counter is not None:
                with counter.hooks():
                    out = run(block)
            else:
                out = run(block)
            loss = out.float().mean()
        loss.backward()
        block.zero_grad(set_to_none=True)

    counter = SavedBytes(block)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as peak:
        start_rss = peak.peak
        step(counter)  # warm-up, and the activation count
    peak_bytes = peak.peak - start_rss
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak_bytes = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    return BlockMeasure(kind, params, lora_params, statistics.median(times), times,
                        counter.total, input_bytes, peak_bytes)  # fmt: skip


def measure_forward(
    fn: Callable[[], Any], *, device: torch.device, repeats: int
) -> tuple[float, int]:
    """Median seconds and peak memory increase of `fn()` without gradients (frozen encoders)."""
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with PeakRSS() as peak:
            start_rss = peak.peak
            fn()  # warm-up
        peak_bytes = peak.peak - start_rss
        if device.type == "cuda":
            peak_bytes = torch.cuda.max_memory_allocated() - base
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times), peak_bytes


# --------------------------------------------------------------------------------------
# A family's result


@dataclass
class FamilyResult:
    family: str
    model: str
    blocks: list[tuple[BlockMeasure, int]]  # (measure, how many in the real transformer)
    transformer_params: int  # the real transformer (published config)
    encoder_params: dict[str, int]  # frozen encoders that stay loaded (text encoders, VAE)
    tokens: str  # the sequence measured, in words
    # Frozen encoders: (part, seconds per step, peak bytes, depth factor, note); "per step"
    # parts run every step (the target's VAE encode), the others once per row when cached.
    encoders: list[tuple[str, float, int, int, str]] = field(default_factory=list)
    # Free-form extra rows of 4 cells (part, what, figure, note), printed after the tables.
    rows: list[list[str]] = field(default_factory=list)

    @property
    def lora_params(self) -> int:
        return sum(m.lora_params * n for m, n in self.blocks)

    def step_seconds(self) -> float:
        return sum(m.median_s * n for m, n in self.blocks)

    def encoder_seconds(self, cached: bool) -> float:
        return sum(
            s * n for part, s, _, n, note in self.encoders if not cached or note == "every step"
        )

    def activations(self, checkpointing: bool) -> int:
        if not checkpointing:
            return sum(m.saved_bytes * n for m, n in self.blocks)
        # Each block keeps only its inputs; the backward recomputes one block at a time.
        kept = sum(m.input_bytes * n for m, n in self.blocks)
        return kept + max(m.saved_bytes for m, _ in self.blocks)

    def gpu_bytes(self, base: str, checkpointing: bool, quantize_encoders: bool) -> float:
        transformer = self.transformer_params * BASE_BYTES[base]
        encoder_bytes = BASE_BYTES[base] if quantize_encoders else 2.0
        encoders = sum(self.encoder_params.values()) * encoder_bytes
        adapter = self.lora_params * ADAPTER_BYTES_PER_PARAM
        return transformer + encoders + adapter + self.activations(checkpointing) + CUDA_OVERHEAD


# --------------------------------------------------------------------------------------
# FLUX.1 Kontext [dev]


def kontext(args: argparse.Namespace) -> FamilyResult:
    """One double-stream and one single-stream block of FLUX.1 Kontext [dev] (published
    config: 19 + 38 blocks, 24 heads × 128, T5-XXL 4096-wide text, 16 latent channels)."""
    from diffusers.models.embeddings import FluxPosEmbed
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    from training.objectives.flux_kontext import KONTEXT_LORA_TARGETS, latent_ids

    device = torch.device(args.device)
    dim, heads, head_dim = 3072, 24, 128
    latent_side = args.resolution // 16  # VAE 8× and 2×2 packing
    image_tokens = latent_side * latent_side
    text_tokens = 512
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, torch.bfloat16)

    ids = torch.cat([
        torch.zeros(text_tokens, 3),
        latent_ids(2 * latent_side, 2 * latent_side, 0.0, torch.device("cpu")),
        latent_ids(2 * latent_side, 2 * latent_side, 1.0, torch.device("cpu")),
    ]).to(device)  # fmt: skip
    rotary = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    temb = randn(1, dim)
    image = randn(1, 2 * image_tokens, dim).requires_grad_(False)
    text = randn(1, text_tokens, dim)

    def measure(
        kind: str, block: torch.nn.Module, prefix: str, count: int
    ) -> tuple[BlockMeasure, int]:
        wrapped = lora_wrap(block.to(device, torch.bfloat16), prefix, KONTEXT_LORA_TARGETS)
        for parameter in wrapped.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()  # the adapter trains in float32

        def run(_module: torch.nn.Module) -> torch.Tensor:
            context, hidden = block(hidden_states=image, encoder_hidden_states=text, temb=temb,
                                    image_rotary_emb=rotary)  # fmt: skip
            return hidden + context.mean()

        result = measure_block(kind, wrapped, run, [image, text], device=device,
                               repeats=args.repeats)  # fmt: skip
        del wrapped
        gc.collect()
        return result, count

    measures = [
        measure("double-stream block",
                FluxTransformerBlock(dim=dim, num_attention_heads=heads, attention_head_dim=head_dim),
                "transformer_blocks.0", 19),
        measure("single-stream block",
                FluxSingleTransformerBlock(dim=dim, num_attention_heads=heads,
                                           attention_head_dim=head_dim, mlp_ratio=4.0),
                "single_transformer_blocks.0", 38),
    ]  # fmt: skip
    # The frozen encoders: one T5-XXL layer (× 24) and CLIP-L on the 512-token prompt, the
    # full FLUX VAE encoder on one 512 px image (the target: every step; the reference: once
    # per row with --cache-conditioning).
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    encoders: list[tuple[str, float, int, int, str]] = []
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                                 num_layers=1, num_heads=64, feed_forward_proj="gated-gelu"))  # fmt: skip
    t5 = t5.to(device, torch.bfloat16).eval()
    tokens_in = torch.randint(0, 32128, (1, text_tokens), generator=generator).to(device)
    seconds, peak = measure_forward(lambda: t5(tokens_in), device=device, repeats=args.repeats)
    encoders.append(("T5-XXL encoder: 1 layer, 512 tokens", seconds, peak, 24,
                     "per row (cached) or every step"))  # fmt: skip
    t5 = None  # freed before the VAE is built
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip
    vae = vae.to(device, torch.bfloat16).eval()
    pixels = randn(1, 3, args.resolution, args.resolution)
    seconds, peak = measure_forward(lambda: vae.encode(pixels), device=device, repeats=args.repeats)
    encoders.append((f"VAE encoder, {args.resolution} px (target)", seconds, peak, 1,
                     "every step"))  # fmt: skip
    encoders.append((f"VAE encoder, {args.resolution} px (reference)", seconds, peak, 1,
                     "per row (cached) or every step"))  # fmt: skip
    vae = None
    gc.collect()
    return FamilyResult(
        family="flux-kontext",
        model="FLUX.1 Kontext [dev]",
        blocks=measures,
        transformer_params=kontext_transformer_params(),
        # The T5-XXL and CLIP-L text encoders and the VAE stay loaded for the whole run.
        encoder_params=kontext_encoder_params(),
        tokens=f"{image_tokens} target + {image_tokens} reference + {text_tokens} text",
        encoders=encoders,
    )


def meta_params(build: Callable[[], torch.nn.Module]) -> int:
    """Parameters of a model built on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return sum(p.numel() for p in build().parameters())


def kontext_transformer_params() -> int:
    from diffusers import FluxTransformer2DModel

    return meta_params(lambda: FluxTransformer2DModel(  # FLUX.1 Kontext [dev]'s config
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    ))  # fmt: skip


def kontext_encoder_params() -> dict[str, int]:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                  num_heads=64, feed_forward_proj="gated-gelu")  # T5 v1.1 XXL  # fmt: skip
    clip = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                          num_hidden_layers=12, num_attention_heads=12)  # CLIP ViT-L/14 text  # fmt: skip
    vae = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
               use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip
    return {
        "text_encoder_2": meta_params(lambda: T5EncoderModel(t5)),
        "text_encoder": meta_params(lambda: CLIPTextModel(clip)),
        "vae": meta_params(lambda: AutoencoderKL(**vae)),
    }


# --------------------------------------------------------------------------------------
# Qwen-Image-Edit (2509 / 2511)  — H11-qwen


def qwen_edit(args: argparse.Namespace) -> FamilyResult:
    """One QwenImageTransformerBlock of Qwen-Image-Edit-2511 (published config: 60 blocks,
    24 heads × 128, Qwen2.5-VL 3584-wide text, zero_cond_t) with the trainer's 12 LoRA targets
    of a middle block, at the sequence the pipeline builds: the target's tokens, the
    reference's at the pipeline's ~1 MP (`VAE_IMAGE_SIZE`, whatever the output size: 4096
    tokens for a square image) and ~220 VL tokens (196 for the ~384² condition image + the
    instruction). The Qwen2.5-VL encoder (8.3 B) and the VAE are timed at one text layer, one
    vision block and one encode, extrapolated to the depth; with --cache-conditioning the VL
    encoder and the reference encode run once per row (and the encoder then leaves the GPU)."""
    device = torch.device(args.device)
    depth = 60
    measure, tokens = qwen_block(args, device)
    gc.collect()  # the block and its inputs are gone before the encoders are built

    encoder_params, encoders = qwen_encoders(args, device)
    result = FamilyResult(
        family="qwen-image-edit", model="Qwen-Image-Edit-2511", blocks=[(measure, depth)],
        transformer_params=qwen_transformer_params(), encoder_params=encoder_params,
        tokens=tokens, encoders=encoders,
    )  # fmt: skip
    # With --cache-conditioning the VL encoder leaves the GPU once every row is cached (after
    # the first epoch): from then on only the VAE (targets are encoded every step) stays besides
    # the transformer. The first epoch's peak still holds the encoder: the plan's GPU size.
    after = FamilyResult(
        **{**result.__dict__, "encoder_params": dict(encoder_params, text_encoder=0)}
    )
    for base in ("bf16", "int8", "4-bit"):
        peak = result.gpu_bytes(base, True, quantize_encoders=base != "bf16")
        later = after.gpu_bytes(base, True, quantize_encoders=base != "bf16")
        result.rows.append([
            f"{base} base, grad. ckpt, --cache-conditioning",
            "peak (1st epoch: VL encoder on the GPU) / once every row is cached",
            f"{gb(peak)} / {gb(later)} GiB (estimate)", f"GPU: {_smallest_gpu(peak)}",
        ])  # fmt: skip
    return result


def qwen_block(args: argparse.Namespace, device: torch.device) -> tuple[BlockMeasure, str]:
    """A middle QwenImageTransformerBlock with its LoRA, measured at the pipeline's sequence."""
    from diffusers.models.transformers.transformer_qwenimage import (
        QwenEmbedRope,
        QwenImageTransformerBlock,
    )

    from training.objectives.qwen_edit import qwen_lora_targets

    dim, heads, head_dim = 3072, 24, 128
    side = args.resolution // 16  # VAE 8× and 2×2 packing
    reference_side = 1024 // 16
    target_tokens, reference_tokens, text_tokens = side * side, reference_side**2, 220
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, torch.bfloat16)

    img_shapes = [[(1, side, side), (1, reference_side, reference_side)]]
    rotary = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)(
        img_shapes, max_txt_seq_len=text_tokens, device=device
    )
    image = randn(1, target_tokens + reference_tokens, dim)
    text = randn(1, text_tokens, dim)
    temb = randn(2, dim)  # zero_cond_t: the timestep's embedding and t = 0's (reference tokens)
    modulate_index = torch.tensor(
        [[0] * target_tokens + [1] * reference_tokens], device=device, dtype=torch.int
    )
    # A middle block's 12 targets (the last block leaves out its text stream's onward parts).
    targets = [t for t in qwen_lora_targets(2) if t.startswith("transformer_blocks.0.")]
    torch.manual_seed(0)
    block = QwenImageTransformerBlock(dim, heads, head_dim, zero_cond_t=True)
    wrapped = lora_wrap(block.to(device, torch.bfloat16), "transformer_blocks.0", targets)
    for parameter in wrapped.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()  # the adapter trains in float32

    def run(_module: torch.nn.Module) -> torch.Tensor:
        context, hidden = block(hidden_states=image, encoder_hidden_states=text,
                                encoder_hidden_states_mask=None, temb=temb,
                                image_rotary_emb=rotary, modulate_index=modulate_index)  # fmt: skip
        return hidden + context.mean()

    measure = measure_block("MMDiT block", wrapped, run, [image, text], device=device,
                            repeats=args.repeats)  # fmt: skip
    tokens = f"{target_tokens} target + {reference_tokens} reference (1 MP) + {text_tokens} text"
    return measure, tokens


def _smallest_gpu(need: float) -> str:
    return next((f"{size} GB" for size in GPU_SIZES_GB if need <= size * GIB), "> 80 GB")


def qwen_transformer_params() -> int:
    from diffusers import QwenImageTransformer2DModel

    return meta_params(lambda: QwenImageTransformer2DModel(num_layers=60, zero_cond_t=True))


QWEN_VL_CONFIG = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     rms_norm_eps=1e-6, rope_scaling={"mrope_section": [16, 24, 24],
                                                      "rope_type": "default", "type": "default"}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                       out_hidden_size=3584, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
)  # fmt: skip
QWEN_VAE_CONFIG = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                       temperal_downsample=[False, True, True])  # fmt: skip


def qwen_encoders(
    args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, int], list[tuple[str, float, int, int, str]]]:
    """Parameter counts of the VL encoder and the VAE (meta device), and their measured cost:
    one text layer and one vision block of Qwen2.5-VL at real width on a 392² condition image
    (× 28 / × 32), the VAE encoder on the `resolution`² target (every step) and on the ~1 MP
    reference (once per row when cached; estimated as 4× the 512 px encode at 512 px)."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    counts = {
        "text_encoder": meta_params(
            lambda: Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN_VL_CONFIG))
        ),
        "vae": meta_params(lambda: AutoencoderKLQwenImage(**QWEN_VAE_CONFIG)),
    }
    small = {
        "text_config": {**QWEN_VL_CONFIG["text_config"], "num_hidden_layers": 1, "vocab_size": 1100},
        "vision_config": {**QWEN_VL_CONFIG["vision_config"], "depth": 1, "fullatt_block_indexes": [0]},
    }  # fmt: skip
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no float32 copy on the way
    try:
        with torch.device(device):
            encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
                **small, image_token_id=1000, video_token_id=1001, vision_start_token_id=1002,
                vision_end_token_id=1003)).eval()  # fmt: skip
            vae = AutoencoderKLQwenImage(**QWEN_VAE_CONFIG).eval()
    finally:
        torch.set_default_dtype(previous)
    grid = 28  # 392² pixels: 28×28 patches of 14, 196 tokens after the 2×2 merge
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(grid * grid, 3 * 2 * 14 * 14, generator=generator)
    pixel_values = pixel_values.to(device, torch.bfloat16)
    grid_thw = torch.tensor([[1, grid, grid]], device=device)
    # The template's 64 dropped tokens, "Picture 1: <vision_start>", 196 image tokens, the end.
    ids = torch.cat([torch.arange(64) + 100, torch.tensor([1002]), torch.full((196,), 1000),
                     torch.tensor([1003]), torch.arange(20) + 200])[None].to(device)  # fmt: skip
    picture = torch.rand(1, 3, 1, args.resolution, args.resolution, generator=generator) * 2 - 1
    picture = picture.to(device, torch.bfloat16)

    def measure(fn: Callable[[], Any]) -> tuple[float, int]:
        return measure_forward(fn, device=device, repeats=args.repeats)

    vision_s, vision_peak = measure(lambda: encoder.model.visual(pixel_values, grid_thw=grid_thw))
    whole_s, whole_peak = measure(lambda: encoder(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
        image_grid_thw=grid_thw))  # fmt: skip
    vae_s, vae_peak = measure(lambda: vae.encode(picture))
    reference_scale = (1024 * 1024) / (args.resolution * args.resolution)
    once = "per row (cached) or every step"
    encoders = [
        ("Qwen2.5-VL text: 1 of 28 layers, 282 tokens", max(whole_s - vision_s, 0.0),
         whole_peak, 28, once),
        ("Qwen2.5-VL vision: 1 of 32 blocks, 392² image", vision_s, vision_peak, 32, once),
        (f"VAE encoder, {args.resolution} px (target)", vae_s, vae_peak, 1, "every step"),
        (f"VAE encoder, 1 MP reference (≈ {reference_scale:.0f}× the {args.resolution} px "
         "encode, estimate)", vae_s * reference_scale, vae_peak, 1, once),
    ]  # fmt: skip
    return counts, encoders


# --------------------------------------------------------------------------------------
# FLUX.2 klein 4B  — H11-klein

KLEIN_4B = dict(  # FLUX.2 klein 4B's published transformer config
    patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
    mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False,
)  # fmt: skip
QWEN3_4B = dict(  # its text encoder, Qwen3-4B
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
)  # fmt: skip


def klein(args: argparse.Namespace) -> FamilyResult:
    """One double-stream and one single-stream block of FLUX.2 klein 4B (5 + 20 blocks,
    24 heads × 128, MLP ratio 3, modulation shared by all blocks and computed once) with the
    trainer's LoRA targets, at the trainee's sequence: (px/16)² target + as many reference
    tokens + 512 text tokens (the pipeline pads every prompt to 512). The Qwen3-4B text encoder
    (one decoder layer, ×36) and the VAE encode of target + reference are measured too: they
    run every step unless --cache-conditioning (then the text and the reference once per row)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2PosEmbed,
        Flux2SingleTransformerBlock,
        Flux2TransformerBlock,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from training.objectives.flux2_klein import KLEIN_LORA_TARGETS, image_ids

    device = torch.device(args.device)
    dim, heads, head_dim = 3072, 24, 128
    side = args.resolution // 16  # VAE 8× and 2×2 patches
    image_tokens, text_tokens = side * side, 512
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, torch.bfloat16)

    ids = image_ids(torch.zeros(1, 128, side, side))[0]
    text_ids = torch.zeros(text_tokens, 4)
    text_ids[:, 3] = torch.arange(text_tokens)
    rotary = Flux2PosEmbed(theta=2000, axes_dim=[32, 32, 32, 32])(torch.cat([text_ids, ids]))
    rotary = tuple(r.to(device) for r in rotary)
    image, text = randn(1, 2 * image_tokens, dim), randn(1, text_tokens, dim)
    double_mod, single_mod = randn(1, 2 * 3 * dim), randn(1, 3 * dim)
    joint = randn(1, text_tokens + 2 * image_tokens, dim)

    def measure(kind: str, block: torch.nn.Module, prefix: str, count: int,
                run: Callable[[torch.nn.Module], torch.Tensor],
                inputs: list[torch.Tensor]) -> tuple[BlockMeasure, int]:  # fmt: skip
        wrapped = lora_wrap(block.to(device, torch.bfloat16), prefix, KLEIN_LORA_TARGETS)
        for parameter in wrapped.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()  # the adapter trains in float32
        result = measure_block(kind, wrapped, run, inputs, device=device, repeats=args.repeats)
        del wrapped
        gc.collect()
        return result, count

    torch.manual_seed(0)
    double = Flux2TransformerBlock(dim, heads, head_dim, mlp_ratio=3.0)
    single = Flux2SingleTransformerBlock(dim, heads, head_dim, mlp_ratio=3.0)

    def run_double(_module: torch.nn.Module) -> torch.Tensor:
        context, hidden = double(hidden_states=image, encoder_hidden_states=text,
                                 temb_mod_img=double_mod, temb_mod_txt=double_mod,
                                 image_rotary_emb=rotary)  # fmt: skip
        return hidden + context.mean()

    def run_single(_module: torch.nn.Module) -> torch.Tensor:
        return single(hidden_states=joint, encoder_hidden_states=None, temb_mod=single_mod,
                      image_rotary_emb=rotary)  # fmt: skip

    measures = [
        measure("double-stream block", double, "transformer_blocks.0", KLEIN_4B["num_layers"],
                run_double, [image, text]),
        measure("single-stream block", single, "single_transformer_blocks.0",
                KLEIN_4B["num_single_layers"], run_single, [joint]),
    ]  # fmt: skip
    gc.collect()

    return FamilyResult(
        family="flux2-klein", model="FLUX.2 klein 4B", blocks=measures,
        transformer_params=meta_params(lambda: Flux2Transformer2DModel(**KLEIN_4B)),
        # The Qwen3-4B text encoder and the VAE stay loaded for the whole run.
        encoder_params={
            "text_encoder": meta_params(lambda: Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B))),
            "vae": meta_params(AutoencoderKLFlux2),
        },
        tokens=f"{image_tokens} target + {image_tokens} reference + {text_tokens} text",
        encoders=klein_encoders(args, device),
    )  # fmt: skip


def klein_encoders(
    args: argparse.Namespace, device: torch.device
) -> list[tuple[str, float, int, int, str]]:
    """One Qwen3-4B decoder layer on the 512-token prompt (× 36: the pipeline runs every layer
    for its hidden states 9/18/27) and FLUX.2's VAE encoder on one image, in bf16."""
    from diffusers import AutoencoderKLFlux2
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding

    config = Qwen3Config(**QWEN3_4B)
    config._attn_implementation = "sdpa"
    generator = torch.Generator().manual_seed(0)
    encoders: list[tuple[str, float, int, int, str]] = []
    layer = Qwen3DecoderLayer(config, layer_idx=0).to(device, torch.bfloat16).eval()
    rotary = Qwen3RotaryEmbedding(config).to(device)
    hidden = torch.randn(1, 512, config.hidden_size, generator=generator).to(device, torch.bfloat16)
    positions = torch.arange(512, device=device)[None]
    position_embeddings = rotary(hidden, positions)
    seconds, peak = measure_forward(
        lambda: layer(hidden, attention_mask=None, position_ids=positions,
                      position_embeddings=position_embeddings),
        device=device, repeats=args.repeats,
    )  # fmt: skip
    encoders.append(("Qwen3-4B text encoder: 1 layer, 512 tokens", seconds, peak, 36,
                     "per row (cached) or every step"))  # fmt: skip
    layer = None  # freed before the VAE is built
    vae = AutoencoderKLFlux2().to(device, torch.bfloat16).eval()  # FLUX.2's VAE config
    pixels = torch.rand(1, 3, args.resolution, args.resolution, generator=generator) * 2 - 1
    pixels = pixels.to(device, torch.bfloat16)
    seconds, peak = measure_forward(lambda: vae.encode(pixels).latent_dist.mode(), device=device,
                                    repeats=args.repeats)  # fmt: skip
    encoders.append((f"VAE encoder, {args.resolution} px (target)", seconds, peak, 1,
                     "every step"))  # fmt: skip
    encoders.append((f"VAE encoder, {args.resolution} px (reference)", seconds, peak, 1,
                     "per row (cached) or every step"))  # fmt: skip
    vae = None
    gc.collect()
    return encoders


# Family id → its row function. H11-klein / H11-qwen add theirs here.
FAMILIES: dict[str, Callable[[argparse.Namespace], FamilyResult]] = {
    "flux-kontext": kontext,
    "qwen-image-edit": qwen_edit,
    "flux2-klein": klein,
}


# --------------------------------------------------------------------------------------
# Tables


def gb(value: float) -> str:
    return f"{value / GIB:.1f}"


def report(results: list[FamilyResult], args: argparse.Namespace) -> None:
    where = cpu_name() if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"\nDevice: {where}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"bf16 autocast, LoRA rank {LORA_RANK}, {args.resolution} px, batch 1, "
          f"{args.repeats} timed repeats after a warm-up\n")  # fmt: skip
    rows = []
    for result in results:
        for measure, count in result.blocks:
            rows.append([
                result.model, measure.kind, result.tokens, f"{measure.params / 1e6:.0f} M",
                f"{measure.lora_params / 1e6:.2f} M", f"{measure.median_s:.2f}",
                gb(measure.saved_bytes), gb(measure.peak_bytes), f"× {count}",
            ])  # fmt: skip
        for part, seconds, peak, depth, note in result.encoders:
            rows.append([result.model, part + f" [{note}]", "", "", "", f"{seconds:.2f}", "",
                         gb(peak), f"× {depth}" if depth > 1 else ""])  # fmt: skip
        rows.append([
            result.model, "whole transformer (EXTRAPOLATED)", result.tokens,
            f"{result.transformer_params / 1e9:.1f} B", f"{result.lora_params / 1e6:.1f} M",
            f"{result.step_seconds():.1f}", gb(result.activations(False)),
            f"{gb(result.activations(True))} w/ ckpt", "",
        ])  # fmt: skip
    print_table(rows, ["model", "part", "tokens", "params", "LoRA params",
                       "s (median; fwd+bwd for blocks)", "saved activations GiB", "peak GiB",
                       "depth"])  # fmt: skip
    print()
    steps = [[r.model, f"{r.step_seconds() + r.encoder_seconds(cached):.0f}",
              "with --cache-conditioning" if cached else "without cache"]
             for r in results for cached in (True, False)]  # fmt: skip
    print_table(steps, ["model", "s/step EXTRAPOLATED (transformer + encoders)", "conditioning"])
    for result in results:
        if result.rows:
            print(f"\n{result.model}:")
            print_table(result.rows, ["part", "what", "figure", "note"])

    print("\nGPU memory estimate for a LoRA fine-tune, batch 1 (GiB: base weights + encoders + "
          "adapter with AdamW state + activations + 1.5 CUDA overhead); fits = ✓")  # fmt: skip
    plans = []
    for result in results:
        for base in ("bf16", "int8", "4-bit"):
            for checkpointing in (False, True):
                need = result.gpu_bytes(base, checkpointing, quantize_encoders=base != "bf16")
                fits = " ".join(f"{size}{'✓' if need <= size * GIB else '✗'}"
                                for size in GPU_SIZES_GB)  # fmt: skip
                plans.append([result.model, base, "yes" if checkpointing else "no", gb(need), fits])
    print_table(plans, ["model", "frozen base", "grad. ckpt", "needs GiB", "GPU GB: fits"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), action="append")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    results = [FAMILIES[name](args) for name in (args.family or sorted(FAMILIES))]
    report(results, args)


if __name__ == "__main__":
    main()
