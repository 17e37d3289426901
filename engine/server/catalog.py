"""Which models and LoRAs a client may ask for, and what each name resolves to.

Names from the network never become paths directly: a request's `model` must be a catalogue
id, a name listed from a configured models folder, or the server's own default; a LoRA must
be a file listed from a configured LoRA folder. Lookups match exact listed names, so no
`..`, absolute path or symlink trick reaches outside those folders.

Folder listings are kept (`FolderListing`): rescanned when a listed folder changes (its
mtime) and at least every `RESCAN_S` seconds, not on every health call and request. Without
`allow_downloads`, a request may only name models whose weights are already on this machine
(the operator's own default model excepted: fetching it is the operator's choice).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.errors import InvalidInput
from engine.request import EditParams, LoraSpec
from engine.server import families
from engine.sources import is_hub_id

log = logging.getLogger(__name__)
# A listing older than this is redone even when no folder's mtime changed (a file added
# deep inside a subfolder, or a file system with coarse mtimes); a changed folder at once.
RESCAN_S = 5.0
# A name missing from the listing rescans at most this often (a client cannot force a scan
# per request).
MISS_RESCAN_S = 1.0


def looks_like_local_path(text: str) -> bool:
    """True when `text` names a file or folder on this machine rather than a hub id."""
    return not is_hub_id(text) or Path(text).expanduser().exists()


def local_model_name(target: str) -> str:
    """A model's public name: a hub id as it is, a local folder or file by its own name only."""
    if not looks_like_local_path(target):
        return target
    return Path(target.rstrip("/\\")).name or target


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


def _scan_models_dir(folder: Path, allow_pickle: bool) -> tuple[dict[str, Path], list[Path]]:
    """Diffusers folders (with model_index.json) and single weight files directly inside
    `folder`; and the folders read (whose mtimes tell when to look again)."""
    found: dict[str, Path] = {}
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return found, [folder]
    for child in children:
        if child.name.startswith("."):
            continue
        is_diffusers_folder = child.is_dir() and (child / "model_index.json").is_file()
        is_weights_file = child.is_file() and child.suffix.lower() in _weights_suffixes(
            allow_pickle
        )
        if is_diffusers_folder or is_weights_file:
            found[child.name] = child.resolve()
    return found, [folder]


def _scan_loras_dir(folder: Path) -> tuple[dict[str, Path], list[Path]]:
    """Every .safetensors file below `folder`, named by its path relative to it (with '/');
    and every folder walked (a file added anywhere changes one of their mtimes)."""
    found: dict[str, Path] = {}
    walked: list[Path] = [folder]
    root = folder.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        walked.extend(Path(dirpath) / d for d in dirnames)
        for filename in sorted(filenames):
            if filename.startswith(".") or not filename.lower().endswith(".safetensors"):
                continue
            path = Path(dirpath) / filename
            resolved = path.resolve()
            # A symlink pointing out of the folder is not offered.
            if not resolved.is_relative_to(root):
                continue
            found[path.relative_to(root).as_posix()] = resolved
    return found, walked


def _mtime_ns(folder: Path) -> int | None:
    try:
        return folder.stat().st_mtime_ns
    except OSError:
        return None


