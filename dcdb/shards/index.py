"""The shard index: where every downloaded sample's bytes are, so the resharder reads only those.

Input is a folder of img2dataset shards (DESIGN §3): ``%08d.tar`` with members ``<key>.jpg``,
``<key>.txt``, ``<key>.json`` ..., ``%08d.parquet`` (one row per attempted sample, failed downloads
too) and ``%08d_stats.json``. For every tar, one row per sample::

    uid          from the sample's .json (NULL if the json is missing or unreadable)
    key          img2dataset's positional key (unstable across downloads; uid is the identity)
    tar          the tar's file name
    byte_offset  where the sample's first member header starts in the tar
    byte_length  bytes up to the end of its last member's padded data: the members are contiguous
    members      list of {ext, byte_offset, size}: each member's data offset and size
    downloaded   true when the tar holds the sample's bytes
    status       img2dataset's status ("success", "failed_to_download", ...)
    width/height the image size after img2dataset's resize (from the json)
    face_bboxes  the json's face boxes, relative [x1, y1, x2, y2] (NULL when the json has none)
    error        why a sample in the tar cannot be used (corrupt header, truncated member, no json)

followed by the shard parquet's rows whose uid the tar does not hold (failed downloads: known
rows with no bytes, ``downloaded = false``; a row img2dataset marked "success" that the tar lacks,
e.g. after truncation, gets status "missing_from_tar").

Stored in the pool as ``POOL/shards/index/<tar stem>.parquet`` (one file per tar, written under a
temporary name and renamed; its footer records the tar's size and mtime) plus
``POOL/shards/index.json`` (the shards folder, every tar's size, mtime and counts), written last.
Building is parallel (one tar per worker at a time) and resumable: a re-run keeps every per-tar
file whose tar, parquet and stats are unchanged. Fresh per-tar files are written to
``POOL/shards/index.new/`` and moved into place only once the run is accepted: shards none of whose
uids is in the pool (another pool's) are refused, leaving any index in place as it was; shards
with some uids the pool lacks get a warning with the counts. The resharder compares each tar it
reads with the manifest's size and mtime and refuses an out-of-date index.

Tars are read with :mod:`dcdb.tario` (``os.pread``): headers and json members only, never the
image bytes. A damaged header is skipped by resynchronising on the next valid header, so one bad
block costs the samples it touches, not the rest of the tar (Python's ``tarfile`` silently stops
at the first bad header after the first member).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dcdb.errors import DcdbError, ShardIndexError, SourceError, UsageError
from dcdb.io import TMP_MARK, atomic_path, write_json
from dcdb.parallel import file_signature
from dcdb.tario import Damage, Sample, group_samples, walk_tar

INDEX_FORMAT = "dcdb-shard-index"
INDEX_VERSION = 1
SHARDS_DIR = "shards"  # POOL/shards/
INDEX_DIR = "shards/index"  # POOL/shards/index/<tar stem>.parquet
INDEX_MANIFEST = "shards/index.json"
STAGE_DIR = "shards/index.new"  # per-tar files of a run, moved into INDEX_DIR once the run is accepted
FOOTER_KEY = b"dcdb.shard_index"
VIEW_NAME = "shard_index"

UID_RE = re.compile(r"^[0-9a-f]{32}$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LOST_STATUS = "missing_from_tar"  # status of a parquet "success" row whose sample the tar lacks

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ sample rows


def _sample_json(fd: int, sample: Sample) -> tuple[dict[str, Any] | None, str | None]:
    """The sample's parsed .json member, or (None, reason)."""
    member = next((m for e, m in sample.members if e == "json"), None)
    if member is None:
        return None, "no .json member"
    try:
        obj = json.loads(os.pread(fd, member.size, member.offset))
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"unreadable .json ({exc})"
    if not isinstance(obj, dict):
        return None, "the .json is not an object"
    return obj, None


def _int_or_none(v: Any) -> int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return int(v) if math.isfinite(v) else None


def _boxes_or_none(v: Any) -> list[list[float]] | None:
    if not isinstance(v, list):
        return None
    try:
        return [[float(x) for x in box] for box in v]
    except (TypeError, ValueError):
        return None


