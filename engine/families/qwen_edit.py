"""Qwen-Image-Edit 2509 and 2511 through diffusers' `QwenImageEditPlusPipeline`.

What the pipeline does with the image (diffusers 0.42, kept as it is: it is the model's):
- the reference image goes to the Qwen2.5-VL text encoder resized to about 384² pixels
  (`CONDITION_IMAGE_SIZE`, sides rounded to 32), and to the VAE resized to about 1024²
  (`VAE_IMAGE_SIZE`) whatever the output size is; its latents are appended to the token
  sequence of the noisy latents (with their own RoPE positions);
- the output has the explicit height/width we pass (floored to a multiple of 16).
So the working size follows the pipeline's own rounding (`calculate_dimensions`: area at the
image's aspect ratio, sides rounded to 32), iterated to a fixed point: at the default 1 MP the
VAE reference then has exactly the working size and the pipeline's resize is a no-op (PIL
returns a copy for an unchanged size), so reference and output latents line up token for
token. At another `resolution` the reference is still encoded at ~1 MP (the model's behaviour).

True CFG: the pipeline runs the negative branch only when a negative prompt is given AND
true_cfg_scale > 1; we pass the negative prompt only then (1.0 = one branch, the Lightning
LoRAs' setting). Noise: one CPU generator per variant; the pipeline draws per generator, so
variant k equals a single run with seed + k (tested).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from engine.errors import InvalidInput
from engine.families.base import ParamSpec, ResolutionRule, RunInputs, StepHooks, StepsRule
from engine.families.dit import DiTFamily, Encode, generators, latent_rgb_image, step_callback

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from engine.sources import ModelSource

DEFAULT_CONFIG = "Qwen/Qwen-Image-Edit-2511"  # the base model of a single transformer file
MULTIPLE = 32  # calculate_dimensions' rounding; the pipeline itself needs 16 (vae 8 × patch 2)
VAE_AREA = 1024 * 1024  # the pipeline's VAE_IMAGE_SIZE in diffusers 0.42 (read live below)

# The scheduler the Qwen-Image(-Edit) Lightning LoRAs were distilled with (their README): a fixed
# shift of 3 (log 3 at every sequence length) and no terminal stretch. The model's own config has
# base/max shift 0.5/0.9 and shift_terminal 0.02. The `scheduler` parameter "lightning" (set by
# the catalogue's Lightning presets) runs one call with
# `FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, **LIGHTNING_SCHEDULER)`.
LIGHTNING_SCHEDULER = {"base_shift": math.log(3), "max_shift": math.log(3), "shift_terminal": None}

def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """The pipeline's own rounding (diffusers' qwenimage `calculate_dimensions`): width, height."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def qwen_working_size(width: int, height: int, area: int) -> tuple[int, int]:
    """About `area` pixels at the input's aspect ratio, sides multiples of 32, rounded as the
    pipeline rounds them.

    At the pipeline's VAE area (1 MP) it is a fixed point of `calculate_dimensions`, so that
    the pipeline's own resize of the reference image for the VAE keeps our working size
    exactly. The first rounding alone misses for ~18 % of aspect ratios; the fixed point is
    reached within 3 rounds, moves a side by at most 64 px and keeps the aspect ratio within
    5.6 % up to 4:1 (3.8 % for the first rounding); the editor scales the result back to the
    input's exact size. Other areas are not iterated: the reference stays at ~1 MP there, and
    iterating a small area would drift towards a square.
    """
    w, h = calculate_dimensions(area, width / height)
    w, h = max(MULTIPLE, w), max(MULTIPLE, h)
    if area == vae_area():
        for _ in range(16):
            again = calculate_dimensions(area, w / h)
            again = max(MULTIPLE, again[0]), max(MULTIPLE, again[1])
            if again == (w, h):
                break
            w, h = again
    return w, h


def vae_area() -> int:
    """The pixel count at which the pipeline encodes the reference image (its module constant,
    read at call time so that the working size follows the installed diffusers)."""
    try:
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module
    except ImportError:
        return VAE_AREA
    return int(getattr(module, "VAE_IMAGE_SIZE", VAE_AREA))


def _torchvision_usable() -> bool:
    try:
        from torchvision.transforms.v2 import functional  # noqa: F401
    except Exception:  # missing, or a CUDA build next to a CPU torch ("torchvision::nms")
        return False
    return True


@contextlib.contextmanager
def processor_without_video() -> Iterator[None]:
    """Let `Qwen2VLProcessor` load and save without its video processor when torchvision is
    not usable (transformers 5's Qwen2-VL video processor needs torchvision; the image
    processor falls back to its PIL backend). The edit pipeline never passes videos.

    Narrow on purpose: only `get_attributes` of Qwen2VLProcessor, only while loading/saving.
    """
    if _torchvision_usable():
        yield
        return
    from unittest import mock

    from transformers import Qwen2VLProcessor

    attributes = classmethod(lambda cls: ["image_processor", "tokenizer"])
    with mock.patch.object(Qwen2VLProcessor, "get_attributes", attributes):
        yield


