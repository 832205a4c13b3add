"""The pool store: on-disk layout and manifest.

A pool is a folder::

    POOL/
      dcdb.json                      manifest, written last by ingest (no manifest -> not a pool)
      metadata/<bucket>.parquet      one per uid bucket (dcdb/ingest/buckets.py), rows in uid order
      embeddings/<space>.lance       one Lance table per embedding space: columns ``uid`` and
                                     ``<space>`` (fixed-size list of float16/float32), rows in the
                                     same order as metadata/ read shard by shard
      derived/                       derived columns (dcdb annotate), aligned to metadata/
      subsets/<name>.npy|.json|.parquet   stored subsets: uid list, manifest, uid table for SQL
      shards/index/<tar>.parquet, shards/index.json   shard index of img2dataset tars
                                     (dcdb index-shards, ingest --shards): uid -> tar, byte range
      .ingest/                       staging area and journal of an unfinished ingest

The manifest (``dcdb.json``) records the format version, the row count, the shards in order with
their row counts, the metadata columns, and each embedding space (model, dim, dtype, path).
Row i of the concatenated metadata is row i of every embedding table; ingest checks the uids match.

Store format 2 (this one) differs from 1 in the layout and in four stored columns:

* every pool is laid out in uid buckets (``manifest["buckets"]``), each sorted by uid, so the
  pool's rows read in order are sorted by uid and a uid result in row order needs no sort;
* the uid is stored twice: as DataComp's 32-character hex string ``uid`` (what SQL sees and
  compares, unchanged) and as its two 64-bit halves ``uid_hi``/``uid_lo`` (UBIGINT: DataComp's
  ``f0``/``f1``), which a filter whose result is the stored uid reads instead of the strings
  (dcdb/uidpath.py): a uid list becomes DataComp's ``u8,u8`` array by two copies, no hex decode;
* ``source_shard`` (INTEGER: the source shard's index in ``manifest["source_shards"]``, the
  source parquet files in name order) and ``source_row`` (BIGINT: the row's index in that file)
  say where each row came from.

A format-1 pool is refused with the way to upgrade it (``dcdb upgrade POOL``, or re-ingest).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcdb.errors import PoolError

FORMAT = "dcdb-pool"
FORMAT_VERSION = 2
# Columns that store format 2 adds to every metadata file (see the module docstring); a source
# with a column of one of these names is refused.
UID_HI, UID_LO = "uid_hi", "uid_lo"
SOURCE_SHARD, SOURCE_ROW = "source_shard", "source_row"
STORED_COLUMNS = (UID_HI, UID_LO, SOURCE_SHARD, SOURCE_ROW)
MANIFEST = "dcdb.json"
METADATA_DIR = "metadata"
EMBEDDINGS_DIR = "embeddings"
DERIVED_DIR = "derived"
SUBSETS_DIR = "subsets"
STAGING_DIR = ".ingest"
UPGRADE_DIR, UPGRADE_COMMIT = ".upgrade", "commit"  # dcdb upgrade's work folder and its point of no return
POOL_ENV = "DCDB_POOL"

# DataComp's four precomputed embedding spaces (keys of each shard's .npz) and their models.
DATACOMP_SPACES: dict[str, dict[str, Any]] = {
    "b32_img": {"model": "openai ViT-B-32", "dim": 512, "modality": "image"},
    "b32_txt": {"model": "openai ViT-B-32", "dim": 512, "modality": "text"},
    "l14_img": {"model": "openai ViT-L-14", "dim": 768, "modality": "image"},
    "l14_txt": {"model": "openai ViT-L-14", "dim": 768, "modality": "text"},
}

# Columns of a DataComp metadata parquet (others are kept as they come).
DATACOMP_COLUMNS = (
    "uid",
    "url",
    "text",
    "original_width",
    "original_height",
    "sha256",
    "clip_b32_similarity_score",
    "clip_l14_similarity_score",
    "face_bboxes",
)


@dataclass
class Pool:
    """An opened (complete) pool: its folder and manifest."""

    path: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return list(self.manifest["shards"])

    @property
    def spaces(self) -> dict[str, dict[str, Any]]:
        return dict(self.manifest.get("spaces", {}))

    @property
    def columns(self) -> list[dict[str, str]]:
        return list(self.manifest["columns"])

    def metadata_files(self) -> list[Path]:
        return [self.path / s["metadata"] for s in self.manifest["shards"]]

    def lance_path(self, space: str) -> Path:
        if space not in self.spaces:
            raise self.unknown_space(space)
        return self.path / self.spaces[space]["path"]

    def unknown_space(self, space: str) -> PoolError:
        """The error for a ``--space`` the pool lacks: its spaces and the closest, or how to add some."""
        spaces = list(self.spaces)
        if not spaces:
            return PoolError(f"pool {str(self.path)!r} has no embedding space {space!r}: it is metadata-only",
                             hint="ingest the .npz files beside the metadata parquet to add embeddings")
        close = [s for s in spaces if s.startswith(f"{space}_")] or difflib.get_close_matches(space, spaces, n=1)
        mean = f"did you mean {' or '.join(close)}? " if close else ""
        return PoolError(f"pool {str(self.path)!r} has no embedding space {space!r}",
                         hint=f"{mean}its spaces are {', '.join(spaces)}")

    @property
    def subsets_dir(self) -> Path:
        return self.path / SUBSETS_DIR

    @property
    def manifest_hash(self) -> str:
        return hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()


def damaged_table(table: str | os.PathLike, detail: str) -> PoolError:
    """The error for a Lance embedding table whose files are damaged (``table``: its folder)."""
    return PoolError(
        f"embedding table {str(table)!r} is damaged: {detail}",
        hint="re-ingest the pool from its source (`dcdb ingest SRC NEW_POOL`); copying the pool "
        "back from a backup also works",
    )


def check_lance_files(table: str | os.PathLike, dataset, fragments=None) -> None:
    """Check that every data file of the Lance ``dataset`` at ``table`` (or of ``fragments``)
    exists and ends in an intact Lance footer, before anything reads it: Lance panics on a
    truncated or overwritten file (in a background thread, with its report on stderr) instead of
    raising an error. One ``pread`` of 16 bytes per file; raises PoolError naming the file."""
    import struct

    table = Path(table)
    for frag in fragments if fragments is not None else dataset.get_fragments():
        for df in frag.data_files():
            path = table / "data" / df.path
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise damaged_table(table, f"its data file {df.path!r} is missing") from None
            except OSError as exc:
                raise damaged_table(table, f"its data file {df.path!r} cannot be read: {exc}") from None
            try:
                size = os.fstat(fd).st_size
                tail = os.pread(fd, 16, size - 16) if size >= 16 else b""
            finally:
                os.close(fd)
            if len(tail) < 16 or tail[-4:] != b"LANC":
                raise damaged_table(table, f"its data file {df.path!r} ({size:,} bytes) is truncated or "
                                           "overwritten: it does not end in a Lance footer")
            meta_pos, major, minor = struct.unpack("<QHH", tail[:12])
            if (major, minor) != (df.file_major_version, df.file_minor_version) or (
                major == 0 and meta_pos >= size - 16
            ):
                raise damaged_table(table, f"its data file {df.path!r} has a corrupt Lance footer")


def open_lance(table: str | os.PathLike, fragment_ids=None):
    """Open the Lance table at ``table`` and check its data files (see check_lance_files); with
    ``fragment_ids``, only those fragments' files. Returns the dataset."""
    import lance

    try:
        ds = lance.dataset(str(table))
    except Exception as exc:
        raise damaged_table(table, f"it cannot be opened ({exc})") from exc
    frags = None
    if fragment_ids is not None:
        by_id = {f.fragment_id: f for f in ds.get_fragments()}
        frags = [by_id[i] for i in fragment_ids if i in by_id]
    check_lance_files(table, ds, frags)
    return ds


