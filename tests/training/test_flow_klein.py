"""Fine-tuning FLUX.2 klein (tiny random model): the objective, the CLI, the LoRA in diffusers
and in the engine, exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine.errors import InvalidInput
from tests.tiny_models.flux import save_tiny_klein
from tests.training.conftest import write_pairs
from training.cli import main
from training.objectives.flow import calculate_shift, flow_target
from training.objectives.flux2_klein import Flux2KleinTrainee
from training.train_loop import TrainConfig, checkpoint_dirs, step_generator, train

QUIET = {"report": lambda _msg: None}
INSTRUCTION = "make it red"


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_klein(tmp_path_factory.mktemp("klein") / "model")


@pytest.fixture(scope="module")
def klein_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("klein-pairs") / "pairs", count=4, size=(64, 64))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, klein_dir: Path, klein_pairs: Path) -> Path:
    """One CLI run (2 steps, 64 px, a validation edit): the output folder."""
    out = tmp_path_factory.mktemp("klein-run") / "lora"
    code = main([
        "train", "--data", str(klein_pairs), "--model", str(klein_dir), "--output", str(out),
        "--max-steps", "2", "--resolution", "64", "--batch-size", "2", "--lora-rank", "4",
        "--lr", "5e-2", "--validate-every", "2", "--validation-count", "1",
        "--validation-steps", "2", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    return out


def trainee(model: Path, **overrides: Any) -> Flux2KleinTrainee:
    options: dict[str, Any] = dict(lora_rank=4, lora_alpha=None, full=False, local_files_only=True)
    options.update(overrides)
    return Flux2KleinTrainee(str(model), **options)


def pixels(seed: int, count: int = 2, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, size, size, generator=generator) * 2 - 1


class Spy(torch.nn.Module):
    """Wraps the transformer: records its inputs; optionally offsets its output's reference part."""

    def __init__(self, inner: torch.nn.Module, reference_offset: float = 0.0) -> None:
        super().__init__()
        self.inner = inner
        self.reference_offset = reference_offset
        self.calls: list[dict[str, Any]] = []

    def forward(self, **kwargs: Any) -> tuple[torch.Tensor]:
        self.calls.append(
            {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        )
        output = self.inner(**kwargs)[0]
        targets = kwargs["hidden_states"].shape[1] // 2  # target and reference: the same size
        offset = torch.zeros_like(output)
        offset[:, targets:] = self.reference_offset
        return (output + offset,)


# ----------------------------------------------------------------------------------- objective


def test_conditioning_is_what_the_pipeline_feeds_its_transformer(klein_dir: Path) -> None:
    """Text embeddings, reference tokens and position ids equal the pipeline's own transformer
    inputs for the same image and instruction: what makes a trained LoRA work in the pipeline."""
    model = trainee(klein_dir)
    pipe = model.pipe
    seen: list[dict[str, Any]] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs), with_kwargs=True
    )
    source = pixels(1, count=1, size=64)
    image = Image.fromarray(((source[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    exact = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    start = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    pipe(image=image, prompt=INSTRUCTION, height=64, width=64, num_inference_steps=1,
         guidance_scale=1.0, latents=start, output_type="latent")  # fmt: skip
    hook.remove()
    inputs = seen[0]

    conditioning = model.encode_conditioning(exact, [INSTRUCTION], torch.device("cpu"))
    torch.testing.assert_close(conditioning["text"], inputs["encoder_hidden_states"])
    assert torch.equal(conditioning["text_ids"], inputs["txt_ids"])
    assert torch.equal(conditioning["image_ids"], inputs["img_ids"])
    assert conditioning["image_ids"][0, 16:, 0].eq(10).all()  # the reference's own time id
    tokens = inputs["hidden_states"]
    torch.testing.assert_close(conditioning["reference"], tokens[:, 16:], rtol=1e-5, atol=1e-5)
    # the pipeline's starting latents are the target tokens, packed the same way
    assert torch.equal(pipe._pack_latents(start), tokens[:, :16])


def test_loss_is_rectified_flow_on_the_target_tokens_only(
    klein_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Flux2KleinTrainee, "max_sequence_length", 32)  # 512 in use; faster here
    model = trainee(klein_dir)
    model.place(torch.device("cpu"), torch.float32)
    batch = {
        "input_pixels": pixels(1),
        "edited_pixels": pixels(2),
        "instruction": [INSTRUCTION] * 2,
    }
    options = dict(dropout=0.05, device=torch.device("cpu"), weight_dtype=torch.float32)
    spy = Spy(model.denoiser)
    with torch.no_grad():
        loss = model.loss(spy, batch, step_generator(0, 7, 0), **options)
    call = spy.calls[0]

    x0 = model.pipe._pack_latents(model.pipe._encode_vae_image(batch["edited_pixels"], None))
    reference = model.pipe._pack_latents(model.pipe._encode_vae_image(batch["input_pixels"], None))
    tokens, sigma = call["hidden_states"], call["timestep"]
    assert tokens.shape[1] == 2 * x0.shape[1] == 8  # 32 px: 2×2 target + 2×2 reference tokens
    torch.testing.assert_close(tokens[:, 4:], reference)
    assert call["guidance"] is None

    # The family's σ: every draw from the step's generator, noise first, then a logit-normal u
    # shifted by μ = compute_empirical_mu(target tokens, 4 steps) (the distilled model's
    # schedule), not by FLUX.1's calculate_shift.
    generator = step_generator(0, 7, 0)
    noise = torch.randn(x0.shape, generator=generator)
    u = torch.sigmoid(torch.normal(0.0, 1.0, (2,), generator=generator)).clamp(1e-4, 1 - 1e-4)
    mu = 0.00016927 * 4 + 0.45666666  # the pipeline's m_200 line…
    mu = mu + (4 - 200) * (mu - (8.73809524e-05 * 4 + 1.89833333)) / 190.0  # …at 4 steps
    expected = np.exp(mu) / (np.exp(mu) + 1 / u - 1)
    torch.testing.assert_close(sigma, expected.float())
    assert not np.isclose(mu, calculate_shift(4, model.pipe.scheduler.config))

    s = sigma[:, None, None]
    torch.testing.assert_close(tokens[:, :4], (1 - s) * x0 + s * noise, rtol=1e-5, atol=1e-5)
    prediction = model.denoiser(**call)[0][:, :4]
    target = flow_target(x0, noise)
    torch.testing.assert_close(target, noise - x0)
    torch.testing.assert_close(loss, torch.mean((prediction - target) ** 2), rtol=1e-5, atol=1e-6)

    # The reference tokens' prediction is not in the loss; the targets' is.
    with torch.no_grad():
        offset = model.loss(
            Spy(model.denoiser, reference_offset=100.0), batch, step_generator(0, 7, 0), **options
        )
    torch.testing.assert_close(offset, loss)


def test_cached_conditioning_equals_a_batch_encode(
    klein_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--cache-conditioning encodes one sample at a time and stacks the entries: for klein (the
    text always padded to the same length, 512) that must equal encoding the batch at once."""
    monkeypatch.setattr(Flux2KleinTrainee, "max_sequence_length", 32)  # faster, same padding
    model = trainee(klein_dir, cache_conditioning=True)
    batch = {"input_pixels": pixels(3), "instruction": [INSTRUCTION, "make the sky blue"]}
    cpu = torch.device("cpu")
    with torch.no_grad():
        direct = model.encode_conditioning(batch["input_pixels"], batch["instruction"], cpu)
        first = model.conditioning(batch, cpu)  # fills the cache
        again = model.conditioning(batch, cpu)  # served from it
    assert model.cache is not None and len(model.cache) == 2 and model.cache.hits == 2
    for name, value in direct.items():
        torch.testing.assert_close(first[name], value, rtol=1e-5, atol=1e-5)
        assert torch.equal(again[name], first[name])


def test_lora_covers_attention_and_mlp_projections_of_every_block(klein_dir: Path) -> None:
    model = trainee(klein_dir)
    adapted = {
        name.rsplit(".lora_A", 1)[0]
        for name, _ in model.denoiser.named_parameters()
        if ".lora_A." in name
    }
    assert adapted == {
        *(f"transformer_blocks.0.attn.{p}" for p in (
            "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
            "to_add_out")),
        *(f"transformer_blocks.0.{ff}.{p}" for ff in ("ff", "ff_context")
          for p in ("linear_in", "linear_out")),
        "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
        "single_transformer_blocks.0.attn.to_out",
    }  # fmt: skip
    trainable = model.trainable_parameters()
    assert trainable and all(
        "lora" in n for n, p in model.denoiser.named_parameters() if p.requires_grad
    )


def test_full_fine_tuning_is_refused_with_the_alternative(klein_dir: Path) -> None:
    with pytest.raises(InvalidInput, match="LoRA"):
        trainee(klein_dir, full=True)


def test_sizes_the_pipeline_cannot_take_are_clear_errors(klein_dir: Path) -> None:
    model = trainee(klein_dir)
    with pytest.raises(InvalidInput, match="--resolution 64"):
        model.validation_edit(model.denoiser, Image.new("RGB", (32, 32)), INSTRUCTION, seed=0,
                              steps=1)  # fmt: skip
    with pytest.raises(InvalidInput, match="multiple of 16"):
        model.encode_target(pixels(0, size=40), torch.Generator(), torch.device("cpu"))


# ---------------------------------------------------------------------- the run and the LoRA


def test_cli_trains_a_klein_lora(trained: Path, klein_dir: Path) -> None:
    tensors = load_file(trained / "pytorch_lora_weights.safetensors")
    assert tensors and all(k.startswith("transformer.") for k in tensors)
    assert any("single_transformer_blocks.0.attn.to_qkv_mlp_proj" in k for k in tensors)
    assert any("transformer_blocks.0.ff.linear_in" in k for k in tensors)
    card = (trained / "README.md").read_text()
    assert "Flux2KleinPipeline" in card and "rank 4" in card and str(klein_dir) in card
    assert (trained / "validation" / "step-0000002.png").is_file()
    assert (trained / "checkpoints" / "step-0000002").is_dir()


def test_the_lora_loads_in_the_diffusers_pipeline_and_changes_its_output(
    trained: Path, klein_dir: Path
) -> None:
    from diffusers import Flux2KleinPipeline
    from peft.utils import get_peft_model_state_dict

    pipe = Flux2KleinPipeline.from_pretrained(klein_dir)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))

    def edit() -> np.ndarray:
        return pipe(image=image, prompt=INSTRUCTION, height=64, width=64, num_inference_steps=2,
                    generator=torch.Generator().manual_seed(1), output_type="np").images[0]  # fmt: skip

    plain = edit()
    pipe.load_lora_weights(str(trained))
    assert pipe.get_active_adapters()
    saved = load_file(trained / "pytorch_lora_weights.safetensors")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=pipe.get_active_adapters()[0])
    assert len(loaded) == len(saved)  # every trained matrix found its layer
    assert np.abs(edit() - plain).mean() > 1e-4


def test_the_engine_edits_with_the_lora(trained: Path, klein_dir: Path) -> None:
    from engine.editor import Editor
    from engine.request import EditParams, LoraSpec

    editor = Editor(str(klein_dir), device="cpu", dtype="fp32")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    lora = (LoraSpec(str(trained / "pytorch_lora_weights.safetensors")),)
    plain = editor.edit(image, EditParams(INSTRUCTION, steps=2, resolution=64, seed=1))[0]
    adapted = editor.edit(
        image, EditParams(INSTRUCTION, steps=2, resolution=64, seed=1, loras=lora)
    )[0]
    assert plain.size == adapted.size == image.size
    assert plain.tobytes() != adapted.tobytes()


def test_killed_and_resumed_run_matches_an_uninterrupted_one(
    tmp_path: Path, klein_dir: Path, klein_pairs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 32 text tokens instead of the pipeline's 512: the same code path, a quarter of the time
    monkeypatch.setattr(Flux2KleinTrainee, "max_sequence_length", 32)

    def config(output: Path, **overrides: Any) -> TrainConfig:
        settings: dict[str, Any] = dict(
            data=str(klein_pairs), model=str(klein_dir), output=output, resolution=32,
            batch_size=1, max_steps=4, checkpoint_every=2, lr=1e-2, lora_rank=4,
            progress=False,
        )  # fmt: skip
        settings.update(overrides)
        return TrainConfig(**settings)

    class Crash(RuntimeError):
        pass

    def crash_after_3(step: int, _loss: float) -> None:
        if step == 3:
            raise Crash

    whole = train(config(tmp_path / "whole"), **QUIET)
    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        train(config(out), on_step_end=crash_after_3, **QUIET)
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == ["step-0000002"]
    resumed = train(config(out, resume=True), **QUIET)

    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(whole.losses[step], rel=1e-5, abs=1e-6)
    a, b = load_file(whole.weights), load_file(resumed.weights)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # training moved the adapter (lora_B starts at zero), so the comparison has teeth
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)
