"""The host memory budget of the service: a full queue answers 429 before an upload is read,
oversized requests get 413 from their headers, queued edits count against a memory budget, at
most a few uploads decode at once, decoding is thread-safe, variants are stored as they are
produced, and LoRA adapters are unloaded least-recently-used past a cap.

The two peak-RSS checks run the service in a subprocess (uvicorn, the fast fake editor) and
read its peak resident memory from /proc (VmHWM, reset through clear_refs): Linux only."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_helpers import (
    AUTH,
    FakeFactory,
    png_bytes,
    raw_type,
    submit,
    wait_finished,
)

from engine.server import images as server_images
from engine.server import routes
from engine.server.jobs import (
    INPUT_BYTES_PER_PIXEL,
    RESULT_BYTES_PER_PIXEL,
    WORKING_BYTES_PER_PIXEL,
)
from engine.sources import lora_adapter_name

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MIB = 2**20
# What refused uploads may add to the service's peak resident memory (measured: < 2 MiB for
# both scenarios; the margin covers allocator noise and 20 connections' buffers).
PEAK_RSS_GROWTH_BOUND = 32 * MIB

linux_only = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux /proc"
)


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


# --- the service in a subprocess, with its peak RSS ------------------------------------------

SERVER = textwrap.dedent(
    """
    import json, sys, threading
    sys.path.insert(0, {helpers!r})
    import uvicorn
    from service_helpers import FakeFactory, make_settings
    from engine.server import create_app
    from engine.server.cli import bind_listening_socket

    # Edits wait at the gate forever: the first one runs, the next ones stay queued.
    factory = FakeFactory(gate=threading.Event())
    app = create_app(make_settings(**json.loads(sys.argv[1])), editor_factory=factory)
    sock = bind_listening_socket("127.0.0.1", 0)
    print(sock.getsockname()[1], flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    """
)


class ServerProcess:
    def __init__(self, tmp_path: Path, **settings: object) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER.format(helpers=str(HERE)), json.dumps(settings)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.process.stdout is not None
        port = self.process.stdout.readline().strip()
        assert port.isdigit(), "the server did not start"
        self.url = f"http://127.0.0.1:{port}"

    def status(self) -> dict[str, int]:
        values = {}
        with open(f"/proc/{self.process.pid}/status", encoding="ascii") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(value.split()[0]) * 1024
        return values

    def reset_peak(self) -> int:
        """Make the peak (VmHWM) start again from now; returns the resident memory now."""
        with open(f"/proc/{self.process.pid}/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return self.status()["VmRSS"]

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def multipart_stream(
    params: dict, image_type: str, image_size: int, chunk: int = MIB
) -> tuple[int, Iterator[bytes]]:
    """A multipart body whose params come first and whose image is `image_size` zero bytes,
    produced chunk by chunk (the client never holds it whole): (length, chunks)."""
    head = (
        b'--B\r\nContent-Disposition: form-data; name="params"\r\n\r\n'
        + json.dumps(params).encode()
        + b'\r\n--B\r\nContent-Disposition: form-data; name="image"; filename="i"\r\n'
        + f"Content-Type: {image_type}\r\n\r\n".encode()
    )
    tail = b"\r\n--B--\r\n"
    zeros = bytes(chunk)

    def chunks() -> Iterator[bytes]:
        yield head
        left = image_size
        while left > 0:
            yield zeros[: min(chunk, left)]
            left -= chunk
        yield tail

    return len(head) + image_size + len(tail), chunks()


def post_stream(url: str, params: dict, image_type: str, image_size: int) -> httpx.Response:
    length, chunks = multipart_stream(params, image_type, image_size)
    headers = {
        **AUTH,
        "Content-Type": "multipart/form-data; boundary=B",
        "Content-Length": str(length),
    }
    return httpx.post(f"{url}/v1/edits", headers=headers, content=chunks, timeout=60)


@linux_only
def test_oversized_and_parallel_uploads_leave_peak_rss_bounded(tmp_path):
    server = ServerProcess(tmp_path, queue_size=1)
    try:
        small = {"instruction": "x", "steps": 1}
        warm = post_stream(server.url, small, raw_type("bgra8", 8, 8), 8 * 8 * 4)
        assert warm.status_code == 202, warm.text  # runs (and waits at the gate)
        baseline = server.reset_peak()

        # A valid 8192² upload asking for 16 variants: 413 from the headers, before 256 MiB of
        # pixels are read.
        side = 8192
        big = post_stream(
            server.url,
            {"instruction": "x", "variants": 16},
            raw_type("bgra8", side, side),
            side * side * 4,
        )
        assert big.status_code == 413, big.text
        assert error_of(big)["field"] == "variants"
        assert "at most 4 variant(s)" in error_of(big)["message"]
        after_big = server.status()["VmHWM"] - baseline

        # Fill the queue (one waiting), then 20 clients upload 4096² raw images at once.
        queued = post_stream(server.url, small, raw_type("bgra8", 8, 8), 8 * 8 * 4)
        assert queued.status_code == 202, queued.text
        with ThreadPoolExecutor(20) as pool:
            answers = list(
                pool.map(
                    lambda _: post_stream(
                        server.url, small, raw_type("bgra8", 4096, 4096), 4096 * 4096 * 4
                    ),
                    range(20),
                )
            )
        assert [a.status_code for a in answers] == [429] * 20
        assert all("queue is full" in error_of(a)["message"] for a in answers)
        assert all(int(a.headers["retry-after"]) >= 1 for a in answers)
        growth = server.status()["VmHWM"] - baseline
        print(
            f"\npeak RSS growth over {baseline / MIB:.0f} MiB: 8192²×16 refused: "
            f"{after_big / MIB:.1f} MiB; + 20 × 64 MiB uploads against a full queue: "
            f"{growth / MIB:.1f} MiB"
        )
        assert growth < PEAK_RSS_GROWTH_BOUND
    finally:
        server.close()


# --- the same limits in-process (TestClient) ----------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size but holds next to no data: only its header is read."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_pixels_times_variants_is_capped_with_413_naming_variants(client_factory):
    client = client_factory()
    over = submit(client, {"instruction": "x", "variants": 16}, image=_png_header_only(8192, 8192))
    assert over.status_code == 413 and error_of(over)["field"] == "variants"
    assert "at most 4 variant(s)" in error_of(over)["message"]
    # Results larger than the result memory would be dropped at once: refused up front.
    tight = client_factory(result_memory_mb=1)
    too_many = submit(tight, {"instruction": "x", "variants": 8}, image=png_bytes((256, 256)))
    assert too_many.status_code == 413 and error_of(too_many)["field"] == "variants"
    assert "--result-memory-mb" in error_of(too_many)["message"]
    assert (
        submit(tight, {"instruction": "x", "variants": 4}, image=png_bytes((256, 256))).status_code
        == 202
    )


def test_queued_edits_count_against_the_memory_budget(client_factory):
    gate = threading.Event()
    per_job = 256 * 256 * (INPUT_BYTES_PER_PIXEL + RESULT_BYTES_PER_PIXEL)
    working = 256 * 256 * WORKING_BYTES_PER_PIXEL
    # Room for two 256² edits (one worker's working copies counted once), not three.
    budget_mb = (2 * per_job + working + per_job // 2) / MIB
    client = client_factory(FakeFactory(gate=gate), max_queued_memory_mb=budget_mb)
    image = png_bytes((256, 256))
    first, second = (submit(client, image=image) for _ in range(2))
    assert first.status_code == second.status_code == 202
    third = submit(client, image=image)
    assert third.status_code == 429, third.text
    assert "memory" in error_of(third)["message"] and int(third.headers["retry-after"]) >= 1
    assert submit(client).status_code == 202, "a small edit still fits"
    health = client.get("/v1/health").json()["queue"]
    assert 0 < health["edit_memory_bytes"] <= health["edit_memory_limit_bytes"]
    # An edit larger than the whole budget can never run: 413, naming what to change.
    huge = submit(client, {"instruction": "x", "steps": 1}, image=_png_header_only(2048, 2048))
    assert huge.status_code == 413 and error_of(huge)["field"] == "image"
    assert "--max-queued-memory-mb" in error_of(huge)["message"]
    gate.set()
    for accepted in (first, second):
        assert wait_finished(client, accepted.json()["id"])["state"] == "done"
    assert client.get("/v1/health").json()["queue"]["edit_memory_bytes"] == 0
    assert submit(client, image=image).status_code == 202


# --- decoding ---------------------------------------------------------------------------------


class DecodeSpy:
    """Wraps routes.decode_declared: counts calls, the most running at once, and whether a
    call ran on the event loop."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls = 0
        self.running = 0
        self.most = 0
        self.on_event_loop: list[bool] = []
        self._lock = threading.Lock()
        self._real = routes.decode_declared

    def __call__(self, *args, **kwargs):
        try:
            loop_running = asyncio.get_running_loop() is not None
        except RuntimeError:
            loop_running = False
        with self._lock:
            self.calls += 1
            self.running += 1
            self.most = max(self.most, self.running)
            self.on_event_loop.append(loop_running)
        try:
            time.sleep(self.delay_s)
            return self._real(*args, **kwargs)
        finally:
            with self._lock:
                self.running -= 1


def test_at_most_max_decoding_uploads_decode_at_once(client_factory, monkeypatch):
    spy = DecodeSpy(delay_s=0.1)
    monkeypatch.setattr(routes, "decode_declared", spy)
    client = client_factory(queue_size=16, max_decoding_uploads=2)
    image = png_bytes((300, 300))  # 90 000 pixels: decoded in the thread pool
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: submit(client, image=image).status_code, range(8)))
    assert codes == [202] * 8
    assert spy.calls == 8 and spy.most == 2


