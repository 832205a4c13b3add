"""``dcdb ingest SRC POOL``: a DataComp metadata folder -> the pool store (see dcdb/store.py).

SRC holds shards: every ``*.parquet`` (taken in name order) with a same-stem ``.npz`` of
row-aligned embeddings, or no ``.npz`` at all (a metadata-only pool). Ingest runs in three phases:

1. **Plan** (parent, reads only footers and npz headers): list the shards, check that every
   parquet is readable and has a ``uid`` column, unify the parquet schemas, check every npz's
   keys, row counts, dims and dtypes. Almost every bad input is refused here, before POOL is
   touched.
2. **Shards** (``jobs`` worker processes, one shard each at a time): read the shard, validate
   its uids, write ``metadata/<stem>.parquet`` (temp name + rename) and, per embedding space, an
   *uncommitted* Lance fragment in ``embeddings/<space>.lance``. The parent journals each finished
   shard in ``POOL/.ingest/shards/<stem>.json`` (and its uids in ``.ingest/uids/<stem>.npy``).
3. **Commit** (parent): one Lance commit per space with the fragments in shard order, count
   duplicate uids, write ``dcdb.json`` **last**, remove ``.ingest/``.

A killed ingest leaves no ``dcdb.json``, so ``open_pool`` calls the pool incomplete; re-running
the same command skips every journaled shard whose source files are unchanged and whose outputs
are intact, and redoes the rest. Re-running on a complete pool is a no-op when SRC is unchanged
(same file names, sizes and mtimes) and refused otherwise.

The parent never holds embedding vectors; each worker holds one shard. torch is never imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dcdb import errors, parallel, uids
from dcdb.errors import DcdbError, OutputError, PoolError, SourceError, UsageError, WorkerError
from dcdb.ingest.buckets import (
    METADATA_ROW_BYTES,
    bucket_bits,
    bucket_name,
    bucket_of,
    check_same_buckets,
    default_buckets,
)
from dcdb.io import (
    LOCK_NAME,
    TMP_MARK,
    atomic_path,
    dir_size,
    kill_point,
    prepare_folder,
    write_error,
    write_json,
    write_lock,
    writing,
)
from dcdb.store import (
    DATACOMP_SPACES,
    EMBEDDINGS_DIR,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    METADATA_DIR,
    SOURCE_ROW,
    SOURCE_SHARD,
    STAGING_DIR,
    STORED_COLUMNS,
    UID_HI,
    UID_LO,
    nan_to_null,
)

# Metadata parquet written into the pool. Measured on synthetic 100k-row shards (best of 5):
# snappy 18.1 MB / 0.112 s to write, zstd-1 11.5 MB / 0.119 s, zstd-1 without dictionaries on the
# unique-per-row string columns 10.8 MB / 0.107 s (zstd-3: same size, 2x slower to write). Warm-cache
# DuckDB scans of 1M rows were 0.06-0.09 s with either codec (within noise on this shared machine).
# Large pools do not fit in the page cache, so the 40% less disk wins.
METADATA_COMPRESSION = "zstd"
METADATA_COMPRESSION_LEVEL = 1
NO_DICTIONARY_COLUMNS = frozenset({"uid", "url", "text", "sha256", UID_HI, UID_LO, SOURCE_ROW})  # ~unique per row
METADATA_ROW_GROUP = 100_000
LANCE_STORAGE_VERSION = "legacy"  # scans 200k x 768 f16 ~8x faster than the 2.x file formats
EMBEDDING_DTYPES = ("float16", "float32")
JOURNAL_FORMAT = "dcdb-ingest-journal"
_SPACE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STATE = "state.json"
_SHARDS = "shards"
_UIDS = "uids"


# ----------------------------------------------------------------------------------- report


@dataclass
class IngestReport:
    """What one ``ingest`` call did. ``rows``/``shards`` describe the whole pool (its shards are
    its uid buckets); ``source_shards`` counts SRC's shards."""

    pool: str
    rows: int
    shards: int
    spaces: list[str]
    seconds: float
    bytes_read: int
    duplicate_uids: int
    skipped_shards: int
    rows_ingested: int = 0
    already_complete: bool = False
    source_shards: int | None = None

    @property
    def rows_per_second(self) -> float:
        return self.rows_ingested / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line for stderr."""
        spaces = f"{len(self.spaces)} embedding spaces" if self.spaces else "metadata only"
        if self.already_complete:
            return (
                f"pool {self.pool} is already complete ({self.rows:,} rows, {self.shards} shards, "
                f"{spaces}, {self.duplicate_uids:,} duplicate uids); nothing to do"
            )
        skipped = f", {self.skipped_shards} buckets already done" if self.skipped_shards else ""
        sources = self.shards if self.source_shards is None else self.source_shards
        return (
            f"ingested {self.rows:,} rows from {sources} shards ({spaces}) into {self.pool} "
            f"({self.shards} uid bucket{'s' if self.shards != 1 else ''}) in "
            f"{self.seconds:.1f}s: {self.rows_per_second:,.0f} rows/s, {self.mb_per_second:,.1f} MB/s "
            f"read, {self.duplicate_uids:,} duplicate uids{skipped}"
        )


# ------------------------------------------------------------------------------------- plan


@dataclass
class ShardSource:
    """One source shard as planned: its files, row count and file signature."""

    index: int
    name: str
    parquet: Path
    npz: Path | None
    rows: int
    signature: dict[str, list[int]]

    @property
    def source_bytes(self) -> int:
        return sum(size for size, _mtime in self.signature.values())


@dataclass
class Plan:
    """Everything ingest decided from SRC's footers and headers, before touching POOL."""

    src: Path
    shards: list[ShardSource]
    schema: pa.Schema
    spaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Bucketed ingest (dcdb/ingest/buckets.py): shards are the uid buckets staged from SRC; the
    # fingerprint and manifest stay those of SRC, and the manifest records the bucketing.
    source_fingerprint: str | None = None
    buckets: dict[str, Any] | None = None
    sources: list[dict[str, Any]] | None = None  # the source shards (name, rows) that source_shard indexes

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def fingerprint(self) -> str:
        """sha256 of every source file's name, size and mtime: changes when SRC changes."""
        if self.source_fingerprint is not None:
            return self.source_fingerprint
        items = [[s.name, s.signature] for s in self.shards]
        return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()

    def space_schema(self, space: str) -> pa.Schema:
        info = self.spaces[space]
        return pa.schema(
            [
                ("uid", pa.string()),
                (space, pa.list_(pa.from_numpy_dtype(np.dtype(info["dtype"])), info["dim"])),
            ]
        )


