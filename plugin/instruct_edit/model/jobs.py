"""EditJob: one edit from the document's pixels, through the engine, into new layers.

Order of work (each step hands over to the next; nothing blocks the UI for long):
  1. UI thread, a strip per event-loop turn: read the region's BGRA bytes (and the
     selection's gray bytes) from Krita into one buffer each. No scaling, ever.
  2. Encode for the wire: to an engine on this machine the bytes go as they are
     (`image/x-raw; format=bgra8; width=W; height=H`, the selection as gray8); to an engine
     elsewhere as PNG at a fast zlib level (worker thread). Both are lossless.
  3. Network (Qt, asynchronous): submit each request, follow its progress (server-sent
     events, a status poll every ~30 s to notice a stalled stream, polling as fallback).
  4. Download each result at full resolution (raw bgra8 on loopback, PNG elsewhere),
     check it has exactly the region's size, and write it into a new paint layer a strip
     per turn. The engine blended the selection at full resolution; the plugin places
     exactly the returned pixels.
  5. UI thread: insert one group holding the layers (one undo step), with provenance.

Malformed engine answers fail the edit with a message; nothing raises inside a Qt slot
and an edit never stays "running" after its engine stopped talking.
"""

from __future__ import annotations

import base64
import binascii
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from .. import image as px
from ..client.errors import ApiError
from ..client.http import EventStream, Part
from ..krita_document import KritaDocument, SourceRegion, UnsupportedDocument
from ..qt import QByteArray, QImage, QObject, QTimer
from .background import run_in_background
from .state import CANCELLED, DONE, ERROR, PREPARING, QUEUED, RECEIVING, RUNNING, EditState

TERMINAL = ("done", "failed", "cancelled")
POLL_MS = 250
#: Without a progress event for this long, the job's status is polled (stalled stream?).
WATCHDOG_MS = 30_000
#: Statuses that mean "the engine cannot read this upload format": fall back to PNG once.
RAW_REFUSED = (400, 415, 422)

LayerNamer = Callable[[Any, int], tuple[str, dict[str, Any]]]


class JobFailed(Exception):
    """An engine answer the plugin cannot use; the message is shown as is."""


