"""Shared helpers for the benchmark scripts: timing that alternates variants, medians, RSS."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Samples the process RSS every 20 ms while active; `.peak` is the highest seen."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.02)

    def __enter__(self) -> PeakRSS:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def alternate(
    variants: dict[str, Callable[[], Any]], repeats: int, warmup: bool = True
) -> dict[str, dict[str, Any]]:
    """Run each variant `repeats` times, interleaved (A B C A B C …), so machine noise hits all alike."""
    if warmup:
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, int] = dict.fromkeys(variants, 0)
    last: dict[str, Any] = {}
    for _ in range(repeats):
        for name, fn in variants.items():
            with PeakRSS() as peak:
                start = time.perf_counter()
                last[name] = fn()
                times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], peak.peak)
    return {
        name: {"median_s": statistics.median(t), "times": t, "peak_rss": peaks[name], "result": last[name]}
        for name, t in times.items()
    }


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
