"""Qwen-Image-Edit (2509 / 2511) family: the engine's run equals diffusers'
QwenImageEditPlusPipeline on the same inputs and seeds, on tiny random models saved to disk and
reloaded offline through the family's own `load`.

Speed: the pipeline encodes the reference image at `VAE_IMAGE_SIZE` (1024² in diffusers 0.42)
whatever the output size, and the VAE's mid-block attention at that size alone takes seconds
even for a tiny VAE. Most tests therefore lower that module constant to 128² (`small_reference`),
for the family and the direct pipeline call alike, so both still run the same code on the same
numbers; `test_default_working_size_is_the_reference_size` keeps the real 1 MP.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # tests/ for tiny_models
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_module
from tiny_models.qwen import save_tiny_qwen_edit

from engine.errors import EditCancelled, InvalidInput
from engine.families.base import RunInputs, StepHooks
from engine.families.qwen_edit import QWEN_IMAGE_EDIT, QwenImageEditFamily
from engine.sources import ModelSource

FAMILY = QWEN_IMAGE_EDIT
SMALL_REFERENCE = 128 * 128
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen")
    return {variant: save_tiny_qwen_edit(root / f"tiny-qwen-edit-{variant}", variant=variant)
            for variant in ("2509", "2511")}


@pytest.fixture(scope="module")
def pipes(folders: dict[str, Path]) -> dict[str, QwenImageEditPlusPipeline]:
    """Both variants, saved as diffusers folders and loaded back by the family (offline)."""
    return {variant: FAMILY.load(ModelSource("folder", str(folder)), dtype=torch.float32)
            for variant, folder in folders.items()}


@pytest.fixture
def pipe(pipes: dict[str, QwenImageEditPlusPipeline]) -> QwenImageEditPlusPipeline:
    return pipes["2511"]


@pytest.fixture
def small_reference(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(plus_module, "VAE_IMAGE_SIZE", SMALL_REFERENCE)
    return SMALL_REFERENCE


def working_image(width: int = 300, height: int = 200, resolution: int = 128) -> np.ndarray:
    """An 8-bit image (so the PIL hand-over is exact) at the family's working size."""
    w, h = FAMILY.working_size(width, height, resolution)
    pixels = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return pixels.astype(np.float32) / 255.0


def inputs(image: np.ndarray, seeds: list[int], steps: int = 2, **options: object) -> RunInputs:
    return RunInputs(image=image, instruction="make the sky purple", steps=steps, seeds=seeds,
                     options=FAMILY.resolve_options(options))


def no_hooks() -> StepHooks:
    return StepHooks(step=lambda i, total, latents: None)


@pytest.fixture
def transformer_calls(pipe: QwenImageEditPlusPipeline):
    """[number of transformer forward calls], counted while the test runs."""
    calls = [0]
    handle = pipe.transformer.register_forward_pre_hook(
        lambda *_: calls.__setitem__(0, calls[0] + 1))
    yield calls
    handle.remove()


# ------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("variant", ["2509", "2511"])
def test_run_equals_the_diffusers_pipeline(pipes, variant, small_reference) -> None:
    pipe = pipes[variant]
    image = working_image()
    height, width = image.shape[:2]
    ours = FAMILY.run(pipe, inputs(image, [5], true_cfg_scale=3.0, negative_prompt="blurry"),
                      no_hooks(), CPU)
    reference = pipe(
        image=Image.fromarray(np.round(image * 255).astype(np.uint8)),
        prompt="make the sky purple",
        negative_prompt="blurry",
        true_cfg_scale=3.0,
        height=height,
        width=width,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="np",
    ).images
    assert len(ours) == 1
    assert ours[0].shape == (height, width, 3) and ours[0].dtype == np.float32
    np.testing.assert_allclose(ours[0], reference[0], atol=1e-4)
    assert np.ptp(ours[0]) > 0.01  # a real image, not a constant


def test_variants_equal_single_runs(pipe, small_reference) -> None:
    image = working_image()
    together = FAMILY.run(pipe, inputs(image, [7, 8]), no_hooks(), CPU)
    alone = [FAMILY.run(pipe, inputs(image, [seed]), no_hooks(), CPU)[0] for seed in (7, 8)]
    assert len(together) == 2
    for batched, single in zip(together, alone, strict=True):
        np.testing.assert_allclose(batched, single, atol=1e-4)
    assert np.abs(together[0] - together[1]).max() > 1e-3  # the seeds do differ


