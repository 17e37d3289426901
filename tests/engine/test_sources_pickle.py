"""No pickle without --allow-pickle: folder models load from .safetensors only, a folder whose
weights are .bin files only is refused naming the flag, and pickle needs a torch whose
weights-only loading is safe (issue 12)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.errors import UnsafeModelFile
from engine.models import load_pipeline
from engine.sources import (
    ModelSource,
    check_pickle_allowed,
    current_policy,
    load_policy,
    pickle_only_components,
    pretrained,
    require_safe_torch_load,
)
from tests.tiny_models.sd import build_tiny_pipeline


@pytest.fixture(scope="module")
def pickled_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny InstructPix2Pix saved the old way: .bin (pickle) weights only."""
    folder = tmp_path_factory.mktemp("pickled") / "tiny-ip2p-bin"
    build_tiny_pipeline().save_pretrained(folder, safe_serialization=False)
    for weights in folder.glob("*/model.safetensors"):  # transformers 5 always writes these
        torch.save(load_file(weights), weights.with_name("pytorch_model.bin"))
        weights.unlink()
    assert not list(folder.glob("*/*.safetensors")) and list(folder.glob("*/*.bin"))
    return folder


def test_a_pickle_only_folder_is_refused_naming_the_flag(pickled_model_dir: Path) -> None:
    assert set(pickle_only_components(pickled_model_dir)) >= {"unet", "vae", "text_encoder"}
    with pytest.raises(UnsafeModelFile) as err:
        load_pipeline(str(pickled_model_dir))
    assert "--allow-pickle" in err.value.message and ".safetensors" in err.value.message
    assert err.value.field == "model"


def test_a_pickle_only_folder_loads_when_allowed(pickled_model_dir: Path) -> None:
    pipe = load_pipeline(str(pickled_model_dir), allow_pickle=True)
    assert pipe.unet is not None
    assert current_policy().allow_pickle is False  # the policy was only for that load


def test_safetensors_folders_load_with_use_safetensors(tiny_model_dir: Path) -> None:
    """Even where .bin files sit beside the .safetensors ones, only the latter are read."""
    calls: list[dict] = []

    class Recorder:
        @classmethod
        def from_pretrained(cls, location: str, **kwargs: object) -> str:
            calls.append(kwargs)
            return location

    pretrained(Recorder, ModelSource("folder", str(tiny_model_dir)))
    with load_policy(allow_pickle=True):
        pretrained(Recorder, ModelSource("folder", str(tiny_model_dir)))
    assert calls[0]["use_safetensors"] is True and "use_safetensors" not in calls[1]


def test_pickle_needs_a_torch_with_safe_weights_only_loading(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    require_safe_torch_load()  # the torch installed here is recent enough
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"pickle")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    with pytest.raises(UnsafeModelFile, match=r"torch 2\.6 or newer"):
        require_safe_torch_load()
    with pytest.raises(UnsafeModelFile, match=r"torch 2\.6"):
        check_pickle_allowed(checkpoint, allow_pickle=True)
    with pytest.raises(UnsafeModelFile, match="--allow-pickle"):
        check_pickle_allowed(checkpoint, allow_pickle=False)
    monkeypatch.setattr(torch, "__version__", "2.6.0")
    check_pickle_allowed(checkpoint, allow_pickle=True)


def test_the_package_requires_such_a_torch() -> None:
    import re

    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8")
    lower = re.search(r'^\s*"torch>=(\d+)\.(\d+)', pyproject, re.MULTILINE)
    assert lower is not None and (int(lower[1]), int(lower[2])) >= (2, 6)