class FolderListing:
    """The merged scan of some folders (first folder wins a name), kept until a scanned
    folder's mtime changes or it is `max_age_s` old. Thread-safe: health runs on the event
    loop, GET /v1/models in the thread pool."""

    def __init__(
        self,
        folders: tuple[Path, ...],
        scan: Callable[[Path], tuple[dict[str, Path], list[Path]]],
        max_age_s: float = RESCAN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.folders = folders
        self.scan = scan
        self.max_age_s = max_age_s
        self.clock = clock
        self.scans = 0  # how many times the folders were read (tests, diagnostics)
        self._lock = threading.Lock()
        self._items: dict[str, Path] | None = None
        self._stamps: dict[Path, int | None] = {}
        self._scanned_at = 0.0

    def get(self, max_age_s: float | None = None) -> dict[str, Path]:
        """The listing, rescanned first when stale (older than `max_age_s`, default the
        listing's own) or when a folder it read has changed since."""
        limit = self.max_age_s if max_age_s is None else max_age_s
        with self._lock:
            fresh = (
                self._items is not None
                and self.clock() - self._scanned_at < limit
                and all(_mtime_ns(folder) == stamp for folder, stamp in self._stamps.items())
            )
            if not fresh:
                self._rescan()
            assert self._items is not None
            return self._items

    def _rescan(self) -> None:
        items: dict[str, Path] = {}
        stamps: dict[Path, int | None] = {}
        started = self.clock()
        for folder in self.folders:
            # mtimes are taken after the scan: a change in between shows within max_age_s.
            found, walked = self.scan(folder)
            for walked_folder in walked:
                stamps.setdefault(walked_folder, None)
            for name, path in found.items():
                items.setdefault(name, path)
        for walked_folder in stamps:
            stamps[walked_folder] = _mtime_ns(walked_folder)
        self._items, self._stamps, self._scanned_at = items, stamps, started
        self.scans += 1


class ModelCatalog:
    """The models and LoRAs this server offers (folder listings kept by `FolderListing`)."""

    def __init__(
        self,
        default_model: str,
        models_dirs: tuple[Path, ...] = (),
        loras_dirs: tuple[Path, ...] = (),
        allow_pickle: bool = False,
        catalogue: list[dict[str, Any]] | None = None,
        allow_downloads: bool = True,
        rescan_s: float = RESCAN_S,
    ) -> None:
        self.default_model = default_model
        self.models_dirs = models_dirs
        self.loras_dirs = loras_dirs
        self.allow_pickle = allow_pickle
        self.allow_downloads = allow_downloads
        self.catalogue = _load_catalogue() if catalogue is None else catalogue
        # (path, mtime) -> family id: a model's family is read once per version of it.
        self._family_cache: dict[tuple[str, int], str | None] = {}
        self._models_listing = FolderListing(
            models_dirs, lambda folder: _scan_models_dir(folder, allow_pickle), rescan_s
        )
        self._loras_listing = FolderListing(loras_dirs, _scan_loras_dir, rescan_s)
        self._entries_lock = threading.Lock()
        self._entries: tuple[dict[str, Path], list[ModelEntry]] | None = None

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

    def entries(self, max_age_s: float | None = None) -> list[ModelEntry]:
        listing = self._models_listing.get(max_age_s)
        with self._entries_lock:
            if self._entries is None or self._entries[0] is not listing:
                self._entries = (listing, self._build_entries(listing))
            return list(self._entries[1])

    def _build_entries(self, listing: dict[str, Path]) -> list[ModelEntry]:
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
        for name, path in listing.items():
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

    def loras(self, max_age_s: float | None = None) -> dict[str, Path]:
        return dict(self._loras_listing.get(max_age_s))

    def entry_for_target(self, target: str) -> ModelEntry | None:
        """The listed entry that loads `target` (a hub id or an absolute path), if any."""
        return next((entry for entry in self.entries() if entry.target == target), None)

    def resolve_model(self, requested: str | None) -> ModelEntry:
        name = self.default_model if requested is None else requested
        # A name not in the kept listing: look again (a model just dropped into a folder),
        # but not more often than MISS_RESCAN_S.
        for max_age in (None, MISS_RESCAN_S):
            for entry in self.entries(max_age):
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
        if not self.allow_downloads:
            self._check_on_this_machine(entry, params.preset)
        if not params.loras:
            return params, entry
        if not self.loras_dirs:
            raise InvalidInput(
                "this server has no LoRA folder configured; start it with --loras-dir DIR",
                field="loras",
            )
        available = self.loras()
        if any(lora.path not in available for lora in params.loras):
            available = self.loras(MISS_RESCAN_S)  # a LoRA just dropped into a folder
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

    def _check_on_this_machine(self, entry: ModelEntry, preset_id: str | None) -> None:
        """Refuse (422 naming the field) a request that would make this server download: a
        model, or a preset's LoRA, not in the local cache. The operator's default model is
        theirs to fetch (at start-up, or with the first edit under --no-preload)."""
        if entry.target != self.default_model and not self.is_available_locally(entry):
            raise InvalidInput(
                f"model {entry.id!r} is not on the server's machine, and this server does not "
                "download models for its clients; on the server run "
                f"`hf download {entry.target}`, or restart it with --allow-downloads",
                field="model",
            )
        if preset_id is None or entry.source != "catalogue":
            return
        preset = families.registry.find_preset(entry.catalogue, preset_id) or {}
        for lora in preset.get("loras") or []:
            repo, file = lora.get("repo"), lora.get("file")
            if isinstance(repo, str) and isinstance(file, str) and not in_hf_cache(repo, file):
                raise InvalidInput(
                    f"preset {preset_id!r} needs the LoRA {file} of {repo}, which is not on the "
                    "server's machine, and this server does not download for its clients; on the "
                    f"server run `hf download {repo} {file}`, or restart it with --allow-downloads",
                    field="preset",
                )
