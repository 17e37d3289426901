"""Finding and loading models: hub ids, diffusers folders, single-file checkpoints, LoRAs.

Loading is diffusers' own (`from_pretrained`, `from_single_file`, `load_lora_weights`); this
module decides which one applies and turns the many ways it can fail into one clear message.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import StableDiffusionInstructPix2PixPipeline

from engine.errors import InvalidInput, ModelNotFound, UnsafeModelFile
from engine.manifest import DEFAULT_MODEL

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
SAFE_SUFFIXES = (".safetensors",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CATALOGUE_PATH = Path(__file__).resolve().parent.parent / "resources" / "models.json"


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["hub", "folder", "single_file"]
    location: str

    @property
    def name(self) -> str:
        return self.location if self.kind == "hub" else Path(self.location).name


def load_catalogue() -> list[dict[str, Any]]:
    if not CATALOGUE_PATH.is_file():
        return [{"id": DEFAULT_MODEL, "name": "InstructPix2Pix", "default": True}]
    return json.loads(CATALOGUE_PATH.read_text(encoding="utf-8"))["models"]


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~", "\\"))
        or (os.sep in text.replace("/", "") and os.sep != "/")
        or text.lower().endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES)
        or (len(text) > 1 and text[1] == ":")  # Windows drive
        or text.count("/") > 1
    )


def resolve_model_source(model: str | os.PathLike[str] | None, allow_pickle: bool = False) -> ModelSource:
    """Decide how `model` is loaded, refusing what is unsafe or cannot exist."""
    text = str(model) if model is not None else DEFAULT_MODEL
    if not text.strip():
        raise InvalidInput("model is empty; give a hub id, a folder or a .safetensors file", "model")
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelNotFound(
                    f"{path} is a folder but not a diffusers model (it has no model_index.json); "
                    "point --model at the folder that holds model_index.json",
                    "model",
                )
            return ModelSource("folder", str(path))
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            check_pickle_allowed(path, allow_pickle)
            return ModelSource("single_file", str(path))
        if suffix in SAFE_SUFFIXES:
            return ModelSource("single_file", str(path))
        raise InvalidInput(
            f"{path} is not a model: expected a diffusers folder or a .safetensors checkpoint", "model"
        )
    if _looks_like_path(text) or not _HUB_ID.match(text):
        raise ModelNotFound(
            f"no model at {text!r}: it is neither an existing file or folder nor a hub id like "
            f"{DEFAULT_MODEL!r}",
            "model",
        )
    return ModelSource("hub", text)


def check_pickle_allowed(path: Path, allow_pickle: bool) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise UnsafeModelFile(
            f"{path.name} is a pickle-based file ({path.suffix}), which can run arbitrary code when "
            "loaded; use a .safetensors version, or pass --allow-pickle if you trust where it came from",
            "model",
        )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def load_pipeline(
    model: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    config: str | None = None,
) -> StableDiffusionInstructPix2PixPipeline:
    """Load an InstructPix2Pix pipeline on the CPU in `dtype` (the caller moves it to a device).

    Hub ids come from the standard Hugging Face cache (`HF_HOME`, `HF_HUB_OFFLINE` honoured);
    a model not in the cache is downloaded with a progress bar when the hub is reachable.
    Single files need a diffusers config: `config`, else the default model's (cached).
    """
    source = resolve_model_source(model, allow_pickle)
    cls = StableDiffusionInstructPix2PixPipeline
    common: dict[str, Any] = {"dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    try:
        if source.kind == "folder":
            pipe = cls.from_pretrained(source.location, local_files_only=True, **common)
        elif source.kind == "single_file":
            pipe = cls.from_single_file(
                source.location,
                config=config or DEFAULT_MODEL,
                local_files_only=_offline() or config is not None,
                **common,
            )
        else:
            pipe = _from_hub(source.location, common)
    except (UnsafeModelFile, ModelNotFound, InvalidInput):
        raise
    except (OSError, ValueError) as err:
        raise ModelNotFound(_load_failure_message(source, err), "model") from err
    _check_is_instruct_pix2pix(pipe, source)
    return pipe


def _from_hub(hub_id: str, common: dict[str, Any]) -> StableDiffusionInstructPix2PixPipeline:
    cls = StableDiffusionInstructPix2PixPipeline
    try:  # the cache first: no network round trip when the model is already here
        return cls.from_pretrained(hub_id, local_files_only=True, use_safetensors=True, **common)
    except (OSError, ValueError):
        if _offline():
            raise
    return cls.from_pretrained(hub_id, use_safetensors=True, **common)


def _load_failure_message(source: ModelSource, err: BaseException) -> str:
    if source.kind == "hub":
        return (
            f"model {source.location!r} is not in the local Hugging Face cache and could not be "
            f"downloaded ({type(err).__name__}). On a machine with internet run "
            f"`hf download {source.location}` (it honours HF_HOME), or pass --model with a local "
            "diffusers folder or .safetensors file"
        )
    if source.kind == "single_file":
        return (
            f"could not load the checkpoint {source.location}: {_first_line(err)}. Single files need "
            "the model's diffusers config: have the default model in the cache or pass a config folder"
        )
    return f"could not load the model folder {source.location}: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def _check_is_instruct_pix2pix(pipe: StableDiffusionInstructPix2PixPipeline, source: ModelSource) -> None:
    in_channels = pipe.unet.config.in_channels
    latent_channels = pipe.vae.config.latent_channels
    if in_channels != 2 * latent_channels:
        raise InvalidInput(
            f"{source.name} is not an instruction-editing model: its UNet takes {in_channels} input "
            f"channels, an InstructPix2Pix UNet takes {2 * latent_channels} (latent + image). "
            "Text-to-image models can be turned into one with `instruct-edit-train train`",
            "model",
        )


def lora_adapter_name(path: str | os.PathLike[str]) -> str:
    """A stable adapter name per file, so a LoRA loaded once is reused, never loaded twice."""
    resolved = str(Path(path).expanduser().resolve())
    return "lora_" + hashlib.sha1(resolved.encode("utf-8")).hexdigest()[:12]


def resolve_lora_path(path: str, allow_pickle: bool = False) -> Path:
    lora = Path(path).expanduser()
    if lora.is_dir():
        candidates = sorted(lora.glob("*.safetensors"))
        if len(candidates) != 1:
            raise InvalidInput(
                f"LoRA folder {lora} must hold exactly one .safetensors file (found {len(candidates)})",
                "loras",
            )
        lora = candidates[0]
    if not lora.is_file():
        raise ModelNotFound(f"LoRA file {lora} does not exist", "loras")
    if lora.suffix.lower() in PICKLE_SUFFIXES:
        check_pickle_allowed(lora, allow_pickle)
    elif lora.suffix.lower() not in SAFE_SUFFIXES:
        raise InvalidInput(f"LoRA {lora.name} must be a .safetensors file", "loras")
    return lora.resolve()
