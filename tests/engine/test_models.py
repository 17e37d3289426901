"""Model and LoRA loading on tiny models the tests save themselves; never the network."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from peft import LoraConfig
from PIL import Image

from engine.devices import (
    choose_memory_plan,
    estimate_vram_gb,
    memory_report,
    next_memory_plan,
    resolve_device,
    resolve_dtype,
)
from engine.editor import Editor
from engine.errors import InvalidInput, ModelNotFound, UnsafeModelFile
from engine.models import load_pipeline, resolve_model_source
from engine.request import EditParams, LoraSpec
from tests.tiny_models.sd import build_tiny_components, build_tiny_pipeline


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


def test_memory_plan_is_the_fastest_that_fits() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    table = {"full": 20.0, "offload-text": 12.0, "model-offload": 9.0, "sequential-offload": 2.0}
    gib = 1024**3
    assert choose_memory_plan(table, 24 * gib, cuda) == "full"
    assert choose_memory_plan(table, 16 * gib, cuda) == "offload-text"
    assert choose_memory_plan(table, 12 * gib, cuda) == "model-offload"
    assert choose_memory_plan(table, 8 * gib, cuda) == "sequential-offload"
    assert choose_memory_plan(table, 1 * gib, cuda) == "sequential-offload"  # nothing fits: the lightest
    assert choose_memory_plan({"full": 3.5}, 3 * gib, cuda) == "sequential-offload"
    assert choose_memory_plan(table, 1 * gib, cpu) == "full"  # nothing to offload to on a CPU
    assert [next_memory_plan(p) for p in table] == ["offload-text", "model-offload", "sequential-offload", None]


def test_vram_estimate_from_component_sizes() -> None:
    gib = 1024**3
    sizes = {"transformer": 10 * gib, "text_encoder": 8 * gib, "vae": gib // 2}
    table = estimate_vram_gb(sizes, ("text_encoder",), activation_gb=1.0)
    assert table["full"] == pytest.approx(19.5, abs=0.11)
    assert table["offload-text"] == pytest.approx(11.5, abs=0.11)  # the denoiser + VAE stay
    assert table["model-offload"] == pytest.approx(11.0, abs=0.11)  # the largest component at a time
    assert table["full"] > table["offload-text"] > table["model-offload"] > table["sequential-offload"]


def test_memory_report_and_editor_plan(tiny_model_dir: Path) -> None:
    report = memory_report("cpu")
    assert set(report) == {"device", "plan", "free_bytes", "total_bytes", "quantization"}
    assert report["device"] == "cpu" and report["quantization"] == "none"
    assert report["total_bytes"] is None or report["total_bytes"] >= (report["free_bytes"] or 0) > 0
    editor = Editor(tiny_model_dir, device="cpu", dtype="fp32", memory_plan="model-offload")
    assert editor.plan == "full"  # CPU: every plan is full
    assert editor.memory_report()["plan"] == "full"
    with pytest.raises(InvalidInput, match="memory plan must be one of"):
        Editor(tiny_model_dir, device="cpu", memory_plan="lots")
    # the older --memory-saving names still work
    assert Editor(tiny_model_dir, device="cpu", dtype="fp32", memory_saving="offload").requested_plan == "model-offload"


def test_bf16_path_runs_and_stays_close_to_fp32() -> None:
    fp32 = Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="fp32")
    bf16 = Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="bf16")
    work = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    params = EditParams("make it red", steps=3)
    a = fp32.edit_working_size(work, params)[0]
    b = bf16.edit_working_size(work, params)[0]
    assert b.dtype == np.float32 and np.abs(a - b).mean() < 0.05


def test_out_of_memory_ladder_on_a_gpu_steps_through_the_memory_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ladder's order, with the plan switches recorded (real offloading needs CUDA)."""
    from engine.errors import OutOfMemory

    editor = Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="fp32")
    work = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    applied: list[str] = []
    tried: list[tuple[str, bool]] = []

    def apply_plan(plan: str) -> None:
        applied.append(plan)
        editor.plan = plan

    def run(*args):
        tried.append((editor.plan, editor._savers_on))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(editor, "device", torch.device("cuda"))
    monkeypatch.setattr(editor, "_apply_plan", apply_plan)
    monkeypatch.setattr(editor, "_run", run)
    with pytest.raises(OutOfMemory, match="every memory saver"):
        editor.edit_working_size(work, EditParams("x", steps=1))
    assert applied == ["offload-text", "model-offload", "sequential-offload"]
    assert tried == [("full", False), ("full", True), ("offload-text", True), ("model-offload", True),
                     ("sequential-offload", True)]


