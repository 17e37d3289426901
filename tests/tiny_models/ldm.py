"""Write a diffusers InstructPix2Pix pipeline as ONE checkpoint in the original LDM key layout.

(Test-only; SDXL UNets are written too: their `add_embedding` becomes `label_emb.0`.)

Model sites distribute Stable Diffusion / InstructPix2Pix weights as a single `.safetensors`
(or pickled `.ckpt`) file with the CompVis/LDM names: `model.diffusion_model.*` (UNet),
`first_stage_model.*` (VAE) and `cond_stage_model.transformer.*` (CLIP text encoder). No such
file can be downloaded in tests or CI, so this module makes one from any (tiny or full-size)
pipeline: it is the inverse of diffusers' `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint` and `convert_ldm_clip_checkpoint`.

Only the three weight-carrying models go into the file, as in the real checkpoints; the
tokenizer and scheduler come from a diffusers config folder at load time
(`from_single_file(file, config=<folder>)`), see `save_diffusers_config_folder`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from safetensors.torch import save_file

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."

# Names inside a ResNet block: diffusers -> LDM (the UNet's ResBlock keeps its layers in
# `in_layers`/`out_layers`/`emb_layers` Sequentials, hence the indices).
_UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's micro-conditioning embedding ("text_time"): LDM's label_emb Sequential.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_VAE_TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
# The VAE mid-block attention: LDM uses 1x1 convolutions where diffusers uses linear layers.
_VAE_ATTENTION_NAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


class UnmappedWeightError(ValueError):
    """A weight has no place in the LDM layout (a UNet/VAE variant this writer does not know)."""


def _rename_module(name: str, table: dict[str, str]) -> str | None:
    """`name` is `module.param`; map the module part through `table`, or None if it is absent."""
    module, _, param = name.rpartition(".")
    return f"{table[module]}.{param}" if module in table else None


def _unet_resnet_name(module: str, key: str) -> str:
    if module not in _UNET_RESNET_NAMES:
        raise UnmappedWeightError(f"UNet weight {key!r}: unknown ResNet layer {module!r}.")
    return _UNET_RESNET_NAMES[module]


def _unet_key_to_ldm(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """One diffusers UNet2DConditionModel key -> its LDM name (without the prefix)."""
    if (top := _rename_module(key, _UNET_TOP_LEVEL)) is not None:
        return top
    # Each LDM down stage has `layers_per_block` (resnet, attention) slots plus one slot for
    # the downsampler; input_blocks.0 is conv_in, so stage b slot j is 1 + b*(L+1) + j.
    slots = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.([^.]+)\.(.+)", key):
        block, layer, module, rest = int(m[1]), int(m[2]), m[3], m[4]
        return f"input_blocks.{1 + block * slots + layer}.0.{_unet_resnet_name(module, key)}.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        block, layer, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{1 + block * slots + layer}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        block, rest = int(m[1]), m[2]
        return f"input_blocks.{1 + block * slots + layers_per_block}.0.op.{rest}"
    # The middle block is (resnet, attention, resnet) as middle_block.0/1/2.
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.([^.]+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_unet_resnet_name(m[2], key)}.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    # Up stages have L+1 resnet slots each, numbered on from output_blocks.0; the upsampler
    # sits in the last slot, after the attention when the stage has one.
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.([^.]+)\.(.+)", key):
        block, layer, module, rest = int(m[1]), int(m[2]), m[3], m[4]
        return f"output_blocks.{block * slots + layer}.0.{_unet_resnet_name(module, key)}.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        block, layer, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{block * slots + layer}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block, rest = int(m[1]), m[2]
        position = 2 if block in up_blocks_with_attention else 1
        return f"output_blocks.{block * slots + layers_per_block}.{position}.conv.{rest}"
    raise UnmappedWeightError(
        f"UNet weight {key!r} has no place in the original Stable Diffusion layout; only SD 1.x-style "
        "UNets (no class/addition embeddings) can be written as an LDM checkpoint."
    )


def _vae_key_to_ldm(key: str, num_up_blocks: int) -> str:
    """One diffusers AutoencoderKL key -> its LDM name (without the prefix)."""
    if (top := _rename_module(key, _VAE_TOP_LEVEL)) is not None:
        return top

    def resnet(rest: str) -> str:
        # norm1/conv1/norm2/conv2 keep their names in the VAE; only the shortcut differs.
        return rest.replace("conv_shortcut", "nin_shortcut")

    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    # LDM numbers decoder stages from the lowest resolution up, diffusers in execution order.
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        renamed = _rename_module(m[2], _VAE_ATTENTION_NAMES)
        if renamed is not None:
            return f"{m[1]}.mid.attn_1.{renamed}"
    raise UnmappedWeightError(
        f"VAE weight {key!r} has no place in the original Stable Diffusion layout; only the "
        "SD-style AutoencoderKL can be written as an LDM checkpoint."
    )


def _is_vae_attention_matrix(ldm_key: str) -> bool:
    return bool(re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))


def _rename_all(
    state_dict: dict[str, torch.Tensor], to_ldm: Callable[[str], str], prefix: str
) -> dict[str, torch.Tensor]:
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        ldm_key = prefix + to_ldm(key)
        if ldm_key in renamed:  # two weights on one name would silently lose one of them
            raise UnmappedWeightError(
                f"Two weights map to the LDM name {ldm_key!r} (one is {key!r})."
            )
        renamed[ldm_key] = tensor
    return renamed


# The *_state_dict_to_ldm functions only rename (and reshape views); they work on any tensors,
# including meta tensors, so the full-size layout can be checked without allocating it.


def unet_state_dict_to_ldm(
    state_dict: dict[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A UNet2DConditionModel state dict under `model.diffusion_model.*` names."""
    up_blocks_with_attention = {
        index
        for index, block_type in enumerate(config["up_block_types"])
        if "CrossAttn" in block_type
    }
    layers_per_block = config["layers_per_block"]
    if not isinstance(layers_per_block, int):
        raise UnmappedWeightError(
            f"layers_per_block={layers_per_block!r}: the LDM layout needs one number for all stages."
        )
    return _rename_all(
        state_dict,
        lambda key: _unet_key_to_ldm(key, layers_per_block, up_blocks_with_attention),
        LDM_UNET_PREFIX,
    )


