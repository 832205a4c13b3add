"""``dcdb annotate``: derived columns computed once per pool, or imported, for the baselines.

Annotators (each writes one derived group, see ``dcdb/derived.py``; recomputed only with
``force=True``):

==============  =============  ==================================================================
name            column         value
==============  =============  ==================================================================
``lang``        ``lang``       fastText language id (lid.176) of the caption, newlines as spaces
``lang_cld3``   ``lang_cld3``  CLD3 language id, as DataComp's laion2b baseline
``wordnet``     ``wn_offsets`` first-WordNet-synset offsets of the caption's ``text.split()``
                               tokens (INT32 list, distinct): ``text_based`` then needs no WordNet
                               lookups, only a bitmap test against the id file
``centroids``   ``centroid_id`` nearest centroid of ``l14_img`` (``-p centroids FILE``; with
                               ``-p imagenet_embeddings GLOB`` the target set is stored too), so
                               ``image_based`` runs without a matmul; the query checks the file
==============  =============  ==================================================================

``import_columns`` adds columns computed elsewhere from a Parquet file keyed by ``uid``: duplicate
uids in the file are an error, uids the pool does not have are an error unless allowed (then
skipped and counted), pool rows the file lacks get NULL and are counted.

Text annotators run shard by shard on worker processes (all cores; a pool below
``PARALLEL_MIN_ROWS`` runs in-process), each worker holding one shard; centroid assignment streams
the Lance table in blocks (numpy's BLAS uses the cores). Every group is written atomically.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcdb.derived import GROUP_RE, groups, write_group
from dcdb.errors import SourceError, UidError, UsageError
from dcdb.store import DERIVED_DIR, Pool

PARALLEL_MIN_ROWS = 50_000
IMPORT_BATCH = 1 << 16


@dataclass(frozen=True)
class Annotator:
    """A derived group that dcdb can compute."""

    name: str
    column: str
    doc: str
    params: tuple[str, ...] = ()
    required: tuple[str, ...] = ()


ANNOTATORS: dict[str, Annotator] = {
    a.name: a
    for a in (
        Annotator("lang", "lang", "fastText language id (lid.176) of each caption, newlines as spaces"),
        Annotator("lang_cld3", "lang_cld3", "CLD3 language id of each caption (DataComp's laion2b)"),
        Annotator("wordnet", "wn_offsets", "first-synset WordNet offsets of each caption's whitespace tokens",
                  params=("wordnet",)),
        Annotator("centroids", "centroid_id", "nearest centroid (dot product) of each l14_img",
                  params=("centroids", "imagenet_embeddings"), required=("centroids",)),
    )
}


@dataclass
class Report:
    """What an annotate or import run did (``summary()`` is the CLI's line)."""

    group: str
    columns: list[str]
    rows: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds > 0 else float("inf")
        extra = f"; {'; '.join(self.notes)}" if self.notes else ""
        return (f"derived group {self.group!r} ({', '.join(self.columns)}): {self.rows:,} rows in "
                f"{self.seconds:.1f}s ({rate:,.0f} rows/s){extra}")


# ---------------------------------------------------------------------------------- helpers


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", unit_scale=True, desc=desc, file=sys.stderr, disable=not enabled)


def _check_params(ann: Annotator, params: dict[str, str]) -> None:
    unknown = sorted(set(params) - set(ann.params))
    if unknown:
        takes = ", ".join(f"-p {p}" for p in ann.params) or "no parameters"
        raise UsageError(f"annotator {ann.name!r} has no parameter {', '.join(unknown)}", hint=f"it takes {takes}")
    missing = [p for p in ann.required if not params.get(p)]
    if missing:
        raise UsageError(f"annotator {ann.name!r} needs -p {missing[0]} FILE", hint=ANNOTATORS[ann.name].doc)


def _check_free(pool: Pool, group: str, force: bool) -> None:
    if (pool.path / DERIVED_DIR / group).exists() and not force:
        raise UsageError(f"the pool already has derived group {group!r}", hint="pass --force to recompute it")


def _jobs(pool: Pool, jobs: int | None) -> int:
    if jobs is not None:
        return max(1, jobs)
    if pool.rows < PARALLEL_MIN_ROWS or len(pool.shards) < 2:  # no spawn: dcdb.parallel runs in-process
        return 1
    return max(1, min(os.cpu_count() or 1, len(pool.shards)))


# ---------------------------------------------------------------------------- text annotators


def _text_column(path: str):
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def text_task(task: tuple[str, str, str]) -> Any:
    """Worker: (annotator, metadata parquet, column) -> a one-column Arrow table for the shard."""
    import pyarrow as pa

    name, path, column = task
    texts = _text_column(path)
    if name in ("lang", "lang_cld3"):
        from dcdb.filters.langid import identifier

        labels = identifier("fasttext" if name == "lang" else "cld3")(texts)
        return pa.table({column: pa.array(labels, pa.string())})
    if name == "wordnet":
        from dcdb.filters.wordnet import open_wordnet

        wn = open_wordnet(os.environ.get("DCDB_WORDNET") or None)
        return pa.table({column: pa.array([wn.caption_offsets(t) for t in texts], pa.list_(pa.int32()))})
    raise UsageError(f"no text annotator {name!r}", hint="annotators: lang, lang_cld3, wordnet, centroids")  # pragma: no cover -- names are checked first


def _worker_init(env: dict[str, str]) -> None:
    os.environ.update(env)


def _ordered_results(tasks: list, fn: Callable, jobs: int) -> Iterator[Any]:
    """``fn`` over ``tasks`` in order: in-process, or on ``jobs`` spawned processes with at most
    ``2 * jobs`` shards in flight (bounded memory); workers get this process's ``DCDB_*`` settings."""
    from dcdb import parallel

    env = {k: v for k, v in os.environ.items() if k.startswith("DCDB_")}
    return parallel.map(fn, tasks, jobs, window=2 * jobs, initializer=_worker_init, initargs=(env,))


def _text_info(name: str, params: dict[str, str]) -> dict[str, Any]:
    """How the values are made (stored in the group's ``_group.json``); also fails early when a
    model or database is missing, before any worker starts."""
    if name == "wordnet":
        from dcdb.filters.wordnet import open_wordnet

        return {"annotator": name, "wordnet": open_wordnet(params.get("wordnet")).info(),
                "tokens": "text.split()", "value": "wordnet.synsets(token)[0].offset(), distinct"}
    from dcdb.filters.langid import identifier

    lid = identifier("fasttext" if name == "lang" else "cld3")
    return {"annotator": name, **lid.info(), "preprocessing": "text.replace('\\n', ' ')", "label": "top-1"}


def annotate_text(pool: Pool, name: str, params: dict[str, str], *, force: bool, jobs: int | None,
                  progress: bool) -> Report:
    ann = ANNOTATORS[name]
    _conflicts(pool, name, [ann.column], force)
    t0 = time.perf_counter()
    if name == "wordnet" and params.get("wordnet"):
        os.environ["DCDB_WORDNET"] = str(Path(params["wordnet"]).expanduser().resolve())
    info = _text_info(name, params)
    tasks = [(name, str(pool.path / s["metadata"]), ann.column) for s in pool.shards]
    results = _ordered_results(tasks, text_task, _jobs(pool, jobs))
    with _progress(pool.rows, f"annotate {name}", progress) as bar:

        def compute(shard):
            tbl = next(results)
            bar.update(tbl.num_rows)
            return tbl

        write_group(pool, name, compute, info=info, replace=force)
    notes = _value_counts(pool, ann.column) if name.startswith("lang") else []
    return Report(name, [ann.column], pool.rows, time.perf_counter() - t0, notes)


def _value_counts(pool: Pool, column: str, top: int = 5) -> list[str]:
    import duckdb

    from dcdb.derived import group_files
    from dcdb.sqltext import sql_string

    group = next(g for g, i in groups(pool).items() if any(c["name"] == column for c in i["columns"]))
    files = "[" + ", ".join(sql_string(str(f)) for f in group_files(pool, group)) + "]"
    con = duckdb.connect()
    rows = con.execute(f"SELECT {column}, count(*) FROM read_parquet({files}) GROUP BY 1 ORDER BY 2 DESC, 1 "
                       f"LIMIT {top}").fetchall()
    return ["top labels " + ", ".join(f"{v}: {n:,}" for v, n in rows)]


# ------------------------------------------------------------------------- centroid annotator


class _RowFeeder:
    """Cut a stream of record batches / arrays into consecutive pieces of given lengths."""

    def __init__(self, batches: Iterator[Any]):
        self._batches = batches
        self._buffer: list[Any] = []
        self._buffered = 0
        self._last = None  # the last batch read, as a table (its schema makes an empty piece)

    def take(self, n: int):
        import pyarrow as pa

        while self._buffered < n or not self._buffer:  # an empty piece (an empty bucket) needs a schema too
            b = next(self._batches, None)
            if b is None:
                if self._buffered < n or self._last is None:
                    raise UsageError(f"the pool's data ended {n - self._buffered} rows early",
                                     hint="re-ingest the pool")
                self._buffer.append(self._last.slice(0, 0))
                break
            self._buffer.append(b)
            self._buffered += len(b)
            self._last = _as_table(b)
        joined = pa.concat_tables([_as_table(b) for b in self._buffer]) if len(self._buffer) > 1 else _as_table(
            self._buffer[0])
        head, rest = joined.slice(0, n), joined.slice(n)
        self._buffer = [rest] if rest.num_rows else []
        self._buffered = rest.num_rows
        return head


def _as_table(b):
    import pyarrow as pa

    return b if isinstance(b, pa.Table) else pa.Table.from_batches([b])


def _vector_block(tbl, column: str):
    """A (n, d) numpy view (float16/float32 as stored) of a fixed-size-list column."""
    import numpy as np

    arr = tbl.column(column).combine_chunks()
    d = arr.type.list_size
    values = arr.values.to_numpy(zero_copy_only=False)
    start = arr.offset * d
    return np.asarray(values[start : start + len(arr) * d]).reshape(len(arr), d)


def annotate_centroids(pool: Pool, params: dict[str, str], *, force: bool, progress: bool) -> Report:
    import pyarrow as pa

    from dcdb.filters.assets import existing_file, fingerprint, load_centroids
    from dcdb.filters.centroids import ASSIGNMENT, Centroids, assign
    from dcdb.store import lance_batches, open_lance

    _conflicts(pool, "centroids", [ANNOTATORS["centroids"].column], force)
    if "l14_img" not in pool.spaces:
        raise UsageError("the pool has no l14_img embeddings", hint="ingest the .npz files beside the parquet")
    t0 = time.perf_counter()
    dim = int(pool.spaces["l14_img"]["dim"])
    cpath = existing_file(params.get("centroids"), "centroids")
    cents = Centroids.of(load_centroids(cpath, dim=dim))
    info: dict[str, Any] = {"annotator": "centroids", "centroids": fingerprint(cpath),
                            "shape": list(cents.matrix.shape), "assignment": ASSIGNMENT}
    if params.get("imagenet_embeddings"):
        info["targets"] = _targets_info(cpath, params["imagenet_embeddings"], dim)
    table = pool.lance_path("l14_img")
    ds = open_lance(table)
    feeder = _RowFeeder(lance_batches(ds.to_batches(columns=["l14_img"], batch_size=8192), table))
    with _progress(pool.rows, "annotate centroids", progress) as bar:

        def compute(shard):
            tbl = feeder.take(shard["rows"])
            ids = assign(_vector_block(tbl, "l14_img"), cents) if tbl.num_rows else []
            bar.update(tbl.num_rows)
            return pa.table({"centroid_id": pa.array(ids, pa.int32())})

        write_group(pool, "centroids", compute, info=info, replace=force)
    notes = [f"{cents.matrix.shape[0]:,} centroids"]
    if "targets" in info:
        notes.append(f"{len(info['targets']['ids']):,} target centroids stored")
    return Report("centroids", ["centroid_id"], pool.rows, time.perf_counter() - t0, notes)


def _targets_info(cpath: Path, pattern: str, dim: int) -> dict[str, Any]:
    from dcdb.filters.assets import fingerprint
    from dcdb.filters.baselines import compute_targets

    ids, files, _ = compute_targets(cpath, pattern, dim)
    return {"imagenet_embeddings": [fingerprint(f) for f in files], "ids": [int(i) for i in ids]}


# ------------------------------------------------------------------------------------- entry


def annotate(pool: Pool, name: str, params: dict[str, str] | None = None, *, force: bool = False,
             jobs: int | None = None, progress: bool = False) -> Report:
    """Compute annotator ``name`` for every row of ``pool`` and store it as a derived group."""
    if name not in ANNOTATORS:
        import difflib

        close = difflib.get_close_matches(name, list(ANNOTATORS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"annotators: {', '.join(ANNOTATORS)}"
        raise UsageError(f"unknown annotator {name!r}", hint=hint)
    params = dict(params or {})
    _check_params(ANNOTATORS[name], params)
    if name == "centroids":
        return annotate_centroids(pool, params, force=force, progress=progress)
    return annotate_text(pool, name, params, force=force, jobs=jobs, progress=progress)


# ------------------------------------------------------------------------------------- import


def _default_group(source: Path) -> str:
    """The group an import goes to without --name: the file's stem, made a valid group name."""
    name = re.sub(r"[^a-z0-9_]", "_", source.stem.lower())
    return name if GROUP_RE.match(name) else f"import_{name}"[:63]


def _import_columns(con, source: Path, columns: list[str] | None) -> list[str]:
    from dcdb.sqltext import sql_string

    schema = con.execute(f"DESCRIBE SELECT * FROM read_parquet({sql_string(str(source))})").fetchall()
    types = {n: t for n, t, *_ in schema}
    if "uid" not in types:
        raise SourceError(f"{str(source)!r} has no uid column (it has {', '.join(types)})",
                          hint="the file needs a uid column (32 hex characters) and the columns to add")
    if types["uid"] != "VARCHAR":
        raise SourceError(f"the uid column of {str(source)!r} is {types['uid']}, not text",
                          hint="store uids as 32-character lowercase hex strings")
    wanted = list(columns) if columns else [c for c in types if c != "uid"]
    missing = [c for c in wanted if c not in types]
    if missing or "uid" in wanted or not wanted:
        raise UsageError(f"cannot import columns {wanted} from {str(source)!r}",
                         hint=f"choose among {', '.join(c for c in types if c != 'uid') or 'none'}")
    return wanted


def _shadows(pool: Pool, source: Path, columns: list[str]) -> None:
    """An imported column may not take the name of a metadata or an embedding column of the pool
    (DuckDB names are case-insensitive): ``pool`` would show the import instead of the data, or
    fail to bind in every later command."""
    meta = {c["name"].lower(): c["name"] for c in pool.columns}
    spaces = {s.lower(): s for s in pool.spaces}
    for col in columns:
        key = col.lower()
        if key in meta or key in spaces:
            what = "metadata" if key in meta else "embedding"
            raise UsageError(
                f"column {col!r} of {str(source)!r} has the name of the pool's {what} column "
                f"{(meta.get(key) or spaces[key])!r}",
                hint=f"rename it in the file, or leave it out with --columns (importable: "
                     f"{', '.join(c for c in columns if c.lower() not in meta and c.lower() not in spaces) or 'none'})",
            )


def _conflicts(pool: Pool, group: str, columns: list[str], force: bool) -> None:
    wanted = {c.lower() for c in columns}
    for g, meta in groups(pool).items():
        clash = sorted(c["name"] for c in meta["columns"] if c["name"].lower() in wanted)
        if g != group and clash:
            raise UsageError(
                f"column {clash[0]!r} already comes from derived group {g!r}",
                hint=f"import into that group with --group {g} --force, or drop it: dcdb annotate --pool "
                     f"{pool.path} --drop {g}",
            )
    _check_free(pool, group, force)


def _validate_uids(con, source: Path) -> None:
    bad = con.execute("SELECT count(*), any_value(uid) FROM src WHERE NOT regexp_full_match(coalesce(uid, ''), "
                      "'[0-9a-f]{32}')").fetchall()[0]
    if bad[0]:
        raise UidError(f"{bad[0]:,} uids in {str(source)!r} are not 32 lowercase hex characters, e.g. {bad[1]!r}",
                       hint="write uids as DataComp does: 32 lowercase hex characters")
    dup = con.execute("SELECT count(*), sum(n), any_value(uid) FROM (SELECT uid, count(*) AS n FROM src "
                      "GROUP BY uid HAVING n > 1)").fetchall()[0]
    if dup[0]:
        raise SourceError(f"{dup[0]:,} uids appear more than once in {str(source)!r} ({int(dup[1]):,} rows), "
                          f"e.g. {dup[2]!r}", hint="keep one row per uid: dcdb cannot tell which value is meant")


def import_columns(pool: Pool, source: str | os.PathLike, *, group: str | None = None,
                   columns: list[str] | None = None, force: bool = False, allow_unknown: bool = False,
                   progress: bool = False) -> Report:
    """Import columns of a Parquet file keyed by ``uid`` as derived group ``group``."""
    import duckdb

    from dcdb.sqltext import quote_identifier as qi
    from dcdb.sqltext import sql_string

    t0 = time.perf_counter()
    src = Path(source).expanduser()
    if not src.is_file():
        raise SourceError(f"import file {str(src)!r} does not exist", hint="give a Parquet file with a uid column")
    from dcdb.io import sweep_pid_dirs

    con = duckdb.connect()
    sweep_pid_dirs(pool.path, ".import-*")  # DuckDB spill folders of killed imports
    tmp = Path(tempfile.mkdtemp(prefix=".import-", suffix=f"-{os.getpid()}", dir=pool.path))
    try:
        con.execute(f"SET temp_directory = {sql_string(str(tmp))}")
        try:
            cols = _import_columns(con, src, columns)
        except duckdb.Error as exc:
            raise SourceError(f"cannot read {str(src)!r} as Parquet: {exc}", hint="is it a Parquet file?") from None
        named = group is not None
        group = group or _default_group(src)
        if not GROUP_RE.match(group):
            raise UsageError(f"invalid group name {group!r}", hint="lowercase letters, digits and underscores")
        _shadows(pool, src, cols)
        _conflicts(pool, group, cols, force)
        sel = ", ".join(qi(c) for c in cols)
        con.execute(f"CREATE TEMP VIEW src AS SELECT uid, {sel} FROM read_parquet({sql_string(str(src))})")
        _validate_uids(con, src)
        notes = _join_counts(con, pool, src, allow_unknown)
        ordered = _ordered_join(con, pool, cols)
        feeder = _RowFeeder(iter(ordered))
        with _progress(pool.rows, f"import {group}", progress) as bar:

            def compute(shard):
                tbl = feeder.take(shard["rows"]).select(cols)
                bar.update(tbl.num_rows)
                return tbl

            write_group(pool, group, compute, replace=force,
                        info={"annotator": "import", "source": str(src.resolve()), "imported": cols})
    finally:
        con.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if not named:
        notes.append(f"named after {src.name} (choose with --name)")
    return Report(group, cols, pool.rows, time.perf_counter() - t0, notes)


def _pool_uids_sql(pool: Pool) -> str:
    from dcdb.sqltext import sql_string

    files = [str(f.resolve()) for f in pool.metadata_files()]
    listing = "[" + ", ".join(sql_string(f) for f in files) + "]"
    index = ", ".join(f"({sql_string(f)}, {i})" for i, f in enumerate(files))
    return (f"SELECT m.uid, f.i AS shard_i, m.file_row_number AS row_i FROM read_parquet({listing}, "
            f"filename = true, file_row_number = true) AS m JOIN (VALUES {index}) AS f(name, i) "
            "ON m.filename = f.name")


def _join_counts(con, pool: Pool, source: Path, allow_unknown: bool) -> list[str]:
    con.execute(f"CREATE TEMP VIEW pool_uids AS {_pool_uids_sql(pool)}")
    unknown, example = con.execute("SELECT count(*), any_value(uid) FROM src WHERE uid NOT IN "
                                   "(SELECT uid FROM pool_uids)").fetchall()[0]
    missing = con.execute("SELECT count(*) FROM pool_uids WHERE uid NOT IN (SELECT uid FROM src)").fetchall()[0][0]
    if unknown and not allow_unknown:
        raise SourceError(f"{unknown:,} uids of {str(source)!r} are not in the pool, e.g. {example!r}",
                          hint="is it the right pool? pass --allow-unknown to skip them")
    notes = []
    if unknown:
        notes.append(f"{unknown:,} uids not in the pool skipped")
    if missing:
        notes.append(f"{missing:,} pool rows not in the file (NULL)")
    return notes


def _ordered_join(con, pool: Pool, cols: list[str]) -> Iterator[Any]:
    from dcdb.sqltext import quote_identifier as qi

    sel = ", ".join(f"s.{qi(c)}" for c in cols)
    reader = con.sql(f"SELECT {sel} FROM pool_uids p LEFT JOIN src s USING (uid) "
                     "ORDER BY p.shard_i, p.row_i").to_arrow_reader(IMPORT_BATCH)
    return iter(reader)


# --------------------------------------------------------------------------- list and drop


def list_groups(pool: Pool) -> list[dict[str, Any]]:
    """The pool's derived groups: name, columns, how they were made, when."""
    out = []
    for name, meta in groups(pool).items():
        out.append({"group": name, "columns": [c["name"] for c in meta.get("columns", [])],
                    "annotator": meta.get("annotator", "?"), "created": meta.get("created"),
                    "current": meta.get("pool_manifest_sha256") == pool.manifest_hash})
    return out
