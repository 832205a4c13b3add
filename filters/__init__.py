"""Python parts that SQL filters call (installed as ``dcdb.filters``).

``register(con, pool)`` is called by ``dcdb.engine.connect`` on every pool connection; each module
here that defines SQL functions adds itself to ``REGISTRARS`` when imported, and ``MODULES`` lists
the modules ``register`` imports first. Those modules register their Python functions with
:func:`arrow_function`, which records the dcdb error a function raises so that ``take_error(con)``
can give it back with its type. Keep heavy imports inside the functions: ``dcdb query`` must stay
free of torch.
"""

from __future__ import annotations

import functools
import importlib
import threading
import weakref
from collections.abc import Callable
from typing import Any

from dcdb.errors import DcdbError, ParameterError

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


_errors: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_errors_lock = threading.Lock()


def take_error(con) -> DcdbError | None:
    """The dcdb error (AssetError, ParameterError, PoolError ...) that a function registered here
    raised last on ``con`` (and forget it), or None: DuckDB wraps exceptions from Python functions
    into its own, and the caller re-raises this one to keep its type and message."""
    with _errors_lock:
        return _errors.pop(con, None)


def arrow_function(con, name: str, fn, params: list, ret, *, side_effects: bool = False,
                   special_nulls: bool = False) -> None:
    """Register ``fn`` (pyarrow arrays in, one out) as an Arrow UDF, recording dcdb errors."""
    import duckdb

    ref = weakref.ref(con)

    @functools.wraps(fn)  # DuckDB reads the arity from the signature (__wrapped__)
    def wrapped(*args):
        try:
            return fn(*(_combine(a) for a in args))
        except DcdbError as exc:
            c = ref()
            if c is not None:
                with _errors_lock:
                    _errors[c] = exc
            raise

    con.create_function(
        name, wrapped, [duckdb.sqltype(p) if isinstance(p, str) else p for p in params],
        duckdb.sqltype(ret) if isinstance(ret, str) else ret, type="arrow",
        null_handling="special" if special_nulls else "default", side_effects=side_effects,
    )


def _combine(a):
    return a.combine_chunks() if hasattr(a, "combine_chunks") else a


def constant_argument(arr, what: str) -> Any:
    """The single value of an argument that must be the same on every row (a file name)."""
    import pyarrow.compute as pc

    values = pc.unique(arr).to_pylist()
    if len(values) != 1:
        raise ParameterError(f"{what} must be one value for the whole query, got {len(values)}",
                             hint=f"pass it as a parameter: -p {what} VALUE")
    return values[0]
