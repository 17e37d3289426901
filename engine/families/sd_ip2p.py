"""InstructPix2Pix on Stable Diffusion 1.x (`sd-ip2p`) and SDXL (`sdxl-ip2p`, incl. CosXL Edit).

The engine's own denoising loop (method.md): the image latent is the VAE posterior mode,
concatenated to the noisy latent on the channel axis; per step the rows
[c_T, ∅, ∅] × [c_I, c_I, 0] go through the UNet at once, combined by
`engine.guidance.combine_guidance`. Why not diffusers' pipelines: they switch ALL guidance off
when s_I < 1 (a legitimate "change more" setting), always run 3 rows (s_I = 1 needs 2), and
cannot be cancelled within a step. With the model's own scheduler and s_I ≥ 1 the loop equals
`StableDiffusionInstructPix2PixPipeline` / `StableDiffusionXLInstructPix2PixPipeline` (tested).

SDXL adds its conditioning: two CLIP text encoders (penultimate hidden states concatenated,
the pooled projection of the second), `add_time_ids` = original size + crop (0, 0) + target size,
and for the null text zeros when the pipeline's `force_zeros_for_empty_prompt` says so.
CosXL Edit (one .safetensors file) multiplies its image latent by the VAE scaling factor
(`pipe.is_cosxl_edit`, from the catalogue entry's `load` or the file's `edm_vpred.*` keys) and
samples with an EDM Euler v-prediction scheduler.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine import imaging
from engine.errors import InvalidInput
from engine.families.base import Family, ParamSpec, ResolutionRule, RunInputs, StepHooks, StepsRule
from engine.guidance import combine_guidance, rows_needed
from engine.request import GUIDANCE_RANGE, SCHEDULERS
from engine.sources import ModelSource, hub_config_local, load_errors, pretrained

# diffusers is imported when a model is loaded or run, not with the registry (the CLI builds its
# flags from the families' parameters without paying for it).
SCHEDULER_CLASSES = {
    "euler-a": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "lcm": "LCMScheduler",
}


def _diffusers(name: str) -> Any:
    import diffusers

    return getattr(diffusers, name)


IP2P_PARAMS = (
    ParamSpec("text_guidance", "float", 7.5, "Text guidance",
              "s_T: how strongly to follow the instruction", minimum=GUIDANCE_RANGE[0],
              maximum=GUIDANCE_RANGE[1], step=0.5, explore=2.5),
    ParamSpec("image_guidance", "float", 1.5, "Image guidance",
              "s_I: how closely to stay with the input; below 1 changes more",
              minimum=GUIDANCE_RANGE[0], maximum=GUIDANCE_RANGE[1], step=0.05, explore=0.5),
    ParamSpec("scheduler", "choice", "default", "Scheduler",
              "default = the model's own; dpm++ gives good results in fewer steps", choices=SCHEDULERS),
)

# Linear maps from latents to RGB (+ bias): a cheap preview without the VAE decoder
# (the factors ComfyUI's latent formats use for SD 1.x and SDXL).
SD1_LATENT_RGB = (imaging.SD1_LATENT_RGB, None)
SDXL_LATENT_RGB = (
    ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
     (-0.3165, -0.2492, -0.2188)),
    (0.1084, -0.0175, -0.0011),
)


class InstructPix2PixFamily(Family):
    """SD 1.x InstructPix2Pix (and MagicBrush): one CLIP text encoder, unscaled image latent."""

    id = "sd-ip2p"
    label = "InstructPix2Pix"
    params = IP2P_PARAMS
    resolution = ResolutionRule("long_side", 512, 8)
    steps = StepsRule(20)
    supports_loras = True
    supports_negative_prompt = False
    quantizable = ("unet", "text_encoder")
    pipeline_class_names = ("StableDiffusionInstructPix2PixPipeline",)
    denoiser = "unet"
    text_encoders = ("text_encoder",)
    pipeline_class_name = "StableDiffusionInstructPix2PixPipeline"
    default_config = "timbrooks/instruct-pix2pix"  # configs for a single file without its own
    latent_rgb = SD1_LATENT_RGB

    @property
    def pipeline_class(self) -> Any:
        return _diffusers(self.pipeline_class_name)

    # ---------------------------------------------------------------------------- loading
    def load(self, source: ModelSource, *, dtype: torch.dtype, quantization: str | None = None,
             config: str | None = None, entry: Mapping[str, Any] | None = None) -> Any:
        load_options = dict((entry or {}).get("load") or {})
        kwargs: dict[str, Any] = {"dtype": dtype, **self._pipeline_kwargs()}
        quant = _quantization_config(quantization, self.quantizable, dtype)
        if quant is not None:
            kwargs["quantization_config"] = quant
        with load_errors(source):
            if source.kind == "single_file":
                load_options = {**_sniff_single_file_options(source.location), **load_options}
                if load_options.get("is_cosxl_edit"):
                    kwargs["is_cosxl_edit"] = True
                pipe = self.pipeline_class.from_single_file(
                    source.location, config=config or self.default_config,
                    local_files_only=hub_config_local(config) or config is not None, **kwargs,
                )
            else:
                if source.kind == "hub":
                    kwargs["use_safetensors"] = True
                pipe = pretrained(self.pipeline_class, source, **kwargs)
        if load_options.get("is_cosxl_edit"):
            pipe.is_cosxl_edit = True
        scheduler = load_options.get("scheduler")
        if scheduler:
            pipe.scheduler = _make_configured_scheduler(scheduler)
        self.check(pipe, source.name)
        return pipe

    def _pipeline_kwargs(self) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}

    def check(self, pipe: Any, name: str) -> None:
        in_channels = pipe.unet.config.in_channels
        latent_channels = pipe.vae.config.latent_channels
        if in_channels != 2 * latent_channels:
            raise InvalidInput(
                f"{name} is not an instruction-editing model: its UNet takes {in_channels} input "
                f"channels, an InstructPix2Pix UNet takes {2 * latent_channels} (latent + image). "
                "Text-to-image models can be turned into one with `instruct-edit-train train`",
                "model",
            )

    def prepare(self, pipe: Any, dtype: torch.dtype) -> Any:
        pipe.set_progress_bar_config(disable=True)
        if pipe.unet.dtype != dtype:
            pipe.to(dtype=dtype)
        # fp16 SDXL VAEs overflow (diffusers upcasts them per call); keep such a VAE in fp32.
        if dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
            pipe.vae.to(dtype=torch.float32)
        # NHWC convolutions: ~20 % faster for the UNet on CPUs (oneDNN) and on tensor-core GPUs.
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        return pipe

    # ---------------------------------------------------------------------------- the method
    @torch.no_grad()  # as diffusers' pipelines (accelerate's offload hooks re-wrap parameters)
    def run(self, pipe: Any, inputs: RunInputs, hooks: StepHooks, device: torch.device) -> list[np.ndarray]:
        options = inputs.options
        s_t, s_i = float(options["text_guidance"]), float(options["image_guidance"])
        rows = rows_needed(s_t, s_i)
        batch = len(inputs.seeds)
        unet, vae = networks(pipe)
        height, width = inputs.image.shape[:2]

        text, empty, extra = self.encode(pipe, inputs.instruction, device, (height, width), rows)
        dtype = text.dtype
        image = imaging.pil_to_model_tensor(inputs.image).to(device=device, dtype=vae.dtype)
        image_latent = vae.encode(image).latent_dist.mode().to(dtype)  # unscaled, as trained
        if getattr(pipe, "is_cosxl_edit", False):
            image_latent = image_latent * vae.config.scaling_factor
        zero_latent = torch.zeros_like(image_latent)

        # Rows are grouped by branch (all variants' e_c, then e_i, then e_u), as diffusers does.
        text_rows = [text, empty, empty][:rows]
        image_rows = [image_latent, image_latent, zero_latent][:rows]
        text_embeds = torch.cat([t.expand(batch, -1, -1) for t in text_rows])
        image_latents = torch.cat([i.expand(batch, -1, -1, -1) for i in image_rows])
        added = {key: torch.cat([v.expand(batch, *v.shape[1:]) for v in value])
                 for key, value in extra.items()} or None

        scheduler = self.make_scheduler(pipe, str(options.get("scheduler", "default")))
        scheduler.set_timesteps(inputs.steps, device=device)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in inputs.seeds]
        latent_shape = (batch, vae.config.latent_channels, *image_latent.shape[-2:])
        from diffusers.utils.torch_utils import randn_tensor

        latents = randn_tensor(latent_shape, generator=generators, device=device, dtype=dtype)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = {"generator": generators} if _accepts_generator(scheduler) else {}

        total = len(scheduler.timesteps)
        for i, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(torch.cat([latents] * rows), t)
            model_input = torch.cat([model_input, image_latents], dim=1)
            kwargs = {"added_cond_kwargs": added} if added is not None else {}
            noise = unet(model_input, t, encoder_hidden_states=text_embeds, return_dict=False, **kwargs)[0]
            branches = [*noise.chunk(rows), None, None][:3]
            guided = combine_guidance(branches[0], branches[1], branches[2], s_t, s_i)
            latents = scheduler.step(guided, t, latents, **step_kwargs, return_dict=False)[0]
            hooks.step(i + 1, total, latents)
        return list(imaging.model_tensor_to_float(self.decode(pipe, latents)))

    def encode(self, pipe: Any, instruction: str, device: torch.device, size: tuple[int, int],
               rows: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[torch.Tensor]]]:
        """(instruction embedding, null-text embedding, extra UNet conditions per row)."""
        # The "null text" is CLIP's embedding of "", not zeros. It is encoded with every edit
        # (one batch with the instruction), never cached: a LoRA with text-encoder layers, or a
        # change of its strength, changes it (tests/training/test_training_fixes.py).
        both = _encode_clip(pipe.tokenizer, pipe.text_encoder, [instruction, ""], device)[0]
        return both[:1], both[1:], {}

    def decode(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        vae = networks(pipe)[1]
        latents = latents.to(vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            channels = len(mean)
            mean = torch.tensor(mean).view(1, channels, 1, 1).to(latents)
            std = torch.tensor(std).view(1, channels, 1, 1).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        return vae.decode(latents, return_dict=False)[0]

    def make_scheduler(self, pipe: Any, name: str) -> Any:
        # A fresh scheduler per edit: schedulers keep per-run state (step index).
        config = pipe.scheduler.config
        if name == "default":
            return type(pipe.scheduler).from_config(config)
        if name == "dpm++":
            return _diffusers("DPMSolverMultistepScheduler").from_config(
                config, algorithm_type="dpmsolver++", use_karras_sigmas=True
            )
        return _diffusers(SCHEDULER_CLASSES[name]).from_config(config)

    def preview(self, pipe: Any, latents: torch.Tensor, size: tuple[int, int]) -> Image.Image | None:
        factors, bias = self.latent_rgb
        return imaging.latent_preview(latents, factors, bias)


class SDXLInstructPix2PixFamily(InstructPix2PixFamily):
    """SDXL InstructPix2Pix (diffusers/sdxl-instructpix2pix-768) and CosXL Edit."""

    id = "sdxl-ip2p"
    label = "SDXL InstructPix2Pix"
    resolution = ResolutionRule("long_side", 768, 8)
    steps = StepsRule(30)
    quantizable = ("unet", "text_encoder", "text_encoder_2")
    pipeline_class_names = ("StableDiffusionXLInstructPix2PixPipeline",)
    text_encoders = ("text_encoder", "text_encoder_2")
    pipeline_class_name = "StableDiffusionXLInstructPix2PixPipeline"
    default_config = "diffusers/sdxl-instructpix2pix-768"
    latent_rgb = SDXL_LATENT_RGB

    def _pipeline_kwargs(self) -> dict[str, Any]:
        return {"add_watermarker": False}

    def encode(self, pipe: Any, instruction: str, device: torch.device, size: tuple[int, int],
               rows: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, list[torch.Tensor]]]:
        zeros_for_empty = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", True))
        texts = [instruction] if zeros_for_empty else [instruction, ""]
        embeds, pooled = [], None
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            if tokenizer is None or encoder is None:
                continue
            hidden, first = _encode_clip(tokenizer, encoder, texts, device, penultimate=True)
            if pooled is None and first.ndim == 2:
                pooled = first  # the pooled projection of the (last) text encoder
            embeds.append(hidden)
        encoder_dtype = pipe.text_encoder_2.dtype if pipe.text_encoder_2 is not None else pipe.unet.dtype
        both = torch.cat(embeds, dim=-1).to(encoder_dtype)
        assert pooled is not None, "SDXL needs a text encoder with a pooled projection"
        pooled = pooled.to(encoder_dtype)
        text, text_pooled = both[:1], pooled[:1]
        if zeros_for_empty:
            empty, empty_pooled = torch.zeros_like(text), torch.zeros_like(text_pooled)
        else:
            empty, empty_pooled = both[1:], pooled[1:]
        height, width = size
        # Micro-conditioning: original size, crop top-left, target size (all the working size).
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=encoder_dtype, device=device)
        extra = {
            "text_embeds": [text_pooled, empty_pooled, empty_pooled][:rows],
            "time_ids": [time_ids] * rows,
        }
        return text, empty, extra


def networks(pipe: Any) -> tuple[Any, Any]:
    """(UNet, VAE) as the loop calls them: the pipeline's own, or the accelerated ones the
    editor attached for the current weights (OpenVINO or torch.compile: engine/runtimes/)."""
    accelerated = getattr(pipe, "accelerated", None)
    if accelerated is not None:
        return accelerated.unet, accelerated.vae
    return pipe.unet, pipe.vae


def _encode_clip(tokenizer: Any, encoder: Any, texts: list[str], device: torch.device,
                 penultimate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states, first output) of a CLIP text encoder for `texts`, padded to 77 tokens."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    if penultimate:
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2], out[0]
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = (ids != tokenizer.pad_token_id).long()
    hidden = encoder(ids, attention_mask=mask)[0].to(dtype=encoder.dtype)
    return hidden, hidden


def _accepts_generator(scheduler: object) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters  # type: ignore[attr-defined]


def _make_configured_scheduler(spec: Mapping[str, Any]) -> Any:
    """A scheduler from a catalogue entry's {"class": name, "config": {...}}."""
    import diffusers

    name = str(spec.get("class", ""))
    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if cls is None:
        raise InvalidInput(f"unknown scheduler class {spec.get('class')!r} in the model's catalogue entry", "model")
    return cls(**dict(spec.get("config") or {}))


