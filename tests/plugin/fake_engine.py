"""A scriptable stand-in for the engine's HTTP API (stdlib + numpy + Qt's PNG), for fast tests.

It speaks the engine's wire format (docs/api.md): multipart uploads whose `image`/`mask`
parts are PNG or raw pixels (`image/x-raw; format=bgra8|rgba8|gray8; width=W; height=H`),
JSON status, server-sent events, results as `?format=png|bgra8|rgba8`. Like the real
engine it blends a mask at full resolution (outside the mask the source bytes come back
exactly) and keeps the source's alpha.

Modes: "invert" (default: the colours inverted, so tests can predict every pixel) and
"echo" (the input comes back unchanged: a lossless round trip must give identical pixels).
Knobs make it misbehave the ways a broken or older engine could (see FakeEngine.__init__).
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from instruct_edit.qt import QBuffer, QByteArray, QImage, QIODevice

ARGB32 = QImage.Format.Format_ARGB32
BPP = {"bgra8": 4, "rgba8": 4, "gray8": 1}


class BadUpload(Exception):
    def __init__(self, status: int, message: str, field: str) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str, bytes]]:
    """name -> (part content type, bytes), without copying the parts more than once."""
    boundary = None
    for piece in content_type.split(";"):
        key, _, value = piece.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"').encode()
    if not boundary:
        raise BadUpload(400, "no multipart boundary", "body")
    delimiter = b"--" + boundary
    fields: dict[str, tuple[str, bytes]] = {}
    position = body.find(delimiter)
    while position >= 0:
        start = position + len(delimiter)
        if body[start : start + 2] == b"--":
            break
        start += 2  # CRLF
        header_end = body.find(b"\r\n\r\n", start)
        headers = body[start:header_end].decode("latin-1").split("\r\n")
        following = body.find(b"\r\n" + delimiter, header_end + 4)
        data = body[header_end + 4 : following]
        name, part_type = None, "text/plain"
        for line in headers:
            key, _, value = line.partition(":")
            if key.lower() == "content-disposition":
                for item in value.split(";"):
                    k, _, v = item.strip().partition("=")
                    if k == "name":
                        name = v.strip('"')
            elif key.lower() == "content-type":
                part_type = value.strip()
        if name:
            fields[name] = (part_type, data)
        position = following + 2 if following >= 0 else -1
    return fields


def raw_type(value: str) -> tuple[str, int, int] | None:
    pieces = [p.strip() for p in value.split(";")]
    if pieces[0].lower() != "image/x-raw":
        return None
    params = dict(p.partition("=")[::2] for p in pieces[1:])
    try:
        return params.get("format", ""), int(params.get("width", "")), int(params.get("height", ""))
    except ValueError:
        return params.get("format", ""), -1, -1


def decode_part(field: str, part_type: str, data: bytes, gray: bool) -> tuple[np.ndarray, int, int]:
    """An uploaded part -> (H×W×4 BGRA or H×W gray uint8 array, width, height)."""
    raw = raw_type(part_type)
    if raw is not None:
        fmt, w, h = raw
        allowed = ("gray8",) if gray else ("bgra8", "rgba8")
        if fmt not in allowed:
            raise BadUpload(422, f"{field}: format must be one of {', '.join(allowed)}", field)
        if w <= 0 or h <= 0:
            raise BadUpload(422, f"{field}: width and height are required", field)
        if len(data) != w * h * BPP[fmt]:
            raise BadUpload(422, f"{field}: {len(data)} bytes for {w}×{h} {fmt} "
                                 f"(expected {w * h * BPP[fmt]})", field)
        array = np.frombuffer(data, np.uint8)
        if gray:
            return array.reshape(h, w), w, h
        array = array.reshape(h, w, 4)
        if fmt == "rgba8":
            array = array[..., [2, 1, 0, 3]]
        return array, w, h
    image = QImage()
    if not image.loadFromData(QByteArray(data), "PNG"):
        raise BadUpload(422, f"{field} is not a PNG file", field)
    w, h = image.width(), image.height()
    image = image.convertToFormat(QImage.Format.Format_Grayscale8 if gray else ARGB32)
    bpp = 1 if gray else 4
    rows = np.frombuffer(image.constBits().asstring(image.sizeInBytes()), np.uint8)
    rows = rows.reshape(h, image.bytesPerLine())[:, : w * bpp]
    return (rows.reshape(h, w) if gray else rows.reshape(h, w, 4)).copy(), w, h


def edit(source: np.ndarray, mask: np.ndarray | None, mode: str) -> np.ndarray:
    """The fake edit + the engine's blend: source + mask·(edited − source), alpha kept."""
    if mode == "echo":
        return source
    edited = source.copy()
    edited[..., :3] = 255 - source[..., :3]
    if mask is None:
        return edited
    weight = mask.astype(np.float32)[..., None] / 255.0
    blended = np.rint(source[..., :3] + weight * (edited[..., :3].astype(np.float32) - source[..., :3]))
    out = source.copy()
    out[..., :3] = np.clip(blended, 0, 255).astype(np.uint8)
    return np.where((mask == 0)[..., None], source, out)


