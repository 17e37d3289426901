"""Helpers for the HTTP service tests: a fast fake editor, PNG helpers, request shortcuts."""

from __future__ import annotations

import io
import json
import threading
import time
from typing import Any

from fastapi.testclient import TestClient
from PIL import Image

from engine.editor import Progress
from engine.errors import EditCancelled
from engine.server import ServerSettings

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def png_bytes(size: tuple[int, int] = (64, 48), color: Any = "red", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


class FakeEditor:
    """Behaves like engine.editor.Editor at no cost: one `step_s` sleep per step, honours
    cancel within a step, reports progress (with a preview when asked), returns tinted copies.

    `gate`, when given, holds every edit before its first step until it is set."""

    def __init__(
        self, model: str, device: str, step_s: float = 0.0, gate: threading.Event | None = None
    ) -> None:
        self.model, self.device = model, device
        self.step_s = step_s
        self.gate = gate
        self.calls: list[Any] = []

    def edit(self, image, params, mask=None, *, on_progress=None, cancel=None, preview_every=0):
        self.calls.append(params)
        if self.gate is not None:
            while not self.gate.wait(0.01):
                if cancel is not None and cancel.is_set():
                    raise EditCancelled()
        for step in range(1, params.steps + 1):
            if cancel is not None and cancel.is_set():
                raise EditCancelled()
            if self.step_s:
                time.sleep(self.step_s)
            preview = (
                image.resize((32, 32)) if preview_every and step % preview_every == 0 else None
            )
            if on_progress is not None:
                on_progress(Progress(step=step, total=params.steps, preview=preview))
        if cancel is not None and cancel.is_set():
            raise EditCancelled()
        return [
            Image.new(image.mode, image.size, (k * 40 % 256, 0, 0)) for k in range(params.variants)
        ]


class EchoEditor(FakeEditor):
    """Answers with its input, unchanged (what the real Editor does for an empty instruction),
    and remembers the image and mask it was given."""

    def edit(self, image, params, mask=None, **kwargs):
        self.calls.append(params)
        self.inputs = (image.copy(), mask.copy() if mask is not None else None)
        return [image.copy() for _ in range(params.variants)]


class FakeFactory:
    """Editor factory that records what it loaded; `make` can be replaced per test."""

    def __init__(
        self, step_s: float = 0.0, gate: threading.Event | None = None, editor: type = FakeEditor
    ) -> None:
        self.step_s, self.gate, self.editor = step_s, gate, editor
        self.loaded: list[tuple[str, str]] = []
        self.editors: dict[str, FakeEditor] = {}

    def __call__(self, model: str, device: str) -> FakeEditor:
        self.loaded.append((model, device))
        editor = self.editor(model, device, self.step_s, self.gate)
        self.editors[model] = editor
        return editor


def make_settings(**overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "token": TOKEN,
        "devices": ("cpu",),
        "model": "timbrooks/instruct-pix2pix",
        # TestClient sends `Host: testserver`; real servers accept only their own names.
        "allowed_hosts": ("testserver",),
    }
    values.update(overrides)
    return ServerSettings(**values)


def raw_type(fmt: str, width: int, height: int) -> str:
    return f"image/x-raw; format={fmt}; width={width}; height={height}"


def submit(
    client: TestClient,
    params: dict[str, Any] | None = None,
    image: bytes | None = None,
    image_type: str = "image/png",
    mask_type: str = "image/png",
    **extra: Any,
):
    files: dict[str, Any] = {
        "image": ("image.png", image if image is not None else png_bytes(), image_type)
    }
    if "mask" in extra:
        files["mask"] = ("mask.png", extra.pop("mask"), mask_type)
    data = {"params": json.dumps(params or {"instruction": "make it blue", "steps": 2})}
    data.update({k: str(v) for k, v in extra.items()})
    return client.post("/v1/edits", headers=AUTH, files=files, data=data)


def wait_finished(client: TestClient, job_id: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/edits/{job_id}", headers=AUTH).json()
        if status["state"] in ("done", "failed", "cancelled"):
            return status
        time.sleep(0.01)
    raise AssertionError(f"edit {job_id} did not finish within {timeout} s: {status}")
