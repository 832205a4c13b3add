"""Dedup from SQL (registered on every pool connection; the rules are in ``dcdb/vectors/dedup.py``).

Table macros, each returning one row per pool row that has a duplicate:

``exact_duplicate_groups(key)``
    ``uid, group_uid, group_size, keep``: rows whose ``key`` value is shared with another row.
    ``key`` is ``'sha256'``, ``'url'``, ``'text'`` (the caption normalised: NFKC, lower case,
    whitespace collapsed) or the name of another non-vector column of ``pool``. ``group_uid`` is
    the kept row's uid (the smallest uid of the group); ``keep`` is true on that row.
``exact_duplicates(key)``
    ``uid``: the rows to drop (every group member but the kept one). Computed by DuckDB on the
    fly (a hash aggregate over the pool), nothing stored.
``near_duplicate_groups(space, threshold)``
    ``uid, cluster, group_uid, group_size, max_sim, keep``: rows with a near duplicate in embedding
    ``space`` at cosine ``threshold``, read from the result ``dcdb dedup`` stored.
``near_duplicates(space, threshold)``
    ``uid``: the rows to drop. ``uid NOT IN (SELECT uid FROM near_duplicates('l14_img', 0.95))``
    keeps one row per near-duplicate group.

Scalar: ``norm_text(text)``, the normalised caption (NULL when empty).

The table macros build their SELECT at bind time (``query(dcdb_dedup_sql(...))``), so a bad key,
an unknown space, a threshold outside (0, 1] or a result not computed yet fails before any row is
read, with a dcdb error that names the command to run.
"""

from __future__ import annotations

from typing import Any

from dcdb.errors import ParameterError, PoolError, UsageError
from dcdb.filters import REGISTRARS, arrow_function

TEXT_KEY = "text"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def register(con, pool) -> None:
    import duckdb

    from dcdb.vectors.dedup import computed

    columns = {name: typ for name, typ, *_ in con.execute("DESCRIBE SELECT * FROM pool").fetchall()}
    facts = {"pool": pool, "columns": columns, "computed": computed(pool), "manifest": pool.manifest_hash}
    v = duckdb.sqltype("VARCHAR")
    arrow_function(con, "norm_text", _norm_text, [v], v, special_nulls=True)
    arrow_function(con, "dcdb_exact_dups_sql", lambda k, w: _const_sql(exact_sql(_one(k), _one(w), facts), k),
                    [v, v], v)
    arrow_function(con, "dcdb_near_dups_sql",
                    lambda s, t, w: _const_sql(near_sql(_one(s), _one(t), _one(w), facts), s),
                    [v, duckdb.sqltype("DOUBLE"), v], v, special_nulls=True)
    for sql in (
        "CREATE OR REPLACE MACRO exact_duplicate_groups(key) AS TABLE FROM query(dcdb_exact_dups_sql(key, 'groups'))",
        "CREATE OR REPLACE MACRO exact_duplicates(key) AS TABLE FROM query(dcdb_exact_dups_sql(key, 'drop'))",
        ("CREATE OR REPLACE MACRO near_duplicate_groups(space, threshold) AS TABLE "
         "FROM query(dcdb_near_dups_sql(space, CAST(threshold AS DOUBLE), 'groups'))"),
        ("CREATE OR REPLACE MACRO near_duplicates(space, threshold) AS TABLE "
         "FROM query(dcdb_near_dups_sql(space, CAST(threshold AS DOUBLE), 'drop'))"),
    ):
        con.execute(sql)


def _one(arr) -> Any:
    return arr[0].as_py() if len(arr) else None


def _const_sql(sql: str, like):
    import pyarrow as pa

    return pa.array([sql] * len(like), pa.string())


def _norm_text(texts):
    from dcdb.vectors.dedup import normalise_text_arrow

    return normalise_text_arrow(texts)


# ----------------------------------------------------------------------------------- exact


def exact_sql(key: str | None, what: str, facts: dict[str, Any]) -> str:
    """The SELECT behind ``exact_duplicate_groups(key)`` (``what='groups'``) or
    ``exact_duplicates(key)`` (``'drop'``)."""
    columns = facts["columns"]
    usable = [c for c, t in columns.items() if c != "uid" and "[" not in t]
    if key not in columns or key == "uid":
        raise ParameterError(
            f"exact_duplicates: unknown key {key!r}",
            hint="use 'sha256', 'url', 'text' (normalised caption) or a column of pool: " + ", ".join(usable),
        )
    if key not in usable:
        raise ParameterError(f"exact_duplicates: column {key!r} is a vector ({columns[key]})",
                             hint=f"use near_duplicates({key!r}, 0.95) for embeddings")
    expr = "norm_text(text)" if key == TEXT_KEY else _q(key)
    if columns[key] == "VARCHAR":
        expr = f"NULLIF({expr}, '')"
    groups = (
        f"WITH _k AS (SELECT uid, {expr} AS _key FROM pool), "
        "_g AS (SELECT _key, min(uid) AS group_uid, count(*) AS group_size FROM _k WHERE _key IS NOT NULL "
        "GROUP BY _key HAVING count(*) > 1) "
        "SELECT _k.uid, _g.group_uid, _g.group_size, _k.uid = _g.group_uid AS keep FROM _k JOIN _g USING (_key)"
    )
    if what == "groups":
        return groups
    return f"SELECT uid FROM ({groups}) WHERE NOT keep"


# ------------------------------------------------------------------------------------ near


def near_sql(space: str | None, threshold: float | None, what: str, facts: dict[str, Any]) -> str:
    """The SELECT behind ``near_duplicate_groups`` / ``near_duplicates`` for a computed result."""
    from dcdb.vectors.dedup import check_space, check_threshold, group_info

    pool = facts["pool"]
    if space is None or threshold is None:
        raise ParameterError("near_duplicates needs a space and a threshold",
                             hint="e.g. near_duplicates('l14_img', 0.95)")
    check_space(pool, space)
    try:
        t = check_threshold(threshold)
    except UsageError as exc:  # a parameter of the SQL function here
        raise ParameterError(f"near_duplicates: {exc.message}", hint=exc.hint) from None
    info = group_info(pool, space, t)
    cols = info["columns"]
    if cols["group"] not in facts["columns"]:
        raise PoolError(f"near duplicates of {space} at {t:g} were computed after this connection was opened",
                        hint="reconnect (dcdb.connect) to see them")
    if info.get("pool_manifest_sha256") != facts["manifest"]:
        raise PoolError(f"near duplicates of {space} at {t:g} were computed before the pool changed",
                        hint=f"recompute them: dcdb dedup --pool {pool.path} --space {space} --threshold {t:g} "
                             "--force")
    g = _q(cols["group"])
    if what == "drop":
        return f"SELECT uid FROM pool WHERE {g} IS NOT NULL AND uid <> {g}"
    return (f"SELECT uid, {_q(cols['cluster'])} AS cluster, {g} AS group_uid, {_q(cols['size'])} AS group_size, "
            f"{_q(cols['sim'])} AS max_sim, uid = {g} AS keep FROM pool WHERE {g} IS NOT NULL")


def _install() -> None:
    if register not in REGISTRARS:
        REGISTRARS.append(register)


_install()
