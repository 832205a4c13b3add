"""dcdb: a columnar metadata database and query engine for DataComp-style dataset curation.

``dcdb.connect(pool)`` returns a live DuckDB connection on a pool; everything heavy is imported
lazily so that ``import dcdb`` stays cheap.
"""

from __future__ import annotations

__all__ = ["DcdbError", "__version__", "connect", "pool_sql"]

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


def pool_sql(con, sql, params=None):
    """Run one statement on a ``dcdb.connect`` connection as ``dcdb query`` and ``dcdb sql`` run
    it, and return its result as a ``pyarrow.Table`` (None where ``con.sql`` gives no relation).

    ``pool`` then joins only the embedding spaces and derived groups the statement reads
    (``con.sql`` on ``pool`` scans every one of them in step, which DuckDB cannot skip); the rows
    are the same. ``params`` binds ``$name`` parameters (a dict). Errors are DuckDB's, as from
    ``con.sql``. See ``dcdb.engine.narrow_pool``.
    """
    from dcdb.engine import narrow_pool

    with narrow_pool(con, sql, params):
        rel = con.sql(sql, params=params or None)
        return None if rel is None else rel.to_arrow_table()
