"""Tiny random SDXL InstructPix2Pix models (two CLIP text encoders, text_time micro-conditioning),
and the full-size SDXL architecture's configs, built from config classes (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from training.demo_model import build_tiny_tokenizer

SDXL_SCALING_FACTOR = 0.13025


def _text_config(tokenizer, **sizes) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


def build_tiny_sdxl_components(seed: int = 0, sample_size: int = 32) -> dict:
    """UNet (32/64, text_time embedding), VAE (32/64, SDXL scaling), CLIP 32 + CLIP-proj 32."""
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    # The two encoders differ in width (as CLIP-L and bigG do): diffusers' single-file loader
    # tells them apart by their position-embedding width.
    text_dim, text_dim_2, projection_dim, time_dim = 32, 48, 32, 8
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=8,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_dim + projection_dim,
        cross_attention_dim=text_dim + text_dim_2,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 2,
        scaling_factor=SDXL_SCALING_FACTOR,
        force_upcast=True,
    )
    sizes = {"intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 3, "hidden_act": "gelu"}
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_size=text_dim, **sizes))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer, hidden_size=text_dim_2, projection_dim=projection_dim, **sizes))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", num_train_timesteps=1000,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": build_tiny_tokenizer(),
        "scheduler": scheduler,
    }


def build_tiny_sdxl_pipeline(seed: int = 0, force_zeros_for_empty_prompt: bool = True,
                             is_cosxl_edit: bool = False) -> StableDiffusionXLInstructPix2PixPipeline:
    return StableDiffusionXLInstructPix2PixPipeline(
        **build_tiny_sdxl_components(seed),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
        is_cosxl_edit=is_cosxl_edit,
    )


def save_tiny_sdxl_model(folder: str | Path, seed: int = 0) -> Path:
    folder = Path(folder)
    build_tiny_sdxl_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder


# The configs of SDXL base 1.0 with an 8-channel conv_in (diffusers/sdxl-instructpix2pix-768).
FULL_SDXL_UNET_CONFIG = {
    "sample_size": 96,
    "in_channels": 8,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
FULL_SDXL_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "sample_size": 1024,
    "scaling_factor": SDXL_SCALING_FACTOR,
    "force_upcast": True,
}
FULL_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
               "num_hidden_layers": 12, "hidden_act": "quick_gelu", "projection_dim": 768}
FULL_CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                  "num_hidden_layers": 32, "hidden_act": "gelu", "projection_dim": 1280}


def build_full_size_sdxl_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32
                                  ) -> StableDiffusionXLInstructPix2PixPipeline:
    """The real SDXL-IP2P architecture with random weights (UNet 2.6 B, CLIP-L + bigG text).

    ~7 GB in bf16, ~14 GB in fp32: built directly in `dtype` (one module at a time)."""
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        parts = {
            "unet": UNet2DConditionModel(**FULL_SDXL_UNET_CONFIG),
            "vae": AutoencoderKL(**FULL_SDXL_VAE_CONFIG),
            "text_encoder": CLIPTextModel(_full_text(tokenizer, FULL_CLIP_L, projection=False)),
            "text_encoder_2": CLIPTextModelWithProjection(_full_text(tokenizer, FULL_CLIP_BIGG, projection=True)),
        }
    finally:
        torch.set_default_dtype(previous)
    return StableDiffusionXLInstructPix2PixPipeline(
        **parts,
        tokenizer=tokenizer,
        tokenizer_2=build_tiny_tokenizer(),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False,
    )


def _full_text(tokenizer, sizes: dict, projection: bool) -> CLIPTextConfig:
    config = {**sizes, "vocab_size": 49408, "max_position_embeddings": 77,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}
    if not projection:
        config.pop("projection_dim")
    return CLIPTextConfig(**config)
