"""ApiError: what went wrong talking to the engine, in a painter's words, with what to do."""

from __future__ import annotations

import json


class ApiError(Exception):
    """`message` is shown as is; `field` names the setting at fault (or None)."""

    def __init__(self, message: str, status: int = 0, field: str | None = None,
                 kind: str = "engine") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.field = field
        #: "connection" (engine unreachable), "auth", "engine" (it answered with an error),
        #: "cancelled" or "protocol" (an answer the plugin does not understand).
        self.kind = kind


_FIELD_NAMES = {
    "instruction": "Instruction",
    "text_guidance": "Text guidance",
    "image_guidance": "Image guidance",
    "steps": "Steps",
    "seed": "Seed",
    "variants": "Variants",
    "resolution": "Resolution",
    "model": "Model",
    "loras": "LoRA",
    "image": "Image",
    "mask": "Selection",
    "dataset": "Dataset",
    "dataset_folder": "Dataset",
    "preset": "Preset",
    "name": "Training name",
}


def error_from_response(status: int, body: bytes) -> ApiError:
    """Turn an HTTP error answer (JSON `{"error": {message, field}}` or not) into an ApiError."""
    message, field = "", None
    try:
        payload = json.loads(body.decode("utf-8")) if body else {}
        error = payload.get("error", payload) if isinstance(payload, dict) else {}
        if isinstance(error, dict):
            message = str(error.get("message") or error.get("detail") or "")
            field = error.get("field")
        elif isinstance(error, str):
            message = error
    except (ValueError, UnicodeDecodeError):
        message = body[:200].decode("utf-8", "replace").strip()
    if status == 401:
        return ApiError(
            "The engine wants an access token and none was sent. Open Settings and paste the "
            "token the engine printed (or its token file's content), or use the local engine.",
            status, "token", kind="auth",
        )
    if status == 403 and field not in (None, "Authorization", "token"):
        # Not the token: a refusal about something else (e.g. a dataset folder sent to an
        # engine on another machine); its own message says what to do.
        return ApiError(message or "The engine refused this request.", status, field, kind="engine")
    if status == 403:
        return ApiError(
            "The engine refused the access token: it is wrong. Open Settings and paste the "
            "token the engine was started with (it prints where its token file is).",
            status, "token", kind="auth",
        )
    if status == 404 and not message:
        message = "The engine does not know this request (it may have restarted)."
    if status == 507 or "out of memory" in message.lower():
        return ApiError(
            f"The engine ran out of memory. Try a smaller resolution, fewer variants, or a "
            f"smaller selection. ({message})" if message else
            "The engine ran out of memory. Try a smaller resolution, fewer variants, or a smaller selection.",
            status, field, kind="engine",
        )
    if field and field in _FIELD_NAMES:
        message = f"{_FIELD_NAMES[field]}: {message}" if message else f"{_FIELD_NAMES[field]} is not valid."
    if not message:
        message = f"The engine answered with an error (HTTP {status})."
    return ApiError(message, status, field, kind="engine")
