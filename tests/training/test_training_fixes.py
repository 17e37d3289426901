"""The training fixes found in review (issue 11), each pinned by a test that failed before it.

- EMA shadows follow the training device after `--resume` (accelerate loads them on the CPU).
- The engine's "" (null-text) embedding follows text-encoder LoRAs and their strength.
- The InstructPix2Pix loss: sample·scaling targets, unscaled mode conditioning, "" null text,
  zero null image, masks on the right branch, v-prediction; the export holds the EMA weights.
- check-data: decompression bombs and non-UTF-8 metadata are bad rows, not tracebacks.
- Checkpoints: fsync before the rename, a clear full-disk error, `--resume` refusals.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from engine.errors import InvalidInput
from training.cli import main
from training.data import DataError, check_rows, load_pairs
from training.ema import EMA
from training.train_loop import TrainConfig, checkpoint_dirs, train

QUIET = {"report": lambda _msg: None}


def config(data: Path, model: Path, output: Path, **overrides: object) -> TrainConfig:
    settings: dict = dict(
        data=str(data), model=str(model), output=output, resolution=32, batch_size=2,
        max_steps=2, checkpoint_every=0, lr=1e-3, progress=False,
    )  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


# --------------------------------------------------------------------------------------
# 1. EMA after --resume


def devices() -> list[str]:
    # `meta` stands for "not the CPU" on a machine without a GPU: a CPU tensor mixed with a
    # meta tensor fails exactly as one mixed with a CUDA tensor.
    return ["meta", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", devices())
def test_ema_resumed_through_accelerate_keeps_its_shadows_on_the_training_device(
    tmp_path: Path, device: str
) -> None:
    from accelerate import PartialState
    from accelerate.checkpointing import load_custom_state, save_custom_state

    PartialState()  # accelerate's logging needs its state

    saved = EMA([torch.nn.Parameter(torch.zeros(3))], decay=0.9)
    saved.update([torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))])
    save_custom_state(saved, str(tmp_path))  # what accelerate.save_state does with it

    params = [torch.nn.Parameter(torch.zeros(3, device=device))]
    resumed = EMA(params, decay=0.9)
    load_custom_state(resumed, str(tmp_path))  # loads with map_location="cpu"
    assert resumed.shadow[0].device == params[0].device
    assert resumed.shadow[0].dtype == torch.float32
    assert resumed.updates == 1 and resumed.decay == pytest.approx(0.9)
    resumed.update(params)  # the first step after --resume: a device mismatch before the fix
    resumed.swap_into(params)
    resumed.restore(params)
    if device != "meta":
        expected = saved.shadow[0].clone().lerp_(torch.zeros(3), 1 - resumed.current_decay())
        torch.testing.assert_close(resumed.shadow[0].cpu(), expected)


def test_ema_values_survive_a_cpu_round_trip(tmp_path: Path) -> None:
    from accelerate import PartialState
    from accelerate.checkpointing import load_custom_state, save_custom_state

    PartialState()  # accelerate's logging needs its state

    params = [torch.nn.Parameter(torch.randn(4, 2)), torch.nn.Parameter(torch.randn(5))]
    saved = EMA(params, decay=0.99)
    for _ in range(3):
        for p in params:
            p.data.add_(1.0)
        saved.update(params)
    save_custom_state(saved, str(tmp_path))
    resumed = EMA([torch.nn.Parameter(torch.zeros_like(p)) for p in params], decay=0.5)
    load_custom_state(resumed, str(tmp_path))
    assert resumed.updates == 3 and resumed.decay == pytest.approx(0.99)
    for a, b in zip(saved.shadow, resumed.shadow, strict=True):
        torch.testing.assert_close(a, b)


def test_ema_of_another_model_is_refused_by_name() -> None:
    saved = EMA([torch.nn.Parameter(torch.zeros(3))], decay=0.9).state_dict()
    other = EMA([torch.nn.Parameter(torch.zeros(4))], decay=0.9)
    with pytest.raises(ValueError, match="do not match"):
        other.load_state_dict(saved)


# --------------------------------------------------------------------------------------
# 4. check-data: decompression bombs and non-UTF-8 metadata


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header claims `width`×`height`: a decompression bomb's signature."""
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    data = bytearray(path.read_bytes())
    # Signature (8 bytes), then the IHDR chunk: length (4), b"IHDR" (4), width, height, …
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("width", "height", "warnings_filter"),
    [
        (100_000, 100_000, "default"),  # over twice Pillow's limit: Pillow raises
        (10_000, 10_000, "ignore"),  # over the limit: Pillow only warns, then would decode
        (10_000, 10_000, "error"),  # … and with warnings as errors the warning is raised
    ],
)
def test_a_decompression_bomb_is_a_bad_row(
    pairs_dir: Path,
    capsys: pytest.CaptureFixture[str],
    width: int,
    height: int,
    warnings_filter: Any,
) -> None:
    png_claiming(pairs_dir / "2_in.png", width, height)
    with warnings.catch_warnings():
        warnings.simplefilter(warnings_filter, Image.DecompressionBombWarning)
        bad = check_rows(load_pairs(pairs_dir).rows)
        assert [b.where for b in bad] == ["metadata.jsonl line 3"]
        assert "input image too large" in bad[0].problem and "2_in.png" in bad[0].problem

        capsys.readouterr()
        assert main(["check-data", str(pairs_dir)]) == 1
    out = capsys.readouterr().out
    assert "bad row: metadata.jsonl line 3: input image too large" in out
    assert "5 usable rows, 1 bad" in out


