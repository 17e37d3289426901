"""EngineClient: the engine's HTTP API (version 1) over Qt's asynchronous networking.

Every call returns at once; `on_done(value)` or `on_error(ApiError)` runs later on the
thread that owns the client (the UI thread in Krita). Uploads are prepared elsewhere
(see model/jobs.py): this module only moves bytes.
"""

from __future__ import annotations

import json
import secrets
import sys
import traceback
from collections.abc import Callable
from typing import Any, Union

from ..qt import (
    QByteArray,
    QNetworkAccessManager,
    QNetworkReply,
    QNetworkRequest,
    QObject,
    QtNetwork,
    QUrl,
)
from .errors import ApiError, error_from_response

OnDone = Callable[[Any], None]
OnError = Callable[[ApiError], None]
#: One multipart field: (name, filename or None, content type, data).
Part = tuple[str, Union[str, None], str, Union[bytes, QByteArray]]  # noqa: UP007 - Python 3.8 in Krita 5 on Windows


def guarded(on_done: Callable[..., None], on_error: OnError) -> Callable[..., None]:
    """Wrap a callback that Qt calls: an exception never escapes into Qt's event loop.

    A failure while handling an answer (an answer the plugin cannot use) goes to on_error
    as a "protocol" error; should on_error itself fail, the traceback is printed (Krita's
    log) and swallowed, so a Qt slot never raises.
    """

    def call(*args: Any) -> None:
        try:
            on_done(*args)
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            safe_error(on_error, ApiError(
                f"The plugin could not use the engine's answer ({type(err).__name__}: {err}).",
                kind="protocol"))

    return call


def safe_error(on_error: OnError, error: ApiError) -> None:
    try:
        on_error(error)
    except Exception:
        traceback.print_exc(file=sys.stderr)

DOWNLOAD_CHUNK = 2 << 20
_STATUS = QNetworkRequest.Attribute.HttpStatusCodeAttribute
_NO_ERROR = QNetworkReply.NetworkError.NoError
_CONNECTION_ERRORS = {
    QNetworkReply.NetworkError.ConnectionRefusedError,
    QNetworkReply.NetworkError.HostNotFoundError,
    QNetworkReply.NetworkError.TimeoutError,
    QNetworkReply.NetworkError.RemoteHostClosedError,
    QNetworkReply.NetworkError.TemporaryNetworkFailureError,
    QNetworkReply.NetworkError.NetworkSessionFailedError,
    QNetworkReply.NetworkError.UnknownNetworkError,
}


def multipart_body(fields: list[tuple[str, str | None, str, bytes]]) -> tuple[bytes, str]:
    """Encode (name, filename, content type, data) parts as multipart/form-data.

    Returns the body and the Content-Type header (with its boundary).
    """
    boundary = "instruct-edit-" + secrets.token_hex(12)
    chunks: list[bytes] = []
    for name, filename, content_type, data in fields:
        disposition = f'form-data; name="{name}"'
        if filename:
            disposition += f'; filename="{filename}"'
        chunks.append(
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
            f"Content-Type: {content_type}\r\n\r\n".encode()
        )
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def multipart(parts: list[Part]) -> QtNetwork.QHttpMultiPart:
    """The same form as a QHttpMultiPart: Qt streams each part's QByteArray, no joined copy.

    Pixels handed in as a QByteArray are shared, not copied (Qt's implicit sharing), so a
    64 MiB layer costs 64 MiB once, however many requests upload it.
    """
    form = QtNetwork.QHttpMultiPart(QtNetwork.QHttpMultiPart.ContentType.FormDataType)
    form.setBoundary(("instruct-edit-" + secrets.token_hex(12)).encode())
    for name, filename, content_type, data in parts:
        part = QtNetwork.QHttpPart()
        disposition = f'form-data; name="{name}"'
        if filename:
            disposition += f'; filename="{filename}"'
        part.setRawHeader(b"Content-Disposition", disposition.encode())
        part.setRawHeader(b"Content-Type", content_type.encode())
        part.setBody(data if isinstance(data, QByteArray) else QByteArray(data))
        form.append(part)
    return form