# ------------------------------------------------------------------------------ guidance
def test_true_cfg_runs_two_branches_only_above_one(pipe, transformer_calls,
                                                   small_reference) -> None:
    calls = transformer_calls
    image = working_image()
    with_cfg = FAMILY.run(pipe, inputs(image, [1], steps=3, true_cfg_scale=4.0), no_hooks(), CPU)
    assert calls[0] == 6  # positive and negative branch per step
    calls[0] = 0
    plain = FAMILY.run(pipe, inputs(image, [1], steps=3, true_cfg_scale=1.0, negative_prompt="x"),
                       no_hooks(), CPU)
    assert calls[0] == 3  # 1.0: the negative prompt is not used, one branch
    other_negative = FAMILY.run(pipe, inputs(image, [1], steps=3, true_cfg_scale=1.0,
                                             negative_prompt="something else"), no_hooks(), CPU)
    np.testing.assert_array_equal(plain[0], other_negative[0])
    assert np.abs(with_cfg[0] - plain[0]).max() > 1e-5  # (a random tiny model: small effects)


def test_negative_prompt_changes_the_result_under_cfg(pipe, small_reference) -> None:
    image = working_image()
    a = FAMILY.run(pipe, inputs(image, [2], true_cfg_scale=5.0, negative_prompt=" "), no_hooks(),
                   CPU)
    b = FAMILY.run(pipe, inputs(image, [2], true_cfg_scale=5.0, negative_prompt="ugly, dark"),
                   no_hooks(), CPU)
    assert np.abs(a[0] - b[0]).max() > 1e-5


# ------------------------------------------------------------------------------ progress & cancel
def test_cancel_after_step_two_stops_within_one_step(pipe, transformer_calls, small_reference,
                                                     monkeypatch) -> None:
    calls = transformer_calls
    decoded = []
    monkeypatch.setattr(pipe.vae, "decode", lambda *a, **k: decoded.append(1))
    seen = []

    def step(i: int, total: int, latents: torch.Tensor | None) -> None:
        seen.append((i, total))
        if i == 2:
            raise EditCancelled()

    with pytest.raises(EditCancelled):
        FAMILY.run(pipe, inputs(working_image(), [0], steps=6, true_cfg_scale=4.0),
                   StepHooks(step=step), CPU)
    assert seen == [(1, 6), (2, 6)]
    assert calls[0] == 4  # two steps × two branches, nothing after the cancel
    assert decoded == []