class QwenImageEditFamily(DiTFamily):
    id = "qwen-image-edit"
    label = "Qwen-Image-Edit"
    params = (
        ParamSpec(
            "true_cfg_scale", "float", 4.0, "True CFG",
            help="Classifier-free guidance against the negative prompt (two transformer passes "
                 "per step); 1 turns it off (one pass), as the Lightning LoRAs need",
            minimum=1.0, maximum=20.0, step=0.1, explore=1.0,
        ),
        ParamSpec(
            "negative_prompt", "text", " ", "Negative prompt",
            help="What the edit should avoid; used only when True CFG is above 1",
            max_length=1000,
        ),
        ParamSpec(
            "scheduler", "choice", "default", "Scheduler",
            help="\"lightning\": the fixed-shift schedule (shift 3, no terminal stretch) the "
                 "Lightning LoRAs were distilled with; \"default\": the model's own "
                 "resolution-dependent shift",
            choices=("default", "lightning"),
        ),
    )
    resolution = ResolutionRule("area", 1024, MULTIPLE, minimum=64, maximum=2048)
    # 1 step gives NaN: with the model's `shift_terminal` the scheduler's terminal stretch
    # divides by 1 - sigma_last = 0 (sigmas = linspace(1, 1/steps, steps)).
    steps = StepsRule(40, minimum=2)
    supports_loras = True
    supports_negative_prompt = True
    quantizable = ("transformer", "text_encoder")  # the 20B MMDiT and the 7B Qwen2.5-VL
    # Qwen-Image's activations overflow fp16 (black/NaN images): bf16 on GPUs.
    preferred_dtype = torch.bfloat16
    pipeline_class_names = ("QwenImageEditPlusPipeline",)
    pipeline_class, transformer_class = "QwenImageEditPlusPipeline", "QwenImageTransformer2DModel"
    default_config = DEFAULT_CONFIG  # the base model of a single transformer file

    # ------------------------------------------------------------------ working size
    def working_size(self, width: int, height: int, resolution: int | None) -> tuple[int, int]:
        target = resolution or self.resolution.default
        return qwen_working_size(width, height, target * target)

    # ------------------------------------------------------------------ loading
    def load(self, source: ModelSource, *, dtype: torch.dtype, quantization: str | None = None,
             config: str | None = None) -> DiffusionPipeline:
        # The processor is made loadable without torchvision (see processor_without_video).
        with processor_without_video():
            return super().load(source, dtype=dtype, quantization=quantization, config=config)

    # ------------------------------------------------------------------ denoising
    def pipeline_kwargs(self, inputs: RunInputs) -> dict[str, Any]:
        """The `QwenImageEditPlusPipeline.__call__` arguments for `inputs` (tests and the
        benchmark call the pipeline with exactly these)."""
        options = self.resolve_options(inputs.options)
        if inputs.steps < self.steps.minimum:
            raise InvalidInput(f"steps must be at least {self.steps.minimum} for {self.label} "
                               f"models (got {inputs.steps})", "steps")
        height, width = inputs.image.shape[:2]
        scale = float(options["true_cfg_scale"])
        pixels = np.clip(inputs.image, 0.0, 1.0) * 255.0
        return {
            "image": Image.fromarray(np.round(pixels).astype(np.uint8), "RGB"),
            "prompt": inputs.instruction,
            # None → one branch: true CFG runs only with a negative prompt and a scale above 1.
            "negative_prompt": options["negative_prompt"] if scale > 1.0 else None,
            "true_cfg_scale": scale,
            "height": height,
            "width": width,
            "num_inference_steps": inputs.steps,
            "num_images_per_prompt": len(inputs.seeds),
            "generator": generators(inputs.seeds),
            "output_type": "np",
        }

    def run(self, pipe: DiffusionPipeline, inputs: RunInputs, hooks: StepHooks,
            device: torch.device) -> list[np.ndarray]:
        kwargs = self.pipeline_kwargs(inputs)
        with self.scheduler_for(pipe, self.resolve_options(inputs.options)["scheduler"]):
            images = pipe(**kwargs, callback_on_step_end=step_callback(hooks, inputs.steps),
                          callback_on_step_end_tensor_inputs=["latents"]).images
        return [np.asarray(images[k], dtype=np.float32) for k in range(len(inputs.seeds))]

    @staticmethod
    @contextlib.contextmanager
    def scheduler_for(pipe: Any, name: str) -> Iterator[None]:
        """The pipeline with the `scheduler` parameter's schedule for one call: "lightning" is a
        fresh fixed-shift scheduler (the pipeline's own is put back afterwards, whatever
        happens; the editor serialises edits, so no other call sees the swap)."""
        if name != "lightning":
            yield
            return
        from diffusers import FlowMatchEulerDiscreteScheduler

        own = pipe.scheduler
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(own.config,
                                                                     **LIGHTNING_SCHEDULER)
        try:
            yield
        finally:
            pipe.scheduler = own

    # ------------------------------------------------------------------ preview
    def preview_encoder(self, pipe: Any) -> Encode:
        """The pipeline's own encode of one frame (B×C×T×H×W, T = 1), normalised with the VAE
        config's latents_mean/latents_std as the transformer sees it."""
        return lambda image: pipe._encode_vae_image(image[:, :, None], generator=None)[:, :, 0]

    def preview(self, pipe: DiffusionPipeline, latents: torch.Tensor,
                size: tuple[int, int]) -> Image.Image | None:
        """The first sample's packed latents → RGB at latent resolution, through the map fitted
        from the model's own VAE. `size` = (width, height) of the working image."""
        rgb_map = self.preview_map(pipe)
        if rgb_map is None or latents is None or latents.ndim != 3:
            return None
        width, height = size
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        rows, cols = height // (factor * 2), width // (factor * 2)
        if rows * cols != latents.shape[1] or latents.shape[2] != (rgb_map.shape[0] - 1) * 4:
            return None
        first = latents[:1].detach()
        unpacked = pipe._unpack_latents(first, height, width, factor)  # 1×C×1×h×w
        return latent_rgb_image(unpacked[0, :, 0], rgb_map)

QWEN_IMAGE_EDIT = QwenImageEditFamily()
