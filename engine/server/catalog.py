"""Which models and LoRAs a client may ask for, and what each name resolves to.

Names from the network never become paths directly: a request's `model` must be a catalogue
id, a name listed from a configured models folder, or the server's own default; a LoRA must
be a file listed from a configured LoRA folder. Lookups match exact listed names, so no
`..`, absolute path or symlink trick reaches outside those folders.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput
from engine.request import EditParams, LoraSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    id: str  # the name clients send
    source: str  # catalogue | models-dir | command-line
    target: str  # what Editor(model=...) gets: a hub id or an absolute path
    name: str
    architecture: str | None = None
    licence: str | None = None
    description: str | None = None


def _load_catalogue() -> list[dict[str, Any]]:
    try:
        from engine.models import load_catalogue

        return [entry for entry in load_catalogue() if isinstance(entry, dict) and "id" in entry]
    except (OSError, ValueError, KeyError) as err:
        log.warning("model catalogue unreadable (%s); only local models are offered", err)
        return []


def in_hf_cache(repo_id: str) -> bool:
    """True when a diffusers model of this hub id is in the local Hugging Face cache (offline check)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        return False
    try:
        found = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # a malformed id or an unreadable cache: not available
        return False
    return isinstance(found, str)


def _weights_suffixes(allow_pickle: bool) -> tuple[str, ...]:
    from engine.models import PICKLE_SUFFIXES, SAFE_SUFFIXES

    return SAFE_SUFFIXES + (PICKLE_SUFFIXES if allow_pickle else ())


def _scan_models_dir(folder: Path, allow_pickle: bool) -> dict[str, Path]:
    """Diffusers folders (with model_index.json) and single weight files directly inside `folder`."""
    found: dict[str, Path] = {}
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return found
    for child in children:
        if child.name.startswith("."):
            continue
        is_diffusers_folder = child.is_dir() and (child / "model_index.json").is_file()
        is_weights_file = child.is_file() and child.suffix.lower() in _weights_suffixes(
            allow_pickle
        )
        if is_diffusers_folder or is_weights_file:
            found[child.name] = child.resolve()
    return found


def _scan_loras_dir(folder: Path) -> dict[str, Path]:
    """Every .safetensors file below `folder`, named by its path relative to it (with '/')."""
    found: dict[str, Path] = {}
    root = folder.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if filename.startswith(".") or not filename.lower().endswith(".safetensors"):
                continue
            path = Path(dirpath) / filename
            resolved = path.resolve()
            # A symlink pointing out of the folder is not offered.
            if not resolved.is_relative_to(root):
                continue
            found[path.relative_to(root).as_posix()] = resolved
    return found


class ModelCatalog:
    """The models and LoRAs this server offers; folders are re-read on each listing or miss."""

    def __init__(
        self,
        default_model: str,
        models_dirs: tuple[Path, ...] = (),
        loras_dirs: tuple[Path, ...] = (),
        allow_pickle: bool = False,
        catalogue: list[dict[str, Any]] | None = None,
    ) -> None:
        self.default_model = default_model
        self.models_dirs = models_dirs
        self.loras_dirs = loras_dirs
        self.allow_pickle = allow_pickle
        self.catalogue = _load_catalogue() if catalogue is None else catalogue

    def entries(self) -> list[ModelEntry]:
        entries: dict[str, ModelEntry] = {}
        for item in self.catalogue:
            entries[item["id"]] = ModelEntry(
                id=item["id"],
                source="catalogue",
                target=item["id"],
                name=item.get("name", item["id"]),
                architecture=item.get("architecture"),
                licence=item.get("licence"),
                description=item.get("description"),
            )
        for folder in self.models_dirs:
            for name, path in _scan_models_dir(folder, self.allow_pickle).items():
                entries.setdefault(
                    name, ModelEntry(id=name, source="models-dir", target=str(path), name=name)
                )
        if self.default_model not in entries:
            # The operator's --model (a hub id, folder or file they chose) is always offered.
            entries[self.default_model] = ModelEntry(
                id=self.default_model,
                source="command-line",
                target=self.default_model,
                name=Path(self.default_model).name or self.default_model,
            )
        return list(entries.values())

    def is_available_locally(self, entry: ModelEntry) -> bool:
        if entry.source == "models-dir":
            return Path(entry.target).exists()
        if Path(entry.target).exists():
            return True
        return in_hf_cache(entry.target)

    def loras(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for folder in self.loras_dirs:
            for name, path in _scan_loras_dir(folder).items():
                found.setdefault(name, path)
        return found

    def resolve_model(self, requested: str | None) -> ModelEntry:
        name = self.default_model if requested is None else requested
        for entry in self.entries():
            if entry.id == name:
                return entry
        raise InvalidInput(
            f"model {name!r} is not offered by this server; GET /v1/models lists the ones that are "
            "(the server's --models-dir folders and the catalogue)",
            field="model",
        )

    def resolve_params(self, params: EditParams) -> tuple[EditParams, ModelEntry]:
        """The model entry, and params whose LoRA names are replaced by their absolute paths."""
        entry = self.resolve_model(params.model)
        if not params.loras:
            return params, entry
        if not self.loras_dirs:
            raise InvalidInput(
                "this server has no LoRA folder configured; start it with --loras-dir DIR",
                field="loras",
            )
        available = self.loras()
        resolved: list[LoraSpec] = []
        for lora in params.loras:
            path = available.get(lora.path)
            if path is None:
                raise InvalidInput(
                    f"LoRA {lora.path!r} is not in the server's LoRA folders; GET /v1/models lists "
                    "the available names",
                    field="loras",
                )
            resolved.append(LoraSpec(path=str(path), strength=lora.strength))
        return replace(params, loras=tuple(resolved)), entry
