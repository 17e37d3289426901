"""Checkpoints: written to a temporary folder, then renamed (a crash leaves the last one intact).

Also the output-folder rules (never overwrite a run without --resume/--overwrite) and the
accelerate hooks that keep LoRA checkpoints small.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput

CHECKPOINT_PREFIX = "step-"
# The adapter's file inside a checkpoint; older checkpoints named it after the UNet.
LORA_CHECKPOINT_FILES = ("denoiser_lora.safetensors", "unet_lora.safetensors")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is complete once it has train_state.json)."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith(CHECKPOINT_PREFIX)
        and (p / "train_state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def write_checkpoint(
    accelerator: Any, root: Path, step: int, state: dict[str, Any], keep: int
) -> Path:
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    temporary = root / f".tmp-{CHECKPOINT_PREFIX}{step:07d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    if accelerator.is_main_process:
        with open(temporary / "train_state.json", "w", encoding="utf-8") as out:
            json.dump(state, out, indent=2)
            out.flush()
            os.fsync(out.fileno())
        if final.exists():  # only when the same step is saved twice; keep the old until replaced
            old = root / f".old-{final.name}"
            os.replace(final, old)
            os.replace(temporary, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, final)
        for stale in checkpoint_dirs(root)[: -max(1, keep)]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def prepare_output(config: Any) -> Path | None:
    """Refuse to overwrite; return the checkpoint to resume from (if resuming and one exists)."""
    output = Path(config.output)
    checkpoints = output / "checkpoints"
    occupied = output.exists() and any(output.iterdir())
    if output.exists() and not output.is_dir():
        raise InvalidInput(f"output {output} is a file; give a folder", field="output")
    if occupied and not (config.resume or config.overwrite):
        raise InvalidInput(
            f"output folder {output} already exists and is not empty; pass --resume to continue "
            "its training or --overwrite to replace it (or choose another folder)",
            field="output",
        )
    if checkpoints.is_dir():
        # Leftovers of a checkpoint that was being written when a run died: never complete.
        for partial in checkpoints.glob(f".tmp-{CHECKPOINT_PREFIX}*"):
            shutil.rmtree(partial, ignore_errors=True)
    if config.resume:
        found = checkpoint_dirs(checkpoints)
        return found[-1] if found else None
    if config.overwrite and checkpoints.is_dir():
        shutil.rmtree(checkpoints)  # our own folder: the old run's checkpoints would clash
    return None


def save_lora_in_checkpoints(accelerator: Any) -> None:
    """Keep LoRA checkpoints small: save only the adapter, not a copy of the whole base network."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            for model in models:
                state = get_peft_model_state_dict(accelerator.unwrap_model(model))
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in state.items()},
                    Path(output_dir) / LORA_CHECKPOINT_FILES[0],
                )
        while weights:
            weights.pop()

    def load_hook(models: list, input_dir: str) -> None:
        while models:
            model = accelerator.unwrap_model(models.pop())
            folder = Path(input_dir)
            found = next(f for f in LORA_CHECKPOINT_FILES if (folder / f).is_file())
            set_peft_model_state_dict(model, load_file(folder / found))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
