"""Before/after image pairs from two captions with Prompt-to-Prompt self-attention sharing.

The paper's image half (InstructPix2Pix, section 3.1.2, and its reference code): Stable
Diffusion renders the input caption and the edited caption in ONE batch. For the first p
fraction of the sampling steps, every self-attention layer of the second image uses the
attention probabilities of the first image, which keeps the layout and identity of the
scene while the cross-attention to the edited caption changes its content. Both images
start from the same initial noise and receive the same ancestral noise at every step, so
with p = 0 they are exactly two independent generations with one seed.

Implementation notes (why it looks like this):
- The sharing is a diffusers attention processor installed on the UNet's self-attention
  (`attn1`) layers only; cross-attention keeps its stock processor.
- Replacing the second image's probabilities softmax(q1·k1ᵀ) by the first image's is the
  same as feeding the first image's query and key to the second row, so the fast fused
  `scaled_dot_product_attention` keeps working; only a recording mode (tests, debugging)
  computes the probabilities explicitly.
- The stock `StableDiffusionPipeline` runs the loop: the batch is [img0, img1], classifier-
  free guidance doubles it to [∅0, ∅1, c0, c1] (each consecutive pair is one before/after
  pair), and a step-end callback switches sharing off after the shared steps. Two CPU
  generators seeded identically give both rows the same initial and ancestral noise.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from PIL import Image

# The paper's sampling ranges (reference script defaults).
P2P_RANGE = (0.1, 0.9)
CFG_RANGE = (7.5, 15.0)


@dataclass
class AttentionRecord:
    """Self-attention probabilities of one layer at one step, one tensor per batch row."""

    layer: str
    step: int
    shared: bool
    probabilities: torch.Tensor  # (batch, heads, queries, keys), on the CPU


@dataclass
class SharingController:
    """State every shared-attention processor of one UNet reads: is sharing on, which step.

    `record` is off in production; tests turn it on to inspect the attention maps.
    """

    sharing: bool = False
    step: int = 0
    record: bool = False
    records: list[AttentionRecord] = field(default_factory=list)


def shares_step(step: int, num_steps: int, p: float) -> bool:
    """Whether sampling step `step` (0-based) shares self-attention, for fraction `p`.

    The reference sampler's rule: share while `p > step / (num_steps - 1)`. So p = 0 never
    shares, any p > 0 shares step 0, and p = 1 shares all steps but the last.
    """
    if p <= 0:
        return False
    if num_steps <= 1:
        return True
    return p > step / (num_steps - 1)


class SharedSelfAttentionProcessor(AttnProcessor2_0):
    """Self-attention where each second row of a pair attends with the first row's map.

    Rows are taken in consecutive pairs (row 2k is the "before" image, row 2k+1 the
    "after" image): with classifier-free guidance the batch [∅0, ∅1, c0, c1] holds two
    pairs, so the unconditional and the conditional branch each share within themselves.
    """

    def __init__(self, controller: SharingController, layer: str) -> None:
        super().__init__()
        self.controller = controller
        self.layer = layer

    def __call__(  # type: ignore[override]
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        is_self_attention = encoder_hidden_states is None
        sharing = self.controller.sharing and is_self_attention
        recording = self.controller.record and is_self_attention
        if not (sharing or recording):
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape
        if sharing and batch_size % 2:
            raise ValueError(
                f"prompt-to-prompt sharing needs the batch in [before, after] pairs, got {batch_size} rows"
            )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(
                attention_mask, sequence_length, batch_size
            )
            attention_mask = attention_mask.view(
                batch_size, attn.heads, -1, attention_mask.shape[-1]
            )
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if sharing:
            # softmax(q_first·k_firstᵀ) for both rows of each pair == copying the probabilities.
            query = _first_of_each_pair(query)
            key = _first_of_each_pair(key)

        if recording:
            scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask
            probabilities = scores.softmax(dim=-1)
            self.controller.records.append(
                AttentionRecord(
                    self.layer, self.controller.step, sharing, probabilities.detach().float().cpu()
                )
            )
            hidden_states = torch.matmul(probabilities.to(value.dtype), value)
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, scale=attn.scale
            )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _first_of_each_pair(tensor: torch.Tensor) -> torch.Tensor:
    """[a0, a1, b0, b1, …] → [a0, a0, b0, b0, …] along the batch axis."""
    firsts = tensor[0::2]
    return torch.stack((firsts, firsts), dim=1).flatten(0, 1)


def install_shared_self_attention(unet: torch.nn.Module, controller: SharingController) -> dict:
    """Put a SharedSelfAttentionProcessor on every `attn1` layer; returns the old processors."""
    original = dict(unet.attn_processors)
    replaced = {
        name: (
            SharedSelfAttentionProcessor(controller, name.removesuffix(".processor"))
            if name.endswith("attn1.processor")
            else processor
        )
        for name, processor in original.items()
    }
    if not any(name.endswith("attn1.processor") for name in original):
        raise ValueError(
            "the UNet has no self-attention (attn1) layers: prompt-to-prompt needs an SD-style UNet"
        )
    unet.set_attn_processor(replaced)
    return original


@dataclass(frozen=True)
class SampleParams:
    """One sample's random draws; all of them follow from the seed."""

    seed: int
    p2p_threshold: float
    cfg_scale: float


