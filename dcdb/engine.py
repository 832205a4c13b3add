"""The DuckDB engine: a live connection on a pool with its views and macros.

``connect(pool)`` returns a plain ``duckdb.DuckDBPyConnection`` with:

* view ``pool``: the metadata Parquet files (read natively by DuckDB, in shard order) positionally
  joined with one scan per embedding space (``b32_img``, ``b32_txt``, ``l14_img``, ``l14_txt`` as
  ``FLOAT[d]`` arrays). Row i of the metadata is row i of every Lance table (ingest guarantees and
  checks it), so a ``POSITIONAL JOIN`` lines them up without a uid hash join.
  Float NaN is stored as NULL by ingest (see ``dcdb.store.nan_to_null``), so comparisons behave
  as in numpy: a NaN score never passes, and ``ORDER BY s DESC NULLS LAST`` sorts like numpy.
* view ``pool_metadata``: the metadata alone.
* one view per stored subset (``subsets/<name>.parquet``), with columns ``uid`` (one row per copy).
* macros ``cosine(a, b)`` and ``dot(a, b)`` over embedding columns and constant vectors.

How DuckDB reaches the Lance tables (measured, see benchmarks/bench_query.py): DuckDB cannot
scan an Arrow float16 column at all (it fails at bind time even when the query does not name the
column), and DataComp's embeddings are float16. Doubling them to float32 on disk doubles the pool,
and a Parquet mirror of fixed-size lists reads 10-20x slower than Lance through pyarrow. So each
space is exposed through ``EmbeddingScan``, a ``pyarrow.dataset.Dataset`` subclass that DuckDB's
Arrow scan drives with projection pushdown: when a query names the space's column it streams the
Lance table (stored as float16) and widens each batch to float32 with numpy; when it does not, it
only yields row counts (a NULL column) taken from the Lance fragment metadata, so a metadata-only
query reads no vector bytes and costs the same as a plain ``read_parquet`` over the metadata.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dcdb.derived import group_files as derived_files
from dcdb.derived import groups as derived_groups
from dcdb.errors import PoolError, SubsetError, UsageError
from dcdb.sandbox import set_view_sources
from dcdb.sqltext import parquet_list, quote_identifier, sql_string
from dcdb.store import Pool, open_pool

POS_COLUMN = "_dcdb_pos"
SUBSET_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
RESERVED_VIEWS = {"pool", "pool_metadata", "shard_index"}
BATCH_ROWS = 1 << 16


def _embedding_scan_class():
    """Build the Dataset subclass lazily so importing this module does not import pyarrow."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.dataset as ds

    class EmbeddingScan(ds.Dataset):
        """One embedding space of a pool as an Arrow dataset DuckDB can scan.

        Schema: ``_dcdb_pos`` (NULL, only for row counting) and ``<space>`` (fixed-size list of
        float32). Rows come in Lance fragment order, which is the pool's row order.
        """

        def __init__(self, lance_dataset, column: str, dim: int, rows: int | None = None, fragment_ids=None):
            # ``lance_dataset``: an open Lance dataset, or its path, opened (importing lance, ~0.5 s)
            # only when a scan first reads vectors: metadata queries on a pool never import it.
            # ``fragment_ids``: a bucket view (dcdb.ingest.buckets.bucket_view) scans only these fragments.
            self._lance = None if isinstance(lance_dataset, (str, os.PathLike)) else lance_dataset
            self._path = None if self._lance is not None else str(lance_dataset)
            self._fragment_ids = None if fragment_ids is None else list(fragment_ids)
            self._fragments = None
            self._column = column
            self._dim = int(dim)
            self._schema = pa.schema(
                [(POS_COLUMN, pa.null()), (column, pa.list_(pa.float32(), self._dim))]
            )
            self.vector_bytes_read = 0  # what scans of this space have read from Lance so far
            self.error = None  # the PoolError a scan raised (DuckDB wraps it; see scan_error)
            self._rows = int(rows) if rows is not None else self._table_rows()
            self._checked = rows is None  # the table's rows were counted, not taken on trust
            self._files_checked = False  # data files end in intact footers (store.check_lance_files)

        @property
        def schema(self):
            return self._schema

        def count_rows(self, **_kw) -> int:
            return self._rows

        def lance_dataset(self):
            """The Lance dataset, opened and checked against the pool's row count on first use."""
            lds = self._open()
            if not self._checked:
                n = self._table_rows()
                if n != self._rows:
                    self.error = PoolError(f"embedding table {self._path!r} has {n} rows, the pool {self._rows}",
                                           hint="the pool is damaged or was changed by hand; re-ingest it")
                    raise self.error
                self._checked = True
            if not self._files_checked:
                from dcdb.store import check_lance_files

                try:
                    check_lance_files(self._path or lds.uri, lds, self._open_fragments())
                except PoolError as exc:
                    self.error = exc
                    raise
                self._files_checked = True
            return lds

        def _open(self):
            if self._lance is None:
                import lance

                try:
                    self._lance = lance.dataset(self._path)
                except Exception as exc:
                    self.error = PoolError(f"embedding table {self._path!r} cannot be opened: {exc}",
                                           hint="re-ingest the pool")
                    raise self.error from exc
            return self._lance

        def _open_fragments(self):
            """The bucket view's Lance fragments (None: the whole table)."""
            if self._fragment_ids is None:
                return None
            if self._fragments is None:
                by_id = {f.fragment_id: f for f in self._open().get_fragments()}
                missing = [i for i in self._fragment_ids if i not in by_id]
                if missing:
                    self.error = PoolError(f"embedding table {self._path!r} lacks fragment {missing[0]} of a bucket",
                                           hint="re-ingest the pool")
                    raise self.error
                self._fragments = [by_id[i] for i in self._fragment_ids]
            return self._fragments

        def _table_rows(self) -> int:
            frags = self._open_fragments()
            return self._open().count_rows() if frags is None else sum(f.count_rows() for f in frags)

        def scanner(self, columns=None, filter=None, batch_size=None, use_threads=True, **_kw):
            if filter is not None:  # DuckDB pushes no filter on these columns; refuse silently wrong
                raise NotImplementedError("EmbeddingScan does not take filters")
            cols = list(columns) if columns is not None else [f.name for f in self._schema]
            return _Scanner(self, cols)

        def to_batches(self, columns=None, **kw):
            return self.scanner(columns=columns, **kw).to_reader()

        def _batches(self, columns: list[str]) -> Iterator[Any]:
            schema = pa.schema([self._schema.field(c) for c in columns])
            if self._column not in columns:
                for start in range(0, self._rows, BATCH_ROWS):
                    m = min(BATCH_ROWS, self._rows - start)
                    yield pa.RecordBatch.from_arrays([pa.nulls(m)] * len(columns), schema=schema)
                return
            lds = self.lance_dataset()
            frags = self._open_fragments()
            if frags is not None and not frags:
                return
            scanner = lds.scanner(columns=[self._column], batch_size=BATCH_ROWS, fragments=frags, scan_in_order=True)
            from dcdb.store import lance_batches

            batches = lance_batches(scanner.to_batches(), self._path or lds.uri)
            while True:
                try:
                    batch = next(batches, None)
                except PoolError as exc:
                    self.error = exc
                    raise
                if batch is None:
                    break
                vec = batch.column(0)
                self.vector_bytes_read += vec.nbytes
                flat = vec.flatten()
                if flat.type != pa.float32():
                    flat = pa.array(flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False))
                arr = pa.FixedSizeListArray.from_arrays(flat, self._dim)
                yield pa.RecordBatch.from_arrays(
                    [arr if c == self._column else pa.nulls(len(arr)) for c in columns], schema=schema
                )

    class _Scanner:
        def __init__(self, scan: EmbeddingScan, columns: list[str]):
            self._scan = scan
            self._columns = columns

        @property
        def projected_schema(self):
            return pa.schema([self._scan.schema.field(c) for c in self._columns])

        def to_reader(self):
            return pa.RecordBatchReader.from_batches(
                self.projected_schema, self._scan._batches(self._columns)
            )

        def to_batches(self):
            return iter(self.to_reader())

        def count_rows(self) -> int:
            return self._scan.count_rows()

    return EmbeddingScan


