"""``dcdb reshard``: the samples of a uid list -> new webdataset shards in DataComp's layout.

Output (OUT), as DataComp's ``resharder.py`` writes it and its ``train.py`` reads it (DESIGN §3):

* ``%08d.tar``: at most ``shard_size`` samples and at most 3 GB each (``max_shard_bytes``);
  sample keys ``f"{uid}-{j}"`` for the j-th copy of a uid (a uid listed k times in the subset is
  written k times); every member of the input sample kept, named ``<key>.<ext>`` (extension
  lower-cased, members in extension order, USTAR headers with webdataset's ``TarWriter`` defaults
  and mtime 0);
* ``%08d_stats.json``: ``{"successes": n}`` per tar;
* ``sample_ids.npy``: the subset (sorted ``u8,u8``); ``missing_uids.npy``: the copies of selected
  uids that were not written (never downloaded, unknown to the shards, or corrupt), sorted, so
  that written + missing = the subset;
* ``meta.json``: arguments and counts, including ``output_shard_count`` and
  ``output_shard_format`` (what DataComp's ``train.py`` reads), ``processed_count`` and
  ``output_count``.

**Order.** Samples are written in input order: input tars in file-name order, samples in their
order inside each tar, the copies of a uid next to each other (``uid-0``, ``uid-1``, ...). With
``shuffle_seed`` the same sequence is permuted by ``numpy.random.default_rng(seed)``. The plan
(which sample goes to which output tar) is made before anything is written, so the output is
byte-identical whatever ``jobs`` is, and the same from ``--pool`` (shard index) and ``--shards``
(scan) mode.

**Reading only what is selected.** With a pool, the shard index (``dcdb.shards.index``) gives each
sample's byte range; a worker reads the ranges of its output tar's samples with ``os.pread``,
merging ranges less than 16 KiB apart into one read (at most 8 MiB), so the bytes read grow with
the selection, not the pool. Without a pool the tars' headers and json members are walked first
(the same reader as the index, in parallel), then the selected ranges are read the same way.

**Resumable.** Each output tar is written under a temporary name and renamed when complete, then
its stats file; OUT/.dcdb-reshard.json (a ``dcdb.parallel.LedgerFile``) records the plan's
fingerprint and a completion marker per finished tar (its size and its stats file's). A
killed run re-run with the same arguments keeps the finished tars and writes the rest; ``jobs`` may
differ. A non-empty OUT that is not an unfinished (or finished) run of the same plan is refused
unless ``overwrite``; nothing is deleted before every argument has been checked and the plan made.

**Blurring** (``blur``): the ``face_bboxes`` of a sample (pool metadata first, else the sample's
json) are blurred as DataComp does (img2dataset's ``BoundingBoxBlurrer``: each box grown by 10 % of
its longest side, one Gaussian of sigma = 0.1 x the longest box side applied to the image and to
the box mask, image = mix by the blurred mask), re-encoded as ``.webp`` (quality 100) replacing the
image member, and the boxes written into the json. Unlike DataComp the mix is rounded, not
truncated, so pixels far from every box keep their value before encoding.

Bad samples (a damaged header, a truncated member, an undecodable image when blurring) are
skipped and counted; ``strict`` makes them an error.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dcdb import parallel
from dcdb import uids as U
from dcdb.errors import DcdbError, OutputError, ReshardError, UsageError, WorkerError
from dcdb.io import (LOCK_NAME, TMP_MARK, atomic_path, kill_point, prepare_folder, write_error, write_json,
                     write_lock, write_target, writing)
from dcdb.shards.index import IMAGE_EXTS, LOST_STATUS
from dcdb.tario import BLOCK, RECORD, TarNameError, TarRangeError, TarWriter, pad, range_members, split_key

OUTPUT_SHARD_FORMAT = "{:08d}.tar"
OUTPUT_STATS_FORMAT = "{:08d}_stats.json"
MAX_SHARD_BYTES = 3_000_000_000  # DataComp's ShardWriter maxsize
DEFAULT_SHARD_SIZE = 10_000
STATE_FILE = ".dcdb-reshard.json"
STATE_FORMAT = "dcdb-reshard-state"
META_FORMAT = "dcdb-reshard"
PLAN_VERSION = 1
COALESCE_GAP = 16 << 10  # merge reads of samples less than this far apart
MAX_READ = 8 << 20  # ... into reads of at most this many bytes
TAR_TAIL = 2 * BLOCK + RECORD  # end-of-archive blocks + worst-case record padding
WEBP_QUALITY = 100  # DataComp's --reencode-webp-quality default
OUR_FILES = ("sample_ids.npy", "missing_uids.npy", "meta.json", STATE_FILE)
COMPLETE = "meta.json"  # the marker of the run's last step (ids, missing ids, meta.json)
_OUR_NAME = re.compile(r"\d{8}(\.tar|_stats\.json)")  # OUTPUT_SHARD_FORMAT, OUTPUT_STATS_FORMAT

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """The subset: sorted uids (duplicates kept), its distinct uids and their counts."""

    uids: np.ndarray
    unique: np.ndarray
    counts: np.ndarray
    source: str | None
    sha256: str


def load_selection(subset: str | os.PathLike | np.ndarray, warn: Log = _stderr) -> Selection:
    """Read a uid list (``.npy`` or raw 16-byte records) or take an array; sort it if needed.

    DataComp's resharder binary-searches the file as given, so an unsorted file silently loses
    matches; here it is sorted and a warning says so.
    """
    if isinstance(subset, np.ndarray):
        arr, source = U.check_dtype(subset), None
        name = "the uid array"
    else:
        arr, source = U.load(subset), str(subset)
        name = f"uid file {str(subset)!r}"
    if not U.is_sorted(arr):
        warn(
            f"warning: {name} is not sorted by uid; sorted it (DataComp's resharder would have "
            f"silently dropped matches)"
        )
        arr = U.sort(arr)
    if len(arr) == 0:
        warn(f"warning: {name} is empty: no shards will be written")
    unique, counts = np.unique(arr, return_counts=True)
    return Selection(arr, unique, counts, source, hashlib.sha256(arr.tobytes()).hexdigest())


def match(sorted_unique: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Index of each query uid in ``sorted_unique`` (distinct, sorted uids), or -1.

    Binary search on the high 64 bits (uids are random: they almost never repeat), then the low
    64 bits decide; the rare high-half ties are searched one by one.
    """
    out = np.full(len(query), -1, dtype=np.int64)
    if not len(query) or not len(sorted_unique):
        return out
    hi, lo = sorted_unique["f0"], sorted_unique["f1"]
    left = np.searchsorted(hi, query["f0"], "left")
    right = np.searchsorted(hi, query["f0"], "right")
    one = np.flatnonzero(right - left == 1)
    ok = lo[left[one]] == query["f1"][one]
    out[one[ok]] = left[one[ok]]
    for i in np.flatnonzero(right - left > 1):
        a, b = int(left[i]), int(right[i])
        k = a + int(np.searchsorted(lo[a:b], query["f1"][i]))
        if k < b and lo[k] == query["f1"][i]:
            out[i] = k
    return out


