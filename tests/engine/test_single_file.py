"""Single-file (original LDM/CompVis layout) checkpoints load into the same pipeline.

The files are written by `tests.tiny_models.ldm` from a tiny random pipeline; diffusers' own
converter (`from_single_file`) reads them back, so a wrong name or shape in either direction
shows up as a weight that differs or is missing.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from tests.tiny_models.ldm import (
    UnmappedWeightError,
    clip_text_state_dict_to_ldm,
    save_as_ldm_ckpt,
    save_as_ldm_single_file,
    save_diffusers_config_folder,
    unet_state_dict_to_ldm,
    vae_state_dict_to_ldm,
)
from tests.tiny_models.sd import (
    FULL_TEXT_CONFIG,
    FULL_UNET_CONFIG,
    FULL_VAE_CONFIG,
    build_tiny_pipeline,
)

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No hub access and an empty hub cache: only what the test wrote can be loaded."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny pipeline saved three ways: diffusers folder, LDM .safetensors, LDM .ckpt."""
    root = tmp_path_factory.mktemp("single-file")
    pipe = build_tiny_pipeline(seed=3)
    folder = root / "diffusers"
    pipe.save_pretrained(folder, safe_serialization=True)
    return {
        "pipe": pipe,
        "folder": folder,
        "config_only": save_diffusers_config_folder(pipe, root / "config-only"),
        "safetensors": save_as_ldm_single_file(pipe, root / "tiny-ip2p.safetensors"),
        "ckpt": save_as_ldm_ckpt(pipe, root / "tiny-ip2p.ckpt"),
    }


def load_single_file(path: Path, config: Path) -> StableDiffusionInstructPix2PixPipeline:
    return StableDiffusionInstructPix2PixPipeline.from_single_file(
        str(path), config=str(config), local_files_only=True
    )


def assert_same_weights(expected, actual) -> None:
    for name in COMPONENTS:
        want = getattr(expected, name).state_dict()
        got = getattr(actual, name).state_dict()
        assert want.keys() == got.keys(), name
        differing = [key for key in want if not torch.equal(want[key], got[key])]
        assert not differing, f"{name}: {len(differing)} weights differ, e.g. {differing[:3]}"


def edit(pipe: StableDiffusionInstructPix2PixPipeline) -> np.ndarray:
    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB"
    )
    return pipe(
        "make it red",
        image=image,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    ).images[0]


def test_safetensors_file_has_ldm_names_and_is_detected_as_instruct_pix2pix(saved):
    state_dict = load_file(saved["safetensors"])
    prefixes = {key.split(".")[0] for key in state_dict}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert state_dict["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 8
    assert infer_diffusers_model_type(state_dict) == "instruct-pix2pix"
    # The VAE attention is stored as 1x1 convolutions, as in the original checkpoints.
    assert state_dict["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    pipe = saved["pipe"]
    expected = sum(len(getattr(pipe, name).state_dict()) for name in COMPONENTS)
    assert len(state_dict) == expected


def test_safetensors_file_loads_with_every_weight_equal(saved):
    loaded = load_single_file(saved["safetensors"], saved["folder"])
    assert_same_weights(saved["pipe"], loaded)
    assert type(loaded.scheduler) is type(saved["pipe"].scheduler)
    assert (
        loaded.tokenizer("make it red").input_ids
        == saved["pipe"].tokenizer("make it red").input_ids
    )


def test_config_folder_without_weights_is_enough(saved):
    assert not list(saved["config_only"].rglob("*.safetensors"))
    loaded = load_single_file(saved["safetensors"], saved["config_only"])
    assert_same_weights(saved["pipe"], loaded)


def test_single_file_edit_equals_folder_edit(saved):
    from_folder = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        saved["folder"], local_files_only=True
    )
    from_file = load_single_file(saved["safetensors"], saved["config_only"])
    expected = edit(from_folder)
    assert expected.std() > 0.01  # a real image, not a constant that would match anything
    np.testing.assert_array_equal(edit(from_file), expected)


def test_pickled_ckpt_loads_the_same_weights(saved):
    # diffusers reads non-safetensors files with torch.load(weights_only=True); ours passes.
    raw = torch.load(saved["ckpt"], weights_only=True)
    assert set(raw) == {"state_dict", "global_step"}
    loaded = load_single_file(saved["ckpt"], saved["config_only"])
    assert_same_weights(saved["pipe"], loaded)


def test_without_a_config_offline_loading_fails(saved):
    """diffusers infers the hub repo (timbrooks/instruct-pix2pix) but needs its configs."""
    assert infer_diffusers_model_type(load_file(saved["safetensors"])) == "instruct-pix2pix"
    with pytest.raises(OSError, match=r"outgoing traffic has been disabled|offline"):
        StableDiffusionInstructPix2PixPipeline.from_single_file(
            str(saved["safetensors"]), local_files_only=True
        )


def test_existing_files_are_never_overwritten(saved, tmp_path):
    target = tmp_path / "mine.safetensors"
    target.write_bytes(b"the user's file")
    with pytest.raises(FileExistsError, match=r"mine\.safetensors"):
        save_as_ldm_single_file(saved["pipe"], target)
    assert target.read_bytes() == b"the user's file"
    with pytest.raises(ValueError, match=r"\.ckpt"):
        save_as_ldm_ckpt(saved["pipe"], tmp_path / "model.pt")


def test_unet_with_class_embedding_is_refused():
    with init_empty_weights():
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=32,
            norm_num_groups=8,
            class_embed_type="timestep",
        )
    with pytest.raises(UnmappedWeightError, match="class_embedding"):
        unet_state_dict_to_ldm(unet.state_dict(), unet.config)