def test_the_event_loop_decision_uses_the_declared_pixel_count(client_factory, monkeypatch):
    spy = DecodeSpy()
    monkeypatch.setattr(routes, "decode_declared", spy)
    client = client_factory()
    tiny_file_large_image = png_bytes((1024, 1024))  # a flat colour: a few KiB
    assert len(tiny_file_large_image) < routes.INLINE_DECODE_BYTES
    assert submit(client, image=tiny_file_large_image).status_code == 202
    assert submit(client, image=png_bytes((32, 32))).status_code == 202
    assert spy.on_event_loop == [False, True]


def test_the_mask_size_is_compared_before_anything_is_decoded(client_factory, monkeypatch):
    spy = DecodeSpy()
    monkeypatch.setattr(routes, "decode_declared", spy)
    client = client_factory()
    wrong = submit(client, image=png_bytes((64, 48)), mask=png_bytes((10, 10), 255, mode="L"))
    assert wrong.status_code == 422 and error_of(wrong)["field"] == "mask"
    assert "10×10" in error_of(wrong)["message"] and "64×48" in error_of(wrong)["message"]
    raw_mask = submit(
        client,
        image=png_bytes((64, 48)),
        mask=bytes(64 * 64),
        mask_type=raw_type("gray8", 64, 64),
    )
    assert raw_mask.status_code == 422 and error_of(raw_mask)["field"] == "mask"
    assert spy.calls == 0