# -------------------------------------------------------------------------------- locating


@dataclass
class Located:
    """The selected samples found in the input tars, in input order, and what was not found."""

    tars: list[str]  # tar paths; tar_idx points here
    tar_signatures: list[Any]
    uid: np.ndarray  # distinct uids found (UID_DTYPE)
    tar_idx: np.ndarray  # int32
    offset: np.ndarray  # int64: first header of the sample
    length: np.ndarray  # int64: bytes of its members
    copies: np.ndarray  # int64: times it is listed in the subset
    boxes: dict[int, list[list[float]]]  # located row -> face boxes to blur (only with blur)
    est: np.ndarray  # int64: upper bound of the sample's bytes in the output tar
    not_downloaded: np.ndarray  # distinct selected uids known only as failed downloads
    unknown: np.ndarray  # distinct selected uids in no tar and no shard parquet
    corrupt: np.ndarray  # distinct selected uids whose only copies are damaged in the tars
    duplicates: int  # extra copies of selected uids in the tars (the first one is used)
    scanned: int  # input samples examined


class _Locator:
    """Accumulates, tar by tar, the index rows of selected uids (first good copy wins)."""

    def __init__(self, sel: Selection, blur: bool):
        n = len(sel.unique)
        self.sel, self.blur = sel, blur
        self.found, self.failed, self.bad = (np.zeros(n, bool) for _ in range(3))
        self.parts: list[dict[str, Any]] = []
        self.duplicates = 0
        self.scanned = 0

    def add(self, tar_idx: int, table) -> None:
        """Take one tar's index rows (a pyarrow table with the shard index schema)."""
        import pyarrow.compute as pc

        uid_col = table.column("uid")
        valid = pc.is_valid(uid_col).to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(valid)
        if not len(rows):
            return
        m = match(self.sel.unique, U.from_arrow(uid_col.filter(pa_bool(valid)), source="shard index"))
        hit = m >= 0
        rows, m = rows[hit], m[hit]
        if not len(rows):
            return
        downloaded = table.column("downloaded").to_numpy(zero_copy_only=False)[rows].astype(bool)
        clean = pc.is_null(table.column("error")).to_numpy(zero_copy_only=False)[rows]
        lost = pc.fill_null(pc.equal(table.column("status"), LOST_STATUS), False)
        lost = lost.to_numpy(zero_copy_only=False)[rows].astype(bool)
        self.failed[m[~downloaded & ~lost]] = True
        self.bad[m[(downloaded & ~clean) | (~downloaded & lost)]] = True
        good = downloaded & clean
        rows, m = rows[good], m[good]
        _, first = np.unique(m, return_index=True)
        first.sort()
        keep = first[~self.found[m[first]]]
        self.duplicates += len(m) - len(keep)
        rows, m = rows[keep], m[keep]
        if not len(rows):
            return
        self.found[m] = True
        self.parts.append(self._part(tar_idx, table, rows, m))

    def _part(self, tar_idx: int, table, rows: np.ndarray, m: np.ndarray) -> dict[str, Any]:
        part = {
            "tar_idx": np.full(len(rows), tar_idx, np.int32),
            "offset": table.column("byte_offset").to_numpy(zero_copy_only=False)[rows].astype(np.int64),
            "length": table.column("byte_length").to_numpy(zero_copy_only=False)[rows].astype(np.int64),
            "sel": m,
        }
        if self.blur:
            taken = table.select(["members", "width", "height", "face_bboxes"]).take(rows).to_pylist()
            part["extra"] = taken
        return part

    def count_scanned(self, table) -> None:
        self.scanned += int(table.column("downloaded").to_numpy(zero_copy_only=False).sum())

    def result(self, tars: list[str], signatures: list[Any], pool_boxes: dict[int, list] | None) -> Located:
        cat = lambda k, dt: np.concatenate([p[k] for p in self.parts]) if self.parts else np.empty(0, dt)
        sel_idx = cat("sel", np.int64)
        length = cat("length", np.int64)
        boxes: dict[int, list[list[float]]] = {}
        est = length.copy()
        if self.blur:
            extras = [e for p in self.parts for e in p["extra"]]
            for i, (s, extra) in enumerate(zip(sel_idx.tolist(), extras)):
                b = _valid_boxes((pool_boxes or {}).get(s)) or _valid_boxes(extra["face_bboxes"])
                if b:
                    boxes[i] = b
                    est[i] = blurred_size_bound(extra, b)
        missing = ~self.found
        return Located(
            tars=tars,
            tar_signatures=signatures,
            uid=self.sel.unique[sel_idx],
            tar_idx=cat("tar_idx", np.int32),
            offset=cat("offset", np.int64),
            length=length,
            copies=self.sel.counts[sel_idx].astype(np.int64),
            boxes=boxes,
            est=est,
            corrupt=self.sel.unique[missing & self.bad],
            not_downloaded=self.sel.unique[missing & ~self.bad & self.failed],
            unknown=self.sel.unique[missing & ~self.bad & ~self.failed],
            duplicates=self.duplicates,
            scanned=self.scanned,
        )


def pa_bool(mask: np.ndarray):
    import pyarrow as pa

    return pa.array(mask, type=pa.bool_())


