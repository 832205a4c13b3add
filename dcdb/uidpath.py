"""The binary uid path: a filter whose result column is the pool's stored uid reads the uid's two
64-bit halves instead of its 32-character hex string.

Store format 2 keeps each row's uid twice in the metadata: ``uid`` (DataComp's hex string, what
SQL sees and compares) and ``uid_hi``/``uid_lo`` (UBIGINT, DataComp's ``f0``/``f1``). Reading
the strings is most of a uid query at scale (12.8M rows: 410 MB of strings that DuckDB hands
out and dcdb decodes, ~1.5 s; the halves: ~0.3 s), so :func:`binary_uid_sql` rewrites a statement
whose result column ``uid`` *is* the stored uid of the rows it read to return ``uid_hi`` and
``uid_lo`` instead (as ``__dcdb_uid_hi``, ``__dcdb_uid_lo``, in the uid's place), and
:func:`uid_columns` turns those into DataComp's ``u8,u8`` array with two copies.

What ``uid`` means to SQL does not change: the rewrite touches only the output list of the
statement; every predicate, join, subquery and macro still sees the hex string. It is taken only
when DuckDB's own parse tree (``json_serialize_sql``) proves the result column is the stored
uid, conservatively:

* the statement is one ``SELECT`` (or a ``UNION``/``INTERSECT``/``EXCEPT`` [``ALL``] of such
  SELECTs with the uid in the same place) with no ``GROUP BY``/``HAVING``/aggregation, no
  positional ``ORDER BY``/``DISTINCT ON`` (the uid's place shifts) and no ``*`` in its list;
* exactly one output column is named ``uid``, and it is a plain reference to ``uid`` of a
  relation that carries the stored uid: ``pool``/``pool_metadata`` when their ``uid``,
  ``uid_hi`` and ``uid_lo`` are the metadata's (the engine says so: a derived column of one of
  those names would replace it), ``baseline_pool(...)`` (``pool`` plus computed columns), or a
  subquery/CTE that passes the three through unchanged (``*`` or the plain column names, one
  relation, no aggregation, no column renaming); unqualified only when the ``FROM`` is that one
  relation, qualified (``p.uid``) by a relation of a join;
* the rewritten statement is turned back into SQL by DuckDB (``json_deserialize_sql``) and must
  parse to exactly the rewritten tree.

Since ingest derives ``uid_hi``/``uid_lo`` from the validated ``uid`` of the same row, the two
are one value in two spellings, so set operations, ``DISTINCT`` and ordering by them agree too.
Anything not proven takes the hex path, which stays correct (and is what every other use of the
uid column gets). The caller falls back to the original statement when the rewritten one does
not bind (e.g. ``DISTINCT`` with ``ORDER BY uid``).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np

from dcdb.errors import UidError
from dcdb.store import UID_HI, UID_LO

OUT_HI, OUT_LO = "__dcdb_uid_hi", "__dcdb_uid_lo"  # the rewritten statement's result columns
CARRIED = ("uid", UID_HI, UID_LO)  # the columns a relation passes through to carry the stored uid
TABLES = ("pool", "pool_metadata")
MACRO = "baseline_pool"  # SELECT * [EXCLUDE computed names], computed columns FROM pool


def binary_uid_sql(con, sql: str, sources: set[str]) -> str | None:
    """``sql`` with its ``uid`` result column replaced by the stored halves (``__dcdb_uid_hi``,
    ``__dcdb_uid_lo``), or None when the result column is not provably the stored uid.
    ``sources``: the relations (``pool``, ``pool_metadata``, ``baseline_pool``) whose ``uid``,
    ``uid_hi``, ``uid_lo`` are the metadata's on this connection (``dcdb.engine``)."""
    import duckdb

    if not sources:
        return None
    try:
        tree = _serialize(con, sql)
        if tree.get("error") or len(tree.get("statements") or []) != 1:
            return None
        stmt = copy.deepcopy(tree["statements"][0])
        if _output(stmt["node"], {}, frozenset(s.lower() for s in sources)) is None:
            return None
        out = con.execute("SELECT json_deserialize_sql(?)", [json.dumps({"error": False, "statements": [stmt]})])
        text = out.fetchall()[0][0]
        again = _serialize(con, text)
    except (duckdb.Error, KeyError, TypeError, ValueError, IndexError):
        return None
    if again.get("error") or len(again.get("statements") or []) != 1:
        return None
    if _strip(again["statements"][0]) != _strip(stmt):  # the SQL text says exactly the rewritten tree
        return None
    return text