def test_a_decompression_bomb_stops_training_cleanly(
    tmp_path: Path, tiny_model_dir: Path, pairs_dir: Path
) -> None:
    png_claiming(pairs_dir / "4_out.png", 100_000, 100_000)
    messages: list[str] = []
    with pytest.raises(DataError, match="--skip-bad"):
        train(config(pairs_dir, tiny_model_dir, tmp_path / "out"), report=messages.append)
    assert any("metadata.jsonl line 5: edited image too large" in m for m in messages)


def test_non_utf8_metadata_lines_are_bad_rows(
    pairs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = (pairs_dir / "metadata.jsonl").read_bytes().splitlines()
    # Line 2 saved in Latin-1 ("é" is the single byte 0xe9), the rest UTF-8 with a BOM.
    lines[1] = lines[1].replace(b"make it red", "make it rouge é".encode("latin-1"))
    (pairs_dir / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")

    pairs = load_pairs(pairs_dir)
    assert len(pairs) == 6
    assert pairs.rows[0].parse_problem is None  # the BOM is not part of the first row
    assert pairs.rows[1].parse_problem is not None
    assert "not UTF-8" in pairs.rows[1].parse_problem and "0xe9" in pairs.rows[1].parse_problem
    bad = check_rows(pairs.rows)
    assert [b.where for b in bad] == ["metadata.jsonl line 2"]

    assert main(["check-data", str(pairs_dir)]) == 1
    out = capsys.readouterr().out
    assert "bad row: metadata.jsonl line 2: not UTF-8" in out and "5 usable rows, 1 bad" in out


def test_a_utf16_metadata_file_is_named_as_such(
    pairs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (pairs_dir / "metadata.jsonl").read_text(encoding="utf-8")
    (pairs_dir / "metadata.jsonl").write_bytes(text.encode("utf-16"))  # Notepad's "Unicode"
    with pytest.raises(DataError, match=r"UTF-16.*UTF-8"):
        load_pairs(pairs_dir)
    assert main(["check-data", str(pairs_dir)]) == 2
    assert "UTF-16" in capsys.readouterr().err


def test_a_non_utf8_prompt_json_in_the_generated_layout_is_a_bad_row(tmp_path: Path) -> None:
    root = tmp_path / "generated"
    for name, prompt in (("0000000", "make it red"), ("0000001", "rendre rouge é")):
        folder = root / name
        folder.mkdir(parents=True)
        encoding = "utf-8" if name == "0000000" else "latin-1"
        (folder / "prompt.json").write_bytes(
            json.dumps({"edit": prompt}, ensure_ascii=False).encode(encoding)
        )
        for side in (0, 1):
            Image.new("RGB", (8, 8)).save(folder / f"7_{side}.jpg")
    (root / "seeds.json").write_text(json.dumps([["0000000", [7]], ["0000001", [7]]]))
    rows = load_pairs(root, split="all").rows
    assert rows[0].parse_problem is None and rows[0].instruction == "make it red"
    assert rows[1].parse_problem is not None and "prompt.json" in rows[1].parse_problem
    (root / "seeds.json").write_bytes(b"\xff\xfe[")
    with pytest.raises(DataError, match=r"seeds\.json"):
        load_pairs(root, split="all")


# --------------------------------------------------------------------------------------
# 5. Checkpoints: durable, a clear full-disk error, and --resume refusals


def test_checkpoint_files_and_folder_are_fsynced_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.checkpoints import write_checkpoint

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the fsynced descriptors")
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(descriptor: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def recording_replace(source: Any, destination: Any) -> None:
        events.append(("replace", f"{os.fspath(source)} -> {os.fspath(destination)}"))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    root = (tmp_path / "out" / "checkpoints").resolve()
    final = write_checkpoint(FakeAccelerator(), root, 1, {"step": 1}, keep=2)

    temporary = root / ".tmp-step-0000001"
    renames = [i for i, e in enumerate(events) if e == ("replace", f"{temporary} -> {final}")]
    assert len(renames) == 1, events
    before, after = events[: renames[0]], events[renames[0] + 1 :]
    synced_before = {path for kind, path in before if kind == "fsync"}
    written = sorted(p.relative_to(final) for p in final.rglob("*") if p.is_file())
    assert len(written) == 4  # weights, optimiser, a file in a subfolder, train_state.json
    for relative in written:
        assert str(temporary / relative) in synced_before, f"{relative} not fsynced"
    assert str(temporary / "sub") in synced_before and str(temporary) in synced_before
    assert ("fsync", str(root)) in after  # the rename itself
    assert ("fsync", str(root.parent)) in before  # the new checkpoints folder's entry


class FakeAccelerator:
    """What write_checkpoint uses of accelerate, with a save_state that can fail."""

    is_main_process = True

    def __init__(self, fail_with: BaseException | None = None) -> None:
        self.fail_with = fail_with

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        (Path(folder) / "sub").mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"w" * 3 * 2**10)
        (Path(folder) / "optimizer.bin").write_bytes(b"adam")
        (Path(folder) / "sub" / "random_states_0.pkl").write_bytes(b"rng")
        if self.fail_with is not None:
            raise self.fail_with


@pytest.mark.parametrize(
    "failure",
    [
        "enospc",  # Python's own writes
        "safetensors",  # safetensors words it "I/O error: No space left on device (os error 28)"
        "torch",  # torch.save says only "unexpected pos …"; the free space tells
    ],
)
def test_a_full_disk_names_the_folder_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    import shutil

    from training import checkpoints
    from training.checkpoints import DiskFull, write_checkpoint

    root = tmp_path / "checkpoints"
    first = write_checkpoint(FakeAccelerator(), root, 1, {"step": 1}, keep=2)
    before = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}

    error: BaseException = {
        "enospc": OSError(errno.ENOSPC, "No space left on device"),
        "safetensors": RuntimeError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        ),
        "torch": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576"),
    }[failure]
    usage = shutil.disk_usage(tmp_path)
    if failure == "torch":  # a nearly full disk at the moment of the failure
        almost_full = usage._replace(free=3 * 2**20)
        monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda _path: almost_full)
    with pytest.raises(DiskFull) as caught:
        write_checkpoint(FakeAccelerator(error), root, 2, {"step": 2}, keep=1)
    message = str(caught.value)
    assert "disk is full" in message and str(root) in message
    free = shutil.disk_usage(tmp_path).free if failure != "torch" else 3 * 2**20
    assert f"{free / 2**30:.1f} GiB free" in message or f"{free / 2**20:.1f} MiB free" in message
    assert f"{first} is intact" in message and "--keep-checkpoints" in message
    assert "each checkpoint takes about 3 KiB" in message  # the previous one's size
    assert [p.name for p in checkpoint_dirs(root)] == ["step-0000001"]
    assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
    assert not list(root.glob(".tmp-*"))  # the partial checkpoint is removed: space is freed