def _valid_boxes(boxes: Any) -> list[list[float]] | None:
    """Boxes as lists of 4 floats, or None when there are none (malformed boxes are dropped)."""
    if not boxes:
        return None
    out = [[float(v) for v in b] for b in boxes if b is not None and len(b) == 4]
    return out or None


def blurred_size_bound(extra: dict[str, Any], boxes: list[list[float]]) -> int:
    """Upper bound of a sample's output bytes once its image is re-encoded as webp and its json
    rewritten: a webp is at most ~4 bytes per pixel plus headers; the json at most doubles (the
    input may be compact) plus the boxes."""
    total = 0
    width, height = extra.get("width") or 0, extra.get("height") or 0
    image = next((m for m in extra["members"] if m["ext"] in IMAGE_EXTS), None)
    for m in extra["members"]:
        size = m["size"]
        if m is image:
            size = 4 * width * height + (1 << 16) if width and height else max(64 << 20, 8 * size)
        elif m["ext"] == "json":
            size = 2 * size + len(json.dumps(boxes)) + 64
        total += BLOCK + pad(size)
    return total


def locate_in_index(index, sel: Selection, blur: bool, pool_boxes: dict[int, list] | None) -> Located:
    """Find the selected uids through a pool's shard index (reads index files, not tars)."""
    import pyarrow.parquet as pq

    cols = ["uid", "downloaded", "status", "error", "byte_offset", "byte_length"]
    if blur:
        cols += ["members", "width", "height", "face_bboxes"]
    index.check_fresh()
    loc = _Locator(sel, blur)
    tars = index.tars
    for i, report in enumerate(tars):
        path = index.index_file(report["tar"])
        try:
            table = pq.read_table(path, columns=cols)
        except Exception as exc:  # a damaged index file
            from dcdb.errors import ShardIndexError

            raise ShardIndexError(
                f"shard index file {str(path)!r} is unreadable: {exc}",
                hint=f"re-run `dcdb index-shards {index.shards_dir} --pool {index.pool}`",
            ) from exc
        loc.add(i, table)
    located = loc.result(
        [str(index.tar_path(r["tar"])) for r in tars], [r["signature"]["tar"] for r in tars], pool_boxes
    )
    located.scanned = len(located.uid)
    return located


def _scan_one(tar: str) -> dict[str, Any]:
    """Worker: walk one tar (headers and json only) into shard index rows."""
    from dcdb.shards.index import TarFiles, rows_table, scan_tar

    try:
        rows, report = scan_tar(TarFiles(Path(tar)))
        return {"ok": True, "table": rows_table(rows), "report": report}
    except DcdbError as exc:
        return {"ok": False, "error": type(exc).__name__, "message": exc.message, "hint": exc.hint}


def locate_by_scan(shards_dir, sel: Selection, blur: bool, jobs: int, progress: bool, warn: Log) -> Located:
    """Find the selected uids by walking every tar of ``shards_dir`` (no pool, no index)."""
    from tqdm import tqdm

    from dcdb.shards.index import list_tars

    tars = list_tars(shards_dir)
    loc = _Locator(sel, blur)
    signatures, warnings = [], []
    with tqdm(total=len(tars), unit="tar", desc="scan shards", file=sys.stderr, disable=not progress) as bar:
        for i, result in enumerate(_map(_scan_one, [str(t) for t in tars], jobs)):
            if not result["ok"]:
                _raise_worker_error(result, "fix or remove that tar, then re-run")
            loc.count_scanned(result["table"])
            loc.add(i, result["table"])
            signatures.append(result["report"]["signature"]["tar"])
            warnings += result["report"]["warnings"]
            bar.update(1)
    for w in warnings[:20]:
        warn(f"warning: {w}")
    if len(warnings) > 20:
        warn(f"warning: ... and {len(warnings) - 20} more warnings about the input shards")
    return loc.result([str(t) for t in tars], signatures, None)


def pool_face_boxes(pool, sel: Selection) -> dict[int, list]:
    """Selected uid (index into ``sel.unique``) -> its non-empty ``face_bboxes`` in the pool metadata."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out: dict[int, list] = {}
    for path in pool.metadata_files():
        if "face_bboxes" not in pq.ParquetFile(path).schema_arrow.names:
            return {}
        table = pq.read_table(path, columns=["uid", "face_bboxes"])
        lengths = pc.fill_null(pc.list_value_length(table.column("face_bboxes")), 0)
        table = table.filter(pc.greater(lengths, 0))
        if not table.num_rows:
            continue
        m = match(sel.unique, U.from_arrow(table.column("uid"), source=str(path)))
        for row in np.flatnonzero(m >= 0).tolist():
            out.setdefault(int(m[row]), table.column("face_bboxes")[row].as_py())
    return out


# -------------------------------------------------------------------------------- planning


@dataclass
class ShardTask:
    """One output tar to write (picklable): its samples in output order."""

    index: int
    out_dir: str
    tars: list[str]  # the input tars it reads
    tar_idx: list[int]  # per sample: index into ``tars``
    offset: list[int]
    length: list[int]
    keys: list[str]  # f"{uid}-{j}"
    boxes: dict[int, list[list[float]]]  # sample position -> boxes to blur
    strict: bool


@dataclass
class Plan:
    """Every output tar's samples, decided before writing; ``fingerprint`` identifies it."""

    located: Located
    src: np.ndarray  # output sample -> located row
    j: np.ndarray  # output sample -> copy number
    bounds: list[tuple[int, int]]  # output tar -> [start, end) in the output sequence
    fingerprint: str

    @property
    def output_samples(self) -> int:
        return len(self.src)

    def shard_samples(self, k: int) -> int:
        a, b = self.bounds[k]
        return b - a

    def task(self, k: int, out_dir: Path, strict: bool) -> ShardTask:
        a, b = self.bounds[k]
        loc, src = self.located, self.src[a:b]
        used, local = np.unique(loc.tar_idx[src], return_inverse=True)
        hexes = U.to_hex(loc.uid[src])
        boxes = {p: loc.boxes[r] for p, r in enumerate(src.tolist()) if r in loc.boxes} if loc.boxes else {}
        return ShardTask(
            index=k,
            out_dir=str(out_dir),
            tars=[loc.tars[t] for t in used.tolist()],
            tar_idx=local.tolist(),
            offset=loc.offset[src].tolist(),
            length=loc.length[src].tolist(),
            keys=[f"{h}-{j}" for h, j in zip(hexes, self.j[a:b].tolist())],
            boxes=boxes,
            strict=strict,
        )


