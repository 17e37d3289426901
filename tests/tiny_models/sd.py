"""Tiny random InstructPix2Pix (SD 1.5) models for tests, and the full-size architecture.

No weights can be downloaded in CI, so every test builds the model it needs from configs
(the diffusers way) and saves it like a real one. `build_full_size_*` builds the real
architecture of `timbrooks/instruct-pix2pix` with random weights: same compute, no download.
The tokenizer and the tiny components are the shapes demo's (training/demo_model.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    StableDiffusionInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from training.demo_model import build_tiny_components, build_tiny_tokenizer

__all__ = [
    "FULL_TEXT_CONFIG",
    "FULL_UNET_CONFIG",
    "FULL_VAE_CONFIG",
    "build_full_size_components",
    "build_full_size_pipeline",
    "build_tiny_components",
    "build_tiny_pipeline",
    "build_tiny_tokenizer",
    "full_size_text_config",
    "save_tiny_model",
]


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionInstructPix2PixPipeline:
    return StableDiffusionInstructPix2PixPipeline(
        **build_tiny_components(seed), requires_safety_checker=False
    )


def save_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny InstructPix2Pix model and save it as a diffusers folder (safetensors)."""
    folder = Path(folder)
    build_tiny_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder


# The configs of timbrooks/instruct-pix2pix (SD 1.5 with an 8-channel conv_in).
FULL_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 8,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
FULL_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "sample_size": 512,
}
FULL_TEXT_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


def full_size_text_config(tokenizer: CLIPTokenizer) -> dict:
    """CLIP ViT-L/14's text tower config, with the special-token ids of `tokenizer`."""
    return {
        **FULL_TEXT_CONFIG,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_full_size_components(seed: int = 0, in_channels: int = 8) -> dict:
    """The real SD 1.5 architecture with random weights; in_channels=4 gives text-to-image.

    The tokenizer is the tiny byte-level one (the real vocabulary needs a download); token ids
    stay below the full vocabulary size, so the text encoder does the real amount of work.
    """
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    text_config = full_size_text_config(tokenizer)
    return {
        "unet": UNet2DConditionModel(**{**FULL_UNET_CONFIG, "in_channels": in_channels}),
        "vae": AutoencoderKL(**FULL_VAE_CONFIG),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**text_config)),
        "tokenizer": tokenizer,
        "scheduler": EulerAncestralDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            num_train_timesteps=1000,
            steps_offset=1,
        ),
        "safety_checker": None,
        "feature_extractor": None,
    }


def build_full_size_pipeline(seed: int = 0) -> StableDiffusionInstructPix2PixPipeline:
    """The real InstructPix2Pix architecture (UNet 859.5 M, VAE 83.7 M, CLIP-L text 123.1 M)."""
    return StableDiffusionInstructPix2PixPipeline(
        **build_full_size_components(seed), requires_safety_checker=False
    )