def test_another_write_failure_is_not_called_a_full_disk(tmp_path: Path) -> None:
    from training.checkpoints import write_checkpoint

    root = tmp_path / "checkpoints"
    write_checkpoint(FakeAccelerator(), root, 1, {"step": 1}, keep=2)
    with pytest.raises(PermissionError):
        write_checkpoint(FakeAccelerator(PermissionError(errno.EACCES, "denied")), root, 2, {}, 2)
    assert [p.name for p in checkpoint_dirs(root)] == ["step-0000001"]


def test_training_on_a_full_disk_stops_with_the_message_and_resumes_later(
    tmp_path: Path, tiny_model_dir: Path, pairs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from accelerate import Accelerator

    from training.checkpoints import DiskFull

    real_save = Accelerator.save_state

    def filling_save(self: Accelerator, output_dir: str | None = None, **kwargs: object) -> None:
        real_save(self, output_dir, **kwargs)
        if output_dir and output_dir.endswith("step-0000002"):
            raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    monkeypatch.setattr(Accelerator, "save_state", filling_save)
    with pytest.raises(DiskFull, match="checkpoint of step 2 did not fit"):
        train(config(pairs_dir, tiny_model_dir, out, max_steps=3, checkpoint_every=1), **QUIET)
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == ["step-0000001"]

    monkeypatch.setattr(Accelerator, "save_state", real_save)
    result = train(config(pairs_dir, tiny_model_dir, out, max_steps=2, resume=True), **QUIET)
    assert sorted(result.losses) == [2]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """One short LoRA run (rank 4) whose checkpoint the refusal tests try to resume."""
    from tests.training.conftest import write_pairs

    root = tmp_path_factory.mktemp("resume")
    data = write_pairs(root / "pairs")
    train(config(data, tiny_model_dir, root / "out", max_steps=1, lora_rank=4), **QUIET)
    return data, root / "out"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("model", "the base model was"),
        ("lora_rank", "lora_rank was 4, now 8"),
        ("full", "LoRA (vs --full) was True, now False"),
        ("instruction", "the data rows was"),
        ("fewer_rows", "rows was 6, now 5"),
        ("ema", "ema was False, now True"),  # accelerate cannot load a missing EMA state
    ],
)
def test_resume_refuses_a_changed_run_and_says_why(
    tmp_path: Path,
    tiny_model_dir: Path,
    first_run: tuple[Path, Path],
    fingerprint: Any,
    change: str,
    reason: str,
) -> None:
    import shutil

    data, original = first_run
    out = tmp_path / "out"
    shutil.copytree(original, out)
    pairs = tmp_path / "pairs"
    shutil.copytree(data, pairs)
    model = tiny_model_dir
    overrides: dict[str, Any] = {"lora_rank": 4}
    lines = (pairs / "metadata.jsonl").read_text().splitlines()
    if change == "model":
        model = tmp_path / "other-model"
        shutil.copytree(tiny_model_dir, model)
    elif change == "lora_rank":
        overrides["lora_rank"] = 8
    elif change == "full":
        overrides = {"full": True}
    elif change == "instruction":
        row = json.loads(lines[2])
        row["edit_prompt"] = "make it blue"
        lines[2] = json.dumps(row)
    elif change == "fewer_rows":
        del lines[4]
    elif change == "ema":
        overrides["ema"] = True
    (pairs / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    before = fingerprint(out)
    with pytest.raises(InvalidInput, match="cannot resume") as caught:
        train(config(pairs, model, out, max_steps=2, resume=True, **overrides), **QUIET)
    assert reason in str(caught.value), str(caught.value)
    assert "start a new output folder" in str(caught.value)
    assert fingerprint(out) == before  # the refused run wrote nothing


def test_resume_with_unchanged_settings_continues(
    tmp_path: Path, tiny_model_dir: Path, first_run: tuple[Path, Path]
) -> None:
    """The other side of the refusals: the same data reached through a copied folder resumes."""
    import shutil

    data, original = first_run
    out = tmp_path / "out"
    shutil.copytree(original, out)
    pairs = tmp_path / "elsewhere" / "pairs"
    shutil.copytree(data, pairs)
    result = train(
        config(pairs, tiny_model_dir, out, max_steps=2, resume=True, lora_rank=4), **QUIET
    )
    assert sorted(result.losses) == [2]


# --------------------------------------------------------------------------------------
# 3. The InstructPix2Pix loss, pinned with recording fakes


def fake_latent(pixels: torch.Tensor) -> torch.Tensor:
    """A deterministic 4-channel, 1/8-size "latent" of the pixels."""
    pooled = torch.nn.functional.avg_pool2d(pixels.float(), 8)
    return torch.cat([pooled, -pooled[:, :1]], dim=1)


class FakePosterior:
    def __init__(self, pixels: torch.Tensor, log: list[tuple[str, torch.Tensor, torch.Tensor]]):
        self.pixels, self.log = pixels, log

    def mode(self) -> torch.Tensor:
        value = fake_latent(self.pixels)
        self.log.append(("mode", self.pixels, value))
        return value

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        mean = fake_latent(self.pixels)
        value = mean + 3.0 + torch.randn(mean.shape, generator=generator)  # far from the mode
        self.log.append(("sample", self.pixels, value))
        return value


class FakeVAE(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(scaling_factor=0.3)  # not 1: scaling must show
        self.log: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def encode(self, pixels: torch.Tensor) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(latent_dist=FakePosterior(pixels, self.log))


class RecordingUNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, torch.Tensor]] = []

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> Any:
        from types import SimpleNamespace

        self.calls.append({"sample": sample.clone(), "timestep": timestep, "text": text.clone()})
        return SimpleNamespace(sample=0.5 * sample[:, :4] + 0.1)  # some prediction


