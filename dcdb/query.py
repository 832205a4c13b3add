"""Filter files: find them, read their header, bind their parameters, run them, write uid lists.

A filter is one SELECT over ``pool`` (and stored subsets) whose result has a ``uid`` column and an
optional integer ``copies`` column (upsampling: a uid with copies = 3 appears 3 times in the list).
Its header comment says what it keeps and declares parameters and assets::

    -- Keep rows whose L/14 CLIP score is at least a threshold.
    -- @param threshold float = 0.3   minimum clip_l14_similarity_score
    -- @param arch str = l14          b32 or l14
    -- @asset none
    SELECT uid FROM pool WHERE clip_l14_similarity_score >= $threshold

Parameters are found by DuckDB's own parser (so ``$x`` inside a comment or a string is not one),
bound as DuckDB named parameters (never pasted into the text) and checked before anything runs: a
parameter used but neither given nor defaulted, or given but not used, is an error.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from dcdb import uids as U
from dcdb.errors import (
    FilterNotFoundError,
    ParameterError,
    QueryError,
    UsageError,
)
from dcdb.sandbox import SQL_HINT, check_statement
from dcdb.store import Pool

PARAM_TYPES = ("int", "float", "str", "bool", "path")
_PARAM_RE = re.compile(
    r"^\s*@param\s+(?P<name>[A-Za-z_]\w*)\s+(?P<type>\w+)(?:\s*=\s*(?P<default>\S+))?\s*(?P<doc>.*)$"
)
_ASSET_RE = re.compile(r"^\s*@asset\s+(?P<name>\S+)\s*(?P<doc>.*)$")
_TAG_RE = re.compile(r"^\s*@(?P<tag>\w+)\b")
FORMATS = U.FORMATS
# A filter's copies column: 0 drops the row, 1..MAX_COPIES lists it that many times; the expanded
# list holds at most COPIES_TOTAL_FACTOR x the pool's rows (or COPIES_TOTAL_MIN for small pools),
# so a stray `copies = 1e12` is one clear error instead of an exhausted memory.
MAX_COPIES = 1000
COPIES_TOTAL_FACTOR = 10
COPIES_TOTAL_MIN = 1_000_000


# ------------------------------------------------------------------------------ filter files


@dataclass
class ParamSpec:
    name: str
    type: str
    default: Any = None
    has_default: bool = False
    doc: str = ""


@dataclass
class FilterFile:
    """A filter's text and what its header declares."""

    name: str
    text: str
    path: Path | None = None
    description: str = ""
    params: dict[str, ParamSpec] = field(default_factory=dict)
    assets: list[tuple[str, str]] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def builtin_filters() -> dict[str, Any]:
    """Name -> resource of every ``sql/*.sql`` shipped with dcdb."""
    out = {}
    for entry in resources.files("dcdb.sql").iterdir():
        if entry.name.endswith(".sql"):
            out[entry.name[: -len(".sql")]] = entry
    return dict(sorted(out.items()))


def load_filter(ref: str, *, text: str | None = None) -> FilterFile:
    """Resolve a filter reference: ``-`` with ``text`` (stdin), a path to a file, or a name of a
    file in ``sql/``. Unknown names suggest the closest ones."""
    if text is not None:
        return parse_filter(ref, text, None)
    p = Path(ref).expanduser()
    if p.is_file():
        try:
            return parse_filter(p.stem, p.read_text(), p)
        except UnicodeDecodeError as exc:
            raise QueryError(f"filter file {ref!r} is not UTF-8 text",
                             hint="a filter is a text file of SQL; save it as UTF-8") from exc
    if ref.endswith(".sql") or "/" in ref or p.suffix:
        raise FilterNotFoundError(f"filter file {ref!r} does not exist", hint="check the path")
    known = builtin_filters()
    if ref in known:
        return parse_filter(ref, known[ref].read_text(), None)
    close = difflib.get_close_matches(ref, list(known), n=3, cutoff=0.5)
    hint = (
        f"did you mean {' or '.join(repr(c) for c in close)}?"
        if close
        else "run `dcdb filters` to list the built-in filters, or give a path to a .sql file"
    )
    raise FilterNotFoundError(f"unknown filter {ref!r}", hint=hint)


