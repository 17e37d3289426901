"""Checkpoints: written to a temporary folder, then renamed (a crash leaves the last one intact).

Also the output-folder rules (never overwrite a run without --resume/--overwrite) and the
accelerate hooks that keep LoRA checkpoints small.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

from engine.errors import EngineError, InvalidInput

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


class DiskFull(EngineError):
    """A checkpoint did not fit on the disk (the previous checkpoint is kept)."""

    status = 507  # HTTP "Insufficient Storage", as the engine's OutOfMemory


# Below this much free space a failed write is taken for a full disk: torch.save reports one
# only as "unexpected pos …" (a RuntimeError without an errno).
NEARLY_FULL_BYTES = 64 * 2**20
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28")


def write_checkpoint(
    accelerator: Any, root: Path, step: int, state: dict[str, Any], keep: int
) -> Path:
    """Write a checkpoint atomically: into `.tmp-step-N`, fsync'd, then renamed to `step-N`.

    The files and the folder are flushed to the disk before the rename and the parent folder
    after it, so a power cut leaves either the complete new checkpoint or the previous one,
    never a renamed folder with empty files. A full disk raises `DiskFull`, naming the folder
    and its free space; the partial checkpoint is removed and the previous one kept.
    """
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    temporary = root / f".tmp-{CHECKPOINT_PREFIX}{step:07d}"
    if accelerator.is_main_process:
        if not root.is_dir():
            root.mkdir(parents=True, exist_ok=True)
            _fsync_folder(root.parent)
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary))
        if accelerator.is_main_process:
            with open(temporary / "train_state.json", "w", encoding="utf-8") as out:
                json.dump(state, out, indent=2)
            _fsync_tree(temporary)
    except Exception as err:
        full = accelerator.is_main_process and _disk_full(err, root)
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)  # frees the space it took
        if full:
            raise DiskFull(_disk_full_message(root, step, err), field="output") from err
        raise
    if accelerator.is_main_process:
        if final.exists():  # only when the same step is saved twice; keep the old until replaced
            old = root / f".old-{final.name}"
            os.replace(final, old)
            os.replace(temporary, final)
            _fsync_folder(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, final)
            _fsync_folder(root)
        for stale in checkpoint_dirs(root)[: -max(1, keep)]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then each folder (deepest first)."""
    for directory, _subfolders, files in os.walk(folder, topdown=False):
        for name in files:
            descriptor = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        _fsync_folder(Path(directory))


def _fsync_folder(folder: Path) -> None:
    """Make the folder's entries (new names, renames) durable."""
    if os.name == "nt":  # Windows cannot open a folder to fsync it; NTFS journals renames
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _disk_full(err: BaseException, root: Path) -> bool:
    """Whether a failed checkpoint write ran out of disk space (libraries word it variously)."""
    if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
        return True
    if any(text in str(err).lower() for text in _DISK_FULL_TEXTS):
        return True  # e.g. safetensors: "I/O error: No space left on device (os error 28)"
    free = _free_bytes(root)  # measured before the partial checkpoint is removed
    return free is not None and free < NEARLY_FULL_BYTES


def _disk_full_message(root: Path, step: int, err: BaseException) -> str:
    free = _free_bytes(root)
    free_text = f"{_size(free)} free" if free is not None else "free space unknown"
    previous = checkpoint_dirs(root)
    if previous:
        needed = sum(f.stat().st_size for f in previous[-1].rglob("*") if f.is_file())
        kept = (
            f"each checkpoint takes about {_size(needed)}; the previous checkpoint "
            f"{previous[-1]} is intact, so --resume continues from it"
        )
    else:
        kept = "no earlier checkpoint exists"
    return (
        f"the disk is full: the checkpoint of step {step} did not fit in {root} "
        f"({free_text} after removing the partial checkpoint; {str(err).splitlines()[0][:120]}); "
        f"{kept}. Free some space, lower --keep-checkpoints or --checkpoint-every, "
        "or choose an --output on a larger disk"
    )


def _size(count: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count / 2**10:.0f} KiB"


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
