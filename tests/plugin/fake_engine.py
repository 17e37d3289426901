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

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
        self.extra_results = 0  # the status lists this many more results than made
        self.result_size_delta = 0  # results this many pixels wider than the upload
        self.stall_events = False  # the event stream goes quiet after one event
        self.instance: dict[str, Any] | None = None  # GET /v1/health `instance`
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
                    self._json(200, {"default_model": "fake-model", "loras": ["style-a"],
                                     "models": [{"id": "fake-model", "name": "Fake", "default": True}]})
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

            def _events(self, job: dict[str, Any]) -> None:
                if not engine.sse:
                    self._error(404, "no events", None)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                total = job["params"].get("steps") or 4
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

            def do_DELETE(self) -> None:
                if not self._authorised():
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
