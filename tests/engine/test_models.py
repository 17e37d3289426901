"""Model and LoRA loading on tiny models the tests save themselves; never the network."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from peft import LoraConfig
from PIL import Image

from engine.devices import plan_memory, resolve_device, resolve_dtype
from engine.editor import Editor
from engine.errors import InvalidInput, ModelNotFound, UnsafeModelFile
from engine.models import load_pipeline, resolve_model_source
from engine.request import EditParams, LoraSpec
from engine.testing import build_tiny_components, build_tiny_pipeline


def test_folder_loads_offline_and_reproduces_the_saved_model(tiny_model_dir: Path) -> None:
    editor = Editor(tiny_model_dir, device="cpu", dtype="fp32")
    reference = Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="fp32")
    image = Image.new("RGB", (40, 24), (10, 120, 240))
    params = EditParams("make it red", steps=2, resolution=64)
    a, b = editor.edit(image, params)[0], reference.edit(image, params)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_hub_id_not_in_cache_gives_one_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound) as err:
        load_pipeline("timbrooks/instruct-pix2pix")
    assert "timbrooks/instruct-pix2pix" in err.value.message
    assert "hf download" in err.value.message


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_checkpoints_are_refused_without_the_flag(tmp_path: Path, suffix: str) -> None:
    checkpoint = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {}}, checkpoint)
    with pytest.raises(UnsafeModelFile, match="can run arbitrary code"):
        resolve_model_source(checkpoint)
    assert resolve_model_source(checkpoint, allow_pickle=True).kind == "single_file"


def test_safetensors_file_resolves_to_single_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert resolve_model_source(tmp_path / "model.safetensors").kind == "single_file"


@pytest.mark.parametrize(
    ("model", "message"),
    [("./missing-folder", "no model at"), ("not a hub id", "no model at"), ("a/b/c", "no model at")],
)
def test_models_that_cannot_exist(model: str, message: str) -> None:
    with pytest.raises(ModelNotFound, match=message):
        resolve_model_source(model)


def test_folder_without_model_index_is_explained(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"model_index\.json"):
        resolve_model_source(tmp_path)


def test_text_to_image_model_is_refused_with_a_way_forward(tmp_path: Path) -> None:
    components = build_tiny_components(in_channels=4)
    StableDiffusionInstructPix2PixPipeline(**components, requires_safety_checker=False).save_pretrained(tmp_path)
    with pytest.raises(InvalidInput, match="not an instruction-editing model"):
        load_pipeline(tmp_path)


def save_random_lora(path: Path, seed: int) -> Path:
    """A LoRA on the UNet attention projections, saved as diffusers/peft safetensors."""
    pipe = build_tiny_pipeline()
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    torch.manual_seed(seed)
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(pipe.unet)
    state = {k: torch.randn_like(v) * 0.5 for k, v in state.items()}
    StableDiffusionInstructPix2PixPipeline.save_lora_weights(path, unet_lora_layers=state, safe_serialization=True)
    return path / "pytorch_lora_weights.safetensors"


def test_loras_load_once_apply_with_strength_and_combine(tmp_path: Path) -> None:
    first = save_random_lora(tmp_path / "a", seed=1)
    second = save_random_lora(tmp_path / "b", seed=2)
    editor = Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="fp32")
    work = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    base = EditParams("make it red", steps=2)

    def run(*loras: LoraSpec) -> np.ndarray:
        return editor.edit_working_size(work, EditParams(**{**base.__dict__, "loras": loras}))[0]

    plain = run()
    zero = run(LoraSpec(str(first), 0.0))
    full = run(LoraSpec(str(first), 1.0))
    both = run(LoraSpec(str(first), 1.0), LoraSpec(str(second), 0.7))
    assert np.allclose(zero, plain, atol=1e-5)
    assert np.abs(full - plain).max() > 1e-3
    assert np.abs(both - full).max() > 1e-3
    assert len(editor._loaded_loras) == 2  # loaded once each, reused
    assert np.allclose(run(), plain, atol=1e-5)  # no LoRA asked for → none applied


def test_lora_given_as_pickle_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "style.bin"
    torch.save({}, bad)
    editor = Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="fp32")
    with pytest.raises(UnsafeModelFile):
        editor.edit(Image.new("RGB", (8, 8)), EditParams("x", steps=1, resolution=64, loras=(LoraSpec(str(bad)),)))


def test_device_and_dtype_choice() -> None:
    cpu = resolve_device("cpu")
    assert resolve_dtype("fp32", cpu) == torch.float32
    assert resolve_dtype("auto", cpu) in (torch.float32, torch.bfloat16)
    with pytest.raises(InvalidInput, match="fp16 is not supported on the CPU"):
        resolve_dtype("fp16", cpu)
    with pytest.raises(InvalidInput, match="device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInput, match="no CUDA GPU"):
            resolve_device("cuda")


def test_memory_plan() -> None:
    cpu = torch.device("cpu")
    assert not plan_memory("auto", cpu, 512 * 512).vae_tiling
    assert plan_memory("auto", cpu, 2048 * 2048).vae_tiling
    assert plan_memory("off", cpu, 2048 * 2048) == plan_memory("off", cpu, 0)


def test_bf16_path_runs_and_stays_close_to_fp32() -> None:
    fp32 = Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="fp32")
    bf16 = Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="bf16")
    work = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    params = EditParams("make it red", steps=3)
    a = fp32.edit_working_size(work, params)[0]
    b = bf16.edit_working_size(work, params)[0]
    assert b.dtype == np.float32 and np.abs(a - b).mean() < 0.05