def lance_batches(batches, table: str | os.PathLike):
    """Iterate Lance's record batches, turning a read failure (a damaged file Lance did not
    notice when the table was opened) into the PoolError of ``damaged_table``."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (OSError, RuntimeError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
            raise damaged_table(table, f"reading it failed: {lance_failure(exc)}") from exc
        yield batch


def lance_failure(exc: BaseException) -> str:
    """What went wrong in Lance, in one line (a panic inside Lance becomes "could not decode")."""
    import re

    text = str(exc).strip()
    m = re.search(r'panicked with message "([^"]*)"', text)
    if m:
        return f"Lance could not decode a data file ({m.group(1)[:200]})"
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def nan_to_null(col):
    """Float NaN -> NULL (an Arrow array or chunked array; other types are returned as they are),
    as a pool stores floats. DataComp's pandas code reads both as NaN and no comparison with it is
    true; in DuckDB a NULL compares as unknown (row dropped) and sorts with NULLS LAST, whereas
    DuckDB's NaN is larger than every number (``NaN >= 0.3`` is true) -- so storing NULL makes
    plain SQL thresholds behave like DataComp's numpy ones."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not pa.types.is_floating(col.type):
        return col
    return pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)


def resolve_pool_path(path: str | os.PathLike | None) -> Path:
    if path is None or str(path) == "":
        env = os.environ.get(POOL_ENV)
        if not env:
            raise PoolError(
                "no pool given", hint=f"pass --pool PATH or set the {POOL_ENV} environment variable"
            )
        path = env
    return Path(path).expanduser()