def shard_bounds(est: np.ndarray, shard_size: int, max_bytes: int) -> list[tuple[int, int]]:
    """Cut the output sequence into tars of at most ``shard_size`` samples and ``max_bytes``
    bytes (from each sample's size bound; a single sample larger than that gets a tar alone)."""
    n = len(est)
    cum = np.concatenate([[0], np.cumsum(est, dtype=np.int64)])
    budget = max_bytes - TAR_TAIL
    bounds, start = [], 0
    while start < n:
        by_count = min(n, start + shard_size)
        by_bytes = int(np.searchsorted(cum, cum[start] + budget, "right")) - 1
        end = max(start + 1, min(by_count, by_bytes))
        bounds.append((start, end))
        start = end
    return bounds


def make_plan(
    located: Located, *, shard_size: int, max_bytes: int, shuffle_seed: int | None, blur: bool
) -> Plan:
    """Expand copies, order (input order or seeded shuffle), cut into tars, fingerprint."""
    copies = located.copies
    n_out = int(copies.sum())
    src = np.repeat(np.arange(len(copies), dtype=np.int64), copies)
    j = np.arange(n_out, dtype=np.int64) - np.repeat(np.cumsum(copies) - copies, copies)
    if shuffle_seed is not None:
        perm = np.random.default_rng(shuffle_seed).permutation(n_out)
        src, j = src[perm], j[perm]
    bounds = shard_bounds(located.est[src], shard_size, max_bytes)
    h = hashlib.sha256()
    config = {
        "version": PLAN_VERSION,
        "shard_size": shard_size,
        "max_bytes": max_bytes,
        "shuffle_seed": shuffle_seed,
        "blur": blur,
        "tars": [Path(t).name for t in located.tars],
        "signatures": located.tar_signatures,
        "bounds": bounds,
        "boxes": sorted((int(k), v) for k, v in located.boxes.items()),
    }
    h.update(json.dumps(config).encode())
    for arr in (located.uid[src], j, located.tar_idx[src], located.offset[src], located.length[src]):
        h.update(np.ascontiguousarray(arr).tobytes())
    return Plan(located, src, j, bounds, h.hexdigest())


# ----------------------------------------------------------------------------- tar reading


class SampleError(ValueError):
    """A sample's bytes are not a whole, well-formed group of tar members."""


def split_members(view: memoryview) -> list[tuple[str, Any]]:
    """The (extension, data) members of one sample's byte range, checked: valid headers, whole
    data, one key."""
    out, keys = [], set()
    try:
        for name, data in range_members(view):
            key, ext = split_key(name)
            if key is None:
                continue
            keys.add(key)
            out.append((ext.lower(), data))
    except TarRangeError as exc:
        raise SampleError(str(exc)) from None
    if len(keys) != 1:
        raise SampleError("the byte range does not hold exactly one sample")
    return out


def _runs(task: ShardTask) -> Iterator[tuple[int, int, int, int]]:
    """Coalesced reads (tar, start, end, first sample, last sample + 1) in output order."""
    n, t, off, ln = len(task.keys), task.tar_idx, task.offset, task.length
    i = 0
    while i < n:
        start, end, k = off[i], off[i] + ln[i], i + 1
        while (
            k < n
            and t[k] == t[i]
            and off[k] >= off[k - 1]
            and off[k] - end <= COALESCE_GAP
            and max(end, off[k] + ln[k]) - start <= MAX_READ
        ):
            end = max(end, off[k] + ln[k])
            k += 1
        yield t[i], start, end, i, k
        i = k


@dataclass
class ShardResult:
    """What writing one output tar did."""

    index: int
    samples: int
    bytes_written: int
    bytes_read: int
    blurred: int
    blur_seconds: float
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)


def _sample_views(task: ShardTask, result: ShardResult) -> Iterator[tuple[int, memoryview | None]]:
    """Each sample's bytes (None if the tar is shorter than the index says), read in runs."""
    fds: dict[int, int] = {}
    try:
        for t, start, end, a, b in _runs(task):
            if t not in fds:
                fds[t] = os.open(task.tars[t], os.O_RDONLY)
            buf = os.pread(fds[t], end - start, start)
            result.bytes_read += len(buf)
            view = memoryview(buf)
            for s in range(a, b):
                lo = task.offset[s] - start
                hi = lo + task.length[s]
                yield s, (view[lo:hi] if hi <= len(buf) else None)
    finally:
        for fd in fds.values():
            os.close(fd)


def write_shard(task: ShardTask) -> ShardResult:
    """Write output tar ``task.index`` (temp name, then rename) and its stats file.

    Members are written by :class:`dcdb.tario.TarWriter` without pax headers: a member name over
    100 bytes is refused."""
    out_dir = Path(task.out_dir)
    result = ShardResult(task.index, 0, 0, 0, 0, 0.0)
    with (
        atomic_path(out_dir / OUTPUT_SHARD_FORMAT.format(task.index)) as tmp,
        open(tmp, "wb", buffering=1 << 20) as f,
    ):
        tar = TarWriter(f, pax=False)
        for s, view in _sample_views(task, result):
            try:
                if view is None:
                    raise SampleError("the tar ends before the sample (truncated since indexing?)")
                members = split_members(view)
                if s in task.boxes:
                    t0 = time.perf_counter()
                    members = blur_members(members, task.boxes[s])
                    result.blurred += 1
                    result.blur_seconds += time.perf_counter() - t0
            except SampleError as exc:
                where = f"{task.tars[task.tar_idx[s]]} at byte {task.offset[s]}"
                if task.strict:
                    raise ReshardError(
                        f"sample {task.keys[s]} ({where}) is unreadable: {exc}",
                        hint="drop --strict to skip and count such samples, or re-download that shard",
                    ) from None
                result.corrupt.append((task.keys[s], f"{where}: {exc}"))
                continue
            try:
                for ext, data in sorted(members, key=lambda m: m[0]):
                    tar.add(f"{task.keys[s]}.{ext}", data)
            except TarNameError as exc:
                raise ReshardError(
                    f"member name {exc.name!r} is longer than 100 bytes",
                    hint="an input member has a very long extension; rename it",
                ) from None
            result.samples += 1
        tar.close()
        result.bytes_written = tar.bytes
    write_json(out_dir / OUTPUT_STATS_FORMAT.format(task.index), {"successes": result.samples})
    return result


