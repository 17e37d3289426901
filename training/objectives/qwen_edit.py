"""Qwen-Image-Edit (2509 / 2511): LoRA fine-tuning with the conditioning
`QwenImageEditPlusPipeline` builds at inference.

What the pipeline does (diffusers 0.42, read in its source) and this trainee repeats, through
the pipeline's own methods so that nothing can drift:
- text: the Qwen2.5-VL encoder reads the instruction inside the pipeline's chat template
  together with the reference image ("Picture 1: <|vision_start|><|image_pad|>…"), the image
  resized by the pipeline's rounding to about 384² pixels (`CONDITION_IMAGE_SIZE`); its last
  hidden states without the template's system prefix (`prompt_template_encode_start_idx`) are
  the prompt embedding (`pipe.encode_prompt`);
- reference image: resized to about 1 MP (`VAE_IMAGE_SIZE`) whatever the output size, VAE
  posterior MODE normalised with the VAE config's latents mean/std (`pipe._encode_vae_image`),
  packed into 2×2 patches and appended to the sequence AFTER the target's tokens;
- `img_shapes` = [(1, target rows, cols), (1, reference rows, cols)] per sample: each image
  gets its own RoPE positions (and 2511's `zero_cond_t` its per-token modulation index);
- the target: packed latents of the edited image (a posterior sample in training, normalised
  the same way);
- the transformer gets `timestep = σ` (the pipeline passes t/1000); the schedule is shifted by
  μ = calculate_shift(target tokens) with the scheduler config's base/max shift ("exponential"
  time shift), which is the shift training applies to its σ draws;
- the prediction of the reference tokens is dropped (`noise_pred[:, :latents.size(1)]`), and so
  is it from the loss.

The 7B vision-language encoder dominates memory besides the transformer. With
`--cache-conditioning` its output and the reference latents are kept per row on the CPU (the
shared cache in flow.py); once every row is cached (the first repeat of a row: the data order
visits every row once per epoch) the encoder leaves the accelerator, and comes back only for
a validation edit or an uncached sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from training.objectives.base import CardInfo
from training.objectives.flow import FlowTrainee, SigmaSampling

# The engine's defaults for this family (engine/families/qwen_edit.py): true CFG 4 against the
# negative prompt " ".
VALIDATION_TRUE_CFG = 4.0
VALIDATION_NEGATIVE_PROMPT = " "

# Attention of both streams (image: to_q/k/v, to_out.0; text: add_*_proj, to_add_out) and both
# MLPs (FeedForward: net.0.proj in, net.2 out) of every block. The adaLN modulations, embedders
# and the final projection stay frozen.
IMAGE_STREAM = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.net.0.proj",
                "img_mlp.net.2")  # fmt: skip
# The text stream's keys and values feed the image tokens' attention in every block ...
TEXT_KEYS_VALUES = ("attn.add_k_proj", "attn.add_v_proj")
# ... but its queries, attention output and MLP only feed the next block's text stream: in the
# last block they reach nothing (the transformer outputs image tokens only), so they get no
# gradient there, which multi-GPU training (DDP) refuses.
TEXT_STREAM_ONWARD = ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")


def qwen_lora_targets(num_layers: int) -> list[str]:
    """The module names of every block's LoRA targets (peft matches them as name suffixes)."""
    names = []
    for block in range(num_layers):
        parts = IMAGE_STREAM + TEXT_KEYS_VALUES
        if block < num_layers - 1:
            parts += TEXT_STREAM_ONWARD
        names += [f"transformer_blocks.{block}.{part}" for part in parts]
    return names


def _plus_module() -> Any:
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus

    return pipeline_qwenimage_edit_plus


