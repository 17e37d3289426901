"""FLUX.1 Kontext fine-tuning: the rectified-flow loss, the pipeline's conditioning, the trained
LoRA in diffusers and the engine, exact resume, and the refusals."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine.errors import InvalidInput
from training.cli import main
from training.objectives.flow import (
    SigmaSampling,
    calculate_shift,
    flow_matching_loss,
    interpolate,
    sample_sigmas,
    shift_sigmas,
    unused_trainable_parameters,
)
from training.train_loop import TrainConfig, checkpoint_dirs, train

QUIET = {"report": lambda _msg: None}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models.flux import save_tiny_kontext

    return save_tiny_kontext(tmp_path_factory.mktemp("tiny") / "kontext")


def config(data: Path, model: Path, output: Path, **overrides: object) -> TrainConfig:
    settings: dict = dict(
        data=str(data), model=str(model), output=output, resolution=32, batch_size=2,
        max_steps=4, checkpoint_every=2, lr=1e-2, lora_rank=4, progress=False,
    )  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def trainee(kontext_dir: Path) -> Any:
    """One loaded trainee for the tests that only run its objective (loading costs seconds)."""
    return trainee_of(kontext_dir)


def trainee_of(model: Path, **options: Any) -> Any:
    from training.objectives import load_trainee

    trainee = load_trainee(
        str(model), lora_rank=4, lora_alpha=None, full=False, local_files_only=True, **options
    )
    trainee.place(CPU, torch.float32)
    return trainee


# --------------------------------------------------------------------------------------
# The objective


def test_flow_loss_is_velocity_mse_on_the_target_tokens_only() -> None:
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 6, 4, generator=generator), torch.randn(2, 6, 4, generator=generator)
    sigmas = torch.tensor([0.25, 0.8])
    noisy = interpolate(x0, noise, sigmas)
    torch.testing.assert_close(noisy[0], 0.75 * x0[0] + 0.25 * noise[0])
    torch.testing.assert_close(interpolate(x0, noise, torch.zeros(2)), x0)
    torch.testing.assert_close(interpolate(x0, noise, torch.ones(2)), noise)

    reference = torch.randn(2, 5, 4, generator=generator)  # the reference image's tokens
    exact = torch.cat([noise - x0, reference], dim=1)
    assert float(flow_matching_loss(exact, x0, noise, sigmas)) == pytest.approx(0.0, abs=1e-12)
    # Whatever is predicted for the reference tokens does not enter the loss.
    other = torch.cat([noise - x0, 100 * reference], dim=1)
    assert float(flow_matching_loss(other, x0, noise, sigmas)) == pytest.approx(0.0, abs=1e-12)
    zeros = torch.zeros(2, 11, 4)
    expected = ((noise - x0) ** 2).mean()
    assert float(flow_matching_loss(zeros, x0, noise, sigmas)) == pytest.approx(float(expected))
    # The target is noise − x0, not x0 − noise or the noise.
    assert float(flow_matching_loss(torch.cat([x0 - noise, reference], 1), x0, noise, sigmas)) > 1
    assert float(flow_matching_loss(torch.cat([noise, reference], 1), x0, noise, sigmas)) > 0.5


def test_sigmas_are_logit_normal_then_shifted_as_the_flux_scheduler_samples() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tests.tiny_models.flux import _flow_scheduler

    scheduler = _flow_scheduler()  # FLUX's config: dynamic shifting
    sampling = SigmaSampling()
    unshifted = sample_sigmas(4000, torch.Generator().manual_seed(1), sampling)
    again = sample_sigmas(4000, torch.Generator().manual_seed(1), sampling)
    torch.testing.assert_close(unshifted, again)  # all from the generator
    logits = torch.log(unshifted / (1 - unshifted))
    assert abs(float(logits.mean())) < 0.06 and abs(float(logits.std()) - 1) < 0.06

    sequence = 1024  # 512 px: 32×32 packed tokens
    shifted = sample_sigmas(
        4000, torch.Generator().manual_seed(1), sampling,
        lambda u: shift_sigmas(u, scheduler, sequence),
    )  # fmt: skip
    mu = calculate_shift(sequence, scheduler.config)
    torch.testing.assert_close(shifted, np.exp(mu) / (np.exp(mu) + (1 / unshifted - 1)))
    assert float(shifted.median()) > float(unshifted.median()) + 0.1  # more noise at 512 px
    # The same shift the scheduler applies to its inference schedule.
    plain = torch.linspace(1.0, 0.25, 4)  # the pipeline's sigmas for 4 steps, before the shift
    scheduler.set_timesteps(sigmas=plain.numpy(), mu=mu)
    torch.testing.assert_close(
        scheduler.sigmas[:4], shift_sigmas(plain, scheduler, sequence), rtol=1e-5, atol=1e-6
    )
    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    half = torch.tensor([0.5])
    torch.testing.assert_close(shift_sigmas(half, static, 64), torch.tensor([0.75]))


def test_kontext_conditioning_is_what_the_pipeline_feeds_its_transformer(trainee: Any) -> None:
    """The transformer inputs of one inference step of FluxKontextPipeline equal the ones the
    trainee builds for the same image and instruction (reference tokens, ids, text, guidance)."""
    from training.objectives.flux_kontext import TRAINING_GUIDANCE, FluxKontextTrainee

    assert isinstance(trainee, FluxKontextTrainee)
    pipe = trainee.pipe
    rng = np.random.default_rng(0)
    image = rng.random((1, 32, 48, 3), dtype=np.float32)
    seen: dict[str, Any] = {}

    def spy(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        seen.update(kwargs)

    handle = pipe.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    with torch.no_grad():
        pipe(
            image=image, prompt="make it red", height=32, width=48, max_area=32 * 48,
            _auto_resize=False, num_inference_steps=1, guidance_scale=TRAINING_GUIDANCE,
            generator=torch.Generator().manual_seed(0), output_type="np",
        )  # fmt: skip
    handle.remove()

    pixels = torch.from_numpy(image).permute(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        conditioning = trainee.encode_conditioning(pixels, ["make it red"], CPU)
        x0 = trainee.encode_target(pixels, torch.Generator().manual_seed(0), CPU)
    tokens = x0.shape[1]
    assert tokens == (32 // 16) * (48 // 16)
    captured: dict[str, Any] = {}

    def denoiser(**kwargs: Any) -> tuple[torch.Tensor]:
        captured.update(kwargs)
        return (torch.zeros_like(kwargs["hidden_states"]),)

    sigma = seen["timestep"]
    trainee.forward(denoiser, seen["hidden_states"][:, :tokens], sigma, conditioning)  # type: ignore[arg-type]
    torch.testing.assert_close(captured["hidden_states"], seen["hidden_states"])
    torch.testing.assert_close(captured["img_ids"], seen["img_ids"])
    assert float(captured["img_ids"][tokens:, 0].min()) == 1.0  # reference: own first id
    assert float(captured["img_ids"][:tokens, 0].max()) == 0.0
    for key in ("encoder_hidden_states", "pooled_projections", "txt_ids", "guidance", "timestep"):
        torch.testing.assert_close(captured[key], seen[key], msg=key)


def test_kontext_loss_replays_from_its_generator_and_ignores_reference_predictions(
    trainee: Any,
) -> None:
    batch = {
        "input_pixels": torch.rand(2, 3, 32, 32) * 2 - 1,
        "edited_pixels": torch.rand(2, 3, 32, 32) * 2 - 1,
        "instruction": ["make it red", "make the blue"],
    }
    calls: list[dict[str, Any]] = []

    def denoiser(**kwargs: Any) -> tuple[torch.Tensor]:
        calls.append(kwargs)
        hidden = kwargs["hidden_states"]
        out = torch.zeros_like(hidden)
        out[:, hidden.shape[1] // 2 :] = 1e3 * len(calls)  # the reference tokens' "prediction"
        return (out,)

    def loss() -> float:
        return float(
            trainee.loss(
                denoiser,
                batch,
                torch.Generator().manual_seed(3),
                dropout=0.1,
                device=CPU,
                weight_dtype=torch.float32,
            )
        )

    first, second = loss(), loss()
    assert first == second  # every draw from the generator; reference predictions ignored
    hidden, sigma = calls[0]["hidden_states"], calls[0]["timestep"]
    tokens = hidden.shape[1] // 2
    assert ((sigma > 0) & (sigma < 1)).all()
    # A zero prediction costs |noise − x0|²; recover them from x_t = (1−σ)x0 + σ·noise.
    x0 = trainee.encode_target(batch["edited_pixels"], torch.Generator().manual_seed(3), CPU)
    noise = (hidden[:, :tokens] - (1 - sigma[:, None, None]) * x0) / sigma[:, None, None]
    assert first == pytest.approx(float(((noise - x0) ** 2).mean()), rel=1e-4)
    assert float(noise.std()) == pytest.approx(1.0, abs=0.35)  # it is the Gaussian noise


def test_every_lora_parameter_gets_a_gradient(kontext_dir: Path) -> None:
    """DDP (accelerate on several GPUs) fails on a trainable parameter without a gradient."""
    trainee = trainee_of(kontext_dir)  # its own: gradient checkpointing and gradients stay
    batch = {
        "input_pixels": torch.rand(1, 3, 32, 32) * 2 - 1,
        "edited_pixels": torch.rand(1, 3, 32, 32) * 2 - 1,
        "instruction": ["make it red"],
    }
    trainee.denoiser.enable_gradient_checkpointing()
    trainee.denoiser.train()
    loss = trainee.loss(
        trainee.denoiser, batch, torch.Generator().manual_seed(0), dropout=0.0, device=CPU,
        weight_dtype=torch.float32,
    )  # fmt: skip
    loss.backward()
    assert unused_trainable_parameters(trainee.denoiser) == []
    names = {n for n, p in trainee.denoiser.named_parameters() if p.requires_grad}
    for part in ("attn.to_q", "attn.add_k_proj", "attn.to_add_out", "ff.net.2",
                 "ff_context.net.0.proj", "single_transformer_blocks.0.proj_mlp",
                 "single_transformer_blocks.0.proj_out"):  # fmt: skip
        assert any(part in n for n in names), part
    assert not any(n.startswith("proj_out.") for n in names)  # the output layer stays frozen
    assert all(p.dtype == torch.float32 for p in trainee.trainable_parameters())


def test_cached_conditioning_equals_fresh_and_is_reused(kontext_dir: Path, trainee: Any) -> None:
    cached, fresh = trainee_of(kontext_dir, cache_conditioning=True), trainee
    batch = {
        "input_pixels": torch.rand(2, 3, 32, 32) * 2 - 1,
        "edited_pixels": torch.rand(2, 3, 32, 32) * 2 - 1,
        "instruction": ["make it red", "make it blue"],
    }
    a = fresh.conditioning(batch, CPU)
    for _ in range(2):
        b = cached.conditioning(batch, CPU)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    assert cached.cache is not None and len(cached.cache) == 2
    assert (cached.cache.misses, cached.cache.hits) == (2, 2)
    flipped = dict(batch, input_pixels=batch["input_pixels"].flip(-1))
    cached.conditioning(flipped, CPU)  # another view of the same rows: not served stale latents
    assert len(cached.cache) == 4


# --------------------------------------------------------------------------------------
# Training end to end


def test_kontext_lora_trains_and_loads_in_diffusers_and_the_engine(
    tmp_path: Path, kontext_dir: Path, pairs_dir: Path, fingerprint: Callable
) -> None:
    from diffusers import FluxKontextPipeline

    from engine.editor import Editor
    from engine.request import EditParams, LoraSpec

    before = fingerprint(pairs_dir)
    out = tmp_path / "lora"
    code = main([
        "train", "--data", str(pairs_dir), "--model", str(kontext_dir), "--output", str(out),
        "--max-steps", "2", "--resolution", "32", "--batch-size", "2", "--lora-rank", "4",
        "--lr", "5e-2", "--validate-every", "2", "--validation-count", "1",
        "--validation-steps", "2", "--gradient-checkpointing", "--cache-conditioning",
        "--no-progress",
    ])  # fmt: skip
    assert code == 0
    assert fingerprint(pairs_dir) == before
    weights = out / "pytorch_lora_weights.safetensors"
    tensors = load_file(weights)
    assert tensors and all(k.startswith("transformer.") and ".lora_" in k for k in tensors)
    assert any(".ff.net.0.proj." in k for k in tensors) and any(".proj_mlp." in k for k in tensors)
    card = (out / "README.md").read_text()
    assert "FLUX.1 Kontext" in card and "FluxKontextPipeline" in card and "rank 4" in card
    assert "Conditioning dropout" not in card  # InstructPix2Pix's, not used here
    settings = json.loads((out / "training_config.json").read_text())
    assert settings["family"] == "flux-kontext" and settings["cache_conditioning"] is True
    assert (out / "validation" / "step-0000002.png").is_file()

    image = np.random.default_rng(1).random((1, 32, 32, 3), dtype=np.float32)

    def edit(pipe: Any) -> np.ndarray:
        return pipe(
            image=image, prompt="make it red", height=32, width=32, max_area=32 * 32,
            _auto_resize=False, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images  # fmt: skip

    pipe = FluxKontextPipeline.from_pretrained(kontext_dir)
    pipe.set_progress_bar_config(disable=True)
    plain = edit(pipe)
    pipe.load_lora_weights(str(out))
    assert pipe.get_active_adapters()
    assert np.abs(edit(pipe) - plain).mean() > 1e-4, "the adapter changes nothing in diffusers"

    editor = Editor(str(kontext_dir), device="cpu", dtype="fp32")
    source = Image.new("RGB", (64, 48), (40, 120, 200))
    params = EditParams("make it red", steps=2, resolution=64, seed=1)
    without = editor.edit(source, params)[0]
    lora = EditParams(
        "make it red", steps=2, resolution=64, seed=1, loras=(LoraSpec(str(weights)),)
    )
    with_lora = editor.edit(source, lora)[0]
    assert without.size == with_lora.size == source.size
    assert without.tobytes() != with_lora.tobytes(), "the adapter changes nothing in the engine"


class Crash(RuntimeError):
    pass


def test_kontext_resumed_run_matches_an_uninterrupted_one(
    tmp_path: Path, kontext_dir: Path, pairs_dir: Path
) -> None:
    """Crash after the last step (last checkpoint: step 2), resume: step 3 comes out the same."""
    settings = dict(max_steps=3, checkpoint_every=2)
    whole = train(config(pairs_dir, kontext_dir, tmp_path / "whole", **settings), **QUIET)

    def crash_after_3(step: int, _loss: float) -> None:
        if step == 3:
            raise Crash("simulated crash")

    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        train(config(pairs_dir, kontext_dir, out, **settings), on_step_end=crash_after_3, **QUIET)
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == ["step-0000002"]
    resumed = train(config(pairs_dir, kontext_dir, out, resume=True, **settings), **QUIET)
    assert sorted(resumed.losses) == [3]
    for step in (3,):
        assert resumed.losses[step] == pytest.approx(whole.losses[step], rel=1e-5, abs=1e-6)
    a, b = load_file(whole.weights), load_file(resumed.weights)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert any(float(a[k].abs().max()) > 0 for k in a if "lora_B" in k)  # it did train

    # The quantization of the frozen base is part of the run's identity.
    with pytest.raises(InvalidInput, match="base_quantization"):
        train(
            config(pairs_dir, kontext_dir, out, resume=True, base_quantization="torchao-int8",
                   **dict(settings, max_steps=5)),
            **QUIET,
        )  # fmt: skip


def test_torchao_int8_base_trains_a_lora_on_the_cpu(
    tmp_path: Path, kontext_dir: Path, pairs_dir: Path
) -> None:
    pytest.importorskip("torchao")
    result = train(
        config(
            pairs_dir, kontext_dir, tmp_path / "q", max_steps=2, base_quantization="torchao-int8"
        ),
        **QUIET,
    )
    assert all(np.isfinite(v) for v in result.losses.values())
    tensors = load_file(result.weights)
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if "lora_B" in k)
    assert "base quantized torchao-int8" in (tmp_path / "q" / "README.md").read_text()


def test_refusals_name_the_problem(tmp_path: Path, kontext_dir: Path, pairs_dir: Path) -> None:
    with pytest.raises(InvalidInput, match="base-quantization"):
        train(config(pairs_dir, kontext_dir, tmp_path / "a", base_quantization="int3"), **QUIET)
    with pytest.raises(InvalidInput, match="LoRA only"):
        train(
            config(pairs_dir, kontext_dir, tmp_path / "b", lora_rank=None, full=True,
                   base_quantization="torchao-int8"),
            **QUIET,
        )  # fmt: skip
    with pytest.raises(InvalidInput, match="multiple of 16"):
        train(config(pairs_dir, kontext_dir, tmp_path / "d", resolution=40), **QUIET)
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInput, match=r"bitsandbytes|CUDA"):
            train(
                config(pairs_dir, kontext_dir, tmp_path / "c", base_quantization="bnb-4bit"),
                **QUIET,
            )
