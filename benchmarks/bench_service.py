"""Per-job overhead of the HTTP service over a direct `Editor.edit` call, and large-image transfer.

One Editor is loaded once and shared: the direct call uses it, and the service (a real uvicorn
server on a loopback port, in this process) gets it through its editor factory, so both run the
same compute and only the service's work differs: multipart upload, PNG decode, queue hand-off,
progress events, PNG encode, server-sent events and the download. The two alternate; medians,
the median of paired differences, and ratios are printed.

    python benchmarks/bench_service.py            # tiny model, 64 px, 2 steps (seconds)
    python benchmarks/bench_service.py --full     # + the full-size architecture, 256 px, 2 steps
    python benchmarks/bench_service.py --device cuda --full
    python benchmarks/bench_service.py --wire     # pixels on the wire at 4096² (no model)
Targets: ≤ 15 ms median overhead per job; ≤ 2 % at full size; engine-side decode of the
upload + encode of one result ≤ 300 ms at 4096².
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import uvicorn
from _common import alternate, print_table
from PIL import Image

from engine.server import ServerSettings, create_app
from engine.server.cli import bind_listening_socket

TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class ServiceThread:
    def __init__(self, editor: Any, model: str, device: str) -> None:
        settings = ServerSettings(
            token=TOKEN,
            model=model,
            devices=(device,),
            max_upload_mb=512,
            result_memory_mb=2048,
        )
        self.app = create_app(settings, editor_factory=lambda _model, _device: editor)
        self.sock = bind_listening_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ServiceThread:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_image(size: int, seed: int = 0) -> Image.Image:
    """A painting-like image: smooth gradients plus mild noise (PNG compresses it realistically)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, (x + y) / 2], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def service_job(
    client: httpx.Client, png: bytes, params: dict[str, Any], timings: dict | None = None
) -> list[bytes]:
    """Submit, wait on the event stream for the end, download every result."""
    start = time.perf_counter()
    accepted = client.post(
        "/v1/edits",
        headers=AUTH,
        files={"image": ("in.png", png, "image/png")},
        data={"params": json.dumps(params)},
    )
    accepted.raise_for_status()
    job_id = accepted.json()["id"]
    submitted = time.perf_counter()
    final = None
    with client.stream("GET", f"/v1/edits/{job_id}/events", headers=AUTH) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: ") and line[7:] != "progress":
                final = line[7:]
                break
    if final != "done":
        raise RuntimeError(
            f"job {job_id} ended {final}: {client.get(f'/v1/edits/{job_id}', headers=AUTH).json()}"
        )
    finished = time.perf_counter()
    results = []
    for k in range(params.get("variants", 1)):
        response = client.get(f"/v1/edits/{job_id}/results/{k}", headers=AUTH)
        response.raise_for_status()
        results.append(response.content)
    if timings is not None:
        timings.setdefault("upload", []).append(submitted - start)
        timings.setdefault("edit", []).append(finished - submitted)
        timings.setdefault("download", []).append(time.perf_counter() - finished)
    return results


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def overhead_rows(
    label: str, editor: Any, model: str, device: str, size: int, steps: int, repeats: int
) -> list[list[str]]:
    image = test_image(size)
    png = png_of(image)
    from engine.request import EditParams

    params = {"instruction": "make it evening", "steps": steps, "resolution": size, "seed": 0}
    edit_params = EditParams.from_dict(params)
    with (
        ServiceThread(editor, model, device) as service,
        httpx.Client(base_url=service.url, timeout=600) as client,
    ):
        timed = alternate(
            {
                "direct": lambda: editor.edit(image, edit_params),
                "service": lambda: service_job(client, png, params),
            },
            repeats,
        )
    direct, served = timed["direct"]["times"], timed["service"]["times"]
    paired = [s - d for s, d in zip(served, direct, strict=True)]
    direct_median, served_median = statistics.median(direct), statistics.median(served)
    same = np.array_equal(
        np.asarray(timed["direct"]["result"][0]),
        np.asarray(Image.open(io.BytesIO(timed["service"]["result"][0]))),
    )
    return [
        [
            label,
            str(repeats),
            ms(direct_median),
            ms(served_median),
            ms(served_median - direct_median),
            ms(statistics.median(paired)),
            f"{served_median / direct_median:.3f}",
            "yes" if same else "NO",
        ]
    ]