class EventStream(QObject):
    """A server-sent-events stream: calls on_event(name, data) for each complete event."""

    def __init__(self, reply: QNetworkReply, on_event: Callable[[str, Any], None],
                 on_end: Callable[[ApiError | None], None]) -> None:
        super().__init__(reply)
        self._reply = reply
        self._buffer = b""
        self._on_event = on_event
        self._on_end = on_end
        self._closed = False
        reply.readyRead.connect(self._read)
        reply.finished.connect(self._finished)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._reply.abort()

    def _read(self) -> None:
        try:
            self._parse()
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            if not self._closed:
                self.close()
                safe_error(self._on_end, ApiError(
                    f"The engine's progress stream could not be read ({err}).", kind="protocol"))

    def _parse(self) -> None:
        self._buffer += bytes(self._reply.readAll())
        self._buffer = self._buffer.replace(b"\r\n", b"\n")
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            name, data_lines = "message", []
            for line in block.decode("utf-8", "replace").split("\n"):
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data_lines.append(line[5:].lstrip())
            if not data_lines and name == "message":
                continue  # a comment / keep-alive
            text = "\n".join(data_lines)
            try:
                data: Any = json.loads(text) if text else {}
            except ValueError:
                data = text
            if not self._closed:
                self._on_event(name, data)

    def _finished(self) -> None:
        if self._closed:
            self._reply.deleteLater()
            return
        self._read()
        if self._closed:  # the stream failed while reading its last bytes
            self._reply.deleteLater()
            return
        self._closed = True
        error = None
        status = self._reply.attribute(_STATUS)
        if self._reply.error() != _NO_ERROR or (status and int(status) >= 400):
            error = _reply_error(self._reply)
        self._reply.deleteLater()
        safe_error(self._on_end, error)


