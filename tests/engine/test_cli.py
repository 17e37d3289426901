"""`instruct-edit edit`: results on disk, and one-line errors (no traceback) for bad input."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.cli import main, output_paths, parse_lora


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 70, 4), dtype=np.uint8), "RGBA").save(path)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_edit_writes_variants_of_the_input_size(tmp_path: Path, picture: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "out.png"
    code = main(["edit", str(picture), "-i", "make it red", "-o", str(out), "--model", str(tiny_model_dir),
                 "--steps", "2", "--variants", "2", "--resolution", "64", "--quiet", "--seed", "4",
                 "--dtype", "fp32"])
    assert code == 0
    first, second = (Image.open(p) for p in output_paths(out, 2))
    assert first.size == second.size == (70, 45) and first.mode == "RGBA"
    # variant 1 is seed 5 run alone
    single = tmp_path / "single.png"
    main(["edit", str(picture), "-i", "make it red", "-o", str(single), "--model", str(tiny_model_dir),
          "--steps", "2", "--resolution", "64", "--quiet", "--seed", "5", "--dtype", "fp32"])
    diff = np.abs(np.asarray(Image.open(single), dtype=int) - np.asarray(second, dtype=int))
    assert diff.max() <= 1


def test_output_names_and_lora_syntax() -> None:
    assert output_paths(Path("a/out.png"), 2) == [Path("a/out-0.png"), Path("a/out-1.png")]
    assert parse_lora("style.safetensors:0.5") == ("style.safetensors", 0.5)
    assert parse_lora("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", 1.0)


def bad_inputs(tmp_path: Path, picture: Path, model: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    zero = tmp_path / "zero.png"  # a PNG header that claims a 0×5 image
    zero.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x00\x00\x00\x00\x05\x08\x02\x00\x00\x00\x00\x00\x00\x00")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    out = str(tmp_path / "o.png")
    m = ["--model", str(model)]
    return {
        "missing": ([str(tmp_path / "nope.png"), "-i", "x", "-o", out, *m], "does not exist"),
        "empty file": ([str(empty), "-i", "x", "-o", out, *m], "is an empty file"),
        "not an image": ([str(text), "-i", "x", "-o", out, *m], "is not a readable image"),
        "0×N": ([str(zero), "-i", "x", "-o", out, *m], "is not a readable image"),
        "unknown model": ([str(picture), "-i", "x", "-o", out, "--model", "nobody/nothing"], "not in the local"),
        "unwritable": ([str(picture), "-i", "x", "-o", str(locked / "o.png"), *m], "not writable"),
        "no folder": ([str(picture), "-i", "x", "-o", str(tmp_path / "no/o.png"), *m], "does not exist"),
        "exists": ([str(picture), "-i", "x", "-o", str(picture), *m], "already exists"),
        "bad steps": ([str(picture), "-i", "x", "-o", out, "--steps", "0", *m], "steps must be"),
        "pickle": ([str(picture), "-i", "x", "-o", out, "--model", str(tmp_path / "m.ckpt")], "arbitrary code"),
        "foreign flag": ([str(picture), "-i", "x", "-o", out, "--guidance", "2.5", *m],
                         "--guidance is not a parameter of InstructPix2Pix models; they take "
                         "--text-guidance, --image-guidance, --scheduler"),
        "foreign alias": ([str(picture), "-i", "x", "-o", out, "--true-cfg", "3", *m],
                          "--true-cfg-scale is not a parameter of InstructPix2Pix"),
        "out of range": ([str(picture), "-i", "x", "-o", out, "--text-guidance", "40", *m],
                         "text_guidance must be a number from 0.0 to 30.0"),
        "bad plan": ([str(picture), "-i", "x", "-o", out, "--family", "nope", *m], "not available"),
    }


def test_bad_input_gives_one_line_and_nonzero_exit(
    tmp_path: Path, picture: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "m.ckpt").write_bytes(b"pickle")
    for name, (args, expected) in bad_inputs(tmp_path, picture, tiny_model_dir).items():
        if name == "unwritable" and os.geteuid() == 0:
            continue  # root writes anywhere; test_unwritable_output_message covers it
        code = main(["edit", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, name
        assert err and err[-1].startswith("error: ") and expected in err[-1], (name, err)
        assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "o.png").exists()


def test_unwritable_output_message() -> None:
    from engine.cli import _check_output
    from engine.errors import InvalidInput

    with pytest.raises(InvalidInput, match="not writable"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "access", lambda *a: False)
        _check_output([Path("/tmp/x.png")], overwrite=True)


def test_process_exit_code_and_no_traceback(tmp_path: Path) -> None:
    result = run_cli("edit", str(tmp_path / "missing.png"), "-i", "x", "-o", str(tmp_path / "o.png"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: input") and "Traceback" not in result.stderr


def test_help_has_examples_and_every_familys_flags() -> None:
    result = run_cli("edit", "--help")
    assert result.returncode == 0 and "examples:" in result.stdout and "--image-guidance" in result.stdout
    from engine.families import FAMILIES

    for flag, family in (("--guidance", "flux-kontext"), ("--true-cfg", "qwen-image-edit"),
                         ("--negative-prompt", "qwen-image-edit")):
        if family in FAMILIES:
            assert flag in result.stdout, flag
    for flag in ("--memory-plan", "--quantization", "--family"):
        assert flag in result.stdout
    assert "diffusers" not in run_cli_imports()  # parsing the flags does not load diffusers


def run_cli_imports() -> str:
    code = "import sys, engine.cli; engine.cli.build_parser(); print(' '.join(sorted(sys.modules)))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout


def test_family_flags_reach_the_editor_as_options(tmp_path: Path, picture: Path, tiny_model_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.editor

    seen: dict = {}

    class FakeEditor:  # records what the CLI hands over; the real edit is tested above
        def __init__(self, model, **kwargs) -> None:
            seen["model"], seen["kwargs"] = model, kwargs

        def resolve(self, params):
            return engine.editor.ResolvedEdit(steps=params.steps or 20, resolution=512, options={})

        def edit(self, image, params, mask=None, **kwargs):
            seen["params"] = params
            return [image]

    monkeypatch.setattr(engine.editor, "Editor", FakeEditor)
    code = main(["edit", str(picture), "-i", "make it red", "-o", str(tmp_path / "o.png"),
                 "--model", str(tiny_model_dir), "--image-guidance", "1.0", "--text-guidance", "3",
                 "--scheduler", "dpm++", "--memory-plan", "offload-text", "--quiet"])
    assert code == 0
    assert seen["params"].options == {"text_guidance": 3.0, "image_guidance": 1.0, "scheduler": "dpm++"}
    assert seen["params"].steps is None and seen["params"].resolution is None  # the model's defaults
    assert seen["kwargs"]["family"].id == "sd-ip2p" and seen["kwargs"]["memory_plan"] == "offload-text"


def test_single_file_checkpoint_with_its_config(tmp_path: Path, picture: Path, tiny_model_dir: Path) -> None:
    from tests.tiny_models.ldm import save_as_ldm_single_file
    from tests.tiny_models.sd import build_tiny_pipeline

    checkpoint = save_as_ldm_single_file(build_tiny_pipeline(), tmp_path / "tiny.safetensors")
    out = tmp_path / "single.png"
    code = main(["edit", str(picture), "-i", "make it red", "-o", str(out), "--model", str(checkpoint),
                 "--model-config", str(tiny_model_dir), "--steps", "1", "--resolution", "64", "--quiet"])
    assert code == 0 and Image.open(out).size == (70, 45)
