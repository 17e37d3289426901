"""The training loop: outputs, refusal to overwrite, bad data, exact resume, atomic checkpoints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.errors import InvalidInput
from training.cli import main
from training.data import DataError
from training.train_loop import EMA, TrainConfig, checkpoint_dirs, train

QUIET = {"report": lambda _msg: None}


def config(data: Path, model: Path, output: Path, **overrides: object) -> TrainConfig:
    settings: dict = dict(
        data=str(data), model=str(model), output=output, resolution=32, batch_size=2,
        max_steps=4, checkpoint_every=2, lr=1e-3, progress=False,
    )  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


class Crash(RuntimeError):
    pass


def crash_after(step: int) -> Callable[[int, float], None]:
    def hook(done: int, _loss: float) -> None:
        if done == step:
            raise Crash(f"simulated crash after step {done}")

    return hook


def test_lora_training_writes_a_loadable_adapter_and_a_model_card(
    tmp_path: Path, tiny_model_dir: Path, pairs_dir: Path, fingerprint: Callable
) -> None:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    before = fingerprint(pairs_dir)
    out = tmp_path / "lora"
    code = main([
        "train", "--data", str(pairs_dir), "--model", str(tiny_model_dir), "--output", str(out),
        "--max-steps", "2", "--resolution", "32", "--batch-size", "2", "--lora-rank", "4",
        "--lr", "1e-2", "--validate-every", "2", "--validation-count", "2",
        "--validation-steps", "2", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    assert fingerprint(pairs_dir) == before  # the data folder is never written
    weights = out / "pytorch_lora_weights.safetensors"
    tensors = load_file(weights)
    assert tensors and all(k.startswith("unet.") and ".lora" in k for k in tensors)
    assert any(".to_out.0." in k for k in tensors) and any(".to_q." in k for k in tensors)
    card = (out / "README.md").read_text()
    assert str(tiny_model_dir) in card and "Steps: 2" in card and "rank 4" in card
    assert json.loads((out / "training_config.json").read_text())["lora_rank"] == 4
    assert (out / "validation" / "step-0000002.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*"))

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    sample, text = torch.randn(1, 8, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        plain = pipe.unet(sample, 10, text).sample
        pipe.load_lora_weights(str(weights))
        adapted = pipe.unet(sample, 10, text).sample
    assert pipe.get_active_adapters()
    assert not torch.allclose(plain, adapted), "the loaded adapter changes nothing"


def test_engine_editor_uses_the_trained_lora(
    tmp_path: Path, tiny_model_dir: Path, pairs_dir: Path
) -> None:
    from PIL import Image

    from engine.editor import Editor
    from engine.request import EditParams, LoraSpec

    result = train(
        config(pairs_dir, tiny_model_dir, tmp_path / "out", max_steps=2, lr=5e-2), **QUIET
    )
    try:
        editor = Editor(str(tiny_model_dir), device="cpu", dtype="fp32")
    except NotImplementedError:
        pytest.skip("engine.editor.Editor is not implemented yet")
    image = Image.new("RGB", (64, 64), (40, 120, 200))
    params = EditParams("make it red", steps=2, resolution=64, seed=1)
    plain = editor.edit(image, params)[0]
    with_lora = editor.edit(
        image,
        EditParams(
            "make it red", steps=2, resolution=64, seed=1, loras=(LoraSpec(str(result.weights)),)
        ),
    )[0]
    assert plain.size == with_lora.size == image.size
    assert plain.tobytes() != with_lora.tobytes()


def test_refuses_to_overwrite_without_resume_or_overwrite(
    tmp_path: Path, tiny_model_dir: Path, pairs_dir: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    with pytest.raises(InvalidInput, match="--resume"):
        train(config(pairs_dir, tiny_model_dir, out), **QUIET)
    assert (out / "mine.txt").read_text() == "the user's"
    assert (
        main(
            [
                "train",
                "--data",
                str(pairs_dir),
                "--model",
                str(tiny_model_dir),
                "--output",
                str(out),
            ]
        )
        == 2
    )


def test_bad_rows_stop_before_training_unless_skipped(
    tmp_path: Path, tiny_model_dir: Path, pairs_dir: Path
) -> None:
    (pairs_dir / "1_in.png").unlink()
    messages: list[str] = []
    with pytest.raises(DataError, match="--skip-bad"):
        train(config(pairs_dir, tiny_model_dir, tmp_path / "a"), report=messages.append)
    assert any("metadata.jsonl line 2: input image not found" in m for m in messages)
    assert not (tmp_path / "a" / "checkpoints").exists()
    result = train(
        config(pairs_dir, tiny_model_dir, tmp_path / "b", max_steps=1, skip_bad=True), **QUIET
    )
    assert [b.where for b in result.skipped_rows] == ["metadata.jsonl line 2"]
    assert "1 bad rows skipped" in (tmp_path / "b" / "README.md").read_text()


def test_killed_and_resumed_run_matches_an_uninterrupted_one(
    tmp_path: Path, tiny_model_dir: Path, pairs_dir: Path
) -> None:
    """Crash after step 3 (last checkpoint: step 2), resume: steps 3–4 must come out the same."""
    settings = dict(max_steps=4, grad_accum=2, ema=True, dataloader_workers=0)
    whole = train(config(pairs_dir, tiny_model_dir, tmp_path / "whole", **settings), **QUIET)

    out = tmp_path / "crashed"
    with pytest.raises(Crash):
        train(
            config(pairs_dir, tiny_model_dir, out, **settings), on_step_end=crash_after(3), **QUIET
        )
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == ["step-0000002"]
    resumed = train(config(pairs_dir, tiny_model_dir, out, resume=True, **settings), **QUIET)

    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(whole.losses[step], rel=1e-5, abs=1e-6)
    a, b = load_file(whole.weights), load_file(resumed.weights)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # The EMA (what is exported) moved away from the random LoRA init, so the check has teeth.
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora.up" in k)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(
    tmp_path: Path, tiny_model_dir: Path, pairs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from accelerate import Accelerator

    real_save = Accelerator.save_state

    def dying_save(self: Accelerator, output_dir: str | None = None, **kwargs: object) -> None:
        if output_dir and output_dir.endswith("step-0000004"):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "optimizer.bin").write_bytes(b"half written")
            raise OSError("disk full (simulated)")
        real_save(self, output_dir, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(Accelerator, "save_state", dying_save)
    with pytest.raises(OSError, match="disk full"):
        train(config(pairs_dir, tiny_model_dir, out, max_steps=6), **QUIET)
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == ["step-0000002"]
    assert (
        json.loads((out / "checkpoints" / "step-0000002" / "train_state.json").read_text())["step"]
        == 2
    )

    monkeypatch.setattr(Accelerator, "save_state", real_save)
    messages: list[str] = []
    result = train(
        config(pairs_dir, tiny_model_dir, out, max_steps=3, resume=True), report=messages.append
    )
    assert any("step 2" in m for m in messages) and sorted(result.losses) == [3]
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the torn checkpoint is gone


def test_resume_refuses_settings_that_change_the_data_order(
    tmp_path: Path, tiny_model_dir: Path, pairs_dir: Path
) -> None:
    out = tmp_path / "out"
    train(config(pairs_dir, tiny_model_dir, out, max_steps=2), **QUIET)
    with pytest.raises(InvalidInput, match="batch_size was 2, now 3"):
        train(
            config(pairs_dir, tiny_model_dir, out, max_steps=4, batch_size=3, resume=True), **QUIET
        )


def test_full_training_from_a_text_to_image_base(tmp_path: Path, pairs_dir: Path) -> None:
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline

    from tests.tiny_models.sd import build_tiny_components

    parts = build_tiny_components(in_channels=4)
    t2i = StableDiffusionPipeline(**parts, requires_safety_checker=False)
    t2i.save_pretrained(tmp_path / "sd")
    with pytest.raises(InvalidInput, match="--full"):
        train(config(pairs_dir, tmp_path / "sd", tmp_path / "lora", lora_rank=4), **QUIET)
    result = train(config(pairs_dir, tmp_path / "sd", tmp_path / "full", max_steps=1), **QUIET)
    assert result.weights == tmp_path / "full"
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tmp_path / "full")
    assert pipe.unet.config.in_channels == 8
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert "full UNet" in (tmp_path / "full" / "README.md").read_text()


def test_8bit_adam_without_bitsandbytes_is_a_clear_error(
    tmp_path: Path, tiny_model_dir: Path, pairs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(InvalidInput, match="bitsandbytes"):
        train(config(pairs_dir, tiny_model_dir, tmp_path / "o", use_8bit_adam=True), **QUIET)


def test_ema_follows_the_papers_warm_up() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    ema = EMA([param], decay=0.9999)
    expected = 0.0
    for n in range(1, 6):
        param.data.fill_(float(n))
        ema.update([param])
        decay = min(0.9999, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * n
        assert ema.shadow[0].item() == pytest.approx(expected)
    assert EMA([param], decay=0.5).current_decay() == pytest.approx(0.1)  # n=0: (1+0)/(10+0)


def test_only_complete_checkpoints_count(tmp_path: Path) -> None:
    # checkpoint_dirs ignores folders that are not complete checkpoints.
    root = tmp_path / "checkpoints"
    (root / "step-0000005").mkdir(parents=True)
    (root / "step-0000003").mkdir()
    (root / "step-0000003" / "train_state.json").write_text("{}")
    (root / "notes").mkdir()
    assert [p.name for p in checkpoint_dirs(root)] == ["step-0000003"]
    shutil.rmtree(root)
    assert checkpoint_dirs(root) == []


def test_a_sigkilled_training_process_resumes_to_the_same_result(
    tmp_path: Path, tiny_model_dir: Path, pairs_dir: Path
) -> None:
    """The real thing: `instruct-edit-train train` in its own process, killed with SIGKILL."""
    import os
    import signal
    import subprocess
    import sys
    import time

    steps = 10
    whole = train(
        config(pairs_dir, tiny_model_dir, tmp_path / "whole", max_steps=steps, checkpoint_every=1),
        **QUIET,
    )

    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "training.cli", "train", "--data", str(pairs_dir),
         "--model", str(tiny_model_dir), "--output", str(out), "--resolution", "32",
         "--batch-size", "2", "--lr", "1e-3", "--max-steps", "100000", "--checkpoint-every", "1",
         "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not checkpoint_dirs(out / "checkpoints"):
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 2 minutes"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    last = int(checkpoint_dirs(out / "checkpoints")[-1].name.split("-")[1])
    assert 1 <= last < steps, f"the process got to step {last} before it was killed"

    resumed = train(
        config(pairs_dir, tiny_model_dir, out, max_steps=steps, checkpoint_every=1, resume=True),
        **QUIET,
    )
    assert min(resumed.losses) == last + 1
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(whole.losses[step], rel=1e-5, abs=1e-6)
    a, b = load_file(whole.weights), load_file(resumed.weights)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_a_stop_request_checkpoints_that_step_and_resume_continues_there(
    tmp_path: Path, tiny_model_dir: Path, pairs_dir: Path
) -> None:
    from training.train_loop import StopTraining

    def stop_after_three(done: int, _loss: float) -> None:
        if done == 3:
            raise StopTraining()

    out = tmp_path / "run"
    # checkpoint_every 2: without the stop's own checkpoint the last one would be step 2.
    with pytest.raises(StopTraining):
        train(config(pairs_dir, tiny_model_dir, out, max_steps=6), on_step_end=stop_after_three,
              **QUIET)  # fmt: skip
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")][-1] == "step-0000003"
    steps: list[int] = []
    result = train(
        config(pairs_dir, tiny_model_dir, out, max_steps=4, resume=True),
        on_step_end=lambda done, _loss: steps.append(done),
        **QUIET,
    )
    assert steps == [4] and result.step == 4


def test_holdout_pairs_are_not_trained_on_and_validated_beside_their_own_after(
    tmp_path: Path, tiny_model_dir: Path, pairs_dir: Path
) -> None:
    from PIL import Image

    from training.data import load_pairs

    rows = len(load_pairs(str(pairs_dir)))
    out = tmp_path / "run"
    train(config(pairs_dir, tiny_model_dir, out, max_steps=2, holdout=1, validate_every=2,
                 validation_steps=2), **QUIET)  # fmt: skip
    state = json.loads((checkpoint_dirs(out / "checkpoints")[-1] / "train_state.json").read_text())
    assert state["order"]["rows"] == rows - 1  # the held-out pair is not in the training data
    with Image.open(out / "validation" / "step-0000002.png") as grid:
        # one row (the held-out pair): before | the model's after | the pair's own after
        assert grid.size == (3 * 32, 32 + 14)
    with pytest.raises(DataError, match="leaves no rows"):
        train(config(pairs_dir, tiny_model_dir, tmp_path / "all", holdout=rows), **QUIET)