def _read_parquet_footer(path: Path) -> tuple[int, pa.Schema]:
    try:
        pf = pq.ParquetFile(path)
        return pf.metadata.num_rows, pf.schema_arrow
    except Exception as exc:  # pyarrow raises several kinds for a bad file
        raise SourceError(
            f"cannot read parquet {str(path)!r}: {exc}",
            hint="the file is corrupt or not parquet: re-download it or move it out of SRC",
        ) from exc


def npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an ``.npz``, read from the member headers only."""
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as f:
                    major, _minor = np.lib.format.read_magic(f)
                    read = (
                        np.lib.format.read_array_header_1_0
                        if major == 1
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _fortran, dtype = read(f)
                out[name[: -len(".npy")]] = (tuple(shape), np.dtype(dtype))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise SourceError(
            f"cannot read npz {str(path)!r}: {exc}",
            hint="the file is corrupt or not an .npz: re-download it or move the shard out of SRC",
        ) from exc
    if not out:
        raise SourceError(
            f"npz {str(path)!r} holds no arrays", hint="expected b32_img, b32_txt, l14_img, l14_txt"
        )
    return out


def _check_npz(shard: ShardSource, headers: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    """Row counts, dims and dtypes of one shard's npz against its parquet."""
    for key, (shape, dtype) in headers.items():
        where = f"{str(shard.npz)!r} key {key!r}"
        if not _SPACE_NAME.match(key):
            raise SourceError(
                f"{where}: not a usable embedding name", hint="rename the npz key to letters, digits and _"
            )
        if len(shape) != 2:
            raise SourceError(f"{where} has shape {shape}; embeddings must be 2-d (rows, dim)",
                          hint="one row per sample of the same-stem parquet")
        if shape[0] != shard.rows:
            raise SourceError(
                f"{where} has {shape[0]:,} rows but {shard.parquet.name} has {shard.rows:,}",
                hint="row i of the npz must be row i of the parquet: re-export the shard",
            )
        want = DATACOMP_SPACES.get(key, {}).get("dim")
        if want is not None and shape[1] != want:
            raise SourceError(f"{where} has dim {shape[1]}, DataComp's {key} has dim {want}",
                          hint="name a space of another model differently (not b32_*/l14_*)")
        if dtype.name not in EMBEDDING_DTYPES:
            raise SourceError(
                f"{where} has dtype {dtype}, expected float16 or float32",
                hint="convert it with arr.astype(np.float16) (DataComp's dtype)",
            )


def _unify(shards: list[ShardSource], schemas: list[pa.Schema]) -> pa.Schema:
    """One schema for all shards (promoting types where lossless), or SourceError naming a shard."""
    _check_column_types(shards, schemas)
    unified = schemas[0]
    for shard, schema in zip(shards[1:], schemas[1:]):
        try:
            unified = pa.unify_schemas([unified, schema], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise SourceError(
                f"{str(shard.parquet)!r}: its columns do not match the shards before it ({exc})",
                hint="every shard must have compatible column types",
            ) from exc
    unified = unified.remove_metadata()
    uid_type = unified.field("uid").type
    if not (pa.types.is_string(uid_type) or pa.types.is_large_string(uid_type)):
        raise SourceError(f"the uid column has type {uid_type}, expected strings of 32 hex characters",
                          hint="DataComp's metadata keeps uids as 32-character hex strings")
    return unified


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_boxes(t: pa.DataType) -> bool:
    def is_list(x):
        return pa.types.is_list(x) or pa.types.is_large_list(x) or pa.types.is_fixed_size_list(x)

    return is_list(t) and (pa.types.is_null(t.value_type) or (
        is_list(t.value_type) and (_is_number(t.value_type.value_type) or pa.types.is_null(t.value_type.value_type))))


# DataComp columns the filters, dedup and the resharder compute with: a wrong type would be
# ingested and then break (or silently mis-sort) every query that reads the column.
COLUMN_KINDS: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    "original_width": (_is_number, "numbers (DataComp: int64)"),
    "original_height": (_is_number, "numbers (DataComp: int64)"),
    "clip_b32_similarity_score": (_is_number, "numbers (DataComp: float32)"),
    "clip_l14_similarity_score": (_is_number, "numbers (DataComp: float32)"),
    "text": (_is_text, "strings"),
    "url": (_is_text, "strings"),
    "sha256": (_is_text, "strings"),
    "face_bboxes": (_is_boxes, "lists of [x1, y1, x2, y2] number lists"),
}


def _check_column_types(shards: list[ShardSource], schemas: list[pa.Schema]) -> None:
    """SourceError naming the file and column when a DataComp column has a type its users cannot
    compute with (a score stored as strings, a width as text ...). An all-NULL column passes."""
    for shard, schema in zip(shards, schemas, strict=True):
        for name, (ok, want) in COLUMN_KINDS.items():
            if name not in schema.names:
                continue
            t = schema.field(name).type
            if pa.types.is_dictionary(t):
                t = t.value_type
            if not (pa.types.is_null(t) or ok(t)):
                raise SourceError(
                    f"{str(shard.parquet)!r}: column {name!r} has type {t}, expected {want}",
                    hint=f"write {name} with its DataComp type (e.g. cast it with pyarrow or pandas), "
                         f"or move the shard out of SRC",
                )


def plan_source(src: str | os.PathLike) -> Plan:
    """Inspect SRC (footers and headers only) and return the ingest plan, or raise SourceError."""
    src = Path(src).expanduser().resolve()
    if not src.is_dir():
        raise SourceError(f"source {str(src)!r} is not a folder", hint="give a DataComp metadata folder")
    parquets = sorted(p for p in src.glob("*.parquet") if p.is_file())
    if not parquets:
        raise SourceError(
            f"no *.parquet files in {str(src)!r}",
            hint="give a DataComp metadata folder (per shard a .parquet and a same-stem .npz)",
        )
    with_npz = [p for p in parquets if p.with_suffix(".npz").is_file()]
    if with_npz and len(with_npz) != len(parquets):
        lacking = next(p for p in parquets if not p.with_suffix(".npz").is_file())
        raise SourceError(
            f"{str(lacking)!r} has no {lacking.stem}.npz beside it, but other shards have embeddings",
            hint="restore the missing .npz, or move that shard out of SRC",
        )
    shards, schemas, spaces = [], [], {}
    key_set: tuple[str, ...] | None = None
    for index, path in enumerate(parquets):
        rows, schema = _read_parquet_footer(path)
        if "uid" not in schema.names:
            raise SourceError(
                f"{str(path)!r} has no uid column", hint="a DataComp metadata parquet has a uid column"
            )
        npz = path.with_suffix(".npz") if with_npz else None
        signature = {"parquet": parallel.file_signature(path)}
        if npz:
            signature["npz"] = parallel.file_signature(npz)
        shard = ShardSource(index, path.stem, path, npz, rows, signature)
        if npz is not None:
            headers = npz_headers(npz)
            _check_npz(shard, headers)
            keys = tuple(sorted(headers))
            if key_set is None:
                key_set = keys
            elif keys != key_set:
                raise SourceError(
                    f"{str(npz)!r} has keys {', '.join(keys)}, "
                    f"the shards before it have {', '.join(key_set)}",
                    hint="every shard's npz must hold the same embeddings",
                )
            _merge_spaces(spaces, headers, npz)
        shards.append(shard)
        schemas.append(schema)
    schema = _unify(shards, schemas)
    clash = sorted(set(spaces) & set(schema.names))
    if clash:
        raise SourceError(
            f"npz keys {clash} clash with metadata columns of the same name", hint="rename the npz keys"
        )
    return Plan(src=src, shards=shards, schema=schema, spaces=spaces)


