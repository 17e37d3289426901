"""The service's view of the model families (`engine.families`): which family a listed model
belongs to, what `GET /v1/models` publishes about it, and the check of a request's family
parameters. The registry skips a family whose module cannot be imported here (its models then
publish no parameters and fail when loaded, with the registry's message).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import engine.families as registry
from engine.errors import InvalidInput
from engine.request import EditParams

log = logging.getLogger(__name__)

DEFAULT_FAMILY = "sd-ip2p"
# Catalogues written before model families named an architecture instead of a family.
_ARCHITECTURE_FAMILIES = {"sd15-instruct-pix2pix": "sd-ip2p"}

load_catalogue = registry.load_catalogue


def get(family_id: str | None) -> Any:
    """The Family object, or None when unknown or not available in this installation."""
    return registry.FAMILIES.get(family_id) if family_id is not None else None


def family_id_for_architecture(architecture: str | None) -> str | None:
    return _ARCHITECTURE_FAMILIES.get(architecture or "")


def family_id_for_pipeline_class(name: str) -> str | None:
    try:
        return registry.family_for_pipeline_class(name).id
    except InvalidInput:
        return None


def single_file_family_id(path: Path) -> str:
    """A single checkpoint's family: what its weight names say (SDXL or not), else sd-ip2p."""
    try:
        return registry.detect_family(str(path), allow_pickle=True).id
    except Exception:  # unreadable, or the family module is not available here
        return DEFAULT_FAMILY


def hub_family_id(model: str) -> str | None:
    """The family of the operator's --model when it is a hub id (from the cached
    model_index.json); None when it cannot be told before loading."""
    try:
        return registry.detect_family(model).id
    except Exception:
        return None


def describe(family_id: str | None) -> dict[str, Any]:
    """What GET /v1/models says about a model's family (Family.describe())."""
    family = get(family_id)
    if family is None:
        return {"family": family_id, "family_label": None, "params": []}
    return dict(family.describe())


def check_options(params: EditParams, family_id: str | None) -> EditParams:
    """`params` with its family parameters checked and normalised by the model's family.

    A parameter the family does not take is an InvalidInput naming that field (422). When the
    family is unknown or unavailable here, the options pass unchecked: the Editor checks them
    again when it runs (and reports an unavailable family itself)."""
    options = getattr(params, "options", None)
    family = get(family_id)
    if options is None or family is None:
        return params
    _check_range("steps", params.steps, getattr(family, "steps", None), family.label)
    _check_range("resolution", params.resolution, getattr(family, "resolution", None), family.label)
    resolved = family.resolve_options(options)
    # Only what the client sent travels on (normalised); defaults stay the model's business.
    return replace(params, options={name: resolved[name] for name in options})


def check_preset(params: EditParams, catalogue_id: str | None) -> None:
    """A requested preset must be one the model's catalogue entry offers (422 naming `preset`);
    the Editor expands it (its LoRAs come from the catalogue, never from the client)."""
    if params.preset is None:
        return
    entry = registry.catalogue_entry(catalogue_id) if catalogue_id else None
    registry.find_preset(entry, params.preset)


def _check_range(name: str, value: int | None, rule: Any, label: str) -> None:
    """A shared field inside the family's own range (e.g. Qwen-Image-Edit needs 2+ steps)."""
    low, high = getattr(rule, "minimum", None), getattr(rule, "maximum", None)
    if value is None or low is None or high is None or low <= value <= high:
        return
    raise InvalidInput(
        f"{name} must be from {low} to {high} for {label} models (got {value})", name
    )
