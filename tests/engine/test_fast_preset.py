"""The "fast" preset of the InstructPix2Pix models: LCM-LoRA from the hub cache, the LCM
scheduler, 4 steps and s_I = 1 (two UNet rows instead of three). Wiring tested on the tiny
model with an LCM-style LoRA made for it; the speed is in benchmarks/bench_cpu_runtimes.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.editor import Editor
from engine.families import catalogue_entry
from engine.request import EditParams
from tests.tiny_models.sd import build_tiny_pipeline

REPO = "latent-consistency/lcm-lora-sdv1-5"


def _fake_hub_lora(cache: Path, unet: torch.nn.Module) -> Path:
    """An LCM-style LoRA for the tiny UNet, laid out as the hub cache keeps a download."""
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / ("0" * 40)
    StableDiffusionInstructPix2PixPipeline.save_lora_weights(
        snapshot, unet_lora_layers=get_peft_model_state_dict(unet)
    )
    refs = snapshot.parent.parent / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("0" * 40)
    return snapshot / "pytorch_lora_weights.safetensors"


def test_fast_preset_in_the_catalogue() -> None:
    for model in ("timbrooks/instruct-pix2pix", "osunlp/InstructPix2Pix-MagicBrush"):
        entry = catalogue_entry(model)
        assert entry is not None
        preset = next(p for p in entry["presets"] if p["id"] == "fast")
        assert preset["steps"] == 4
        assert preset["options"]["image_guidance"] == 1.0
        assert preset["options"]["scheduler"] == "lcm"
        assert preset["loras"][0]["repo"] == REPO


def test_fast_preset_runs_lcm_lora_with_two_rows_and_four_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _fake_hub_lora(tmp_path / "hub", build_tiny_pipeline(seed=0).unet)

    editor = Editor.from_pipeline(
        build_tiny_pipeline(seed=0), model="timbrooks/instruct-pix2pix", device="cpu", dtype="fp32"
    )
    calls: list[tuple[int, str]] = []
    unet_forward = editor.pipe.unet.forward

    def counting_forward(sample: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls.append((sample.shape[0], type(scheduler_seen[-1]).__name__))
        return unet_forward(sample, *args, **kwargs)

    scheduler_seen: list[object] = []
    make_scheduler = editor.family.make_scheduler

    def spy_scheduler(pipe: object, name: str) -> object:
        scheduler_seen.append(make_scheduler(pipe, name))
        return scheduler_seen[-1]

    monkeypatch.setattr(editor.pipe.unet, "forward", counting_forward)
    monkeypatch.setattr(editor.family, "make_scheduler", spy_scheduler)
    image = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)

    fast = editor.edit_working_size(image, EditParams("make it red", seed=1, preset="fast"))[0]
    assert calls == [(2, "LCMScheduler")] * 4  # 4 steps, e_c and e_i rows only (s_I = 1)

    # The same settings without the LoRA give another image: the adapter is really applied.
    calls.clear()
    plain = editor.edit_working_size(
        image,
        EditParams("make it red", seed=1, steps=4,
                   options={"text_guidance": 1.5, "image_guidance": 1.0, "scheduler": "lcm"}),
    )[0]  # fmt: skip
    assert len(calls) == 4
    assert np.abs(fast - plain).mean() > 1e-3