def check_stored_columns(plan: Plan) -> None:
    """SourceError when a source column has the name of a column the store adds (STORED_COLUMNS)."""
    clash = [c for c in plan.schema.names if c in STORED_COLUMNS]
    if clash:
        raise SourceError(
            f"the source has a column {clash[0]!r}, a name the pool store uses for its own column "
            f"({', '.join(STORED_COLUMNS)}: the uid's halves and where each row came from)",
            hint=f"rename or drop {clash[0]!r} in the source parquet files",
        )


def _merge_spaces(spaces: dict[str, dict[str, Any]], headers, npz: Path) -> None:
    """Record each npz key as a space; a dtype mix promotes to float32, a dim mix is an error."""
    for key in sorted(headers, key=lambda k: (k not in DATACOMP_SPACES, k)):
        (_rows, dim), dtype = headers[key]
        known = DATACOMP_SPACES.get(key, {})
        if key not in spaces:
            spaces[key] = {"model": known.get("model", "unknown"), "dim": int(dim), "dtype": dtype.name}
            continue
        if spaces[key]["dim"] != dim:
            raise SourceError(
                f"{str(npz)!r} key {key!r} has dim {dim}, earlier shards have {spaces[key]['dim']}",
                hint="every shard's embeddings of one key must come from the same model",
            )
        if spaces[key]["dtype"] != dtype.name:
            spaces[key]["dtype"] = "float32"


# ------------------------------------------------------------------------------- pool state


def _staging(pool: Path) -> Path:
    return pool / STAGING_DIR


def _state_of(plan: Plan) -> dict[str, Any]:
    return {
        "format": JOURNAL_FORMAT,
        "source": str(plan.src),
        "source_fingerprint": plan.fingerprint,
        "schema": [[f.name, str(f.type)] for f in plan.schema],
        "spaces": plan.spaces,
    }


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_complete(pool: Path, plan: Plan) -> dict[str, Any] | None:
    """The manifest if POOL is a complete pool of this very SRC; PoolError if of another SRC."""
    manifest = _read_json(pool / MANIFEST)
    if manifest is None or manifest.get("format") != FORMAT:
        raise OutputError(
            f"{str(pool)!r} holds a {MANIFEST} that is not a dcdb pool manifest",
            hint="give a new or empty folder as POOL",
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PoolError(
            f"{str(pool)!r} is already a complete pool, of store format v{manifest.get('format_version')}",
            hint=f"run `dcdb upgrade {pool}` to rewrite it as format v{FORMAT_VERSION}, or give a new POOL path",
        )
    if manifest.get("source_fingerprint") != plan.fingerprint:
        raise PoolError(
            f"{str(pool)!r} is already a complete pool, ingested from {manifest.get('source')!r}; "
            f"{str(plan.src)!r} differs from that source (other files, sizes or times)",
            hint="give a new POOL path (or delete the old pool first)",
        )
    return manifest


def _prepare_pool(pool: Path, plan: Plan) -> dict[str, Any] | None:
    """Create or validate POOL (a folder: ingest checked). Returns the manifest if the pool is already complete."""
    if (pool / MANIFEST).exists():
        return _check_complete(pool, plan)
    staging = _staging(pool)
    if pool.is_dir() and any(p.name != LOCK_NAME for p in pool.iterdir()) and not staging.is_dir():
        raise OutputError(
            f"{str(pool)!r} is not empty and is not a dcdb pool",
            hint="give a new or empty folder as POOL; dcdb never deletes files it did not write",
        )
    if staging.is_dir() and not _same_layout(_read_json(staging / _STATE), plan):
        _reset_staging(pool)  # an unfinished ingest with other columns or spaces: start over
    try:
        for d in (staging / _SHARDS, staging / _UIDS, pool / METADATA_DIR, pool / EMBEDDINGS_DIR):
            d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create pool folder {str(pool)!r}: {exc}", hint="choose a writable POOL path"
        ) from exc
    write_json(staging / _STATE, _state_of(plan))
    _remove_temp_files(pool)
    return None


def _same_layout(state: dict[str, Any] | None, plan: Plan) -> bool:
    """Whether an unfinished ingest wrote the same columns and spaces as this plan will."""
    want = _state_of(plan)
    return (
        state is not None
        and state.get("format") == JOURNAL_FORMAT
        and state.get("schema") == want["schema"]
        and state.get("spaces") == want["spaces"]
    )


def _reset_staging(pool: Path) -> None:
    """Drop an unfinished ingest's outputs (all written by dcdb: .ingest/ proves it)."""
    for d in (pool / EMBEDDINGS_DIR, pool / METADATA_DIR, _staging(pool)):
        shutil.rmtree(d, ignore_errors=True)


def _remove_temp_files(pool: Path) -> None:
    """Temp files of a killed run (atomic_path names) in our folders."""
    for d in (pool / METADATA_DIR, _staging(pool) / _SHARDS, _staging(pool) / _UIDS, _staging(pool)):
        for p in d.glob(f"*{TMP_MARK}*"):
            if p.is_file():
                p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- journal


# One completion marker (dcdb.parallel.Ledger) per finished shard, ``.ingest/shards/<stem>.json``:
# its source files' signatures as planned, its place, rows and spaces; its outputs (metadata
# parquet, uids, Lance data files) with their sizes; and the shard's entry (fragment metadata for
# the commit). A shard is skipped when its marker holds for this plan and its outputs are intact.


