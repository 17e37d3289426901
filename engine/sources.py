"""Where weights come from: hub ids (cache first), diffusers folders, single files, LoRA files.

Family-agnostic: this module decides *which* source a name is and refuses what is unsafe
(pickle-based files without the explicit flag); each family's `load` then calls diffusers'
own `from_pretrained` / `from_single_file` through `pretrained` / `load_errors` below, so every
family fails with the same clear messages.

`load_policy` (set per thread by `engine.models.load_pipeline` and the HTTP service's workers)
says whether pickle weights may load (`use_safetensors=True` otherwise, and a folder holding
only .bin weights is refused naming --allow-pickle) and whether a missing hub file may be
downloaded (otherwise: the cache only, and a message naming --allow-downloads).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from engine.errors import InvalidInput, ModelNotFound, UnsafeModelFile
from engine.manifest import DEFAULT_MODEL

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
SAFE_SUFFIXES = (".safetensors",)
GGUF_SUFFIXES = (".gguf",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILE_PREFIX = "hf://"  # hf://owner/repo/path/in/repo.safetensors (LoRA presets)
# torch.load(weights_only=True) refuses arbitrary code from 2.6 on (CVE-2025-32434 broke it
# before); pickle files load only on such a torch.
SAFE_TORCH_LOAD_VERSION = (2, 6)


@dataclass(frozen=True)
class LoadPolicy:
    """What loading may do. The library's default downloads a missing hub model (a person
    asked for it) and refuses pickle; the service narrows downloads per request."""

    allow_pickle: bool = False
    allow_downloads: bool = True


_policy = threading.local()


def current_policy() -> LoadPolicy:
    return getattr(_policy, "value", None) or LoadPolicy()


@contextlib.contextmanager
def load_policy(
    *, allow_pickle: bool | None = None, allow_downloads: bool | None = None
) -> Iterator[LoadPolicy]:
    """Narrow or widen this thread's LoadPolicy for the duration (None: keep as is)."""
    previous = getattr(_policy, "value", None)
    base = previous or LoadPolicy()
    changes = {
        key: value
        for key, value in (("allow_pickle", allow_pickle), ("allow_downloads", allow_downloads))
        if value is not None
    }
    _policy.value = replace(base, **changes)
    try:
        yield _policy.value
    finally:
        _policy.value = previous


def is_hub_id(text: str) -> bool:
    """`owner/name`, as a Hugging Face hub id is written (whether or not it exists)."""
    return bool(_HUB_ID.match(text))


def require_safe_torch_load() -> None:
    """Pickle weights load only with a torch whose `weights_only` loading is safe (≥ 2.6)."""
    import torch

    release = torch.__version__.split("+")[0].split(".")
    try:
        version = tuple(int(part) for part in release[:2])
    except ValueError:  # a development build: assume recent
        return
    if version < SAFE_TORCH_LOAD_VERSION:
        wanted = ".".join(map(str, SAFE_TORCH_LOAD_VERSION))
        raise UnsafeModelFile(
            f"--allow-pickle needs torch {wanted} or newer, whose weights-only loading cannot "
            f"run code from a file; this is torch {torch.__version__}: upgrade torch or use "
            ".safetensors weights",
            "model",
        )


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["hub", "folder", "single_file"]
    location: str

    @property
    def name(self) -> str:
        return self.location if self.kind == "hub" else Path(self.location).name


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~", "\\"))
        or (os.sep in text.replace("/", "") and os.sep != "/")
        or text.lower().endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES + GGUF_SUFFIXES)
        or (len(text) > 1 and text[1] == ":")  # Windows drive
        or text.count("/") > 1
    )


def resolve_model_source(model: str | os.PathLike[str] | ModelSource | None,
                         allow_pickle: bool = False) -> ModelSource:
    """Decide how `model` is loaded, refusing what is unsafe or cannot exist."""
    if isinstance(model, ModelSource):
        return model
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
        if suffix in SAFE_SUFFIXES + GGUF_SUFFIXES:
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
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UnsafeModelFile(
                f"{path.name} is a pickle-based file ({path.suffix}), which can run arbitrary code when "
                "loaded; use a .safetensors version, or pass --allow-pickle if you trust where it came from",
                "model",
            )
        require_safe_torch_load()


def pickle_only_components(folder: Path) -> list[str]:
    """The subfolders of a diffusers folder whose weights exist only as pickle files."""
    found: list[str] = []
    try:
        components = sorted(child for child in folder.iterdir() if child.is_dir())
    except OSError:
        return found
    for component in components:
        try:
            names = [f.name.lower() for f in component.iterdir() if f.is_file()]
        except OSError:
            continue
        if any(n.endswith(PICKLE_SUFFIXES) for n in names) and not any(
            n.endswith(SAFE_SUFFIXES) for n in names
        ):
            found.append(component.name)
    return found


def _check_folder_weights(folder: Path, name: str) -> None:
    """Without --allow-pickle, a folder with pickle-only weights is refused before loading."""
    pickled = pickle_only_components(folder)
    if pickled and current_policy().allow_pickle:
        require_safe_torch_load()
    elif pickled:
        raise UnsafeModelFile(
            f"model {name}: the weights of {', '.join(pickled)} exist only as pickle files "
            "(.bin/.ckpt), which can run arbitrary code when loaded; convert them to .safetensors, "
            "or pass --allow-pickle if you trust where the model came from",
            "model",
        )


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def hub_fetch_allowed() -> bool:
    """A missing hub file may be downloaded: not offline, and this thread's policy allows it."""
    return not offline() and current_policy().allow_downloads


