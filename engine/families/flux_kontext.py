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

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from engine.errors import InvalidInput
from engine.families.base import Family, ParamSpec, ResolutionRule, RunInputs, StepHooks, StepsRule

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from engine.models import ModelSource


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
        raise InvalidInput(f"the working size {width}×{height} is not a multiple of {multiple}", "image")
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
def fit_latent_rgb(vae: torch.nn.Module, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
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


# ---------------------------------------------------------------------------- the family
class FluxKontextFamily(Family):
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

    def load(self, source: ModelSource, *, dtype: torch.dtype, quantization: str | None = None,
             config: str | None = None) -> DiffusionPipeline:
        from diffusers import FluxKontextPipeline, FluxTransformer2DModel

        from engine.quantization import load_dit_pipeline

        pipe = load_dit_pipeline(FluxKontextPipeline, FluxTransformer2DModel, source, dtype=dtype,
                                 quantization=quantization, config=config or self.default_config,
                                 components=self.quantizable)
        return self.prepare(pipe, dtype)

    def prepare(self, pipe: DiffusionPipeline, dtype: torch.dtype) -> DiffusionPipeline:
        prepare_dit(pipe, dtype)
        self._fit_preview(pipe)  # once per VAE, on the CPU before the editor moves it
        return pipe

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
    @staticmethod
    def _encode(pipe: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        def encode(image: torch.Tensor) -> torch.Tensor:
            return pipe._encode_vae_image(image, generator=None)

        return encode

    def _fit_preview(self, pipe: Any) -> torch.Tensor | None:
        vae = getattr(pipe, "vae", None)
        if vae is None:
            return None
        if vae not in _RGB_MAPS and not can_encode_now(vae):
            return None
        return fit_latent_rgb(vae, self._encode(pipe))

    def preview(self, pipe: DiffusionPipeline, latents: torch.Tensor,
                size: tuple[int, int]) -> Image.Image | None:
        """`size` = (width, height) of the working image; the preview is at latent scale (1/8)."""
        rgb_map = self._fit_preview(pipe)
        if rgb_map is None or latents is None:
            return None
        width, height = size
        unpacked = pipe._unpack_latents(latents[:1], height, width, pipe.vae_scale_factor)
        return latent_rgb_image(unpacked[0], rgb_map)