def _journal(pool: Path) -> parallel.Ledger:
    return parallel.Ledger(_staging(pool) / _SHARDS, root=pool)


def _shard_params(name: str, index: int, rows: int, signature: dict[str, Any], spaces) -> dict[str, Any]:
    """What a journaled shard must have been made from to be kept."""
    return {"name": name, "index": index, "rows": rows, "signature": signature, "spaces": sorted(spaces)}


def _entry_outputs(entry: dict[str, Any]) -> list[str]:
    files = [entry["metadata"]["path"], entry["uids"]["path"]]
    for space in entry["spaces"].values():
        files.extend(space["files"])
    return files


def _journaled(pool: Path, plan: Plan, shard: ShardSource) -> dict[str, Any] | None:
    """The entry of ``shard`` if a resumed ingest can skip it: same source files, outputs intact."""
    params = _shard_params(shard.name, shard.index, shard.rows, shard.signature, plan.spaces)
    marker = _journal(pool).done(shard.name, params=params)
    return None if marker is None else marker.info


def _done_entries(pool: Path, plan: Plan) -> dict[str, dict[str, Any]]:
    """Journal entries of shards that a resumed ingest can skip."""
    done = {}
    for shard in plan.shards:
        entry = _journaled(pool, plan, shard)
        if entry is not None:
            done[shard.name] = entry
    return done


# ----------------------------------------------------------------------------- shard worker


@dataclass
class ShardTask:
    """What a worker needs for one shard (picklable)."""

    pool: str
    index: int
    name: str
    parquet: str
    npz: str | None
    rows: int
    signature: dict[str, list[int]]
    schema: pa.Schema
    spaces: dict[str, dict[str, Any]]


def _read_shard_table(task: ShardTask) -> pa.Table:
    """The shard's parquet, conformed to the unified schema (missing columns as nulls)."""
    try:
        table = pq.read_table(task.parquet, use_threads=False)  # one shard per core already
    except Exception as exc:  # any read failure means a bad file
        raise SourceError(
            f"cannot read parquet {task.parquet!r}: {exc}",
            hint="the file is corrupt: re-download it or move the shard out of SRC",
        ) from exc
    if table.num_rows != task.rows:
        raise SourceError(f"{task.parquet!r} has {table.num_rows:,} rows, its footer said {task.rows:,}",
                          hint="the file changed or is damaged: restore it, then re-run the ingest (it resumes)")
    columns = []
    for f in task.schema:
        col = table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        try:
            columns.append(col.cast(f.type) if col.type != f.type else col)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
            raise SourceError(
                f"{task.parquet!r}: column {f.name!r} cannot be cast to {f.type}: {exc}",
                hint="every shard must give a column the same type: fix that file",
            ) from exc
    return pa.Table.from_arrays([nan_to_null(c) for c in columns], schema=task.schema)


def _statistics_columns(schema: pa.Schema) -> list[str]:
    """Columns that get min/max statistics: all but floating point ones.

    Parquet min/max statistics leave NaN out, and DuckDB 2.0.1 prunes row groups with them: on a
    file with statistics, ``WHERE isnan(score)`` finds no row and ``WHERE score > 0.5`` misses the
    NaN rows (which DuckDB otherwise orders above every number). Without statistics the answers
    are right; random CLIP scores never let a row group be skipped anyway.
    """
    return [f.name for f in schema if not pa.types.is_floating(f.type)]


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary-encoding: not the per-row-unique strings, not float scores."""
    return [
        f.name for f in schema if f.name not in NO_DICTIONARY_COLUMNS and not pa.types.is_floating(f.type)
    ]


def _write_metadata(task: ShardTask, table: pa.Table) -> dict[str, Any]:
    rel = f"{METADATA_DIR}/{task.name}.parquet"
    write_metadata_file(table, Path(task.pool) / rel)
    return {"path": rel, "bytes": (Path(task.pool) / rel).stat().st_size}


def write_metadata_file(table: pa.Table, path: Path) -> None:
    """A pool metadata file (atomically), as ingest writes them: row groups, codec, encodings."""
    with atomic_path(path) as tmp:
        pq.write_table(
            table,
            tmp,
            row_group_size=METADATA_ROW_GROUP,
            compression=METADATA_COMPRESSION,
            compression_level=METADATA_COMPRESSION_LEVEL,
            use_dictionary=_dictionary_columns(table.schema),
            write_statistics=_statistics_columns(table.schema),
        )


def _write_uids(task: ShardTask, uid_array: np.ndarray) -> dict[str, Any]:
    rel = f"{STAGING_DIR}/{_UIDS}/{task.name}.npy"
    with atomic_path(Path(task.pool) / rel) as tmp, open(tmp, "wb") as f:
        np.save(f, uid_array)
    return {"path": rel, "bytes": (Path(task.pool) / rel).stat().st_size}


def _npz_member(path: str, key: str) -> np.ndarray:
    """Array ``key`` of an ``.npz``, read with one ``readinto`` when stored uncompressed.

    np.savez stores members uncompressed; reading them in one call skips numpy's chunked copy
    through zipfile, the dominant cost of an ingest (0.4 s vs 0.05 s per 100k x 768 float16
    array). Compressed members (np.savez_compressed) go through numpy.
    """
    import struct

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with zf.open(info) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"bad local zip header for {key}.npy")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        major, _minor = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if dtype.hasobject:
            raise ValueError(f"{key}.npy holds Python objects")
        out = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
        want = out.nbytes
        if (
            f.tell() + want > start + info.file_size
            or f.readinto(out.reshape(-1, order="A").view(np.uint8)) != want
        ):
            raise ValueError(f"{key}.npy is truncated")
    return out


def _load_embedding(task: ShardTask, space: str) -> np.ndarray:
    """One npz array, checked against the plan and cast to the space's dtype."""
    info = task.spaces[space]
    try:
        arr = _npz_member(task.npz, space)
    except Exception as exc:  # zipfile/numpy raise several kinds for a bad file
        raise SourceError(
            f"cannot read key {space!r} of npz {task.npz!r}: {exc}",
            hint="the file is corrupt: re-download it or move the shard out of SRC",
        ) from exc
    if arr.shape != (task.rows, info["dim"]):
        raise SourceError(
            f"{task.npz!r} key {space!r} has shape {arr.shape}, expected {(task.rows, info['dim'])}",
            hint="row i of the .npz must be row i of the same-stem parquet: regenerate the .npz",
        )
    return arr.astype(info["dtype"], copy=False)


