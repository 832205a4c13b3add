"""Split a filter into per-bucket work plus global operations (for ``dcdb query --engine ray``).

A filter runs on a uid-bucketed pool (dcdb/ingest/buckets.py) as one DuckDB query per bucket, and the
uid list is the concatenation of the per-bucket lists. That is right exactly when every row of the
result depends only on rows of its own bucket. The planner reads the filter once with DuckDB's own
parser (``json_serialize_sql``: the same parse tree the local engine runs), walks it, and decides:

* **per bucket**: scans of ``pool``, ``pool_metadata``, ``baseline_pool(...)`` and stored subsets
  (each bucket sees its own rows and the subset uids in its range); row-wise expressions and
  Python functions; joins, ``IN``-subqueries, ``GROUP BY``, ``DISTINCT``, ``INTERSECT`` / ``EXCEPT``
  / ``UNION`` keyed by ``uid`` (a uid lives in one bucket); window functions partitioned by uid.
* **global, two phases**:
  - ``clip_cut(arch, fraction, NULL)`` (DataComp's top-fraction threshold): every bucket reports
    its row count and a radix histogram of its scores; the driver narrows to the exact value at
    index ``int(N*f)`` of the descending sort (NaN last, N counts every row) in a few rounds, then
    the value is bound as a parameter in every bucket's query -- the same number the local
    engine computes, so the same rows pass;
  - a top-level ``ORDER BY ... LIMIT k [OFFSET o]`` (global top-k): each bucket keeps its own top
    ``k+o`` with the sort keys, the driver merges them;
  - constant subqueries (``IN (SELECT unnest(target_centroids(...)))``, kNN seeds): evaluated once
    on the driver and broadcast to every bucket as a parameter.
* **refused** (PlanError naming the construct): anything else that needs rows of other buckets --
  an aggregate or window over the whole pool, a subquery reading the pool used as a value, LIMIT
  below the top level, POSITIONAL or non-uid joins of two pool relations, TABLESAMPLE, recursive
  CTEs, the unbucketed ``shard_index`` view, table functions or macros the planner does not know.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

import duckdb

from dcdb.errors import PlanError, QueryError
from dcdb.query import FilterFile, bind_parameters
from dcdb.sandbox import check_statement

LOCAL, CONST = "per-bucket", "constant"
BUCKET_TABLES = {"pool", "pool_metadata"}
BUCKET_TABLE_FUNCTIONS = {"baseline_pool"}
# Table functions whose rows do not depend on the pool: the same in every bucket.
CONST_TABLE_FUNCTIONS = {
    "range", "generate_series", "unnest", "read_parquet", "parquet_scan", "read_csv", "read_csv_auto",
    "read_json", "read_json_auto", "read_ndjson", "glob",
}
ROW_MACROS_WITH_SELECT = set()  # scalar macros that read tables but are row-local (none yet)
POOL_FUNCTIONS = {"clip_cut_select"}  # scalar functions that read the whole pool (per bucket: wrong)
NO_LOCATION = 18446744073709551615
CUT_PARAM = "__dcdb_cut_{}"
CONST_PARAM = "__dcdb_const_{}"
KEY_ALIAS = "__dcdb_key_{}"


@dataclass
class Cut:
    """A top-fraction threshold computed over the whole pool (``clip_cut`` in fraction mode)."""

    param: str
    arch: str
    fraction: float
    score_sql: str = "SELECT uid, clip_score AS score FROM baseline_pool(arch := $arch)"


@dataclass
class TopK:
    """A global ``ORDER BY ... LIMIT`` at the top of the filter."""

    keys: list[str]  # key column aliases added to the per-bucket result
    order_sql: str  # ORDER BY clause over those aliases
    limit: int
    offset: int


@dataclass
class QueryPlan:
    filter: FilterFile
    params: dict[str, Any]  # the filter's bound parameters
    bucket_sql: str  # the statement each bucket runs (phase 2)
    bucket_params: dict[str, Any]  # its parameters, before cut values are added
    cuts: list[Cut] = field(default_factory=list)
    broadcast: dict[str, Any] = field(default_factory=dict)
    topk: TopK | None = None
    steps: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return "; ".join(self.steps)


# ------------------------------------------------------------------------------------ helpers


def _serialize(con, sql: str) -> dict[str, Any]:
    out = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
    if out.get("error"):
        raise PlanError(
            f"the planner cannot read this SQL: {out.get('error_message', out)}",
            hint="run it with --engine local",
        )
    return out


def _deserialize(con, stmt: dict[str, Any]) -> str:
    return con.execute("SELECT json_deserialize_sql(?)", [json.dumps(stmt)]).fetchall()[0][0]


def _expr_sql(con, expr: dict[str, Any]) -> str:
    """SQL text of one expression (via a one-column SELECT)."""
    stmt = _serialize(con, "SELECT 1")
    stmt["statements"][0]["node"]["select_list"] = [expr]
    text = _deserialize(con, stmt)
    return text[len("SELECT ") :]


def _param_node(name: str) -> dict[str, Any]:
    return {"class": "PARAMETER", "type": "VALUE_PARAMETER", "alias": "", "query_location": NO_LOCATION,
            "query_location_length": 0, "identifier": name}


def _is_uid(expr: Any) -> bool:
    return (
        isinstance(expr, dict)
        and expr.get("class") == "COLUMN_REF"
        and str(expr.get("column_names", [""])[-1]).lower() == "uid"
    )


def _used_params(con, sql: str) -> list[str]:
    return sorted(con.extract_statements(sql)[0].named_parameters)


def _run_const(con, sql: str, params: dict[str, Any]):
    used = _used_params(con, sql)
    return con.execute(sql, {k: params[k] for k in used} or None).fetchall()


def _raise_dcdb_error(con, exc: Exception) -> None:
    """Re-raise the dcdb error behind a DuckDB error (one a registered Python function raised)."""
    from dcdb.filters import take_error
    from dcdb.sandbox import refusal

    if isinstance(exc, QueryError):
        raise exc
    err = take_error(con) or refusal(con, exc)
    if err is not None:
        raise err from None


# ------------------------------------------------------------------------------------ analyser


class _Analyser:
    def __init__(self, con, params: dict[str, Any], subsets: set[str]):
        self.con = con
        self.params = params
        self.subsets = {s.lower() for s in subsets}
        self.cuts: list[Cut] = []
        self.broadcast: dict[str, Any] = {}
        self.steps: list[str] = []

    @functools.cached_property
    def _functions(self) -> tuple[set[str], dict[str, list[str]]]:
        """(aggregate names, macro name -> lower-cased definitions): listed on the first function
        call met (``duckdb_functions()`` costs ~15 ms, a filter without function calls skips it)."""
        rows = self.con.execute(
            "SELECT DISTINCT function_name, function_type, coalesce(macro_definition, '') FROM duckdb_functions() "
            "WHERE function_type IN ('aggregate', 'macro')"
        ).fetchall()
        macros: dict[str, list[str]] = {}
        for n, t, d in rows:
            if t == "macro":
                macros.setdefault(n.lower(), []).append(d.lower())
        return {n.lower() for n, t, _ in rows if t == "aggregate"}, macros

    @property
    def aggregates(self) -> set[str]:
        return self._functions[0]

    @property
    def macros(self) -> dict[str, list[str]]:
        return self._functions[1]

    # -- query nodes -----------------------------------------------------------------------

    def node(self, node: dict[str, Any], ctes: dict[str, str], top: bool = False) -> str:
        ctes = dict(ctes)
        for entry in (node.get("cte_map") or {}).get("map", []):
            value = entry["value"]
            ctes[entry["key"].lower()] = self.node(value["query_node"], ctes)
        kind = node.get("type")
        if kind == "SELECT_NODE":
            return self.select(node, ctes, top)
        if kind == "SET_OPERATION_NODE":
            return self.setop(node, ctes, top)
        if kind == "RECURSIVE_CTE_NODE":
            raise PlanError("a recursive CTE (WITH RECURSIVE) cannot be split into uid buckets",
                            hint="run it with --engine local")
        raise PlanError(f"query construct {kind} is not known to the planner", hint="run it with --engine local")

    def setop(self, node: dict[str, Any], ctes: dict[str, str], top: bool) -> str:
        children = node.get("children") or [node.get("left"), node.get("right")]
        kinds = [self.node(c, ctes) for c in children if c is not None]
        op = node.get("setop_type", "?") + (" ALL" if node.get("setop_all") else "")
        self._modifiers(node, ctes, LOCAL if LOCAL in kinds else CONST, top, has_uid=False)
        if all(k == CONST for k in kinds):
            return CONST
        if any(k == CONST for k in kinds):
            raise PlanError(
                f"{op} of a pool relation with rows that do not come from the pool: each bucket would add "
                "those rows again", hint="run it with --engine local")
        union_all = node.get("setop_type") == "UNION" and node.get("setop_all")
        if not union_all and not all(self._selects_uid(c) for c in children if c is not None):
            raise PlanError(
                f"{op} over rows without a uid column: equal rows may come from different buckets",
                hint="select uid in both sides, or run it with --engine local")
        return LOCAL

    def _selects_uid(self, node: dict[str, Any]) -> bool:
        if node.get("type") == "SET_OPERATION_NODE":
            return all(self._selects_uid(c) for c in node.get("children") or [])
        return any(_is_uid(e) for e in node.get("select_list", []))

    def select(self, node: dict[str, Any], ctes: dict[str, str], top: bool) -> str:
        if node.get("sample"):
            raise PlanError("TABLESAMPLE / USING SAMPLE draws from the whole pool", hint="run it with --engine local")
        kind = self.table(node.get("from_table"), ctes)
        found = {"aggregates": [], "windows": []}
        for key in ("select_list", "where_clause", "having", "qualify", "group_expressions"):
            self.expr(node.get(key), ctes, found)
        group = node.get("group_expressions") or []
        has_uid = any(_is_uid(e) for e in node.get("select_list", []))
        if kind == LOCAL:
            grouped = bool(group) or node.get("aggregate_handling") == "FORCE_AGGREGATES"
            if found["aggregates"] or grouped or node.get("having"):
                by_uid = any(_is_uid(e) for e in group) or (
                    node.get("aggregate_handling") == "FORCE_AGGREGATES" and has_uid
                )
                if not by_uid:
                    what = f"the aggregate {found['aggregates'][0]}" if found["aggregates"] else "a GROUP BY"
                    raise PlanError(
                        f"{what} runs over the whole pool (not grouped by uid), so no bucket can compute it "
                        "alone",
                        hint="group by uid, use a construct the planner splits (clip_cut fractions, "
                        "ORDER BY ... LIMIT), or run it with --engine local")
            for w in found["windows"]:
                if not any(_is_uid(p) for p in w.get("partitions", [])):
                    raise PlanError(
                        f"the window function {w.get('function_name', '?')}() OVER (...) is not partitioned "
                        "by uid, so it spans buckets",
                        hint="add PARTITION BY uid, or run it with --engine local")
        self._modifiers(node, ctes, kind, top, has_uid)
        return kind

    def _modifiers(self, node: dict[str, Any], ctes, kind: str, top: bool, has_uid: bool) -> None:
        mods = node.get("modifiers") or []
        for m in mods:
            for o in m.get("orders", []):
                self.expr(o.get("expression"), ctes, {"aggregates": [], "windows": []})
            if kind != LOCAL:
                continue
            if m["type"] == "DISTINCT_MODIFIER":
                targets = m.get("distinct_on_targets") or []
                if not (any(_is_uid(t) for t in targets) or (not targets and has_uid)):
                    raise PlanError("DISTINCT over rows without the uid: equal rows may come from different "
                                    "buckets", hint="include uid, or run it with --engine local")
            if m["type"] == "LIMIT_PERCENT_MODIFIER":
                raise PlanError("LIMIT ... PERCENT needs the whole pool's row count",
                                hint="use clip_cut's fraction or run it with --engine local")
            if m["type"] == "LIMIT_MODIFIER" and not (top and node.get("type") == "SELECT_NODE"):
                raise PlanError("LIMIT inside a subquery, a CTE or a set operation picks rows across the "
                                "whole pool", hint="move the ORDER BY ... LIMIT to the top of the filter")

    # -- table references --------------------------------------------------------------------

    def table(self, ref: dict[str, Any] | None, ctes: dict[str, str]) -> str:
        if ref is None:
            return CONST
        t = ref.get("type")
        if ref.get("sample"):
            raise PlanError("TABLESAMPLE draws from the whole pool", hint="run it with --engine local")
        if t == "EMPTY":
            return CONST
        if t == "BASE_TABLE":
            name = str(ref.get("table_name", "")).lower()
            if name in ctes:
                return ctes[name]
            if name in BUCKET_TABLES or name in self.subsets:
                return LOCAL
            if name == "shard_index":
                raise PlanError("the shard_index view is not bucketed by uid", hint="run it with --engine local")
            raise PlanError(f"table {name!r} is not known to the planner", hint="run it with --engine local")
        if t == "TABLE_FUNCTION":
            fn = ref.get("function") or {}
            self.expr(fn.get("arguments"), ctes, {"aggregates": [], "windows": []})
            name = str(fn.get("function_name", "")).lower()
            if name in BUCKET_TABLE_FUNCTIONS:
                return LOCAL
            if name in CONST_TABLE_FUNCTIONS:
                return CONST
            raise PlanError(f"table function {name}(...) is not known to the planner (it may read the "
                            "whole pool)", hint="run it with --engine local")
        if t == "SUBQUERY":
            return self.node(ref["subquery"]["node"], ctes)
        if t == "EXPRESSION_LIST":
            for row in ref.get("values", []):
                self.expr(row, ctes, {"aggregates": [], "windows": []})
            return CONST
        if t == "JOIN":
            return self.join(ref, ctes)
        raise PlanError(f"FROM item {t} is not known to the planner", hint="run it with --engine local")

    def join(self, ref: dict[str, Any], ctes: dict[str, str]) -> str:
        left, right = self.table(ref["left"], ctes), self.table(ref["right"], ctes)
        self.expr(ref.get("condition"), ctes, {"aggregates": [], "windows": []})
        rtype, jtype = ref.get("ref_type"), ref.get("join_type")
        if rtype in ("POSITIONAL", "ASOF") or ref.get("ranking_expression"):
            raise PlanError(f"a {rtype} JOIN pairs rows by position or order across the whole pool",
                            hint="join on uid, or run it with --engine local")
        if left == CONST and right == CONST:
            return CONST
        if left == LOCAL and right == LOCAL:
            using = [c.lower() for c in ref.get("using_columns") or []]
            if "uid" not in using and not self._uid_equality(ref.get("condition")):
                raise PlanError("a join of two pool relations that is not on uid pairs rows of different "
                                "buckets", hint="join ON a.uid = b.uid (or USING (uid)), or run it with "
                                "--engine local")
            if jtype in ("OUTER",) and rtype != "REGULAR":
                raise PlanError("FULL OUTER join kind not supported by the planner", hint="use --engine local")
            return LOCAL
        # one side constant: its rows appear in every bucket, so they may only be matched, never kept alone
        local_side = "left" if left == LOCAL else "right"
        keeps_const = {"left": ("RIGHT", "OUTER"), "right": ("LEFT", "OUTER")}[local_side]
        if jtype in keeps_const:
            raise PlanError(f"a {jtype} JOIN keeps unmatched constant rows, which every bucket would add "
                            "again", hint="use an INNER or a LEFT join from the pool side, or run it with "
                            "--engine local")
        if local_side == "right" and jtype in ("SEMI", "ANTI"):
            raise PlanError(f"a {jtype} join of constant rows against the pool needs the whole pool",
                            hint="run it with --engine local")
        return LOCAL

    def _uid_equality(self, cond: Any) -> bool:
        if not isinstance(cond, dict):
            return False
        if cond.get("class") == "COMPARISON" and cond.get("type") in ("COMPARE_EQUAL", "COMPARE_NOT_DISTINCT_FROM"):
            return _is_uid(cond.get("left")) and _is_uid(cond.get("right"))
        if cond.get("class") == "CONJUNCTION" and cond.get("type") == "CONJUNCTION_AND":
            return any(self._uid_equality(c) for c in cond.get("children", []))
        return False

    # -- expressions ---------------------------------------------------------------------------

    def expr(self, e: Any, ctes: dict[str, str], found: dict[str, list]) -> None:
        """Walk an expression tree in place: record aggregates and windows of this level, turn
        clip_cut fractions and constant subqueries into parameters, refuse pool subqueries."""
        if isinstance(e, list):
            for x in e:
                self.expr(x, ctes, found)
            return
        if not isinstance(e, dict):
            return
        cls = e.get("class")
        if cls == "SUBQUERY":
            self.subquery(e, ctes)
            self.expr(e.get("child"), ctes, found)
            return
        if cls == "WINDOW":
            found["windows"].append(e)
        if cls == "FUNCTION":
            name = str(e.get("function_name", "")).lower()
            if name == "clip_cut":
                if self.clip_cut(e):
                    return
            elif name in POOL_FUNCTIONS:
                raise PlanError(f"{name}(...) reads the scores of the whole pool, not of one bucket",
                                hint="use clip_cut(arch, fraction, NULL), or run it with --engine local")
            elif name in self.aggregates:
                found["aggregates"].append(f"{name}()")
            elif name in self.macros:
                self.macro(name, found)
        for k, v in e.items():
            if k != "class" and isinstance(v, (dict, list)):
                self.expr(v, ctes, found)

    def macro(self, name: str, found: dict[str, list]) -> None:
        defs = self.macros[name]
        if any(re.search(r"\bselect\b", d) for d in defs) and name not in ROW_MACROS_WITH_SELECT:
            raise PlanError(f"the macro {name}(...) runs a query (it may read the whole pool)",
                            hint="run it with --engine local")
        for d in defs:
            for call in re.findall(r"\b([a-z_][a-z0-9_]*)\s*\(", d):
                if call in self.aggregates:
                    found["aggregates"].append(f"{name}() (uses {call})")
                    return

    def _constant(self, expr: dict[str, Any], what: str) -> Any:
        try:
            return _run_const(self.con, f"SELECT {_expr_sql(self.con, expr)}", self.params)[0][0]
        except duckdb.Error as exc:  # a column reference: not a constant
            _raise_dcdb_error(self.con, exc)
            raise PlanError(f"{what} must be a constant or a parameter, not a value that varies by row",
                            hint="pass it with -p, or run it with --engine local") from None

    def clip_cut(self, e: dict[str, Any]) -> bool:
        """clip_cut(arch, fraction, threshold): in fraction mode a global two-phase threshold."""
        from dcdb.filters.baselines import check_clip_params

        args = [a["expression"] for a in e.get("arguments", [])]
        if len(args) != 3:
            return False  # not dcdb's macro: DuckDB will say so
        arch, fraction, threshold = (self._constant(a, f"argument {i + 1} of clip_cut") for i, a in enumerate(args))
        f = None if fraction is None else float(fraction)
        t = None if threshold is None else float(threshold)
        if check_clip_params(f, t) == "threshold":  # a constant threshold, what the macro computes
            call = _serialize(self.con, "SELECT clip_threshold_as(NULL, NULL)")["statements"][0]["node"]
            call = call["select_list"][0]
            call["arguments"][0]["expression"], call["arguments"][1]["expression"] = args[0], args[2]
            e.clear()
            e.update(call)
            return True
        param = CUT_PARAM.format(len(self.cuts))
        self.cuts.append(Cut(param=param, arch=str(arch), fraction=f))
        self.steps.append(f"global: clip_cut({arch}, fraction {f}) -> exact threshold over the pool (${param})")
        e.clear()
        e.update(_param_node(param))
        return True

    def subquery(self, e: dict[str, Any], ctes: dict[str, str]) -> None:
        node = e["subquery"]["node"]
        kind = self.node(node, ctes)
        stype = e.get("subquery_type")
        if kind == CONST:
            self._broadcast(e, node, stype)
            return
        if stype == "ANY" and e.get("comparison_type") == "COMPARE_EQUAL" and _is_uid(e.get("child")) and (
            self._selects_uid(node) and len(node.get("select_list", [None])) == 1
        ):
            return  # uid IN (SELECT uid FROM <pool relation>): co-partitioned semi-join
        what = {"SCALAR": "a scalar subquery", "EXISTS": "an EXISTS subquery", "NOT_EXISTS": "a NOT EXISTS subquery",
                "ANY": "an IN / ANY subquery"}.get(stype, "a subquery")
        raise PlanError(
            f"{what} that reads the pool is used as a value, so every bucket would need the whole pool",
            hint="write it as `uid IN (SELECT uid FROM ...)`, or run it with --engine local")

    def _broadcast(self, e: dict[str, Any], node: dict[str, Any], stype: str) -> None:
        """Evaluate an uncorrelated constant subquery once and bind its value in every bucket."""
        stmt = {"statements": [{"node": node, "named_param_map": []}]}
        try:
            inner = _deserialize(self.con, stmt)
        except duckdb.Error:
            return
        param = CONST_PARAM.format(len(self.broadcast))
        try:
            if stype == "ANY":
                rows = _run_const(self.con, f"SELECT list(c) FROM ({inner}) AS t(c)", self.params)
                value = rows[0][0] or []
                replacement = _serialize(self.con, f"SELECT unnest(${param})")["statements"][0]["node"]
                e["subquery"]["node"] = replacement
            elif stype == "SCALAR":
                rows = _run_const(self.con, f"SELECT ({inner})", self.params)
                value = rows[0][0]
                e.clear()
                e.update(_param_node(param))
            else:
                return  # EXISTS of a constant: cheap and row-independent; leave it in the bucket query
        except duckdb.Error as exc:
            _raise_dcdb_error(self.con, exc)
            return  # correlated (refers to the outer row): row-wise, stays in the bucket query
        self.broadcast[param] = value
        self.steps.append(f"broadcast: constant subquery computed once on the driver (${param})")


# ------------------------------------------------------------------------------------- entry


def plan_filter(con, filt: FilterFile, given: dict[str, str] | None, *, subsets: set[str]) -> QueryPlan:
    """Analyse ``filt`` on the driver's whole-pool connection ``con`` into a QueryPlan, or raise
    PlanError naming the construct that cannot be split."""
    used = check_statement(con, filt.text, filt.name)
    params = bind_parameters(filt, used, dict(given or {}))
    stmt = _serialize(con, filt.text)
    root = stmt["statements"][0]["node"]
    an = _Analyser(con, params, subsets)
    kind = an.node(root, {}, top=True)
    if kind != LOCAL:
        raise PlanError(f"filter {filt.name!r} reads nothing bucketed (pool, pool_metadata, baseline_pool(...) "
                        "or a stored subset): its rows would repeat in every bucket",
                        hint="run it with --engine local")
    topk = _topk(con, an, root, params)
    sql = _deserialize(con, stmt)
    bucket_params = {k: v for k, v in {**params, **an.broadcast}.items()}
    try:  # the rewritten statement must parse and bind like the original
        cut_values = {c.param: 0.0 for c in an.cuts}
        names = set(_used_params(con, sql))
        con.execute("EXPLAIN " + sql, {k: v for k, v in {**bucket_params, **cut_values}.items() if k in names} or None)
    except duckdb.Error as exc:
        _raise_dcdb_error(con, exc)
        raise PlanError(f"the per-bucket form of filter {filt.name!r} does not bind: {exc}",
                        hint="run it with --engine local") from None
    names = set(_used_params(con, sql))
    steps = [f"per bucket: {filt.name}"] + an.steps
    if topk:
        steps.append(f"global: top {topk.limit} (offset {topk.offset}) merged from per-bucket tops")
    return QueryPlan(filter=filt, params=params, bucket_sql=sql,
                     bucket_params={k: v for k, v in bucket_params.items() if k in names},
                     cuts=an.cuts, broadcast=an.broadcast, topk=topk, steps=steps)


_ORDER = {"ASCENDING": " ASC", "DESCENDING": " DESC", "ORDER_DEFAULT": ""}
_NULLS = {"NULLS_FIRST": " NULLS FIRST", "NULLS FIRST": " NULLS FIRST", "NULLS_LAST": " NULLS LAST",
          "NULLS LAST": " NULLS LAST", "ORDER_DEFAULT": ""}


def _topk(con, an: _Analyser, root: dict[str, Any], params: dict[str, Any]) -> TopK | None:
    """Turn a top-level ORDER BY ... LIMIT into per-bucket tops plus a driver merge."""
    mods = root.get("modifiers") or []
    limit = next((m for m in mods if m["type"] == "LIMIT_MODIFIER"), None)
    if limit is None:
        return None
    order = next((m for m in mods if m["type"] == "ORDER_MODIFIER"), None)
    if order is None or not order.get("orders"):
        raise PlanError("LIMIT without ORDER BY keeps arbitrary rows; the engines would keep different ones",
                        hint="add ORDER BY (ideally ending with uid to break ties)")
    if any(m["type"] == "DISTINCT_MODIFIER" for m in mods):
        raise PlanError("DISTINCT with ORDER BY ... LIMIT is not split by the planner", hint="run it with --engine local")
    n = an._constant(limit["limit"], "the LIMIT") if limit.get("limit") else None
    off = an._constant(limit["offset"], "the OFFSET") if limit.get("offset") else 0
    if n is None:
        return None
    n, off = int(n), int(off or 0)
    keys, parts = [], []
    for i, o in enumerate(order["orders"]):
        alias = KEY_ALIAS.format(i)
        e = copy.deepcopy(o["expression"])
        e["alias"] = alias
        root["select_list"].append(e)
        keys.append(alias)
        parts.append(f'"{alias}"{_ORDER.get(o.get("type"), "")}{_NULLS.get(o.get("null_order"), "")}')
    limit["limit"] = {"class": "CONSTANT", "type": "VALUE_CONSTANT", "alias": "", "query_location": NO_LOCATION,
                      "query_location_length": 0, "literal": {"kind": "INTEGER", "text": str(n + off)}}
    limit["offset"] = None
    return TopK(keys=keys, order_sql=", ".join(parts), limit=n, offset=off)