# Names and shapes from the real SD 1.5 / instruct-pix2pix checkpoints.
REAL_SD15_ENTRIES = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.11.0.emb_layers.1.weight": (1280, 1280),
    "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
    "model.diffusion_model.middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
    "model.diffusion_model.time_embed.2.weight": (1280, 1280),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.down.1.downsample.conv.weight": (256, 256, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.norm_out.weight": (512,),
    "first_stage_model.decoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.3.block.2.conv1.weight": (512, 512, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
}


def test_full_size_layout_matches_the_real_checkpoints_and_converts_back():
    """The SD 1.5 architecture on the meta device: real names, and diffusers maps them back."""
    with init_empty_weights():
        unet = UNet2DConditionModel(**FULL_UNET_CONFIG)
        vae = AutoencoderKL(**FULL_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**FULL_TEXT_CONFIG))
    ldm = unet_state_dict_to_ldm(unet.state_dict(), unet.config)
    ldm.update(vae_state_dict_to_ldm(vae.state_dict(), vae.config))
    ldm.update(clip_text_state_dict_to_ldm(text_encoder.state_dict()))

    for key, shape in REAL_SD15_ENTRIES.items():
        assert key in ldm, key
        assert tuple(ldm[key].shape) == shape, key
    assert infer_diffusers_model_type(ldm) == "instruct-pix2pix"

    def shapes(state_dict: dict) -> dict:
        return {key: tuple(t.shape) for key, t in state_dict.items()}

    assert shapes(convert_ldm_unet_checkpoint(ldm, unet.config)) == shapes(unet.state_dict())
    assert shapes(convert_ldm_vae_checkpoint(ldm, vae.config)) == shapes(vae.state_dict())
    clip_back = {
        key.removeprefix("text_model."): t for key, t in convert_ldm_clip_checkpoint(ldm).items()
    }
    assert shapes(clip_back) == shapes(text_encoder.state_dict())


# The engine's loader (engine.models.load_pipeline) on the same files.


def test_load_pipeline_reads_a_single_file_with_a_config_folder(saved):
    from engine.models import load_pipeline

    pipe = load_pipeline(str(saved["safetensors"]), config=str(saved["config_only"]))
    assert_same_weights(saved["pipe"], pipe)


def test_load_pipeline_without_a_config_names_the_missing_config(saved):
    from engine.errors import ModelNotFound
    from engine.models import load_pipeline

    with pytest.raises(ModelNotFound, match="config") as caught:
        load_pipeline(str(saved["safetensors"]))
    assert saved["safetensors"].name in caught.value.message


def test_load_pipeline_refuses_a_pickle_unless_allowed(saved):
    from engine.errors import UnsafeModelFile
    from engine.models import load_pipeline

    with pytest.raises(UnsafeModelFile, match="allow-pickle"):
        load_pipeline(str(saved["ckpt"]), config=str(saved["config_only"]))
    pipe = load_pipeline(str(saved["ckpt"]), config=str(saved["config_only"]), allow_pickle=True)
    assert_same_weights(saved["pipe"], pipe)
