"""The shapes demo's tiny InstructPix2Pix: a byte-level CLIP tokenizer and ~3 M-parameter
components built from configs (no download). The tests' tiny models (tests/tiny_models/) build
on these too.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def byte_symbols() -> list[str]:
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
    symbols = byte_symbols()
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