_SCAN_CLASS = None
_SCANS: weakref.WeakKeyDictionary[Any, list] = weakref.WeakKeyDictionary()


def embedding_scans(con) -> list:
    """The EmbeddingScan objects behind a connection's ``pool`` view (for I/O accounting)."""
    return list(_SCANS.get(con, []))


def scan_error(con) -> Exception | None:
    """The dcdb error an embedding scan of ``con`` raised (DuckDB wraps it in its own), once."""
    for scan in _SCANS.get(con, []):
        if scan.error is not None:
            err, scan.error = scan.error, None
            return err
    return None


def embedding_scan(lance_dataset, column: str, dim: int, rows: int | None = None, fragment_ids=None):
    """An EmbeddingScan over a Lance dataset or (opened lazily) its path; ``rows`` is required
    with a path; ``fragment_ids`` restricts it to a bucket view's fragments."""
    global _SCAN_CLASS
    if _SCAN_CLASS is None:
        _SCAN_CLASS = _embedding_scan_class()
    return _SCAN_CLASS(lance_dataset, column, dim, rows, fragment_ids)


class _PoolView:
    """How ``pool`` is built: the metadata scan ``m`` positionally joined with ``joins`` (one per
    embedding space, ``e<i>``, then one per derived group, ``d<j>``), selecting ``columns``."""

    def __init__(self, meta: str, joins: list[str], join_columns: list[set[str]], columns: list[tuple[str, str]]):
        self.meta, self.joins, self.join_columns, self.columns = meta, joins, join_columns, columns
        self.types: dict[str, str] = {}

    def sql(self, keep: set[int] | None = None, *, temp: bool = False) -> str:
        """The view; with ``keep``, only the joins whose index is in it: the other joins' columns
        become typed NULLs, so every statement binds exactly as on the full view. ``temp``: as a
        TEMP view, which shadows the full one on this connection only."""
        joins = self.joins if keep is None else [j for i, j in enumerate(self.joins) if i in keep]
        aliases = {_join_alias(j) for j in joins} | {"m"}
        select = ", ".join(
            expr if expr.split(".", 1)[0] in aliases
            else f"CAST(NULL AS {self.types[name]}) AS {quote_identifier(name)}"
            for name, expr in self.columns
        )
        create = "CREATE TEMP VIEW" if temp else "CREATE OR REPLACE VIEW"
        return f"{create} pool AS SELECT {select} FROM {self.meta} AS m {' '.join(joins)}"


