"""A tiny random Qwen-Image-Edit (2509 / 2511) pipeline, built offline from the real classes.

Every component is the class the real model uses, only tiny: QwenImageTransformer2DModel
(1 layer; 2511 sets `zero_cond_t`), AutoencoderKLQwenImage (4 levels, 3 temporal downsamples,
so the pixel → latent factor is 8 and the pipeline's multiple 16, as in the real model; 16
latent channels with the real latents_mean/std), Qwen2_5_VLForConditionalGeneration (1 text
layer, 1 vision block with window attention off), a byte-level BPE Qwen2Tokenizer built here with
the chat/vision special tokens the pipeline's prompt template uses, and a Qwen2VLProcessor whose
image processor makes a handful of vision tokens. `save_tiny_qwen_edit` writes a diffusers folder
(safetensors) that `QwenImageEditPlusPipeline.from_pretrained` reloads offline.

Token ids are wired the way transformers 5's Qwen2.5-VL expects: the processor expands each
`<|image_pad|>` to grid_t·grid_h·grid_w / merge² copies; the model's config names the ids of
`<|image_pad|>`, `<|video_pad|>`, `<|vision_start|>` and `<|vision_end|>` (get_rope_index finds
images by `vision_start` followed by `image_pad`), and vision `out_hidden_size` equals the text
hidden size (image features replace the `<|image_pad|>` embeddings).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLProcessor,
)

from engine.families.qwen_edit import processor_without_video

# Qwen2's special tokens, in the real tokenizer's order (ids follow the byte vocabulary here).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# A few merges so that common words are single tokens (the template is long in bytes).
_MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"),
           ("Ġ", "a"), ("Ġ", "s"), ("Ġ", "o"), ("Ġ", "c"), ("r", "e"), ("a", "t"), ("e", "n"))
TEXT_HIDDEN = 32
# The real Qwen-Image VAE's per-channel statistics (Wan 2.1's), so normalisation is exercised.
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
# The real models' scheduler config (Qwen-Image-Edit-2509/2511 scheduler_config.json).
SCHEDULER_CONFIG = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
    num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
    use_dynamic_shifting=True, invert_sigmas=False, stochastic_sampling=False,
)


def build_tokenizer() -> Qwen2Tokenizer:
    vocab: dict[str, int] = {}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    for left, right in _MERGES:
        vocab.setdefault(left + right, len(vocab))
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(_MERGES),
                               model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


def build_processor(tokenizer: Qwen2Tokenizer) -> Qwen2VLProcessor:
    """Qwen2VLProcessor with a small image processor (PIL backend, which needs no torchvision):
    the ~384² condition image becomes at most 112×112 pixels = 8×8 patches of 14 = 16 vision
    tokens after the 2×2 merge."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=112 * 112, patch_size=14, temporal_patch_size=2,
        merge_size=2,
    )
    with processor_without_video():
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
            # head_dim 16 → 8 rotary frequencies split over (t, h, w)
            rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
            rope_theta=1_000_000.0, bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_HIDDEN,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            fullatt_block_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_transformer(variant: str = "2511", num_layers: int = 1) -> QwenImageTransformer2DModel:
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=num_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN,
        guidance_embeds=False, axes_dims_rope=(4, 6, 6), zero_cond_t=variant == "2511",
    )


def build_vae() -> AutoencoderKLQwenImage:
    return AutoencoderKLQwenImage(
        base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD,
    )


def build_tiny_qwen_edit(variant: str = "2511", seed: int = 0) -> QwenImageEditPlusPipeline:
    """A random tiny Qwen-Image-Edit-`variant` ("2509" or "2511") pipeline on the CPU, fp32."""
    if variant not in ("2509", "2511"):
        raise ValueError(f"variant must be 2509 or 2511, not {variant!r}")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    pipe = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=build_vae(),
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        processor=build_processor(tokenizer),
        transformer=build_transformer(variant),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_qwen_edit(path: str | Path, variant: str = "2511", seed: int = 0) -> Path:
    """The tiny pipeline saved as a diffusers folder (model_index.json + safetensors)."""
    path = Path(path)
    pipe = build_tiny_qwen_edit(variant, seed)
    with processor_without_video():
        pipe.save_pretrained(path, safe_serialization=True)
    return path