def draw_sample_params(
    seed: int,
    p2p_range: tuple[float, float] = P2P_RANGE,
    cfg_range: tuple[float, float] = CFG_RANGE,
) -> SampleParams:
    """p ~ U(p2p_range), CFG ~ U(cfg_range), drawn from the seed so a sample can be redone."""
    rng = random.Random(seed)
    return SampleParams(
        seed=seed,
        p2p_threshold=rng.uniform(*p2p_range),
        cfg_scale=rng.uniform(*cfg_range),
    )


def pair_seeds(base_seed: int, pair_index: int, count: int) -> list[int]:
    """`count` distinct 32-bit seeds for one caption pair, fixed by (base_seed, pair_index).

    Depending only on the pair's index (not on the process or the order of work) is what
    lets shards and resumed runs produce exactly the samples one uninterrupted run would.
    """
    rng = random.Random(f"{base_seed}:{pair_index}")
    seeds: list[int] = []
    seen: set[int] = set()
    while len(seeds) < count:
        seed = rng.getrandbits(32)
        if seed not in seen:
            seen.add(seed)
            seeds.append(seed)
    return seeds


class PairGenerator:
    """Generates before/after image pairs with a text-to-image Stable Diffusion pipeline.

    The pipeline's UNet gets the shared-attention processors for the generator's lifetime;
    call `close()` (or use it as a context manager) to put the original ones back.
    """

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        num_steps: int = 100,
        resolution: int = 512,
        use_model_scheduler: bool = False,
    ) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        multiple = pipeline.vae_scale_factor * 8
        if resolution < multiple or resolution % pipeline.vae_scale_factor:
            raise ValueError(
                f"resolution {resolution} must be a multiple of {pipeline.vae_scale_factor} "
                f"and at least {multiple}"
            )
        self.pipeline = pipeline
        self.num_steps = num_steps
        self.resolution = resolution
        if not use_model_scheduler:
            # The paper samples with (k-diffusion's) Euler ancestral.
            pipeline.scheduler = EulerAncestralDiscreteScheduler.from_config(
                pipeline.scheduler.config
            )
        pipeline.set_progress_bar_config(disable=True)
        self.controller = SharingController()
        self._original_processors = install_shared_self_attention(pipeline.unet, self.controller)

    def close(self) -> None:
        if self._original_processors is not None:
            self.pipeline.unet.set_attn_processor(self._original_processors)
            self._original_processors = None

    def __enter__(self) -> PairGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @torch.no_grad()
    def encode_captions(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings of the captions and of the empty prompt (the CFG null text)."""
        prompt_embeds, negative_embeds = self.pipeline.encode_prompt(
            list(captions), self.pipeline._execution_device, 1, True
        )
        return prompt_embeds, negative_embeds

    @torch.no_grad()
    def generate(
        self,
        captions: tuple[str, str],
        params: SampleParams,
        embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[Image.Image, Image.Image]:
        """One before/after pair. Pass `embeddings` from `encode_captions` to reuse them."""
        prompt_embeds, negative_embeds = embeddings or self.encode_captions(captions)
        # Identically seeded CPU generators: row 0 and row 1 draw the same initial noise and
        # the same ancestral noise at every step (CPU keeps seeds portable across devices).
        generators = [torch.Generator("cpu").manual_seed(params.seed) for _ in range(2)]
        num_steps = self.num_steps
        threshold = params.p2p_threshold
        controller = self.controller
        controller.step = 0
        controller.sharing = shares_step(0, num_steps, threshold)

        def after_step(pipeline, step_index, timestep, callback_kwargs):
            controller.step = step_index + 1
            controller.sharing = shares_step(step_index + 1, num_steps, threshold)
            return callback_kwargs

        try:
            images = self.pipeline(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
                height=self.resolution,
                width=self.resolution,
                num_inference_steps=num_steps,
                guidance_scale=params.cfg_scale,
                generator=generators,
                callback_on_step_end=after_step,
                output_type="pil",
            ).images
        finally:
            controller.sharing = False
        return images[0], images[1]
