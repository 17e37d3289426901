"""A scriptable stand-in for the engine's HTTP API (stdlib only), for fast logic tests.

It speaks the same wire format as engine/server (multipart in, JSON status, SSE events,
PNG results) and edits by inverting the colours of the uploaded image, so tests can tell
exactly which pixels came back. Real-engine tests live in test_plugin_widgets.py.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from instruct_edit.qt import QBuffer, QByteArray, QImage, QIODevice


def invert_png(data: bytes) -> bytes:
    image = QImage()
    assert image.loadFromData(QByteArray(data), "PNG"), "upload is not a PNG"
    image = image.convertToFormat(QImage.Format.Format_RGB32)
    image.invertPixels()
    buffer = QBuffer()
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    image.save(buffer, "PNG")
    return bytes(buffer.data())


class FakeEngine:
    def __init__(self, token: str = "secret", steps_delay: float = 0.0) -> None:
        self.token = token
        self.steps_delay = steps_delay
        self.jobs: dict[str, dict[str, Any]] = {}
        self.uploads: list[dict[str, Any]] = []
        self.fail_with: tuple[int, dict] | None = None  # (status, error body) for POST
        self.sse = True
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

            def _authorised(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {engine.token}":
                    self._json(401, {"error": {"status": 401, "message": "bad token", "field": None}})
                    return False
                return True

            def do_GET(self) -> None:
                path = self.path
                if path == "/v1/health":
                    self._json(200, {"status": "ok", "device": "fake", "model": "fake-model"})
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
                    self._json(404, {"error": {"status": 404, "message": "no such edit", "field": None}})
                    return
                if len(parts) == 3:
                    self._json(200, engine.status(job))
                elif parts[3] == "events":
                    if not engine.sse:
                        self._json(404, {"error": {"status": 404, "message": "no events", "field": None}})
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    total = job["params"]["steps"]
                    for step in range(1, total + 1):
                        if job["state"] == "cancelled":
                            break
                        time.sleep(engine.steps_delay)
                        job["step"] = step
                        job["state"] = "running"
                        self.wfile.write(f"event: progress\ndata: {json.dumps(engine.status(job))}\n\n".encode())
                        self.wfile.flush()
                    if job["state"] != "cancelled":
                        job["state"] = "done"
                    self.wfile.write(f"event: {job['state']}\ndata: {json.dumps(engine.status(job))}\n\n".encode())
                    self.wfile.flush()
                    self.close_connection = True
                elif parts[3] == "results":
                    data = job["results"][int(parts[4])]
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            def do_POST(self) -> None:
                if not self._authorised():
                    return
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
                fields = {part.get_param("name", header="content-disposition"): part.get_content()
                          for part in message.iter_parts()}
                engine.uploads.append(fields)
                if engine.fail_with:
                    self._json(*engine.fail_with)
                    return
                params = json.loads(fields["params"])
                job_id = f"job{len(engine.jobs)}"
                results = [invert_png(fields["image"])] * params.get("variants", 1)
                engine.jobs[job_id] = {"id": job_id, "params": params, "state": "queued", "step": 0,
                                       "results": results}
                if not engine.sse:
                    engine.jobs[job_id]["state"] = "done"
                self._json(202, {"id": job_id, "state": "queued"})

            def do_DELETE(self) -> None:
                if not self._authorised():
                    return
                job = engine.jobs.get(self.path.strip("/").split("/")[2])
                if job:
                    job["state"] = "cancelled"
                self._json(200, engine.status(job) if job else {})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def status(self, job: dict[str, Any]) -> dict[str, Any]:
        done = job["state"] == "done"
        total = job["params"]["steps"]
        return {
            "id": job["id"], "state": job["state"],
            "progress": {"step": total if done else job["step"], "total": total},
            "error": None, "error_field": None,
            "results": [{"index": k, "url": f"/v1/edits/{job['id']}/results/{k}", "available": True}
                        for k in range(len(job["results"]))] if done else [],
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":
    # Standalone (used by benchmarks/bench_plugin.py, so its work does not share the
    # benchmark's GIL): print the URL, serve until killed.
    import os
    import sys

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    server = FakeEngine(token=sys.argv[1] if len(sys.argv) > 1 else "secret")
    print(server.url, flush=True)
    server.thread.join()