def _write_fragment(task: ShardTask, uid_col: pa.Array, space: str, arr: np.ndarray) -> dict[str, Any]:
    """An uncommitted Lance fragment of one space for this shard; its JSON and file sizes."""
    from lance.fragment import LanceFragment

    dim = task.spaces[space]["dim"]
    values = pa.array(np.ascontiguousarray(arr).reshape(-1))
    schema = pa.schema([("uid", pa.string()), (space, pa.list_(values.type, dim))])
    table = pa.Table.from_arrays([uid_col, pa.FixedSizeListArray.from_arrays(values, dim)], schema=schema)
    uri = Path(task.pool) / EMBEDDINGS_DIR / f"{space}.lance"
    fragment = LanceFragment.create(
        str(uri), table, fragment_id=task.index, schema=schema, data_storage_version=LANCE_STORAGE_VERSION
    )
    meta = fragment.to_json()
    files = {}
    for f in meta["files"]:
        rel = f"{EMBEDDINGS_DIR}/{space}.lance/data/{f['path']}"
        files[rel] = (Path(task.pool) / rel).stat().st_size
    return {"fragment": meta, "files": files}


def _write_spaces(task: ShardTask, uid_col: pa.Array) -> dict[str, Any]:
    if task.npz is None:
        return {}
    out = {}
    for space in task.spaces:
        arr = _load_embedding(task, space)
        if task.rows == 0:  # Lance refuses empty fragments; an empty shard adds no rows
            out[space] = {"fragment": None, "files": {}}
            continue
        out[space] = _write_fragment(task, uid_col, space, arr)
        del arr
    return out


def process_shard(task: ShardTask) -> dict[str, Any]:
    """Validate and write one shard; return its journal entry. Raises DcdbError on bad input."""
    table = _read_shard_table(task)
    uid_array = uids.from_arrow(table.column("uid"), source=task.parquet)
    uid_col = table.column("uid").combine_chunks().cast(pa.string())
    entry = {
        "name": task.name,
        "index": task.index,
        "rows": task.rows,
        "signature": task.signature,
        "uids": _write_uids(task, uid_array),
    }
    entry["spaces"] = _write_spaces(task, uid_col)
    entry["metadata"] = _write_metadata(task, with_binary_uid(table, uid_array))
    return entry


def with_binary_uid(table: pa.Table, uid_array: np.ndarray) -> pa.Table:
    """``table`` with the uid's two 64-bit halves appended as ``uid_hi``/``uid_lo`` (store format
    2): DataComp's ``f0``/``f1`` of each row's uid, read by filters whose result is the uid."""
    return table.append_column(pa.field(UID_HI, pa.uint64(), nullable=False), pa.array(uid_array["f0"])).append_column(
        pa.field(UID_LO, pa.uint64(), nullable=False), pa.array(uid_array["f1"]))


def _run_task(task: ShardTask) -> dict[str, Any]:
    """Worker entry point: errors travel back as data so the parent re-raises the same type."""
    kill_point(f"ingest-shard:{task.name}")
    try:
        return {"ok": True, "entry": process_shard(task)}
    except Exception as exc:
        err = exc if isinstance(exc, DcdbError) else write_error(exc, task.pool, "pool")
        if err is None:
            raise
        return {"ok": False, "error": type(err).__name__, "message": err.message, "hint": err.hint}


def _raise_worker_error(result: dict[str, Any]) -> None:
    """Re-raise a worker's DcdbError in the parent, adding how to resume."""
    cls = getattr(errors, result["error"], DcdbError)
    resume = "fix or remove that shard, then re-run the same command: finished shards are kept"
    if issubclass(cls, OutputError):  # disk full, read-only: nothing wrong with the shard
        resume = "then re-run the same command: finished shards are kept"
    hint = resume if result["hint"] is None else f"{result['hint']}; {resume}"
    raise cls(result["message"], hint=hint)


# ---------------------------------------------------------------------------------- running


def _tasks(pool: Path, plan: Plan, todo: list[ShardSource]) -> list[ShardTask]:
    return [
        ShardTask(
            pool=str(pool),
            index=s.index,
            name=s.name,
            parquet=str(s.parquet),
            npz=str(s.npz) if s.npz else None,
            rows=s.rows,
            signature=s.signature,
            schema=plan.schema,
            spaces=plan.spaces,
        )
        for s in todo
    ]


def _record(pool: Path, entry: dict[str, Any]) -> None:
    """Journal one finished shard (atomically, its outputs in place): a resumed ingest skips it."""
    params = _shard_params(entry["name"], entry["index"], entry["rows"], entry["signature"], entry["spaces"])
    _journal(pool).record(entry["name"], params=params, outputs=_entry_outputs(entry), info=entry)


class _Progress:
    """tqdm bar on stderr counting rows (so it shows rows/s), with shards done as a postfix."""

    def __init__(self, rows: int, shards_done: int, shards: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(
            total=rows, unit="rows", unit_scale=True, desc="ingest", file=sys.stderr, disable=not enabled
        )
        self.shards_done, self.shards = shards_done, shards

    def shard_done(self, rows: int) -> None:
        self.shards_done += 1
        self.bar.set_postfix_str(f"{self.shards_done}/{self.shards} shards", refresh=False)
        self.bar.update(rows)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _run_tasks(pool: Path, tasks: list[ShardTask], jobs: int, bar: _Progress) -> None:
    """Shards on ``jobs`` processes (dcdb.parallel; in this process for one job); on a bad shard,
    start no more, record the ones still running as they finish, then raise."""
    failure = None
    try:
        with parallel.as_completed(_run_task, tasks, jobs, on_death=_worker_died) as results:
            for task, result in results:
                if result["ok"]:
                    _record(pool, result["entry"])
                    bar.shard_done(task.rows)
                elif failure is None:
                    failure = result
                    results.cancel()
    except WorkerError:  # a worker was killed (OOM killer, kill -9): what finished is kept
        if failure is None:
            raise
    if failure is not None:  # the bad shard says more than a dead worker
        _raise_worker_error(failure)


def _worker_died(task: ShardTask) -> WorkerError:
    return WorkerError(
        f"a worker process died while ingesting (killed, or out of memory), around shard {task.name}",
        hint="re-run the same command (with a smaller -j if memory is short): finished shards are kept",
    )


# ----------------------------------------------------------------------------------- commit


_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)


def _uid_hash(arr: np.ndarray) -> np.ndarray:
    """A 64-bit mix of each 128-bit uid: equal uids give equal hashes (not the reverse)."""
    return arr["f0"] ^ (arr["f1"] * _HASH_MULT)


