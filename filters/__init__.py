"""Python parts that SQL filters call (installed as ``dcdb.filters``).

``register(con, pool)`` is called by ``dcdb.engine.connect`` on every pool connection; each module
here that defines SQL functions adds itself to ``REGISTRARS`` when imported, and ``MODULES`` lists
the modules ``register`` imports first. Keep heavy imports inside the functions: ``dcdb query``
must stay free of torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# Each registrar: (connection, pool) -> None, registering DuckDB functions/macros.
REGISTRARS: list[Callable[[Any, Any], None]] = []

# Modules whose import appends their registrar to REGISTRARS.
MODULES: tuple[str, ...] = ("dcdb.filters.baselines", "dcdb.filters.vectors", "dcdb.filters.dedup")


def register(con, pool) -> None:
    """Register every SQL function that dcdb.filters provides into a pool connection."""
    for name in MODULES:
        importlib.import_module(name)
    for registrar in REGISTRARS:
        registrar(con, pool)


def take_error(con):
    """The dcdb error (AssetError, ParameterError, PoolError ...) that a function registered here
    raised last on ``con``, or None: DuckDB wraps exceptions from Python functions into its own,
    and the caller re-raises this one to keep its type and message."""
    from dcdb.filters.baselines import take_error as take

    return take(con)
