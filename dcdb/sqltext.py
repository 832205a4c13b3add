"""SQL text for DuckDB: quoted identifiers and string literals, and lists of Parquet files.

The bottom of the SQL-building modules (no dcdb imports): ``dcdb.engine`` builds its views with
it, and ``dcdb.sandbox`` and ``dcdb.shards.index`` quote with it without importing the engine.
"""

from __future__ import annotations

import os
from pathlib import Path


def quote_identifier(name: str) -> str:
    """Quote an SQL identifier for DuckDB ("a""b")."""
    return '"' + str(name).replace('"', '""') + '"'


def sql_string(value: str) -> str:
    """Quote a string literal for DuckDB ('it''s')."""
    return "'" + str(value).replace("'", "''") + "'"


def parquet_list(files: list[Path]) -> str:
    # files of one folder: resolve the folder once (realpath per file cost 0.1 s per 1,000 shards)
    folders: dict[Path, str] = {}
    out = []
    for f in files:
        d = folders.get(f.parent)
        if d is None:
            d = folders[f.parent] = os.path.realpath(f.parent)
        out.append(sql_string(os.path.join(d, f.name)))
    return "[" + ", ".join(out) + "]"
