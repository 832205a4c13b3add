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

Tars are read with a small USTAR/pax reader working on ``os.pread``: headers and json members
only, never the image bytes. A damaged header is skipped by resynchronising on the next valid
header, so one bad block costs the samples it touches, not the rest of the tar (Python's
``tarfile`` silently stops at the first bad header after the first member).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dcdb.errors import DcdbError, ShardIndexError, SourceError, UsageError
from dcdb.io import TMP_MARK, atomic_path, write_json

INDEX_FORMAT = "dcdb-shard-index"
INDEX_VERSION = 1
SHARDS_DIR = "shards"  # POOL/shards/
INDEX_DIR = "shards/index"  # POOL/shards/index/<tar stem>.parquet
INDEX_MANIFEST = "shards/index.json"
STAGE_DIR = "shards/index.new"  # per-tar files of a run, moved into INDEX_DIR once the run is accepted
FOOTER_KEY = b"dcdb.shard_index"
VIEW_NAME = "shard_index"

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
RESYNC_CHUNK = 1 << 16
# webdataset's base_plus_ext: the key is the path up to the first dot of the file name.
KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
UID_RE = re.compile(r"^[0-9a-f]{32}$")
REGULAR_TYPES = (b"0", b"\0", b"7")
PAX_TYPES = (b"x", b"X")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LOST_STATUS = "missing_from_tar"  # status of a parquet "success" row whose sample the tar lacks

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- tar reading


class TarHeaderError(ValueError):
    """A 512-byte block that is not a valid tar header (bad checksum, bad number field)."""