def downloads_refused(what: str, command: str) -> str:
    """The message when a hub file is missing and downloading is not allowed here."""
    if offline():
        return (
            f"{what} is not in the local Hugging Face cache (HF_HUB_OFFLINE is set); on a machine "
            f"with internet run `{command}` (it honours HF_HOME)"
        )
    return (
        f"{what} is not on this machine and this server does not download for its clients; on "
        f"the server run `{command}`, or restart it with --allow-downloads"
    )


def pretrained(cls: Any, source: ModelSource, **kwargs: Any) -> Any:
    """`cls.from_pretrained` for a folder or a hub id; hub ids from the cache first (no network
    round trip when the model is already here), downloaded when not and allowed (see
    `load_policy`). Weights load from .safetensors only unless pickle is allowed."""
    if not current_policy().allow_pickle:
        kwargs["use_safetensors"] = True
    if source.kind == "folder":
        _check_folder_weights(Path(source.location), source.name)
        return cls.from_pretrained(source.location, local_files_only=True, **kwargs)
    if source.kind != "hub":
        raise InvalidInput(f"{source.name} is a single file; this loader needs a folder or hub id", "model")
    snapshot = _cached_snapshot(source.location)
    if snapshot is not None:
        _check_folder_weights(snapshot, source.location)
    try:
        return cls.from_pretrained(source.location, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        if not hub_fetch_allowed():
            if offline():
                raise
            raise ModelNotFound(
                downloads_refused(f"model {source.location!r}", f"hf download {source.location}"),
                "model",
            ) from err
    return cls.from_pretrained(source.location, **kwargs)


def _cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of a hub model (where its model_index.json is), if any."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # a malformed id or an unreadable cache
        return None
    return Path(found).parent if isinstance(found, str) else None


def hub_config_local(config: str | None) -> bool:
    """`local_files_only` for a single file's config: a folder, offline, or downloads not
    allowed → no network."""
    return not hub_fetch_allowed() or (config is not None and Path(config).expanduser().is_dir())


@contextlib.contextmanager
def load_errors(source: ModelSource) -> Iterator[None]:
    """Turn diffusers' many loading failures into one ModelNotFound that says what to do."""
    try:
        yield
    except (UnsafeModelFile, ModelNotFound, InvalidInput):
        raise
    except (OSError, ValueError, KeyError) as err:
        raise ModelNotFound(load_failure_message(source, err), "model") from err


def load_failure_message(source: ModelSource, err: BaseException) -> str:
    if source.kind == "hub":
        return (
            f"model {source.location!r} is not in the local Hugging Face cache and could not be "
            f"downloaded ({type(err).__name__}). On a machine with internet run "
            f"`hf download {source.location}` (it honours HF_HOME), or pass --model with a local "
            "diffusers folder or .safetensors file"
        )
    if source.kind == "single_file":
        return (
            f"could not load the checkpoint {source.location}: {first_line(err)}. Single files need "
            "the model's diffusers config: have the default model in the cache or pass a config folder"
        )
    return f"could not load the model folder {source.location}: {first_line(err)}"


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def read_model_index(source: ModelSource) -> dict[str, Any] | None:
    """model_index.json of a folder, or of a hub id already in the cache; None otherwise."""
    import json

    path: str | None = None
    if source.kind == "folder":
        path = str(Path(source.location) / "model_index.json")
    elif source.kind == "hub":
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source.location, "model_index.json")
            path = found if isinstance(found, str) else None
        except Exception:  # a malformed id or an unreadable cache
            path = None
    if path is None or not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------------------------- LoRAs


def lora_adapter_name(path: str | os.PathLike[str]) -> str:
    """A stable adapter name per file, so a LoRA loaded once is reused, never loaded twice."""
    resolved = str(Path(path).expanduser().resolve())
    return "lora_" + hashlib.sha1(resolved.encode("utf-8")).hexdigest()[:12]


def resolve_lora_path(path: str, allow_pickle: bool = False) -> Path:
    """A local LoRA file (or a folder with exactly one), or `hf://owner/repo/file.safetensors`
    from the hub cache (downloaded when missing and the hub is reachable)."""
    if path.startswith(HUB_FILE_PREFIX):
        return _hub_lora(path)
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


def hub_lora_path(repo: str, file: str) -> str:
    """The LoraSpec path of a LoRA file in a hub repository (catalogue presets)."""
    return f"{HUB_FILE_PREFIX}{repo}/{file}"


def _hub_lora(path: str) -> Path:
    rest = path[len(HUB_FILE_PREFIX):]
    parts = rest.split("/")
    if len(parts) < 3 or not rest.endswith(SAFE_SUFFIXES) or ".." in parts:
        raise InvalidInput(f"{path}: a hub LoRA is hf://owner/repo/file.safetensors", "loras")
    return hub_file("/".join(parts[:2]), "/".join(parts[2:]), "loras")


def hub_file(repo: str, file: str, field: str = "model") -> Path:
    """One file of a hub repository: from the cache, else downloaded when the hub is reachable."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, file, local_files_only=True))
    except Exception as err:
        if not hub_fetch_allowed():
            raise ModelNotFound(
                downloads_refused(f"{file} of {repo}", f"hf download {repo} {file}"), field
            ) from err
    try:
        return Path(hf_hub_download(repo, file))
    except Exception as err:
        raise ModelNotFound(f"could not download {file} of {repo}: {first_line(err)}", field) from err