def _join_alias(join: str) -> str:
    return join.rsplit(" AS ", 1)[1]


_VIEWS: weakref.WeakKeyDictionary[Any, _PoolView] = weakref.WeakKeyDictionary()


_BINARY: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def binary_uid_sources(con) -> set[str]:
    """The relations of ``con`` whose ``uid``, ``uid_hi`` and ``uid_lo`` are the metadata's
    (dcdb.uidpath): ``pool_metadata``, and ``pool`` and ``baseline_pool`` unless a derived column
    replaces one of the three."""
    return set(_BINARY.get(con, ()))


@contextmanager
def pool_reader(con, sql: str, params: dict[str, Any] | None = None, batch_rows: int = 1 << 20, *,
                binary_uid: bool = False):
    """A ``pyarrow.RecordBatchReader`` over one statement run on ``con`` with a ``pool`` view that
    joins only the embedding spaces and derived groups the statement reads (:func:`narrow_pool`);
    consume it inside the block (on exit it is closed and the full view is back).

    ``binary_uid``: when the statement's ``uid`` result column is provably the pool's stored uid,
    run it with that column replaced by the stored halves ``__dcdb_uid_hi``/``__dcdb_uid_lo``
    (dcdb.uidpath; the caller reads them with ``dcdb.uidpath.uid_columns``); otherwise, or when
    the rewritten statement does not bind, run it as it is."""
    reader = None
    with narrow_pool(con, sql, params):
        try:
            reader = _relation(con, sql, params, binary_uid).to_arrow_reader(batch_rows)
            yield reader
        finally:
            if reader is not None:
                reader.close()  # releases the connection for the next statement