# -------------------------------------------------------------------------------- blurring


def gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
    """OpenCV's getGaussianKernel(ksize, sigma) for sigma > 0."""
    x = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
    k = np.exp(-(x * x) / (2 * sigma * sigma))
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(a: np.ndarray, sigma: float, ksize: int) -> np.ndarray:
    """OpenCV's GaussianBlur(a, (ksize, ksize), sigma) on the first two axes of a float32 array,
    border BORDER_REFLECT_101 (numpy's 'reflect')."""
    if ksize <= 1 or sigma <= 0:
        return a.copy()
    k = gaussian_kernel(ksize, sigma)
    r = ksize // 2
    for axis in (0, 1):
        width = [(0, 0)] * a.ndim
        width[axis] = (r, r)
        padded = np.pad(a, width, mode="reflect")
        out = np.zeros_like(a)
        n = a.shape[axis]
        for i, w in enumerate(k):
            out += w * np.take(padded, np.arange(i, i + n), axis=axis)
        a = out
    return a


def blur_boxes(img: np.ndarray, boxes: list[list[float]]) -> np.ndarray:
    """img2dataset's BoundingBoxBlurrer (what DataComp applies), on a uint8 HxW[xC] array.

    Boxes are relative [x1, y1, x2, y2]; each is grown by 10 % of its longest side and clipped;
    image and box mask get one Gaussian blur of sigma = 0.1 x the longest side of any box; the
    result mixes image and blurred image by the blurred mask (rounded to uint8).
    """
    if not boxes:
        return img
    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.float32)
    longest = 0
    for x1, y1, x2, y2 in boxes:
        b = [int(x1 * w), int(y1 * h), int(x2 * w), int(y2 * h)]
        side = max(b[2] - b[0], b[3] - b[1])
        longest = max(longest, side)
        b = [int(b[0] - 0.1 * side), int(b[1] - 0.1 * side), int(b[2] + 0.1 * side), int(b[3] + 0.1 * side)]
        b = [
            min(max(b[0], 0), w - 1),
            min(max(b[1], 0), h - 1),
            min(max(b[2], 0), w - 1),
            min(max(b[3], 0), h - 1),
        ]
        mask[b[1] : b[3], b[0] : b[2]] = 1
    sigma = 0.1 * longest
    ksize = int(2 * np.ceil(4 * sigma)) + 1
    x = img.astype(np.float32) / 255.0
    blurred = gaussian_blur(x, sigma, ksize)
    m = gaussian_blur(mask, sigma, ksize)
    if x.ndim == 3:
        m = m[:, :, None]
    mixed = x * (1 - m) + blurred * m
    return np.clip(np.rint(mixed * 255.0), 0, 255).astype(np.uint8)


def blur_image_bytes(data, boxes: list[list[float]]) -> bytes:
    """Decode an image, blur its boxes, encode it as webp (quality 100, as DataComp)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # Pillow comes with dcdb[clip]
        raise ReshardError("--blur needs Pillow", hint="pip install 'dcdb[clip]' (or pillow)") from exc
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.load()
            if im.mode not in ("L", "RGB", "RGBA"):
                im = im.convert("RGB")
            arr = np.asarray(im)
            mode = im.mode
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SampleError(f"image cannot be decoded for blurring ({exc})") from None
    out = io.BytesIO()
    Image.fromarray(blur_boxes(arr, boxes), mode=mode).save(out, format="WEBP", quality=WEBP_QUALITY)
    return out.getvalue()


def blur_members(members: list[tuple[str, Any]], boxes: list[list[float]]) -> list[tuple[str, Any]]:
    """Blur the sample's image (its first jpg/jpeg/png/webp member) into a ``webp`` member that
    replaces it, and write the boxes into its json as ``face_bboxes``."""
    image = next((i for ext in IMAGE_EXTS for i, (e, _) in enumerate(members) if e == ext), None)
    if image is None:
        return members
    out = [m for i, m in enumerate(members) if i != image and m[0] != "webp"]
    out.append(("webp", blur_image_bytes(members[image][1], boxes)))
    for i, (ext, data) in enumerate(out):
        if ext == "json":
            try:
                obj = json.loads(bytes(data))
            except ValueError as exc:
                raise SampleError(f"unreadable .json ({exc})") from None
            if isinstance(obj, dict):
                obj["face_bboxes"] = boxes
                out[i] = ("json", json.dumps(obj).encode("utf-8"))
    return out


# ------------------------------------------------------------------------------ output dir


@dataclass
class OutState:
    """OUT before this run: missing, empty, holding a run (``state``: its plan fingerprint), or foreign."""

    path: Path
    exists: bool
    empty: bool
    state: str | None


def check_output_dir(out: str | os.PathLike, *, overwrite: bool) -> OutState:
    """Check OUT without changing anything: a folder (or creatable), and either empty, a run of
    dcdb reshard (decided later against the plan), or ``overwrite`` given."""
    path = prepare_folder(Path(out).expanduser(), create=False, hint="give a folder for the shards")
    if not path.exists():
        return OutState(path, False, True, None)
    entries = [p for p in path.iterdir() if TMP_MARK not in p.name and p.name != LOCK_NAME]
    for p in entries:  # what we would write or replace: regular files only (never read a FIFO either)
        if p.name in OUR_FILES or _OUR_NAME.fullmatch(p.name):
            write_target(p, what="output file")
    state = parallel.LedgerFile.scope_of(path / STATE_FILE, STATE_FORMAT)
    if entries and state is None and not overwrite:
        raise OutputError(
            f"output folder {str(path)!r} is not empty and holds no dcdb reshard run",
            hint="choose an empty folder, or pass --overwrite to replace its shards",
        )
    return OutState(path, True, not entries, state)


def _ledger(out: Path, plan: Plan) -> parallel.LedgerFile:
    """The run's markers (OUT/.dcdb-reshard.json): one per finished tar, keyed by its name."""
    return parallel.LedgerFile(out / STATE_FILE, kind=STATE_FORMAT, scope=plan.fingerprint, root=out)