def open_pool(path: str | os.PathLike | None = None) -> Pool:
    """Open a complete pool, or raise PoolError saying why it is not one and what to do."""
    p = resolve_pool_path(path)
    if not p.exists():
        raise PoolError(f"pool {str(p)!r} does not exist", hint="create one with `dcdb ingest SRC POOL`")
    if not p.is_dir():
        raise PoolError(f"pool {str(p)!r} is a file, not a pool folder", hint="give the folder `dcdb ingest` wrote")
    mf = p / MANIFEST
    if upgrade_unfinished(p):
        raise PoolError(f"pool {str(p)!r} is in the middle of `dcdb upgrade`: it stopped while exchanging its files",
                        hint=f"re-run `dcdb upgrade {p}` to finish it")
    if not mf.is_file():
        if (p / STAGING_DIR).is_dir():
            raise PoolError(
                f"pool {str(p)!r} is incomplete: an ingest into it did not finish",
                hint="re-run the same `dcdb ingest SRC POOL` command to resume it",
            )
        raise PoolError(
            f"{str(p)!r} is not a dcdb pool (no {MANIFEST})",
            hint="create one with `dcdb ingest SRC POOL`",
        )
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PoolError(f"pool manifest {str(mf)!r} is unreadable: {exc}", hint="re-run `dcdb ingest`") from exc
    if manifest.get("format") != FORMAT:
        raise PoolError(f"{str(mf)!r} is not a dcdb pool manifest", hint="give the folder `dcdb ingest` wrote")
    if manifest.get("format_version") == 1:
        raise PoolError(
            f"pool {str(p)!r} is store format v1; this dcdb reads format v{FORMAT_VERSION} (uid-sorted, "
            "binary uids)",
            hint=f"run `dcdb upgrade {p}` (rewrites it in place), or re-ingest it from its source",
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PoolError(
            f"pool {str(p)!r} has format version {manifest.get('format_version')}, this dcdb reads "
            f"version {FORMAT_VERSION}",
            hint="re-ingest the pool with this version of dcdb",
        )
    problem = _manifest_problem(manifest)
    if problem:
        raise PoolError(f"pool manifest {str(mf)!r} is damaged: {problem}",
                        hint="re-ingest the pool (`dcdb ingest SRC POOL` into a new folder)")
    return Pool(path=p, manifest=manifest)


def upgrade_unfinished(pool: str | os.PathLike) -> bool:
    """Whether ``dcdb upgrade`` of ``pool`` stopped while exchanging its files (dcdb/upgrade.py)."""
    return (Path(pool) / UPGRADE_DIR / UPGRADE_COMMIT).is_file()


def _inside(rel: Any) -> bool:
    """A manifest path: relative, and staying inside the pool folder."""
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")):
        return False
    return ".." not in Path(rel).parts


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a manifest's fields (None: nothing). Paths must stay inside
    the pool: they are what a sandboxed filter is allowed to read."""
    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not count(m.get("rows")):
        return f"rows is {m.get('rows')!r}, not a row count"
    shards = m.get("shards")
    if not isinstance(shards, list):
        return "shards is not a list"
    for i, sh in enumerate(shards):
        if not (isinstance(sh, dict) and isinstance(sh.get("name"), str) and count(sh.get("rows"))
                and _inside(sh.get("metadata"))):
            return f"shard entry {i} is not {{name, rows, metadata path inside the pool}}"
    if sum(sh["rows"] for sh in shards) != m["rows"]:
        return f"its shards hold {sum(sh['rows'] for sh in shards)} rows, not {m['rows']}"
    buckets = m.get("buckets")
    if not (isinstance(buckets, dict) and count(buckets.get("bits")) and buckets["bits"] <= 16
            and buckets.get("count") == 1 << buckets["bits"] == len(shards)):
        return "buckets is not {count: the number of shards, bits: log2(count)}"
    if not isinstance(m.get("columns"), list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) for c in m["columns"]):
        return "columns is not a list of {name, type}"
    spaces = m.get("spaces", {})
    if not isinstance(spaces, dict):
        return "spaces is not a mapping"
    for name, sp in spaces.items():
        if not (isinstance(sp, dict) and count(sp.get("dim")) and sp["dim"] > 0 and _inside(sp.get("path"))):
            return f"embedding space {name!r} is not {{dim, path inside the pool}}"
    return None