def _sniff_single_file_options(path: str) -> dict[str, Any]:
    """CosXL-style files carry their EDM v-prediction range as `edm_vpred.sigma_min/max`
    (ComfyUI detects them by these keys): such a file is a CosXL Edit when it edits."""
    if not path.lower().endswith(".safetensors"):
        return {}
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as checkpoint:
            keys = set(checkpoint.keys())
            if "edm_vpred.sigma_max" not in keys:
                return {}
            sigma_max = float(checkpoint.get_tensor("edm_vpred.sigma_max").item())
            sigma_min = float(checkpoint.get_tensor("edm_vpred.sigma_min").item()) \
                if "edm_vpred.sigma_min" in keys else 0.002
    except Exception:  # unreadable: the loader reports it
        return {}
    return {
        "is_cosxl_edit": True,
        "scheduler": {"class": "EDMEulerScheduler",
                      "config": {"sigma_min": sigma_min, "sigma_max": sigma_max, "sigma_data": 1.0,
                                 "prediction_type": "v_prediction", "sigma_schedule": "exponential"}},
    }


def _quantization_config(name: str | None, components: tuple[str, ...], dtype: torch.dtype) -> Any:
    if name in (None, "none"):
        return None
    if name == "gguf":
        raise InvalidInput("gguf files hold a DiT transformer (FLUX, Qwen); InstructPix2Pix models "
                           "take none, bnb-8bit, bnb-4bit or torchao-int8", "quantization")
    try:
        from engine.quantization import quantization_config
    except ImportError as err:
        raise InvalidInput(f"quantization {name!r} is not available in this installation", "quantization") from err
    return quantization_config(name, components, compute_dtype=dtype)


SD_IP2P = InstructPix2PixFamily()
SDXL_IP2P = SDXLInstructPix2PixFamily()
