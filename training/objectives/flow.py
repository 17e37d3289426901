"""What the flow-matching families (FLUX.1 Kontext, FLUX.2 klein, Qwen-Image-Edit) share.

The rectified-flow objective, as in diffusers' training scripts for these models:
- a per-sample sigma σ ∈ (0, 1): a density from diffusers' `compute_density_for_timestep_sampling`
  (logit-normal by default, the SD3/FLUX recipe), then the same resolution-dependent shift the
  family's scheduler applies at inference (FLUX: `mu` from the image sequence length), so
  training sees the noise levels that sampling visits;
- x_t = (1 − σ)·x0 + σ·noise, the model predicts the velocity v = noise − x0;
- the loss is the (optionally weighted) mean squared error on the TARGET tokens only: the
  edit families append the reference image's tokens to the sequence after the target's, and
  those are conditioning, not something to denoise.

`FlowTrainee` is the shared plumbing behind `Trainee`: it loads the family's diffusers pipeline
through the engine (so quantized and single-file bases load exactly as for editing), adds a peft
LoRA to the transformer's attention and MLP projections, places the frozen parts in the
low-precision dtype with the adapter in float32, optionally caches the conditioning (text
embeddings and reference latents) of each training row, and saves the adapter through the
pipeline's own `save_lora_weights` so that `Pipeline.load_lora_weights(folder)` reads it.

A family subclass supplies the family-specific parts (see the abstract methods): how the
conditioning is encoded, how a target image becomes the transformer's token sequence, one
forward pass of the transformer, and one validation edit through its pipeline.
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from engine.errors import InvalidInput
from training.objectives.base import Trainee

DEFAULT_FLOW_LORA_RANK = 16
BASE_QUANTIZATIONS = ("none", "torchao-int8", "bnb-8bit", "bnb-4bit")


# --------------------------------------------------------------------------------------
# The objective


@dataclass(frozen=True)
class SigmaSampling:
    """How the training noise level σ is drawn (names as in diffusers' training scripts).

    `weighting_scheme`: "logit_normal" (σ = sigmoid(N(logit_mean, logit_std))), "mode" or
    "none" (uniform), given to `compute_density_for_timestep_sampling`; `loss_weighting`:
    "none", "sigma_sqrt" or "cosmap" for `compute_loss_weighting_for_sd3`; `shift`: apply the
    scheduler's inference-time shift for the sample's sequence length (FLUX's dynamic shift,
    or a static `shift` from the scheduler config).
    """

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    loss_weighting: str = "none"
    shift: bool = True


def calculate_shift(image_seq_len: int, config: dict[str, Any]) -> float:
    """FLUX's `mu`: linear in the image sequence length between the scheduler's two anchors."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


def shift_sigmas(sigmas: torch.Tensor, scheduler: Any, image_seq_len: int) -> torch.Tensor:
    """The shift `FlowMatchEulerDiscreteScheduler` applies at inference, for this sequence length.

    Dynamic shifting (FLUX, Qwen-Image): the scheduler's own `time_shift(mu, 1, σ)` with `mu`
    from the sequence length; otherwise the static shift s: s·σ / (1 + (s − 1)·σ).
    """
    config = scheduler.config
    if config.get("use_dynamic_shifting", False):
        mu = calculate_shift(image_seq_len, config)
        return scheduler.time_shift(mu, 1.0, sigmas)
    shift = float(config.get("shift", 1.0))
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(
    count: int,
    generator: torch.Generator,
    sampling: SigmaSampling,
    shift: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """`count` noise levels in (0, 1) (float32, CPU) drawn from `generator`: the density of
    `sampling`, then `shift` (the family's inference-time shift) when `sampling.shift`."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme=sampling.weighting_scheme,
        batch_size=count,
        logit_mean=sampling.logit_mean,
        logit_std=sampling.logit_std,
        mode_scale=sampling.mode_scale,
        generator=generator,
    ).float()
    # Keep σ away from exactly 0 and 1 (a weight of σ⁻² or a logit would blow up there).
    u = u.clamp(1e-4, 1 - 1e-4)
    return shift(u) if sampling.shift and shift is not None else u


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − σ)·x0 + σ·noise, σ broadcast over every axis after the batch axis."""
    sigma = sigmas.to(x0.device, x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1 - sigma) * x0 + sigma * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model learns: d x_t / dσ = noise − x0."""
    return noise - x0


def flow_matching_loss(
    prediction: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    loss_weighting: str = "none",
) -> torch.Tensor:
    """Mean squared error between the prediction of the target tokens and noise − x0.

    `prediction` is the transformer's output over the whole sequence, N×L×C with the target's
    tokens first (as all three edit pipelines order it); only its first `x0.shape[1]` tokens
    enter the loss, so the reference image's tokens (conditioning) never do.
    """
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if prediction.shape[0] != x0.shape[0] or prediction.shape[2:] != x0.shape[2:]:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} does not match x0 {tuple(x0.shape)}"
        )
    target_prediction = prediction[:, : x0.shape[1]].float()
    target = flow_target(x0.float(), noise.float())
    weighting = compute_loss_weighting_for_sd3(loss_weighting, sigmas.float()).to(target.device)
    per_sample = ((target_prediction - target) ** 2).reshape(x0.shape[0], -1).mean(dim=1)
    return (weighting * per_sample).mean()


# --------------------------------------------------------------------------------------
# LoRA


def add_transformer_lora(
    transformer: torch.nn.Module,
    rank: int,
    alpha: float | None,
    target_modules: str | tuple[str, ...] | list[str],
) -> None:
    """Freeze the transformer and add a peft LoRA adapter to `target_modules`: module-name
    suffixes, or one regular expression matched against whole module names (peft's rules),
    naming the family's attention AND MLP projections."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(  # type: ignore[operator]
        LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            init_lora_weights="gaussian",
            target_modules=target_modules
            if isinstance(target_modules, str)
            else list(target_modules),
        )
    )


def transformer_lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft's naming (`lora_A`/`lora_B`), float32 on the CPU: what the
    transformer pipelines' `load_lora_weights` read (as diffusers' own training scripts save
    them). `convert_state_dict_to_diffusers` would rename only the `to_q/to_k/to_v/to_out.0`
    keys to the old UNet `lora.down/up` form; a file mixing both forms loads WITHOUT those keys."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def save_transformer_lora(pipeline_class: Any, transformer: torch.nn.Module, folder: Path) -> Path:
    """Write `pytorch_lora_weights.safetensors` through the pipeline's own `save_lora_weights`,
    with the adapter's config (rank, alpha, targets) in the metadata so that a loader scales
    it exactly as training did."""
    config = transformer.peft_config["default"].to_dict()  # type: ignore[index,operator]
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    pipeline_class.save_lora_weights(
        folder,
        transformer_lora_layers=transformer_lora_state_dict(transformer),
        safe_serialization=True,
        transformer_lora_adapter_metadata=metadata,
    )
    return Path(folder) / "pytorch_lora_weights.safetensors"