@contextmanager
def narrow_pool(con, sql: str, params: dict[str, Any] | None = None):
    """Inside the block, ``pool`` on ``con`` joins only the embedding spaces and derived groups
    ``sql`` reads; run ``sql`` (and only it) there.

    A ``POSITIONAL JOIN`` costs even when none of its columns is read: DuckDB (2.0.1 measured)
    keeps the join, scans the unread source for its row count, and cannot push the statement's
    filters below the join into the metadata scan (a uid query on a 12.8M-row pool with two
    derived groups took 3.5 s against 0.8 s on the metadata alone). Which sources a statement
    reads is DuckDB's own answer: its optimised plan (``EXPLAIN``) names the columns its
    operators read, after macros, ``*`` and constant parameters are resolved (:func:`_read_joins`).
    The other joins are dropped and their columns become typed NULLs that nothing reads. The
    narrow view is a TEMP view that shadows the full one on this connection only and is dropped
    on exit (a failed transaction's ROLLBACK drops it too); the full view is never replaced, so
    nothing is rebound to put it back. A plan that cannot be had, or a TEMP view ``pool`` of the
    caller's, keeps the full view."""
    import duckdb

    view = _VIEWS.get(con)
    keep = _read_joins(con, sql, params, view.join_columns) if view is not None else None
    narrow = keep is not None and len(keep) < len(view.joins)
    if narrow:
        try:
            con.execute(view.sql(keep, temp=True))
        except duckdb.CatalogException:  # the caller's own TEMP view named pool: leave it
            narrow = False
    try:
        yield
    finally:
        if narrow:
            try:
                con.execute("DROP VIEW temp.pool")
            except duckdb.TransactionException:  # the caller's transaction failed: its ROLLBACK drops it
                pass


def _relation(con, sql: str, params, binary_uid: bool):
    """The statement as a DuckDB relation (bound, not run), with its uid result read as the stored
    halves when ``binary_uid`` and dcdb.uidpath proves it is the stored uid."""
    import duckdb

    if binary_uid:
        from dcdb.uidpath import binary_uid_sql

        fast = binary_uid_sql(con, sql, binary_uid_sources(con))
        if fast is not None:
            try:
                return con.sql(fast, params=params or None)
            except duckdb.BinderException:  # e.g. DISTINCT with ORDER BY uid: not in the list now
                pass
    return con.sql(sql, params=params or None)


def _read_joins(con, sql: str, params, join_columns: list[set[str]]) -> set[int] | None:
    """Indexes of the joins a statement reads; None when its plan cannot be had.

    Every name in the optimised plan (projections, filters, expressions of every operator) is
    collected, and a join is kept when any of its source columns is among them: a superset of
    what the statement reads, whatever the plan's shape (positional scans of parquet files, nested
    positional joins around Arrow scans). An unread embedding scan projects only its row-count
    column, which belongs to no join."""
    import json

    import duckdb

    try:
        rows = con.execute("EXPLAIN (FORMAT JSON) " + sql, params or None).fetchall()
        plan = json.loads(rows[0][1])
    except (duckdb.Error, ValueError, IndexError):
        return None
    names: set[str] = set()
    stack = list(plan) if isinstance(plan, list) else [plan]
    if not stack:
        return None
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            return None
        for key, value in (node.get("extra_info") or {}).items():
            if key not in ("Function", "Estimated Cardinality"):
                names.update(_NAME_RE.findall(json.dumps(value)))
        stack.extend(node.get("children", []))
    return {i for i, cols in enumerate(join_columns) if cols & names}


_NAME_RE = re.compile(r"[^\W\d]\w*")


