"""FLUX.2 klein (4B and 9B): diffusers' Flux2KleinPipeline with the edit image as its reference.

What the engine relies on in diffusers 0.42's pipeline (checked in its source):
- The reference image must be a PIL image (`check_image_input`), both sides ≥ 64 px and an
  aspect ratio ≤ 8:1, else the pipeline raises; the family says so as an InvalidInput first.
  So the working image goes in as 8-bit RGB (rounded from the float working image).
- A reference above 1024² pixels is scaled down to ~1 MP by the pipeline (as BFL's reference
  code does) and cropped to multiples of 16; the output keeps the explicit `height`/`width`.
  Below that it is used as is (sides already multiples of 16: the "crop" mode crops nothing).
  The shared area rule rounds to the nearest 16 and lands just above 1024² for many aspect
  ratios (4:3 → 1216×864), so this family's `working_size` steps the long side down until
  the working image fits 1024²: reference and output then line up pixel for pixel. At a
  `resolution` above 1024 the reference is necessarily the pipeline's ~1 MP copy.
- Noise: drawn in the packed-latent shape with `randn_tensor`; a list of generators draws
  each sample from its own, so variant k equals a single run with seed + k.
- `guidance_scale` is classifier-free guidance (a second transformer pass with an empty
  prompt) for the klein base models; the step-distilled releases (`is_distilled` in the
  pipeline config: FLUX.2 klein 4B and 9B) ignore it, so the family passes 1.0 there (the
  same result, without the pipeline's warning on every call).
- The text embeddings come from Qwen3 hidden states 9, 18 and 27, encoded once per call.
- LoRAs: Flux2LoraLoaderMixin (`load_lora_weights`, `set_adapters`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from engine.errors import InvalidInput
from engine.families.base import ParamSpec, ResolutionRule, RunInputs, StepHooks, StepsRule
from engine.families.dit import (
    DiTFamily,
    Encode,
    check_working_image,
    generators,
    latent_rgb_image,
    step_callback,
)

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


MIN_SIDE = 64  # Flux2ImageProcessor.check_image_input
MAX_ASPECT = 8.0
REFERENCE_AREA = 1024 * 1024  # the pipeline scales a larger reference image down to this


class Flux2KleinFamily(DiTFamily):
    id = "flux2-klein"
    label = "FLUX.2 klein"
    params = (
        ParamSpec("guidance", "float", 4.0, "Guidance",
                  help="Classifier-free guidance of the klein base models; the step-distilled "
                       "klein 4B and 9B ignore it",
                  minimum=1.0, maximum=10.0, step=0.1, explore=1.0),
    )
    resolution = ResolutionRule("area", 1024, 16)
    steps = StepsRule(4)  # the step-distilled 4B/9B; the base models want ~50 (catalogue)
    supports_loras = True
    quantizable = ("transformer", "text_encoder")  # the DiT and the Qwen3 4B/8B encoder
    text_encoders = ("text_encoder",)
    preferred_dtype = torch.bfloat16  # trained and distributed in bf16
    # A single transformer file takes its config and other components from here by default.
    default_config = "black-forest-labs/FLUX.2-klein-4B"
    pipeline_class_names = ("Flux2KleinPipeline",)
    pipeline_class, transformer_class = "Flux2KleinPipeline", "Flux2Transformer2DModel"

    def working_size(self, width: int, height: int, resolution: int | None) -> tuple[int, int]:
        """The area rule, kept at or under 1024² pixels where the target is ≤ 1024²: the area
        rule rounds sides to the nearest 16 (1216×864 = 1,050,624 px for 4:3), and the pipeline
        would then scale the reference down to ~1 MP and crop it to other multiples of 16, so
        reference and output would no longer line up pixel for pixel."""
        w, h = super().working_size(width, height, resolution)
        target = resolution or self.resolution.default
        step = self.resolution.multiple
        if target * target <= REFERENCE_AREA:
            while w * h > REFERENCE_AREA and max(w, h) > step:
                if w >= h:
                    w -= step
                else:
                    h -= step
        return w, h

    def run(self, pipe: DiffusionPipeline, inputs: RunInputs, hooks: StepHooks,
            device: torch.device) -> list[np.ndarray]:
        height, width = check_working_image(inputs.image, self.resolution.multiple)
        if min(height, width) < MIN_SIDE or max(height, width) > MAX_ASPECT * min(height, width):
            raise InvalidInput(
                f"FLUX.2 klein needs an image of at least {MIN_SIDE} px a side and at most "
                f"{MAX_ASPECT:g}:1 (the working size is {width}×{height})", "image")
        seeds = list(inputs.seeds)
        reference = Image.fromarray(
            (np.clip(inputs.image, 0.0, 1.0) * 255.0).round().astype(np.uint8), "RGB")
        guidance = float(inputs.options.get("guidance", 4.0))
        if pipe.config.get("is_distilled", False):
            guidance = 1.0  # ignored by distilled models; 1.0 only spares the warning
        result = pipe(
            image=reference,
            prompt=inputs.instruction,
            height=height,
            width=width,
            num_inference_steps=inputs.steps,
            guidance_scale=guidance,
            num_images_per_prompt=len(seeds),
            generator=generators(seeds),
            output_type="np",
            callback_on_step_end=step_callback(hooks, inputs.steps),
            callback_on_step_end_tensor_inputs=["latents"],
        ).images
        return [np.asarray(result[k], dtype=np.float32) for k in range(len(seeds))]

    # ------------------------------------------------------------------ preview
    def preview_encoder(self, pipe: Any) -> Encode:
        # normalised 2×2-patchified latents (as the transformer sees them), back to 1/8 scale
        return lambda image: pipe._unpatchify_latents(pipe._encode_vae_image(image, generator=None))

    def preview(self, pipe: DiffusionPipeline, latents: torch.Tensor,
                size: tuple[int, int]) -> Image.Image | None:
        """`size` = (width, height) of the working image; the preview is at latent scale (1/8)."""
        rgb_map = self.preview_map(pipe)
        if rgb_map is None or latents is None:
            return None
        width, height = size
        token = pipe.vae_scale_factor * 2  # pixels per latent token side (8 × 2×2 patches)
        rows, cols = height // token, width // token
        first = latents[:1]  # 1 × (rows·cols) × 4C, raster order (the pipeline's latent ids)
        patched = first.reshape(1, rows, cols, first.shape[-1]).permute(0, 3, 1, 2)
        return latent_rgb_image(pipe._unpatchify_latents(patched)[0], rgb_map)
