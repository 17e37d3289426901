"""Loading a base model for training, and turning it into something trainable.

Two kinds of base:
- an InstructPix2Pix model (UNet with 8 input channels), fine-tuned with LoRA by default;
- a Stable Diffusion 1.x-style text-to-image model (4 input channels), whose `conv_in`
  is widened to 8 channels the paper's way and then trained fully.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from engine.errors import InvalidInput, ModelNotFound

LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
INSTRUCT_PIX2PIX = "instruct-pix2pix"
TEXT_TO_IMAGE = "text-to-image"


@dataclass
class BaseModel:
    """The parts of a diffusers Stable Diffusion folder that training needs."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # the training-time forward process
    inference_scheduler: Any  # what the saved model samples with
    kind: str  # INSTRUCT_PIX2PIX or TEXT_TO_IMAGE
    source: str


def load_base(base: str | Path, *, local_files_only: bool = False) -> BaseModel:
    """Load a diffusers folder or hub id. A 4-channel UNet is widened to 8 (see `expand_conv_in`)."""
    source = str(base)
    options: dict[str, Any] = {"local_files_only": local_files_only}
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **options)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **options)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **options)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **options)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **options)
    except (OSError, ValueError) as err:
        raise ModelNotFound(
            f"cannot load the base model {source!r} as a diffusers Stable Diffusion model "
            f"(needs unet/, vae/, text_encoder/, tokenizer/, scheduler/): {err}",
            field="model",
        ) from err
    inference_scheduler = _inference_scheduler(source, options)
    in_channels = unet.config.in_channels
    if in_channels == 8:
        kind = INSTRUCT_PIX2PIX
    elif in_channels == 4:
        kind = TEXT_TO_IMAGE
        unet = expand_conv_in(unet)
        # The paper samples with Euler ancestral; a text-to-image base usually ships PNDM.
        inference_scheduler = EulerAncestralDiscreteScheduler.from_config(
            inference_scheduler.config
        )
    else:
        raise InvalidInput(
            f"the base model's UNet has {in_channels} input channels; expected 8 "
            "(InstructPix2Pix) or 4 (text-to-image Stable Diffusion)",
            field="model",
        )
    return BaseModel(
        unet, vae, text_encoder, tokenizer, noise_scheduler, inference_scheduler, kind, source
    )


def _inference_scheduler(source: str, options: dict[str, Any]) -> Any:
    """The scheduler class the model folder names (model_index/scheduler config), loaded as is."""
    import diffusers

    config = DDPMScheduler.load_config(source, subfolder="scheduler", **options)
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if cls is None or not hasattr(cls, "from_config"):
        cls = EulerAncestralDiscreteScheduler
    return cls.from_config(config)


def expand_conv_in(unet: UNet2DConditionModel, extra_channels: int = 4) -> UNet2DConditionModel:
    """Widen `conv_in` from 4 to 8 input channels as the paper does.

    Channels [:4] keep the pretrained weights, the new image channels start at zero (so the
    widened model initially computes exactly what the base did), and the bias is copied:
    diffusers' example script forgot the bias (diffusers issue 4960), which shifts every
    activation of the first layer.
    """
    old = unet.conv_in
    new = torch.nn.Conv2d(
        old.in_channels + extra_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        bias=old.bias is not None,
    ).to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=old.in_channels + extra_channels)
    return unet


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float | None = None) -> None:
    """Freeze the UNet and add a LoRA adapter to its attention projections (peft)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            init_lora_weights="gaussian",
            target_modules=list(LORA_TARGET_MODULES),
        )
    )


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' naming (what `pipe.load_lora_weights` reads)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet: UNet2DConditionModel, folder: Path) -> Path:
    weights = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in lora_state_dict(unet).items()
    }
    # The adapter's config (rank, alpha, targets) travels in the file's metadata, so a loader
    # applies the same scaling as training did, whatever --lora-alpha was.
    metadata = {
        k: list(v) if isinstance(v, set) else v
        for k, v in unet.peft_config["default"].to_dict().items()
    }
    StableDiffusionInstructPix2PixPipeline.save_lora_weights(
        folder,
        unet_lora_layers=weights,
        safe_serialization=True,
        unet_lora_adapter_metadata=metadata,
    )
    return folder / "pytorch_lora_weights.safetensors"


def save_full(base: BaseModel, unet: UNet2DConditionModel, folder: Path) -> Path:
    """A complete diffusers InstructPix2Pix folder (safetensors) with the trained UNet."""
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=base.inference_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
