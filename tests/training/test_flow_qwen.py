"""Qwen-Image-Edit fine-tuning on a tiny random model: the CLI end to end, the conditioning the
pipeline builds, the rectified-flow loss pinned, the LoRA in diffusers and in the engine, exact
resume, the conditioning cache.

Speed: the pipeline encodes the reference image at `VAE_IMAGE_SIZE` (1024² in diffusers 0.42)
whatever the output size; the tiny VAE alone takes seconds per encode at that size. As in
tests/engine/test_family_qwen.py, the module constant is lowered to 128² (`small_reference`):
training reads it at call time, so training, the pipeline and the engine still run the same
code on the same numbers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # tests/ for tiny_models
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_module
from tiny_models.qwen import build_tiny_qwen_edit, build_transformer

from engine.errors import InvalidInput
from engine.families.qwen_edit import processor_without_video
from training.cli import main
from training.objectives import load_trainee
from training.objectives.flow import unused_trainable_parameters
from training.objectives.qwen_edit import QwenImageEditTrainee, encode_reference, to_pil
from training.train_loop import TrainConfig, checkpoint_dirs, train

QUIET = {"report": lambda _msg: None}
SMALL_REFERENCE = 128 * 128
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny 2511 model with 2 transformer blocks: the last block's text stream is special
    (its output reaches nothing), so the LoRA targets differ between the two."""
    pipe = build_tiny_qwen_edit("2511")
    pipe.register_modules(transformer=build_transformer("2511", num_layers=2))
    folder = tmp_path_factory.mktemp("qwen") / "tiny-qwen-edit-2511"
    with processor_without_video():
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(autouse=True)
def small_reference(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(plus_module, "VAE_IMAGE_SIZE", SMALL_REFERENCE)
    return SMALL_REFERENCE


@pytest.fixture
def trainee(qwen_dir: Path) -> Iterator[QwenImageEditTrainee]:
    torch.manual_seed(0)
    built = load_trainee(
        str(qwen_dir), lora_rank=4, lora_alpha=None, full=False, local_files_only=True
    )
    assert isinstance(built, QwenImageEditTrainee)
    built.place(CPU, torch.float32)
    yield built


def config(data: Path, model: Path, output: Path, **overrides: object) -> TrainConfig:
    settings: dict = dict(
        data=str(data), model=str(model), output=output, resolution=32, batch_size=1,
        max_steps=3, checkpoint_every=1, lr=1e-2, lora_rank=4, progress=False,
    )  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def batch(count: int = 2, size: int = 32, seed: int = 0) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    pixels = lambda: torch.rand(count, 3, size, size, generator=generator) * 2 - 1  # noqa: E731
    instructions = ["make it red", "add a small blue hat on the cat"][:count]
    return {"input_pixels": pixels(), "edited_pixels": pixels(), "instruction": instructions}


def transformer_inputs(pipe: Any, call: Callable[[], Any]) -> list[dict[str, Any]]:
    """The keyword arguments of every transformer call made by `call()`."""
    seen: list[dict[str, Any]] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda _module, _args, kwargs: seen.append(kwargs), with_kwargs=True
    )
    try:
        call()
    finally:
        hook.remove()
    return seen


