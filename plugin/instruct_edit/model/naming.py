"""Names for result groups and layers, and the provenance record written for each result."""

from __future__ import annotations

import json
import time
from typing import Any

from ..request import EditRequest

GROUP_NAME_CHARS = 60
ANNOTATION_TYPE = "instruct-edit/provenance"
ANNOTATION_DESCRIPTION = "Instruct Edit: how each result layer was made"


def _number(value: float) -> str:
    return f"{value:g}"


def group_name(instruction: str) -> str:
    """The group holding an edit's variants is named after the instruction (shortened)."""
    text = " ".join(instruction.split())
    if len(text) > GROUP_NAME_CHARS:
        text = text[: GROUP_NAME_CHARS - 1].rstrip() + "…"
    return text or "Instruct Edit"


def layer_name(request: EditRequest, variant: int) -> str:
    """One variant's layer: seed and guidance, e.g. `seed 42 · text 7.5 · image 1.5`."""
    return (f"seed {request.seed + variant} · text {_number(request.text_guidance)} · "
            f"image {_number(request.image_guidance)}")


def provenance(request: EditRequest, variant: int, source_layer: str, source_kind: str,
               bounds: tuple[int, int, int, int], model_name: str | None,
               source_id: str | None = None) -> dict[str, Any]:
    """What a result layer remembers: enough to understand and repeat the edit."""
    return {
        "instruction": request.instruction,
        "model": model_name or request.model or "(engine default)",
        "seed": request.seed + variant,
        "text_guidance": request.text_guidance,
        "image_guidance": request.image_guidance,
        "steps": request.steps,
        "resolution": request.resolution,
        "loras": [{"path": lora.path, "strength": lora.strength} for lora in request.loras],
        "source_layer": source_layer,
        "source": source_kind,
        "source_id": source_id,
        "bounds": list(bounds),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def describe(record: dict[str, Any]) -> str:
    """Provenance as a few lines for the docker."""
    lines = [
        f"“{record.get('instruction', '?')}”",
        f"model {record.get('model', '?')}, seed {record.get('seed', '?')}, "
        f"{record.get('steps', '?')} steps",
        f"text guidance {record.get('text_guidance', '?')}, image guidance {record.get('image_guidance', '?')}",
        f"from {record.get('source_layer', '?')}",
    ]
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
    return {str(k): v for k, v in records.items() if isinstance(v, dict)} if isinstance(records, dict) else {}


def encode_records(records: dict[str, dict[str, Any]]) -> bytes:
    return json.dumps({"version": 1, "layers": records}, ensure_ascii=False).encode("utf-8")
