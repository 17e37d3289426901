"""A command-line run shows the engine's own lines only: no third-party notices around the one
`error:` line, no traceback unless --debug (issue 12)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import engine.cli
from engine.cli import main


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env},
    )


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    Image.new("RGB", (32, 24), (200, 40, 10)).save(path)
    return path


def test_a_failed_edit_prints_one_error_line_and_nothing_else(tmp_path: Path, picture: Path):
    # The model is looked up after the families (diffusers, transformers, torchao) are
    # imported: the point where their notices used to appear.
    args = ("edit", str(picture), "-i", "x", "-o", str(tmp_path / "o.png"))
    done = run_cli(*args, "--model", "nobody/nothing", "--device", "cpu")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model 'nobody/nothing'"), done.stderr


def test_a_successful_quiet_edit_prints_only_the_written_file(
    tmp_path: Path, picture: Path, tiny_model_dir: Path
):
    out = tmp_path / "o.png"
    done = run_cli(
        "edit", str(picture), "-i", "x", "-o", str(out), "--model", str(tiny_model_dir),
        "--steps", "1", "--resolution", "64", "--device", "cpu", "--dtype", "fp32", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out) and done.stderr == ""


def test_an_unexpected_failure_is_one_line_unless_debug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], picture: Path
):
    def broken(_args: object) -> int:
        raise RuntimeError("the disk caught fire\nsecond line")

    monkeypatch.setattr(engine.cli, "run_edit", broken)
    args = ["edit", str(picture), "-i", "x", "-o", "o.png"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: unexpected RuntimeError: the disk caught fire (run again with --debug for the "
        "details, and please report it)"
    ]
    with pytest.raises(RuntimeError, match="disk caught fire"):
        main(["--debug", *args])
    monkeypatch.setenv("INSTRUCT_EDIT_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(args)