def _projection(con, source: str, alias: str, skip: set[str] = frozenset()) -> list[tuple[str, str]]:
    """(name, select expression) for each column of ``source`` read as ``alias``."""
    out = []
    for name, *_ in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall():
        if name not in skip:
            out.append((name, f"{alias}.{quote_identifier(name)}"))
    return out


def stored_subsets(pool: Pool) -> dict[str, Path]:
    """Stored subsets of a pool: name -> its uid parquet (``subsets/<name>.parquet``)."""
    out: dict[str, Path] = {}
    d = pool.subsets_dir
    if d.is_dir():
        for p in sorted(d.glob("*.parquet")):
            if SUBSET_NAME_RE.match(p.stem) and (d / f"{p.stem}.npy").is_file():
                out[p.stem] = p
    return out


def check_subset_name(name: str) -> str:
    if not SUBSET_NAME_RE.match(name or ""):
        raise SubsetError(
            f"invalid subset name {name!r}",
            hint="use lowercase letters, digits and underscores, starting with a letter or _",
        )
    if name in RESERVED_VIEWS:
        raise SubsetError(f"subset name {name!r} is reserved", hint="choose another name")
    category = sql_keywords().get(name)
    if category is not None and not _parses_as_table(name):
        raise SubsetError(
            f"subset name {name!r} is an SQL keyword ({category} in DuckDB): `SELECT * FROM {name}` would not parse",
            hint=f"choose another name, e.g. {name}_subset",
        )
    return name


_KEYWORDS: dict[str, str] | None = None


def sql_keywords() -> dict[str, str]:
    """DuckDB's own keyword list (``duckdb_keywords()``): keyword -> its category (asked once)."""
    global _KEYWORDS
    if _KEYWORDS is None:
        import duckdb

        con = duckdb.connect(":memory:")
        try:
            rows = con.execute("SELECT keyword_name, keyword_category FROM duckdb_keywords()").fetchall()
        finally:
            con.close()
        _KEYWORDS = {k.lower(): c.replace("_", "/") for k, c in rows}
    return _KEYWORDS


def _parses_as_table(name: str) -> bool:
    """Whether DuckDB's parser takes ``name`` unquoted as a table (``year`` and ``map`` do, ``both``
    and ``order`` do not), in a FROM and in a join of a subquery."""
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        for sql in (f"SELECT * FROM {name}", f"SELECT 1 WHERE 1 IN (SELECT uid FROM {name} JOIN pool USING (uid))"):
            con.extract_statements(sql)
    except duckdb.ParserException:
        return False
    finally:
        con.close()
    return True


# Every character for which Python's str.isspace() is true, as an RE2 class body. RE2's \s is
# ASCII-only and misses \x0b, \x1c-\x1f, \x85, \xa0 and the Unicode spaces, so Python's
# ``text.split()`` (DataComp's word count) needs the full list. A test checks it against Python.
PY_WHITESPACE = (
    r"\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
)

MACROS = (
    # Cosine similarity and dot product of two vectors: embedding columns (FLOAT[d]) or constants
    # (a list literal or a $parameter holding a list of numbers).
    "CREATE OR REPLACE MACRO cosine(a, b) AS list_cosine_similarity(a::FLOAT[], b::FLOAT[])",
    "CREATE OR REPLACE MACRO dot(a, b) AS list_inner_product(a::FLOAT[], b::FLOAT[])",
    # words_gt(text, n) = (len(text.split()) > n) in Python, as one linear-time regex match
    # (~12x faster than counting); py_words(text) = len(text.split()).
    (f"CREATE OR REPLACE MACRO words_gt(s, n) AS regexp_matches(s, '^[{PY_WHITESPACE}]*(?:[^{PY_WHITESPACE}]+"
    f"[{PY_WHITESPACE}]+){{' || CAST(n AS VARCHAR) || '}}[^{PY_WHITESPACE}]')"),
    f"CREATE OR REPLACE MACRO py_words(s) AS len(regexp_extract_all(s, '[^{PY_WHITESPACE}]+'))",
)


