"""Plugin-side cost of a full-resolution, lossless edit (issue 9's budgets).

Two cases, run alternately (A B A B …), medians reported:
  layer:      a 4096² layer, no selection (region 4096², 64 MiB of BGRA);
  selection:  a 1024² selection in a 4096² document (region with context 1536²).

Measured, with no engine compute involved:
  out:   read the region (and selection) from the document a strip at a time and build the
         upload (raw bgra8/gray8 parts for an engine on this machine: no copy, no encoding;
         "out png" adds the PNG encoding used for an engine elsewhere);
  back:  check the engine's raw bgra8 result (exact size), write it into a new layer a
         strip at a time and insert the group ("back png" decodes a PNG result first);
  edit:  whole edits through the controller against an echo engine in another process
         (tests/plugin/fake_engine.py --mode echo): wall time; the longest UI-thread stall
         (the largest gap between ticks of a 10 ms QTimer); peak memory growth of this
         process (RSS sampled every 5 ms, and tracemalloc's Python-side peak) relative to
         the region's RGBA bytes. The result layer lives in the (fake) document, so its
         bytes count too — in Krita they would be Krita's.
Budgets: out and back ≤ 400 ms each, no stall > 50 ms, peak ≤ 4× the region's RGBA bytes.

The document is tests/plugin/fake_krita.py (pixels in Python bytes): its pixel reads/writes
are memory copies, like Krita's pixelData/setPixelData (measured in real Krita by
tests/plugin/krita_driver.py's bench scenario, see docs/plugin.md).

    python benchmarks/bench_plugin.py [--runs 5] [--binding pyqt6|pyqt5] [--size 4096]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import rss_bytes  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--binding", choices=("pyqt6", "pyqt5"), default=None)
    parser.add_argument("--size", type=int, default=4096, help="document side (px)")
    parser.add_argument("--selection", type=int, default=1024, help="selection side (px)")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="also trace Python allocations during the edits (slows them down)")
    args = parser.parse_args()
    if args.binding:
        os.environ["INSTRUCT_EDIT_QT"] = args.binding
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    sys.path[:0] = [str(ROOT / "plugin"), str(ROOT / "tests" / "plugin")]

    import fake_krita
    from instruct_edit import image as px
    from instruct_edit.krita_document import KritaDocument
    from instruct_edit.model.controller import EditController
    from instruct_edit.model.jobs import upload_parts
    from instruct_edit.model.settings import REMOTE, Settings
    from instruct_edit.model.state import CONNECTED, EditState
    from instruct_edit.qt import (
        BINDING,
        QApplication,
        QByteArray,
        QColor,
        QImage,
        QPainter,
        QtCore,
        QtGui,
        QTimer,
    )
    from instruct_edit.request import EditRequest

    _app = QApplication.instance() or QApplication([])
    fake_krita.install()
    size, sel = args.size, args.selection

    # A document with a detailed layer (gradient + 1-px lines, built by Qt).
    document = fake_krita.Document(size, size)
    picture = QImage(size, size, QImage.Format.Format_ARGB32)
    painter = QPainter(picture)
    gradient = QtGui.QLinearGradient(0, 0, size, size)
    gradient.setColorAt(0, QColor(200, 30, 60))
    gradient.setColorAt(1, QColor(20, 160, 230))
    painter.fillRect(0, 0, size, size, gradient)
    painter.setPen(QColor(10, 10, 10))
    for y in range(0, size, 9):
        painter.drawLine(0, y, size, y)
    painter.end()
    layer = document.add_paint_layer("Background")
    layer.setPixelData(px.bgra_from_image(picture), 0, 0, size, size)
    del picture
    start = (size - sel) // 2
    selection = fake_krita.Selection(size, size).select_rect(start, start, sel, sel)
    adapter = KritaDocument(document)
    request = EditRequest("make it evening", steps=2)

    def use_case(case: str) -> None:
        document.setSelection(selection if case == "selection" else None)
        document.setActiveNode(layer)  # inserting a result made the result active

    def read_strips(region):
        rows_per = px.strip_rows(region.bounds.width)
        data = QByteArray()
        data.reserve(region.bounds.width * region.bounds.height * 4)
        mask = QByteArray() if region.has_selection else None
        top = 0
        while top < region.bounds.height:
            rows = min(rows_per, region.bounds.height - top)
            strip, strip_mask = adapter.read_rows(region, top, rows)
            data.append(strip)
            if mask is not None:
                mask.append(strip_mask)
            top += rows
        region.bgra, region.selection = data, mask
        adapter.settle_selection(region)
        return region

    def write_strips(region, bgra):
        node = adapter.new_layer("bench")
        rows_per = px.strip_rows(region.bounds.width)
        row = region.bounds.width * 4
        top = 0
        while top < region.bounds.height:
            rows = min(rows_per, region.bounds.height - top)
            adapter.write_rows(node, region, top, rows, bgra.mid(top * row, rows * row))
            top += rows
        return adapter.insert_layers(region, "bench", [(node, {"bench": True})])

    cases = ("layer", "selection")
    timings: dict[str, dict[str, list[float]]] = {c: {k: [] for k in ("out", "out png", "back", "back png")}
                                                   for c in cases}
    regions = {}
    for _ in range(args.runs):
        for case in cases:
            use_case(case)
            t0 = time.perf_counter()
            region = read_strips(adapter.plan_source("layer"))
            w, h = region.bounds.width, region.bounds.height
            parts = upload_parts(region.bgra, px.raw_content_type("bgra8", w, h), region.selection,
                                 px.raw_content_type("gray8", w, h), request)
            timings[case]["out"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            png = px.png_from_bgra(region.bgra, w, h)
            mask_png = px.png_from_mask(region.selection, w, h) if region.selection is not None else None
            timings[case]["out png"].append(time.perf_counter() - t0 + timings[case]["out"][-1])
            regions[case] = (w, h, len(png), len(mask_png or b""))
            # The engine's answer: raw bgra8 of the region's size (an echo).
            answer = QByteArray(region.bgra)
            del parts
            t0 = time.perf_counter()
            bgra = px.result_to_bgra(answer, px.raw_content_type("bgra8", w, h), w, h, (w, h))
            group = write_strips(region, bgra)
            timings[case]["back"].append(time.perf_counter() - t0)
            group.remove()
            t0 = time.perf_counter()
            bgra = px.result_to_bgra(QByteArray(png), "image/png", w, h)
            group = write_strips(region, bgra)
            timings[case]["back png"].append(time.perf_counter() - t0)
            group.remove()
            del answer, bgra, png, region

    # Whole edits through the controller against an echo engine in another process.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "plugin"), str(ROOT / "tests" / "plugin")]))
    engine = subprocess.Popen([sys.executable, str(ROOT / "tests" / "plugin" / "fake_engine.py"), "secret",
                               "--mode", "echo"], stdout=subprocess.PIPE, text=True, env=env)
    url = engine.stdout.readline().strip()
    state = EditState()
    controller = EditController(state, lambda: adapter,
                                Settings(engine_mode=REMOTE, remote_url=url, remote_token="secret"),
                                settings_path=Path(tempfile.mkdtemp()) / "settings.json")
    controller.connect_engine()
    loop = QtCore.QEventLoop()
    deadline = time.monotonic() + 15
    while state.connection != CONNECTED and time.monotonic() < deadline:
        QTimer.singleShot(5, loop.quit)
        loop.exec()
    last = [time.perf_counter()]
    worst = [0.0]

    def beat() -> None:
        now = time.perf_counter()
        worst[0] = max(worst[0], now - last[0])
        last[0] = now

    heartbeat = QTimer()
    heartbeat.setTimerType(QtCore.Qt.TimerType.PreciseTimer)
    heartbeat.timeout.connect(beat)
    heartbeat.start(10)
    state.instruction, state.steps, state.random_seed = "make it evening", 2, False
    edits: dict[str, dict[str, list[float]]] = {c: {"wall": [], "stall": [], "rss": [], "py": []} for c in cases}
    for _ in range(args.runs):
        for case in cases:
            use_case(case)
            base = rss_bytes()
            peak = [base]
            stop = threading.Event()

            def sample(peak=peak, stop=stop) -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], rss_bytes())
                    time.sleep(0.005)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            if args.tracemalloc:
                tracemalloc.start()
            t0 = time.perf_counter()
            last[0], worst[0] = t0, 0.0
            controller.edit()
            while state.job_state not in ("done", "failed"):
                QTimer.singleShot(5, loop.quit)
                loop.exec()
            wall = time.perf_counter() - t0
            py_peak = 0
            if args.tracemalloc:
                _, py_peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
            stop.set()
            sampler.join()
            if state.job_state != "done":
                raise SystemExit(f"edit failed: {state.error}")
            w, h = regions[case][:2]
            region_bytes = w * h * 4
            edits[case]["wall"].append(wall)
            edits[case]["stall"].append(worst[0])
            edits[case]["rss"].append((peak[0] - base) / region_bytes)
            edits[case]["py"].append(py_peak / region_bytes)
            controller.inserted_groups[-1].remove()
            controller.inserted_groups.clear()
    heartbeat.stop()
    controller.shutdown()
    engine.terminate()
    engine.wait()

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:7.1f} ms (max {max(values) * 1000:6.1f})"

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU {cpu_name()}; {BINDING}; Python {platform.python_version()}; runs {args.runs}, "
          f"alternating; load average {load:.1f} (stalls grow with other work on the machine)")
    ok = True
    for case in cases:
        w, h, png_bytes, mask_png = regions[case]
        t, e = timings[case], edits[case]
        print(f"\n{case}: document {size}²"
              + (f", selection {sel}²" if case == "selection" else "")
              + f"; region {w}×{h} ({w * h * 4 / 2**20:.0f} MiB BGRA; PNG {png_bytes / 2**20:.1f} MiB)")
        print(f"  out  (read strips + raw parts)        {ms(t['out'])}   budget ≤ 400 ms")
        print(f"  out  with PNG (engine elsewhere)      {ms(t['out png'])}")
        print(f"  back (check raw + write strips + insert) {ms(t['back'])}   budget ≤ 400 ms")
        print(f"  back with PNG decode                  {ms(t['back png'])}")
        print(f"  whole edit, echo engine (loopback)    {ms(e['wall'])}")
        print(f"  longest UI-thread stall               {ms(e['stall'])}   budget ≤ 50 ms")
        print(f"  peak memory growth (RSS)              median {statistics.median(e['rss']):.2f}× "
              f"max {max(e['rss']):.2f}× region RGBA   budget ≤ 4×")
        if args.tracemalloc:
            print(f"  Python-side peak (tracemalloc)        median {statistics.median(e['py']):.2f}× "
                  "region RGBA (stalls and times are inflated by tracing)")
        ok &= (statistics.median(t["out"]) <= 0.4 and statistics.median(t["back"]) <= 0.4
               and max(e["stall"]) <= 0.05 and max(e["rss"]) <= 4)
    print("\nbudgets met" if ok else "\nBUDGETS MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
