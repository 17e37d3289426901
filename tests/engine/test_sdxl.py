"""SDXL InstructPix2Pix and CosXL Edit: the engine's loop equals diffusers' pipeline (s_I ≥ 1),
keeps guidance below s_I = 1, passes SDXL's micro-conditioning, and loads CosXL single files."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import EDMEulerScheduler, StableDiffusionXLInstructPix2PixPipeline

from engine.editor import Editor
from engine.families import detect_family
from engine.families.sd_ip2p import SD_IP2P, SDXL_IP2P
from engine.request import EditParams
from tests.tiny_models.ldm import save_as_ldm_single_file, save_diffusers_config_folder
from tests.tiny_models.sdxl import SDXL_SCALING_FACTOR, build_tiny_sdxl_pipeline

HEIGHT, WIDTH = 32, 48


def ip2p(instruction: str, steps: int = 3, seed: int = 0, variants: int = 1, **options) -> EditParams:
    return EditParams(instruction, steps=steps, seed=seed, variants=variants,
                      options={"text_guidance": 7.5, "image_guidance": 1.5, **options})


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).random((HEIGHT, WIDTH, 3)).astype(np.float32)


def diffusers_reference(pipe: StableDiffusionXLInstructPix2PixPipeline, image: np.ndarray,
                        params: EditParams) -> np.ndarray:
    return pipe(
        params.instruction,
        image=torch.from_numpy(image).permute(2, 0, 1)[None],
        height=image.shape[0],
        width=image.shape[1],
        num_inference_steps=params.steps,
        guidance_scale=params.options["text_guidance"],
        image_guidance_scale=params.options["image_guidance"],
        generator=torch.Generator().manual_seed(params.seed),
        output_type="np",
    ).images[0]


def sdxl_editor(**kwargs) -> Editor:
    return Editor.from_pipeline(build_tiny_sdxl_pipeline(**kwargs), device="cpu", dtype="fp32")


@pytest.mark.parametrize(("s_t", "s_i", "zeros"), [(7.5, 1.5, True), (7.5, 1.0, True), (4.0, 2.0, False)])
def test_equals_diffusers_sdxl_pipeline(image: np.ndarray, s_t: float, s_i: float, zeros: bool) -> None:
    editor = sdxl_editor(force_zeros_for_empty_prompt=zeros)
    assert editor.family is SDXL_IP2P
    params = ip2p("make it red", steps=4, seed=11, text_guidance=s_t, image_guidance=s_i)
    ours = editor.edit_working_size(image, params)[0]
    reference = diffusers_reference(build_tiny_sdxl_pipeline(force_zeros_for_empty_prompt=zeros), image, params)
    assert reference.std() > 0.01  # a real image, not a constant that would match anything
    np.testing.assert_allclose(ours, reference, atol=1e-4)


class UNetSpy:
    def __init__(self, editor: Editor) -> None:
        self.calls: list[dict] = []
        forward = editor.pipe.unet.forward

        def spy(sample, timestep, encoder_hidden_states, **kwargs):
            self.calls.append({"sample": sample, "text": encoder_hidden_states, **kwargs})
            return forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)

        editor.pipe.unet.forward = spy


def test_micro_conditioning_and_three_rows_below_unit_image_guidance(image: np.ndarray) -> None:
    editor = sdxl_editor()
    spy = UNetSpy(editor)
    params = ip2p("make it red", steps=2, seed=1, variants=2, image_guidance=0.5)
    ours = editor.edit_working_size(image, params)
    call = spy.calls[0]
    assert call["sample"].shape[0] == 6  # 3 branches × 2 variants, grouped by branch
    time_ids = call["added_cond_kwargs"]["time_ids"]
    assert time_ids.shape == (6, 6)
    assert time_ids[0].tolist() == [HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]  # original, crop, target
    pooled = call["added_cond_kwargs"]["text_embeds"]
    assert not pooled[0].eq(0).all() and pooled[2:].eq(0).all()  # null text: zeros (force_zeros)
    assert call["sample"][4:, 4:].eq(0).all()  # null image: zero latent
    # diffusers switches all guidance off below s_I = 1; the engine keeps it
    reference = diffusers_reference(build_tiny_sdxl_pipeline(), image, params.for_variant(0))
    assert np.abs(ours[0] - reference).max() > 1e-3


def test_variants_equal_single_runs_and_preview_uses_the_sdxl_map(image: np.ndarray) -> None:
    editor = sdxl_editor()
    params = ip2p("make it blue", steps=2, seed=5, variants=2)
    seen = []
    batched = editor.edit_working_size(image, params, on_progress=seen.append, preview_every=1)
    for k in range(2):
        np.testing.assert_allclose(batched[k], editor.edit_working_size(image, params.for_variant(k))[0], atol=1e-5)
    assert seen[0].preview is not None and seen[0].preview.size == (WIDTH // 2, HEIGHT // 2)
    latents = torch.randn(1, 4, 8, 8)
    sd1 = np.asarray(SD_IP2P.preview(None, latents, (64, 64)))
    sdxl = np.asarray(SDXL_IP2P.preview(None, latents, (64, 64)))
    assert sd1.shape == sdxl.shape == (8, 8, 3) and np.abs(sd1.astype(int) - sdxl.astype(int)).max() > 10


def test_cosxl_scales_the_image_latent_like_diffusers(image: np.ndarray) -> None:
    editor = sdxl_editor(is_cosxl_edit=True)
    plain = sdxl_editor()
    spy, plain_spy = UNetSpy(editor), UNetSpy(plain)
    params = ip2p("make it red", steps=3, seed=2)
    ours = editor.edit_working_size(image, params)[0]
    plain.edit_working_size(image, params)
    scaled, unscaled = spy.calls[0]["sample"][0, 4:], plain_spy.calls[0]["sample"][0, 4:]
    torch.testing.assert_close(scaled, unscaled * SDXL_SCALING_FACTOR)
    reference = diffusers_reference(build_tiny_sdxl_pipeline(is_cosxl_edit=True), image, params)
    np.testing.assert_allclose(ours, reference, atol=1e-4)


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def test_cosxl_single_file_loads_as_cosxl_with_its_edm_scheduler(
    tmp_path: Path, image: np.ndarray, offline_hub: None
) -> None:
    """A CosXL-style file: SDXL UNet, VAE, CLIP-L and OpenCLIP-bigG text encoders in the original
    layout plus `edm_vpred.*` keys; tokenizers and configs come from a weightless config folder
    (as from diffusers/sdxl-instructpix2pix-768)."""
    pipe = build_tiny_sdxl_pipeline(seed=4)
    sigmas = {"edm_vpred.sigma_max": torch.tensor(80.0), "edm_vpred.sigma_min": torch.tensor(0.002)}
    checkpoint = save_as_ldm_single_file(pipe, tmp_path / "cosxl_edit.safetensors", extra=sigmas)
    config = save_diffusers_config_folder(pipe, tmp_path / "config")
    assert detect_family(str(checkpoint)) is SDXL_IP2P  # from the weight names (label_emb)
    editor = Editor(checkpoint, device="cpu", dtype="fp32", model_config=str(config))
    assert editor.family is SDXL_IP2P and editor.pipe.is_cosxl_edit
    scheduler = editor.pipe.scheduler
    assert isinstance(scheduler, EDMEulerScheduler)
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.sigma_max == 80.0
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(pipe, name).state_dict(), getattr(editor.pipe, name).state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), name

    params = ip2p("make it red", steps=3, seed=3)
    ours = editor.edit_working_size(image, params)[0]
    reference_pipe = build_tiny_sdxl_pipeline(seed=4, is_cosxl_edit=True)
    reference_pipe.scheduler = EDMEulerScheduler.from_config(scheduler.config)
    reference = diffusers_reference(reference_pipe, image, params)
    assert np.isfinite(ours).all() and reference.std() > 0.01
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_sdxl_editor_defaults_come_from_the_family() -> None:
    editor = sdxl_editor()
    resolved = editor.resolve(EditParams("x"))
    assert (resolved.steps, resolved.resolution) == (30, 768)
    assert resolved.options == {"text_guidance": 7.5, "image_guidance": 1.5, "scheduler": "default"}
    assert editor.family.working_size(1500, 1000, None) == (768, 512)


def test_sdxl_folder_loads_as_its_family_and_takes_loras(tmp_path: Path, image: np.ndarray) -> None:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from engine.request import LoraSpec
    from tests.tiny_models.sdxl import save_tiny_sdxl_model

    folder = save_tiny_sdxl_model(tmp_path / "tiny-sdxl-ip2p")
    editor = Editor(folder, device="cpu", dtype="fp32")
    assert editor.family is SDXL_IP2P
    params = ip2p("make it red", steps=2, seed=1)
    plain = editor.edit_working_size(image, params)[0]
    np.testing.assert_allclose(plain, sdxl_editor().edit_working_size(image, params)[0], atol=1e-5)

    donor = build_tiny_sdxl_pipeline()
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                      init_lora_weights=False))
    torch.manual_seed(3)
    state = {k: torch.randn_like(v) * 0.5 for k, v in get_peft_model_state_dict(donor.unet).items()}
    StableDiffusionXLInstructPix2PixPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=state,
                                                               safe_serialization=True)
    lora = str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    styled = editor.edit_working_size(image, EditParams(**{**params.__dict__, "loras": (LoraSpec(lora, 1.0),)}))[0]
    assert np.abs(styled - plain).max() > 1e-3
    np.testing.assert_allclose(editor.edit_working_size(image, params)[0], plain, atol=1e-5)  # off again