def count_duplicates(sources: list[np.ndarray | Path]) -> int:
    """Rows whose uid already appeared earlier (total rows minus distinct uids).

    ``sources`` are uid arrays or ``.npy`` files of them (loaded one at a time, so the parent
    holds 8 bytes per row, not 16). Sorts 64-bit hashes, then settles the few rows whose hash
    repeats with an exact comparison: 12.8M uids take ~1 s.
    """

    def load(src):
        return np.load(src) if isinstance(src, (str, Path)) else src

    hashes = [_uid_hash(load(src)) for src in sources]
    if not hashes:
        return 0
    sorted_h = np.sort(np.concatenate(hashes))
    repeated = np.unique(sorted_h[1:][sorted_h[1:] == sorted_h[:-1]])
    del sorted_h
    if not len(repeated):
        return 0
    # Rows with a repeated hash: the only rows that can be duplicates. Count them exactly.
    candidates = [load(src)[np.isin(h, repeated)] for src, h in zip(sources, hashes)]
    cand = uids.sort(np.concatenate(candidates))
    same = (cand["f0"][1:] == cand["f0"][:-1]) & (cand["f1"][1:] == cand["f1"][:-1])
    return int(same.sum())


def _commit_space(pool: Path, plan: Plan, space: str, entries: list[dict[str, Any]]) -> None:
    """One Lance commit of every fragment of ``space`` in shard order; drop unreferenced files."""
    import lance
    from lance.fragment import FragmentMetadata

    uri = pool / EMBEDDINGS_DIR / f"{space}.lance"
    metas = [e["spaces"][space]["fragment"] for e in entries if e["spaces"][space]["fragment"] is not None]
    fragments = [FragmentMetadata.from_json(json.dumps(m)) for m in metas]
    dataset = lance.LanceDataset.commit(
        str(uri), lance.LanceOperation.Overwrite(plan.space_schema(space), fragments)
    )
    if dataset.count_rows() != plan.rows:
        raise PoolError(
            f"embedding table {space} has {dataset.count_rows():,} rows after commit, "
            f"the metadata has {plan.rows:,}",
            hint=f"delete {str(pool)!r} and ingest again",
        )
    keep = {Path(rel).name for e in entries for rel in e["spaces"][space]["files"]}
    for f in (uri / "data").glob("*"):
        if f.is_file() and f.name not in keep:  # fragments of a killed or redone shard
            f.unlink()


def _remove_orphan_fragments(pool: Path, plan: Plan) -> None:
    """After a failed run: Lance data files no journaled shard refers to (a shard that failed or
    was being written when a worker died, or a half file on a full disk). Frees their space now
    rather than at the next commit."""
    keep = set()
    for shard in plan.shards:
        entry = _journaled(pool, plan, shard) or {}
        for space in entry.get("spaces", {}).values():
            keep.update(Path(rel).name for rel in space["files"])
    for space in plan.spaces:
        data = pool / EMBEDDINGS_DIR / f"{space}.lance" / "data"
        for f in data.glob("*") if data.is_dir() else ():
            if f.is_file() and f.name not in keep:
                f.unlink(missing_ok=True)


def _remove_stale_metadata(pool: Path, plan: Plan) -> None:
    """Metadata files of shards that left SRC between an interrupted run and this one."""
    names = {f"{s.name}.parquet" for s in plan.shards}
    for p in (pool / METADATA_DIR).glob("*.parquet"):
        if p.name not in names:
            p.unlink()


def _manifest(pool: Path, plan: Plan, entries: list[dict[str, Any]], duplicates: int) -> dict[str, Any]:
    from dcdb.version import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dcdb_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": str(plan.src),
        "source_fingerprint": plan.fingerprint,
        "rows": plan.rows,
        "shards": [
            {"name": e["name"], "rows": e["rows"], "metadata": e["metadata"]["path"]} for e in entries
        ],
        "columns": [{"name": f.name, "type": str(f.type)} for f in plan.schema]
        + [{"name": UID_HI, "type": "uint64"}, {"name": UID_LO, "type": "uint64"}],
        "source_shards": plan.sources,
        "spaces": {
            space: {
                "model": info["model"],
                "dim": info["dim"],
                "dtype": info["dtype"],
                "path": f"{EMBEDDINGS_DIR}/{space}.lance",
                "rows": plan.rows,
            }
            for space, info in plan.spaces.items()
        },
        "duplicate_uids": duplicates,
        "metadata_compression": f"{METADATA_COMPRESSION}-{METADATA_COMPRESSION_LEVEL}",
        "bytes": dir_size(pool / METADATA_DIR) + dir_size(pool / EMBEDDINGS_DIR),
    } | ({"buckets": plan.buckets} if plan.buckets else {})


