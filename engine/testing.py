"""Tiny, randomly initialised InstructPix2Pix models for tests, demos and benchmarks.

No weights can be downloaded in CI, so every test builds the model it needs from configs
(the diffusers way) and saves it like a real one. `build_full_size_*` builds the real
architecture of `timbrooks/instruct-pix2pix` with random weights: same compute, no download.
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

_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _byte_symbols() -> list[str]:
    """The printable stand-ins GPT-2/CLIP byte-level BPE uses for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    shifted, extra = [], 0
    for b in range(256):
        if b in printable:
            shifted.append(chr(b))
        else:
            shifted.append(chr(256 + extra))
            extra += 1
    return shifted


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP BPE tokenizer with a few merges: enough to tell instructions apart."""
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = [("r", "e"), ("e", "d</w>"), ("b", "l"), ("u", "e</w>"), ("g", "r"), ("m", "a")]
    merges += [("k", "e</w>"), ("i", "t</w>"), ("e", "n</w>"), ("o", "w</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for s in _SPECIAL:
        vocab[s] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_components(seed: int = 0, in_channels: int = 8, sample_size: int = 32) -> dict:
    """UNet (blocks 32/64), VAE (32/64), CLIP text (32 hidden, 2 layers): ~3 M parameters."""
    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
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
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
    }


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