def _prepare_output(st: OutState, plan: Plan, overwrite: bool) -> parallel.LedgerFile:
    """Create OUT, make sure it is writable, clear it if asked; the run's markers to continue from."""
    same = st.state == plan.fingerprint
    if not st.empty and not same and not overwrite:
        raise OutputError(
            f"output folder {str(st.path)!r} holds the output of a different reshard run "
            f"(other subset, inputs or arguments)",
            hint="choose an empty folder, or pass --overwrite to replace its shards",
        )
    prepare_folder(st.path, force=True, clear=None if same else _written_by_reshard,
                   hint="give a folder for the shards")
    for p in st.path.glob(f"*{TMP_MARK}*"):
        p.unlink(missing_ok=True)
    ledger = _ledger(st.path, plan)
    if same:
        return ledger
    ledger.clear()
    return ledger


def _written_by_reshard(p: Path) -> bool:
    """What --overwrite removes: what a resharder writes (tars, stats, ids, meta); nothing else."""
    return p.is_file() and (p.suffix == ".tar" or p.name.endswith("_stats.json") or p.name in OUR_FILES)


# --------------------------------------------------------------------------------- running


def _run_task(task: ShardTask) -> dict[str, Any]:
    """Worker entry point: errors travel back as data so the parent re-raises the same type."""
    kill_point(f"reshard-shard:{task.index}")
    try:
        return {"ok": True, "result": asdict(write_shard(task))}
    except Exception as exc:
        err = exc if isinstance(exc, DcdbError) else write_error(exc, task.out_dir, "output folder")
        if err is None:
            raise
        return {"ok": False, "error": type(err).__name__, "message": err.message, "hint": err.hint}


def _raise_worker_error(result: dict[str, Any], resume: str) -> None:
    from dcdb import errors

    cls = getattr(errors, result["error"], DcdbError)
    raise cls(result["message"], hint=f"{result['hint']}; {resume}" if result["hint"] else resume)


def _map(fn, items: list, jobs: int, window: int | None = None, engine: str = "local") -> Iterator[Any]:
    """``fn`` over ``items`` in order (dcdb.parallel): in this process for one job, else on ``jobs``
    spawned processes with at most ``window`` items in flight (bounded memory); on ``engine="ray"``
    (``_run_task`` only) as Ray tasks, at most twice the cluster's CPUs in flight."""
    if engine == "ray":
        return parallel.map(fn, items, jobs, window=window or 2 * parallel.workers(jobs, engine),
                            on_death=_ray_worker_died, engine=engine)
    return parallel.map(fn, items, jobs, window=window or 2 * jobs, on_death=_worker_died)


def _worker_died(task) -> WorkerError:
    return WorkerError(
        "a worker process died (killed, or out of memory)",
        hint="re-run the same command (with a smaller -j if memory is short): finished shards are kept",
    )


def _ray_worker_died(task: ShardTask) -> WorkerError:
    return WorkerError(
        f"a Ray worker died (killed, or out of memory) writing {OUTPUT_SHARD_FORMAT.format(task.index)}, "
        f"also each of the {parallel.RAY_MAX_RETRIES} times Ray retried it",
        hint="re-run the same command: finished shards are kept",
    )


# ---------------------------------------------------------------------------------- report


@dataclass
class ReshardReport:
    """What one ``reshard`` call did (counts cover the whole output, resumed shards included)."""

    out: str
    selected: int
    output_count: int
    output_shards: int
    processed: int
    missing: int
    not_downloaded: int
    unknown: int
    corrupt: int
    duplicates: int
    blurred: int
    bytes_read: int
    bytes_written: int
    seconds: float
    resumed_shards: int = 0
    already_complete: bool = False

    def summary(self) -> str:
        if self.already_complete:
            return (
                f"{self.out} already holds this reshard ({self.output_count:,} samples in "
                f"{self.output_shards} shards); nothing to do"
            )
        secs = max(self.seconds, 1e-9)
        missing = (
            f"{self.missing:,} missing: {self.not_downloaded:,} not downloaded, {self.unknown:,} not in "
            f"the shards, {self.corrupt:,} corrupt"
        )
        resumed = f", {self.resumed_shards} shards kept from an earlier run" if self.resumed_shards else ""
        blurred = f", {self.blurred:,} blurred" if self.blurred else ""
        return (
            f"resharded {self.output_count:,} of {self.selected:,} selected samples ({missing}{blurred}) "
            f"into {self.output_shards} shards in {self.out} in {self.seconds:.1f}s: "
            f"{self.output_count / secs:,.0f} samples/s, {self.bytes_read / 1e6 / secs:,.1f} MB/s read, "
            f"{self.bytes_written / 1e6 / secs:,.1f} MB/s written{resumed}"
        )


# ------------------------------------------------------------------------------------ entry


def reshard(
    subset: str | os.PathLike | np.ndarray,
    out: str | os.PathLike,
    *,
    pool=None,
    shards: str | os.PathLike | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    jobs: int = 2,
    blur: bool = False,
    shuffle_seed: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = False,
    engine: str = "local",
    max_shard_bytes: int = MAX_SHARD_BYTES,
    subset_label: str | None = None,
    warn: Log = _stderr,
) -> ReshardReport:
    """Write the samples of ``subset`` (a uid file or array) as webdataset shards in ``out``.

    With ``pool`` (a Pool or path), samples are found through its shard index (``shards``
    overrides where the tars are now); with ``shards`` alone, the tars are scanned.
    ``subset_label`` names an in-memory subset in meta.json (e.g. the filter that made it). See
    the module docstring for the output contract, order, resumability and blurring. Raises
    UidError (bad uid file), ShardIndexError (no or stale index), OutputError (OUT unusable),
    ReshardError (a corrupt sample with ``strict``), BusyError (another run writes ``out``),
    DiskFullError / NotWritableError (``out`` fills up or cannot be written).
    """
    t0 = time.perf_counter()
    _check_args(pool, shards, shard_size, jobs, max_shard_bytes)
    sel = load_selection(subset, warn)
    st = check_output_dir(out, overwrite=overwrite)
    resume = "then re-run the same command: finished shards are kept"
    with write_lock(st.path, "output folder", create=True), writing(st.path, "output folder", redo=resume):
        return _reshard(sel, st, t0, pool=pool, shards=shards, shard_size=shard_size, jobs=jobs, blur=blur,
                        shuffle_seed=shuffle_seed, overwrite=overwrite, strict=strict, progress=progress,
                        engine=engine, max_shard_bytes=max_shard_bytes, subset_label=subset_label, warn=warn)


