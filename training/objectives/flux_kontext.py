"""FLUX.1 Kontext: LoRA fine-tuning with the conditioning `FluxKontextPipeline` builds at inference.

What the pipeline does (diffusers 0.42, read in its source) and this trainee repeats:
- text: CLIP's pooled output (`pooled_projections`) and T5's sequence (`encoder_hidden_states`,
  512 tokens), text position ids all zero;
- reference image: the VAE posterior MODE, `(z − shift_factor)·scaling_factor`, packed into
  2×2 patches and appended to the sequence AFTER the target's tokens, with its own position
  ids: the same (row, column) grid as the target's but first id 1 instead of 0;
- the target: packed latents of the edited image (a posterior sample in training), ids 0;
- the transformer gets `timestep = σ` (the pipeline passes t/1000) and, for the
  guidance-distilled [dev] model, the distilled guidance as an input;
- the prediction of the reference tokens is dropped (`noise_pred[:, :latents.size(1)]`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from training.objectives.base import CardInfo
from training.objectives.flow import FlowTrainee, SigmaSampling

# The distilled-guidance value the model is trained at: FluxKontextPipeline's default
# `guidance_scale` (diffusers' Kontext LoRA script uses the same default). Editing later
# uses the engine's own setting (2.5 by default), as with any Kontext LoRA.
TRAINING_GUIDANCE = 3.5
VALIDATION_GUIDANCE = 2.5  # the engine's default for the family

# Attention and MLP projections of the 19 double-stream blocks (image and text streams) and
# the 38 single-stream blocks: one regular expression so that the top-level `proj_out` (the
# final output layer, not a block's MLP) is left alone.
KONTEXT_LORA_TARGETS = (
    r".*("
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
    r"|single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)"
    r"|single_transformer_blocks\.\d+\.(proj_mlp|proj_out)"
    r")$"
)


def latent_ids(height: int, width: int, first: float, device: torch.device) -> torch.Tensor:
    """Position ids of a packed (height/2 × width/2) latent grid, as the pipeline makes them:
    (first, row, column) per token."""
    rows, columns = height // 2, width // 2
    ids = torch.zeros(rows, columns, 3)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device)


class FluxKontextTrainee(FlowTrainee):
    family = "flux-kontext"
    pipeline_class_name = "FluxKontextPipeline"
    lora_target_modules = KONTEXT_LORA_TARGETS
    # Logit-normal σ (the SD3/FLUX recipe) shifted for the resolution as FLUX's scheduler
    # shifts its sampling schedule.
    sampling = SigmaSampling()
    title = "FLUX.1 Kontext fine-tune"
    # T5 tokens, as the pipeline's default `max_sequence_length`: the text tokens attend
    # with no mask (padding included), so training must use what inference uses.
    max_sequence_length = 512

    # ----------------------------------------------------------------------------------
    def _latents(self, pixels: torch.Tensor, device: torch.device, *, mode: bool,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, int, int]:  # fmt: skip
        """Packed, normalised latents N×L×C of N×3×H×W pixels in [-1, 1]; also the latent size."""
        vae = self.pipe.vae
        posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        latents = posterior.mode() if mode else posterior.sample(generator=generator)
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        count, channels, height, width = latents.shape
        packed = self.pipe._pack_latents(latents, count, channels, height, width)
        return packed, height, width

    def encode_conditioning(
        self, input_pixels: torch.Tensor, instructions: list[str], device: torch.device
    ) -> dict[str, torch.Tensor]:
        prompt_embeds, pooled, _text_ids = self.pipe.encode_prompt(
            prompt=instructions,
            prompt_2=None,
            device=device,
            max_sequence_length=self.max_sequence_length,
        )
        reference, height, width = self._latents(input_pixels, device, mode=True)
        ids = latent_ids(height, width, 1.0, device)
        return {
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled,
            "reference_latents": reference,
            "reference_ids": ids[None].expand(len(instructions), -1, -1),
        }

    def encode_target(
        self, edited_pixels: torch.Tensor, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        packed, height, width = self._latents(
            edited_pixels, device, mode=False, generator=generator
        )
        self._target_grid = (height, width)
        return packed

    def forward(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        count = noisy.shape[0]
        height, width = self._target_grid
        target_ids = latent_ids(height, width, 0.0, noisy.device)
        reference_ids = conditioning["reference_ids"][0].to(noisy.device)
        prompt_embeds = conditioning["prompt_embeds"]
        config = self.pipe.transformer.config
        guidance = (
            torch.full((count,), TRAINING_GUIDANCE, device=noisy.device, dtype=torch.float32)
            if config.guidance_embeds
            else None
        )
        hidden = torch.cat([noisy, conditioning["reference_latents"].to(noisy.dtype)], dim=1)
        return denoiser(
            hidden_states=hidden,
            timestep=sigmas.to(noisy.dtype),
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"],
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=noisy.device),
            img_ids=torch.cat([target_ids, reference_ids], dim=0),
            return_dict=False,
        )[0]

    def run_pipeline(
        self, pipe: Any, image: Image.Image, instruction: str, *, steps: int,
        generator: torch.Generator,
    ) -> Image.Image:  # fmt: skip
        # As the engine calls it: the working size kept exactly (no snapping to Kontext's
        # preferred resolutions), a float image in [0, 1].
        width, height = image.size
        array = np.asarray(image.convert("RGB"), dtype=np.float32)[None] / 255.0
        return pipe(
            image=array,
            prompt=instruction,
            height=height,
            width=width,
            max_area=height * width,
            _auto_resize=False,
            num_inference_steps=steps,
            guidance_scale=VALIDATION_GUIDANCE,
            generator=generator,
        ).images[0]

    def card(self) -> CardInfo:
        return CardInfo(
            title=self.title,
            method=self.method(),
            pipeline_class=self.pipeline_class_name,
            tags=["flux", "flux-kontext"],
        )