def test_catalogue_single_file_entry_resolves_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ModelNotFound) as err:
        Editor("stabilityai/cosxl-edit", device="cpu")
    assert "cosxl_edit.safetensors of stabilityai/cosxl" in err.value.message
    assert "hf download stabilityai/cosxl cosxl_edit.safetensors" in err.value.message


@pytest.mark.parametrize("plan", ["offload-text", "model-offload"])
def test_offload_plans_give_the_same_edit(plan: str) -> None:
    """The plans' plumbing (accelerate hooks, text encoders moved after encoding), run on the CPU;
    the VRAM they save can only be measured on a GPU (benchmarks/bench_engine.py --device cuda).
    sequential-offload is CUDA-only: accelerate's meta-device offload fails on a CPU execution
    device, for diffusers' own pipelines too."""
    editor = Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="fp32")
    work = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    params = EditParams("make it red", steps=2, seed=3)
    full = editor.edit_working_size(work, params)[0]
    editor._apply_plan(plan, on_any_device=True)
    assert editor.plan == plan and hasattr(editor.pipe.unet, "_hf_hook") == (plan == "model-offload")
    if plan == "offload-text":
        assert len(editor._text_hooks) == 1 and editor._denoiser_hook is not None
    np.testing.assert_array_equal(editor.edit_working_size(work, params)[0], full)
    editor._apply_plan("full", on_any_device=True)  # back again: no hooks left
    assert not hasattr(editor.pipe.text_encoder, "_hf_hook") and editor._denoiser_hook is None
    np.testing.assert_array_equal(editor.edit_working_size(work, params)[0], full)


@pytest.mark.slow  # importing torchao alone takes ~5 s here
def test_torchao_int8_loads_an_instruct_pix2pix_model_on_the_cpu(tiny_model_dir: Path) -> None:
    pytest.importorskip("torchao", reason="the torchao backend is not installed")
    quantized = Editor(tiny_model_dir, device="cpu", dtype="fp32", quantization="torchao-int8")
    attention = quantized.pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert type(attention.to_q.weight).__name__ != "Parameter"  # an int8 tensor subclass
    assert quantized.memory_report()["quantization"] == "torchao-int8"
    work = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    params = EditParams("make it red", steps=2)
    plain = Editor(tiny_model_dir, device="cpu", dtype="fp32").edit_working_size(work, params)[0]
    got = quantized.edit_working_size(work, params)[0]
    assert np.abs(got - plain).mean() < 0.01 and not np.array_equal(got, plain)
    with pytest.raises(InvalidInput, match="gguf files hold a DiT transformer"):
        Editor(tiny_model_dir, device="cpu", quantization="gguf")


def test_cpu_flags_without_proc_cpuinfo_come_from_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows and macOS have no /proc/cpuinfo: bf16 and VNNI are still recognised."""
    import builtins

    from engine import devices

    real_open = builtins.open

    def no_cpuinfo(path: object, *args: object, **kwargs: object) -> object:
        if str(path) == "/proc/cpuinfo":
            raise OSError("no such file")
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {
        "avx2": True, "avx512_f": True, "avx512_bf16": True, "avx_vnni": True, "amx_bf16": False,
        "num_sockets": 1, "cpu_name": "Some CPU"})  # fmt: skip
    flags = devices.cpu_flags.__wrapped__()
    assert flags == {"avx2", "avx512f", "avx512_bf16", "avx_vnni"}
