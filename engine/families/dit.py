"""What the pipeline-based DiT families (FLUX.1 Kontext, FLUX.2 klein, Qwen-Image-Edit) share.

- `step_callback`: diffusers' `callback_on_step_end` that reports each step to the editor's
  hooks; `hooks.step` raises EditCancelled to cancel and it propagates (never `interrupt`).
- `generators`: one CPU generator per seed, so variant k equals a single run with seed + k on
  any device.
- `check_working_image`: the working image's shape and multiple.
- `prepare_dit`: no progress bars, every component in the requested dtype except quantized ones.
- The latent preview: a linear latent → RGB map fitted once per VAE from the VAE's own encoder
  (`fit_latent_rgb`), applied by `latent_rgb_image`. `DiTFamily` ties them together: its
  `prepare` fits the map on the CPU at load time, before the editor moves the pipeline.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from engine.errors import InvalidInput
from engine.families.base import Family, StepHooks

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from engine.sources import ModelSource

Encode = Callable[[torch.Tensor], torch.Tensor]


def step_callback(hooks: StepHooks, total: int) -> Callable[..., dict[str, Any]]:
    """diffusers' `callback_on_step_end`: report step i+1 of `total`; EditCancelled propagates."""

    def on_step_end(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        hooks.step(i + 1, total, kwargs.get("latents"))
        return {}

    return on_step_end


def generators(seeds: Any) -> list[torch.Generator]:
    """One CPU generator per variant: the same noise on every device."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def check_working_image(image: np.ndarray, multiple: int) -> tuple[int, int]:
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInput(f"the working image must be H×W×3 (got {image.shape})", "image")
    height, width = image.shape[:2]
    if height % multiple or width % multiple:
        raise InvalidInput(f"the working size {width}×{height} is not a multiple of {multiple}",
                           "image")
    return height, width


def prepare_dit(pipe: Any, dtype: torch.dtype) -> None:
    """No progress bars; every component in `dtype` except quantized ones (diffusers refuses
    to cast bitsandbytes models, and a cast would undo torchao/GGUF weights)."""
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module) or getattr(component, "is_quantized", False):
            continue
        parameter = next(component.parameters(), None)
        if parameter is not None and parameter.is_floating_point() and parameter.dtype != dtype:
            component.to(dtype=dtype)


# ---------------------------------------------------------------------------- latent preview
# A linear latent → RGB map per VAE, fitted once from the VAE's own encoder: an image of flat
# random colour blocks is encoded, and the colour of each latent pixel is regressed on its
# latent vector (least squares, with a bias). It works for any checkpoint (and for the tiny
# random test models) without copying anyone's constants, and costs one small encode.
_FIT_BLOCK = 16  # pixels per colour block: 2×2 latent pixels of one colour
_FIT_BLOCKS = 8  # 8×8 blocks: a 128×128 image, 256 latent pixels
_RGB_MAPS: weakref.WeakKeyDictionary[torch.nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()


@torch.no_grad()
def fit_latent_rgb(vae: torch.nn.Module, encode: Encode) -> torch.Tensor:
    """(C+1)×3 float32: the map from model-space latents (at 1/8 scale) to RGB in [0, 1].

    `encode` takes a 1×3×H×W image in [-1, 1] (the VAE's dtype and device) and returns the
    model-space latents 1×C×H/8×W/8, exactly as the pipeline makes them.
    """
    cached = _RGB_MAPS.get(vae)
    if cached is not None:
        return cached
    generator = torch.Generator().manual_seed(0)
    colours = torch.rand(3, _FIT_BLOCKS, _FIT_BLOCKS, generator=generator)
    pixels = colours.repeat_interleave(_FIT_BLOCK, 1).repeat_interleave(_FIT_BLOCK, 2)
    parameter = next(vae.parameters())
    latents = encode((pixels[None] * 2 - 1).to(parameter.device, parameter.dtype))[0].float().cpu()
    per_latent = _FIT_BLOCK * latents.shape[-1] // pixels.shape[-1]
    targets = colours.repeat_interleave(per_latent, 1).repeat_interleave(per_latent, 2)
    features = latents.reshape(latents.shape[0], -1).T
    features = torch.cat([features, torch.ones(features.shape[0], 1)], dim=1)
    solution = torch.linalg.lstsq(features.double(), targets.reshape(3, -1).T.double()).solution
    result = solution.float()
    _RGB_MAPS[vae] = result
    return result


def latent_rgb_image(latents: torch.Tensor, rgb_map: torch.Tensor) -> Image.Image:
    """C×h×w model-space latents → an h×w RGB image through the fitted map."""
    channels = latents.shape[0]
    rgb = torch.einsum("chw,cr->hwr", latents.float().cpu(), rgb_map[:channels]) + rgb_map[channels]
    data = rgb.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return Image.fromarray(data, "RGB")


def can_encode_now(vae: torch.nn.Module) -> bool:
    """False where calling the VAE would move models around (accelerate offload hooks)."""
    return not any(hasattr(module, "_hf_hook") for module in vae.modules())


class DiTFamily(Family):
    """A family run through its diffusers pipeline, with the fitted latent preview.

    Subclasses name their diffusers classes (`pipeline_class`, `transformer_class`) and the
    repository a single transformer file takes its other components from (`default_config`),
    and implement `preview_encoder` (the pipeline's own image → model-space latents) and
    `preview`, which turns their packed latents into C×h×w and calls `latent_rgb_image` with
    `preview_map(pipe)`.
    """

    pipeline_class: str = ""
    transformer_class: str = ""
    default_config: str | None = None

    def load(self, source: ModelSource, *, dtype: torch.dtype, quantization: str | None = None,
             config: str | None = None) -> DiffusionPipeline:
        """A folder or hub id (cache first) whole, or a single transformer file (.gguf, or
        .safetensors) with the rest from `config` (default: the family's reference model);
        the quantizable components quantized when asked."""
        import diffusers

        from engine.quantization import load_dit_pipeline

        pipe = load_dit_pipeline(getattr(diffusers, self.pipeline_class),
                                 getattr(diffusers, self.transformer_class), source, dtype=dtype,
                                 quantization=quantization, config=config or self.default_config,
                                 components=self.quantizable)
        return self.prepare(pipe, dtype)

    def prepare(self, pipe: DiffusionPipeline, dtype: torch.dtype) -> DiffusionPipeline:
        prepare_dit(pipe, dtype)
        self.preview_map(pipe)  # once per VAE, on the CPU before the editor moves it
        return pipe

    def preview_encoder(self, pipe: Any) -> Encode:
        """1×3×H×W in [-1, 1] → 1×C×H/8×W/8 latents, normalised as the transformer sees them."""
        raise NotImplementedError

    def preview_map(self, pipe: Any) -> torch.Tensor | None:
        """The VAE's fitted map, or None (no VAE, or not fitted and offloaded: an encode now
        would move models around)."""
        vae = getattr(pipe, "vae", None)
        if vae is None:
            return None
        if vae not in _RGB_MAPS and not can_encode_now(vae):
            return None
        return fit_latent_rgb(vae, self.preview_encoder(pipe))