def transfer_rows(editor: Any, model: str, device: str, size: int, repeats: int) -> list[list[str]]:
    """An empty instruction makes the Editor hand the input back unchanged: what remains is the
    service's own work on a large image (upload + decode, encode, download)."""
    image = test_image(size, seed=1)
    png = png_of(image)
    params = {"instruction": "", "steps": 1, "resolution": 512}
    timings: dict[str, list[float]] = {}
    with (
        ServiceThread(editor, model, device) as service,
        httpx.Client(base_url=service.url, timeout=600) as client,
    ):
        service_job(client, png, params)  # warm-up
        for _ in range(repeats):
            service_job(client, png, params, timings)
    encode = []
    decode = []
    for _ in range(repeats):
        start = time.perf_counter()
        Image.open(io.BytesIO(png)).load()
        decode.append(time.perf_counter() - start)
        start = time.perf_counter()
        from engine.server.images import encode_png

        encode_png(image)
        encode.append(time.perf_counter() - start)
    size_mb = len(png) / 2**20
    med = {name: statistics.median(values) for name, values in timings.items()}
    return [
        [
            f"upload {size}² PNG ({size_mb:.1f} MiB) → 202",
            ms(med["upload"]),
            f"of which PNG decode {ms(statistics.median(decode))}",
        ],
        [
            "edit passthrough (results kept as pixels)",
            ms(med["edit"]),
            "",
        ],
        [
            f"download {size}² result PNG (encoded on request)",
            ms(med["download"]),
            f"of which PNG encode {ms(statistics.median(encode))}",
        ],
        ["total", ms(sum(med.values())), ""],
    ]


# --- pixels on the wire (--wire) ---------------------------------------------------------------


