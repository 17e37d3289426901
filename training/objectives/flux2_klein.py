"""FLUX.2 klein: LoRA fine-tuning with the conditioning `Flux2KleinPipeline` builds at inference.

What the pipeline does (diffusers 0.42, read in its source) and this trainee repeats, through
the pipeline's own static helpers wherever they exist:
- text: the instruction in Qwen3's chat template (thinking off), padded to 512 tokens, hidden
  states 9, 18 and 27 stacked on the feature axis (`_get_qwen3_prompt_embeds`); text ids
  (0, 0, 0, l);
- latents: the VAE posterior MODE, 2×2-patchified (4C channels at 1/16 of the pixels),
  normalised with the VAE's batch-norm statistics (`_encode_vae_image`), packed in raster order
  (`_pack_latents`);
- reference image (the input): those tokens appended AFTER the target's, with ids
  (10, row, column, 0) (`_prepare_image_ids`); the target's ids are (0, row, column, 0);
- the transformer gets `timestep = σ` (the pipeline passes t/1000 with t = 1000·σ) and no
  guidance embedding; the prediction of the reference tokens is dropped.
The target is the edited image's latents made the same way (the mode, as diffusers' klein
training scripts do and as the pipeline encodes every image): FLUX.2's latents are normalised
means, and the decoder un-normalises them. The loss is flow.py's (v = noise − x0 on the target
tokens only). σ: flow.py's logit-normal draw, then the shift klein's pipeline gives its schedule:
`scheduler.time_shift(μ, 1, σ)` with μ = `compute_empirical_mu(target tokens, steps)` (not
FLUX.1's `calculate_shift`), at the step count the model is used with (4 for the step-distilled
releases, the pipeline's 50 for the base models), so training sees the noise levels that
sampling visits.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from engine.errors import InvalidInput
from training.objectives.base import CardInfo
from training.objectives.flow import FlowTrainee, SigmaSampling

MAX_SEQUENCE_LENGTH = 512  # the pipeline's default: every prompt is padded to this
TEXT_LAYERS = (9, 18, 27)  # the Qwen3 hidden states the pipeline stacks
TOKEN_PIXELS = 16  # one packed token: 2×2 latent pixels of the 8× VAE
MIN_PIPELINE_SIDE = 64  # Flux2ImageProcessor.check_image_input refuses smaller images
BASE_GUIDANCE = 4.0  # the pipeline's and the engine's default for the (undistilled) base models
DISTILLED_STEPS = 4  # the step-distilled 4B/9B (the engine's default for the family)
BASE_STEPS = 50  # the pipeline's default, what the base models are sampled with

# Attention and MLP projections of every block, one regular expression (peft full-matches it):
# double-stream blocks: the image and text streams' q/k/v/out and both feed-forward MLPs;
# single-stream blocks: the fused qkv+MLP-in projection and the fused attention+MLP output.
# Modulation, embedders and the final `proj_out` stay frozen. ("to_out" alone would also name
# the double blocks' ModuleList, which peft cannot wrap.)
KLEIN_LORA_TARGETS = (
    r"("
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|transformer_blocks\.\d+\.(ff|ff_context)\.(linear_in|linear_out)"
    r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
    r")"
)


def _pipeline_class() -> Any:
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline


def encode_instructions(
    pipe: Any,
    instructions: list[str],
    device: torch.device,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings N×L×3H, text ids N×L×4), L = 512, by the pipeline's own Qwen3 encoding."""
    klein = _pipeline_class()
    embeddings = klein._get_qwen3_prompt_embeds(
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        prompt=list(instructions),
        device=device,
        max_sequence_length=max_sequence_length,
        hidden_states_layers=TEXT_LAYERS,
    )
    return embeddings, klein._prepare_text_ids(embeddings).to(device)


