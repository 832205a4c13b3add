"""Threads of the numeric libraries: how long torch's OpenMP threads and numpy's OpenBLAS threads
spin when idle (set before those libraries load; every ``dcdb`` command does it first), and how many
threads numpy's BLAS may use for one matmul."""

from __future__ import annotations

import os
import sys
import threading
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


#: OpenBLAS's idle worker threads spin ``2**n`` cycles for the next matmul before they sleep
#: (``OPENBLAS_THREAD_TIMEOUT``, 4..30; OpenBLAS's default is 28, about 0.1 s).
OPENBLAS_THREAD_TIMEOUT = 16


def prefer_short_blas_spin() -> None:
    """Let numpy's OpenBLAS worker threads spin only ~25 us (``2**16`` cycles) before they sleep.

    A query that assigns centroids calls a matmul per DuckDB chunk (~2,000 rows): between two calls
    DuckDB scans the next chunk, and with OpenBLAS's default timeout (``2**28`` cycles) its idle
    workers spin through that whole time, burning the cores the scan needs. Measured (200,000-row
    pool, ``image_based`` with 1,000 centroids assigned in the query, 2 cores, load ~5, median of 3):
    CPU 5.3 s and wall 7.4 s with the default spin, 3.2-3.5 s and 3.5-4.3 s with ``2**16``, 3.4 s
    and 4.4 s with ``2**4`` (no spin). OpenBLAS reads the variable when it loads, so this acts only
    before numpy is imported, and never when the user set ``OPENBLAS_THREAD_TIMEOUT``."""
    if "numpy" not in sys.modules and "OPENBLAS_THREAD_TIMEOUT" not in os.environ:
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(OPENBLAS_THREAD_TIMEOUT)


_BLAS_LOCAL: list = []  # [(get, set) or None] once looked up
_BLAS_LOCK = threading.RLock()
_GETTERS = ("openblas_get_num_threads", "openblas_get_num_threads64_", "scipy_openblas_get_num_threads64_",
            "scipy_openblas_get_num_threads")


def _openblas_threads_api():
    """(get, set) thread-count functions of the OpenBLAS that numpy loaded, or None (another BLAS,
    an OpenBLAS older than 0.3.27, or a system without ``/proc/self/maps``). The setter is
    ``openblas_set_num_threads_local``: it returns the previous count."""
    if not _BLAS_LOCAL:
        _BLAS_LOCAL.append(None)
        try:
            import ctypes

            import numpy  # noqa: F401 -- loads its BLAS

            with open("/proc/self/maps") as f:
                paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
            for path in sorted(paths, key=lambda p: "numpy" not in p):  # numpy's own copy first
                lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)
                put = getattr(lib, "openblas_set_num_threads_local", None)
                get = next((getattr(lib, g) for g in _GETTERS if hasattr(lib, g)), None)
                if put is not None and get is not None:
                    put.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                    get.restype, get.argtypes = ctypes.c_int, []
                    _BLAS_LOCAL[0] = (get, put)
                    break
        except (OSError, AttributeError, ImportError):
            pass
    return _BLAS_LOCAL[0]


@contextmanager
def blas_threads(n: int | None) -> Iterator[bool]:
    """At most ``n`` BLAS threads for numpy's matmuls inside the block (yields whether the limit
    could be set).

    OpenBLAS starts one thread per core for every large matmul, whatever else runs: a DuckDB
    statement given ``threads = 1`` (a Ray bucket task, one per core) that calls a matmul would run
    it on every core, next to the other tasks doing the same. OpenBLAS's limit is process-wide, so a
    block that lowers it holds a lock until it puts the old value back: two such blocks never
    interleave their restores. It only lowers: when ``n`` is not below the limit in force nothing
    changes and no lock is held (a local query, whose DuckDB threads are the cores). With another
    BLAS, or ``n`` None or 0, nothing changes."""
    api = _openblas_threads_api() if n and n > 0 else None
    if api is None:
        yield False
        return
    get, put = api
    with _BLAS_LOCK:
        before = get()
        lowered = n < before
        if lowered:
            put(int(n))
            try:
                yield True
            finally:
                put(before)
            return
    yield True
