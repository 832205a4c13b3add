"""Timing shared by the benchmarks (run as ``python benchmarks/<name>.py``, so this folder is on
``sys.path``)."""

from __future__ import annotations

import statistics
import time


def timed(fn, repeat: int = 3):
    """(median seconds over ``repeat`` calls of ``fn``, the last call's result)."""
    ts, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out
