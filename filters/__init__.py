"""Python parts that SQL filters call (installed as ``dcdb.filters``).

``register(con, pool)`` is called by ``dcdb.engine.connect`` on every pool connection; each module
here that defines SQL functions adds itself to ``REGISTRARS``. Keep imports inside the functions:
``dcdb query`` must stay free of torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Each registrar: (connection, pool) -> None, registering DuckDB functions/macros.
REGISTRARS: list[Callable[[Any, Any], None]] = []


def register(con, pool) -> None:
    """Register every SQL function that dcdb.filters provides into a pool connection."""
    for registrar in REGISTRARS:
        registrar(con, pool)
