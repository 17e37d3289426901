"""manifest.json is the single source of truth for name and versions; read it once."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

_MANIFEST_PATH = Path(__file__).resolve().parent.parent / "manifest.json"


def _load() -> dict[str, Any]:
    if _MANIFEST_PATH.is_file():
        return json.loads(_MANIFEST_PATH.read_text(encoding="utf-8"))
    # Installed without the source tree (a wheel): fall back to the distribution metadata.
    return {
        "name": "instruct-edit",
        "version": metadata.version("instruct-edit"),
        "api_version": 1,
        "default_model": "timbrooks/instruct-pix2pix",
    }


MANIFEST: dict[str, Any] = _load()
API_VERSION: int = int(MANIFEST["api_version"])
DEFAULT_MODEL: str = MANIFEST["default_model"]
