"""Which models and LoRAs a client may ask for, and what each name resolves to.

Names from the network never become paths directly: a request's `model` must be a catalogue
id, a name listed from a configured models folder, or the server's own default; a LoRA must
be a file listed from a configured LoRA folder. Lookups match exact listed names, so no
`..`, absolute path or symlink trick reaches outside those folders.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput
from engine.request import EditParams, LoraSpec
from engine.server import families

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
    # The model family id (engine.families), None when it cannot be told without loading.
    family: str | None = None
    # The catalogue entry as published (licence, sizes, recommended values, presets …).
    catalogue: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def _load_catalogue() -> list[dict[str, Any]]:
    try:
        entries = families.load_catalogue()
        return [entry for entry in entries if isinstance(entry, dict) and "id" in entry]
    except (OSError, ValueError, KeyError) as err:
        log.warning("model catalogue unreadable (%s); only local models are offered", err)
        return []


def _folder_family(folder: Path) -> str | None:
    """The family of a diffusers folder, from model_index.json's `_class_name`."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = index.get("_class_name") if isinstance(index, dict) else None
    return families.family_id_for_pipeline_class(name) if isinstance(name, str) else None


def in_hf_cache(repo_id: str, filename: str = "model_index.json") -> bool:
    """True when this file of a hub repository (by default a diffusers model's index) is in the
    local Hugging Face cache (offline check)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        return False
    try:
        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # a malformed id or an unreadable cache: not available
        return False
    return isinstance(found, str)


def _weights_suffixes(allow_pickle: bool) -> tuple[str, ...]:
    try:
        from engine.sources import PICKLE_SUFFIXES, SAFE_SUFFIXES
    except ImportError:  # before engine.sources existed
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
        # (path, mtime) -> family id: folders are re-read on each listing, files are not.
        self._family_cache: dict[tuple[str, int], str | None] = {}

    def _local_family(self, path: Path) -> str | None:
        """A folder's family from its model_index.json; a single file's from its weight names
        (SDXL or not), `sd-ip2p` when they do not say."""
        try:
            key = (str(path), path.stat().st_mtime_ns)
        except OSError:
            return None
        if key not in self._family_cache:
            self._family_cache[key] = (
                _folder_family(path) if path.is_dir() else families.single_file_family_id(path)
            )
        return self._family_cache[key]

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
                family=item.get("family")
                or families.family_id_for_architecture(item.get("architecture")),
                catalogue=item,
            )
        for folder in self.models_dirs:
            for name, path in _scan_models_dir(folder, self.allow_pickle).items():
                entries.setdefault(
                    name,
                    ModelEntry(
                        id=name,
                        source="models-dir",
                        target=str(path),
                        name=name,
                        family=self._local_family(path),
                    ),
                )
        if self.default_model not in entries:
            # The operator's --model (a hub id, folder or file they chose) is always offered.
            local = Path(self.default_model).expanduser()
            entries[self.default_model] = ModelEntry(
                id=self.default_model,
                source="command-line",
                target=self.default_model,
                name=Path(self.default_model).name or self.default_model,
                family=(
                    self._local_family(local.resolve())
                    if local.exists()
                    else families.hub_family_id(self.default_model)
                ),
            )
        return list(entries.values())

    def is_available_locally(self, entry: ModelEntry) -> bool:
        if entry.source == "models-dir":
            return Path(entry.target).exists()
        if Path(entry.target).exists():
            return True
        single_file = entry.catalogue.get("single_file")
        if isinstance(single_file, dict) and single_file.get("repo") and single_file.get("file"):
            # A single-file model (CosXL Edit): its checkpoint, plus the config it loads with.
            config = entry.catalogue.get("config")
            return in_hf_cache(single_file["repo"], single_file["file"]) and (
                not isinstance(config, str) or in_hf_cache(config)
            )
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
        """The model entry, and params whose family parameters the model's family has checked
        (a parameter it does not take is an InvalidInput naming it) and whose LoRA names are
        replaced by their absolute paths."""
        entry = self.resolve_model(params.model)
        params = families.check_options(params, entry.family)
        families.check_preset(params, entry.id if entry.source == "catalogue" else None)
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
