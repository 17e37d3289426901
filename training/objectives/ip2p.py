"""InstructPix2Pix's training objective (the paper's recipe) and its trainee.

Noise prediction with the image latent concatenated on the channel axis; conditioning dropout
teaches the unconditional branches that three-way guidance needs at inference time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from engine.errors import InvalidInput
from training import model_init
from training.objectives.base import CardInfo, Trainee

DEFAULT_LORA_RANK = 16


def conditioning_dropout_masks(
    count: int, probability: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One uniform draw r per sample: r<p drops the text, p≤r<2p both, 2p≤r<3p the image.

    This is what teaches the model the unconditional branches that three-way
    classifier-free guidance needs at inference time.
    """
    r = torch.rand(count, generator=generator)
    drop_text = r < 2 * probability
    drop_image = (r >= probability) & (r < 3 * probability)
    return drop_text, drop_image


def diffusion_loss(
    batch: dict[str, Any],
    *,
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    noise_scheduler: Any,
    null_text: torch.Tensor,
    generator: torch.Generator,
    dropout: float,
    device: torch.device,
    weight_dtype: torch.dtype,
) -> torch.Tensor:
    """Noise-prediction loss of one micro-batch; all random draws come from `generator` (CPU)."""
    edited = batch["edited_pixels"].to(device, weight_dtype)
    source = batch["input_pixels"].to(device, weight_dtype)
    count = edited.shape[0]
    with torch.no_grad():
        # Target: a posterior SAMPLE, scaled. Conditioning: the posterior MODE, unscaled.
        latents = vae.encode(edited).latent_dist.sample(generator=generator)
        latents = latents.float() * vae.config.scaling_factor
        image_latents = vae.encode(source).latent_dist.mode().float()
        token_ids = tokenizer(
            batch["instruction"],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        text = text_encoder(token_ids)[0].float()

    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (count,), generator=generator
    ).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)

    drop_text, drop_image = conditioning_dropout_masks(count, dropout, generator)
    # Dropped text is the embedding of "" (what inference uses), not zeros; a dropped image
    # is a zero latent.
    text = torch.where(drop_text.to(device)[:, None, None], null_text.float().to(device), text)
    image_latents = (
        image_latents * (~drop_image).to(device, image_latents.dtype)[:, None, None, None]
    )

    prediction = unet(torch.cat([noisy, image_latents], dim=1), timesteps, text).sample
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(prediction.float(), target.float())


class InstructPix2PixTrainee(Trainee):
    """An InstructPix2Pix base (LoRA by default) or an SD 1.x text-to-image base (full)."""

    family = "sd-ip2p"

    def __init__(
        self,
        model: str,
        *,
        lora_rank: int | None,
        lora_alpha: float | None,
        full: bool,
        local_files_only: bool,
    ) -> None:
        self.base = model_init.load_base(model, local_files_only=local_files_only)
        self.source = self.base.source
        self.kind = self.base.kind
        self.use_lora = not full and (
            lora_rank is not None or self.base.kind == model_init.INSTRUCT_PIX2PIX
        )
        if self.use_lora and self.base.kind == model_init.TEXT_TO_IMAGE:
            raise InvalidInput(
                "a text-to-image base (4-channel UNet) gets new image channels that start at "
                "zero; they must be trained fully: use --full instead of --lora-rank",
                field="lora_rank",
            )
        self.lora_rank = (lora_rank or DEFAULT_LORA_RANK) if self.use_lora else None
        self.lora_alpha = lora_alpha
        self.denoiser = self.base.unet
        self.base.vae.requires_grad_(False)
        self.base.text_encoder.requires_grad_(False)
        if self.use_lora:
            assert self.lora_rank is not None
            model_init.add_lora(self.denoiser, self.lora_rank, lora_alpha)
        else:
            self.denoiser.requires_grad_(True)
        self.null_text: torch.Tensor | None = None

    def place(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        _move(self.base.vae, device, weight_dtype).eval()
        _move(self.base.text_encoder, device, weight_dtype).eval()
        if self.use_lora:
            # Frozen base weights in the low-precision dtype; the adapter stays float32.
            _move(self.denoiser, device, weight_dtype)
            for p in self.denoiser.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            self.denoiser.to(device)

    def prepare(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        tokenizer = self.base.tokenizer
        with torch.no_grad():
            empty = tokenizer(
                [""], padding="max_length", max_length=tokenizer.model_max_length,
                return_tensors="pt",
            )  # fmt: skip
            self.null_text = self.base.text_encoder(empty.input_ids.to(device))[0]

    def loss(
        self,
        denoiser: torch.nn.Module,
        batch: dict[str, Any],
        generator: torch.Generator,
        *,
        dropout: float,
        device: torch.device,
        weight_dtype: torch.dtype,
    ) -> torch.Tensor:
        assert self.null_text is not None, "prepare() first"
        return diffusion_loss(
            batch, unet=denoiser, vae=self.base.vae, text_encoder=self.base.text_encoder,
            tokenizer=self.base.tokenizer, noise_scheduler=self.base.noise_scheduler,
            null_text=self.null_text, generator=generator, dropout=dropout, device=device,
            weight_dtype=weight_dtype,
        )  # fmt: skip

    def validation_edit(
        self,
        denoiser: torch.nn.Module,
        image: Image.Image,
        instruction: str,
        *,
        seed: int,
        steps: int,
    ) -> Image.Image:
        from diffusers import StableDiffusionInstructPix2PixPipeline

        base = self.base
        pipe = StableDiffusionInstructPix2PixPipeline(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=denoiser,
            scheduler=base.inference_scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(
                instruction,
                image=image,
                num_inference_steps=steps,
                guidance_scale=7.5,
                image_guidance_scale=1.5,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]

    def save_lora(self, denoiser: torch.nn.Module, folder: Path) -> Path:
        return model_init.save_lora(denoiser, folder)

    def save_full(self, denoiser: torch.nn.Module, folder: Path) -> Path:
        self.base.vae.to("cpu", torch.float32)
        self.base.text_encoder.to("cpu", torch.float32)
        return model_init.save_full(self.base, denoiser.to("cpu", torch.float32), folder)

    def card(self) -> CardInfo:
        method = (
            f"LoRA (rank {self.lora_rank}) on the UNet attention projections"
            if self.use_lora
            else "full UNet fine-tune"
        )
        return CardInfo(
            title="InstructPix2Pix fine-tune",
            method=method,
            pipeline_class="StableDiffusionInstructPix2PixPipeline",
            tags=["instruct-pix2pix"],
        )


def _move(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    module.to(device)
    if dtype != torch.float32:  # (casting to float32 again only makes diffusers warn)
        module.to(dtype=dtype)
    return module