def statement_errors() -> tuple[type[Exception], ...]:
    """What running a statement through :func:`pool_reader` may raise: DuckDB's errors, and what
    pyarrow re-raises while batches stream (``OSError`` without errno for DuckDB's errors,
    ``ValueError`` around a registered function's or an embedding scan's error). Catch these and
    let ``dcdb.query.statement_error`` say which dcdb error they are."""
    import duckdb

    return (duckdb.Error, OSError, ValueError)


def pool_damage(pool: Pool, exc: Exception) -> PoolError | None:
    """The PoolError for a DuckDB error that comes from a damaged file of the pool (a truncated or
    overwritten Parquet file); None for any other error."""
    import duckdb

    if isinstance(exc, (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException,
                        duckdb.ConversionException, duckdb.PermissionException)):
        return None
    msg = str(exc)
    roots = {str(pool.path), os.path.realpath(pool.path)}
    if not any(r.rstrip("/") + "/" in msg for r in roots):
        # DuckDB's Parquet reader does not always name the file (a damaged page: "don't know what
        # type"): on the error path only, check every metadata file's footer and row count
        bad = _damaged_metadata(pool)
        if bad is None:
            return None
        msg = bad
    from dcdb.errors import one_line

    msg = re.split(r"\n+LINE \d+:", msg)[0]  # the position in dcdb's own view SQL means nothing to a user
    return PoolError(f"pool {str(pool.path)!r} is damaged: {one_line(msg)}",
                     hint="re-ingest the pool (or restore the file named) and re-run")


def _damaged_metadata(pool: Pool) -> str | None:
    """The first metadata file whose Parquet footer cannot be read or whose row count is not the
    manifest's, as a message; None when every footer is whole."""
    import pyarrow.parquet as pq

    for shard, path in zip(pool.shards, pool.metadata_files()):
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # noqa: BLE001 -- pyarrow raises ArrowInvalid, OSError, ...
            return f"metadata file {str(path)!r} cannot be read ({exc})"
        if rows != shard["rows"]:
            return f"metadata file {str(path)!r} has {rows} rows, the manifest says {shard['rows']}"
    return None


def connect(pool: Pool | str | Path | None = None, *, threads: int | None = None,
            memory_limit: str | None = None, sandboxed: bool = False, allowed_paths=()):
    """A DuckDB connection on ``pool`` with the views ``pool``, ``pool_metadata``, one view per
    stored subset, and the vector macros. The pool is only read.

    A full connection by default (yours: read any file, load extensions, change settings). With
    ``sandboxed=True`` it is sandboxed as dcdb runs filters (dcdb.sandbox): statements read only
    the pool and ``allowed_paths`` (files, folders or globs), no extension is installed or
    loaded, and the settings are locked."""
    import duckdb

    if not isinstance(pool, Pool):
        pool = open_pool(pool)
    try:
        return _connect(pool, threads=threads, memory_limit=memory_limit, sandboxed=sandboxed,
                        allowed_paths=allowed_paths)
    except duckdb.Error as exc:
        damage = pool_damage(pool, exc)
        if damage is None:
            raise
        raise damage from None