def pad(size: int) -> int:
    """``size`` rounded up to a whole number of 512-byte blocks."""
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _number(field: bytes) -> int:
    """A tar number field: NUL/space-terminated octal, or GNU base-256 (first byte 0x80/0xff)."""
    if field[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(field[1:], "big")
        return n - (256 ** (len(field) - 1)) if field[0] == 0xFF else n
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarHeaderError(f"bad number field {bytes(field)!r}") from None


def _checksum_ok(block: bytes) -> bool:
    stored = _number(block[148:156])
    unsigned = sum(block) - sum(block[148:156]) + 256
    if stored == unsigned:
        return True
    signed = (
        sum(b - 256 if b > 127 else b for b in block)
        - sum(b - 256 if b > 127 else b for b in block[148:156])
        + 256
    )
    return stored == signed


def parse_header(block: bytes) -> tuple[bytes, int, bytes]:
    """(name, size, typeflag) of a 512-byte tar header; TarHeaderError if it is not one."""
    if len(block) < BLOCK:
        raise TarHeaderError("truncated header")
    if not _checksum_ok(block):
        raise TarHeaderError("bad header checksum")
    name = block[0:100].split(b"\0", 1)[0]
    if block[257:265] == b"ustar\x0000":  # POSIX ustar: a long name is split into prefix/name
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    size = _number(block[124:136])
    if size < 0:
        raise TarHeaderError(f"negative member size {size}")
    return name, size, block[156:157]


def _pax_path(data: bytes) -> bytes | None:
    """The ``path`` record of a pax extended header ("<len> path=<value>\\n" records)."""
    if b" path=" not in data:  # most pax headers (tarfile's, webdataset's) hold only an mtime
        return None
    pos, found = 0, None
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        record = data[space + 1 : pos + length - 1]
        k, _, v = record.partition(b"=")
        if k == b"path":
            found = v
        pos += length
    return found


@dataclass(slots=True)
class Member:
    """A regular file member: its name, where its headers start, where its data is, its size."""

    name: str
    start: int  # first header block (pax/longname headers included)
    offset: int  # data
    size: int

    @property
    def end(self) -> int:
        return self.offset + pad(self.size)


@dataclass(slots=True)
class Damage:
    """Something wrong at ``offset``: a bad header, a truncated member or header, or a missing
    end-of-archive marker; ``fatal`` when nothing after it could be read."""

    offset: int
    reason: str
    fatal: bool
    name: str | None = None  # the member it hit, when known
    harmless: bool = False  # only the end-of-archive marker is missing: every member is whole


def _resync(fd: int, start: int, file_size: int) -> int | None:
    """Offset of the first valid, non-empty header block at or after ``start`` (block-aligned)."""
    pos = start
    while pos + BLOCK <= file_size:
        chunk = os.pread(fd, min(RESYNC_CHUNK, file_size - pos), pos)
        for i in range(0, len(chunk) - BLOCK + 1, BLOCK):
            block = chunk[i : i + BLOCK]
            if block != ZERO_BLOCK:
                try:
                    parse_header(block)
                    return pos + i
                except TarHeaderError:
                    pass
        pos += len(chunk) - len(chunk) % BLOCK or BLOCK
    return None


class WindowReader:
    """``pread(n, offset)`` of one file through a read-ahead window: reads that fall in the last
    window are served from memory, others read a new window of ``window`` bytes from their offset
    (larger reads go straight to the file). For walking a tar whose data is wanted too: a member
    of a few kB costs a slice instead of three system calls."""

    def __init__(self, fd: int, file_size: int, window: int = 1 << 20):
        self.fd, self.file_size, self.window = fd, file_size, window
        self.start, self.buf = 0, b""

    def __call__(self, n: int, offset: int) -> bytes:
        at = offset - self.start
        if 0 <= at and at + n <= len(self.buf):
            return self.buf[at : at + n]
        if n >= self.window:
            return os.pread(self.fd, n, offset)
        self.start, self.buf = offset, os.pread(self.fd, max(0, min(self.window, self.file_size - offset)), offset)
        return self.buf[:n]


def walk_tar(fd: int, file_size: int, pread: Callable[[int, int], bytes] | None = None) -> Iterator[Member | Damage]:
    """The regular members of a tar (read with pread: headers only), and any damage met.

    Stops at the end-of-archive block. A bad header yields a Damage and reading resumes at the
    next valid header; a member whose data runs past the end of the file yields a fatal Damage.
    ``pread(n, offset)`` reads the file (default ``os.pread`` on ``fd``; a :class:`WindowReader`
    when the data will be read as well).
    """
    if pread is None:
        def pread(n: int, offset: int) -> bytes:
            return os.pread(fd, n, offset)
    off, start, long_name = 0, None, None
    while True:
        block = pread(BLOCK, off) if off < file_size else b""
        if not block:
            yield Damage(
                off, "the tar ends without an end-of-archive marker (truncated?)", fatal=False, harmless=True
            )
            return
        if len(block) < BLOCK:
            yield Damage(off, f"truncated header at byte {off}", fatal=True)
            return
        if block == ZERO_BLOCK:
            return
        try:
            name, size, typ = parse_header(block)
        except TarHeaderError as exc:
            nxt = _resync(fd, off + BLOCK, file_size)
            yield Damage(off, f"{exc} at byte {off}", fatal=nxt is None)
            if nxt is None:
                return
            off, start, long_name = nxt, None, None
            continue
        data_off = off + BLOCK
        if data_off + size > file_size:
            shown = (long_name or name).decode("utf-8", "surrogateescape")
            reason = f"member {shown!r} truncated: {size} bytes at {data_off}, the file ends at {file_size}"
            yield Damage(off, reason, fatal=True, name=shown)
            return
        if start is None:
            start = off
        if typ in PAX_TYPES:
            long_name = _pax_path(pread(size, data_off)) or long_name
        elif typ == b"L":
            long_name = pread(size, data_off).split(b"\0", 1)[0]
        elif typ == b"g":
            pass  # global pax header: nothing per member
        else:
            if typ in REGULAR_TYPES:
                yield Member((long_name or name).decode("utf-8", "surrogateescape"), start, data_off, size)
            start, long_name = None, None
        off = data_off + pad(size)


def split_key(name: str) -> tuple[str | None, str]:
    """webdataset's (key, extension) of a member name; (None, "") when it has no extension."""
    m = KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else (None, "")


# ------------------------------------------------------------------------------ sample rows


@dataclass
class Sample:
    """Consecutive members sharing a key: one webdataset sample."""

    key: str
    members: list[tuple[str, Member]] = field(default_factory=list)  # (ext, member)
    damage: str | None = None

    @property
    def start(self) -> int:
        return self.members[0][1].start

    @property
    def end(self) -> int:
        return self.members[-1][1].end


def group_samples(items: Iterator[Member | Damage], damages: list[Damage]) -> Iterator[Sample]:
    """Group members into samples as webdataset does (a new key, or a repeated extension, starts
    a new sample). The samples on both sides of a damaged stretch are marked damaged."""
    current: Sample | None = None
    taint: str | None = None
    for item in items:
        if isinstance(item, Damage):
            damages.append(item)
            hit = split_key(item.name)[0] if item.name is not None else None
            if not item.harmless:
                if current is not None and (hit is None or hit == current.key):
                    current.damage = current.damage or item.reason
                taint = item.reason
            continue
        key, ext = split_key(item.name)
        if key is None:
            continue
        ext = ext.lower()
        if taint is not None and current is not None and key == current.key:
            taint = None  # reading resumed inside the damaged sample: the next one is whole
        if current is None or key != current.key or any(e == ext for e, _ in current.members):
            if current is not None:
                yield current
            current = Sample(key, damage=taint)
            taint = None
        current.members.append((ext, item))
    if current is not None:
        yield current


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


def file_signature(path: Path) -> list[int] | None:
    """[size, mtime_ns] of a file, or None if it does not exist."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def shard_signature(files: TarFiles) -> dict[str, list[int] | None]:
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

    from dcdb.engine import parquet_list

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