def parse_filter(name: str, text: str, path: Path | None) -> FilterFile:
    """Read the leading comment block: description lines, ``@param`` and ``@asset`` lines."""
    f = FilterFile(name=name, text=text, path=path)
    desc: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            if desc:
                desc.append("")
            continue
        if not line.startswith("--"):
            break
        body = line[2:].strip()
        m = _PARAM_RE.match(body)
        if m:
            f.params[m["name"]] = _param_spec(name, m)
            continue
        m = _ASSET_RE.match(body)
        if m:
            if m["name"].lower() != "none":
                f.assets.append((m["name"], m["doc"].strip()))
            continue
        if _TAG_RE.match(body):
            raise QueryError(
                f"filter {name!r}: unknown header tag in {body!r}",
                hint="the header knows `-- @param NAME TYPE [= DEFAULT] doc` and `-- @asset NAME doc`",
            )
        desc.append(body)
    f.description = "\n".join(desc).strip()
    return f


def _param_spec(filter_name: str, m: re.Match) -> ParamSpec:
    ptype = m["type"].lower()
    if ptype not in PARAM_TYPES:
        raise QueryError(
            f"filter {filter_name!r}: parameter ${m['name']} has unknown type {m['type']!r}",
            hint=f"use one of {', '.join(PARAM_TYPES)}",
        )
    spec = ParamSpec(name=m["name"], type=ptype, doc=m["doc"].strip())
    if m["default"] is not None:
        spec.has_default = True
        spec.default = None if m["default"].lower() == "null" else convert_value(spec, m["default"])
    return spec


def convert_value(spec: ParamSpec, raw: str) -> Any:
    """Convert a ``-p NAME VALUE`` string to the declared type (or infer int/float/str)."""
    t = spec.type
    try:
        if t == "int":
            return int(raw)
        if t == "float":
            v = float(raw)
            return v
        if t == "bool":
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if t == "path":
            return str(Path(raw).expanduser().resolve())
        if t == "str":
            return raw
    except ValueError:
        raise ParameterError(
            f"parameter ${spec.name} expects {'an' if t == 'int' else 'a'} {t}, got {raw!r}",
            hint=f"pass e.g. -p {spec.name} {_example(t)}",
        ) from None
    # undeclared: infer
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


def _example(t: str) -> str:
    return {"int": "10", "float": "0.3", "bool": "true", "path": "file.txt"}.get(t, "text")


# ----------------------------------------------------------------------- statement checking


def _clean(exc: Exception) -> str:
    return str(exc).strip()


def bind_parameters(filt: FilterFile, used: list[str], given: dict[str, str]) -> dict[str, Any]:
    """Check and convert parameters before running: every used one given or defaulted, every
    given one used. Returns the DuckDB parameter dict."""
    positional = [u for u in used if u.isdigit()]
    if positional:
        raise ParameterError(
            f"filter {filt.name!r} uses positional parameter(s) {', '.join('$' + p for p in positional)}",
            hint="use named parameters ($threshold) declared in the header",
        )
    unknown = sorted(set(given) - set(used))
    if unknown:
        close = {u: difflib.get_close_matches(u, used, n=1) for u in unknown}
        sug = "; ".join(f"did you mean {c[0]!r} for {u!r}?" for u, c in close.items() if c)
        raise ParameterError(
            f"filter {filt.name!r} has no parameter {', '.join('$' + u for u in unknown)}; "
            f"it uses {', '.join('$' + u for u in used) or 'none'}",
            hint=sug or "remove the extra -p",
        )
    out: dict[str, Any] = {}
    missing = []
    for p in used:
        spec = filt.params.get(p, ParamSpec(name=p, type="auto"))
        if p in given:
            out[p] = convert_value(spec, given[p])
        elif spec.has_default:
            out[p] = spec.default
        else:
            missing.append(p)
    if missing:
        raise ParameterError(
            f"filter {filt.name!r} needs parameter(s) {', '.join('$' + m for m in missing)} with no default",
            hint="pass " + " ".join(f"-p {m} VALUE" for m in missing),
        )
    return out


# ------------------------------------------------------------------------------------- run


