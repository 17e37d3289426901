"""The family registry, family detection, the catalogue and EditParams' flat wire form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import engine
from engine.errors import InvalidInput
from engine.families import (
    CATALOGUE_PATH,
    FAMILIES,
    catalogue_entry,
    detect_family,
    family_for_pipeline_class,
    get_family,
    load_catalogue,
)
from engine.families.sd_ip2p import SD_IP2P, SDXL_IP2P
from engine.request import MAX_LORAS, EditParams, LoraSpec, limits_json

PLANS = {"full", "offload-text", "model-offload", "sequential-offload"}
ALL_FAMILY_IDS = {"sd-ip2p", "sdxl-ip2p", "flux-kontext", "flux2-klein", "qwen-image-edit"}


def test_registry_and_pipeline_classes() -> None:
    assert {"sd-ip2p", "sdxl-ip2p"} <= set(FAMILIES)
    assert get_family("sd-ip2p") is SD_IP2P
    assert family_for_pipeline_class("StableDiffusionXLInstructPix2PixPipeline") is SDXL_IP2P
    with pytest.raises(InvalidInput, match="not available") as err:
        get_family("dall-e")
    assert err.value.field == "model"
    with pytest.raises(InvalidInput, match="not an instruction-editing pipeline"):
        family_for_pipeline_class("StableDiffusionPipeline")
    for family in FAMILIES.values():  # every family publishes what /v1/models needs
        described = family.describe()
        assert described["family"] == family.id and described["params"]
        assert {"rule", "default", "multiple"} <= set(described["resolution"])
        json.dumps(described)


def test_unknown_option_names_the_field_and_what_the_family_takes() -> None:
    with pytest.raises(InvalidInput) as err:
        SD_IP2P.resolve_options({"guidance": 2.5})
    assert err.value.field == "guidance"
    assert err.value.message == ("guidance is not a parameter of InstructPix2Pix models; "
                                 "they take text_guidance, image_guidance, scheduler")
    assert SD_IP2P.resolve_options({"image_guidance": 1}) == {
        "text_guidance": 7.5, "image_guidance": 1.0, "scheduler": "default"}
    with pytest.raises(InvalidInput, match=r"image_guidance must be a number from 0\.0 to 30\.0"):
        SD_IP2P.resolve_options({"image_guidance": 31})
    with pytest.raises(InvalidInput, match="scheduler must be one of"):
        SD_IP2P.resolve_options({"scheduler": "heun"})


def test_detect_family_from_folders_files_and_the_catalogue(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert detect_family(tiny_model_dir) is SD_IP2P
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    sdxl_index = tmp_path / "sdxl"
    sdxl_index.mkdir()
    (sdxl_index / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLInstructPix2PixPipeline"}))
    assert detect_family(sdxl_index) is SDXL_IP2P
    assert detect_family("diffusers/sdxl-instructpix2pix-768") is SDXL_IP2P  # catalogue id
    assert detect_family(None) is SD_IP2P  # the default model
    single = tmp_path / "some.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 8, 1, 1)}, str(single))
    assert detect_family(single) is SD_IP2P  # a single file: sd-ip2p unless configured
    assert detect_family(single, config=str(sdxl_index)) is SDXL_IP2P


def test_catalogue_ships_inside_the_package_with_every_field() -> None:
    assert CATALOGUE_PATH.parent == Path(engine.__file__).parent / "families"
    assert not (Path(engine.__file__).parent.parent / "resources" / "models.json").exists()
    pyproject = (Path(engine.__file__).parent.parent / "pyproject.toml").read_text()
    assert '"*" = ["*.json"' in pyproject  # package-data: catalogue.json goes into the wheel
    entries = load_catalogue()
    ids = [e["id"] for e in entries]
    assert len(ids) == len(set(ids)) and [e["id"] for e in entries if e["default"]] == ["timbrooks/instruct-pix2pix"]
    for entry in entries:
        for key in ("id", "name", "family", "licence", "non_commercial", "download_gb", "vram_gb",
                    "recommended", "presets", "description", "default"):
            assert key in entry, (entry["id"], key)
        assert entry["family"] in ALL_FAMILY_IDS
        assert set(entry["vram_gb"]) <= PLANS and entry["vram_gb"]
        values = [entry["vram_gb"][p] for p in ("full", "offload-text", "model-offload", "sequential-offload")]
        assert values == sorted(values, reverse=True), entry["id"]  # lighter plans need less
        if entry["family"] in FAMILIES:  # recommended values and presets are valid for the family
            family = FAMILIES[entry["family"]]
            family.resolve_options(entry["recommended"].get("options", {}))
            for preset in entry["presets"]:
                family.resolve_options(preset.get("options", {}))
                assert preset["loras"] and all({"repo", "file", "strength"} <= set(x) for x in preset["loras"])
    flagged = {e["id"] for e in entries if e["non_commercial"]}
    assert flagged == {"stabilityai/cosxl-edit", "black-forest-labs/FLUX.1-Kontext-dev",
                       "black-forest-labs/FLUX.2-klein-9B"}
    cosxl = catalogue_entry("stabilityai/cosxl-edit")
    assert cosxl["single_file"] == {"repo": "stabilityai/cosxl", "file": "cosxl_edit.safetensors"}
    assert cosxl["load"]["is_cosxl_edit"] is True
    qwen = catalogue_entry("Qwen/Qwen-Image-Edit-2511")
    assert [p["steps"] for p in qwen["presets"]] == [8, 4]
    assert catalogue_entry("nobody/nothing") is None


def test_params_wire_is_flat_and_old_clients_keep_working() -> None:
    old_client = {"instruction": "make it red", "text_guidance": 9, "image_guidance": 1.2, "steps": 30,
                  "seed": 3, "variants": 2, "resolution": 512, "model": None, "loras": [],
                  "scheduler": "dpm++", "preserve_detail": True}
    params = EditParams.from_dict(old_client)
    assert params.options == {"text_guidance": 9, "image_guidance": 1.2, "scheduler": "dpm++"}
    assert params.steps == 30 and params.variants == 2
    assert EditParams.from_dict(params.to_dict()) == params
    assert params.to_dict()["scheduler"] == "dpm++"  # flat again
    bare = EditParams.from_dict({"instruction": "x"})
    assert (bare.steps, bare.resolution, bare.options) == (None, None, {})
    assert params.for_variant(1).seed == 4 and params.for_variant(1).options == params.options


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ([], "params"),
        ({"text_guidance": 1}, "instruction"),
        ({"instruction": "x", "steps": 0}, "steps"),
        ({"instruction": "x", "resolution": 5000}, "resolution"),
        ({"instruction": "x", "guidance": [1, 2]}, "guidance"),
        ({"instruction": "x", "guidance": float("nan")}, "guidance"),
        ({"instruction": "x", "loras": "a.safetensors"}, "loras"),
        ({"instruction": "x", "loras": [{"path": "a", "strength": 9}]}, "loras"),
        ({"instruction": "x", "options": 3}, "options"),
    ],
)
def test_params_checks_name_the_field(data, field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        EditParams.from_dict(data)
    assert err.value.field == field


def test_options_cannot_shadow_shared_fields_and_limits_are_published() -> None:
    with pytest.raises(InvalidInput, match="shared field"):
        EditParams("x", options={"seed": 3})
    limits = limits_json()
    assert limits["max_loras"] == MAX_LORAS and limits["lora_strength"] == [-4.0, 4.0]
    assert {"max_instruction_chars", "max_variants", "max_seed"} <= set(limits)
    assert EditParams("x", loras=(LoraSpec("a", 0.5),)).to_dict()["loras"] == [{"path": "a", "strength": 0.5}]


def test_editor_resolves_defaults_from_the_catalogue_then_the_family(tiny_model_dir: Path) -> None:
    from engine.editor import Editor
    from tests.tiny_models.sd import build_tiny_pipeline

    editor = Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="fp32")
    assert editor.family is SD_IP2P and editor.entry is None
    resolved = editor.resolve(EditParams("x"))
    assert (resolved.steps, resolved.resolution) == (20, 512)
    assert editor.resolve(EditParams("x", steps=7, resolution=256, options={"image_guidance": 1.0})).options[
        "image_guidance"] == 1.0
    with pytest.raises(InvalidInput) as err:
        editor.resolve(EditParams("x", options={"true_cfg_scale": 4.0}))
    assert err.value.field == "true_cfg_scale"
    # a catalogue id's recommendation fills what the request leaves out
    cosxl = Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="fp32", model="stabilityai/cosxl-edit")
    resolved = cosxl.resolve(EditParams("x", options={"image_guidance": 1.2}))
    assert (resolved.steps, resolved.resolution) == (20, 1024)
    assert resolved.options["text_guidance"] == 5.0 and resolved.options["image_guidance"] == 1.2


def test_the_editor_expands_a_requested_preset_like_its_explicit_settings() -> None:
    import numpy as np
    from PIL import Image

    from engine.editor import Editor
    from tests.tiny_models.sd import build_tiny_pipeline

    editor = Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="fp32")
    editor.entry = {"id": "tiny", "family": "sd-ip2p",
                    "presets": [{"id": "fast", "steps": 2, "options": {"image_guidance": 1.0}}]}
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8))
    by_preset = editor.edit(image, EditParams("x", resolution=64, preset="fast"))
    explicit = editor.edit(image, EditParams("x", resolution=64, steps=2, options={"image_guidance": 1.0}))
    default = editor.edit(image, EditParams("x", resolution=64, steps=3))
    assert np.array_equal(np.asarray(by_preset[0]), np.asarray(explicit[0]))
    assert not np.array_equal(np.asarray(by_preset[0]), np.asarray(default[0]))
    with pytest.raises(InvalidInput) as err:
        editor.edit(image, EditParams("x", preset="turbo"))
    assert err.value.field == "preset"


def test_presets_add_their_loras_steps_and_options_under_the_requests_own() -> None:
    from engine.families import apply_preset

    entry = catalogue_entry("Qwen/Qwen-Image-Edit-2509")
    params = apply_preset(EditParams("x", options={"negative_prompt": "blur"}), entry, "lightning-4")
    assert params.steps == 4
    assert params.options == {"true_cfg_scale": 1.0, "scheduler": "lightning", "negative_prompt": "blur"}
    assert params.loras[0].path.startswith("hf://lightx2v/Qwen-Image-Lightning/") and params.loras[0].strength == 1.0
    mine = apply_preset(EditParams("x", steps=6, options={"true_cfg_scale": 2.0}), entry, "lightning-8")
    assert mine.steps == 6 and mine.options["true_cfg_scale"] == 2.0  # the request's own values win
    assert apply_preset(params, entry, None) is params
    with pytest.raises(InvalidInput, match="lightning-8, lightning-4") as err:
        apply_preset(params, entry, "turbo")
    assert err.value.field == "preset"