# ------------------------------------------------------------------------------ the CLI, end to end
def test_cli_trains_a_lora_that_diffusers_and_the_engine_load(
    tmp_path: Path, qwen_dir: Path, make_pairs: Callable[..., Path]
) -> None:
    from diffusers import QwenImageEditPlusPipeline
    from peft.utils import get_peft_model_state_dict

    from engine.editor import Editor
    from engine.request import EditParams, LoraSpec

    pairs = make_pairs(tmp_path / "pairs", count=3)
    out = tmp_path / "lora"
    code = main([
        "train", "--data", str(pairs), "--model", str(qwen_dir), "--output", str(out),
        "--max-steps", "2", "--resolution", "32", "--batch-size", "2", "--lora-rank", "4",
        "--lr", "5e-2", "--validate-every", "2", "--validation-count", "1",
        "--validation-steps", "2", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    weights = out / "pytorch_lora_weights.safetensors"
    tensors = load_file(weights)
    assert tensors and all(k.startswith("transformer.") and ".lora_" in k for k in tensors)
    modules = {k.removeprefix("transformer.").split(".lora_")[0] for k in tensors}
    for part in ("attn.to_q", "attn.to_out.0", "attn.add_k_proj", "attn.add_v_proj",
                 "img_mlp.net.0.proj", "img_mlp.net.2"):  # fmt: skip
        assert {f"transformer_blocks.{b}.{part}" for b in (0, 1)} <= modules, part
    for part in ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2"):
        assert f"transformer_blocks.0.{part}" in modules, part
        assert f"transformer_blocks.1.{part}" not in modules, part  # no gradient in the last
    assert not any("_mod." in k or "proj_out" in k for k in tensors)
    card = (out / "README.md").read_text()
    assert "QwenImageEditPlusPipeline" in card and "rank 4" in card
    assert (out / "validation" / "step-0000002.png").is_file()

    # diffusers' own pipeline: load_lora_weights changes the edit.
    with processor_without_video():  # no torchvision here: the processor loads without it
        pipe = QwenImageEditPlusPipeline.from_pretrained(qwen_dir)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (32, 32, 3), np.uint8))

    def edit() -> np.ndarray:
        return pipe(image=image, prompt="make it red", height=32, width=32,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images[0]  # fmt: skip

    plain = edit()
    pipe.load_lora_weights(str(weights))
    assert pipe.get_active_adapters()
    # Every tensor of the file is in the pipeline (a file mixing key styles loads partly).
    (adapter,) = pipe.get_active_adapters()
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
    assert len(loaded) == len(tensors)
    for key, value in tensors.items():
        torch.testing.assert_close(loaded[key.removeprefix("transformer.")], value)
    assert np.abs(edit() - plain).max() > 1e-3, "the loaded adapter changes nothing"

    # The engine: the same file as a LoRA of the edit.
    editor = Editor(str(qwen_dir), device="cpu", dtype="fp32")
    source = Image.new("RGB", (64, 64), (40, 120, 200))
    params = dict(steps=2, resolution=64, seed=1)
    without = editor.edit(source, EditParams("make it red", **params))[0]
    with_lora = editor.edit(
        source, EditParams("make it red", loras=(LoraSpec(str(weights)),), **params)
    )[0]
    assert without.size == with_lora.size == source.size
    assert np.abs(np.asarray(without, int) - np.asarray(with_lora, int)).max() > 0


def test_full_fine_tuning_is_refused_with_the_reason(qwen_dir: Path) -> None:
    with pytest.raises(InvalidInput, match="LoRA") as caught:
        load_trainee(str(qwen_dir), lora_rank=None, lora_alpha=None, full=True,
                     local_files_only=True)  # fmt: skip
    assert caught.value.field == "full"


# ------------------------------------------------------------------------------ conditioning
@pytest.mark.parametrize("size", [(64, 48), (32, 32)])
def test_conditioning_is_what_the_pipeline_gives_the_transformer(
    trainee: QwenImageEditTrainee, size: tuple[int, int]
) -> None:
    """The VL embedding (instruction + image in the template), the reference latents and the
    img_shapes the trainee builds equal the pipeline's own inputs to the transformer."""
    width, height = size
    pixels = torch.rand(3, height, width, generator=torch.Generator().manual_seed(1)) * 2 - 1
    image = to_pil(pixels)
    pipe = trainee.pipeline_with(trainee.denoiser)
    calls = transformer_inputs(pipe, lambda: pipe(
        image=image, prompt="make it red", height=height, width=width, num_inference_steps=2,
        generator=torch.Generator().manual_seed(0), output_type="latent",
    ))  # fmt: skip
    seen = calls[0]

    mine = encode_reference(trainee.pipe, image, "make it red", CPU)
    target_tokens = (height // 16) * (width // 16)
    torch.testing.assert_close(seen["encoder_hidden_states"], mine["prompt_embeds"], rtol=0, atol=0)
    torch.testing.assert_close(
        seen["hidden_states"][:, target_tokens:], mine["reference_latents"], rtol=0, atol=0
    )
    reference_shape = tuple(mine["reference_shape"][0].tolist())
    assert seen["img_shapes"] == [[(1, height // 16, width // 16), reference_shape]]
    # The reference is encoded at the pipeline's VAE size (here the lowered 128² area).
    assert reference_shape[1] * reference_shape[2] == pytest.approx(SMALL_REFERENCE / 256, rel=0.3)

    # The training forward pass builds the same sequence and positions from a batch.
    conditioning = trainee.conditioning(
        {"input_pixels": pixels[None], "instruction": ["make it red"]}, CPU
    )
    trainee._target_grid = (height // 16, width // 16)
    noisy = torch.randn(1, target_tokens, 64)
    sigma = torch.tensor([0.7])
    train_call = transformer_inputs(
        trainee.pipe, lambda: trainee.forward(trainee.denoiser, noisy, sigma, conditioning)
    )[0]
    assert train_call["img_shapes"] == seen["img_shapes"]
    torch.testing.assert_close(train_call["encoder_hidden_states"], seen["encoder_hidden_states"])
    assert train_call["encoder_hidden_states_mask"] is None  # as the pipeline: nothing padded
    torch.testing.assert_close(train_call["timestep"], sigma)  # the pipeline passes t/1000 = σ


def test_a_batch_pads_the_prompts_and_masks_the_padding(trainee: QwenImageEditTrainee) -> None:
    data = batch(2)
    conditioning = trainee.conditioning(data, CPU)
    mask = conditioning["prompt_mask"]
    lengths = mask.sum(dim=1).tolist()
    assert lengths[0] < lengths[1] == mask.shape[1]  # "make it red" is the shorter prompt
    alone = encode_reference(trainee.pipe, to_pil(data["input_pixels"][0]), "make it red", CPU)
    torch.testing.assert_close(
        conditioning["prompt_embeds"][0, : lengths[0]], alone["prompt_embeds"][0]
    )
    assert torch.count_nonzero(conditioning["prompt_embeds"][0, lengths[0] :]) == 0


# ------------------------------------------------------------------------------ the loss
def test_loss_is_rectified_flow_on_the_target_tokens_only(trainee: QwenImageEditTrainee) -> None:
    """x_t = (1-σ)·x0 + σ·noise with x0 the normalised posterior sample of the edited image;
    σ uniform then shifted by the pipeline's μ for the target length; the reference tokens
    follow the target's and never enter the loss; target v = noise − x0."""
    data = batch(2, size=32, seed=4)
    conditioning = trainee.conditioning(data, CPU)
    seen: dict[str, Any] = {}
    reference_tokens = conditioning["reference_latents"].shape[1]

    class Recorder(torch.nn.Module):
        def forward(self, **kwargs: Any) -> tuple[torch.Tensor]:
            seen.update(kwargs)
            hidden = kwargs["hidden_states"]
            prediction = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(9))
            prediction[:, -reference_tokens:] = 1e6  # would dominate if it entered the loss
            seen["prediction"] = prediction
            return (prediction,)

    loss = trainee.loss(Recorder(), data, torch.Generator().manual_seed(5), dropout=0.05,
                        device=CPU, weight_dtype=torch.float32)  # fmt: skip

    # The same draws, in the same order, computed here from the pipeline's parts.
    generator = torch.Generator().manual_seed(5)
    vae = trainee.pipe.vae
    with torch.no_grad():
        latents = vae.encode(data["edited_pixels"].unsqueeze(2)).latent_dist.sample(generator)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    x0 = trainee.pipe._pack_latents((latents - mean) / std, 2, 16, 4, 4)
    tokens = x0.shape[1]
    assert tokens == 4
    noise = torch.randn(x0.shape, generator=generator)
    u = torch.rand(2, generator=generator)
    config = trainee.pipe.scheduler.config
    mu = plus_module.calculate_shift(
        tokens, config["base_image_seq_len"], config["max_image_seq_len"],
        config["base_shift"], config["max_shift"],
    )  # fmt: skip
    sigmas = np.exp(mu) / (np.exp(mu) + (1 / u - 1))

    torch.testing.assert_close(seen["timestep"], sigmas.float())
    hidden = seen["hidden_states"]
    assert hidden.shape[1] == tokens + reference_tokens
    expected_noisy = (1 - sigmas[:, None, None]) * x0 + sigmas[:, None, None] * noise
    torch.testing.assert_close(hidden[:, :tokens], expected_noisy.float())
    torch.testing.assert_close(hidden[:, tokens:], conditioning["reference_latents"])
    expected = torch.mean((seen["prediction"][:, :tokens] - (noise - x0)) ** 2)
    torch.testing.assert_close(loss, expected)


def test_every_adapter_weight_gets_a_gradient(trainee: QwenImageEditTrainee) -> None:
    """Multi-GPU training (DDP) fails on a trainable parameter without a gradient."""
    loss = trainee.loss(trainee.denoiser, batch(2), torch.Generator().manual_seed(0),
                        dropout=0.0, device=CPU, weight_dtype=torch.float32)  # fmt: skip
    loss.backward()
    assert unused_trainable_parameters(trainee.denoiser) == []
    # lora_B starts at zero, so lora_A's first gradient is zero; lora_B's must not be.
    lora_b = {n: p for n, p in trainee.denoiser.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b.values())


# ------------------------------------------------------------------------------ resume and cache
def test_killed_and_resumed_run_matches_an_uninterrupted_one(
    tmp_path: Path, qwen_dir: Path, make_pairs: Callable[..., Path]
) -> None:
    """With the conditioning cache on (a resumed process starts with an empty cache)."""
    pairs = make_pairs(tmp_path / "pairs", count=2)
    settings = dict(cache_conditioning=True)
    whole = train(config(pairs, qwen_dir, tmp_path / "whole", **settings), **QUIET)

    out = tmp_path / "crashed"

    def crash(step: int, _loss: float) -> None:
        if step == 2:
            raise RuntimeError("simulated crash after step 2")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(pairs, qwen_dir, out, **settings), on_step_end=crash, **QUIET)
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")][-1] == "step-0000002"
    resumed = train(config(pairs, qwen_dir, out, resume=True, **settings), **QUIET)

    assert sorted(resumed.losses) == [3]
    assert resumed.losses[3] == pytest.approx(whole.losses[3], rel=1e-5, abs=1e-6)
    a, b = load_file(whole.weights), load_file(resumed.weights)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert any(torch.count_nonzero(a[k]) for k in a if "lora_B" in k)  # it trained


def test_cache_encodes_each_row_once_then_lets_the_text_encoder_go(
    qwen_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainee = load_trainee(str(qwen_dir), lora_rank=4, lora_alpha=None, full=False,
                           local_files_only=True, cache_conditioning=True)  # fmt: skip
    assert isinstance(trainee, QwenImageEditTrainee)
    trainee.place(CPU, torch.float32)
    # Pretend the transformer sits on an accelerator, so "leaving" it is observable.
    monkeypatch.setattr(QwenImageEditTrainee, "_device", property(lambda _s: torch.device("cuda")))
    encodes: list[int] = []
    trainee.pipe.text_encoder.register_forward_pre_hook(lambda *_: encodes.append(1))
    rows = [batch(1, seed=1), batch(1, seed=2)]
    uncached = QwenImageEditTrainee.encode_conditioning(
        trainee, rows[0]["input_pixels"], rows[0]["instruction"], CPU
    )
    encodes.clear()

    first_epoch = [trainee.conditioning(row, CPU) for row in rows]
    assert len(encodes) == 2 and not trainee.text_encoder_away
    again = trainee.conditioning(rows[0], CPU)  # a row comes round again: every row is cached
    assert len(encodes) == 2 and trainee.text_encoder_away
    for key in uncached:
        torch.testing.assert_close(again[key], uncached[key])
        torch.testing.assert_close(first_epoch[0][key], uncached[key])


def test_a_resolution_the_pipeline_cannot_make_is_refused(trainee: QwenImageEditTrainee) -> None:
    with pytest.raises(InvalidInput, match="multiples of 16") as caught:
        trainee.loss(trainee.denoiser, batch(1, size=24), torch.Generator().manual_seed(0),
                     dropout=0.0, device=CPU, weight_dtype=torch.float32)  # fmt: skip
    assert caught.value.field == "resolution"


def test_gradient_checkpointing_gives_the_same_gradients(trainee: QwenImageEditTrainee) -> None:
    """The plan for 16–24 GB GPUs relies on it: the same loss and adapter gradients."""
    data = batch(1, seed=6)

    def gradients() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        trainee.denoiser.zero_grad(set_to_none=True)
        loss = trainee.loss(trainee.denoiser, data, torch.Generator().manual_seed(2),
                            dropout=0.0, device=CPU, weight_dtype=torch.float32)  # fmt: skip
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trainee.denoiser.named_parameters()
                               if p.grad is not None}  # fmt: skip

    trainee.denoiser.train()
    plain_loss, plain = gradients()
    trainee.denoiser.enable_gradient_checkpointing()
    try:
        checkpointed_loss, checkpointed = gradients()
    finally:
        trainee.denoiser.disable_gradient_checkpointing()
    torch.testing.assert_close(checkpointed_loss, plain_loss)
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)