def test_decoding_in_many_threads_is_safe_and_changes_no_global_state():
    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 256, (64 + k, 48, 4), dtype=np.uint8), "RGBA")
        for k in range(16)
    ]
    files = []
    for picture in pictures:
        buffer = __import__("io").BytesIO()
        picture.save(buffer, format="PNG")
        files.append(buffer.getvalue())
    filters_before = list(warnings.filters)

    def decode(index: int) -> bool:
        image = server_images.decode_png(files[index % 16], "image", 10**6)
        return np.array_equal(np.asarray(image), np.asarray(pictures[index % 16]))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(decode, range(400)))
    assert warnings.filters == filters_before, "decoding changed the process's warning filters"


# --- variants as they are produced -----------------------------------------------------------


def test_the_editor_hands_over_each_variant_as_it_is_made(monkeypatch):
    from engine import imaging
    from engine.editor import Editor
    from engine.request import EditParams
    from tests.tiny_models.sd import build_tiny_pipeline

    editor = Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="fp32")
    image = Image.new("RGB", (96, 80), (30, 90, 200))
    params = EditParams("make it red", steps=1, resolution=64, variants=4)
    reference = [np.asarray(v) for v in editor.edit(image, params)]
    finished = 0
    real_finish = imaging.finish

    def counting_finish(*args, **kwargs):
        nonlocal finished
        finished += 1
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(imaging, "finish", counting_finish)
    handed: list[tuple[int, int, np.ndarray]] = []

    def on_variant(index: int, variant: Image.Image) -> None:
        handed.append((index, finished, np.asarray(variant).copy()))

    assert editor.edit(image, params, on_variant=on_variant) == [], "variants were kept"
    # Variant k arrives as soon as it is finished at full size, before the next one is.
    assert [(index, done) for index, done, _ in handed] == [(k, k + 1) for k in range(4)]
    for (_, _, pixels), expected in zip(handed, reference, strict=True):
        assert pixels.dtype == np.uint8 and np.array_equal(pixels, expected)