def png_of(bgra: np.ndarray) -> bytes:
    h, w = bgra.shape[:2]
    data = np.ascontiguousarray(bgra).tobytes()
    image = QImage(data, w, h, w * 4, ARGB32)
    buffer = QBuffer()
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    image.save(buffer, "PNG", 80)
    return bytes(buffer.data())


def invert_png(data: bytes) -> bytes:
    array, _, _ = decode_part("image", "image/png", data, gray=False)
    return png_of(edit(array, None, "invert"))


class FakeEngine:
    def __init__(self, token: str = "secret", steps_delay: float = 0.0, mode: str = "invert",
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.token = token
        self.steps_delay = steps_delay
        self.mode = mode
        self.jobs: dict[str, dict[str, Any]] = {}
        self.uploads: list[dict[str, Any]] = []  # per POST: {name: bytes or str}
        self.upload_types: list[dict[str, str]] = []  # per POST: {name: part content type}
        self.result_requests: list[str] = []  # the paths (with ?format=) results were fetched by
        self.fail_with: tuple[int, dict] | None = None  # (status, error body) for POST
        self.sse = True
        # Misbehaviour knobs:
        self.legacy = False  # an engine from before raw pixels: PNG uploads, PNG results only
        self.bad_preview: str | None = None  # sent as preview_png in progress events
        self.bad_progress: Any = None  # sent as progress.step in events
        self.first_use_note: str | None = None  # a progress note (step 0) before the steps
        self.extra_results = 0  # the status lists this many more results than made
        self.result_size_delta = 0  # results this many pixels wider than the upload
        self.stall_events = False  # the event stream goes quiet after one event
        self.instance: dict[str, Any] | None = None  # GET /v1/health `instance`
        self.trainings = FakeTrainings(self)  # the /v1/trainings routes
        self.engine_datasets: list[dict[str, Any]] = []  # training-options `datasets`
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, message: str, field: str | None) -> None:
                self._json(status, {"error": {"status": status, "message": message, "field": field}})

            def _authorised(self) -> bool:
                given = self.headers.get("Authorization")
                if not given:
                    self._error(401, "this route needs the header 'Authorization: Bearer <token>'",
                                "Authorization")
                    return False
                if given != f"Bearer {engine.token}":
                    self._error(403, "the token is wrong", "Authorization")
                    return False
                return True

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                path = url.path
                if path == "/v1/health":
                    answer = {"status": "ok", "device": "fake", "model": "fake-model"}
                    if engine.instance is not None:
                        answer["instance"] = engine.instance
                    self._json(200, answer)
                    return
                if not self._authorised():
                    return
                if path == "/v1/models":
                    self._json(200, {"default_model": "fake-model",
                                     "loras": ["style-a", *engine.trainings.loras],
                                     "models": [{"id": "fake-model", "name": "Fake", "default": True}]})
                    return
                if path.startswith(("/v1/trainings", "/v1/training-options")):
                    self._training_get(path)
                    return
                parts = path.strip("/").split("/")
                job = engine.jobs.get(parts[2]) if len(parts) >= 3 else None
                if job is None:
                    self._error(404, "no such edit", None)
                    return
                if len(parts) == 3:
                    self._json(200, engine.status(job))
                elif parts[3] == "events":
                    self._events(job)
                elif parts[3] == "results":
                    engine.result_requests.append(self.path)
                    fmt = parse_qs(url.query).get("format", ["png"])[0]
                    self._result(job["results"][int(parts[4])], "png" if engine.legacy else fmt)

            def _training_get(self, path: str) -> None:
                trainings = engine.trainings
                if path == "/v1/training-options":
                    self._json(200, trainings.options(engine.engine_datasets))
                    return
                if path == "/v1/trainings":
                    jobs = sorted(trainings.jobs.values(), key=lambda j: -j["created"])
                    self._json(200, {"trainings": [trainings.status(j) for j in jobs]})
                    return
                parts = path.strip("/").split("/")
                job = trainings.jobs.get(parts[2]) if len(parts) >= 3 else None
                if job is None:
                    self._error(404, "no such training", None)
                elif len(parts) == 3:
                    self._json(200, trainings.status(job))
                elif parts[3] == "validations" and len(parts) == 5:
                    pngs = job.get("pngs", [])
                    index = int(parts[4])
                    if not 0 <= index < len(pngs):
                        self._error(404, "no such validation", None)
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(pngs[index])))
                    self.end_headers()
                    self.wfile.write(pngs[index])
                elif parts[3] == "events":
                    self._training_events(job)
                else:
                    self._error(404, "no such route", None)

            def _training_events(self, job: dict[str, Any]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                with engine.trainings.lock:
                    sent = len(job["events"])
                    first = engine.trainings.status(job)
                self.wfile.write(f"event: state\ndata: {json.dumps(first)}\n\n".encode())
                self.wfile.flush()
                final = ("done", "failed", "cancelled", "interrupted")
                while first["state"] not in final:
                    time.sleep(0.01)
                    with engine.trainings.lock:
                        fresh = job["events"][sent:]
                    sent += len(fresh)
                    for name, data in fresh:
                        self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                        self.wfile.flush()
                        if name == "state" and data["state"] in final:
                            self.close_connection = True
                            return
                self.close_connection = True

            def _events(self, job: dict[str, Any]) -> None:
                if not engine.sse:
                    self._error(404, "no events", None)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                total = job["params"].get("steps") or 4
                if engine.first_use_note is not None:
                    job["state"] = "running"
                    event = engine.status(job)
                    event["progress"]["note"] = engine.first_use_note
                    self.wfile.write(f"event: progress\ndata: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(0.3)
                for step in range(1, total + 1):
                    if job["state"] == "cancelled":
                        break
                    time.sleep(engine.steps_delay)
                    job["step"] = step
                    job["state"] = "running"
                    event = engine.status(job)
                    if engine.bad_progress is not None:
                        event["progress"]["step"] = engine.bad_progress
                    if engine.bad_preview is not None:
                        event["preview_png"] = engine.bad_preview
                    self.wfile.write(f"event: progress\ndata: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                    if engine.stall_events:
                        # Quiet from here on, while the edit finishes behind the stream's back.
                        job["step"], job["state"] = total, "done"
                        time.sleep(30)
                        return
                if job["state"] != "cancelled":
                    job["state"] = "done"
                self.wfile.write(f"event: {job['state']}\ndata: {json.dumps(engine.status(job))}\n\n".encode())
                self.wfile.flush()
                self.close_connection = True

            def _result(self, pixels: np.ndarray, fmt: str) -> None:
                h, w = pixels.shape[:2]
                if fmt == "png":
                    data, content_type = png_of(pixels), "image/png"
                elif fmt in ("bgra8", "rgba8"):
                    data = (pixels if fmt == "bgra8" else pixels[..., [2, 1, 0, 3]]).tobytes()
                    content_type = f"image/x-raw; format={fmt}; width={w}; height={h}"
                else:
                    self._error(422, "format must be png, bgra8 or rgba8", "format")
                    return
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                if fmt != "png":
                    self.send_header("X-Image-Width", str(w))
                    self.send_header("X-Image-Height", str(h))
                self.end_headers()
                view = memoryview(data)
                for start in range(0, len(data), 1 << 22):
                    self.wfile.write(view[start : start + (1 << 22)])

            def do_POST(self) -> None:
                if not self._authorised():
                    return
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                if self.path.startswith("/v1/trainings"):
                    self._training_post(body)
                    return
                try:
                    fields = parse_multipart(body, self.headers["Content-Type"])
                    del body
                    engine.upload_types.append({k: t for k, (t, _) in fields.items()})
                    engine.uploads.append({k: (v.decode() if not t.startswith("image/") else v)
                                           for k, (t, v) in fields.items()})
                    if engine.fail_with:
                        self._json(*engine.fail_with)
                        return
                    if engine.legacy and any(t.startswith("image/x-raw") for t, _ in fields.values()):
                        raise BadUpload(422, "image is not a PNG file; export the image as PNG "
                                             "and send it again", "image")
                    image, w, h = decode_part("image", *fields["image"], gray=False)
                    mask = None
                    if "mask" in fields:
                        mask, mw, mh = decode_part("mask", *fields["mask"], gray=True)
                        if (mw, mh) != (w, h):
                            raise BadUpload(422, "the mask's size differs from the image's", "mask")
                except BadUpload as err:
                    self._error(err.status, err.message, err.field)
                    return
                params = json.loads(fields["params"][1])
                result = edit(image, mask, engine.mode)
                if engine.result_size_delta:
                    pad = np.zeros((h, engine.result_size_delta, 4), np.uint8)
                    result = np.concatenate([result, pad], axis=1)
                job_id = f"job{len(engine.jobs)}"
                count = params.get("variants", 1)
                engine.jobs[job_id] = {"id": job_id, "params": params, "state": "queued", "step": 0,
                                       "results": [np.ascontiguousarray(result)] * count}
                if not engine.sse:
                    engine.jobs[job_id]["state"] = "done"
                self._json(202, {"id": job_id, "state": "queued"})

            def _training_post(self, body: bytes) -> None:
                trainings = engine.trainings
                parts = self.path.strip("/").split("/")
                if len(parts) == 2:
                    self._json(*trainings.create(self.headers.get("Content-Type", ""), body))
                    return
                job = trainings.jobs.get(parts[2])
                if job is None or len(parts) != 4 or parts[3] != "resume":
                    self._error(404, "no such training", None)
                    return
                self._json(*trainings.resume(job))

            def do_DELETE(self) -> None:
                if not self._authorised():
                    return
                if self.path.startswith("/v1/trainings/"):
                    job = engine.trainings.jobs.get(self.path.strip("/").split("/")[2])
                    if job is None:
                        self._error(404, "no such training", None)
                    else:
                        self._json(200, engine.trainings.cancel(job))
                    return
                job = engine.jobs.get(self.path.strip("/").split("/")[2])
                if job and job["state"] not in ("done", "failed"):
                    job["state"] = "cancelled"
                self._json(200, engine.status(job) if job else {})

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def status(self, job: dict[str, Any]) -> dict[str, Any]:
        done = job["state"] == "done"
        total = job["params"].get("steps") or 4
        count = len(job["results"]) + self.extra_results
        return {
            "id": job["id"], "state": job["state"],
            "progress": {"step": total if done else job["step"], "total": total},
            "error": None, "error_field": None,
            "results": [{"index": k, "url": f"/v1/edits/{job['id']}/results/{k}", "available": True}
                        for k in range(count)] if done else [],
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- training jobs (/v1/trainings, issue 14) ---------------------------------------------------

TRAINING_PRESETS = [
    {"id": "quick", "label": "Quick", "max_steps": 6, "lora_rank": 4, "resolution": 256,
     "learning_rate": 1e-4, "batch_size": 1, "grad_accum": 1, "minutes_hint": "a minute"},
    {"id": "balanced", "label": "Balanced", "max_steps": 10, "lora_rank": 8, "resolution": 256,
     "learning_rate": 1e-4, "batch_size": 1, "grad_accum": 2, "minutes_hint": "a few minutes"},
    {"id": "thorough", "label": "Thorough", "max_steps": 20, "lora_rank": 16, "resolution": 512,
     "learning_rate": 5e-5, "batch_size": 1, "grad_accum": 4, "minutes_hint": "ten minutes"},
]
NAME_RULE = re.compile(r"^[A-Za-z0-9 _.-]{1,64}$")


def validation_png(step: int) -> bytes:
    """A stand-in validation grid (before | model's after | painter's after), coloured by step."""
    grid = np.zeros((32, 96, 4), np.uint8)
    grid[..., 3] = 255
    grid[:, :32, :3] = 40
    grid[:, 32:64, 2] = min(255, step * 20)
    grid[:, 64:, 1] = 200
    return png_of(grid)


class FakeTrainings:
    """The training routes of the contract, with a simulated runner (a thread per job).

    Each job advances a step every `step_delay` s, logs a loss, writes a validation every
    `validation_every` steps and, when done, adds its LoRA to the engine's list. Knobs:
    `allow_folder` (False: a dataset folder is refused with 403, as for a remote client),
    `min_pairs`, `hold` (jobs wait before their first step until released).
    """

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.jobs: dict[str, dict[str, Any]] = {}
        self.posts: list[dict[str, Any]] = []  # per POST: {"kind", "params", "files", "folder"}
        self.loras: list[str] = []
        self.min_pairs = 2
        self.step_delay = 0.03
        self.validation_every = 3
        self.checkpoint_every = 2  # a cancelled/interrupted job resumes from the last multiple
        self.allow_folder = True
        self.hold = threading.Event()
        self.hold.set()
        self.lock = threading.Lock()

    # --- helpers for tests ---
    def interrupt_all(self) -> None:
        """Simulate an engine restart: running jobs become interrupted (resumable)."""
        with self.lock:
            for job in self.jobs.values():
                if job["state"] in ("queued", "running", "paused"):
                    job["stop"] = True
                    self._set_state(job, "interrupted",
                                    resumable=job["step"] >= self.checkpoint_every)

    def status(self, job: dict[str, Any]) -> dict[str, Any]:
        keys = ("id", "name", "model", "preset", "settings", "pairs", "state", "step", "max_steps",
                "loss", "eta_s", "validations", "error", "field", "lora", "created", "updated",
                "resumable")
        return {k: job[k] for k in keys}

    def _emit(self, job: dict[str, Any], name: str, data: dict[str, Any]) -> None:
        job["events"].append((name, data))

    def _set_state(self, job: dict[str, Any], state: str, **changes: Any) -> None:
        job.update(state=state, updated=time.time(), **changes)
        self._emit(job, "state", self.status(job))

    # --- the dataset checks ---
    def _count_pairs(self, read: Any) -> tuple[int, list[str]]:
        """(pairs, problems) of a pairs folder given `read(name) -> bytes | None`."""
        metadata = read("metadata.jsonl")
        if metadata is None:
            return 0, ["metadata.jsonl is missing"]
        pairs, problems = 0, []
        for number, line in enumerate(metadata.decode().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            sizes = []
            for key in ("input_image", "edited_image"):
                data = read(row.get(key, ""))
                image = QImage()
                if data is None or not image.loadFromData(QByteArray(data), "PNG"):
                    problems.append(f"row {number}: {key} {row.get(key)!r} is not readable")
                    break
                sizes.append((image.width(), image.height()))
            else:
                if sizes[0] != sizes[1]:
                    problems.append(f"row {number}: before and after differ in size")
                else:
                    pairs += 1
        return pairs, problems

    # --- routes ---
    def options(self, loopback_datasets: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {
            "models": [{"id": "fake-model", "family": "sd-ip2p", "trainable": True, "why_not": None},
                       {"id": "big-model", "family": "flux-kontext", "trainable": False,
                        "why_not": "training this family needs a GPU with 24 GB"}],
            "presets": TRAINING_PRESETS, "min_pairs": self.min_pairs, "max_dataset_mb": 64,
            "datasets": loopback_datasets or [],
        }

    def create(self, content_type: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if content_type.startswith("application/json"):
            params = json.loads(body)
            folder = params.pop("dataset_folder", None)
            post = {"kind": "folder", "params": params, "folder": folder, "files": []}
            self.posts.append(post)
            if not self.allow_folder:
                return 403, _error(403, "this engine runs on another machine: upload the dataset as "
                                        "a zip", "dataset_folder")
            base = Path(str(folder))

            def read(name: str) -> bytes | None:
                path = base / name
                return path.read_bytes() if name and path.is_file() else None
        else:
            fields = parse_multipart(body, content_type)
            params = json.loads(fields["params"][1])
            archive = zipfile.ZipFile(io.BytesIO(fields["dataset"][1]))
            names = archive.namelist()
            post = {"kind": "zip", "params": params, "folder": None, "files": sorted(names)}
            self.posts.append(post)

            def read(name: str) -> bytes | None:
                return archive.read(name) if name in names else None

        if not NAME_RULE.match(str(params.get("name", ""))):
            return 422, _error(422, "name: 1–64 letters, digits, space, . _ -", "name")
        preset = next((p for p in TRAINING_PRESETS if p["id"] == params.get("preset")), None)
        if preset is None:
            return 422, _error(422, f"unknown preset {params.get('preset')!r}", "preset")
        if params.get("model") != "fake-model":
            return 422, _error(422, f"{params.get('model')!r} cannot be trained here", "model")
        pairs, problems = self._count_pairs(read)
        if problems:
            return 422, _error(422, "; ".join(problems[:5]), "dataset")
        if pairs < self.min_pairs:
            return 422, _error(422, f"the dataset has {pairs} pairs; at least {self.min_pairs} are "
                                    "needed", "dataset")
        with self.lock:
            if any(j["state"] in ("queued", "running", "paused") for j in self.jobs.values()):
                return 409, _error(409, "a training is already running; wait or cancel it", None)
            job_id = f"train{len(self.jobs)}"
            settings = {k: preset[k] for k in ("max_steps", "lora_rank", "resolution",
                                               "learning_rate", "batch_size", "grad_accum")}
            settings.update(params.get("overrides") or {})
            now = time.time()
            job = {"id": job_id, "name": params["name"], "model": params["model"],
                   "preset": preset["id"], "settings": settings, "pairs": pairs, "state": "queued",
                   "step": 0, "max_steps": settings["max_steps"], "loss": [], "eta_s": None,
                   "validations": [], "error": None, "field": None, "lora": None,
                   "created": now, "updated": now, "resumable": False, "events": [], "stop": False}
            self.jobs[job_id] = job
        self._run(job)
        return 202, self.status(job)

    def _run(self, job: dict[str, Any]) -> None:
        job["stop"] = False

        def work() -> None:
            self.hold.wait()
            with self.lock:
                if job["stop"]:
                    return
                self._set_state(job, "running")
            while True:
                time.sleep(self.step_delay)
                with self.lock:
                    if job["stop"] or job["state"] != "running":
                        return
                    step = job["step"] + 1
                    # Each run of a step logs another value (a resumed run differs).
                    loss = round(0.5 / (1 + 0.3 * step) * 0.9 ** job.get("resumes", 0), 5)
                    eta = round((job["max_steps"] - step) * self.step_delay, 3)
                    job.update(step=step, eta_s=eta, updated=time.time())
                    # After a resume the steps since the checkpoint run again: new points
                    # replace theirs (as the real engine's loss curve does).
                    job["loss"] = [p for p in job["loss"] if p[0] < step] + [[step, loss]]
                    self._emit(job, "progress", {"step": step, "max_steps": job["max_steps"],
                                                 "loss": loss, "eta_s": eta})
                    if step % self.validation_every == 0 or step == job["max_steps"]:
                        index = len(job["validations"])
                        job["validations"].append({"step": step, "index": index})
                        job.setdefault("pngs", []).append(validation_png(step))
                        self._emit(job, "validation", {"step": step, "index": index})
                    if step >= job["max_steps"]:
                        name, number = job["name"], 2
                        while f"trained/{name}/pytorch_lora_weights.safetensors" in self.loras:
                            name, number = f"{job['name']}-{number}", number + 1
                        path = f"trained/{name}/pytorch_lora_weights.safetensors"
                        self.loras.append(path)
                        card = (f"# {name}\n\nBase model: {job['model']}\n\nPairs: {job['pairs']}\n\n"
                                f"Steps: {step} · rank {job['settings']['lora_rank']}\n")
                        self._set_state(job, "done", eta_s=0.0, resumable=False,
                                        lora={"path": path, "card": card})
                        return

        threading.Thread(target=work, daemon=True).start()

    def cancel(self, job: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            if job["state"] in ("queued", "running", "paused"):
                job["stop"] = True
                self._set_state(job, "cancelled", resumable=job["step"] >= self.checkpoint_every)
        return self.status(job)

    def resume(self, job: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            if job["state"] not in ("interrupted", "cancelled", "failed") or not job["resumable"]:
                return 409, _error(409, f"the training is {job['state']}: nothing to resume", None)
            if any(j["state"] in ("queued", "running", "paused") for j in self.jobs.values()):
                return 409, _error(409, "a training is already running; wait or cancel it", None)
            job["resumes"] = job.get("resumes", 0) + 1
            job["resumed_from"] = job["step"] // self.checkpoint_every * self.checkpoint_every
            job["step"] = job["resumed_from"]  # back to the last checkpoint
            self._set_state(job, "queued", resumable=False)
        self._run(job)
        return 202, self.status(job)


def _error(status: int, message: str, field: str | None) -> dict[str, Any]:
    return {"error": {"status": status, "message": message, "field": field}}


if __name__ == "__main__":
    # Standalone (benchmarks/bench_plugin.py, the real-Krita e2e): its work does not share
    # the caller's GIL. Prints the URL, serves until killed.
    #   python fake_engine.py [TOKEN] [--mode echo|invert] [--port N]
    import argparse
    import os

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    parser = argparse.ArgumentParser()
    parser.add_argument("token", nargs="?", default="secret")
    parser.add_argument("--mode", default="invert", choices=("invert", "echo"))
    parser.add_argument("--port", type=int, default=0)
    options = parser.parse_args()
    server = FakeEngine(token=options.token, mode=options.mode, port=options.port)
    print(server.url, flush=True)
    server.thread.join()