@dataclass
class FilterResult:
    uids: np.ndarray  # sorted, one entry per copy
    filter: FilterFile
    params: dict[str, Any]
    pool: Pool
    seconds: float
    result_rows: int

    @property
    def rows(self) -> int:
        return len(self.uids)

    def manifest(self, *, output: str | None = None, fmt: str | None = None) -> dict[str, Any]:
        from dcdb.version import __version__

        unique = U.count_unique(self.uids)
        return {
            "kind": "dcdb-subset",
            "filter": self.filter.name,
            "filter_path": str(self.filter.path.resolve()) if self.filter.path else None,
            "sql": self.filter.text,
            "sql_sha256": self.filter.sha256,
            "params": {k: _jsonable(v) for k, v in self.params.items()},
            "pool": str(self.pool.path.resolve()),
            "pool_manifest_sha256": self.pool.manifest_hash,
            "pool_rows": self.pool.rows,
            "rows": self.rows,
            "unique_uids": unique,
            "output": output,
            "format": fmt,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": round(self.seconds, 4),
            "dcdb_version": __version__,
        }


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def run_filter(pool: Pool, filt: FilterFile, given: dict[str, str] | None = None, *, con=None) -> FilterResult:
    """Run a filter on a pool and return its sorted uid list (copies expanded). The connection it
    opens is sandboxed (dcdb.sandbox): the filter reads only the pool and its path parameters; a
    connection passed as ``con`` is the caller's and runs as it is."""

    from dcdb.engine import connect, pool_reader, statement_errors

    t0 = time.perf_counter()
    own = con is None
    con = con or connect(pool)
    used = check_statement(con, filt.text, filt.name)
    params = bind_parameters(filt, used, dict(given or {}))
    if own:
        from dcdb.sandbox import apply, path_values

        apply(con, pool, path_values(filt, params), who=f"filter {filt.name!r}")
    try:
        from dcdb.filters.vectors import rewrite_sql  # knn(space, (SELECT emb ...), k): every seed row

        sql = rewrite_sql(con, filt.text)
        with pool_reader(con, sql, params, 1 << 20, binary_uid=True) as reader:
            arr, copies_parts, nrows = collect_into(reader, filt.name, pool.rows)
    except statement_errors() as exc:
        err = statement_error(con, exc, f"filter {filt.name!r}", pool)
        if err is None:
            raise
        raise err from None
    if copies_parts is not None:
        copies = np.concatenate(copies_parts) if copies_parts else np.empty(0, np.int64)
        arr = np.repeat(arr, copies)
    arr = U.sort(arr, copy=False)  # arr is ours: a sorted result is not copied again
    return FilterResult(
        uids=arr, filter=filt, params=params, pool=pool, seconds=time.perf_counter() - t0, result_rows=nrows
    )


def statement_error(con, exc: Exception, what: str, pool: Pool | None) -> Exception | None:
    """The dcdb error for what running ``what`` raised (caught as ``engine.statement_errors()``),
    or None when it is none of dcdb's to name and must go on as it is: a file-system fault
    (``OSError`` with an errno, e.g. a full disk while writing) or a ``ValueError`` with no
    registered function's or embedding scan's error behind it (a bug)."""
    import duckdb

    if isinstance(exc, OSError) and exc.errno is not None:
        return None
    if isinstance(exc, ValueError) and not isinstance(exc, duckdb.Error):
        from dcdb.engine import scan_error
        from dcdb.filters import take_error

        return take_error(con) or scan_error(con)
    return translate_error(con, exc, what, pool)


def translate_error(con, exc: Exception, what: str, pool: Pool | None) -> Exception:
    """The dcdb error for a DuckDB error ``exc`` raised running ``what`` (e.g. "filter 'x'"): first
    the dcdb error a registered Python function or embedding scan raised (DuckDB wraps it), the
    sandbox's refusal, a damaged pool file; then by DuckDB's exception class. Every one has a hint."""
    import duckdb

    from dcdb.engine import pool_damage, scan_error
    from dcdb.filters import take_error
    from dcdb.sandbox import refusal

    err = take_error(con) or scan_error(con) or refusal(con, exc)
    if err is None and pool is not None:
        err = pool_damage(pool, exc)
    if err is not None:
        return err
    if isinstance(exc, duckdb.ParserException):
        return QueryError(f"SQL syntax error in {what}: {_clean(exc)}", hint=f"fix the SQL at that position; {SQL_HINT}")
    if isinstance(exc, (duckdb.BinderException, duckdb.CatalogException)):
        return QueryError(f"{what}: {_clean(exc)}", hint=_binder_hint(exc, pool))
    if isinstance(exc, duckdb.ConversionException):
        return ParameterError(f"{what}: a value has the wrong type: {_clean(exc)}",
                              hint="CAST it in the SQL, or pass a -p value of the parameter's declared type")
    if isinstance(exc, duckdb.OutOfMemoryException):
        return QueryError(f"{what} ran out of memory: {_clean(exc)}",
                          hint="select fewer columns or rows (a uid result needs little); DuckDB spills "
                          "sorts and joins to disk within its memory_limit")
    return QueryError(f"{what} failed: {_clean(exc)}",
                      hint="DuckDB's message says what failed; try the statement with `dcdb sql` to see its rows")