class EngineClient(QObject):
    """One engine at `base_url` (e.g. http://127.0.0.1:8765) with its bearer token."""

    def __init__(self, base_url: str, token: str | None = None, parent: QObject | None = None,
                 timeout_ms: int = 30_000) -> None:
        super().__init__(parent)
        self.base_url = base_url.rstrip("/")
        self.token = token or None
        self.timeout_ms = timeout_ms
        #: Set when this engine refused a raw-pixel upload (an older engine): PNG from then on.
        self.raw_refused = False
        self._network = QNetworkAccessManager(self)
        self._replies: set[QNetworkReply] = set()
        self._streams: set[EventStream] = set()

    def close(self) -> None:
        """Stop every request without calling back; call before dropping the client.

        Destroying the network manager with requests in flight would call their handlers
        on half-destroyed replies.
        """
        for reply in list(self._replies):
            reply.finished.disconnect()
            reply.abort()
            reply.deleteLater()
        self._replies.clear()
        for stream in list(self._streams):
            stream.close()
        self._streams.clear()

    # --- the API ---------------------------------------------------------------------

    def health(self, on_done: OnDone, on_error: OnError) -> QNetworkReply:
        return self._send("GET", "/v1/health", on_done, on_error, timeout_ms=5_000)

    def models(self, on_done: OnDone, on_error: OnError) -> QNetworkReply:
        return self._send("GET", "/v1/models", on_done, on_error)

    def submit(self, body: bytes | list[Part], content_type: str | None,
               on_done: Callable[[str], None], on_error: OnError) -> QNetworkReply:
        """POST an edit; on_done gets the job id.

        `body` is either a list of parts (sent as a QHttpMultiPart, pixels not copied) or a
        ready body from `multipart_body` with its content type.
        """

        def accepted(answer: Any) -> None:
            job_id = answer.get("id") if isinstance(answer, dict) else None
            if not job_id or not isinstance(job_id, (str, int)):
                on_error(ApiError("The engine accepted the edit but sent no job id; update the engine.",
                                  kind="protocol"))
            else:
                on_done(str(job_id))

        if isinstance(body, list):
            return self._send("POST", "/v1/edits", accepted, on_error, form=multipart(body),
                              timeout_ms=120_000)
        return self._send("POST", "/v1/edits", accepted, on_error, body=body,
                          content_type=content_type, timeout_ms=120_000)

    def job(self, job_id: str, on_done: OnDone, on_error: OnError) -> QNetworkReply:
        return self._send("GET", f"/v1/edits/{job_id}", on_done, on_error)

    def result(self, job_id: str, index: int, on_done: Callable[[bytes], None],
               on_error: OnError) -> QNetworkReply:
        """The result as the engine's default (PNG) bytes."""
        return self._send("GET", f"/v1/edits/{job_id}/results/{index}",
                          lambda data: on_done(bytes(data)), on_error, raw=True, timeout_ms=120_000)

    def download(self, job_id: str, index: int, fmt: str,
                 on_done: Callable[[QByteArray, str, tuple[int, int] | None], None],
                 on_error: OnError, expected_bytes: int = 0) -> QNetworkReply:
        """Result k in `fmt` (png, bgra8, rgba8): on_done(data, content type, declared size).

        The answer is appended to one buffer as it arrives (reserved up front for raw
        pixels), so no 64 MiB copy happens in one go on the UI thread at the end.
        """
        request = self._request(f"/v1/edits/{job_id}/results/{index}?format={fmt}", 120_000)
        reply = self._network.get(request)
        # Back-pressure: Qt buffers at most this much before the UI thread takes it, so one
        # readyRead never copies tens of MiB at once (a stall) and nothing piles up twice.
        reply.setReadBufferSize(DOWNLOAD_CHUNK)
        self._replies.add(reply)
        buffer = QByteArray()
        if expected_bytes > 0:
            buffer.reserve(expected_bytes)
        base_url = self.base_url

        def ready() -> None:
            buffer.append(reply.readAll())

        def finished() -> None:
            self._replies.discard(reply)
            reply.deleteLater()
            buffer.append(reply.readAll())
            status = reply.attribute(_STATUS)
            if reply.error() != _NO_ERROR and not status:
                on_error(_reply_error(reply, base_url))
                return
            if status and int(status) >= 400:
                on_error(error_from_response(int(status), bytes(buffer)))
                return
            content_type = bytes(reply.rawHeader(b"Content-Type")).decode("latin-1")
            declared = None
            width, height = reply.rawHeader(b"X-Image-Width"), reply.rawHeader(b"X-Image-Height")
            if not width.isEmpty() or not height.isEmpty():
                try:
                    declared = (int(bytes(width)), int(bytes(height)))
                except ValueError:
                    declared = (-1, -1)
            on_done(buffer, content_type, declared)

        reply.readyRead.connect(guarded(ready, on_error))
        reply.finished.connect(guarded(finished, on_error))
        return reply

    def cancel(self, job_id: str, on_done: OnDone, on_error: OnError) -> QNetworkReply:
        return self._send("DELETE", f"/v1/edits/{job_id}", on_done, on_error)

    def events(self, job_id: str, on_event: Callable[[str, Any], None],
               on_end: Callable[[ApiError | None], None]) -> EventStream:
        return self._stream(f"/v1/edits/{job_id}/events", on_event, on_end)

    # --- training jobs (issue 14: /v1/trainings) ------------------------------------------

    def training_options(self, on_done: OnDone, on_error: OnError) -> QNetworkReply:
        """What can be trained: models (trainable or why not), presets, limits, datasets."""
        return self._send("GET", "/v1/training-options", on_done, on_error)

    def trainings(self, on_done: OnDone, on_error: OnError) -> QNetworkReply:
        """Every training the engine knows (newest first), also those from before a restart."""
        return self._send("GET", "/v1/trainings", on_done, on_error)

    def training(self, training_id: str, on_done: OnDone, on_error: OnError) -> QNetworkReply:
        return self._send("GET", f"/v1/trainings/{training_id}", on_done, on_error)

    def start_training(self, params: dict[str, Any], on_done: OnDone, on_error: OnError, *,
                       dataset_folder: str | None = None,
                       dataset_zip: bytes | None = None) -> QNetworkReply:
        """POST a training: a dataset folder the engine can read (loopback only), or a zip."""
        if (dataset_folder is None) == (dataset_zip is None):
            raise ValueError("give exactly one of dataset_folder and dataset_zip")
        if dataset_folder is not None:
            body = json.dumps({**params, "dataset_folder": dataset_folder}).encode()
            return self._send("POST", "/v1/trainings", on_done, on_error, body=body,
                              content_type="application/json", timeout_ms=120_000)
        parts: list[Part] = [
            ("params", None, "application/json", json.dumps(params).encode()),
            ("dataset", "dataset.zip", "application/zip", dataset_zip or b""),
        ]
        return self._send("POST", "/v1/trainings", on_done, on_error, form=multipart(parts),
                          timeout_ms=300_000)

    def cancel_training(self, training_id: str, on_done: OnDone, on_error: OnError) -> QNetworkReply:
        return self._send("DELETE", f"/v1/trainings/{training_id}", on_done, on_error)

    def resume_training(self, training_id: str, on_done: OnDone, on_error: OnError) -> QNetworkReply:
        return self._send("POST", f"/v1/trainings/{training_id}/resume", on_done, on_error,
                          body=b"{}", content_type="application/json")

    def training_events(self, training_id: str, on_event: Callable[[str, Any], None],
                        on_end: Callable[[ApiError | None], None]) -> EventStream:
        return self._stream(f"/v1/trainings/{training_id}/events", on_event, on_end)

    def validation_image(self, training_id: str, index: int, on_done: Callable[[bytes], None],
                         on_error: OnError) -> QNetworkReply:
        """Validation grid `index` of a training, as PNG bytes."""
        return self._send("GET", f"/v1/trainings/{training_id}/validations/{index}",
                          lambda data: on_done(bytes(data)), on_error, raw=True)

    def _stream(self, path: str, on_event: Callable[[str, Any], None],
                on_end: Callable[[ApiError | None], None]) -> EventStream:
        request = self._request(path, timeout_ms=0)
        request.setRawHeader(b"Accept", b"text/event-stream")
        reply = self._network.get(request)

        def ended(error: ApiError | None) -> None:
            self._streams.discard(stream)
            on_end(error)

        stream = EventStream(reply, on_event, ended)
        self._streams.add(stream)
        return stream

    # --- plumbing --------------------------------------------------------------------

    def _request(self, path: str, timeout_ms: int | None = None) -> QNetworkRequest:
        request = QNetworkRequest(QUrl(self.base_url + path))
        if self.token:
            request.setRawHeader(b"Authorization", f"Bearer {self.token}".encode())
        request.setTransferTimeout(self.timeout_ms if timeout_ms is None else timeout_ms)
        return request

    def _send(self, method: str, path: str, on_done: OnDone, on_error: OnError, *,
              body: bytes | None = None, content_type: str | None = None, raw: bool = False,
              timeout_ms: int | None = None, form: Any = None) -> QNetworkReply:
        request = self._request(path, timeout_ms)
        if content_type:
            request.setRawHeader(b"Content-Type", content_type.encode())
        if method == "GET":
            reply = self._network.get(request)
        elif method == "POST" and form is not None:
            reply = self._network.post(request, form)
            form.setParent(reply)  # deleted with the reply, after the upload
        elif method == "POST":
            reply = self._network.post(request, QByteArray(body or b""))
        elif method == "DELETE":
            reply = self._network.deleteResource(request)
        else:  # pragma: no cover - programming error
            raise ValueError(method)
        base_url = self.base_url
        self._replies.add(reply)

        def finished() -> None:
            self._replies.discard(reply)
            reply.deleteLater()
            status = reply.attribute(_STATUS)
            if reply.error() != _NO_ERROR and not status:
                on_error(_reply_error(reply, base_url))
                return
            data = reply.readAll()
            if status and int(status) >= 400:
                on_error(error_from_response(int(status), bytes(data)))
                return
            if raw:
                on_done(data)
                return
            try:
                answer = json.loads(bytes(data).decode("utf-8")) if not data.isEmpty() else {}
            except ValueError:
                on_error(ApiError(f"The engine at {base_url} sent an answer the plugin cannot read. "
                                  "Is this address really an Instruct Edit engine?", kind="protocol"))
                return
            on_done(answer)

        reply.finished.connect(guarded(finished, on_error))
        return reply


def _reply_error(reply: QNetworkReply, base_url: str = "") -> ApiError:
    status = reply.attribute(_STATUS)
    if status and int(status) >= 400:
        return error_from_response(int(status), bytes(reply.readAll()))
    code = reply.error()
    where = f" at {base_url}" if base_url else ""
    if code == QNetworkReply.NetworkError.OperationCanceledError:
        return ApiError("The request was stopped.", kind="cancelled")
    if code in _CONNECTION_ERRORS:
        return ApiError(
            f"Can't reach the engine{where} ({reply.errorString()}). Start the engine, or check "
            "the address in Settings.", kind="connection")
    return ApiError(f"Network error talking to the engine{where}: {reply.errorString()}",
                    kind="connection")