def _int_or_none(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobFailed(f"The engine sent progress the plugin cannot read ({what} = {value!r}); "
                        "update the engine.")
    return value


def request_steps(request: Any) -> int | None:
    steps = getattr(request, "steps", None)
    return steps if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0 else None


def upload_parts(image: Any, image_type: str, mask: Any | None, mask_type: str,
                 request: Any) -> list[Part]:
    """The multipart fields of one POST /v1/edits (pixels shared, not copied)."""
    raw = image_type.startswith("image/x-raw")
    parts: list[Part] = [("image", "image.raw" if raw else "image.png", image_type, image)]
    if mask is not None:
        parts.append(("mask", "mask.raw" if raw else "mask.png", mask_type, mask))
    parts.append(("params", None, "application/json", request.to_json().encode("utf-8")))
    steps = request_steps(request)
    # Live previews cost the engine a decode each: about five per edit.
    parts.append(("preview_every", None, "text/plain", str(max(2, (steps or 20) // 5)).encode()))
    return parts


class EditJob(QObject):
    def __init__(self, state: EditState, connection: Any, document: KritaDocument,
                 region: SourceRegion, requests: list[Any], label: str,
                 layer_namer: LayerNamer, on_inserted: Callable[[Any], None],
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.state = state
        self.connection = connection
        self.document = document
        self.region = region
        self.requests = requests
        self.label = label
        self.layer_namer = layer_namer
        self.on_inserted = on_inserted
        self.index = 0  # which request is running
        self.job_id: str | None = None
        self.stream: EventStream | None = None
        self.poll_timer: QTimer | None = None
        self.watchdog = QTimer(self)
        self.watchdog.timeout.connect(self._guard(self._watchdog_tick))
        self.layers: list[tuple[Any, dict[str, Any]]] = []  # written, not yet inserted
        self.started = time.monotonic()
        self.running_since: float | None = None
        self.steps_done_at_start = 0
        self.last_event = time.monotonic()
        self.last_step = 0
        self.shares = [request_steps(r) for r in requests]  # steps per request, None = unknown
        self.cancelled = False
        self.finished = False
        self.notes: list[str] = []  # told with the final message
        self.raw = False  # uploading raw pixels (loopback) rather than PNG
        self.image: Any = None  # what is uploaded: QByteArray (raw) or bytes (PNG)
        self.mask: Any = None
        self.image_type = self.mask_type = ""
        self._rows_read = 0

    # --- plumbing -------------------------------------------------------------------------

    def _guard(self, function: Callable[..., None]) -> Callable[..., None]:
        """Slots and timers call through this: a failure ends the edit with a message."""

        def call(*args: Any) -> None:
            if self.finished:
                return
            try:
                function(*args)
            except JobFailed as err:
                self.fail(str(err))
            except UnsupportedDocument as err:
                self.fail(str(err), "source")
            except Exception as err:
                traceback.print_exc(file=sys.stderr)
                self.fail(f"The edit failed inside the plugin ({type(err).__name__}: {err}). "
                          "Please report this.")

        return call

    def _later(self, function: Callable[[], None], ms: int = 0) -> None:
        QTimer.singleShot(ms, self._guard(function))

    @property
    def client(self) -> Any:
        return self.connection.client

    @property
    def width(self) -> int:
        return self.region.bounds.width

    @property
    def height(self) -> int:
        return self.region.bounds.height

    # --- 1. read --------------------------------------------------------------------------

    def start(self) -> None:
        state = self.state
        state.preview = None
        known = [s for s in self.shares if s is not None]
        state.step, state.total_steps = 0, sum(known) if len(known) == len(self.shares) else 0
        state.seconds_left = -1.0
        state.engine_note = ""
        state.job_state = PREPARING
        if self.region.bgra is not None:  # already read (tests, benchmarks)
            self._later(self._encode)
        else:
            self._later(self._read_strip)

    def _read_strip(self) -> None:
        region = self.region
        rows = min(px.strip_rows(self.width), self.height - self._rows_read)
        data, mask = self.document.read_rows(region, self._rows_read, rows)
        if self._rows_read == 0 and rows == self.height:
            region.bgra, region.selection = data, mask
        else:
            if region.bgra is None:
                region.bgra = QByteArray()
                region.bgra.reserve(self.width * self.height * 4)
                if mask is not None:
                    region.selection = QByteArray()
                    region.selection.reserve(self.width * self.height)
            region.bgra.append(data)
            if mask is not None and region.selection is not None:
                region.selection.append(mask)
        self._rows_read += rows
        if self._rows_read < self.height:
            self._later(self._read_strip)
            return
        self.document.settle_selection(region)
        self._encode()

    # --- 2. encode ------------------------------------------------------------------------

    def _encode(self) -> None:
        region = self.region
        client = self.client
        if client is None:
            raise JobFailed("The engine is not connected.")
        if self.connection.loopback and not getattr(client, "raw_refused", False):
            self.raw = True
            self.image = region.bgra
            self.image_type = px.raw_content_type("bgra8", self.width, self.height)
            self.mask = region.selection
            self.mask_type = px.raw_content_type("gray8", self.width, self.height)
            self._submit()
            return
        self._encode_png()

    def _encode_png(self) -> None:
        region = self.region
        w, h = self.width, self.height
        bgra, selection = region.bgra, region.selection

        def work() -> tuple[bytes, bytes | None]:
            image = px.png_from_bgra(bgra, w, h)
            mask = px.png_from_mask(selection, w, h) if selection is not None else None
            return image, mask

        def encoded(result: tuple[bytes, bytes | None]) -> None:
            # Only the PNGs are kept from here on: never both PNG and raw pixels.
            self.raw = False
            self.image, self.mask = result
            self.image_type = self.mask_type = "image/png"
            self.region.bgra = self.region.selection = None
            self._submit()

        run_in_background(work, self._guard(encoded),
                          self._guard(lambda err: self.fail(f"Could not prepare the image: {err}")))

    # --- 3. submit and follow ---------------------------------------------------------------

    def _submit(self) -> None:
        client = self.client
        if client is None:
            raise JobFailed("The engine is not connected.")
        request = self.requests[self.index]
        parts = upload_parts(self.image, self.image_type, self.mask, self.mask_type, request)
        self.state.job_state = QUEUED

        def accepted(job_id: str) -> None:
            if self.cancelled or self.finished:
                client.cancel(job_id, lambda _: None, lambda _: None)
                return
            self.job_id = job_id
            if self.index == len(self.requests) - 1:
                # Every request is in: the upload's pixels are not needed any more.
                self.image = self.mask = None
                self.region.bgra = self.region.selection = None
            self._follow()

        client.submit(parts, None, self._guard(accepted), self._guard(self._submit_failed))

    def _submit_failed(self, err: ApiError) -> None:
        client = self.client
        if (self.raw and err.status in RAW_REFUSED and err.field in ("image", "mask")
                and client is not None and self.region.bgra is not None):
            # An engine from before raw uploads: send PNG from now on.
            client.raw_refused = True
            self._encode_png()
            return
        self._request_failed(err)

    def _follow(self) -> None:
        client = self.client
        if client is None or self.job_id is None:
            raise JobFailed("The engine is not connected.")
        self.last_event = time.monotonic()
        self.stream = client.events(self.job_id, self._guard(self._event),
                                    self._guard(self._stream_ended))
        self.watchdog.start(WATCHDOG_MS)

    def _event(self, name: str, data: Any) -> None:
        self.last_event = time.monotonic()
        if not isinstance(data, dict):
            return
        status = data.get("state") or (name if name in (*TERMINAL, "queued", "running") else None)
        self._read_progress(data.get("progress") if isinstance(data.get("progress"), dict) else data)
        preview = data.get("preview_png")
        if preview is not None:
            self.state.preview = self._decode_preview(preview)
        if status in TERMINAL:
            self._stop_following()
            self._check_job()
        elif status == "running" and self.state.job_state == QUEUED:
            self.state.job_state = RUNNING

    @staticmethod
    def _decode_preview(preview: Any) -> QImage:
        if not isinstance(preview, str):
            raise JobFailed("The engine sent a live preview the plugin cannot read; update the engine.")
        try:
            data = base64.b64decode(preview.split(",")[-1], validate=True)
        except (binascii.Error, ValueError) as err:
            raise JobFailed(f"The engine sent a live preview that is not valid base64 ({err}); "
                            "update the engine.") from err
        picture = QImage()
        if not picture.loadFromData(QByteArray(data)):
            raise JobFailed("The engine sent a live preview that is not an image; update the engine.")
        return picture

    def _read_progress(self, progress: dict[str, Any]) -> None:
        note = progress.get("note")
        self.state.engine_note = note[:200] if isinstance(note, str) else ""
        step = _int_or_none(progress.get("step"), "step")
        total = _int_or_none(progress.get("total"), "total")
        if step is None or total is None or total <= 0:
            return
        if self.state.engine_note:
            # Before the steps (a first-use conversion): running, but no rate to measure yet.
            self.state.job_state = RUNNING
            return
        if not 0 <= step <= total:
            raise JobFailed(f"The engine reported step {step} of {total}; update the engine.")
        self.last_step = max(self.last_step, step)
        share = self.shares[self.index]
        if share is None:
            share = self.shares[self.index] = total
            known = [s if s is not None else total for s in self.shares]
            self.state.total_steps = sum(known)
        # The engine may count all variants' steps; scale to this request's share.
        done = sum(s or 0 for s in self.shares[: self.index]) + round(step / total * share)
        now = time.monotonic()
        if self.running_since is None:
            self.running_since, self.steps_done_at_start = now, done
        self.state.job_state = RUNNING
        self.state.step = done
        steps_run = done - self.steps_done_at_start
        if steps_run > 0:
            rate = (now - self.running_since) / steps_run
            self.state.seconds_left = rate * (self.state.total_steps - done)

    def _stream_ended(self, error: ApiError | None) -> None:
        self.stream = None
        # The stream is a convenience; the job's own status is authoritative. Poll it.
        self._check_job()

    def _watchdog_tick(self) -> None:
        if self.stream is None or self.job_id is None:
            return
        if time.monotonic() - self.last_event < WATCHDOG_MS / 1000 * 0.9:
            return
        client = self.client
        if client is None:
            raise JobFailed("The engine is not connected.")
        seen = self.last_step

        def status(info: Any) -> None:
            if not isinstance(info, dict):
                raise JobFailed("The engine sent a status the plugin cannot read; update the engine.")
            progress = info.get("progress") if isinstance(info.get("progress"), dict) else {}
            step = _int_or_none(progress.get("step"), "step")
            moved = info.get("state") in TERMINAL or (step is not None and step > seen)
            if moved:
                # The engine works on but its event stream went quiet: follow by polling.
                if self.stream is not None:
                    self.stream.close()
                    self.stream = None
                self.notes.append("The engine's progress stream stalled; the edit was followed "
                                  "by asking for its status instead.")
                self.state.message = self.notes[-1]
                self._job_status(info)

        def unreachable(err: ApiError) -> None:
            self.fail("The engine stopped answering during the edit (no progress for "
                      f"{WATCHDOG_MS // 1000} s, and its status could not be read: {err.message}).")

        client.job(self.job_id, self._guard(status), self._guard(unreachable))

    def _check_job(self) -> None:
        client = self.client
        if client is None:
            raise JobFailed("The engine is not connected.")
        if self.job_id is None:
            return
        client.job(self.job_id, self._guard(self._job_status), self._guard(self._request_failed))

    def _job_status(self, info: Any) -> None:
        if not isinstance(info, dict):
            raise JobFailed("The engine sent a status the plugin cannot read; update the engine.")
        status = info.get("state")
        progress = info.get("progress")
        if isinstance(progress, dict):
            self._read_progress(progress)
        if status == "done":
            self._stop_following()
            self._download_all(info.get("results"))
        elif status == "failed":
            self.fail(str(info.get("error") or "The engine could not make this edit."),
                      info.get("error_field"))
        elif status == "cancelled":
            self.fail("The engine cancelled the edit.")
        elif self.stream is None:
            # No live stream (ended early or unsupported): poll.
            if self.poll_timer is None:
                self.poll_timer = QTimer(self)
                self.poll_timer.setSingleShot(True)
                self.poll_timer.timeout.connect(self._guard(self._check_job))
            self.poll_timer.start(POLL_MS)

    def _stop_following(self) -> None:
        self.watchdog.stop()
        if self.stream is not None:
            stream, self.stream = self.stream, None
            stream.close()
        if self.poll_timer is not None:
            self.poll_timer.stop()

    # --- 4. results -------------------------------------------------------------------------

    def _download_all(self, results: Any) -> None:
        request = self.requests[self.index]
        expected = getattr(request, "variants", 1)
        if not isinstance(results, list) or len(results) != expected:
            count = len(results) if isinstance(results, list) else "no"
            raise JobFailed(f"The engine reported {count} results for an edit of {expected} "
                            "variant(s); update the engine.")
        self.state.job_state = RECEIVING
        self._download(0, expected)

    def _download(self, k: int, count: int) -> None:
        client = self.client
        if client is None or self.job_id is None:
            raise JobFailed("The engine is not connected.")
        w, h = self.width, self.height
        fmt = "bgra8" if self.connection.loopback else "png"

        def arrived(data: QByteArray, content_type: str, declared: tuple[int, int] | None) -> None:
            if px.parse_raw_content_type(content_type) is not None:
                self._write(self._checked(data, content_type, declared), k, count)
                return
            # PNG (an engine elsewhere, or one that ignores ?format=): decode off the UI thread.
            run_in_background(lambda: self._checked(data, content_type, declared),
                              self._guard(lambda bgra: self._write(bgra, k, count)),
                              self._guard(self._result_unusable))

        client.download(self.job_id, k, fmt, self._guard(arrived), self._guard(self._request_failed),
                        expected_bytes=w * h * 4 if fmt != "png" else 0)

    def _checked(self, data: QByteArray, content_type: str,
                 declared: tuple[int, int] | None) -> QByteArray:
        try:
            return px.result_to_bgra(data, content_type, self.width, self.height, declared)
        except px.ResultError as err:
            raise JobFailed(f"The engine's result cannot be placed: {err}. Nothing was added; "
                            "update the engine.") from err

    def _result_unusable(self, err: BaseException) -> None:
        if isinstance(err, JobFailed):
            self.fail(str(err))
        else:
            self.fail(f"Could not read the engine's result: {err}")

    def _write(self, bgra: QByteArray, k: int, count: int) -> None:
        """Write one result into a new (not yet inserted) layer, a strip per turn."""
        request = self.requests[self.index]
        name, record = self.layer_namer(request, k)
        layer = self.document.new_layer(name)
        rows_per_strip = px.strip_rows(self.width)
        row_bytes = self.width * 4
        position = {"top": 0}

        def strip() -> None:
            top = position["top"]
            rows = min(rows_per_strip, self.height - top)
            if top == 0 and rows == self.height:
                chunk = bgra
            else:
                chunk = bgra.mid(top * row_bytes, rows * row_bytes)
            self.document.write_rows(layer, self.region, top, rows, chunk)
            position["top"] = top + rows
            if position["top"] < self.height:
                self._later(strip)
                return
            self.layers.append((layer, record))
            if k + 1 < count:
                self._download(k + 1, count)
            else:
                self._next_request()

        strip()

    def _next_request(self) -> None:
        self.index += 1
        self.job_id = None
        self.running_since = None
        self.last_step = 0
        if self.index < len(self.requests):
            self._submit()
            return
        self._insert()

    # --- 5. insert --------------------------------------------------------------------------

    def _insert(self) -> None:
        try:
            group = self.document.insert_layers(self.region, self.label, self.layers)
        except Exception as err:
            self.fail(f"Could not add the result layers ({err}). Was the document closed?")
            return
        self.finished = True
        state = self.state
        state.preview = None
        state.step = state.total_steps
        state.seconds_left = 0.0
        state.engine_note = ""
        state.job_state = DONE
        seconds = time.monotonic() - self.started
        count = len(self.layers)
        self.layers = []
        state.message = " ".join([f"Added “{self.label}” with {count} layer"
                                  f"{'s' if count != 1 else ''} in {seconds:.0f} s.", *self.notes])
        self.on_inserted(group)

    # --- ending -----------------------------------------------------------------------------

    def cancel(self) -> None:
        if self.finished:
            return
        self.cancelled = True
        self.finished = True
        self._stop_following()
        if self.job_id and self.client is not None:
            self.client.cancel(self.job_id, lambda _: None, lambda _: None)
        self._release()
        self.state.job_state = CANCELLED
        self.state.preview = None
        self.state.message = "Edit cancelled; nothing was added."

    def _request_failed(self, err: ApiError) -> None:
        if err.kind == "connection":
            self.connection.connection_lost(err.message)
            if self.connection.engine is not None:
                # A managed engine that died drops connections just before Qt reports the
                # process's end; give the crash handler a moment to explain what happened.
                self._later(lambda: self.fail(err.message, err.field), 1000)
                return
        self.fail(err.message, err.field)

    def fail(self, message: str, field_name: str | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self._stop_following()
        if self.job_id and self.client is not None and not self.cancelled:
            # Best effort: do not leave the engine working on an edit nobody will fetch.
            self.client.cancel(self.job_id, lambda _: None, lambda _: None)
        self._release()
        self.state.preview = None
        self.state.engine_note = ""
        self.state.job_state = ERROR
        self.state.error, self.state.error_field = message, field_name or ""

    def _release(self) -> None:
        """Drop every pixel buffer this job holds (layers never inserted are just dropped)."""
        self.image = self.mask = None
        self.region.bgra = self.region.selection = None
        self.layers = []
