"""How torch's OpenMP threads wait, set before torch loads (every ``dcdb`` command does it first)."""

from __future__ import annotations

import os
import sys

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
