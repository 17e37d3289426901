"""FLUX.1 Kontext [dev]: diffusers' FluxKontextPipeline, called so that nothing is resized.

What the engine relies on in diffusers 0.42's pipeline (checked in its source):
- The output size is recomputed from `max_area` and the aspect ratio, and the input image is
  snapped to one of the PREFERRED_KONTEXT_RESOLUTIONS, unless `max_area=w*h` and
  `_auto_resize=False` are passed with explicit `height`/`width` (then both stay the working size).
- A float H×W×3 array in [0, 1] (batch axis first) goes in without an 8-bit round trip; the
  image is encoded with the posterior mode (`argmax`), so it draws nothing from the generators.
- Noise: `randn_tensor` with a list of generators draws each sample from its own generator
  (unpacked shape, then packed), so variant k equals a single run with seed + k.
- The text embeddings are encoded once and repeated per image; the distilled guidance is an
  embedding input of the transformer (no second pass), one value for the batch.
- LoRAs: FluxLoraLoaderMixin (`load_lora_weights`, `set_adapters`, `fuse_lora`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

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



# ---------------------------------------------------------------------------- the family
class FluxKontextFamily(DiTFamily):
    id = "flux-kontext"
    label = "FLUX.1 Kontext"
    params = (
        ParamSpec("guidance", "float", 2.5, "Guidance",
                  help="Distilled guidance: how strongly the edit follows the instruction "
                       "(an input of the model, no extra pass)",
                  minimum=0.0, maximum=10.0, step=0.1, explore=1.0),
    )
    # Kontext was trained on ~1 MP buckets; sides are multiples of 16 (VAE 8 × 2×2 packing).
    resolution = ResolutionRule("area", 1024, 16)
    steps = StepsRule(28)
    supports_loras = True
    quantizable = ("transformer", "text_encoder_2")  # the 12B DiT and the T5-XXL encoder
    text_encoders = ("text_encoder", "text_encoder_2")
    preferred_dtype = torch.bfloat16  # trained and distributed in bf16
    # A single transformer file takes its config and other components from here by default.
    default_config = "black-forest-labs/FLUX.1-Kontext-dev"
    pipeline_class_names = ("FluxKontextPipeline",)
    pipeline_class, transformer_class = "FluxKontextPipeline", "FluxTransformer2DModel"

    def run(self, pipe: DiffusionPipeline, inputs: RunInputs, hooks: StepHooks,
            device: torch.device) -> list[np.ndarray]:
        height, width = check_working_image(inputs.image, self.resolution.multiple)
        seeds = list(inputs.seeds)
        image = np.ascontiguousarray(inputs.image, dtype=np.float32)[None]
        result = pipe(
            image=image,
            prompt=inputs.instruction,
            height=height,
            width=width,
            max_area=height * width,
            _auto_resize=False,
            num_inference_steps=inputs.steps,
            guidance_scale=float(inputs.options.get("guidance", 2.5)),
            num_images_per_prompt=len(seeds),
            generator=generators(seeds),
            output_type="np",
            callback_on_step_end=step_callback(hooks, inputs.steps),
            callback_on_step_end_tensor_inputs=["latents"],
        ).images
        return [np.asarray(result[k], dtype=np.float32) for k in range(len(seeds))]

    # ------------------------------------------------------------------ preview
    def preview_encoder(self, pipe: Any) -> Encode:
        return lambda image: pipe._encode_vae_image(image, generator=None)

    def preview(self, pipe: DiffusionPipeline, latents: torch.Tensor,
                size: tuple[int, int]) -> Image.Image | None:
        """`size` = (width, height) of the working image; the preview is at latent scale (1/8)."""
        rgb_map = self.preview_map(pipe)
        if rgb_map is None or latents is None:
            return None
        width, height = size
        unpacked = pipe._unpack_latents(latents[:1], height, width, pipe.vae_scale_factor)
        return latent_rgb_image(unpacked[0], rgb_map)
