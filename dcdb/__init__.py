"""dcdb: a columnar metadata database and query engine for DataComp-style dataset curation.

``dcdb.connect(pool)`` returns a live DuckDB connection on a pool; everything heavy is imported
lazily so that ``import dcdb`` stays cheap.
"""

from __future__ import annotations

__all__ = ["DcdbError", "__version__", "connect"]

from dcdb.errors import DcdbError
from dcdb.version import __version__


def connect(pool=None, **kwargs):
    """Open a pool and return a ``duckdb.DuckDBPyConnection`` with its views and macros.

    ``pool`` defaults to the ``DCDB_POOL`` environment variable. A full connection by default;
    ``sandboxed=True`` (with optional ``allowed_paths=[...]``) gives the sandbox dcdb runs filters
    in (dcdb.sandbox). See ``dcdb.engine.connect``.
    """
    from dcdb.engine import connect as _connect

    return _connect(pool, **kwargs)