def sample_row(fd: int, tar_name: str, sample: Sample) -> dict[str, Any]:
    """The index row of one sample found in a tar."""
    obj, error = _sample_json(fd, sample)  # a damaged sample's json may still name its uid
    uid = obj.get("uid") if obj else None
    if obj is not None and not (isinstance(uid, str) and UID_RE.match(uid)):
        error, uid = f"uid {uid!r} in the .json is not 32 lowercase hex characters", None
    error = sample.damage or error
    return {
        "uid": uid,
        "key": sample.key,
        "tar": tar_name,
        "byte_offset": sample.start,
        "byte_length": sample.end - sample.start,
        "members": [{"ext": e, "byte_offset": m.offset, "size": m.size} for e, m in sample.members],
        "downloaded": True,
        "status": (obj.get("status") if obj and isinstance(obj.get("status"), str) else "success"),
        "width": _int_or_none(obj.get("width")) if obj else None,
        "height": _int_or_none(obj.get("height")) if obj else None,
        "face_bboxes": _boxes_or_none(obj.get("face_bboxes")) if obj else None,
        "error": error,
    }


def index_schema():
    import pyarrow as pa

    member = pa.struct([("ext", pa.string()), ("byte_offset", pa.int64()), ("size", pa.int64())])
    return pa.schema(
        [
            ("uid", pa.string()),
            ("key", pa.string()),
            ("tar", pa.string()),
            ("byte_offset", pa.int64()),
            ("byte_length", pa.int64()),
            ("members", pa.list_(member)),
            ("downloaded", pa.bool_()),
            ("status", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("face_bboxes", pa.list_(pa.list_(pa.float64()))),
            ("error", pa.string()),
        ]
    )


# ------------------------------------------------------------------------------- one tar


@dataclass
class TarFiles:
    """One img2dataset shard: the tar and its companions (which may be missing)."""

    tar: Path

    @property
    def name(self) -> str:
        return self.tar.name

    @property
    def parquet(self) -> Path:
        return self.tar.with_suffix(".parquet")

    @property
    def stats(self) -> Path:
        return self.tar.with_name(f"{self.tar.stem}_stats.json")


def shard_signature(files: TarFiles) -> dict[str, list[int] | None]:
    """The signatures (dcdb.parallel's ``[size, mtime_ns]``, None for a missing file) a per-tar
    index file's footer records and a re-run compares. The footer is part of the index's file
    format, so it is not a dcdb.parallel marker; it shares the signature."""
    return {
        "tar": file_signature(files.tar),
        "parquet": file_signature(files.parquet),
        "stats": file_signature(files.stats),
    }


def _stats_successes(files: TarFiles, warnings: list[str]) -> int | None:
    if not files.stats.is_file():
        warnings.append(
            f"{files.stats.name} is missing (img2dataset writes one per finished shard): samples were "
            f"counted in the tar instead"
        )
        return None
    try:
        return int(json.loads(files.stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.append(f"{files.stats.name} is unreadable ({exc}): samples were counted in the tar instead")
        return None


def _failed_rows(files: TarFiles, in_tar: set[str], warnings: list[str]) -> list[dict[str, Any]]:
    """Rows of the shard parquet whose uid the tar does not hold: known samples with no bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not files.parquet.is_file():
        warnings.append(f"{files.parquet.name} is missing: failed downloads of this shard are unknown")
        return []
    try:
        names = pq.ParquetFile(files.parquet).schema_arrow.names
        cols = [c for c in ("uid", "key", "status") if c in names]
        table = pq.read_table(files.parquet, columns=cols) if "uid" in cols else None
    except (OSError, ValueError, pa.ArrowException) as exc:  # a damaged or foreign file
        warnings.append(
            f"{files.parquet.name} is unreadable ({exc}): failed downloads of this shard are unknown"
        )
        return []
    if table is None:
        warnings.append(f"{files.parquet.name} has no uid column: failed downloads of this shard are unknown")
        return []
    rows = []
    for r in table.to_pylist():
        uid = r.get("uid")
        if not (isinstance(uid, str) and UID_RE.match(uid)) or uid in in_tar:
            continue
        status = r.get("status") or "failed_to_download"
        rows.append(
            {
                "uid": uid,
                "key": r.get("key"),
                "tar": files.name,
                "downloaded": False,
                # img2dataset wrote it, but the tar lost it (truncated or damaged since)
                "status": LOST_STATUS if status == "success" else status,
            }
        )
    return rows


def scan_tar(files: TarFiles) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Index rows of one shard (tar samples, then failed downloads) and its report."""
    warnings: list[str] = []
    damages: list[Damage] = []
    sig = shard_signature(files)
    if sig["tar"] is None:
        raise SourceError(
            f"tar {str(files.tar)!r} disappeared while indexing", hint="re-run the same command"
        )
    try:
        fd = os.open(files.tar, os.O_RDONLY)
    except OSError as exc:
        raise SourceError(f"cannot read tar {str(files.tar)!r}: {exc}", hint="check its permissions") from exc
    try:
        rows = [sample_row(fd, files.name, s) for s in group_samples(walk_tar(fd, sig["tar"][0]), damages)]
    finally:
        os.close(fd)
    for d in damages:
        warnings.append(f"{files.name}: {d.reason}")
    good = sum(1 for r in rows if r["error"] is None)
    stats = _stats_successes(files, warnings)
    if stats is not None and stats != len(rows):
        warnings.append(f"{files.stats.name} says {stats} successes, the tar holds {len(rows)} samples")
    failed = _failed_rows(files, {r["uid"] for r in rows if r["uid"]}, warnings)
    report = {
        "tar": files.name,
        "signature": sig,
        "samples": len(rows),
        "usable": good,
        "corrupt": len(rows) - good,
        "failed": len(failed),
        "stats_successes": stats,
        "warnings": warnings,
    }
    return rows + failed, report


def rows_table(rows: list[dict[str, Any]]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=index_schema())


# ----------------------------------------------------------------------------- index build


@dataclass
class IndexTask:
    """One tar to index into ``out`` (picklable)."""

    tar: str
    out: str


def _index_one(task: IndexTask) -> dict[str, Any]:
    """Worker: index one tar, write its parquet atomically; errors come back as data."""
    import pyarrow.parquet as pq

    try:
        rows, report = scan_tar(TarFiles(Path(task.tar)))
        table = rows_table(rows).replace_schema_metadata({FOOTER_KEY: json.dumps(report).encode()})
        with atomic_path(task.out) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return {"ok": True, "report": report}
    except DcdbError as exc:
        return {"ok": False, "error": type(exc).__name__, "message": exc.message, "hint": exc.hint}


def list_tars(shards_dir: str | os.PathLike) -> list[Path]:
    """The ``*.tar`` files of an img2dataset output folder, in name order; SourceError if none."""
    d = Path(shards_dir).expanduser()
    if not d.is_dir():
        raise SourceError(
            f"shards folder {str(d)!r} does not exist or is not a folder",
            hint="give the folder img2dataset wrote (its %08d.tar, %08d.parquet and %08d_stats.json)",
        )
    tars = sorted(p for p in d.glob("*.tar") if p.is_file())
    if not tars:
        raise SourceError(
            f"no *.tar files in {str(d)!r}",
            hint="give the folder img2dataset wrote (its %08d.tar, %08d.parquet and %08d_stats.json)",
        )
    return tars


def _stored_report(path: Path) -> dict[str, Any] | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).schema_arrow.metadata or {}
        return json.loads(meta[FOOTER_KEY])
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):  # missing, partial, foreign: redo
        return None


def _index_path(pool: Path, tar: Path) -> Path:
    return pool / INDEX_DIR / f"{tar.stem}.parquet"


@dataclass
class IndexReport:
    """What one ``index_shards`` call did."""

    pool: str
    shards_dir: str
    tars: int
    samples: int
    failed: int
    corrupt: int
    reused: int
    seconds: float
    bytes_indexed: int
    warnings: list[str]

    def summary(self) -> str:
        reused = f", {self.reused} already indexed" if self.reused else ""
        warn = f", {len(self.warnings)} warnings" if self.warnings else ""
        rate = self.bytes_indexed / 1e6 / self.seconds if self.seconds > 0 else 0.0
        return (
            f"indexed {self.samples:,} samples in {self.tars} tars of {self.shards_dir} "
            f"({self.failed:,} failed downloads, {self.corrupt:,} corrupt) into {self.pool} in "
            f"{self.seconds:.1f}s ({rate:,.0f} MB of tars/s){reused}{warn}"
        )


def _run_index_tasks(tasks: list[IndexTask], jobs: int, progress: bool) -> list[dict[str, Any]]:
    """Index tars on ``jobs`` processes (in-process for one); first failure raised after the rest."""
    from tqdm import tqdm

    from dcdb import errors, parallel

    failure = None
    with tqdm(
        total=len(tasks), unit="tar", desc="index shards", file=sys.stderr, disable=not progress
    ) as bar:
        results = list(parallel.map(_index_one, tasks, jobs, progress=lambda task, result: bar.update(1)))
    for r in results:
        if not r["ok"] and failure is None:
            failure = r
    if failure is not None:
        cls = getattr(errors, failure["error"], DcdbError)
        resume = "re-run the same command: tars already indexed are kept"
        raise cls(failure["message"], hint=f"{failure['hint']}; {resume}" if failure["hint"] else resume)
    return [r["report"] for r in results]


def _make_index_dir(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShardIndexError(
            f"cannot write the shard index in {str(d)!r}: {exc}", hint="check the pool's permissions"
        ) from exc


def index_shards(
    pool_path: str | os.PathLike,
    shards_dir: str | os.PathLike,
    *,
    jobs: int = 2,
    progress: bool = False,
    log: Log | None = None,
) -> IndexReport:
    """Index the img2dataset shards in ``shards_dir`` into the complete pool ``pool_path``.

    Resumable: tars whose per-tar index file matches their current size/mtime (and their parquet
    and stats files) are not read again; a re-run after an interruption finishes the rest.
    Warnings (missing ``_stats.json`` or parquet, damaged tars) go to ``log`` (stderr by default)
    and into the manifest.
    """
    from dcdb.store import open_pool

    log = log or _stderr
    if jobs < 1:
        raise UsageError(f"jobs must be at least 1, got {jobs}", hint="pass -j N with N >= 1, or leave it out")
    t0 = time.perf_counter()
    pool = open_pool(pool_path)
    tars = list_tars(shards_dir)
    shards_dir = Path(shards_dir).expanduser().resolve()
    out_dir, stage = pool.path / INDEX_DIR, pool.path / STAGE_DIR
    made = [d for d in (pool.path / SHARDS_DIR, stage) if not d.exists()]
    _make_index_dir(stage)
    for p in stage.iterdir():  # temp files of a killed run
        if TMP_MARK in p.name:
            p.unlink(missing_ok=True)
    # Fresh per-tar files go to the staging folder: the index in place (if any) stays whole and
    # valid until this run is accepted (its uids are the pool's) and the files are moved in.
    reused, tasks, where = {}, [], {}
    for tar in tars:
        signature = shard_signature(TarFiles(tar))
        for path in (_index_path(pool.path, tar), stage / f"{tar.stem}.parquet"):
            stored = _stored_report(path)
            if stored is not None and stored.get("signature") == signature:
                reused[tar.name], where[tar.name] = stored, path
                break
        else:
            where[tar.name] = stage / f"{tar.stem}.parquet"
            tasks.append(IndexTask(str(tar.resolve()), str(where[tar.name])))
    fresh = {r["tar"]: r for r in _run_index_tasks(tasks, jobs, progress)}
    reports = [reused.get(t.name) or fresh[t.name] for t in tars]
    warnings = [w for r in reports for w in r["warnings"]]
    try:
        warnings += _check_pool_uids(pool, [where[t.name] for t in tars], shards_dir)
    except DcdbError:
        shutil.rmtree(stage, ignore_errors=True)
        for d in reversed(made):  # nothing written: folders this run made go again
            if d.exists() and not any(d.iterdir()):
                d.rmdir()
        raise
    for w in warnings[:20]:
        log(f"warning: {w}")
    if len(warnings) > 20:
        log(f"warning: ... and {len(warnings) - 20} more (see {INDEX_MANIFEST} in the pool)")
    _make_index_dir(out_dir)
    (pool.path / INDEX_MANIFEST).unlink(missing_ok=True)  # incomplete until rewritten
    for tar in tars:
        if where[tar.name].parent == stage:
            os.replace(where[tar.name], _index_path(pool.path, tar))
    _remove_stale(pool.path, tars)
    _write_manifest(pool.path, shards_dir, reports)
    shutil.rmtree(stage, ignore_errors=True)
    return IndexReport(
        pool=str(pool.path),
        shards_dir=str(shards_dir),
        tars=len(tars),
        samples=sum(r["samples"] for r in reports),
        failed=sum(r["failed"] for r in reports),
        corrupt=sum(r["corrupt"] for r in reports),
        reused=len(reused),
        seconds=time.perf_counter() - t0,
        bytes_indexed=sum(fresh[n]["signature"]["tar"][0] for n in fresh),
        warnings=warnings,
    )


def _check_pool_uids(pool, files: list[Path], shards_dir: Path) -> list[str]:
    """The shards must be of this pool: SourceError when none of their uids is in it, a warning
    (returned) with the counts when some are not."""
    import duckdb

    from dcdb.sqltext import parquet_list

    con = duckdb.connect(":memory:")
    try:
        indexed, known, example = con.execute(
            f"SELECT count(*), count(m.uid), any_value(i.uid) FILTER (WHERE m.uid IS NULL) "
            f"FROM (SELECT DISTINCT uid FROM read_parquet({parquet_list(files)}) WHERE uid IS NOT NULL) AS i "
            f"LEFT JOIN (SELECT DISTINCT uid FROM read_parquet({parquet_list(pool.metadata_files())})) AS m "
            f"ON i.uid = m.uid"
        ).fetchone()
    except duckdb.Error as exc:
        raise ShardIndexError(f"cannot compare the shards' uids with the pool's: {exc}",
                              hint="re-run the command; if it fails again, re-ingest the pool") from None
    finally:
        con.close()
    if indexed and not known:
        raise SourceError(
            f"none of the {indexed:,} uids in the shards of {str(shards_dir)!r} is in pool {str(pool.path)!r} "
            f"(e.g. {example}): the shards belong to another pool",
            hint="give the pool ingested from these shards' metadata (--pool); nothing was written",
        )
    if known < indexed:
        return [f"{indexed - known:,} of {indexed:,} uids in the shards are not in the pool (e.g. {example}); "
                f"the resharder can select only the {known:,} that are"]
    return []


def _remove_stale(pool: Path, tars: list[Path]) -> None:
    """Drop temp files of a killed run and per-tar files of tars no longer in the shards folder."""
    keep = {f"{t.stem}.parquet" for t in tars}
    for p in (pool / INDEX_DIR).iterdir():
        if TMP_MARK in p.name or (p.suffix == ".parquet" and p.name not in keep):
            p.unlink(missing_ok=True)


def _write_manifest(pool: Path, shards_dir: Path, reports: list[dict[str, Any]]) -> None:
    write_json(
        pool / INDEX_MANIFEST,
        {
            "format": INDEX_FORMAT,
            "format_version": INDEX_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "shards_dir": str(shards_dir),
            "samples": sum(r["samples"] for r in reports),
            "failed": sum(r["failed"] for r in reports),
            "corrupt": sum(r["corrupt"] for r in reports),
            "tars": reports,
        },
    )


# ------------------------------------------------------------------------------ reading it


@dataclass
class ShardIndex:
    """A complete shard index of a pool: the shards folder and one report per tar (in order)."""

    pool: Path
    manifest: dict[str, Any]
    shards_dir: Path

    @property
    def tars(self) -> list[dict[str, Any]]:
        return list(self.manifest["tars"])

    def tar_path(self, name: str) -> Path:
        return self.shards_dir / name

    def index_file(self, name: str) -> Path:
        return self.pool / INDEX_DIR / f"{Path(name).stem}.parquet"

    def check_fresh(self, names: list[str] | None = None) -> None:
        """Raise ShardIndexError if a tar changed (size or mtime) or vanished since indexing."""
        by_name = {r["tar"]: r for r in self.manifest["tars"]}
        changed = []
        for name in names if names is not None else list(by_name):
            want = by_name[name]["signature"]["tar"]
            have = file_signature(self.tar_path(name))
            if have != want:
                changed.append((name, want, have))
        if changed:
            name, want, have = changed[0]
            what = (
                "is missing"
                if have is None
                else f"changed since it was indexed (size {want[0]:,} -> {have[0]:,} bytes, "
                f"mtime {_when(want[1])} -> {_when(have[1])})"
            )
            more = f" (and {len(changed) - 1} more tars)" if len(changed) > 1 else ""
            raise ShardIndexError(
                f"the shard index of pool {str(self.pool)!r} is out of date: "
                f"{str(self.tar_path(name))!r} {what}{more}",
                hint=f"re-index it with `dcdb index-shards {self.shards_dir} --pool {self.pool}` "
                f"(unchanged tars are not read again)",
            )

    def new_tars(self) -> list[Path]:
        """Tars in the shards folder that the index does not know (added since indexing)."""
        known = {r["tar"] for r in self.manifest["tars"]}
        return sorted(p for p in self.shards_dir.glob("*.tar") if p.name not in known)


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="seconds")


def open_index(pool, shards_dir: str | os.PathLike | None = None) -> ShardIndex:
    """The shard index of ``pool`` (a Pool or path); ShardIndexError if it has none.

    ``shards_dir`` overrides where the tars are now (default: the folder that was indexed).
    """
    from dcdb.store import Pool, open_pool

    p = pool if isinstance(pool, Pool) else open_pool(pool)
    path = p.path / INDEX_MANIFEST
    if not path.is_file():
        partial = (p.path / INDEX_DIR).is_dir()
        raise ShardIndexError(
            f"pool {str(p.path)!r} has {'an unfinished' if partial else 'no'} shard index",
            hint="index the downloaded shards with `dcdb index-shards DOWNLOAD/shards --pool POOL` "
            "(or `dcdb ingest SRC POOL --shards DOWNLOAD/shards`), or reshard without the pool: "
            "`dcdb reshard --shards DOWNLOAD/shards ...`",
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ShardIndexError(
            f"shard index manifest {str(path)!r} is unreadable: {exc}", hint="re-run `dcdb index-shards`"
        ) from exc
    if manifest.get("format") != INDEX_FORMAT or manifest.get("format_version") != INDEX_VERSION:
        raise ShardIndexError(
            f"{str(path)!r} is not a shard index this dcdb reads", hint="re-run `dcdb index-shards`"
        )
    where = Path(shards_dir).expanduser().resolve() if shards_dir else Path(manifest["shards_dir"])
    if not where.is_dir():
        raise ShardIndexError(
            f"the shards folder {str(where)!r} indexed in pool {str(p.path)!r} does not exist any more",
            hint="pass --shards with the folder's new location, or re-index",
        )
    return ShardIndex(pool=p.path, manifest=manifest, shards_dir=where)


def index_files(pool) -> list[Path]:
    """The per-tar index parquet files of a complete shard index, in tar order ([] if none)."""
    from dcdb.store import Pool

    root = pool.path if isinstance(pool, Pool) else Path(pool)
    try:
        manifest = json.loads((root / INDEX_MANIFEST).read_text())
    except (OSError, ValueError):
        return []
    return [root / INDEX_DIR / f"{Path(r['tar']).stem}.parquet" for r in manifest.get("tars", [])]


def view_sql(pool) -> str | None:
    """``CREATE VIEW shard_index ...`` over a pool's shard index, or None when it has none."""
    files = index_files(pool)
    if not files:
        return None
    paths = ", ".join("'" + str(f.resolve()).replace("'", "''") + "'" for f in files)
    return f"CREATE VIEW {VIEW_NAME} AS SELECT * FROM read_parquet([{paths}])"
