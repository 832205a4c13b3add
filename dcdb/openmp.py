"""Threads of the numeric libraries: how torch's OpenMP threads wait (set before torch loads; every
``dcdb`` command does it first), and how many threads numpy's BLAS may use for one matmul."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

#: Busy-wait iterations of an idle OpenMP thread before it sleeps (``GOMP_SPINCOUNT``; see
#: the function below). libgomp's default is 300000 (~0.1-1 ms).
OPENMP_SPINCOUNT = 10_000


def prefer_short_openmp_spin() -> None:
    """Let torch's idle OpenMP threads spin only briefly before they sleep (``GOMP_SPINCOUNT``).

    libgomp's threads spin a while between parallel regions; that is fastest on idle cores and a
    disaster on busy ones, where a parallel region waits for a thread that lost its core while its
    partner burns the other. Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) is safe but pays a wake-up
    per region. Measured (``benchmarks/bench_train.py``-style, tiny model, 2 cores, in-memory /
    loader-fed samples/s): idle, default spin 236-260 / 225-226, 10000 iterations 240-259 / 226-230,
    passive 202-240 / 215-221; with two busy processes beside it, default spin 21-73 / 68,
    10000 iterations 115-118 / 97-104, passive 129 / 98. A short spin keeps the idle speed and most
    of passive's safety. OpenMP reads the variable once, when torch loads, so this only acts if
    torch is not imported yet, and never when the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``.
    """
    if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
        os.environ["GOMP_SPINCOUNT"] = str(OPENMP_SPINCOUNT)


_BLAS_LOCAL: list = []  # [function or None] once looked up


def _openblas_local_setter():
    """``openblas_set_num_threads_local`` of the OpenBLAS that numpy loaded (OpenBLAS >= 0.3.27:
    a per-thread limit that returns the previous one), or None (another BLAS, an older OpenBLAS, or
    a system without ``/proc/self/maps``)."""
    if not _BLAS_LOCAL:
        _BLAS_LOCAL.append(None)
        try:
            import ctypes

            import numpy  # noqa: F401 -- loads its BLAS

            with open("/proc/self/maps") as f:
                paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
            for path in sorted(paths, key=lambda p: "numpy" not in p):  # numpy's own copy first
                lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)
                fn = getattr(lib, "openblas_set_num_threads_local", None)
                if fn is not None:
                    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
                    _BLAS_LOCAL[0] = fn
                    break
        except (OSError, AttributeError, ImportError):
            pass
    return _BLAS_LOCAL[0]


@contextmanager
def blas_threads(n: int | None) -> Iterator[bool]:
    """At most ``n`` BLAS threads for numpy's matmuls in the calling thread, inside the block
    (yields whether the limit could be set).

    OpenBLAS starts one thread per core for every large matmul, whatever else runs: a DuckDB
    statement given ``threads = 1`` (a Ray bucket task, one per core) that calls a matmul would run
    it on every core, next to the other tasks doing the same. The limit is OpenBLAS's per-thread one
    (other threads' matmuls keep theirs); with another BLAS, or ``n`` None or 0, nothing changes."""
    setter = _openblas_local_setter() if n and n > 0 else None
    if setter is None:
        yield False
        return
    before = setter(int(n))
    try:
        yield True
    finally:
        setter(before)