def vae_state_dict_to_ldm(
    state_dict: dict[str, torch.Tensor], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """An AutoencoderKL state dict under `first_stage_model.*` names, attention as 1x1 convs."""
    num_up_blocks = len(config["up_block_types"])
    renamed = _rename_all(
        state_dict, lambda key: _vae_key_to_ldm(key, num_up_blocks), LDM_VAE_PREFIX
    )
    for key, tensor in renamed.items():
        if _is_vae_attention_matrix(key) and tensor.ndim == 2:
            renamed[key] = tensor.reshape(*tensor.shape, 1, 1)
    return renamed


def clip_text_state_dict_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModel state dict under `cond_stage_model.transformer.text_model.*` names.

    transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level in its state dict);
    the LDM files keep that level, so it is added back when missing.
    """

    def to_ldm(key: str) -> str:
        return key if key.startswith("text_model.") else f"text_model.{key}"

    return _rename_all(state_dict, to_ldm, LDM_CLIP_PREFIX)


LDM_SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
LDM_SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
_OPEN_CLIP_TOP_LEVEL = {
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER_NAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def open_clip_state_dict_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection state dict in OpenCLIP layout (SDXL's second encoder under
    `conditioner.embedders.1.model.*`): q/k/v fused into `in_proj`, the projection transposed.
    The inverse of diffusers' `convert_open_clip_checkpoint`."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key in _OPEN_CLIP_TOP_LEVEL:
            out[_OPEN_CLIP_TOP_LEVEL[key]] = tensor
            continue
        if key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            raise UnmappedWeightError(f"text encoder 2 weight {key!r} has no OpenCLIP name")
        layer, module, kind = m[1], m[2], m[3]
        if (q := re.fullmatch(r"self_attn\.([qkv])_proj", module)) is not None:
            qkv.setdefault((layer, kind), {})[q[1]] = tensor
            continue
        if module not in _OPEN_CLIP_LAYER_NAMES:
            raise UnmappedWeightError(f"text encoder 2 weight {key!r} has no OpenCLIP name")
        out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER_NAMES[module]}.{kind}"] = tensor
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {LDM_SDXL_OPEN_CLIP_PREFIX + key: t for key, t in out.items()}


def pipeline_to_ldm_state_dict(
    pipe: StableDiffusionInstructPix2PixPipeline, include_text_encoder: bool = True
) -> dict[str, torch.Tensor]:
    """UNet + VAE (+ CLIP text encoder) of `pipe` as one LDM-layout state dict of CPU copies."""
    state_dict = unet_state_dict_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    state_dict.update(vae_state_dict_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if include_text_encoder and sdxl:  # SDXL: CLIP-L as embedders.0, bigG (OpenCLIP) as embedders.1
        clip = clip_text_state_dict_to_ldm(pipe.text_encoder.state_dict())
        state_dict.update({LDM_SDXL_CLIP_PREFIX + key.removeprefix(LDM_CLIP_PREFIX): t for key, t in clip.items()})
        state_dict.update(open_clip_state_dict_to_ldm(pipe.text_encoder_2.state_dict()))
    elif include_text_encoder:
        state_dict.update(clip_text_state_dict_to_ldm(pipe.text_encoder.state_dict()))
    # Own contiguous storage per entry: safetensors refuses tensors that share memory, and the
    # file must not change when the pipeline is later modified.
    return {key: t.detach().to("cpu").contiguous().clone() for key, t in state_dict.items()}


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise FileExistsError(
            f"{path} already exists; choose a new file name (nothing was overwritten)."
        )


def save_as_ldm_single_file(
    pipe: StableDiffusionInstructPix2PixPipeline,
    path: str | Path,
    *,
    include_text_encoder: bool = True,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `pipe` as one `.safetensors` checkpoint in the original LDM layout; returns the path.

    `include_text_encoder=False` leaves the text encoder(s) to the config folder (SDXL files
    whose second encoder is in OpenCLIP layout); `extra` adds tensors (e.g. CosXL's
    `edm_vpred.sigma_max`)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: an LDM safetensors checkpoint must end in .safetensors.")
    _refuse_existing(path)
    state_dict = pipeline_to_ldm_state_dict(pipe, include_text_encoder)
    state_dict.update({key: t.contiguous() for key, t in (extra or {}).items()})
    save_file(state_dict, str(path), metadata={"format": "pt"})
    return path


def save_as_ldm_ckpt(pipe: StableDiffusionInstructPix2PixPipeline, path: str | Path) -> Path:
    """Write `pipe` as a pickled `.ckpt` like the original training code did.

    The weights sit under "state_dict" next to a "global_step", as in Lightning checkpoints;
    diffusers unwraps "state_dict" itself. Everything in it is tensors and ints, so it also
    loads with `torch.load(weights_only=True)` (which diffusers uses for non-safetensors files).
    """
    path = Path(path)
    if path.suffix != ".ckpt":
        raise ValueError(f"{path}: a pickled LDM checkpoint must end in .ckpt.")
    _refuse_existing(path)
    torch.save({"state_dict": pipeline_to_ldm_state_dict(pipe), "global_step": 0}, path)
    return path


def save_diffusers_config_folder(
    pipe: StableDiffusionInstructPix2PixPipeline,
    folder: str | Path,
    keep_weights: tuple[str, ...] = (),
) -> Path:
    """Save `pipe` as a diffusers folder WITHOUT weights: the `config=` a single file needs.

    `from_single_file(file, config=folder)` reads only the JSON/text files there (model
    configs, scheduler, tokenizer), which is what diffusers would otherwise fetch from the hub.
    """
    folder = Path(folder)
    _refuse_existing(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    for weights in [*folder.glob("*/*.safetensors"), *folder.glob("*/*.bin")]:
        if weights.parent.name not in keep_weights:  # e.g. ("text_encoder", "text_encoder_2")
            weights.unlink()
    return folder


__all__ = [
    "LDM_CLIP_PREFIX",
    "LDM_UNET_PREFIX",
    "LDM_VAE_PREFIX",
    "UnmappedWeightError",
    "clip_text_state_dict_to_ldm",
    "open_clip_state_dict_to_ldm",
    "pipeline_to_ldm_state_dict",
    "save_as_ldm_ckpt",
    "save_as_ldm_single_file",
    "save_diffusers_config_folder",
    "unet_state_dict_to_ldm",
    "vae_state_dict_to_ldm",
]
