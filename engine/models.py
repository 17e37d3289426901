"""Loading a model: a source (engine.sources) + a family (engine.families) → a pipeline.

`load_pipeline` is family-agnostic: it resolves the source, detects the family when none is
given, and delegates to `family.load`, which calls diffusers' own loaders. The names below that
moved to `engine.sources` / `engine.families` stay importable from here.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch

from engine.families import (  # noqa: F401  (re-exported)
    Family,
    catalogue_entry,
    detect_family,
    get_family,
    load_catalogue,
)
from engine.sources import (  # noqa: F401  (re-exported)
    PICKLE_SUFFIXES,
    SAFE_SUFFIXES,
    ModelSource,
    check_pickle_allowed,
    load_policy,
    lora_adapter_name,
    resolve_lora_path,
    resolve_model_source,
)


def load_pipeline(
    source: str | os.PathLike[str] | ModelSource | None = None,
    family: Family | str | None = None,
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
    config: str | None = None,
    *,
    allow_pickle: bool = False,
    entry: Mapping[str, Any] | None = None,
) -> Any:
    """Load a model's pipeline on the CPU in `dtype` (the editor moves it to its device).

    `source`: a hub id (from the Hugging Face cache first; downloaded when missing and the hub
    is reachable), a diffusers folder, or a single file (`config` names the diffusers folder or
    hub id whose configs it uses; default: the family's reference model). `family`: a Family or
    its id; None detects it (catalogue, model_index.json, the file's weight names).
    `entry`: the catalogue entry, for family-specific load options (CosXL's flags).
    """
    resolved = resolve_model_source(source, allow_pickle)
    if family is None:
        chosen = detect_family(resolved, config, allow_pickle)
    elif isinstance(family, str):
        chosen = get_family(family)
    else:
        chosen = family
    kwargs: dict[str, Any] = {"dtype": dtype, "quantization": quantization, "config": config}
    if entry is not None and "entry" in inspect.signature(chosen.load).parameters:
        kwargs["entry"] = entry
    # The families load through engine.sources, which reads this: .safetensors only unless
    # pickle is allowed (downloads: the caller's policy, e.g. the service's, stays in force).
    with load_policy(allow_pickle=allow_pickle):
        return chosen.load(resolved, **kwargs)