def copies_limit(pool_rows: int) -> int:
    """The most uids a result may list once its copies are expanded."""
    return max(COPIES_TOTAL_FACTOR * int(pool_rows), COPIES_TOTAL_MIN)


def check_copies_total(total: int, pool_rows: int, name: str) -> None:
    """QueryError when copies expand a result past ``copies_limit(pool_rows)``."""
    if total > copies_limit(pool_rows):
        raise QueryError(
            f"filter {name!r}: its copies add up to more than {copies_limit(pool_rows):,} uids, the most a "
            f"result may list ({COPIES_TOTAL_FACTOR}x the pool's {int(pool_rows):,} rows, at least "
            f"{COPIES_TOTAL_MIN:,})",
            hint="lower the copies column (the resharder writes every copy as a sample)",
        )


def collect_into(reader, name: str, capacity: int, pool_rows: int | None = None):
    """(uid array, copies parts or None, rows) of a filter's result, decoded into one buffer of
    ``capacity`` rows while it lasts. Copies are checked against ``MAX_COPIES`` and, added up,
    against ``copies_limit(pool_rows)`` (``pool_rows`` defaults to ``capacity``). A result whose
    uid came as the stored halves (``pool_reader(..., binary_uid=True)``) is read from them."""
    import pyarrow as pa

    from dcdb.uidpath import OUT_HI, OUT_LO, uid_columns

    schema = reader.schema
    names = {n.lower(): n for n in schema.names}
    binary = "uid" not in names and all(
        n in schema.names and schema.field(n).type == pa.uint64() for n in (OUT_HI, OUT_LO))
    if "uid" not in names and not binary:
        raise QueryError(
            f"the result of filter {name!r} has no uid column (it has {', '.join(schema.names) or 'none'})",
            hint="SELECT uid FROM pool WHERE ...",
        )
    uid_col = names.get("uid")

    def decode(batch, source, out=None):
        if binary:  # the stored halves: two copies, no hex decode
            return uid_columns(batch.column(OUT_HI), batch.column(OUT_LO), source, out)
        return U.from_arrow(batch.column(uid_col), source, out)

    copies_col = names.get("copies")
    if copies_col is not None and not pa.types.is_integer(schema.field(copies_col).type):
        raise QueryError(
            f"the copies column of filter {name!r} has type {schema.field(copies_col).type}, not integer",
            hint="cast it: CAST(... AS INTEGER) AS copies",
        )
    # uids are decoded into one buffer of the pool's size (np.empty: pages are touched only as
    # rows arrive), so a large result is not copied again to join its batches; a result with more
    # rows than the pool (joins, unions) goes on in parts
    buf = np.empty(capacity, dtype=U.UID_DTYPE)
    parts, cparts, n, total = [], ([] if copies_col else None), 0, 0
    for batch in reader:
        rows = batch.num_rows
        if not parts and n + rows <= capacity:
            decode(batch, f"result of filter {name!r}", buf[n : n + rows])
        else:
            if not parts:
                parts.append(buf[:n])
            parts.append(decode(batch, f"result of filter {name!r}"))
        if copies_col is not None:
            c = batch.column(copies_col)
            if c.null_count:
                raise QueryError(f"filter {name!r} returned NULL copies", hint="use 0 to drop a row")
            c = c.to_numpy(zero_copy_only=False).astype(np.int64)
            if (c < 0).any():
                raise QueryError(f"filter {name!r} returned negative copies ({int(c.min())})",
                                 hint=f"copies must be 0 (drop the row) to {MAX_COPIES:,}")
            if (c > MAX_COPIES).any():
                raise QueryError(f"filter {name!r} returned {int(c.max()):,} copies of a uid; at most "
                                 f"{MAX_COPIES:,} are allowed", hint=f"copies must be 0 (drop the row) to {MAX_COPIES:,}")
            total += int(c.sum())
            check_copies_total(total, capacity if pool_rows is None else pool_rows, name)
            cparts.append(c)
        n += batch.num_rows
    return (np.concatenate(parts) if parts else buf[:n]), cparts, n