def _reshard(sel: Selection, st: OutState, t0: float, *, pool, shards, shard_size: int, jobs: int, blur: bool,
             shuffle_seed: int | None, overwrite: bool, strict: bool, progress: bool, engine: str,
             max_shard_bytes: int, subset_label: str | None, warn: Log) -> ReshardReport:
    """``reshard`` once OUT is locked."""
    located, source = _locate(pool, shards, sel, blur, jobs, progress, warn)
    if strict and len(located.corrupt):
        raise ReshardError(
            f"{len(located.corrupt):,} selected samples are damaged in the input tars (first: uid "
            f"{U.to_hex(located.corrupt[:1])[0]})",
            hint="drop --strict to skip and count them, or re-download those shards (with a pool, "
            "`SELECT * FROM shard_index WHERE error IS NOT NULL` lists the damaged samples)",
        )
    plan = make_plan(
        located, shard_size=shard_size, max_bytes=max_shard_bytes, shuffle_seed=shuffle_seed, blur=blur
    )
    ledger = _prepare_output(st, plan, overwrite)
    todo = _todo(plan, ledger)
    if not todo and ledger.done(COMPLETE):
        return _report_from_state(st.path, plan, ledger, sel, time.perf_counter() - t0, already=True)
    try:
        _write_shards(st.path, plan, ledger, todo, strict, jobs, progress, engine)
    except BaseException:
        if engine == "local":  # every worker has exited: a killed one's half tar is debris
            for p in st.path.glob(f"*{TMP_MARK}*"):
                p.unlink(missing_ok=True)
        raise
    resumed = len(plan.bounds) - len(todo)
    report = _report_from_state(st.path, plan, ledger, sel, time.perf_counter() - t0, resumed=resumed)
    args = {
        "subset_file": sel.source or subset_label,
        "output_dir": str(st.path),
        "shard_size": shard_size,
        "num_workers": jobs,
        "shuffle_seed": shuffle_seed,
        "apply_blur": blur,
        "inject_blur_metadata": blur,
        "reencode_webp_quality": WEBP_QUALITY,
        "strict": strict,
        "overwrite": overwrite,
        "max_shard_bytes": max_shard_bytes,
        **source,
    }
    _finish(st.path, plan, ledger, sel, report, args)
    _warn_skipped(plan, ledger, warn)
    return report


def _warn_skipped(plan: Plan, ledger: parallel.LedgerFile, warn: Log) -> None:
    """Say which selected samples were skipped as damaged (they are in missing_uids.npy)."""
    if len(plan.located.corrupt):
        warn(
            f"warning: {len(plan.located.corrupt):,} selected samples are damaged in the input tars and were "
            f"skipped (listed in missing_uids.npy)"
        )
    entries = [(k, why) for e in _tar_results(ledger) for k, why in e.get("corrupt", [])]
    for key, why in entries[:10]:
        warn(f"warning: skipped sample {key}: {why}")
    if len(entries) > 10:
        warn(f"warning: ... and {len(entries) - 10} more damaged samples skipped (see missing_uids.npy)")


def preflight(out: str | os.PathLike, *, pool=None, shards=None, overwrite: bool = False) -> None:
    """Cheap checks before a long job that ends in a reshard (``dcdb query --reshard OUT``): OUT is
    usable, and the pool has a current shard index (or the shards folder has tars). Raises the
    error ``reshard`` would raise later."""
    from dcdb.shards.index import list_tars, open_index

    if pool is None and shards is None:
        raise UsageError(
            "nothing to reshard from",
            hint="give --pool POOL (with a shard index) or --shards DOWNLOAD/shards",
        )
    check_output_dir(out, overwrite=overwrite)
    if pool is not None:
        open_index(pool, shards).check_fresh()
    else:
        list_tars(shards)


def _check_args(pool, shards, shard_size: int, jobs: int, max_shard_bytes: int) -> None:
    if pool is None and shards is None:
        raise UsageError(
            "nothing to reshard from",
            hint="give --pool POOL (with a shard index) or --shards DOWNLOAD/shards",
        )
    if shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1, got {shard_size}", hint="DataComp uses 10000")
    if jobs < 1:
        raise UsageError(f"-j/--jobs must be at least 1, got {jobs}", hint="pass -j N with N >= 1, or leave it out")
    if max_shard_bytes < 64 * BLOCK:
        raise UsageError(f"max_shard_bytes must be at least {64 * BLOCK}, got {max_shard_bytes}",
                         hint="DataComp caps a tar at 3 GB")


def _locate(pool, shards, sel: Selection, blur: bool, jobs: int, progress: bool, warn: Log):
    """Located samples and a description of the source (for meta.json)."""
    if pool is None:
        located = locate_by_scan(shards, sel, blur, jobs, progress, warn)
        return located, {"input_dir": str(Path(shards).resolve()), "pool": None, "mode": "scan"}
    from dcdb.shards.index import open_index
    from dcdb.store import Pool, open_pool

    p = pool if isinstance(pool, Pool) else open_pool(pool)
    index = open_index(p, shards)
    new = index.new_tars()
    if new:
        warn(
            f"warning: {len(new)} tars in {index.shards_dir} are not in the pool's shard index (first "
            f"{new[0].name}); their samples count as missing until you re-run `dcdb index-shards`"
        )
    boxes = pool_face_boxes(p, sel) if blur else None
    located = locate_in_index(index, sel, blur, boxes)
    return located, {"input_dir": str(index.shards_dir), "pool": str(p.path), "mode": "index"}