def reference_sizes(width: int, height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((width, height) given to the VL encoder, (width, height) given to the VAE) for a
    reference image of this size, rounded as the pipeline rounds them (its module constants,
    read at call time so that training follows the installed diffusers)."""
    module = _plus_module()
    ratio = width / height
    return (
        module.calculate_dimensions(module.CONDITION_IMAGE_SIZE, ratio),
        module.calculate_dimensions(module.VAE_IMAGE_SIZE, ratio),
    )


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """3×H×W in [-1, 1] → the 8-bit RGB image the pipeline would be given."""
    array = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")


@torch.no_grad()
def encode_reference(
    pipe: Any, image: Image.Image, instruction: str, device: torch.device
) -> dict[str, torch.Tensor]:
    """What `QwenImageEditPlusPipeline.__call__` computes from (image, instruction) before its
    denoising loop, for one sample: `prompt_embeds` 1×L×D, `reference_latents` 1×T×4C and
    `reference_shape` 1×3 = (1, rows, cols) of the reference's packed grid."""
    (cond_w, cond_h), (vae_w, vae_h) = reference_sizes(*image.size)
    condition_image = pipe.image_processor.resize(image, cond_h, cond_w)
    prompt_embeds, _mask = pipe.encode_prompt(
        prompt=[instruction], image=[condition_image], device=device
    )  # one prompt: no padding, so no mask
    vae_image = pipe.image_processor.preprocess(image, vae_h, vae_w).unsqueeze(2)
    # As prepare_latents: the image in the prompt embedding's dtype.
    vae_image = vae_image.to(device=device, dtype=prompt_embeds.dtype)
    latents = pipe._encode_vae_image(vae_image, generator=None)  # 1×C×1×h×w, normalised mode
    channels, rows, cols = latents.shape[1], latents.shape[3], latents.shape[4]
    packed = pipe._pack_latents(latents, 1, channels, rows, cols)
    shape = torch.tensor([[1, rows // 2, cols // 2]], dtype=torch.long)
    return {"prompt_embeds": prompt_embeds, "reference_latents": packed, "reference_shape": shape}


def pad_conditioning(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-sample conditionings (no batch axis) → one batch: prompt embeddings padded at the end
    with a mask (1 = token, 0 = padding; the transformer masks padding in attention), reference
    latents stacked (one reference size per batch: the loader makes square crops)."""
    shapes = {tuple(item["reference_shape"].tolist()) for item in items}
    if len(shapes) != 1:
        raise ValueError(f"the reference images of one batch differ in size: {sorted(shapes)}")
    embeds = [item["prompt_embeds"] for item in items]
    length = max(e.shape[0] for e in embeds)
    padded = embeds[0].new_zeros(len(items), length, embeds[0].shape[1])
    mask = torch.zeros(len(items), length, dtype=torch.long, device=embeds[0].device)
    for row, e in enumerate(embeds):
        padded[row, : e.shape[0]] = e
        mask[row, : e.shape[0]] = 1
    return {
        "prompt_embeds": padded,
        "prompt_mask": mask,
        "reference_latents": torch.stack([item["reference_latents"] for item in items]),
        "reference_shape": torch.stack([item["reference_shape"] for item in items]),
    }


class QwenImageEditTrainee(FlowTrainee):
    family = "qwen-image-edit"
    pipeline_class_name = "QwenImageEditPlusPipeline"
    # σ uniform (diffusers' Qwen-Image LoRA script's default, weighting_scheme "none"), then
    # the resolution-dependent shift the scheduler applies at inference (use_dynamic_shifting,
    # base/max shift 0.5/0.9 at 256/8192 tokens in the released configs), so training visits
    # the noise levels the sampler visits at this size (that script uses a fixed shift of 3).
    sampling = SigmaSampling(weighting_scheme="none", shift=True)
    title = "Qwen-Image-Edit fine-tune"
    # A 20B transformer trained fully needs ~320 GB of optimiser state: LoRA only.
    offers_full = False

    @property
    def lora_target_modules(self) -> list[str]:  # type: ignore[override]
        # Read by FlowTrainee.__init__ after the pipeline is loaded: the names depend on depth.
        return qwen_lora_targets(self.pipe.transformer.config.num_layers)

    def __init__(self, model: str, **options: Any) -> None:
        super().__init__(model, **options)
        self.text_encoder_away = False  # moved off the accelerator once the cache is full
        self.auto_release = True

    # ----------------------------------------------------------------------------------
    # Conditioning

    def encode_conditioning(
        self, input_pixels: torch.Tensor, instructions: list[str], device: torch.device
    ) -> dict[str, torch.Tensor]:
        # The pipeline encodes one prompt with its image at a time (batching the VL encoder
        # would pad the text); each sample is encoded exactly as a single edit would be.
        self._restore_text_encoder()  # an uncached sample after the release
        items = []
        for pixels, instruction in zip(input_pixels, instructions, strict=True):
            single = encode_reference(self.pipe, to_pil(pixels), instruction, device)
            items.append({k: v[0] for k, v in single.items()})
        return pad_conditioning(items)

    def collate_conditioning(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        # A cache entry is one sample's encode: its mask is all ones (one prompt, no padding).
        return pad_conditioning(items)

    def conditioning(self, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        cache = self.cache
        before = (cache.hits, cache.misses) if cache is not None else (0, 0)
        result = super().conditioning(batch, device)
        if cache is not None and self.auto_release:
            hits, misses = cache.hits - before[0], cache.misses - before[1]
            if hits and not misses:
                # A row came round again and nothing was new: the loader visits every row once
                # per epoch before any repeat, so every row is cached now.
                self.auto_release = False  # once; a later miss brings it back
                self.release_conditioning_encoders()
        return result

    def release_conditioning_encoders(self) -> None:
        """Move the VL encoder off the accelerator once every row's conditioning is cached (a
        no-op when training on the CPU). Called here at the first cache hit, or by a loop that
        fills the cache first."""
        encoder = self.pipe.text_encoder
        if self.text_encoder_away or self._device.type == "cpu":
            return
        try:
            encoder.to("cpu")
        except (ValueError, RuntimeError):  # a quantized encoder that cannot move stays
            return
        self.text_encoder_away = True
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _restore_text_encoder(self) -> None:
        if self.text_encoder_away:
            self.pipe.text_encoder.to(self._device)
            self.text_encoder_away = False

    @property
    def _device(self) -> torch.device:
        return self.pipe.transformer.device

    # ----------------------------------------------------------------------------------
    # Target and forward pass

    def encode_target(
        self, edited_pixels: torch.Tensor, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        pipe = self.pipe
        multiple = pipe.vae_scale_factor * 2
        count, _, height, width = edited_pixels.shape
        if height % multiple or width % multiple:
            from engine.errors import InvalidInput

            raise InvalidInput(
                f"Qwen-Image-Edit needs sides that are multiples of {multiple} (the VAE's "
                f"{pipe.vae_scale_factor}× and the 2×2 packing); {width}×{height} is not: use "
                f"e.g. --resolution {max(multiple, height // multiple * multiple)}",
                field="resolution",
            )
        vae = pipe.vae
        pixels = edited_pixels.to(device, vae.dtype).unsqueeze(2)  # one frame
        latents = vae.encode(pixels).latent_dist.sample(generator=generator)
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        latents = (latents - mean) / std
        channels, rows, cols = latents.shape[1], latents.shape[3], latents.shape[4]
        self._target_grid = (rows // 2, cols // 2)
        return pipe._pack_latents(latents, count, channels, rows, cols)

    def forward(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        rows, cols = self._target_grid
        reference = [tuple(int(v) for v in shape) for shape in conditioning["reference_shape"]]
        img_shapes = [[(1, rows, cols), shape] for shape in reference]
        mask = conditioning["prompt_mask"]
        hidden = torch.cat([noisy, conditioning["reference_latents"].to(noisy.dtype)], dim=1)
        return denoiser(
            hidden_states=hidden,
            timestep=sigmas.to(noisy.dtype),
            encoder_hidden_states=conditioning["prompt_embeds"].to(noisy.dtype),
            # The pipeline passes no mask when nothing is padded (the same numbers).
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=img_shapes,
            return_dict=False,
        )[0]

    # ----------------------------------------------------------------------------------
    # Validation and the model card

    def validation_edit(
        self,
        denoiser: torch.nn.Module,
        image: Image.Image,
        instruction: str,
        *,
        seed: int,
        steps: int,
    ) -> Image.Image:
        away = self.text_encoder_away
        self._restore_text_encoder()  # the pipeline runs on one device
        try:
            return super().validation_edit(denoiser, image, instruction, seed=seed, steps=steps)
        finally:
            if away:
                self.release_conditioning_encoders()

    def run_pipeline(
        self, pipe: Any, image: Image.Image, instruction: str, *, steps: int,
        generator: torch.Generator,
    ) -> Image.Image:  # fmt: skip
        # As the engine calls it: explicit height/width (the working size), true CFG with the
        # family's default negative prompt; at least 2 steps (1 gives NaN: terminal stretch).
        width, height = image.size
        result = pipe(
            image=image.convert("RGB"),
            prompt=instruction,
            negative_prompt=VALIDATION_NEGATIVE_PROMPT,
            true_cfg_scale=VALIDATION_TRUE_CFG,
            height=height,
            width=width,
            num_inference_steps=max(2, steps),
            generator=generator,
            output_type="np",
        ).images[0]
        return Image.fromarray(np.round(np.clip(result, 0, 1) * 255).astype(np.uint8), "RGB")

    def card(self) -> CardInfo:
        return CardInfo(
            title=self.title,
            method=self.method(),
            pipeline_class=type(self.pipe).__name__,
            tags=["qwen-image", "qwen-image-edit"],
        )
