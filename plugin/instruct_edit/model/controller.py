"""EditController: runs an edit from the document, through the engine, back into layers.

Order of work for one edit (each step hands over to the next; nothing blocks the UI):
  1. UI thread: read only the needed pixels from Krita (KritaDocument.read_source).
  2. worker: scale to the working size, encode PNGs, build the multipart bodies.
  3. network (Qt, asynchronous): submit, follow progress (SSE, polling as fallback),
     download the result PNGs.
  4. worker: decode, scale back to the region's size, keep results inside the selection.
  5. UI thread: insert one group with a layer per result, write provenance.
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import image as px
from ..client.engine_process import ManagedEngine
from ..client.errors import ApiError
from ..client.http import EngineClient, EventStream, multipart_body
from ..krita_document import KritaDocument, SourceRegion, UnsupportedDocument
from ..qt import QImage, QObject, QTimer
from ..request import EditRequest, RequestError, explore_grid
from . import naming
from . import settings as settings_module
from .background import run_in_background
from .state import (
    BUSY_STATES,
    CANCELLED,
    CONNECTED,
    DISCONNECTED,
    DONE,
    ERROR,
    FAILED,
    IDLE,
    PREPARING,
    QUEUED,
    RECEIVING,
    RUNNING,
    STARTING,
    EditState,
)

TERMINAL = ("done", "failed", "cancelled")
POLL_MS = 250


@dataclass
class PreparedUpload:
    """Step 2's output: what gets uploaded, plus what step 4 needs to put results back."""

    bodies: list[tuple[bytes, str]]  # one multipart body (+ content type) per request
    keep_alpha: bytes | None  # selection × source alpha over the region, None = opaque
    upload_size: tuple[int, int]