class StreamingEditor:
    """A fake Editor that produces variants one by one through `on_variant`."""

    def __init__(self, model: str, device: str, *args) -> None:
        self.produced = 0

    def edit(
        self,
        image,
        params,
        mask=None,
        *,
        on_progress=None,
        cancel=None,
        preview_every=0,
        on_variant=None,
    ):
        assert on_variant is not None, "the worker should ask for variants as they are made"
        for k in range(params.variants):
            on_variant(k, Image.new(image.mode, image.size, (k * 50, 0, 0)))
            self.produced += 1
        return []


def test_the_worker_stores_variants_handed_over_one_by_one(client_factory):
    client = client_factory(FakeFactory(editor=StreamingEditor))
    job = submit(client, {"instruction": "x", "steps": 1, "variants": 3}).json()["id"]
    status = wait_finished(client, job)
    assert status["state"] == "done" and len(status["results"]) == 3
    for k in range(3):
        result = client.get(f"/v1/edits/{job}/results/{k}?format=rgba8", headers=AUTH)
        assert result.status_code == 200 and result.content[0] == k * 50


# --- the working-memory estimate --------------------------------------------------------------

MEASURE_EDITOR = textwrap.dedent(
    """
    import sys
    from PIL import Image
    from engine.editor import Editor
    from engine.request import EditParams
    from tests.tiny_models.sd import build_tiny_pipeline

    def status(key):
        with open("/proc/self/status") as lines:
            return next(int(l.split()[1]) * 1024 for l in lines if l.startswith(key))

    side = 1024
    editor = Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="fp32")
    editor.edit(Image.new("RGB", (64, 64)), EditParams("x", steps=1, resolution=64))  # warm up
    image = Image.new("RGBA", (side, side), (10, 20, 30, 128))
    mask = Image.new("L", (side, side), 128)
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    editor.edit(image, EditParams("x", steps=1, resolution=64), mask)
    print((status("VmHWM") - before) / side**2)
    """
)