_EMB_COLS = re.compile(r"\b(b32_img|b32_txt|l14_img|l14_txt)\b")


def _binder_message(name: str, exc: Exception, pool: Pool) -> str:
    return f"filter {name!r}: {_clean(exc)}"


def _binder_hint(exc: Exception, pool: Pool | None) -> str:
    msg = str(exc)
    m = _EMB_COLS.search(msg)
    if pool is not None and m and m.group(1) not in pool.spaces:
        if not pool.spaces:
            return "this pool is metadata-only: re-ingest with the .npz embedding files beside the parquet"
        return f"this pool's embedding spaces are {', '.join(pool.spaces)}"
    if "does not exist" in msg or "not found" in msg:
        return "`dcdb info` lists the pool's columns; stored subsets are views named after the subset"
    return "check the names and types the message points at; `dcdb info` lists the pool's columns"


# ------------------------------------------------------------------------------------ output


SUFFIX_FORMATS = {".npy": "npy", ".parquet": "parquet", ".txt": "txt"}


def output_format(path: str | None, fmt: str | None, *, format_flag: bool = True) -> str:
    """The format of a uid list written to ``path``: ``fmt`` when given, else from the suffix
    (.npy, .parquet, .txt); a path without a suffix is npy (DataComp's). A suffix that contradicts
    ``fmt``, or an unknown suffix without ``fmt``, is refused: a file's name says what it holds.
    ``format_flag=False`` for commands without ``--format`` (the hint then does not offer it)."""
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    suffix = Path(path).suffix.lower() if path else ""
    if not suffix:
        return fmt or "npy"
    by_suffix = SUFFIX_FORMATS.get(suffix)
    if fmt is not None:
        if by_suffix is not None and by_suffix != fmt:
            raise UsageError(
                f"output {path!r} ends in {suffix} but --format is {fmt}",
                hint=f"name the file *.{fmt}, or pass --format {by_suffix}",
            )
        return fmt
    if by_suffix is None:
        raise UsageError(
            f"cannot tell the format of output {path!r} from its suffix {suffix!r}",
            hint="name it *.npy (DataComp's uid list), *.parquet or *.txt (hex uids, one per line)"
            + (f", or pass --format {'|'.join(FORMATS)}" if format_flag else ""),
        )
    return by_suffix


def write_uids(path: str | Path, arr: np.ndarray, fmt: str) -> Path:
    """Write a sorted uid list atomically in one of FORMATS."""
    from dcdb.io import atomic_path

    path = Path(path)
    if fmt == "npy":
        return U.save(path, arr, sorted_=True)
    with atomic_path(path) as tmp:
        U.write_file(tmp, arr, fmt)
    return path


def write_output(path: str | Path, arr: np.ndarray, fmt: str, manifest: dict[str, Any]) -> Path:
    """A uid file and its manifest (OUTPUT.json) as one unit: both are written under temp names,
    the old manifest is removed, then the uid file and the manifest are renamed into place. A
    failure while writing (a full disk) leaves an earlier output as it was; a run killed between
    the renames leaves a uid file without a manifest, which the next run redoes without --force
    (``dcdb.io.unfinished_output``)."""
    from dcdb.io import atomic_path, json_text, sweep_temps, writing

    path = Path(path)
    mpath = manifest_path(path)
    sweep_temps(path)  # what a killed run left
    sweep_temps(mpath)
    with writing(path, "output", redo="then re-run the command"), atomic_path(mpath) as mtmp:
        mtmp.write_text(json_text(manifest))
        with atomic_path(path) as tmp:
            U.write_file(tmp, arr, fmt)
            if not mpath.is_symlink():  # (a link is written through: its target is replaced)
                mpath.unlink(missing_ok=True)
    return path


def manifest_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".json")


__all__ = [
    "FilterFile",
    "FilterResult",
    "ParamSpec",
    "bind_parameters",
    "builtin_filters",
    "check_statement",
    "load_filter",
    "run_filter",
    "write_uids",
]