def detail_image(size: int, alpha: bool, seed: int = 0) -> Image.Image:
    """A detail-rich layer: gradients, film-grain noise and 1-px line art (lettering-like strokes,
    a grid and circles); with `alpha`, a soft transparent border and fully clear patches."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    pixels = np.stack([x * 220, y * 200, (1 - x) * (1 - y) * 180 + 40], axis=-1)
    pixels += rng.normal(0, 4, pixels.shape)
    ink = np.zeros((size, size), bool)
    ink[::37, :] = ink[:, ::53] = True
    rows, columns = np.arange(size)[:, None], np.arange(size)[None, :]
    for _ in range(24):
        cy, cx = rng.integers(0, size, 2).tolist()
        r = int(rng.integers(8, size // 8))
        ink |= np.abs(np.hypot(rows - cy, columns - cx) - r) < 0.7
    strokes = rng.random((size // 8, size // 8)) < 0.02
    ink |= np.kron(strokes, np.eye(8, dtype=bool))
    pixels[ink] = (20, 20, 30)
    rgb = np.clip(pixels, 0, 255).astype(np.uint8)
    if not alpha:
        return Image.fromarray(rgb, "RGB")
    edge = np.minimum.reduce([x, y, 1 - x, 1 - y]) * size
    a = np.clip(edge * 4, 0, 255)
    a[(size // 3) : (size // 2), (size // 3) : (size // 2)] = 0
    return Image.fromarray(np.dstack([rgb, a.astype(np.uint8)]), "RGBA")


def _png(image: Image.Image, level: int, strategy: int | None) -> bytes:
    buffer = io.BytesIO()
    options: dict[str, Any] = {"compress_level": level}
    if strategy is not None:
        options["compress_type"] = strategy
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _webp(image: Image.Image, method: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="WEBP", lossless=True, quality=0, method=method, exact=True)
    return buffer.getvalue()


def _format_codecs(image: Image.Image) -> dict[str, tuple[bytes, Any, Any]]:
    """Per format: (the upload's bytes, decode of the upload, encode of one result)."""
    import zlib

    from engine.server.images import (
        decode_png,
        decode_raw,
        encode_png,
        encode_raw,
        raw_spec,
        to_edit_mode,
    )

    big = 2**40
    size = image.width
    bgra = encode_raw(image, "bgra8").tobytes()
    spec = raw_spec(f"image/x-raw; format=bgra8; width={size}; height={size}", "i", ("bgra8",), big)
    assert spec is not None
    png1, png6, webp = _png(image, 1, zlib.Z_RLE), _png(image, 6, None), _webp(image, 0)

    def png_decode(data: bytes) -> Image.Image:
        return to_edit_mode(decode_png(data, "image", big))

    def webp_decode(data: bytes) -> Image.Image:
        return Image.open(io.BytesIO(data)).convert(image.mode)

    return {
        "raw bgra8": (
            bgra,
            lambda: decode_raw(bgra, spec, "image"),
            lambda: encode_raw(image, "bgra8"),
        ),
        "PNG zlib 1, Z_RLE": (png1, lambda: png_decode(png1), lambda: encode_png(image)),
        "PNG zlib 6 (Pillow default)": (
            png6,
            lambda: png_decode(png6),
            lambda: _png(image, 6, None),
        ),
        "WebP lossless, method 0": (webp, lambda: webp_decode(webp), lambda: _webp(image, 0)),
    }


def wire_format_rows(size: int, repeats: int) -> list[list[str]]:
    """Engine-side cost per format: decode of the upload (into what the Editor gets) and
    encode of one result (from the pixels the queue keeps), alternating, medians."""
    rows = []
    for alpha in (False, True):
        image = detail_image(size, alpha)
        formats = _format_codecs(image)
        times: dict[str, dict[str, list[float]]] = {
            name: {"decode": [], "encode": []} for name in formats
        }
        for round_ in range(repeats + 1):  # the first round warms up
            for name, (_, decode, encode) in formats.items():
                start = time.perf_counter()
                decoded = decode()
                middle = time.perf_counter()
                encode()
                end = time.perf_counter()
                if round_:
                    times[name]["decode"].append(middle - start)
                    times[name]["encode"].append(end - middle)
                else:
                    same = np.array_equal(np.asarray(decoded), np.asarray(image))
                    assert same, f"{name} is not lossless"
        for name, (data, _, _) in formats.items():
            decode_s = statistics.median(times[name]["decode"])
            encode_s = statistics.median(times[name]["encode"])
            total = decode_s + encode_s
            rows.append(
                [
                    f"{size}² {'RGBA' if alpha else 'RGB'}",
                    name,
                    f"{len(data) / 2**20:.1f}",
                    ms(decode_s),
                    ms(encode_s),
                    ms(total),
                    "✔" if total <= 0.300 else "✘",
                ]
            )
    return rows


def multipart_rows(size_mib: int, repeats: int) -> list[list[str]]:
    """Parsing one raw part of `size_mib` MiB in the server process (the body fed in 64 KiB
    chunks, as uvicorn delivers it): Starlette's form parser (spooling file parts above 1 MiB to
    a temporary file, or with the spool raised above the part) vs the service's own splitter."""
    import asyncio

    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartParser

    from engine.server.multipart import parse_multipart

    payload = os.urandom(size_mib * 2**20)
    boundary = "bench-boundary-0123456789"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{{}}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="i"\r\n'
            "Content-Type: image/x-raw; format=bgra8; width=4096; height=4096\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    content_type = f"multipart/form-data; boundary={boundary}"
    chunk = 64 * 1024

    async def stream():
        for start in range(0, len(body), chunk):
            yield body[start : start + chunk]

    async def starlette_parse(spool: int) -> int:
        MultiPartParser.spool_max_size = spool
        try:
            form = await MultiPartParser(Headers({"content-type": content_type}), stream()).parse()
            data = await form["image"].read()  # type: ignore[union-attr]
            await form.close()
            return len(data)
        finally:
            MultiPartParser.spool_max_size = 1024 * 1024

    async def own_parse() -> int:
        buffer = bytearray(len(body))
        filled = 0
        async for piece in stream():
            buffer[filled : filled + len(piece)] = piece
            filled += len(piece)
        return len(parse_multipart(content_type, buffer)["image"].data)

    variants = {
        "Starlette form parser (spools > 1 MiB to disk)": lambda: starlette_parse(1024 * 1024),
        "Starlette form parser, spool raised to the part's size": lambda: starlette_parse(
            len(body)
        ),
        "engine.server.multipart (body in memory, split with bytes.find)": own_parse,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats + 1):
        for name, make in variants.items():
            start = time.perf_counter()
            assert asyncio.run(make()) == len(payload)
            if round_:
                times[name].append(time.perf_counter() - start)
    return [[name, f"{size_mib} MiB", ms(statistics.median(t))] for name, t in times.items()]


class EchoEditor:
    """Answers with its input (what the real Editor does for an empty instruction)."""

    def edit(self, image, params, mask=None, **kwargs):
        return [image.copy() for _ in range(params.variants)]


def round_trip_rows(size: int, repeats: int) -> list[list[str]]:
    """Submit → done → fetch on loopback through a real uvicorn server, echo editor: raw bgra8
    both ways vs PNG (zlib 1, Z_RLE) both ways. Client-side encode/decode is not counted."""
    import zlib

    image = detail_image(size, alpha=True, seed=2)
    from engine.server.images import encode_raw

    bgra = encode_raw(image, "bgra8").tobytes()
    png = _png(image, 1, zlib.Z_RLE)
    raw_type = f"image/x-raw; format=bgra8; width={size}; height={size}"
    params = json.dumps({"instruction": "x", "steps": 1})
    timings: dict[str, dict[str, list[float]]] = {}

    def one(client: httpx.Client, name: str, data: bytes, part_type: str, fmt: str) -> None:
        start = time.perf_counter()
        accepted = client.post(
            "/v1/edits",
            headers=AUTH,
            files={"image": ("i", data, part_type)},
            data={"params": params},
        )
        accepted.raise_for_status()
        job_id = accepted.json()["id"]
        submitted = time.perf_counter()
        with client.stream("GET", f"/v1/edits/{job_id}/events", headers=AUTH) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: ") and line[7:] != "progress":
                    break
        done = time.perf_counter()
        result = client.get(f"/v1/edits/{job_id}/results/0?format={fmt}", headers=AUTH)
        result.raise_for_status()
        end = time.perf_counter()
        expected = bgra if fmt == "bgra8" else None
        if expected is not None:
            assert result.content == expected, "raw round trip is not byte-identical"
        record = timings.setdefault(name, {"upload": [], "edit": [], "fetch": [], "total": []})
        record["upload"].append(submitted - start)
        record["edit"].append(done - submitted)
        record["fetch"].append(end - done)
        record["total"].append(end - start)

    with (
        ServiceThread(EchoEditor(), "echo", "cpu") as service,
        httpx.Client(base_url=service.url, timeout=600) as client,
    ):
        for round_ in range(repeats + 1):
            one(client, "raw bgra8", bgra, raw_type, "bgra8")
            one(client, "PNG zlib 1, Z_RLE", png, "image/png", "png")
            if round_ == 0:
                timings.clear()  # warm-up
    rows = []
    for name, record in timings.items():
        med = {key: statistics.median(values) for key, values in record.items()}
        size_mib = len(bgra if name.startswith("raw") else png) / 2**20
        rows.append(
            [
                f"{size}² RGBA, {name} ({size_mib:.1f} MiB)",
                ms(med["upload"]),
                ms(med["edit"]),
                ms(med["fetch"]),
                ms(med["total"]),
            ]
        )
    return rows


def wire_main(args: argparse.Namespace) -> None:
    from engine.devices import cpu_name

    print(f"CPU: {cpu_name()}; Pillow {Image.__version__}")
    print()
    print_table(
        wire_format_rows(args.wire_size, args.wire_repeats),
        ["image", "format", "MiB", "decode ms", "encode ms", "decode+encode ms", "≤ 300 ms"],
    )
    print()
    print_table(multipart_rows(64, args.wire_repeats), ["multipart parsing", "part", "median ms"])
    print()
    print_table(
        round_trip_rows(args.wire_size, args.wire_repeats),
        ["loopback, echo editor", "upload→202 ms", "→done ms", "fetch ms", "total ms"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=20, help="alternations for the tiny model")
    parser.add_argument(
        "--full", action="store_true", help="also the full-size architecture (minutes on a CPU)"
    )
    parser.add_argument("--full-repeats", type=int, default=3)
    parser.add_argument("--transfer-size", type=int, default=2048)
    parser.add_argument(
        "--wire", action="store_true", help="only the pixels-on-the-wire figures (no model)"
    )
    parser.add_argument("--wire-size", type=int, default=4096)
    parser.add_argument("--wire-repeats", type=int, default=5)
    args = parser.parse_args()
    if args.wire:
        wire_main(args)
        return

    import diffusers.utils.logging
    import torch

    from engine.editor import Editor
    from tests.tiny_models.sd import build_full_size_pipeline, save_tiny_model

    diffusers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    header = [
        "model",
        "n",
        "direct ms",
        "service ms",
        "overhead ms",
        "paired Δ ms",
        "ratio",
        "same image",
    ]
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tiny = str(save_tiny_model(Path(tmp) / "tiny"))
        tiny_editor = Editor(tiny, device=args.device, dtype=args.dtype)
        rows += overhead_rows(
            "tiny, 64 px, 2 steps", tiny_editor, tiny, args.device, 64, 2, args.repeats
        )
        transfer = transfer_rows(tiny_editor, tiny, args.device, args.transfer_size, 5)
        if args.full:
            full = Path(tmp) / "full"
            build_full_size_pipeline().save_pretrained(full, safe_serialization=True)
            full_editor = Editor(str(full), device=args.device, dtype=args.dtype)
            rows += overhead_rows(
                "full size, 256 px, 2 steps",
                full_editor,
                str(full),
                args.device,
                256,
                2,
                args.full_repeats,
            )
    print()
    print_table(rows, header)
    print()
    print_table(transfer, ["large image through the service", "median ms", "note"])
    print("\ntargets: overhead ≤ 15 ms per job (tiny); ratio ≤ 1.02 at full size")


if __name__ == "__main__":
    main()