class RecordingScheduler:
    """A real DDPM scheduler that remembers what add_noise was given."""

    def __init__(self, prediction_type: str) -> None:
        from diffusers import DDPMScheduler

        self.real = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
        self.config = self.real.config
        self.added: dict[str, torch.Tensor] = {}

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> Any:
        self.added = {"latents": latents.clone(), "noise": noise.clone(), "timesteps": t.clone()}
        return self.real.add_noise(latents, noise, t)

    def get_velocity(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> Any:
        return self.real.get_velocity(latents, noise, t)


@pytest.fixture(scope="module")
def tiny_text() -> tuple[Any, Any]:
    from training.demo_model import build_tiny_components

    parts = build_tiny_components()
    return parts["tokenizer"], parts["text_encoder"].eval()


def encode_texts(tokenizer: Any, encoder: Any, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return encoder(ids)[0]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_uses_the_papers_targets_conditioning_and_dropout(
    tiny_text: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch, prediction_type: str
) -> None:
    from training.objectives import ip2p

    tokenizer, text_encoder = tiny_text
    # Rows: 0 text dropped, 1 both dropped, 2 image dropped, 3 nothing dropped.
    drop_text = torch.tensor([True, True, False, False])
    drop_image = torch.tensor([False, True, True, False])
    asked: list[tuple[int, float]] = []

    def fixed_masks(count: int, probability: float, generator: torch.Generator) -> Any:
        asked.append((count, probability))
        return drop_text, drop_image

    monkeypatch.setattr(ip2p, "conditioning_dropout_masks", fixed_masks)
    instructions = ["make it red", "add a hat", "turn it blue", "make it night"]
    batch = {
        "input_pixels": torch.rand(4, 3, 16, 16) * 2 - 1,
        "edited_pixels": torch.rand(4, 3, 16, 16) * 2 - 1,
        "instruction": instructions,
    }
    null_text = encode_texts(tokenizer, text_encoder, [""])
    vae, unet, scheduler = FakeVAE(), RecordingUNet(), RecordingScheduler(prediction_type)
    loss = ip2p.diffusion_loss(
        batch, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        noise_scheduler=scheduler, null_text=null_text, generator=torch.Generator().manual_seed(0),
        dropout=0.05, device=torch.device("cpu"), weight_dtype=torch.float32,
    )  # fmt: skip
    assert asked == [(4, 0.05)]

    # The VAE: a posterior SAMPLE of the edited image, the MODE of the input image, nothing else.
    used = [(kind, pixels) for kind, pixels, _ in vae.log]
    assert len(used) == 2
    (sample_kind, sampled), (mode_kind, moded) = used
    assert sample_kind == "sample" and torch.equal(sampled, batch["edited_pixels"])
    assert mode_kind == "mode" and torch.equal(moded, batch["input_pixels"])
    sample, mode = vae.log[0][2], vae.log[1][2]

    # Target latents = sample · scaling factor.
    torch.testing.assert_close(scheduler.added["latents"], sample * 0.3)
    noise, timesteps = scheduler.added["noise"], scheduler.added["timesteps"]

    (call,) = unet.calls
    noisy, image = call["sample"][:, :4], call["sample"][:, 4:]
    torch.testing.assert_close(noisy, scheduler.real.add_noise(sample * 0.3, noise, timesteps))
    assert torch.equal(call["timestep"], timesteps)
    # Conditioning = the UNSCALED mode; a dropped image is a zero latent.
    for row, dropped in enumerate(drop_image.tolist()):
        expected = torch.zeros_like(mode[row]) if dropped else mode[row]
        torch.testing.assert_close(image[row], expected)
    assert not torch.allclose(image[3], mode[3] * 0.3)
    # Text: the instruction's embedding, or the embedding of "" (not zeros) when dropped.
    encoded = encode_texts(tokenizer, text_encoder, instructions)
    for row, dropped in enumerate(drop_text.tolist()):
        torch.testing.assert_close(call["text"][row], null_text[0] if dropped else encoded[row])
    assert not torch.allclose(null_text, torch.zeros_like(null_text))
    assert not torch.allclose(null_text[0], encoded[2])

    prediction = 0.5 * call["sample"][:, :4] + 0.1
    if prediction_type == "v_prediction":
        target = scheduler.real.get_velocity(sample * 0.3, noise, timesteps)
        assert not torch.allclose(target, noise)
    else:
        target = noise
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(prediction, target))


def test_the_trainees_null_text_is_what_diffusers_uses_at_inference(
    tiny_model_dir: Path,
) -> None:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from training.objectives.ip2p import InstructPix2PixTrainee

    trainee = InstructPix2PixTrainee(
        str(tiny_model_dir), lora_rank=4, lora_alpha=None, full=False, local_files_only=True
    )
    trainee.prepare(torch.device("cpu"), torch.float32)
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        # With guidance the pipeline encodes [instruction, "", ""]: row 1 is its null text.
        rows = pipe._encode_prompt("make it red", "cpu", 1, True)
    assert trainee.null_text is not None
    torch.testing.assert_close(trainee.null_text[0], rows[1])
    assert not torch.allclose(rows[1], torch.zeros_like(rows[1]))


def test_the_exported_lora_holds_the_ema_weights_not_the_live_ones(
    tmp_path: Path, tiny_model_dir: Path, pairs_dir: Path
) -> None:
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from training.objectives import load_trainee

    out = tmp_path / "out"
    result = train(
        config(pairs_dir, tiny_model_dir, out, max_steps=3, lr=1e-2, lora_rank=4, ema=True),
        **QUIET,
    )
    # The final checkpoint (written just before the export) holds both: the live adapter and
    # the EMA state, whose shadows follow the order of the trainable parameters.
    final = checkpoint_dirs(out / "checkpoints")[-1]
    live = load_file(final / "denoiser_lora.safetensors")
    ema_state = torch.load(final / "custom_checkpoint_0.pkl", weights_only=False)
    assert ema_state["updates"] == 3
    trainee = load_trainee(
        str(tiny_model_dir), lora_rank=4, lora_alpha=None, full=False, local_files_only=True
    )
    names = [
        name.replace(".default", "")
        for name, p in trainee.denoiser.named_parameters()
        if p.requires_grad
    ]
    shadows = dict(zip(names, ema_state["shadow"], strict=True))
    assert shadows.keys() == live.keys()

    # What a user gets: the exported file loaded through diffusers.
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(str(result.weights), adapter_name="trained")
    exported = get_peft_model_state_dict(pipe.unet, adapter_name="trained")
    assert exported.keys() == live.keys()
    largest_gap = 0.0
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, shadows[name], rtol=1e-5, atol=1e-6)
        largest_gap = max(largest_gap, (tensor - live[name]).abs().max().item())
    assert largest_gap > 1e-4, "EMA and live weights coincide: the check would prove nothing"