def uid_columns(hi, lo, source: str, out: np.ndarray | None = None) -> np.ndarray:
    """DataComp's ``u8,u8`` array from the two halves (pyarrow uint64 arrays of one length):
    ``f0`` = ``hi``, ``f1`` = ``lo``, written into ``out`` when given."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from dcdb.uids import UID_DTYPE

    n = len(hi)
    if out is None:
        out = np.empty(n, dtype=UID_DTYPE)
    elif len(out) != n:
        raise ValueError(f"out has {len(out)} rows, the columns {n}")
    for col in (hi, lo):
        if col.null_count:  # an outer join's missing side: the hex path says the same
            arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
            i = int(np.flatnonzero(pc.is_null(arr).to_numpy(zero_copy_only=False))[0])
            raise UidError(f"{source}: uid at row {i} is NULL", hint="every row needs a uid")
    for field, col in (("f0", hi), ("f1", lo)):
        at = 0
        for chunk in col.chunks if isinstance(col, pa.ChunkedArray) else [col]:
            out[field][at : at + len(chunk)] = chunk.to_numpy(zero_copy_only=False)
            at += len(chunk)
    return out


# ------------------------------------------------------------------------------------ proof


def _serialize(con, sql: str) -> dict[str, Any]:
    return json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])


def _strip(node: Any) -> Any:
    """The tree without source positions (they differ between the two texts)."""
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in ("query_location", "query_location_length")}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _name(expr: dict[str, Any]) -> str | None:
    """The lower-case name a select-list entry gives its column (None: an expression's text,
    never a bare identifier)."""
    if expr.get("alias"):
        return str(expr["alias"]).lower()
    if expr.get("class") == "COLUMN_REF":
        return str(expr["column_names"][-1]).lower()
    return None


def _with_ctes(node: dict[str, Any], scope: dict[str, bool], sources: frozenset[str]) -> dict[str, bool] | None:
    """``scope`` (CTE name -> whether it carries the stored uid) with ``node``'s CTEs added."""
    entries = (node.get("cte_map") or {}).get("map") or []
    if not entries:
        return scope
    scope = dict(scope)
    for entry in entries:
        value = entry.get("value") or {}
        plain = not value.get("aliases") and not value.get("key_targets")
        scope[str(entry["key"]).lower()] = plain and _carries(value.get("query_node") or {}, scope, sources)
    return scope


def _plain_select(node: dict[str, Any]) -> bool:
    """A SELECT whose rows are rows of its FROM (no grouping or aggregation)."""
    return (node.get("type") == "SELECT_NODE" and not node.get("group_expressions") and not node.get("group_sets")
            and node.get("aggregate_handling") == "STANDARD_HANDLING" and node.get("having") is None)


def _relation(ref: dict[str, Any] | None, scope: dict[str, bool], sources: frozenset[str]) -> tuple[str | None, bool]:
    """(the name a FROM item exposes, whether its uid, uid_hi and uid_lo are the stored ones)."""
    if not isinstance(ref, dict) or ref.get("column_name_alias"):
        return None, False  # FROM pool AS p(a, b, c) renames columns by position
    alias = str(ref.get("alias") or "").lower()
    kind = ref.get("type")
    if kind == "BASE_TABLE":
        name = str(ref.get("table_name", "")).lower()
        if ref.get("catalog_name") or ref.get("schema_name") or ref.get("at_clause"):
            return alias or name, False
        carries = scope.get(name, name in sources and name in TABLES)
        return alias or name, carries
    if kind == "TABLE_FUNCTION":
        fn = ref.get("function") or {}
        name = str(fn.get("function_name", "")).lower()
        plain = not fn.get("schema") and not fn.get("catalog") and ref.get("with_ordinality") in (
            None, "WITHOUT_ORDINALITY")
        return alias or name, plain and name == MACRO and MACRO in sources
    if kind == "SUBQUERY":
        node = (ref.get("subquery") or {}).get("node") or {}
        return alias or None, _carries(node, scope, sources)
    return alias or None, False