def unused_trainable_parameters(denoiser: torch.nn.Module) -> list[str]:
    """Names of trainable parameters without a gradient after a backward pass.

    DistributedDataParallel (accelerate's multi-GPU) waits for a gradient of every trainable
    parameter; one that gets none hangs or fails the run. Tests call this after one step.
    """
    return [n for n, p in denoiser.named_parameters() if p.requires_grad and p.grad is None]


# --------------------------------------------------------------------------------------
# Conditioning cache


def sample_key(pixels: torch.Tensor, instruction: str) -> str:
    """A row's identity for the cache: its (augmented) input pixels and its instruction.

    Keyed by content rather than by row number, so a different crop or flip of the same row
    can never be served someone else's latents.
    """
    digest = hashlib.sha1(pixels.detach().cpu().contiguous().numpy().tobytes())
    digest.update(b"\0" + instruction.encode("utf-8", "replace"))
    return digest.hexdigest()


class ConditioningCache:
    """Per-sample conditioning tensors kept on the CPU, keyed by `sample_key`."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)


# --------------------------------------------------------------------------------------
# The shared trainee


class FlowTrainee(Trainee):
    """A flow-matching edit model made trainable; subclasses fill in the family's parts.

    Class attributes of a subclass: `family` (the engine's id), `pipeline_class_name` (the
    diffusers pipeline), `lora_target_modules` (attention and MLP projection names),
    `sampling` (the family's σ sampling), `title` (model card), `offers_full` (whether
    `--full` is allowed).
    """

    pipeline_class_name: str = ""
    lora_target_modules: str | tuple[str, ...] = ()
    sampling: SigmaSampling = SigmaSampling()
    title: str = ""
    offers_full: bool = True

    def __init__(
        self,
        model: str,
        *,
        lora_rank: int | None,
        lora_alpha: float | None,
        full: bool,
        local_files_only: bool,
        weight_dtype: torch.dtype = torch.float32,
        base_quantization: str = "none",
        cache_conditioning: bool = False,
    ) -> None:
        from engine.families import get_family
        from engine.sources import resolve_model_source

        if full and not self.offers_full:
            raise InvalidInput(
                f"full fine-tuning is not offered for the {self.family} family; train a LoRA "
                "adapter instead (leave out --full, optionally set --lora-rank)",
                field="full",
            )
        if full and base_quantization != "none":
            raise InvalidInput(
                f"--base-quantization {base_quantization} freezes the base weights in a "
                "quantized form; it works with LoRA only: leave out --full or use "
                "--base-quantization none",
                field="base_quantization",
            )
        if base_quantization not in BASE_QUANTIZATIONS:
            raise InvalidInput(
                f"base quantization must be one of {', '.join(BASE_QUANTIZATIONS)} "
                f"(got {base_quantization!r})",
                field="base_quantization",
            )
        if local_files_only:
            import os

            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the engine's loader reads this
        self.source = str(model)
        self.engine_family = get_family(self.family)
        self.base_quantization = base_quantization
        quantization = None if base_quantization == "none" else base_quantization
        # The engine's loader: folders, hub ids and single transformer files, quantized
        # components as the family declares them (the transformer and the big text encoder).
        self.pipe: Any = self.engine_family.load(
            resolve_model_source(model),
            dtype=weight_dtype if not full else torch.float32,
            quantization=quantization,
        )
        self.pipe.set_progress_bar_config(disable=True)
        # Training sizes must pack into whole tokens as the pipeline's working sizes do.
        self.resolution_multiple: int = self.engine_family.resolution.multiple
        self.kind = f"{self.engine_family.label}" + (
            f", base quantized {base_quantization}" if quantization else ""
        )
        self.use_lora = not full
        self.lora_rank = (lora_rank or DEFAULT_FLOW_LORA_RANK) if self.use_lora else None
        self.lora_alpha = lora_alpha
        self.denoiser = self.pipe.transformer
        for name, component in self.pipe.components.items():
            if isinstance(component, torch.nn.Module) and name != "transformer":
                component.requires_grad_(False)
        if self.use_lora:
            assert self.lora_rank is not None
            add_transformer_lora(
                self.denoiser, self.lora_rank, lora_alpha, self.lora_target_modules
            )
        else:
            self.denoiser.requires_grad_(True)
        self.cache = ConditioningCache() if cache_conditioning else None

    # ----------------------------------------------------------------------------------
    # What each family supplies

    @abstractmethod
    def encode_conditioning(
        self, input_pixels: torch.Tensor, instructions: list[str], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Everything the transformer is conditioned on, per sample (first axis N), computed
        as the family's pipeline does at inference, without gradients and without random
        draws (so it can be cached): text embeddings, the reference image's packed latents…"""

    @abstractmethod
    def encode_target(
        self, edited_pixels: torch.Tensor, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        """x0: the edited image as the transformer's target token sequence, N×L×C, normalised
        as the pipeline's latents are (a posterior sample drawn from `generator`)."""

    @abstractmethod
    def forward(
        self,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """One transformer pass as the pipeline makes it; returns the output over the whole
        sequence, N×L'×C with the target's L tokens first."""

    @abstractmethod
    def run_pipeline(
        self, pipe: Any, image: Image.Image, instruction: str, *, steps: int,
        generator: torch.Generator,
    ) -> Image.Image:  # fmt: skip
        """One edit through the family's diffusers pipeline at the image's own size."""

    def shift_sigmas(self, sigmas: torch.Tensor, image_seq_len: int) -> torch.Tensor:
        """The shift the family's pipeline applies to its sampling schedule for a target of
        `image_seq_len` tokens (default: the scheduler's own, see `shift_sigmas`)."""
        return shift_sigmas(sigmas, self.pipe.scheduler, image_seq_len)

    def collate_conditioning(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per-sample cache entries back into a batch (override to pad variable lengths)."""
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    # ----------------------------------------------------------------------------------
    # Trainee

    def place(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        from diffusers.training_utils import cast_training_params

        for name, component in self.pipe.components.items():
            if not isinstance(component, torch.nn.Module):
                continue
            if name == "transformer" and not self.use_lora:
                component.to(device, torch.float32)  # trained fully: float32 master weights
                continue
            quantized = getattr(component, "is_quantized", False)
            try:
                component.to(device)
            except ValueError:
                # bitsandbytes models refuse `.to`; diffusers placed them on the GPU at load.
                if not quantized:
                    raise
            if not quantized and weight_dtype != torch.float32:
                component.to(dtype=weight_dtype)
            if name != "transformer":
                component.eval()
        if self.use_lora:
            cast_training_params(self.denoiser, dtype=torch.float32)  # the adapter stays fp32

    def conditioning(self, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        """The batch's conditioning, from the cache where possible."""
        pixels: torch.Tensor = batch["input_pixels"]
        instructions: list[str] = list(batch["instruction"])
        with torch.no_grad():
            if self.cache is None:
                return self.encode_conditioning(pixels, instructions, device)
            keys = [sample_key(p, t) for p, t in zip(pixels, instructions, strict=True)]
            missing = sorted({i for i, k in enumerate(keys) if k not in self.cache.entries})
            if missing:
                # Encode one sample at a time: a batched encode pads text to the batch's
                # longest, which would make an entry depend on its batch neighbours.
                for i in missing:
                    if keys[i] in self.cache.entries:
                        continue
                    fresh = self.encode_conditioning(pixels[i : i + 1], [instructions[i]], device)
                    self.cache.entries[keys[i]] = {k: v[0].to("cpu") for k, v in fresh.items()}
            self.cache.misses += len(missing)
            self.cache.hits += len(keys) - len(missing)
            items = [self.cache.entries[k] for k in keys]
            return {k: v.to(device) for k, v in self.collate_conditioning(items).items()}

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
        # `dropout` is InstructPix2Pix's three-way conditioning dropout; these families guide
        # with a distilled embedding or true CFG on the text alone, and are fine-tuned
        # without it (as diffusers' scripts do).
        del dropout
        conditioning = self.conditioning(batch, device)
        with torch.no_grad():
            x0 = self.encode_target(batch["edited_pixels"], generator, device).float()
        noise = torch.randn(x0.shape, generator=generator).to(device)
        sigmas = sample_sigmas(
            x0.shape[0], generator, self.sampling, lambda u: self.shift_sigmas(u, x0.shape[1])
        )
        noisy = interpolate(x0, noise, sigmas).to(weight_dtype)
        prediction = self.forward(denoiser, noisy, sigmas.to(device), conditioning)
        return flow_matching_loss(
            prediction, x0, noise, sigmas.to(device), self.sampling.loss_weighting
        )

    def validation_edit(
        self,
        denoiser: torch.nn.Module,
        image: Image.Image,
        instruction: str,
        *,
        seed: int,
        steps: int,
    ) -> Image.Image:
        pipe = self.pipeline_with(denoiser)
        with torch.no_grad():
            return self.run_pipeline(
                pipe, image, instruction, steps=steps,
                generator=torch.Generator().manual_seed(seed),
            )  # fmt: skip

    def pipeline_with(self, denoiser: torch.nn.Module) -> Any:
        """The family's pipeline with `denoiser` (the training transformer) in it."""
        components = dict(self.pipe.components)
        components["transformer"] = denoiser
        pipe = type(self.pipe)(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_lora(self, denoiser: torch.nn.Module, folder: Path) -> Path:
        return save_transformer_lora(type(self.pipe), denoiser, folder)

    def save_full(self, denoiser: torch.nn.Module, folder: Path) -> Path:
        pipe = self.pipeline_with(denoiser)
        pipe.to("cpu")
        pipe.to(dtype=torch.float32)
        pipe.save_pretrained(folder, safe_serialization=True)
        return folder

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "base_quantization": self.base_quantization}

    def method(self) -> str:
        if not self.use_lora:
            return "full transformer fine-tune (rectified flow)"
        return (
            f"LoRA (rank {self.lora_rank}) on the transformer's attention and MLP projections, "
            "rectified-flow loss on the target tokens"
        )
