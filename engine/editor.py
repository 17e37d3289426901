"""The editing pipeline: one loaded model turning (image, instruction) into edited images.

The denoising loop is InstructPix2Pix's (method.md): the image latent is the VAE posterior
mode (unscaled), concatenated to the noisy latent on the channel axis; three guidance rows
[c_T, ∅, ∅] × [c_I, c_I, 0] per step, combined by `engine.guidance.combine_guidance`.
With the model's own scheduler it reproduces diffusers' StableDiffusionInstructPix2PixPipeline
step for step; it adds what an editor needs around it: working size, alpha, masks, detail
preservation, batched variants, progress, cancellation and memory handling.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionInstructPix2PixPipeline,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from engine import imaging
from engine.devices import (
    free_memory,
    is_out_of_memory,
    plan_memory,
    resolve_device,
    resolve_dtype,
)
from engine.errors import EditCancelled, InvalidInput, OutOfMemory
from engine.guidance import combine_guidance, rows_needed
from engine.models import load_pipeline, lora_adapter_name, resolve_lora_path
from engine.request import EditParams, LoraSpec

SCHEDULER_CLASSES = {
    "euler-a": EulerAncestralDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
    "lcm": LCMScheduler,
}


@dataclass(frozen=True)
class Progress:
    step: int  # steps done so far, 1-based
    total: int
    preview: Image.Image | None = None  # cheap latent preview of variant 0, when asked for


ProgressCallback = Callable[[Progress], None]


class Editor:
    """One loaded model, ready to edit. Edits are serialised by a lock (one at a time)."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str = "auto",
        dtype: str = "auto",
        allow_pickle: bool = False,
        memory_saving: str = "auto",
        model_config: str | None = None,
        pipeline: StableDiffusionInstructPix2PixPipeline | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.allow_pickle = allow_pickle
        self.memory_saving = memory_saving
        plan_memory(memory_saving, self.device, 0)  # validates the name early
        self.model_name = str(model) if model is not None else None
        self.pipe = pipeline if pipeline is not None else load_pipeline(
            model, dtype=self.dtype, allow_pickle=allow_pickle, config=model_config
        )
        if self.pipe.unet.dtype != self.dtype:
            self.pipe.to(dtype=self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        # NHWC convolutions: ~20 % faster for the UNet on CPUs (oneDNN) and on tensor-core GPUs.
        self.pipe.unet.to(memory_format=torch.channels_last)
        self.pipe.vae.to(memory_format=torch.channels_last)
        self._offloaded = False
        self._apply_memory_plan(0)
        self._lock = threading.Lock()
        self._loaded_loras: dict[str, str] = {}  # adapter name -> file
        self._empty_text: torch.Tensor | None = None

    @classmethod
    def from_pipeline(
        cls, pipe: StableDiffusionInstructPix2PixPipeline, *, device: str = "auto", dtype: str = "auto"
    ) -> Editor:
        return cls(pipeline=pipe, device=device, dtype=dtype)

    # ---------------------------------------------------------------- public API
    def edit(
        self,
        image: Image.Image,
        params: EditParams,
        mask: Image.Image | None = None,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        preview_every: int = 0,
    ) -> list[Image.Image]:
        """Return `params.variants` edited images, each of the input's exact size.

        Variant k uses seed + k and equals a single edit with that seed. Raises EditCancelled
        within one step of `cancel` being set, InvalidInput for unusable images or masks, and
        OutOfMemory when even one variant at a time does not fit.
        """
        prepared = imaging.prepare_image(image)
        weights = imaging.prepare_mask(mask, prepared.size) if mask is not None else None
        if params.is_empty:
            return [prepared.original.copy() for _ in range(params.variants)]
        size = imaging.working_size(*prepared.size, params.resolution, multiple=8)
        working_input = imaging.resize_to_working_size(prepared, size)
        with self._lock:
            results = self.edit_working_size(
                working_input, params, on_progress=on_progress, cancel=cancel, preview_every=preview_every
            )
        out = []
        for result in results:
            full = imaging.bring_back_to_input_size(
                prepared.rgb, working_input, result, params.preserve_detail
            )
            out.append(imaging.finish(prepared, full, weights))
        return out

    def edit_working_size(
        self,
        working_input: np.ndarray,
        params: EditParams,
        *,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        preview_every: int = 0,
    ) -> list[np.ndarray]:
        """The model part: H×W×3 floats in [0, 1] in, one such array per variant out."""
        height, width = working_input.shape[:2]
        if height % 8 or width % 8:
            raise InvalidInput(f"working size {width}×{height} must be a multiple of 8", "resolution")
        self._apply_memory_plan(width * height)
        self._activate_loras(params.loras)
        seeds = [params.seed + k for k in range(params.variants)]
        chunk = len(seeds)
        results: list[np.ndarray] = []
        while len(results) < len(seeds):
            todo = seeds[len(results) : len(results) + chunk]
            try:
                results.extend(
                    self._run(working_input, params, todo, on_progress, cancel, preview_every, len(results))
                )
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                free_memory(self.device)
                if chunk > 1:
                    chunk = max(1, chunk // 2)
                elif not self._memory_savers_maxed():
                    self._max_out_memory_savers()
                else:
                    raise OutOfMemory(
                        f"out of memory at {width}×{height} even one variant at a time with every "
                        "memory saver on; lower the resolution or close other GPU programs",
                        "resolution",
                    ) from err
        return results

    # ------------------------------------------------------------- the method
    @torch.inference_mode()
    def _run(
        self,
        working_input: np.ndarray,
        params: EditParams,
        seeds: Sequence[int],
        on_progress: ProgressCallback | None,
        cancel: threading.Event | None,
        preview_every: int,
        done_before: int,
    ) -> list[np.ndarray]:
        pipe = self.pipe
        device = self._execution_device()
        batch = len(seeds)
        s_t, s_i = params.text_guidance, params.image_guidance
        rows = rows_needed(s_t, s_i)

        text = self._encode_text(params.instruction, device)
        empty = self._encode_empty_text(device)
        image = imaging.pil_to_model_tensor(working_input).to(device=device, dtype=text.dtype)
        image_latent = pipe.vae.encode(image).latent_dist.mode()  # unscaled, as trained
        zero_latent = torch.zeros_like(image_latent)

        # Rows are grouped by branch (all variants' e_c, then e_i, then e_u), as diffusers does.
        text_rows = [text, empty, empty][:rows]
        image_rows = [image_latent, image_latent, zero_latent][:rows]
        text_embeds = torch.cat([t.expand(batch, -1, -1) for t in text_rows])
        image_latents = torch.cat([i.expand(batch, -1, -1, -1) for i in image_rows])

        scheduler = self._make_scheduler(params.scheduler)
        scheduler.set_timesteps(params.steps, device=device)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        latent_shape = (batch, pipe.vae.config.latent_channels, *image_latent.shape[-2:])
        latents = randn_tensor(latent_shape, generator=generators, device=device, dtype=text.dtype)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = {"generator": generators} if _accepts_generator(scheduler) else {}

        total = len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps):
            if cancel is not None and cancel.is_set():
                raise EditCancelled()
            model_input = scheduler.scale_model_input(torch.cat([latents] * rows), t)
            model_input = torch.cat([model_input, image_latents], dim=1)
            noise = pipe.unet(model_input, t, encoder_hidden_states=text_embeds, return_dict=False)[0]
            branches = list(noise.chunk(rows)) + [None] * (3 - rows)
            guided = combine_guidance(branches[0], branches[1], branches[2], s_t, s_i)
            latents = scheduler.step(guided, t, latents, **step_kwargs, return_dict=False)[0]
            if on_progress is not None:
                want_preview = preview_every > 0 and done_before == 0 and (i + 1) % preview_every == 0
                preview = imaging.latent_preview(latents) if want_preview else None
                on_progress(Progress(step=i + 1, total=total, preview=preview))
        if cancel is not None and cancel.is_set():
            raise EditCancelled()
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return list(imaging.model_tensor_to_float(decoded))

    def _encode_text(self, text: str, device: torch.device) -> torch.Tensor:
        tokenizer, encoder = self.pipe.tokenizer, self.pipe.text_encoder
        ids = tokenizer(
            [text],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = (ids != tokenizer.pad_token_id).long().to(device)
        return encoder(ids.to(device), attention_mask=mask)[0].to(dtype=encoder.dtype)

    def _encode_empty_text(self, device: torch.device) -> torch.Tensor:
        # The "null text" is CLIP's embedding of "", not zeros; it never changes, so keep it.
        if self._empty_text is None or self._empty_text.device != device:
            self._empty_text = self._encode_text("", device)
        return self._empty_text

    def _make_scheduler(self, name: str):
        # A fresh scheduler per edit: schedulers keep per-run state (step index).
        config = self.pipe.scheduler.config
        if name == "default":
            return type(self.pipe.scheduler).from_config(config)
        if name == "dpm++":
            return DPMSolverMultistepScheduler.from_config(
                config, algorithm_type="dpmsolver++", use_karras_sigmas=True
            )
        return SCHEDULER_CLASSES[name].from_config(config)

    # ------------------------------------------------------------ LoRA & memory
    def _activate_loras(self, loras: Sequence[LoraSpec]) -> None:
        if not loras:
            if self._loaded_loras:
                self.pipe.disable_lora()
            return
        names, strengths = [], []
        for lora in loras:
            path = resolve_lora_path(lora.path, self.allow_pickle)
            name = lora_adapter_name(path)
            if name not in self._loaded_loras:
                try:
                    self.pipe.load_lora_weights(str(path), adapter_name=name)
                except (ValueError, OSError, KeyError, RuntimeError) as err:
                    raise InvalidInput(
                        f"could not load LoRA {path.name}: {str(err).splitlines()[0][:200]}", "loras"
                    ) from err
                self._loaded_loras[name] = str(path)
            names.append(name)
            strengths.append(lora.strength)
        self.pipe.enable_lora()
        self.pipe.set_adapters(names, adapter_weights=strengths)

    def _execution_device(self) -> torch.device:
        return self.pipe._execution_device if self._offloaded else self.device

    def _apply_memory_plan(self, working_pixels: int) -> None:
        plan = plan_memory(self.memory_saving, self.device, working_pixels)
        if plan.cpu_offload and not self._offloaded:
            self.pipe.enable_model_cpu_offload(device=self.device)
            self._offloaded = True
        elif not self._offloaded:
            self.pipe.to(self.device)
        if plan.attention_slicing:
            self.pipe.enable_attention_slicing()
        else:
            self.pipe.disable_attention_slicing()
        if plan.vae_tiling:
            self.pipe.vae.enable_tiling()
        else:
            self.pipe.vae.disable_tiling()

    def _memory_savers_maxed(self) -> bool:
        return self.memory_saving == "offload" or self.device.type != "cuda"

    def _max_out_memory_savers(self) -> None:
        self.memory_saving = "offload"
        self._apply_memory_plan(0)


def _accepts_generator(scheduler: object) -> bool:
    import inspect

    return "generator" in inspect.signature(scheduler.step).parameters  # type: ignore[attr-defined]