def test_progress_latents_give_a_preview(pipe, small_reference) -> None:
    image = working_image()
    height, width = image.shape[:2]
    previews = []

    def step(i: int, total: int, latents: torch.Tensor | None) -> None:
        assert latents is not None
        previews.append(FAMILY.preview(pipe, latents, (width, height)))

    FAMILY.run(pipe, inputs(image, [0, 1]), StepHooks(step=step), CPU)
    assert len(previews) == 2
    assert all(p is not None and p.size == (width // 8, height // 8) for p in previews)


def test_the_preview_map_is_fitted_at_load_from_the_models_own_vae(pipe) -> None:
    from engine.families import dit

    rgb_map = dit._RGB_MAPS.get(pipe.vae)
    assert rgb_map is not None  # fitted by `load` (via `prepare`), on the CPU
    assert rgb_map.shape == (pipe.vae.config.z_dim + 1, 3)
    assert FAMILY.preview_map(pipe) is rgb_map  # once per VAE


def test_the_preview_recovers_flat_colours_through_the_pipelines_normalisation(
        pipe, monkeypatch) -> None:
    """With a VAE encoder that is linear in the colours, the map fitted through the family's
    encode (one frame, B×C×T×H×W, normalised with the VAE config's latents_mean/latents_std as
    the pipeline does) turns the packed latents the transformer sees back into the colour."""
    from types import SimpleNamespace

    from engine.families import dit

    channels = pipe.vae.config.z_dim
    mixing = torch.randn(channels, 3, generator=torch.Generator().manual_seed(0))
    offset = torch.randn(channels, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    frames = []

    def encode(pixels: torch.Tensor, *args: object, **kwargs: object) -> SimpleNamespace:
        frames.append(pixels.shape)
        pooled = torch.nn.functional.avg_pool3d((pixels + 1) / 2, (1, 8, 8))  # B×3×1×h×w
        return SimpleNamespace(latents=torch.einsum("ck,bkthw->bcthw", mixing, pooled) + offset)

    monkeypatch.setattr(pipe.vae, "encode", encode)
    monkeypatch.delitem(dit._RGB_MAPS, pipe.vae, raising=False)  # refit with this encoder
    rgb_map = FAMILY.preview_map(pipe)
    assert frames == [(1, 3, 1, 128, 128)]  # a single frame, one encode
    assert rgb_map.shape == (channels + 1, 3)

    width, height = 64, 32
    colour = torch.tensor([0.8, 0.3, 0.1])
    pixels = colour.view(1, 3, 1, 1, 1).expand(1, 3, 1, height, width) * 2 - 1
    raw = encode(pixels).latents  # the VAE's latents; the pipeline normalises them:
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, channels, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, channels, 1, 1, 1)
    normalised = (raw - mean) / std
    packed = pipe._pack_latents(normalised[:, :, 0], 1, channels, height // 8, width // 8)
    preview = FAMILY.preview(pipe, packed, (width, height))
    assert preview is not None and preview.size == (width // 8, height // 8)
    got = np.asarray(preview).reshape(-1, 3) / 255
    np.testing.assert_allclose(got, np.broadcast_to(colour.numpy(), got.shape), atol=1 / 255 + 1e-6)
    # the raw (unnormalised) latents give another colour: the normalisation is the pipeline's
    unnormalised = pipe._pack_latents(raw[:, :, 0], 1, channels, height // 8, width // 8)
    wrong = np.asarray(FAMILY.preview(pipe, unnormalised, (width, height))).reshape(-1, 3) / 255
    assert np.abs(wrong - colour.numpy()).max() > 0.05


def test_preview_of_latents_of_another_size_is_none(pipe) -> None:
    width, height = 64, 32
    assert FAMILY.preview(pipe, torch.zeros(1, 5, 64), (width, height)) is None
    assert FAMILY.preview(pipe, torch.zeros(1, 8, 12), (width, height)) is None  # 3 channels
    assert FAMILY.preview(pipe, None, (width, height)) is None


# ------------------------------------------------------------------------------ sizes
def test_output_has_the_working_size(pipe, small_reference) -> None:
    for width, height in ((300, 200), (90, 400)):
        image = working_image(width, height)
        out = FAMILY.run(pipe, inputs(image, [3]), no_hooks(), CPU)
        assert out[0].shape == image.shape
        assert out[0].min() >= 0.0 and out[0].max() <= 1.0


def test_working_size_follows_the_pipelines_rounding() -> None:
    for width, height in ((1024, 1024), (4000, 3000), (1920, 1080), (1080, 1920), (7139, 922),
                          (640, 480), (513, 2000)):
        w, h = FAMILY.working_size(width, height, None)
        assert w % 32 == 0 and h % 32 == 0
        assert 0.9 < w * h / 1024**2 < 1.1
        # the pipeline resizes the reference for its VAE to exactly this: no second resize
        assert plus_module.calculate_dimensions(plus_module.VAE_IMAGE_SIZE, w / h) == (w, h)
        assert abs((w / h) / (width / height) - 1) < 0.1
    assert FAMILY.working_size(300, 200, 512) == plus_module.calculate_dimensions(512**2, 1.5)


def test_default_working_size_is_the_reference_size(pipe, monkeypatch) -> None:
    """At the real 1 MP: the image the VAE encodes has exactly the working size (so reference
    and output latents line up); stopped at the encode to stay fast."""
    assert plus_module.VAE_IMAGE_SIZE == 1024 * 1024
    image = working_image(1500, 1000, 1024)
    shapes = []

    class Stop(Exception):
        pass

    def encode(pixels: torch.Tensor, *args: object, **kwargs: object) -> None:
        shapes.append(pixels)
        raise Stop

    monkeypatch.setattr(pipe.vae, "encode", encode)
    with pytest.raises(Stop):
        FAMILY.run(pipe, inputs(image, [0]), no_hooks(), CPU)
    encoded = shapes[0][0, :, 0].permute(1, 2, 0).numpy()  # (1, 3, 1, H, W) in [-1, 1]
    assert encoded.shape == image.shape
    np.testing.assert_allclose(encoded, image * 2 - 1, atol=1e-6)  # not resampled at all


# ------------------------------------------------------------------------------ parameters
def test_parameters_and_rules() -> None:
    described = FAMILY.describe()
    assert described["family"] == "qwen-image-edit"
    params = {p["name"]: p for p in described["params"]}
    assert params["true_cfg_scale"]["default"] == 4.0
    assert (params["true_cfg_scale"]["minimum"], params["true_cfg_scale"]["maximum"]) == (1.0, 20.0)
    assert params["true_cfg_scale"]["explore"] == 1.0
    assert params["negative_prompt"]["default"] == " "
    assert params["negative_prompt"]["max_length"] == 1000
    assert described["supports"]["negative_prompt"] is True
    assert params["scheduler"]["choices"] == ["default", "lightning"]
    assert params["scheduler"]["default"] == "default"
    assert "Lightning" in params["scheduler"]["help"]
    assert described["steps"]["default"] == 40 and described["steps"]["minimum"] == 2
    assert described["resolution"] == {"rule": "area", "default": 1024, "multiple": 32,
                                       "minimum": 64, "maximum": 2048}
    assert QwenImageEditFamily.pipeline_class_names == ("QwenImageEditPlusPipeline",)


def test_a_parameter_the_family_does_not_take_is_named() -> None:
    with pytest.raises(InvalidInput) as err:
        FAMILY.resolve_options({"guidance": 2.5})
    assert err.value.field == "guidance"
    assert "true_cfg_scale" in str(err.value) and "negative_prompt" in str(err.value)
    with pytest.raises(InvalidInput) as err:
        FAMILY.resolve_options({"true_cfg_scale": 0.5})
    assert err.value.field == "true_cfg_scale"
    with pytest.raises(InvalidInput) as err:
        FAMILY.resolve_options({"negative_prompt": "x" * 1001})
    assert err.value.field == "negative_prompt"
    with pytest.raises(InvalidInput) as err:
        FAMILY.resolve_options({"scheduler": "euler-a"})
    assert err.value.field == "scheduler"
    assert FAMILY.resolve_options({"true_cfg_scale": 2}) == {
        "true_cfg_scale": 2.0, "negative_prompt": " ", "scheduler": "default"}


def test_one_step_is_refused(pipe) -> None:
    """One step gives NaN with the model's scheduler (shift_terminal), so the family refuses it."""
    with pytest.raises(InvalidInput) as err:
        FAMILY.run(pipe, inputs(working_image(), [0], steps=1), no_hooks(), CPU)
    assert err.value.field == "steps"


def test_gguf_needs_a_gguf_file(tmp_path) -> None:
    with pytest.raises(InvalidInput) as err:
        FAMILY.load(ModelSource("folder", str(tmp_path)), dtype=torch.float32, quantization="gguf")
    assert err.value.field == "quantization"


def test_registered() -> None:
    from engine.families import FAMILIES, family_for_pipeline_class

    assert FAMILIES["qwen-image-edit"] is FAMILY or isinstance(FAMILIES["qwen-image-edit"],
                                                               QwenImageEditFamily)
    assert family_for_pipeline_class("QwenImageEditPlusPipeline").id == "qwen-image-edit"


# ------------------------------------------------------------------------------ through the Editor
@pytest.fixture
def editor(pipe, small_reference):
    from engine.editor import Editor

    try:
        return Editor.from_pipeline(pipe, device="cpu", dtype="fp32")
    except (AttributeError, TypeError) as err:  # the SD-only editor of before issue 10
        pytest.skip(f"the family-agnostic Editor shell is missing ({err})")


def source_image(width: int = 150, height: int = 100) -> Image.Image:
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    pixels[..., 3] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]  # transparent → opaque
    pixels[:10, :, 3] = 0
    return Image.fromarray(pixels, "RGBA")


def edit_params(**kw: object):
    from engine.request import EditParams

    base = dict(instruction="make the sky purple", seed=3, steps=2, resolution=128,
                options={"true_cfg_scale": 2.0})
    base.update(kw)
    return EditParams(**base)


def test_editor_full_size_and_exact_alpha(editor) -> None:
    image = source_image()
    (result,) = editor.edit(image, edit_params())
    assert result.size == image.size and result.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(result)[..., 3], np.asarray(image)[..., 3])
    assert np.abs(np.asarray(result, dtype=int)[20:, 20:, :3]
                  - np.asarray(image, dtype=int)[20:, 20:, :3]).max() > 0  # it did edit


def test_editor_mask_restricts_the_edit(editor) -> None:
    image = source_image().convert("RGB")
    mask = np.zeros((100, 150), dtype=np.uint8)
    mask[30:70, 40:110] = 255
    (result,) = editor.edit(image, edit_params(), mask=Image.fromarray(mask, "L"))
    out, src = np.asarray(result), np.asarray(image)
    outside = mask == 0
    np.testing.assert_array_equal(out[outside], src[outside])
    assert np.abs(out[~outside].astype(int) - src[~outside].astype(int)).max() > 0


def test_editor_variants_and_cancel(editor) -> None:
    image = source_image().convert("RGB")
    two = editor.edit(image, edit_params(variants=2))
    (second,) = editor.edit(image, edit_params(seed=4))
    np.testing.assert_allclose(np.asarray(two[1], dtype=int), np.asarray(second, dtype=int), atol=1)
    cancel = threading.Event()
    steps = []

    def on_progress(progress) -> None:
        steps.append(progress.step)
        if progress.step == 1:
            cancel.set()

    with pytest.raises(EditCancelled):
        editor.edit(image, edit_params(steps=5), on_progress=on_progress, cancel=cancel)
    assert steps == [1]


# ------------------------------------------------------------------------------ LoRAs & Lightning
def lightning_style_lora(path: Path, transformer: torch.nn.Module, rank: int = 2) -> Path:
    """A LoRA in the layout of the Qwen-Image Lightning files (`lora_down`/`lora_up`/`alpha`
    under diffusers module names), which diffusers converts on load."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        linear = getattr(transformer.transformer_blocks[0].attn, name)
        key = f"transformer_blocks.0.attn.{name}"
        down = torch.randn(rank, linear.in_features, generator=generator)
        up = torch.randn(linear.out_features, rank, generator=generator)
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


def test_editor_loras_with_strengths(tmp_path, small_reference) -> None:
    from tiny_models.qwen import build_tiny_qwen_edit

    from engine.editor import Editor
    from engine.request import LoraSpec

    pipe = build_tiny_qwen_edit("2511")
    try:
        editor = Editor.from_pipeline(pipe, device="cpu", dtype="fp32")
    except (AttributeError, TypeError) as err:
        pytest.skip(f"the family-agnostic Editor shell is missing ({err})")
    lora = lightning_style_lora(tmp_path / "lightning-style.safetensors", pipe.transformer)
    image = source_image().convert("RGB")
    (plain,) = editor.edit(image, edit_params())
    (full,) = editor.edit(image, edit_params(loras=(LoraSpec(str(lora), 1.0),)))
    (zero,) = editor.edit(image, edit_params(loras=(LoraSpec(str(lora), 0.0),)))
    (again,) = editor.edit(image, edit_params())
    as_int = lambda im: np.asarray(im, dtype=int)  # noqa: E731
    assert np.abs(as_int(full) - as_int(plain)).max() > 0
    assert np.abs(as_int(zero) - as_int(plain)).max() <= 1
    assert np.abs(as_int(again) - as_int(plain)).max() <= 1  # unloaded again


def sigmas_used(pipe, scheduler: str) -> tuple[np.ndarray, torch.Tensor]:
    """(the result, the sigmas of the scheduler the pipeline stepped with)."""
    seen = []

    def step(i: int, total: int, latents: torch.Tensor | None) -> None:
        seen.append(pipe.scheduler.sigmas.clone())

    out = FAMILY.run(pipe, inputs(working_image(), [0], steps=4, true_cfg_scale=1.0,
                                  scheduler=scheduler), StepHooks(step=step), CPU)
    return out[0], seen[0]


def test_lightning_scheduler_for_one_call(pipe, small_reference) -> None:
    """"lightning" steps with the fixed shift of 3 (sigma → 3σ / (1 + 2σ) at any size, no
    terminal stretch), equals the pipeline called with that scheduler, and leaves the
    pipeline's own scheduler in place."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from engine.families.qwen_edit import LIGHTNING_SCHEDULER

    own = pipe.scheduler
    config = dict(own.config)
    default_out, default_sigmas = sigmas_used(pipe, "default")
    lightning_out, lightning_sigmas = sigmas_used(pipe, "lightning")
    assert pipe.scheduler is own and dict(own.config) == config

    base = torch.linspace(1.0, 1 / 4, 4, dtype=torch.float64)
    want = 3 * base / (1 + 2 * base)
    np.testing.assert_allclose(lightning_sigmas[:-1].double(), want, atol=1e-5)
    assert float(lightning_sigmas[-1]) == 0.0
    assert np.abs(default_sigmas[:-1].double() - want).max() > 1e-3  # the default differs
    assert np.abs(lightning_out - default_out).max() > 1e-4

    kwargs = FAMILY.pipeline_kwargs(inputs(working_image(), [0], steps=4, true_cfg_scale=1.0))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config, **LIGHTNING_SCHEDULER)
    try:
        direct = pipe(**kwargs).images[0]
    finally:
        pipe.scheduler = own
    np.testing.assert_allclose(lightning_out, direct, atol=1e-4)
    assert np.isfinite(lightning_out).all()
    again, _ = sigmas_used(pipe, "default")
    np.testing.assert_allclose(again, default_out, atol=1e-6)  # nothing of it stayed behind


def test_lightning_scheduler_is_put_back_after_a_cancel(pipe, small_reference) -> None:
    own = pipe.scheduler
    swapped = []

    def step(i: int, total: int, latents: torch.Tensor | None) -> None:
        swapped.append(pipe.scheduler is not own)
        raise EditCancelled()

    with pytest.raises(EditCancelled):
        FAMILY.run(pipe, inputs(working_image(), [0], steps=4, true_cfg_scale=1.0,
                                scheduler="lightning"), StepHooks(step=step), CPU)
    assert swapped == [True] and pipe.scheduler is own


def test_lightning_presets_use_the_lightning_scheduler() -> None:
    from engine.families import load_catalogue

    entries = [e for e in load_catalogue() if e["family"] == "qwen-image-edit"]
    presets = [p for e in entries for p in e["presets"] if p["id"].startswith("lightning")]
    assert len(presets) >= 2
    for preset in presets:
        assert FAMILY.resolve_options(preset["options"])["scheduler"] == "lightning"
        assert FAMILY.resolve_options(preset["options"])["true_cfg_scale"] == 1.0


# ------------------------------------------------------------------------ single files, quantized
def write_gguf(transformer: torch.nn.Module, path: Path) -> int:
    """The transformer as a GGUF file in diffusers' key names (as the community's Qwen-Image GGUFs
    are): 2-D weights with whole 32-blocks per row as Q8_0, the rest F32."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="qwen_image")
    quantized = 0
    for key, tensor in transformer.state_dict().items():
        data = tensor.detach().float().numpy()
        if data.ndim == 2 and data.shape[1] % 32 == 0:
            packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(key, packed, raw_shape=packed.shape,
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            quantized += 1
        else:
            writer.add_tensor(key, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized


def test_single_safetensors_transformer_with_its_base_folder(pipe, folders, tmp_path,
                                                            small_reference) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "qwen-image-edit-transformer.safetensors"
    save_file({k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}, str(path))
    loaded = FAMILY.load(ModelSource("single_file", str(path)), dtype=torch.float32,
                         config=str(folders["2511"]))
    image = working_image()
    want = FAMILY.run(pipe, inputs(image, [0]), no_hooks(), CPU)[0]
    got = FAMILY.run(loaded, inputs(image, [0]), no_hooks(), CPU)[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                    reason="the gguf package is not installed")
def test_gguf_transformer_loads_and_edits_on_the_cpu(pipe, folders, tmp_path,
                                                     small_reference) -> None:
    from diffusers.quantizers.gguf.utils import GGUFParameter

    path = tmp_path / "qwen-image-edit-Q8_0.gguf"
    assert write_gguf(pipe.transformer, path) > 0
    loaded = FAMILY.load(ModelSource("single_file", str(path)), dtype=torch.float32,
                         quantization="gguf", config=str(folders["2511"]))
    assert GGUFParameter in {type(p) for p in loaded.transformer.parameters()}
    image = working_image()
    want = FAMILY.run(pipe, inputs(image, [0]), no_hooks(), CPU)[0]
    got = FAMILY.run(loaded, inputs(image, [0]), no_hooks(), CPU)[0]
    assert got.shape == want.shape and np.isfinite(got).all()
    assert np.abs(got - want).mean() < 0.02


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_torchao_int8_quantizes_transformer_and_text_encoder(pipe, folders,
                                                             small_reference) -> None:
    loaded = FAMILY.load(ModelSource("folder", str(folders["2511"])), dtype=torch.float32,
                         quantization="torchao-int8")
    for component in FAMILY.quantizable:
        assert getattr(getattr(loaded, component), "is_quantized", False), component
    assert not getattr(loaded.vae, "is_quantized", False)
    image = working_image()
    want = FAMILY.run(pipe, inputs(image, [0]), no_hooks(), CPU)[0]
    got = FAMILY.run(loaded, inputs(image, [0]), no_hooks(), CPU)[0]
    assert got.shape == want.shape and np.isfinite(got).all()
    assert np.abs(got - want).mean() < 0.02