def _carries(node: dict[str, Any], scope: dict[str, bool], sources: frozenset[str]) -> bool:
    """Whether a subquery's or CTE's columns uid, uid_hi and uid_lo are the stored ones of its rows:
    one carrying relation, no aggregation, each of the three given once by ``*`` or by name."""
    if not _plain_select(node):
        return False
    scope = _with_ctes(node, scope, sources)
    if scope is None:
        return False
    name, carries = _relation(node.get("from_table"), scope, sources)
    if not carries:
        return False
    given: dict[str, int] = dict.fromkeys(CARRIED, 0)
    for e in node.get("select_list") or []:
        if e.get("class") == "STAR":
            plain = not any(e.get(k) for k in ("exclude_list", "replace_list", "rename_list",
                                                "qualified_exclude_list", "columns", "expr"))
            if not plain or str(e.get("relation_name") or "").lower() not in ("", name):
                return False
            for c in CARRIED:
                given[c] += 1
            continue
        out = _name(e)
        if out not in given:
            continue
        if not _plain_ref(e, out, name):
            return False  # another value under one of the three names
        given[out] += 1
    return all(n == 1 for n in given.values())


def _plain_ref(e: dict[str, Any], column: str, relation: str | None) -> bool:
    """``e`` is ``column`` or ``<relation>.column``, unaliased or aliased to its own name."""
    if e.get("class") != "COLUMN_REF" or (e.get("alias") and str(e["alias"]).lower() != column):
        return False
    names = [str(n).lower() for n in e.get("column_names") or []]
    return names == [column] or (relation is not None and names == [relation, column])


def _positional(node: dict[str, Any]) -> bool:
    """An ORDER BY or DISTINCT ON that names a result column by position."""
    for m in node.get("modifiers") or []:
        exprs = [o.get("expression") for o in m.get("orders") or []] + list(m.get("distinct_on_targets") or [])
        if any(isinstance(x, dict) and x.get("class") == "CONSTANT" for x in exprs):
            return True
    return False


def _join_relations(ref: dict[str, Any] | None, scope, sources, out: list[tuple[str | None, bool]]) -> None:
    if isinstance(ref, dict) and ref.get("type") == "JOIN":
        _join_relations(ref.get("left"), scope, sources, out)
        _join_relations(ref.get("right"), scope, sources, out)
    else:
        out.append(_relation(ref, scope, sources))


def _output(node: dict[str, Any], scope: dict[str, bool], sources: frozenset[str]) -> int | None:
    """Rewrite (in place) the uid result column of a statement's node into the two halves; the
    index it had, or None (nothing rewritten) when it is not provably the stored uid."""
    if _positional(node):
        return None
    scope = _with_ctes(node, scope, sources)
    if node.get("type") == "SET_OPERATION_NODE":
        if node.get("setop_type") not in ("UNION", "EXCEPT", "INTERSECT"):
            return None  # UNION BY NAME matches columns by name
        children = node.get("children")
        if not children or node.get("left") or node.get("right"):
            return None
        trial = copy.deepcopy(children)
        places = {_output(c, scope, sources) for c in trial}
        if len(places) != 1 or None in places:
            return None
        children[:] = trial
        return places.pop()
    if not _plain_select(node):
        return None
    items = node.get("select_list") or []
    if any(e.get("class") == "STAR" for e in items):
        return None
    named = [i for i, e in enumerate(items) if _name(e) == "uid"]
    if len(named) != 1 or any(_name(e) in (OUT_HI, OUT_LO) for e in items):
        return None
    i = named[0]
    ref = items[i]
    if ref.get("class") != "COLUMN_REF" or (ref.get("alias") and str(ref["alias"]).lower() != "uid"):
        return None
    names = [str(n) for n in ref.get("column_names") or []]
    if [n.lower() for n in names[-1:]] != ["uid"] or len(names) > 2:
        return None
    if len(names) == 1:
        _, carries = _relation(node.get("from_table"), scope, sources)  # a JOIN is no single relation
    else:
        rels: list[tuple[str | None, bool]] = []
        _join_relations(node.get("from_table"), scope, sources, rels)
        match = [c for n, c in rels if n == names[0].lower()]
        carries = len(match) == 1 and match[0]
    if not carries:
        return None
    items[i : i + 1] = [_column(ref, names[:-1] + [UID_HI], OUT_HI), _column(ref, names[:-1] + [UID_LO], OUT_LO)]
    return i


def _column(like: dict[str, Any], names: list[str], alias: str) -> dict[str, Any]:
    out = dict(like)
    out.update(column_names=names, alias=alias)
    return out