def _todo(plan: Plan, ledger: parallel.LedgerFile) -> list[int]:
    """Output tars that no earlier run of this plan finished (recorded; the tar and its stats file
    present with their recorded sizes)."""
    return [k for k in range(len(plan.bounds)) if ledger.done(OUTPUT_SHARD_FORMAT.format(k)) is None]


def _tar_results(ledger: parallel.LedgerFile) -> list[dict[str, Any]]:
    """The results of the finished tars (in the order they finished)."""
    return [m.info for key, m in ledger.markers().items() if key != COMPLETE]


def _write_shards(
    out: Path, plan: Plan, ledger: parallel.LedgerFile, todo: list[int], strict: bool, jobs: int,
    progress: bool, engine: str = "local",
) -> None:
    """Write the output tars in ``todo``; record each in the run's ledger as it finishes. With
    ``engine="ray"`` each tar is a Ray task (dcdb.parallel), same bytes."""
    from tqdm import tqdm

    ledger.forget(COMPLETE, *(OUTPUT_SHARD_FORMAT.format(k) for k in todo))
    total = sum(plan.shard_samples(k) for k in todo)
    t0, read = time.perf_counter(), 0
    with tqdm(
        total=total, unit="sample", unit_scale=True, desc="reshard", file=sys.stderr, disable=not progress
    ) as bar:
        tasks = (plan.task(k, out, strict) for k in todo)
        for r in _map(_run_task, _Lazy(tasks, len(todo)), jobs, engine=engine):
            if not r["ok"]:
                _raise_worker_error(r, "re-run the same command: finished shards are kept")
            res = r["result"]
            k = res["index"]
            ledger.record(OUTPUT_SHARD_FORMAT.format(k), outputs=[OUTPUT_SHARD_FORMAT.format(k),
                                                                   OUTPUT_STATS_FORMAT.format(k)],
                          info={key: v for key, v in res.items() if key != "index"})
            read += res["bytes_read"]
            bar.set_postfix_str(
                f"{read / 1e6 / max(time.perf_counter() - t0, 1e-9):,.1f} MB/s read", refresh=False
            )
            bar.update(plan.shard_samples(res["index"]))


class _Lazy:
    """A sized iterable over a generator, so tasks are built only as workers take them."""

    def __init__(self, gen, n: int):
        self.gen, self.n = gen, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(self.gen)


def _corrupt_keys(done: list[dict[str, Any]]) -> list[str]:
    return [key for entry in done for key, _reason in entry.get("corrupt", [])]


def _report_from_state(
    out: Path, plan: Plan, ledger: parallel.LedgerFile, sel: Selection, seconds: float, *, resumed: int = 0,
    already: bool = False
) -> ReshardReport:
    loc = plan.located
    done = _tar_results(ledger)
    corrupt_read = len(_corrupt_keys(done))
    not_dl, unknown, bad = (
        int(_copies(sel, a).sum()) for a in (loc.not_downloaded, loc.unknown, loc.corrupt)
    )
    return ReshardReport(
        out=str(out),
        selected=len(sel.uids),
        output_count=sum(e["samples"] for e in done),
        output_shards=len(plan.bounds),
        processed=loc.scanned,
        missing=not_dl + unknown + bad + corrupt_read,
        not_downloaded=not_dl,
        unknown=unknown,
        corrupt=bad + corrupt_read,
        duplicates=loc.duplicates,
        blurred=sum(e["blurred"] for e in done),
        bytes_read=sum(e["bytes_read"] for e in done),
        bytes_written=sum(e["bytes_written"] for e in done),
        seconds=seconds,
        resumed_shards=resumed,
        already_complete=already,
    )


def _copies(sel: Selection, distinct: np.ndarray) -> np.ndarray:
    """How many times each of these distinct selected uids is listed in the subset."""
    return sel.counts[match(sel.unique, distinct)] if len(distinct) else np.zeros(0, np.int64)


def _missing_uids(plan: Plan, sel: Selection, ledger: parallel.LedgerFile) -> np.ndarray:
    """Every copy of a selected uid that was not written, sorted."""
    loc = plan.located
    parts = []
    for arr in (loc.not_downloaded, loc.unknown, loc.corrupt):
        if len(arr):
            parts.append(np.repeat(arr, _copies(sel, arr)))
    keys = _corrupt_keys(_tar_results(ledger))
    if keys:
        parts.append(U.from_hex([k.rsplit("-", 1)[0] for k in keys]))
    return U.sort(np.concatenate(parts)) if parts else U.empty()


def _finish(
    out: Path, plan: Plan, ledger: parallel.LedgerFile, sel: Selection, report: ReshardReport,
    args: dict[str, Any]
) -> None:
    """sample_ids.npy, missing_uids.npy, meta.json (last), and the run's completion marker."""
    from dcdb.version import __version__

    U.save(out / "sample_ids.npy", sel.uids, sorted_=True)
    U.save(out / "missing_uids.npy", _missing_uids(plan, sel, ledger), sorted_=True)
    meta = {
        "format": META_FORMAT,
        "dcdb_version": __version__,
        **args,
        "order": "shuffle" if args["shuffle_seed"] is not None else "input",
        "output_shard_format": OUTPUT_SHARD_FORMAT,
        "output_shard_stats_format": OUTPUT_STATS_FORMAT,
        "output_shard_count": report.output_shards,
        "processed_count": report.processed,
        "output_count": report.output_count,
        "subset_count": report.selected,
        "subset_unique_count": len(sel.unique),
        "missing_count": report.missing,
        "not_downloaded_count": report.not_downloaded,
        "unknown_count": report.unknown,
        "corrupt_count": report.corrupt,
        "duplicate_input_count": report.duplicates,
        "blur_count": report.blurred,
        "bytes_read": report.bytes_read,
        "bytes_written": report.bytes_written,
        "plan_fingerprint": plan.fingerprint,
        "cwd": str(Path.cwd()),
    }
    write_json(out / "meta.json", meta)
    ledger.record(COMPLETE, outputs=["sample_ids.npy", "missing_uids.npy", "meta.json"])