@linux_only
@pytest.mark.slow
def test_the_working_memory_estimate_covers_what_the_editor_takes():
    """The budget's bytes per pixel must not undercount the real Editor (RGBA with a mask,
    the costliest case), measured as the peak RSS growth of one edit in a fresh process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", MEASURE_EDITOR], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    measured = float(out.stdout.strip().splitlines()[-1])
    print(f"\nEditor peak working memory: {measured:.1f} bytes per pixel")
    assert 20 < measured <= WORKING_BYTES_PER_PIXEL + RESULT_BYTES_PER_PIXEL


# --- LoRA adapters --------------------------------------------------------------------------------


def test_loras_past_the_cap_are_unloaded_least_recently_used(tmp_path):
    """The order, with a pipeline stand-in that records what is loaded and deleted."""
    from types import SimpleNamespace

    from engine.editor import Editor
    from engine.request import LoraSpec

    class Pipe:
        def __init__(self) -> None:
            self.adapters: list[str] = []
            self.deleted: list[str] = []

        def load_lora_weights(self, path: str, adapter_name: str) -> None:
            self.adapters.append(adapter_name)

        def delete_adapters(self, name: str) -> None:
            self.adapters.remove(name)
            self.deleted.append(name)

        def enable_lora(self) -> None: ...

        def disable_lora(self) -> None: ...

        def set_adapters(self, names, adapter_weights) -> None:
            assert set(names) <= set(self.adapters)

    files = {}
    for name in "abcd":
        files[name] = tmp_path / f"{name}.safetensors"
        files[name].write_bytes(b"x")
    editor = object.__new__(Editor)  # no model: only the LoRA bookkeeping runs
    editor.pipe, editor.allow_pickle, editor.max_loras_loaded = Pipe(), False, 2
    editor.family = SimpleNamespace(supports_loras=True, label="stand-in")
    editor._loaded_loras = __import__("collections").OrderedDict()

    def use(*names: str) -> None:
        editor._activate_loras([LoraSpec(str(files[n]), 1.0) for n in names])

    use("a")
    use("b")
    use("a")  # a is now the most recently used
    use("c")  # past the cap: b goes
    name = {n: lora_adapter_name(files[n]) for n in files}  # a hash of the path
    assert editor.pipe.deleted == [name["b"]]
    assert len(editor.pipe.adapters) == 2
    use("c", "d")  # both needed now: a (least recently used) goes, never c or d
    assert editor.pipe.deleted[-1] == name["a"] and len(editor.pipe.adapters) == 2
    assert [Path(f).stem for f in editor._loaded_loras.values()] == ["c", "d"]


def test_unloading_a_real_lora_leaves_the_others_working(tmp_path):
    from engine.editor import Editor
    from engine.request import EditParams, LoraSpec
    from tests.engine.test_models import save_random_lora
    from tests.tiny_models.sd import build_tiny_pipeline

    first, second = (save_random_lora(tmp_path / name, seed=k) for k, name in enumerate("ab"))
    editor = Editor.from_pipeline(build_tiny_pipeline(), device="cpu", dtype="fp32")
    editor.max_loras_loaded = 1
    work = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)

    def run(*paths: Path) -> np.ndarray:
        params = EditParams("x", steps=1, loras=tuple(LoraSpec(str(p), 1.0) for p in paths))
        return editor.edit_working_size(work, params)[0]

    with_first = run(first)
    run(second)  # past the cap of one: the first is unloaded from the pipeline
    adapters = {name for names in editor.pipe.get_list_adapters().values() for name in names}
    assert len(adapters) == 1 and list(editor._loaded_loras.values()) == [str(second)]
    np.testing.assert_allclose(run(first), with_first, atol=1e-5)  # loaded again, same result


def test_parts_in_any_order_are_read_whole(client_factory):
    """The early checks wait for params; a body with the image first (and preview_every
    last) is checked once it has arrived, and keeps every part."""
    client = client_factory()
    image = png_bytes((64, 48))
    body = (
        b'--B\r\nContent-Disposition: form-data; name="image"; filename="i.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + image + b"\r\n"
        b'--B\r\nContent-Disposition: form-data; name="params"\r\n\r\n'
        b'{"instruction": "x", "steps": 2}\r\n'
        b'--B\r\nContent-Disposition: form-data; name="preview_every"\r\n\r\n1\r\n--B--\r\n'
    )
    headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=B"}
    accepted = client.post("/v1/edits", headers=headers, content=body)
    assert accepted.status_code == 202, accepted.text
    job = client.app.state.service.queue.get(accepted.json()["id"])
    assert job.preview_every == 1
    wrong = body.replace(b'"steps": 2}', b'"steps": 2, "variants": 99}')
    refused = client.post("/v1/edits", headers=headers, content=wrong)
    assert refused.status_code == 422 and error_of(refused)["field"] == "variants"


def test_an_upload_without_content_length_is_counted_as_it_grows(client_factory):
    client = client_factory(max_queued_memory_mb=2)

    def chunked() -> Iterator[bytes]:
        yield b'--B\r\nContent-Disposition: form-data; name="pad"\r\n\r\n'
        for _ in range(16):
            yield bytes(256 * 1024)  # 4 MiB in all, over the 2 MiB budget
        yield b'\r\n--B\r\nContent-Disposition: form-data; name="params"\r\n\r\n{}\r\n--B--\r\n'

    refused = client.post(
        "/v1/edits",
        headers={**AUTH, "Content-Type": "multipart/form-data; boundary=B"},
        content=chunked(),
    )
    assert refused.status_code == 413, refused.text
    assert "memory budget" in error_of(refused)["message"]
    assert client.app.state.service.queue.memory_in_use == 0, "the admission was not released"