def _commit(pool: Path, plan: Plan, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Lance commits, duplicate count, manifest (last), then drop the journal."""
    for space in plan.spaces:
        _commit_space(pool, plan, space, entries)
    _remove_stale_metadata(pool, plan)
    duplicates = count_duplicates([pool / e["uids"]["path"] for e in entries])
    manifest = _manifest(pool, plan, entries, duplicates)
    write_json(pool / MANIFEST, manifest)
    shutil.rmtree(_staging(pool), ignore_errors=True)
    return manifest


# ------------------------------------------------------------------------ bucket repartition
# ``ingest --buckets N`` (layout: dcdb/ingest/buckets.py) stages the repartition inside
# ``POOL/.ingest/`` in two resumable phases before the normal ingest runs on the buckets:
#
# A. per source shard (parallel): read parquet + npz, split the rows by bucket into one Arrow IPC
#    file (one record batch per bucket present) and record it (a dcdb.parallel.Ledger in parts/);
# B. per bucket (parallel): gather its batch from every shard's file (memory-mapped), sort by uid
#    (stable), write ``bucket-XXXXX.parquet`` + ``.npz`` -- a DataComp-format source shard -- and
#    record it (in merged/); once every bucket is, the stage's marker ``buckets.json`` lists them all.
#
# Only one source shard (phase A) or one bucket (phase B) is in a worker's memory at a time, so N
# must make a bucket fit in memory (12.8M rows / 256 buckets = 50k rows, ~340 MB with embeddings).

_STAGE = "buckets"


@dataclass
class _SplitTask:
    shard: Any  # ShardTask
    out: str
    bits: int


@dataclass
class _MergeTask:
    bucket: int
    parts: list[tuple[str, int]]  # (arrow file, batch index) in source shard order
    out: str
    schema: Any
    spaces: dict[str, dict[str, Any]]


def _stage_dir(pool: Path, bits: int) -> Path:
    return pool / STAGING_DIR / _STAGE / f"b{bits}-v{FORMAT_VERSION}"


def _source_columns(table: pa.Table, index: int) -> pa.Table:
    """``table`` (source shard number ``index``) with where each row came from: ``source_shard``
    (the index) and ``source_row`` (the row's position in that shard)."""
    n = table.num_rows
    return table.append_column(pa.field(SOURCE_SHARD, pa.int32(), nullable=False),
                               pa.array(np.full(n, index, dtype=np.int32))).append_column(
        pa.field(SOURCE_ROW, pa.int64(), nullable=False), pa.array(np.arange(n, dtype=np.int64)))


def stored_schema(schema: pa.Schema) -> pa.Schema:
    """A source schema with the source columns a bucketed pool adds (``_source_columns``)."""
    return schema.append(pa.field(SOURCE_SHARD, pa.int32(), nullable=False)).append(
        pa.field(SOURCE_ROW, pa.int64(), nullable=False))


def _split_shard(task: _SplitTask) -> dict[str, Any]:
    """Phase A: one source shard -> an Arrow IPC file, one record batch per bucket present."""
    shard = task.shard
    kill_point(f"ingest-split:{shard.name}")
    table = _read_shard_table(shard)
    uid_arr = uids.from_arrow(table.column("uid"), source=shard.parquet)
    table = _source_columns(table, shard.index)
    columns, fields = list(table.columns), list(table.schema)
    if shard.npz is not None:
        for space, info in shard.spaces.items():
            arr = _load_embedding(shard, space)
            values = pa.array(np.ascontiguousarray(arr).reshape(-1))
            columns.append(pa.FixedSizeListArray.from_arrays(values, info["dim"]))
            fields.append(pa.field(space, pa.list_(values.type, info["dim"])))
    table = pa.Table.from_arrays(columns, schema=pa.schema(fields))
    bucket = bucket_of(uid_arr, task.bits)
    order = np.argsort(bucket, kind="stable")
    table = table.take(pa.array(order))
    sorted_b = bucket[order]
    present, starts, counts = np.unique(sorted_b, return_index=True, return_counts=True)
    index = {}
    out = Path(task.out)
    with atomic_path(out) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            for i, (b, start, n) in enumerate(zip(present, starts, counts)):
                writer.write_batch(table.slice(int(start), int(n)).combine_chunks().to_batches()[0])
                index[str(int(b))] = i
    return {"name": shard.name, "signature": shard.signature, "file": out.name, "batches": index,
            "rows": shard.rows}


def _merge_bucket(task: _MergeTask) -> dict[str, Any]:
    """Phase B: one bucket's rows from every shard, sorted by uid (stable) -> parquet + npz."""
    batches = []
    for path, i in task.parts:
        with pa.memory_map(path) as src:
            batches.append(pa.ipc.open_file(src).get_batch(i))
    names = [f.name for f in task.schema]
    if batches:
        table = pa.Table.from_batches(batches)
        uid_arr = uids.from_arrow(table.column("uid"), source=f"bucket {task.bucket}")
        order = np.lexsort((uid_arr["f1"], uid_arr["f0"]))  # stable: duplicates keep source order
        table = table.take(pa.array(order))
    else:
        fields = list(task.schema) + [
            pa.field(s, pa.list_(pa.from_numpy_dtype(np.dtype(i["dtype"])), i["dim"])) for s, i in task.spaces.items()
        ]
        table = pa.schema(fields).empty_table()
    out = Path(task.out)
    name = bucket_name(task.bucket)
    if task.spaces:
        arrays = {}
        for space, info in task.spaces.items():
            col = table.column(space).combine_chunks()
            flat = col.flatten().to_numpy(zero_copy_only=False)
            arrays[space] = flat.astype(info["dtype"], copy=False).reshape(len(col), info["dim"])
        with atomic_path(out / f"{name}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    with atomic_path(out / f"{name}.parquet") as tmp:
        pq.write_table(table.select(names), tmp, row_group_size=100_000, compression="zstd",
                       compression_level=1)
    return {"bucket": task.bucket, "rows": table.num_rows}


def _run_all(fn, tasks: list, jobs: int, label: str, progress: bool,
             record: Callable[[Any, Any], None]) -> None:
    """``fn`` over ``tasks`` on ``jobs`` processes (dcdb.parallel; in this process for one job);
    ``record(task, result)`` as each finishes."""
    from tqdm import tqdm

    with tqdm(total=len(tasks), desc=label, unit="part", file=sys.stderr, disable=not progress) as bar:

        def finished(task, result) -> None:
            record(task, result)
            bar.update(1)

        for _ in parallel.map(fn, tasks, jobs, progress=finished):
            pass


def repartition(plan, pool: Path, buckets: int, *, jobs: int = 2, progress: bool = False):
    """Stage SRC as N uid buckets (phases A and B above) and return the ingest plan whose shards
    are the buckets, with SRC's fingerprint and the bucketing record. Resumable."""
    bits = bucket_bits(buckets)
    stage = _stage_dir(pool, bits)
    # The split parts (phase A) are journaled per source shard with its signature, so a source
    # shard changed since an interrupted run is split again and the others are kept; the buckets
    # (phase B) depend on every shard: they are staged per source fingerprint.
    parts, src = stage / "parts", stage / f"src-{plan.fingerprint[:16]}"
    for d in [*(pool / STAGING_DIR / _STAGE).glob("*"), *stage.glob("src-*")]:  # other counts, sources
        if d not in (stage, parts, src):
            shutil.rmtree(d, ignore_errors=True)
    parts.mkdir(parents=True, exist_ok=True)
    src.mkdir(parents=True, exist_ok=True)
    staged = parallel.Ledger(stage, root=src)  # phases A and B done: the split parts are gone, buckets stay
    if not staged.done(_STAGE):
        files = _split_and_merge(plan, pool, parts, src, buckets, bits, jobs, progress)
        staged.record(_STAGE, outputs=files)
        shutil.rmtree(parts, ignore_errors=True)  # a full copy of the pool: free it before ingesting
        shutil.rmtree(stage / "merged", ignore_errors=True)
    bplan = plan_source(src)
    if bplan.rows != plan.rows or len(bplan.shards) != buckets or bplan.schema.names != stored_schema(plan.schema).names:
        raise PoolError(
            f"bucket staging in {str(stage)!r} holds {bplan.rows:,} rows in {len(bplan.shards)} buckets, "
            f"expected {plan.rows:,} in {buckets}",
            hint=f"delete {str(stage)!r} and re-run the same command",
        )
    spaces = {k: dict(v) for k, v in plan.spaces.items()}
    return Plan(
        src=plan.src,
        shards=bplan.shards,
        schema=stored_schema(plan.schema),
        spaces=spaces,
        source_fingerprint=plan.fingerprint,
        buckets={"count": buckets, "bits": bits, "key": "uid", "order": "uid"},
        sources=[{"name": s.name, "rows": s.rows} for s in plan.shards],
    )


def _split_and_merge(plan, pool: Path, parts: Path, src: Path, buckets: int, bits: int, jobs: int,
                     progress: bool) -> list[str]:
    """Phases A and B, each skipping what an earlier run recorded; the bucket files (in src/)."""
    # Phase A: split every source shard not split yet (marker = parts/<shard>.json).
    split = parallel.Ledger(parts)
    journals: dict[str, dict[str, Any]] = {}
    todo = []
    for task in _tasks(pool, plan, plan.shards):
        marker = split.done(task.name, params={"signature": task.signature})
        if marker is not None:
            journals[task.name] = marker.info
        else:
            todo.append(_SplitTask(task, str(parts / f"{task.name}.arrow"), bits))

    def split_done(task: _SplitTask, j: dict[str, Any]) -> None:
        split.record(j["name"], params={"signature": task.shard.signature}, outputs=[j["file"]], info=j)
        journals[j["name"]] = j

    _run_all(_split_shard, todo, jobs, "split", progress, split_done)
    # Phase B: every bucket not written yet (marker = merged/<bucket>.json).
    merged = parallel.Ledger(parts.parent / "merged", root=src)
    files = {b: [f"{bucket_name(b)}.parquet"] + ([f"{bucket_name(b)}.npz"] if plan.spaces else [])
             for b in range(buckets)}
    merges = []
    for b in range(buckets):
        if merged.done(bucket_name(b)) is not None:
            continue
        where = [(str(parts / journals[s.name]["file"]), journals[s.name]["batches"][str(b)])
                 for s in plan.shards if str(b) in journals[s.name]["batches"]]
        merges.append(_MergeTask(b, where, str(src), stored_schema(plan.schema), plan.spaces))
    _run_all(_merge_bucket, merges, jobs, "buckets", progress,
             lambda task, result: merged.record(bucket_name(task.bucket), outputs=files[task.bucket]))
    return [f for b in range(buckets) for f in files[b]]


# ------------------------------------------------------------------------------------ entry


def ingest(
    src: str | os.PathLike,
    pool: str | os.PathLike,
    *,
    jobs: int = 2,
    progress: bool = False,
    buckets: int | None = None,
) -> IngestReport:
    """Ingest the DataComp metadata folder ``src`` into the pool store ``pool``.

    ``jobs`` worker processes handle one shard each at a time (``jobs=1`` runs in this process).
    Every pool is laid out in uid buckets by the top bits of the uid, each bucket sorted by uid
    (see dcdb/ingest/buckets.py): ``buckets`` (a power of two; 1 = one fully sorted bucket)
    chooses how many, by default ``default_buckets`` (buckets of ~256 MB in memory, or of the
    largest source shard's size when that is larger). Resumable: re-run after an interruption to finish. Raises SourceError
    for bad input, OutputError when POOL is a non-pool folder, PoolError when POOL is a complete
    pool of another source.
    """
    if jobs < 1:
        raise UsageError(f"jobs must be at least 1, got {jobs}", hint="pass -j N with N >= 1, or leave it out")
    if buckets is not None:
        bucket_bits(buckets)  # refuse a bad count before reading anything
    t0 = time.perf_counter()
    plan = plan_source(src)
    check_stored_columns(plan)
    pool = prepare_folder(Path(pool).expanduser(), create=False, what="pool path",
                          hint="give a folder path as POOL").resolve()
    resume = "then re-run the same command: finished shards are kept"
    with write_lock(pool, "pool", create=True), writing(pool, "pool", redo=resume):
        return _ingest(plan, pool, t0, jobs=jobs, progress=progress, buckets=buckets)


def _ingest(plan: Plan, pool: Path, t0: float, *, jobs: int, progress: bool, buckets: int | None) -> IngestReport:
    """``ingest`` once POOL is locked."""
    complete = _prepare_pool(pool, plan)
    if complete is not None:
        if buckets is not None:  # without --buckets, any layout of a complete pool will do
            check_same_buckets(pool, complete, buckets)
        shutil.rmtree(_staging(pool), ignore_errors=True)  # left if killed right after the manifest
        return IngestReport(
            pool=str(pool),
            rows=int(complete["rows"]),
            shards=len(complete["shards"]),
            spaces=list(complete.get("spaces", {})),
            seconds=time.perf_counter() - t0,
            bytes_read=0,
            duplicate_uids=int(complete.get("duplicate_uids", 0)),
            skipped_shards=len(complete["shards"]),
            already_complete=True,
        )
    bytes_read = sum(s.source_bytes for s in plan.shards)
    if buckets is None:
        row_bytes = METADATA_ROW_BYTES + sum(i["dim"] * np.dtype(i["dtype"]).itemsize for i in plan.spaces.values())
        buckets = default_buckets(plan.rows, [s.rows for s in plan.shards], row_bytes)
    plan = repartition(plan, pool, buckets, jobs=jobs, progress=progress)
    done = _done_entries(pool, plan)
    todo = [s for s in plan.shards if s.name not in done]
    tasks = _tasks(pool, plan, todo)
    rows_todo = sum(s.rows for s in todo)
    try:
        with _Progress(rows_todo, len(done), len(plan.shards), progress) as bar:
            _run_tasks(pool, tasks, jobs, bar)
    except BaseException:  # every worker has exited: drop what a killed or failed one left
        _remove_orphan_fragments(pool, plan)
        _remove_temp_files(pool)
        raise
    entries = [_journaled(pool, plan, s) for s in plan.shards]
    if any(e is None for e in entries):
        raise PoolError(
            f"the ingest journal in {str(_staging(pool))!r} lost a shard", hint="re-run the same command"
        )
    manifest = _commit(pool, plan, entries)
    return IngestReport(
        pool=str(pool),
        rows=plan.rows,
        shards=len(plan.shards),
        spaces=list(plan.spaces),
        seconds=time.perf_counter() - t0,
        bytes_read=bytes_read,
        duplicate_uids=manifest["duplicate_uids"],
        skipped_shards=len(done),
        rows_ingested=rows_todo,
        source_shards=len(plan.sources or ()),
    )