# --------------------------------------------------------------------------------------
# 2. The engine's null text follows text-encoder LoRAs


def save_text_encoder_lora(tiny_model_dir: Path, folder: Path) -> Path:
    """A LoRA with text-encoder layers only (peft on CLIP), in diffusers' LoRA format."""
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    inject_adapter_in_model(
        LoraConfig(
            r=4,
            lora_alpha=4,
            init_lora_weights=False,  # random A and B: the adapter changes the embedding
            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
        ),
        pipe.text_encoder,
    )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder))
    StableDiffusionInstructPix2PixPipeline.save_lora_weights(
        folder, text_encoder_lora_layers=layers, safe_serialization=True
    )
    return folder / "pytorch_lora_weights.safetensors"


def test_the_null_text_follows_a_text_encoder_lora_and_its_strength(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from engine.editor import Editor
    from engine.request import EditParams, LoraSpec

    lora = save_text_encoder_lora(tiny_model_dir, tmp_path / "te-lora")
    editor = Editor(str(tiny_model_dir), device="cpu", dtype="fp32")
    pipe = editor.pipe
    used: list[torch.Tensor] = []
    pipe.unet.register_forward_pre_hook(
        lambda _m, _args, kwargs: used.append(kwargs["encoder_hidden_states"].detach().clone()),
        with_kwargs=True,
    )

    def null_text_of_an_edit(loras: tuple[LoraSpec, ...]) -> torch.Tensor:
        used.clear()
        params = EditParams(
            "make it red", steps=1, resolution=64, seed=1, loras=loras,
            options={"text_guidance": 7.5, "image_guidance": 1.5},
        )  # fmt: skip
        editor.edit(Image.new("RGB", (64, 64), (40, 120, 200)), params)
        # Rows per step: [instruction, "", ""] (three-way guidance); take the first "" row.
        assert used and used[0].shape[0] == 3
        torch.testing.assert_close(used[0][1], used[0][2])
        return used[0][1]

    def fresh_null_text() -> torch.Tensor:
        """The embedding of "" by the text encoder as it is now (adapters and strength)."""
        ids = pipe.tokenizer(
            [""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        with torch.no_grad():
            return pipe.text_encoder(ids)[0][0]

    plain = null_text_of_an_edit(())
    torch.testing.assert_close(plain, fresh_null_text())
    full = null_text_of_an_edit((LoraSpec(str(lora), 1.0),))
    torch.testing.assert_close(full, fresh_null_text())
    half = null_text_of_an_edit((LoraSpec(str(lora), 0.5),))
    torch.testing.assert_close(half, fresh_null_text())
    again = null_text_of_an_edit(())
    torch.testing.assert_close(again, plain)
    # The adapter and its strength really change the embedding: the checks above have teeth.
    assert not torch.allclose(full, plain, atol=1e-4)
    assert not torch.allclose(half, full, atol=1e-4)
