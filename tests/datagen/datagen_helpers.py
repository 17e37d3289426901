"""Tiny random models for the data-generation tests (imported by conftest and the tests)."""

from __future__ import annotations

import json
from pathlib import Path

# The tiny SD's VAE downsamples by 2, so 32 px images are 16×16 latents.
TINY_RESOLUTION = 32


def build_tiny_sd_pipeline(seed: int = 0, sharp_self_attention: bool = False):
    """A text-to-image SD pipeline (4-channel UNet) from tests.tiny_models.sd's tiny components.

    Randomly initialised self-attention is almost uniform (q·k ≈ 0), and uniform maps are the
    same for both images, so sharing them would change nothing visible. `sharp_self_attention`
    scales the attn1 query/key weights up so the maps depend on the image, as trained ones do.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    from tests.tiny_models.sd import build_tiny_components

    components = build_tiny_components(seed=seed, in_channels=4, sample_size=16)
    if sharp_self_attention:
        with torch.no_grad():
            for name, module in components["unet"].named_modules():
                if name.endswith("attn1"):
                    module.to_q.weight.mul_(8.0)
                    module.to_k.weight.mul_(8.0)
    return StableDiffusionPipeline(**components, requires_safety_checker=False)


def build_tiny_clip(seed: int = 0):
    """A tiny CLIPModel (text 32 wide, vision 32 px patches of 8), its tokenizer and processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from tests.tiny_models.sd import build_tiny_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return CLIPModel(config).eval(), tokenizer, processor


def build_tiny_lm_tokenizer(texts: list[str]):
    """A byte-level BPE (GPT-2 style) trained in milliseconds on `texts`, ~400 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def seed_texts() -> list[str]:
    from training.datagen.text_format import format_completion, format_prompt

    path = Path(__file__).resolve().parents[2] / "resources" / "seed_edits.jsonl"
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        texts.append(format_prompt(item["input"]) + format_completion(item["edit"], item["output"]))
    return texts


def build_tiny_lm(seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tiny_lm_tokenizer(seed_texts())
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=512,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    return model.eval(), tokenizer
