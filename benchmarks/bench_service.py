"""Per-job overhead of the HTTP service over a direct `Editor.edit` call, and large-image transfer.

One Editor is loaded once and shared: the direct call uses it, and the service (a real uvicorn
server on a loopback port, in this process) gets it through its editor factory, so both run the
same compute and only the service's work differs: multipart upload, PNG decode, queue hand-off,
progress events, PNG encode, server-sent events and the download. The two alternate; medians,
the median of paired differences, and ratios are printed.

    python benchmarks/bench_service.py            # tiny model, 64 px, 2 steps (seconds)
    python benchmarks/bench_service.py --full     # + the full-size architecture, 256 px, 2 steps
    python benchmarks/bench_service.py --device cuda --full
Targets: ≤ 15 ms median overhead per job; ≤ 2 % at full size.
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

from engine.editor import Editor
from engine.request import EditParams
from engine.server import ServerSettings, create_app
from engine.server.cli import bind_listening_socket

TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class ServiceThread:
    def __init__(self, editor: Editor, model: str, device: str) -> None:
        settings = ServerSettings(token=TOKEN, model=model, devices=(device,), max_upload_mb=512)
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
    label: str, editor: Editor, model: str, device: str, size: int, steps: int, repeats: int
) -> list[list[str]]:
    image = test_image(size)
    png = png_of(image)
    params = {"instruction": "make it evening", "steps": steps, "resolution": size, "seed": 0}
    edit_params = EditParams(**params)
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


def transfer_rows(
    editor: Editor, model: str, device: str, size: int, repeats: int
) -> list[list[str]]:
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
            "edit passthrough + result PNG encode",
            ms(med["edit"]),
            f"of which PNG encode {ms(statistics.median(encode))}",
        ],
        [f"download {size}² result PNG", ms(med["download"]), ""],
        ["total", ms(sum(med.values())), ""],
    ]


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
    args = parser.parse_args()

    import diffusers.utils.logging
    import torch

    from engine.testing import build_full_size_pipeline, save_tiny_model

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
