"""Tiny random FLUX.1 Kontext and FLUX.2 klein pipelines, built offline from the real classes.

Every component is the class the real model uses (FluxTransformer2DModel / Flux2Transformer2DModel,
AutoencoderKL / AutoencoderKLFlux2, CLIP + T5 / Qwen3 text encoders, tokenizers built locally with
the `tokenizers`-backed transformers classes, FlowMatchEulerDiscreteScheduler), only tiny. The VAEs
keep 4 blocks, so the pixel → latent factor is 8 and the working-size multiple 16, as in the real
models. `save_*` writes a diffusers folder (safetensors) that `from_pretrained` reloads offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxKontextPipeline,
    FluxTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    Qwen2TokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from training.demo_model import build_tiny_tokenizer, byte_symbols

_VAE_BLOCKS = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=64,
)
LATENT_CHANNELS = 4  # the real models: 16 (FLUX.1) and 32 (FLUX.2)


# ---------------------------------------------------------------------------- tokenizers
def build_t5_tokenizer() -> T5TokenizerFast:
    """A Unigram (sentencepiece-style) vocabulary of single characters and ▁-words."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
    pieces += [(c, -3.0) for c in chars]
    pieces += [("▁" + c, -2.5) for c in chars]
    pieces += [("▁make", -1.0), ("▁the", -1.0), ("▁red", -1.0), ("▁blue", -1.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


def build_qwen_tokenizer() -> Qwen2TokenizerFast:
    """Byte-level BPE like Qwen's, with the chat template the klein pipeline applies."""
    vocab = {s: i for i, s in enumerate(byte_symbols())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("r", "e"), ("e", "d")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    for s in specials:
        vocab[s] = len(vocab)
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=merges, model_max_length=1024)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------------------- Kontext
def build_tiny_kontext(seed: int = 0, *, num_layers: int = 1, num_single_layers: int = 1,
                       heads: int = 2, head_dim: int = 16) -> FluxKontextPipeline:
    """A tiny random FLUX.1 Kontext pipeline (transformer with guidance embedding, as [dev])."""
    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(head_dim // 4, head_dim // 4, head_dim // 2),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=32, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=0,
    ))
    vae = AutoencoderKL(latent_channels=LATENT_CHANNELS, shift_factor=0.1159, scaling_factor=0.3611,
                        use_quant_conv=False, use_post_quant_conv=False, **_VAE_BLOCKS)
    _randomise_norms(vae)
    return FluxKontextPipeline(
        scheduler=_flow_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
        image_encoder=None, feature_extractor=None,
    )


# ---------------------------------------------------------------------------- klein
QWEN_LAYERS = 27  # the pipeline stacks hidden states 9, 18 and 27 of the Qwen3 encoder


def build_tiny_klein(seed: int = 0, *, is_distilled: bool = True, num_layers: int = 1,
                     num_single_layers: int = 1, heads: int = 2, head_dim: int = 16) -> Flux2KleinPipeline:
    """A tiny random FLUX.2 klein pipeline (`is_distilled`: the step-distilled 4B/9B releases)."""
    tokenizer = build_qwen_tokenizer()
    torch.manual_seed(seed)
    hidden = 16
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * 4,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=3 * hidden,
        timestep_guidance_channels=256,
        axes_dims_rope=(head_dim // 4,) * 4,
        guidance_embeds=False,
    )
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32,
        num_hidden_layers=QWEN_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    vae = AutoencoderKLFlux2(latent_channels=LATENT_CHANNELS, **_VAE_BLOCKS)
    _randomise_norms(vae)
    return Flux2KleinPipeline(scheduler=_flow_scheduler(), vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer, is_distilled=is_distilled)


# ---------------------------------------------------------------------------- helpers
def _flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX's own scheduler config: resolution-dependent shift.
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )


def _randomise_norms(vae: torch.nn.Module) -> None:
    """Give batch-norm statistics (FLUX.2's latent normalisation) non-trivial values."""
    generator = torch.Generator().manual_seed(1)
    for module in vae.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def save_tiny_kontext(folder: str | Path, seed: int = 0, **kwargs) -> Path:
    folder = Path(folder)
    build_tiny_kontext(seed, **kwargs).save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_klein(folder: str | Path, seed: int = 0, **kwargs) -> Path:
    folder = Path(folder)
    build_tiny_klein(seed, **kwargs).save_pretrained(folder, safe_serialization=True)
    return folder


# ---------------------------------------------------------------------------- benchmark models
# The real models' widths with fewer blocks (random weights): per block and per token the same
# compute as FLUX.1 Kontext [dev] (12 B: 19 double + 38 single blocks) and FLUX.2 klein
# (4 B: 5 + 20 blocks, 9 B: 8 + 24, as published in their transformer configs), so a step of
# the reduced model costs the real step × (blocks kept / real blocks). The text encoders keep
# the width the transformer reads (T5-XXL 4096; 3 × Qwen3 hidden) but few layers / a narrow
# inner size, and the tiny local vocabularies: they run once per edit, equally on both sides.
KLEIN_SIZES = {
    "4B": dict(num_layers=5, num_single_layers=20, heads=24, qwen_hidden=2560),
    "9B": dict(num_layers=8, num_single_layers=24, heads=32, qwen_hidden=4096),
}


def build_reduced_depth_kontext(seed: int = 0, *, num_layers: int = 1, num_single_layers: int = 2) -> FluxKontextPipeline:
    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
        num_attention_heads=12, projection_dim=768, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64,
        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=0,
    ))
    vae = AutoencoderKL(  # FLUX.1's VAE config
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
        norm_num_groups=32, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611,
    )
    return FluxKontextPipeline(
        scheduler=_flow_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
        image_encoder=None, feature_extractor=None,
    )


def build_reduced_depth_klein(seed: int = 0, *, size: str = "4B", num_layers: int = 1,
                              num_single_layers: int = 4) -> Flux2KleinPipeline:
    spec = KLEIN_SIZES[size]
    tokenizer = build_qwen_tokenizer()
    torch.manual_seed(seed)
    hidden = spec["qwen_hidden"]
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=128, num_attention_heads=spec["heads"], joint_attention_dim=3 * hidden,
        timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
        guidance_embeds=False,
    )
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=256,
        num_hidden_layers=QWEN_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
        max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    ))
    vae = AutoencoderKLFlux2()  # the defaults are FLUX.2's VAE config
    return Flux2KleinPipeline(scheduler=_flow_scheduler(), vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer, is_distilled=True)
