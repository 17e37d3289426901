"""Plugin-side cost of an edit: a 1024² selection in a 4096² document.

Measures, as medians over several runs (no engine compute involved):
  out:  read the region (+ context) and the selection from the document, scale to the
        working size, encode PNGs and build the upload body;
  back: decode the result PNG, scale to the region, keep it inside the selection, and
        insert the result layer;
  stall: the longest time the UI thread's event loop was blocked during a whole edit run
        through the controller against a stand-in engine (a 5 ms heartbeat timer).
Targets: out and back ≤ 250 ms each, no stall > 50 ms.

The document is tests/plugin/fake_krita.py (pixels in Python bytearrays): its pixel
reads/writes are plain memory copies, like Krita's C++ pixelData/setPixelData.

    python benchmarks/bench_plugin.py [--runs 5] [--binding pyqt6|pyqt5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--binding", choices=("pyqt6", "pyqt5"), default=None)
    parser.add_argument("--size", type=int, default=4096, help="document side (px)")
    parser.add_argument("--selection", type=int, default=1024, help="selection side (px)")
    args = parser.parse_args()
    if args.binding:
        os.environ["INSTRUCT_EDIT_QT"] = args.binding
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "tests" / "plugin")]

    import fake_krita
    from instruct_edit import image as px
    from instruct_edit.krita_document import KritaDocument
    from instruct_edit.model import naming
    from instruct_edit.model.controller import EditController, finish_results, prepare_upload
    from instruct_edit.model.settings import REMOTE, Settings
    from instruct_edit.model.state import CONNECTED, EditState
    from instruct_edit.qt import BINDING, QApplication, QColor, QImage, QPainter, QTimer
    from instruct_edit.request import EditRequest

    app = QApplication.instance() or QApplication([])
    fake_krita.install()
    size, sel = args.size, args.selection

    # A 4096² document with a gradient layer (built by Qt, not per pixel in Python).
    document = fake_krita.Document(size, size)
    picture = QImage(size, size, QImage.Format.Format_ARGB32)
    painter = QPainter(picture)
    from instruct_edit.qt import QtGui

    gradient = QtGui.QLinearGradient(0, 0, size, size)
    gradient.setColorAt(0, QColor(200, 30, 60))
    gradient.setColorAt(1, QColor(20, 160, 230))
    painter.fillRect(0, 0, size, size, gradient)
    painter.end()
    layer = document.add_paint_layer("Background")
    layer.setPixelData(px.bgra_from_image(picture), 0, 0, size, size)
    start = (size - sel) // 2
    document.setSelection(fake_krita.Selection(size, size).select_rect(start, start, sel, sel))
    adapter = KritaDocument(document)
    request = EditRequest("make it evening", steps=2)

    out_times, back_times = [], []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        region = adapter.read_source("layer")
        upload = prepare_upload(region, [request])
        out_times.append(time.perf_counter() - t0)
        # What the engine sends back: an image at the working size.
        result_png = px.encode_png(px.scaled(px.image_from_bgra(region.bgra, *region.bounds[2:]), *upload.upload_size))
        t0 = time.perf_counter()
        layers = finish_results(region, upload.keep_alpha, [result_png])
        record = naming.provenance(request, 0, region.source_name, "layer", tuple(region.bounds), None)
        group = adapter.insert_results(region, "bench", [("bench", layers[0], record)])
        back_times.append(time.perf_counter() - t0)
        group.remove()

    # Whole edits through the controller, measuring the UI thread's longest stall. The
    # stand-in engine runs in its own process, like the real one.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "plugin"), str(ROOT / "tests" / "plugin")]))
    engine = subprocess.Popen([sys.executable, str(ROOT / "tests" / "plugin" / "fake_engine.py"), "secret"],
                              stdout=subprocess.PIPE, text=True, env=env)
    engine.url = engine.stdout.readline().strip()
    state = EditState()
    controller = EditController(state, lambda: adapter,
                                Settings(engine_mode=REMOTE, remote_url=engine.url, remote_token="secret"),
                                settings_path=Path(tempfile.mkdtemp()) / "settings.json")
    controller.connect_engine()
    deadline = time.monotonic() + 10
    while state.connection != CONNECTED and time.monotonic() < deadline:
        app.processEvents()
    stalls, edit_times = [], []
    last = [time.perf_counter()]
    worst = [0.0]

    def beat() -> None:
        now = time.perf_counter()
        worst[0] = max(worst[0], now - last[0])
        last[0] = now

    heartbeat = QTimer()
    heartbeat.timeout.connect(beat)
    heartbeat.start(5)
    state.instruction, state.steps = "make it evening", 2
    for _ in range(args.runs):
        t0 = time.perf_counter()
        last[0], worst[0] = t0, 0.0
        controller.edit()
        while state.job_state not in ("done", "failed"):
            app.processEvents()
            time.sleep(0.001)
        if state.job_state != "done":
            raise SystemExit(f"edit failed: {state.error}")
        stalls.append(worst[0])
        edit_times.append(time.perf_counter() - t0)
        controller.inserted_groups[-1].remove()
    heartbeat.stop()
    controller.shutdown()
    engine.terminate()
    engine.wait()

    def ms(values: list[float]) -> str:
        return f"median {statistics.median(values) * 1000:7.1f} ms  (min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})"

    print(f"binding {BINDING}; document {size}²; selection {sel}²; region read "
          f"{region.bounds.width}×{region.bounds.height}; upload {upload.upload_size[0]}×{upload.upload_size[1]}; runs {args.runs}")
    print(f"out  (read + scale + PNG + multipart):        {ms(out_times)}   target ≤ 250 ms")
    print(f"back (PNG decode + scale + mask + insert):     {ms(back_times)}   target ≤ 250 ms")
    print(f"longest UI-thread stall during an edit:        {ms(stalls)}   target ≤ 50 ms")
    print(f"whole edit against a stand-in engine:          {ms(edit_times)}")
    ok = (statistics.median(out_times) <= 0.25 and statistics.median(back_times) <= 0.25
          and max(stalls) <= 0.05)
    print("targets met" if ok else "TARGETS MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