def _connect(pool: Pool, *, threads: int | None, memory_limit: str | None, sandboxed: bool, allowed_paths):
    import duckdb

    if allowed_paths and not sandboxed:
        raise UsageError("allowed_paths= is for a sandboxed connection",
                         hint="pass sandboxed=True too, or drop allowed_paths (a full connection reads "
                         "any file)")
    if not isinstance(pool, Pool):
        pool = open_pool(pool)
    con = duckdb.connect(":memory:")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if memory_limit:
        con.execute(f"SET memory_limit = {sql_string(memory_limit)}")
    files = pool.metadata_files()
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise PoolError(
            f"pool {str(pool.path)!r} is damaged: {len(missing)} metadata file(s) missing, "
            f"first {str(missing[0])!r}",
            hint="re-ingest the pool",
        )
    sources = list(files)
    meta = f"read_parquet({parquet_list(files)})"
    con.execute(f"CREATE VIEW pool_metadata AS SELECT * FROM {meta}")
    joins, emb_cols, join_columns = [], [], []
    for i, (space, spec) in enumerate(pool.spaces.items()):
        path = pool.lance_path(space)
        if not path.is_dir():
            raise PoolError(f"pool {str(pool.path)!r} is damaged: embedding table {str(path)!r} is missing",
                            hint="re-ingest the pool")
        view_of = pool.manifest.get("_view")  # a bucket view: only its buckets' fragments
        fragment_ids = view_of["fragment_ids"] if view_of else None
        view = f"_dcdb_emb_{space}"
        scan = embedding_scan(path, space, spec["dim"], pool.rows, fragment_ids)
        _SCANS.setdefault(con, []).append(scan)
        con.register(view, scan)
        alias = f"e{i}"
        joins.append(f"POSITIONAL JOIN {quote_identifier(view)} AS {alias}")
        emb_cols.append((space, f"{alias}.{quote_identifier(space)}"))
        join_columns.append({space})
    # Derived columns (dcdb annotate): row-aligned parquet per group; later groups win on a name.
    derived_cols: dict[str, str] = {}
    for j, group in enumerate(derived_groups(pool)):
        group_files = derived_files(pool, group)
        sources += group_files
        src = f"read_parquet({parquet_list(group_files)})"
        alias = f"d{j}"
        joins.append(f"POSITIONAL JOIN {src} AS {alias}")
        read = _projection(con, src, alias)
        join_columns.append({name for name, _ in read})
        spaces = {n.lower() for n, _ in emb_cols}
        for name, expr in read:
            if name.lower() in spaces:  # written before annotate refused such columns
                raise PoolError(
                    f"derived group {group!r} of pool {str(pool.path)!r} has a column {name!r} that hides "
                    "the embedding space of that name",
                    hint=f"drop the group: dcdb annotate --pool {pool.path} --drop {group}",
                )
            derived_cols[name] = expr
    stored = _projection(con, meta, "m")
    hidden = set(derived_cols) | {n for n, _ in emb_cols}
    meta_cols = [(n, e) for n, e in stored if n not in hidden]
    columns = meta_cols + list(derived_cols.items()) + emb_cols
    from dcdb.uidpath import CARRIED

    # the relations whose uid, uid_hi, uid_lo are the metadata's, for dcdb.uidpath
    _BINARY[con] = {"pool_metadata"} if set(CARRIED) <= {n for n, _ in stored} else set()
    if _BINARY[con] and not set(CARRIED) & hidden:
        _BINARY[con] |= {"pool", "baseline_pool"}
    view = _PoolView(meta, joins, join_columns, columns)
    con.execute(view.sql())
    if joins:
        view.types = dict(con.execute("SELECT column_name, data_type FROM duckdb_columns() "
                                      "WHERE table_name = 'pool'").fetchall())
        _VIEWS[con] = view
    from dcdb.ingest.buckets import uid_range_predicate

    in_view = uid_range_predicate(pool)  # a bucket view sees the subset uids of its buckets only
    for name, path in stored_subsets(pool).items():
        if name in RESERVED_VIEWS:
            continue
        sources.append(path)
        con.execute(
            f"CREATE VIEW {quote_identifier(name)} AS SELECT uid FROM read_parquet({sql_string(str(path.resolve()))})"
            + (f" WHERE {in_view}" if in_view else "")
        )
    from dcdb.shards.index import index_files
    from dcdb.shards.index import view_sql as shard_index_view

    shard_index_sql = shard_index_view(pool)
    if shard_index_sql:
        con.execute(shard_index_sql)
        sources += index_files(pool)
    set_view_sources(con, sources)
    for m in MACROS:
        con.execute(m)
    from dcdb.filters import register

    register(con, pool)
    if sandboxed:
        from dcdb.sandbox import apply

        one = isinstance(allowed_paths, (str, os.PathLike))
        allow = [allowed_paths] if one else list(allowed_paths or ())
        apply(con, pool, allow, who="this sandboxed connection", kind="connection")
    return con
