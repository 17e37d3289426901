"""Model families: the registry, family detection and the model catalogue.

Each family module (`sd_ip2p`, `flux_kontext`, `flux2_klein`, `qwen_edit`) defines one or more
`Family` subclasses (or instances) with an `id`. They are imported here one by one: a module
whose optional pipeline class is missing from the installed diffusers (or that is not written
yet) is skipped and recorded in `UNAVAILABLE`, so the rest of the engine keeps working.

APIs the server and the CLI use:
    FAMILIES                       {id: Family} of the families this installation can run
    get_family(id)                 Family (InvalidInput naming the id when unknown/unavailable)
    family_for_pipeline_class(n)   Family loading the pipeline class named n
    detect_family(model, config)   Family of a hub id / folder / single file / catalogue id
    load_catalogue()               the catalogue entries (list of dicts, catalogue.json)
    catalogue_entry(id)            one entry (None when the id is not in the catalogue)
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import InvalidInput
from engine.families.base import Family, ParamSpec, ResolutionRule, RunInputs, StepHooks, StepsRule

if TYPE_CHECKING:
    from engine.sources import ModelSource

log = logging.getLogger(__name__)

FAMILY_MODULES = ("sd_ip2p", "flux_kontext", "flux2_klein", "qwen_edit")
CATALOGUE_PATH = Path(__file__).resolve().parent / "catalogue.json"
DEFAULT_FAMILY = "sd-ip2p"

FAMILIES: dict[str, Family] = {}
UNAVAILABLE: dict[str, str] = {}  # module name -> why it was skipped


def _collect(module: Any) -> list[Family]:
    """The Family instances a module defines (module-level instances, else its subclasses)."""
    found: dict[str, Family] = {}
    for value in vars(module).values():
        if isinstance(value, Family) and value.id:
            found.setdefault(value.id, value)
    for value in vars(module).values():
        if (isinstance(value, type) and issubclass(value, Family) and value is not Family
                and value.__module__ == module.__name__ and value.id and value.id not in found):
            try:
                found[value.id] = value()
            except TypeError:  # needs arguments: the module registers instances itself
                continue
    return list(found.values())


def _register_all() -> None:
    for name in FAMILY_MODULES:
        try:
            module = importlib.import_module(f"engine.families.{name}")
        except Exception as err:  # module missing, its pipeline class missing, or broken
            UNAVAILABLE[name] = f"{type(err).__name__}: {err}"
            log.debug("model family module %s unavailable: %s", name, err)
            continue
        for family in _collect(module):
            FAMILIES.setdefault(family.id, family)


_register_all()


def get_family(family_id: str) -> Family:
    family = FAMILIES.get(family_id)
    if family is None:
        why = ""
        for module, reason in UNAVAILABLE.items():
            if module.replace("_", "") in family_id.replace("-", "").replace("_", ""):
                why = f" (its module {module} could not be imported: {reason[:200]})"
        raise InvalidInput(
            f"model family {family_id!r} is not available in this installation{why}; "
            f"available: {', '.join(sorted(FAMILIES))}",
            "model",
        )
    return family


def family_for_pipeline_class(name: str) -> Family:
    """The family that loads diffusers pipeline class `name` (model_index.json `_class_name`)."""
    for family in FAMILIES.values():
        if name in family.pipeline_class_names:
            return family
    known = sorted(n for f in FAMILIES.values() for n in f.pipeline_class_names)
    raise InvalidInput(
        f"{name} is not an instruction-editing pipeline this engine runs; it runs {', '.join(known)}",
        "model",
    )


def family_of_pipeline(pipe: Any) -> Family:
    """The family of a loaded pipeline object (its class or a base class)."""
    for cls in type(pipe).__mro__:
        try:
            return family_for_pipeline_class(cls.__name__)
        except InvalidInput:
            continue
    return family_for_pipeline_class(type(pipe).__name__)


def detect_family(model: str | os.PathLike[str] | ModelSource | None, config: str | None = None,
                  allow_pickle: bool = False) -> Family:
    """The family of a model name as the engine would load it.

    A catalogue id → its entry's `family`; a diffusers folder, or a hub id in the cache →
    model_index.json's `_class_name`; a single file → the family its config folder names, else
    what the file's weight names say (SDXL vs SD 1.x), else `sd-ip2p`.
    """
    from engine.sources import ModelSource, read_model_index, resolve_model_source

    if not isinstance(model, ModelSource):
        entry = catalogue_entry(str(model)) if model is not None else default_catalogue_entry()
        if entry is not None and entry.get("family"):
            return get_family(entry["family"])
    source = resolve_model_source(model, allow_pickle)
    if source.kind == "single_file":
        if config:
            index = read_model_index(resolve_model_source(config))
            if index and isinstance(index.get("_class_name"), str):
                return family_for_pipeline_class(index["_class_name"])
        sniffed = _sniff_single_file(Path(source.location))
        return get_family(sniffed or DEFAULT_FAMILY)
    index = read_model_index(source)
    if index and isinstance(index.get("_class_name"), str):
        return family_for_pipeline_class(index["_class_name"])
    entry = catalogue_entry(source.location)
    return get_family(entry["family"] if entry and entry.get("family") else DEFAULT_FAMILY)


def _sniff_single_file(path: Path) -> str | None:
    """The family of a .safetensors checkpoint from its weight names (header only, no weights)."""
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as checkpoint:
            keys = set(checkpoint.keys())
    except Exception:  # unreadable: let the loader report it
        return None
    if "model.diffusion_model.label_emb.0.0.weight" in keys or any(
        key.startswith("conditioner.embedders.1.") for key in keys
    ):
        return "sdxl-ip2p"
    return None


# ------------------------------------------------------------------------------ catalogue


@cache
def _catalogue() -> tuple[dict[str, Any], ...]:
    data = json.loads(CATALOGUE_PATH.read_text(encoding="utf-8"))
    return tuple(entry for entry in data["models"] if isinstance(entry, dict) and "id" in entry)


def load_catalogue() -> list[dict[str, Any]]:
    """The model catalogue (shipped inside the package), as fresh dict copies."""
    return json.loads(json.dumps(list(_catalogue())))


def catalogue_entry(model_id: str | None) -> dict[str, Any] | None:
    if model_id is None:
        return None
    for entry in _catalogue():
        if entry["id"] == model_id:
            return json.loads(json.dumps(entry))
    return None


def default_catalogue_entry() -> dict[str, Any] | None:
    for entry in _catalogue():
        if entry.get("default"):
            return json.loads(json.dumps(entry))
    return None


def apply_preset(params: Any, entry: dict[str, Any] | None, preset_id: str | None = None) -> Any:
    """`params` (EditParams) with a catalogue preset's LoRAs, steps and options filled in.

    The preset is `preset_id`, else `params.preset`. What the request sets itself wins (its
    steps, its options); the preset's LoRAs come first, as `hf://repo/file` paths resolved from
    the hub cache when the edit runs. The result has `preset` None: it is expanded once.
    """
    from dataclasses import replace

    from engine.request import LoraSpec
    from engine.sources import hub_lora_path

    preset = find_preset(entry, preset_id or params.preset)
    if preset is None:
        return params
    loras = tuple(LoraSpec(hub_lora_path(x["repo"], x["file"]), float(x.get("strength", 1.0)))
                  for x in preset.get("loras") or [])
    return replace(
        params,
        steps=params.steps if params.steps is not None else preset.get("steps"),
        options={**(preset.get("options") or {}), **params.options},
        loras=loras + tuple(params.loras),
        preset=None,
    )


def find_preset(entry: dict[str, Any] | None, preset_id: str | None) -> dict[str, Any] | None:
    """The catalogue entry's preset of that id (None for no preset); InvalidInput naming
    `preset` when the model offers no such preset."""
    if not preset_id:
        return None
    presets = {p.get("id"): p for p in (entry or {}).get("presets") or []}
    if preset_id not in presets:
        available = ", ".join(str(k) for k in presets) or "none"
        raise InvalidInput(f"preset {preset_id!r} is not offered for this model (presets: {available})", "preset")
    return presets[preset_id]


__all__ = [
    "CATALOGUE_PATH",
    "FAMILIES",
    "UNAVAILABLE",
    "Family",
    "ParamSpec",
    "ResolutionRule",
    "RunInputs",
    "StepHooks",
    "StepsRule",
    "apply_preset",
    "catalogue_entry",
    "default_catalogue_entry",
    "detect_family",
    "family_for_pipeline_class",
    "family_of_pipeline",
    "find_preset",
    "get_family",
    "load_catalogue",
]
