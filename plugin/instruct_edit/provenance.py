"""The provenance record written for each result layer, and its storage in the document.

A record is plain JSON kept in one document annotation ({layer id: record}), so it travels
with the .kra file. It names the model's family parameters with the short names the engine
published, so it reads the same for every family, and for records of older plugin versions.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .request import EditRequest
from .specs import format_value

ANNOTATION_TYPE = "instruct-edit/provenance"
ANNOTATION_DESCRIPTION = "Instruct Edit: how each result layer was made"
#: Records of plugin versions before model families kept the guidance pair at the top level.
_LEGACY_OPTIONS = (("text_guidance", "text guidance"), ("image_guidance", "image guidance"))


def provenance(request: EditRequest, variant: int, source_layer: str, source_kind: str,
               bounds: tuple[int, int, int, int], model_name: str | None,
               source_id: str | None = None) -> dict[str, Any]:
    """What a result layer remembers: enough to understand and repeat the edit."""
    info = request.info
    return {
        "instruction": request.instruction,
        "model": model_name or (info.name if info else None) or request.model or "(engine default)",
        "model_id": request.model or (info.id if info else None),
        "family": info.family if info else None,
        "family_label": info.family_label if info else None,
        "seed": request.seed + variant,
        "steps": request.steps,
        "resolution": request.resolution,
        "options": dict(request.options),
        "option_names": {spec.name: spec.short for spec in (info.params if info else ())
                         if spec.name in request.options},
        "loras": [{"path": lora.path, "strength": lora.strength} for lora in request.loras],
        "preset": request.preset,
        "source_layer": source_layer,
        "source": source_kind,
        "source_id": source_id,
        "bounds": list(bounds),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def describe(record: dict[str, Any]) -> str:
    """A record as a few lines for the docker."""
    model = str(record.get("model", "?"))
    if record.get("family_label"):
        model += f" ({record['family_label']})"
    steps = record.get("steps")
    lines = [
        f"“{record.get('instruction', '?')}”",
        f"model {model}, seed {record.get('seed', '?')}, "
        + (f"{steps} steps" if steps is not None else "the model's steps"),
    ]
    options = record.get("options")
    names = record.get("option_names") if isinstance(record.get("option_names"), dict) else {}
    if isinstance(options, dict):
        shown = [f"{names.get(k, k)} {format_value(v)}" for k, v in options.items()
                 if not (isinstance(v, str) and len(v) > 40)]
    else:
        shown = [f"{label} {format_value(record[key])}" for key, label in _LEGACY_OPTIONS if key in record]
    if shown:
        lines.append(", ".join(shown))
    if record.get("preset"):
        lines.append(f"preset {record['preset']}")
    if record.get("loras"):
        lines.append("LoRA " + ", ".join(f"{lo.get('path', '?')} × {lo.get('strength', 1)}"
                                         for lo in record["loras"] if isinstance(lo, dict)))
    lines.append(f"from {record.get('source_layer', '?')}")
    return "\n".join(lines)


def decode_records(data: bytes | None) -> dict[str, dict[str, Any]]:
    """The annotation's bytes -> {layer id: record}; unreadable data counts as empty."""
    if not data:
        return {}
    try:
        payload = json.loads(bytes(data).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}
    records = payload.get("layers") if isinstance(payload, dict) else None
    if not isinstance(records, dict):
        return {}
    return {str(k): v for k, v in records.items() if isinstance(v, dict)}


def encode_records(records: dict[str, dict[str, Any]]) -> bytes:
    return json.dumps({"version": 1, "layers": records}, ensure_ascii=False).encode("utf-8")