def encode_images(pipe: Any, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """N×3×H×W in [-1, 1] → model-space latents N×4C×H/16×W/16 (`_encode_vae_image`)."""
    height, width = pixels.shape[-2:]
    if height % TOKEN_PIXELS or width % TOKEN_PIXELS:
        raise InvalidInput(
            f"FLUX.2 klein works on images whose sides are multiples of {TOKEN_PIXELS} px (got "
            f"{width}×{height}); use a --resolution that is a multiple of {TOKEN_PIXELS}",
            field="resolution",
        )
    return pipe._encode_vae_image(pixels.to(device, pipe.vae.dtype), generator=None)


def image_ids(latents: torch.Tensor) -> torch.Tensor:
    """N×(2·h·w)×4: the target's ids (0, row, column, 0) then the reference's (10, row, column, 0),
    for a target and a reference of the same latent size h×w (training crops the input and
    the edited image together, so they always match)."""
    klein = _pipeline_class()
    target = klein._prepare_latent_ids(latents)
    # One reference image per sample: its ids as the pipeline makes them for one image.
    reference = klein._prepare_image_ids([latents[:1]]).expand(latents.shape[0], -1, -1)
    return torch.cat([target, reference], dim=1).to(latents.device)


class Flux2KleinTrainee(FlowTrainee):
    family = "flux2-klein"
    pipeline_class_name = "Flux2KleinPipeline"
    lora_target_modules = KLEIN_LORA_TARGETS
    sampling = SigmaSampling()  # logit-normal (0, 1), shifted by `shift_sigmas` below
    title = "FLUX.2 klein fine-tune"
    # A 4B/9B transformer trained whole needs ~16 bytes a parameter of optimiser state: LoRA only.
    offers_full = False
    max_sequence_length = MAX_SEQUENCE_LENGTH  # the pipeline's default (tests may lower it)

    @property
    def sampling_steps(self) -> int:
        """The step count the model is used with, which sets the pipeline's schedule shift."""
        return DISTILLED_STEPS if self.pipe.config.get("is_distilled", False) else BASE_STEPS

    def shift_sigmas(self, sigmas: torch.Tensor, image_seq_len: int) -> torch.Tensor:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        scheduler = self.pipe.scheduler
        if not scheduler.config.get("use_dynamic_shifting", False):
            return super().shift_sigmas(sigmas, image_seq_len)  # the scheduler ignores μ then
        mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=self.sampling_steps)
        return scheduler.time_shift(mu, 1.0, sigmas)

    # ----------------------------------------------------------------------------------
    def encode_conditioning(
        self, input_pixels: torch.Tensor, instructions: list[str], device: torch.device
    ) -> dict[str, torch.Tensor]:
        text, text_ids = encode_instructions(
            self.pipe, instructions, device, self.max_sequence_length
        )
        reference = encode_images(self.pipe, input_pixels, device)
        return {
            "text": text,
            "text_ids": text_ids,
            "reference": self.pipe._pack_latents(reference),
            "image_ids": image_ids(reference),
        }

    def encode_target(
        self, edited_pixels: torch.Tensor, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        del generator  # the mode: no random draw (see the module docstring)
        return self.pipe._pack_latents(encode_images(self.pipe, edited_pixels, device))

    def forward(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        reference = conditioning["reference"]
        ids = conditioning["image_ids"]
        if ids.shape[1] != noisy.shape[1] + reference.shape[1]:
            raise InvalidInput(
                "the input and edited images of a training pair must have the same size for "
                f"FLUX.2 klein ({noisy.shape[1]} target tokens, {reference.shape[1]} reference)",
                field="data",
            )
        return denoiser(
            hidden_states=torch.cat([noisy, reference.to(noisy.dtype)], dim=1),
            timestep=sigmas.to(noisy.dtype),
            guidance=None,
            encoder_hidden_states=conditioning["text"].to(noisy.dtype),
            txt_ids=conditioning["text_ids"],
            img_ids=ids,
            return_dict=False,
        )[0]

    def pipeline_with(self, denoiser: torch.nn.Module) -> Any:
        # `is_distilled` is pipeline config, not a component: carry it over, or the validation
        # pipeline of a distilled model would run guidance it was never meant to.
        pipe = type(self.pipe)(
            **{**self.pipe.components, "transformer": denoiser},
            is_distilled=bool(self.pipe.config.get("is_distilled", False)),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run_pipeline(
        self, pipe: Any, image: Image.Image, instruction: str, *, steps: int,
        generator: torch.Generator,
    ) -> Image.Image:  # fmt: skip
        if min(image.size) < MIN_PIPELINE_SIDE:
            raise InvalidInput(
                f"FLUX.2 klein's pipeline needs images of at least {MIN_PIPELINE_SIDE} px a side "
                f"(validation got {image.width}×{image.height}); use --resolution "
                f"{MIN_PIPELINE_SIDE} or more, or --validate-every 0",
                field="resolution",
            )
        distilled = bool(pipe.config.get("is_distilled", False))
        # As the engine calls it: explicit size (the reference is used as is below 1 MP).
        return pipe(
            image=image.convert("RGB"),
            prompt=instruction,
            height=image.height,
            width=image.width,
            num_inference_steps=steps,
            guidance_scale=1.0 if distilled else BASE_GUIDANCE,
            generator=generator,
        ).images[0]

    def card(self) -> CardInfo:
        return CardInfo(
            title=self.title,
            method=self.method() + "; the input image as reference tokens",
            pipeline_class=self.pipeline_class_name,
            tags=["flux2", "flux2-klein"],
        )