@dataclass
class Job:
    document: KritaDocument
    region: SourceRegion
    requests: list[EditRequest]
    label: str  # group name
    upload: PreparedUpload | None = None
    index: int = 0  # which request is running
    job_id: str | None = None
    stream: EventStream | None = None
    poll_timer: QTimer | None = None
    results: list[tuple[EditRequest, int, bytes]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    running_since: float | None = None
    steps_done_at_start: int = 0
    cancelled: bool = False
    finished: bool = False


def prepare_upload(region: SourceRegion, requests: list[EditRequest]) -> PreparedUpload:
    """Worker-thread half of step 2: scale to the working size and encode."""
    _, _, w, h = region.bounds
    picture = px.image_from_bgra(region.bgra, w, h)
    long_side = max(r.resolution for r in requests)
    uw, uh = px.working_size(w, h, long_side)
    upload = px.scaled(picture, uw, uh)
    image_png = px.encode_png(upload)
    mask_png = None
    if region.selection is not None:
        mask_png = px.encode_png(px.scaled(px.mask_image(region.selection, w, h), uw, uh))
    source_alpha = px.alpha_bytes(picture)
    if source_alpha.count(b"\xff") == len(source_alpha):
        source_alpha = None
    keep_alpha = px.multiply_masks(region.selection, source_alpha, w, h)
    bodies = []
    for request in requests:
        parts = [("image", "image.png", "image/png", image_png)]
        if mask_png is not None:
            parts.append(("mask", "mask.png", "image/png", mask_png))
        parts.append(("params", None, "application/json", request.to_json().encode("utf-8")))
        # Live previews cost the engine a decode each: about five per edit.
        parts.append(("preview_every", None, "text/plain", str(max(2, request.steps // 5)).encode()))
        bodies.append(multipart_body(parts))
    return PreparedUpload(bodies, keep_alpha, (uw, uh))


def finish_results(region: SourceRegion, keep_alpha: bytes | None,
                   results: list[bytes]) -> list[bytes]:
    """Worker-thread step 4: result PNGs -> BGRA bytes at the region's size."""
    _, _, w, h = region.bounds
    out = []
    for data in results:
        picture = px.scaled(px.decode_png(data), w, h)
        out.append(px.bgra_from_image(px.restrict_alpha(picture, keep_alpha, w, h)))
    return out


class EditController(QObject):
    def __init__(self, state: EditState, document_provider: Callable[[], KritaDocument | None],
                 settings: settings_module.Settings | None = None,
                 settings_path: Any = None, parent_pid: int | None = None,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.document_provider = document_provider
        self.settings_path = settings_path
        self.settings = settings or settings_module.load(settings_path)
        self.parent_pid = parent_pid
        self.client: EngineClient | None = None
        self.engine: ManagedEngine | None = None
        self.job: Job | None = None
        self.inserted_groups: list[Any] = []  # for tests and "edit this result"
        state.restore(self.settings.state)

    # --- connection -------------------------------------------------------------------

    def connect_engine(self) -> None:
        self.disconnect_engine()
        problems = self.settings.problems()
        if problems:
            self._set_connection(FAILED, problems[0] + " (Settings…)")
            return
        if self.settings.engine_mode == settings_module.REMOTE:
            self._use_engine(self.settings.remote_url, self.settings.remote_token)
            return
        engine = ManagedEngine(self.settings.python_path, self.settings.device,
                               self.settings.engine_model or None, self.parent_pid, parent=self)
        engine.status.connect(lambda text: self._set_connection(STARTING, text))
        engine.started.connect(self._use_engine)
        engine.crashed.connect(self._engine_crashed)
        engine.stopped.connect(lambda text: self._set_connection(FAILED, text))
        self.engine = engine
        self._set_connection(STARTING, "Starting the engine…")
        engine.start()

    def disconnect_engine(self) -> None:
        if self.job is not None and not self.job.finished:
            self._fail("The engine was disconnected during the edit.")
        if self.engine is not None:
            engine, self.engine = self.engine, None
            engine.stopped.disconnect()
            engine.crashed.disconnect()
            engine.stop()
            engine.deleteLater()
        self._drop_client()
        self._set_connection(DISCONNECTED, "Not connected")

    def _drop_client(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            client.close()
            client.deleteLater()

    def _use_engine(self, url: str, token: str) -> None:
        self._drop_client()
        client = EngineClient(url, token, parent=self)
        self.client = client
        self._set_connection(STARTING, f"Connecting to {url}…")

        def healthy(info: Any) -> None:
            if self.client is not client:
                return
            info = info if isinstance(info, dict) else {}
            device = info.get("device") or "?"
            self._set_connection(CONNECTED, f"Connected to {url} ({device})")
            client.models(self._models_arrived, lambda err: None)

        def unhealthy(err: ApiError) -> None:
            if self.client is client:
                self._set_connection(FAILED, err.message)

        client.health(healthy, unhealthy)

    def _models_arrived(self, answer: Any) -> None:
        models = answer.get("models", []) if isinstance(answer, dict) else answer
        loras = answer.get("loras", []) if isinstance(answer, dict) else []
        self.state.models = [m for m in models if isinstance(m, dict) and m.get("id")] if isinstance(models, list) else []
        self.state.loras = [str(lo) for lo in loras] if isinstance(loras, list) else []

    def _engine_crashed(self, message: str) -> None:
        self._drop_client()
        if self.job is not None and not self.job.finished:
            self._fail("The engine stopped unexpectedly during the edit; it is being restarted. "
                       "Press Edit again when it is connected.")
        self._set_connection(STARTING, message)

    def _set_connection(self, status: str, message: str) -> None:
        self.state.connection = status
        self.state.connection_message = message

    # --- editing ----------------------------------------------------------------------

    def edit(self, explore: bool = False) -> bool:
        """Start an edit with the current settings; False (with state.error set) if it can't."""
        state = self.state
        if state.busy:
            return False
        state.error, state.error_field, state.message = "", "", ""
        try:
            request = state.request().validate()
        except RequestError as err:
            return self._refuse(str(err), err.field)
        if self.client is None or state.connection != CONNECTED:
            return self._refuse("The engine is not connected yet. "
                                + (state.connection_message if state.connection == FAILED else
                                   "Wait for it to start, or check Settings."), "engine")
        document = self.document_provider()
        if document is None:
            return self._refuse("Open a document first.", "document")
        try:
            region = document.read_source(state.source)
        except UnsupportedDocument as err:
            return self._refuse(str(err), "source")
        requests = explore_grid(request) if explore else [request]
        state.remember_instruction(request.instruction)
        self._save_settings()
        job = Job(document, region, requests, naming.group_name(request.instruction))
        self.job = job
        state.preview = None
        state.step, state.total_steps = 0, sum(r.steps for r in requests)
        state.seconds_left = -1.0
        state.job_state = PREPARING

        def prepared(upload: PreparedUpload) -> None:
            if job is self.job and not job.cancelled:
                job.upload = upload
                self._submit(job)

        run_in_background(lambda: prepare_upload(region, requests), prepared,
                          lambda err: self._fail(f"Could not prepare the image: {err}", job=job))
        return True

    def cancel(self) -> None:
        job = self.job
        if job is None or job.finished:
            return
        job.cancelled = True
        self._stop_following(job)
        if job.job_id and self.client is not None:
            self.client.cancel(job.job_id, lambda _: None, lambda _: None)
        job.finished = True
        self.state.job_state = CANCELLED
        self.state.preview = None
        self.state.message = "Edit cancelled; nothing was added."

    def _refuse(self, message: str, field_name: str) -> bool:
        self.state.error, self.state.error_field = message, field_name
        return False

    def _submit(self, job: Job) -> None:
        client = self.client
        if client is None or job.upload is None:
            self._fail("The engine is not connected.", job=job)
            return
        body, content_type = job.upload.bodies[job.index]
        self.state.job_state = QUEUED

        def accepted(job_id: str) -> None:
            if job.cancelled:
                client.cancel(job_id, lambda _: None, lambda _: None)
                return
            job.job_id = job_id
            job.stream = client.events(job_id, lambda name, data: self._event(job, name, data),
                                       lambda err: self._stream_ended(job, err))

        client.submit(body, content_type, accepted, lambda err: self._request_failed(err, job))

    def _event(self, job: Job, name: str, data: Any) -> None:
        if job is not self.job or job.finished:
            return
        if not isinstance(data, dict):
            return
        status = data.get("state") or (name if name in (*TERMINAL, "queued", "running") else None)
        progress = data.get("progress") if isinstance(data.get("progress"), dict) else data
        step, total = progress.get("step"), progress.get("total")
        if isinstance(step, int) and isinstance(total, int) and total > 0:
            self._progress(job, step, total)
        preview = data.get("preview_png")
        if isinstance(preview, str) and preview:
            picture = QImage()
            if picture.loadFromData(base64.b64decode(preview.split(",")[-1])):
                self.state.preview = picture
        if status in TERMINAL:
            self._stop_following(job)
            self._check_job(job)
        elif status == "running" and self.state.job_state == QUEUED:
            self.state.job_state = RUNNING

    def _progress(self, job: Job, step: int, total: int) -> None:
        per_request = job.requests[job.index].steps
        # The engine may count all variants' steps; scale to this request's share.
        done = sum(r.steps for r in job.requests[: job.index]) + round(step / total * per_request)
        now = time.monotonic()
        if job.running_since is None:
            job.running_since, job.steps_done_at_start = now, done
        self.state.job_state = RUNNING
        self.state.step = done
        steps_run = done - job.steps_done_at_start
        if steps_run > 0:
            rate = (now - job.running_since) / steps_run
            self.state.seconds_left = rate * (self.state.total_steps - done)

    def _stream_ended(self, job: Job, error: ApiError | None) -> None:
        if job is not self.job or job.finished:
            return
        job.stream = None
        # The stream is a convenience; the job's own status is authoritative. Poll it.
        self._check_job(job)

    def _check_job(self, job: Job) -> None:
        client = self.client
        if client is None or job.job_id is None or job.finished:
            return
        client.job(job.job_id, lambda info: self._job_status(job, info),
                   lambda err: self._request_failed(err, job))

    def _job_status(self, job: Job, info: Any) -> None:
        if job is not self.job or job.finished or not isinstance(info, dict):
            return
        status = info.get("state")
        progress = info.get("progress") or {}
        if isinstance(progress, dict) and isinstance(progress.get("step"), int) and progress.get("total"):
            self._progress(job, progress["step"], int(progress["total"]))
        if status == "done":
            self._download(job, info.get("results") or [])
        elif status == "failed":
            self._fail(str(info.get("error") or "The engine could not make this edit."),
                       info.get("error_field"), job)
        elif status == "cancelled":
            self._fail("The engine cancelled the edit.", job=job)
        elif job.stream is None:
            # No live stream (ended early or unsupported): poll.
            if job.poll_timer is None:
                job.poll_timer = QTimer(self)
                job.poll_timer.setSingleShot(True)
                job.poll_timer.timeout.connect(lambda: self._check_job(job))
            job.poll_timer.start(POLL_MS)

    def _stop_following(self, job: Job) -> None:
        if job.stream is not None:
            job.stream.close()
            job.stream = None
        if job.poll_timer is not None:
            job.poll_timer.stop()

    def _download(self, job: Job, results: list[Any]) -> None:
        self._stop_following(job)
        client = self.client
        request = job.requests[job.index]
        count = len(results) or request.variants
        if client is None or job.job_id is None:
            return
        self.state.job_state = RECEIVING
        pending = {"left": count}
        received: dict[int, bytes] = {}
        job_id = job.job_id

        def got(k: int, data: bytes) -> None:
            if job.finished:
                return
            received[k] = data
            pending["left"] -= 1
            if pending["left"] == 0:
                job.results.extend((request, k, received[k]) for k in range(count))
                self._next_request(job)

        for k in range(count):
            client.result(job_id, k, lambda data, k=k: got(k, data),
                          lambda err: self._request_failed(err, job))

    def _next_request(self, job: Job) -> None:
        job.index += 1
        job.job_id = None
        job.running_since = None
        if job.index < len(job.requests):
            self._submit(job)
            return
        keep_alpha = job.upload.keep_alpha if job.upload else None
        pngs = [data for _, _, data in job.results]
        run_in_background(lambda: finish_results(job.region, keep_alpha, pngs),
                          lambda layers: self._insert(job, layers),
                          lambda err: self._fail(f"Could not read the engine's result: {err}", job=job))

    def _insert(self, job: Job, layers: list[bytes]) -> None:
        if job.finished:
            return
        region = job.region
        model_name = self._model_name(job.requests[0].model)
        entries = []
        for (request, k, _), data in zip(job.results, layers, strict=True):
            record = naming.provenance(request, k, region.source_name, region.source_kind,
                                       tuple(region.bounds), model_name, region.source_id)
            entries.append((naming.layer_name(request, k), data, record))
        try:
            group = job.document.insert_results(region, job.label, entries)
        except Exception as err:  # the document may have been closed meanwhile
            self._fail(f"Could not add the result layers ({err}). Was the document closed?", job=job)
            return
        self.inserted_groups.append(group)
        job.finished = True
        self.state.preview = None
        self.state.step = self.state.total_steps
        self.state.seconds_left = 0.0
        self.state.job_state = DONE
        seconds = time.monotonic() - job.started
        self.state.message = (f"Added “{job.label}” with {len(entries)} layer"
                              f"{'s' if len(entries) != 1 else ''} in {seconds:.0f} s.")

    def _model_name(self, model_id: str | None) -> str | None:
        if not model_id:
            return None
        for entry in self.state.models:
            if entry.get("id") == model_id:
                return str(entry.get("name") or model_id)
        return model_id

    def _request_failed(self, err: ApiError, job: Job) -> None:
        if err.kind == "connection" and self.engine is not None:
            # A managed engine that died drops connections just before Qt reports the
            # process's end; give the crash handler a moment to explain what happened.
            QTimer.singleShot(1000, lambda: self._fail(err.message, err.field, job))
            return
        self._fail(err.message, err.field, job)

    def _fail(self, message: str, field_name: str | None = None, job: Job | None = None) -> None:
        job = job or self.job
        if job is None or job is not self.job or job.finished:
            return
        job.finished = True
        self._stop_following(job)
        self.state.preview = None
        self.state.job_state = ERROR
        self.state.error, self.state.error_field = message, field_name or ""

    # --- provenance / chaining --------------------------------------------------------

    def refresh_selected_provenance(self) -> None:
        document = self.document_provider()
        record = None
        if document is not None:
            try:
                record = document.provenance_of(document.active_layer())
            except Exception:  # a document being closed; the next poll will tell
                record = None
        if record != self.state.selected_provenance:
            self.state.selected_provenance = record

    def edit_this_result(self) -> None:
        """Chain: make the next edit start from the selected result layer."""
        record = self.state.selected_provenance
        self.state.source = "layer"
        if record:
            self.state.instruction = ""
            self.state.message = f"Next edit starts from the result of “{record.get('instruction', '')}”."

    # --- persistence ------------------------------------------------------------------

    def _save_settings(self) -> None:
        self.settings.state = self.state.snapshot()
        # Settings are a convenience; an edit must not fail because they can't be saved.
        with contextlib.suppress(OSError):
            settings_module.save(self.settings, self.settings_path)

    def apply_settings(self, new_settings: settings_module.Settings) -> None:
        new_settings.state = self.state.snapshot()
        self.settings = new_settings
        self._save_settings()
        self.connect_engine()

    def shutdown(self) -> None:
        self.cancel()
        self._save_settings()
        self.disconnect_engine()


__all__ = ["BUSY_STATES", "IDLE", "EditController", "PreparedUpload", "finish_results", "prepare_upload"]
