"""Run a filter bucket by bucket: ``dcdb query --engine ray`` (and the in-process ``serial`` engine
the tests use to check plans without a cluster).

The driver plans the filter once (dcdb/plan.py), then runs phases of tasks; one task handles a
*group* of consecutive buckets of a bucketed pool (dcdb/buckets.py, about 4 groups per worker)
with one DuckDB connection on those buckets' files only. Everything a task produces goes to a
work folder as one Parquet file per bucket with a completion marker written after it, so a re-run
after a lost worker or a killed driver -- even on a cluster of another size, with other groups --
redoes only the buckets without a marker (Ray itself retries a task whose worker died):

1. for each ``clip_cut`` fraction: every bucket's non-NULL scores (``__dcdb_cut_I/<bucket>.parquet``)
   and row count; the driver then finds the exact value at descending index ``int(N*f)`` by radix
   selection over the float64 sort keys: while more than a million candidates are left, a round
   narrows them by 16 bits (a 65536-bin histogram from each worker's share), then the candidates
   themselves are fetched and sorted (a single round below ~1M scored rows; two or three rounds
   at 10^9 rows); the value is stored in ``__dcdb_cut_I/value.json``;
2. the per-bucket query with those values (and broadcast constants) bound: every task writes, per
   bucket, its sorted uid list (``parts/<bucket>.parquet``: the 16-byte records as one
   fixed_size_binary column) -- or, for a global top-k, its top rows with their sort keys;
3. the driver concatenates the groups' lists in bucket order (a sorted list needs no global sort),
   or merges the top-k candidates, and returns the same FilterResult as the local engine.

Ray is imported only here, only for ``engine="ray"``; it connects to ``RAY_ADDRESS`` or a local
cluster (``ray start --head``), or starts one in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dcdb import errors
from dcdb import uids as U
from dcdb.errors import DcdbError, PoolError, UsageError
from dcdb.io import tmp_name, write_json
from dcdb.query import FilterFile, FilterResult, _collect
from dcdb.store import Pool

ENGINES = ("local", "ray")
TASKS_PER_WORKER = 4  # bucket groups per worker: balance and cheap retries vs. per-task start-up
MAX_TASK_ROWS = 8_000_000  # pool rows per task at most (~130 MB of uids if every row is kept)
RADIX_BITS = 16
COLLECT_LIMIT = 1 << 20  # fetch the remaining candidate scores once at most this many are left
FAULT_ENV = "DCDB_FAULT_INJECT"  # test hook: "<marker file>": the first query task's worker dies once
MARKER = ".done.json"


# ---------------------------------------------------------------------------------- backends


class SerialBackend:
    """Tasks in this process, one after another (tests, and a baseline for the Ray overhead)."""

    name = "serial"
    workers = 1

    def map(self, fn: Callable, tasks: list[tuple], progress: Callable[[Any], None] | None = None) -> list:
        out = []
        for t in tasks:
            out.append(fn(*t))
            if progress:
                progress(out[-1])
        return out


class RayBackend:
    """One Ray task per bucket group; Ray places them and retries a task whose worker died."""

    name = "ray"

    def __init__(self, max_retries: int = 3):
        try:
            import ray
        except ImportError as exc:
            raise UsageError("--engine ray needs Ray", hint="pip install 'dcdb[ray]'") from exc
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            address = os.environ.get("RAY_ADDRESS") or None
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, TimeoutError) as exc:
                raise UsageError(
                    f"cannot start or reach a Ray cluster{f' at {address}' if address else ''}: {exc}",
                    hint="start one with `ray start --head`, point RAY_ADDRESS at it, or use --engine local",
                ) from None
        self.ray = ray
        self.max_retries = max_retries
        self.workers = int(ray.cluster_resources().get("CPU", 1))
        self._remote: dict[Callable, Any] = {}

    def map(self, fn: Callable, tasks: list[tuple], progress: Callable[[Any], None] | None = None) -> list:
        ray = self.ray
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = ray.remote(num_cpus=1, max_retries=self.max_retries)(fn)
        refs = [remote.remote(*t) for t in tasks]
        index = {r: i for i, r in enumerate(refs)}
        out: list[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for r in done:
                out[index[r]] = ray.get(r)
                if progress:
                    progress(out[index[r]])
        return out


def ray_map(fn: Callable, items, jobs: int | None = None, window: int | None = None):
    """``fn`` over ``items`` as Ray tasks, results in input order, at most ``window`` in flight
    (default: twice the cluster's CPUs) -- the resharder's per-shard tasks on ``--engine ray``."""
    backend = RayBackend()
    ray = backend.ray
    remote = ray.remote(num_cpus=1, max_retries=backend.max_retries)(fn)
    window = window or 2 * backend.workers
    pending: list = []
    for item in items:
        pending.append(remote.remote(item))
        if len(pending) >= window:
            yield ray.get(pending.pop(0))
    while pending:
        yield ray.get(pending.pop(0))


def backend_for(engine: str):
    if engine == "ray":
        return RayBackend()
    if engine == "serial":
        return SerialBackend()
    raise UsageError(f"unknown engine {engine!r}", hint=f"use one of {', '.join(ENGINES)}")


# ------------------------------------------------------------------------------------- tasks


def _marker(path: Path) -> Path:
    return path.with_name(path.name + MARKER)


def _done(path: Path) -> dict[str, Any] | None:
    """The marker of a finished intermediate, if it and the part it vouches for are intact."""
    m = _marker(path)
    try:
        info = json.loads(m.read_text())
        return info if path.stat().st_size == info.get("bytes") else None
    except (OSError, ValueError, AttributeError):
        return None


def _guarded(fn, *args) -> dict[str, Any]:
    """Run a task body; dcdb errors come back as data (their type survives, Ray's pickling of
    exceptions would not keep the hint)."""
    try:
        return {"ok": True, **fn(*args)}
    except DcdbError as exc:
        return {"ok": False, "error": type(exc).__name__, "message": exc.message, "hint": exc.hint}


def _connect(pool_path: str, group: list[int]):
    from dcdb.buckets import bucket_view
    from dcdb.engine import connect
    from dcdb.store import open_pool

    view = bucket_view(open_pool(pool_path), group)
    return view, connect(view, threads=1)


def _duck_error(con, exc: Exception, what: str):
    from dcdb.filters import take_error

    err = take_error(con)
    if err is not None:
        raise err from None
    raise errors.QueryError(f"{what} failed on a bucket: {str(exc).strip()}") from None


def _bucket_path(out_dir: str, b: int) -> Path:
    return Path(out_dir) / f"{b:05d}.parquet"


def _pending(out_dir: str, group: list[int]) -> tuple[list[int], list[dict[str, Any]]]:
    """Buckets of ``group`` without a completion marker, and the markers of the others."""
    todo, done = [], []
    for b in group:
        info = _done(_bucket_path(out_dir, b))
        if info is None:
            todo.append(b)
        else:
            done.append(info)
    return todo, done


def _by_bucket(uid_arr: np.ndarray, todo: list[int], bits: int, name: str) -> dict[int, np.ndarray]:
    """Row indices of each bucket in ``todo``; a uid outside them (made up by the filter, not a
    row's own uid) cannot be placed, so it is refused rather than put in the wrong bucket."""
    from dcdb.buckets import bucket_of

    ids = bucket_of(uid_arr, bits)
    order = np.argsort(ids, kind="stable")  # linear on the usual already-ordered output
    starts = np.searchsorted(ids[order], todo, side="left")
    ends = np.searchsorted(ids[order], todo, side="right")
    out = {b: order[a:e] for b, a, e in zip(todo, starts, ends)}
    if int((ends - starts).sum()) != len(uid_arr):
        stray = U.to_hex(uid_arr[~np.isin(ids, todo)][:1])[0]
        raise errors.PlanError(
            f"filter {name!r} returned uid {stray}, which is not the uid of a row it read (it lies in "
            "another bucket), so --engine ray cannot place it",
            hint="select the rows' own uid column, or run it with --engine local")
    return out


def _write_part(path: Path, table, info: dict[str, Any]) -> None:
    """An intermediate, then its marker, each written under a temp name and renamed into place
    (atomic for a killed process). No fsync (it dominated small tasks): after a machine crash a
    marker may survive its part's data, so the marker records the part's size and a part of
    another size is redone."""
    import pyarrow.parquet as pq

    tmp = tmp_name(path)
    # uids and scores are hashes and noise: compression and statistics only cost time here
    pq.write_table(table, tmp, compression="none", use_dictionary=False, write_statistics=False)
    os.replace(tmp, path)
    info = {**info, "bytes": path.stat().st_size}
    tmp = tmp_name(_marker(path))
    tmp.write_text(json.dumps(info))
    os.replace(tmp, _marker(path))


def _scores_task(pool_path: str, group: list[int], sql: str, params: dict[str, Any], out_dir: str,
                 bits: int) -> dict[str, Any]:
    """Phase 1 of a clip_cut fraction: per bucket its non-NULL scores (float64) and row count."""
    import duckdb
    import pyarrow as pa

    todo, done = _pending(out_dir, group)
    rows, scored = sum(d["rows"] for d in done), sum(d["scored"] for d in done)
    if todo:
        t0 = time.perf_counter()
        view, con = _connect(pool_path, todo)
        # the bucket of each row from its uid's first 4 hex digits (bits <= 16), in SQL: no decoding
        keyed = f"SELECT (('0x' || substr(uid, 1, 4))::INTEGER >> {16 - bits}) AS b, score FROM ({sql})"
        try:
            tbl = con.sql(keyed, params=params).to_arrow_table()
        except duckdb.Error as exc:
            _duck_error(con, exc, "the clip_cut score scan")
        con.close()
        ids = tbl.column(0).to_numpy()
        scores = tbl.column(1).cast(pa.float64()).to_numpy(zero_copy_only=False)  # NULL -> NaN
        per_bucket = {s["name"]: int(s["rows"]) for s in view.shards}
        for b in todo:
            v = scores[ids == b]
            v = v[~np.isnan(v)]
            info = {"bucket": b, "rows": per_bucket[f"bucket-{b:05d}"], "scored": len(v),
                    "seconds": time.perf_counter() - t0}
            _write_part(_bucket_path(out_dir, b), pa.table({"score": v}), info)
            rows, scored = rows + info["rows"], scored + len(v)
    return {"rows": rows, "scored": scored, "skipped": len(done), "buckets": len(group)}


def _sort_keys(values: np.ndarray) -> np.ndarray:
    """uint64 keys that sort like the float64 values (ascending; no NaN here: NULLs were dropped)."""
    bits = np.ascontiguousarray(values, dtype=np.float64).view(np.uint64)
    neg = (bits >> np.uint64(63)).astype(bool)
    return np.where(neg, ~bits, bits | np.uint64(1 << 63))


def _from_key(key: int) -> float:
    k = np.uint64(key)
    bits = k & ~np.uint64(1 << 63) if k >> np.uint64(63) else ~k
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def _radix_task(paths: list[str], prefix: int, known: int, collect: bool) -> dict[str, Any]:
    """One radix round over the score files in ``paths``, among the sort keys whose top ``known``
    bits are ``prefix``: a histogram of their next 16 bits, or (``collect``) the keys themselves."""
    import pyarrow.parquet as pq

    hist = np.zeros(1 << RADIX_BITS, dtype=np.int64)
    found = []
    for p in paths:
        keys = _sort_keys(pq.read_table(p).column(0).to_numpy())
        if known:
            keys = keys[(keys >> np.uint64(64 - known)) == np.uint64(prefix)]
        if collect:
            found.append(keys)
            continue
        digits = ((keys >> np.uint64(64 - known - RADIX_BITS)) & np.uint64((1 << RADIX_BITS) - 1)).astype(np.int64)
        hist += np.bincount(digits, minlength=1 << RADIX_BITS)
    if collect:
        return {"keys": np.concatenate(found) if found else np.empty(0, np.uint64)}
    return {"hist": hist}


def _query_task(pool_path: str, group: list[int], sql: str, params: dict[str, Any], out_dir: str,
                topk_keys: list[str] | None, fault: str | None, name: str, bits: int) -> dict[str, Any]:
    """Phase 2: the filter on this group's unfinished buckets -> per bucket its sorted uid list
    (or, for a global top-k, its rows among the group's top-k, with their sort keys)."""
    import duckdb
    import pyarrow as pa

    todo, done = _pending(out_dir, group)
    result_rows, rows = sum(d["result_rows"] for d in done), sum(d["rows"] for d in done)
    if not todo:
        return {"result_rows": result_rows, "rows": rows, "skipped": len(done), "buckets": len(group)}
    if fault and not os.path.exists(fault):  # test hook: this worker dies once, mid-run
        Path(fault).write_text(f"worker {os.getpid()} killed on buckets {todo}\n")
        os._exit(137)
    t0 = time.perf_counter()
    view, con = _connect(pool_path, todo)
    try:
        reader = con.sql(sql, params=params or None).to_arrow_reader(1 << 20)
        if topk_keys is not None:
            tbl = reader.read_all()
        else:
            parts, copies_parts, _nrows = _collect(reader, name)
    except duckdb.Error as exc:
        _duck_error(con, exc, f"filter {name!r}")
    con.close()
    per_bucket = {s["name"]: int(s["rows"]) for s in view.shards}
    if topk_keys is not None:
        names = {n.lower(): n for n in tbl.column_names}
        if "uid" not in names:
            raise errors.QueryError(f"the result of filter {name!r} has no uid column", hint="SELECT uid FROM pool ...")
        cols = {"uid": tbl.column(names["uid"]).cast(pa.string())}
        if "copies" in names:
            cols["copies"] = tbl.column(names["copies"])
        for k in topk_keys:
            cols[k] = tbl.column(k)
        table = pa.table(cols)
        uid_arr = U.from_arrow(table.column("uid"), source=f"result of filter {name!r}")
        pieces = {b: (table.take(pa.array(idx)), len(idx)) for b, idx in _by_bucket(uid_arr, todo, bits, name).items()}
    else:
        arr = np.concatenate(parts) if parts else U.empty()
        counts = None
        if copies_parts is not None:
            counts = np.concatenate(copies_parts) if copies_parts else np.empty(0, np.int64)
        pieces = {}
        for b, idx in _by_bucket(arr, todo, bits, name).items():
            sub = arr[idx] if counts is None else np.repeat(arr[idx], counts[idx])
            if not U.is_sorted(sub):  # a scan keeps the bucket's uid order; joins may not
                sub = U.sort(sub)
            pieces[b] = (pa.table({"uid": _uid_column(sub)}), len(idx))
    for b, (table, n) in pieces.items():
        info = {"bucket": b, "result_rows": n, "uids": table.num_rows, "rows": per_bucket[f"bucket-{b:05d}"],
                "seconds": time.perf_counter() - t0}
        _write_part(_bucket_path(out_dir, b), table, info)
        result_rows, rows = result_rows + n, rows + info["rows"]
    return {"result_rows": result_rows, "rows": rows, "skipped": len(done), "buckets": len(group)}


def scores_task(*args) -> dict[str, Any]:
    return _guarded(_scores_task, *args)


def radix_task(*args) -> dict[str, Any]:
    return _guarded(_radix_task, *args)


def query_task(*args) -> dict[str, Any]:
    return _guarded(_query_task, *args)


def _check(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in results:
        if not r["ok"]:
            cls = getattr(errors, r["error"], DcdbError)
            raise cls(r["message"], hint=r["hint"])
    return results


# ------------------------------------------------------------------------------------ driver


@dataclass
class RunStats:
    groups: int = 0
    skipped: int = 0
    rows: int = 0


def groups_of(pool: Pool, workers: int, per_task: int | None = None) -> list[list[int]]:
    """Consecutive buckets per task. Markers are per bucket, so a re-run on another cluster size
    (other groups) still reuses every finished bucket."""
    n = len(pool.manifest["shards"])
    per = per_task or max(1, -(-n // (TASKS_PER_WORKER * max(1, workers))))
    if per_task is None:  # a task holds its buckets' result in memory: bound its rows
        per = min(per, max(1, MAX_TASK_ROWS * n // max(1, pool.rows)))
    return [list(range(i, min(i + per, n))) for i in range(0, n, per)]


def _work_key(pool: Pool, plan) -> str:
    h = hashlib.sha256()
    h.update(pool.manifest_hash.encode())
    h.update(plan.bucket_sql.encode())
    h.update(json.dumps({k: str(v) for k, v in sorted(plan.bucket_params.items())}).encode())
    h.update(json.dumps([[c.param, c.arch, c.fraction] for c in plan.cuts]).encode())
    return h.hexdigest()[:20]


class _Bar:
    def __init__(self, total_rows: int, label: str, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total_rows, unit="rows", unit_scale=True, desc=label, file=sys.stderr,
                        disable=not enabled)
        self.buckets = 0

    def __call__(self, r: dict[str, Any]) -> None:
        if r.get("ok"):
            self.buckets += int(r.get("buckets", 0))
            self.bar.set_postfix_str(f"{self.buckets} buckets done", refresh=False)
            self.bar.update(int(r.get("rows", 0)))

    def close(self):
        self.bar.close()


def _exact_cut(backend, pool: Pool, cut, groups, work: Path, stats: RunStats, progress: bool,
               bits: int) -> float | None:
    """The value at index int(N*f) of the pool's scores sorted descending, NaN/NULL last."""
    from dcdb.filters.baselines import fraction_index

    d = work / cut.param
    d.mkdir(parents=True, exist_ok=True)
    value_file = d / "value.json"
    if value_file.is_file():
        return json.loads(value_file.read_text())["value"]
    bar = _Bar(pool.rows, f"{cut.param[2:]} scores", progress)
    try:
        tasks = [(str(pool.path), g, cut.score_sql, {"arch": cut.arch}, str(d), bits) for g in groups]
        res = _check(backend.map(scores_task, tasks, bar))
    finally:
        bar.close()
    stats.skipped += sum(r["skipped"] for r in res)
    n_rows = sum(r["rows"] for r in res)
    n_scored = sum(r["scored"] for r in res)
    n = fraction_index(n_rows, n_scored, cut.fraction)
    if n >= n_scored:
        value = None  # the index falls in the NULL (NaN) tail: nothing passes, as in DataComp
    else:
        m = n_scored - 1 - n  # ascending rank of the value
        paths = [str(_bucket_path(str(d), b)) for g in groups for b in g]
        chunks = [paths[i::backend.workers] for i in range(min(backend.workers, len(paths)))]
        prefix, known, count = 0, 0, n_scored
        while count > COLLECT_LIMIT and known < 64:  # narrow by 16 bits per round
            hists = _check(backend.map(radix_task, [(c, prefix, known, False) for c in chunks]))
            cum = np.cumsum(np.sum([h["hist"] for h in hists], axis=0))
            digit = int(np.searchsorted(cum, m, side="right"))
            below = int(cum[digit - 1]) if digit else 0
            m, count = m - below, int(cum[digit]) - below
            prefix, known = (prefix << RADIX_BITS) | digit, known + RADIX_BITS
        found = _check(backend.map(radix_task, [(c, prefix, known, True) for c in chunks]))
        keys = np.sort(np.concatenate([f["keys"] for f in found]))
        prefix = int(keys[m])
        value = _from_key(prefix)
    write_json(value_file, {"value": value, "rows": n_rows, "scored": n_scored, "index": n,
                            "fraction": cut.fraction, "arch": cut.arch})
    return value


def run_distributed(
    pool: Pool,
    filt: FilterFile,
    given: dict[str, str] | None = None,
    *,
    engine: str = "ray",
    work_dir: str | os.PathLike | None = None,
    keep_work: bool = False,
    per_task: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> FilterResult:
    """Run ``filt`` on the bucketed ``pool`` group by group on ``engine`` ("ray" or "serial").
    Same result as ``dcdb.query.run_filter``; PlanError when the filter cannot be split."""
    from dcdb.buckets import pool_buckets
    from dcdb.engine import connect, stored_subsets
    from dcdb.plan import plan_filter

    t0 = time.perf_counter()
    if pool_buckets(pool) is None:
        raise PoolError(
            f"pool {str(pool.path)!r} is not bucketed, so it cannot run on --engine {engine}",
            hint="ingest it with `dcdb ingest SRC POOL --buckets 256`, or use --engine local",
        )
    con = connect(pool)
    plan = plan_filter(con, filt, given, subsets=set(stored_subsets(pool)))
    con.close()
    if log:
        log(f"plan: {plan.describe()}")
    backend = backend_for(engine)
    groups = groups_of(pool, backend.workers, per_task)
    bits = int(pool_buckets(pool)["bits"])
    temp = None
    if work_dir is None:
        temp = work_dir = tempfile.mkdtemp(prefix="dcdb-work-")
    work = Path(work_dir) / _work_key(pool, plan)
    (work / "parts").mkdir(parents=True, exist_ok=True)
    stats = RunStats(groups=len(groups))
    try:
        params = dict(plan.bucket_params)
        for cut in plan.cuts:
            params[cut.param] = _exact_cut(backend, pool, cut, groups, work, stats, progress, bits)
        fault = os.environ.get(FAULT_ENV) or None
        keys = plan.topk.keys if plan.topk else None
        tasks = [(str(pool.path), g, plan.bucket_sql, params, str(work / "parts"), keys, fault, filt.name, bits)
                 for g in groups]
        bar = _Bar(pool.rows, filt.name, progress)
        try:
            res = _check(backend.map(query_task, tasks, bar))
        finally:
            bar.close()
        stats.skipped += sum(r["skipped"] for r in res)
        paths = [_bucket_path(str(work / "parts"), b) for g in groups for b in g]
        if plan.topk:
            arr, nrows = _merge_topk(paths, plan.topk)
        else:
            arr = _concat(paths)
            nrows = sum(r["result_rows"] for r in res)
        if log:
            log(f"{backend.name}: {len(groups)} tasks of {len(groups[0])} bucket(s) on {backend.workers} "
                f"worker(s), {stats.skipped} bucket result(s) reused from {work}")
        if not keep_work:  # done: the intermediates are only worth keeping for a re-run
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    return FilterResult(uids=arr, filter=filt, params=plan.params, pool=pool,
                        seconds=time.perf_counter() - t0, result_rows=nrows)


def _uid_column(arr: np.ndarray):
    """A sorted uid list as one fixed_size_binary(16) column: the .npy records byte for byte."""
    import pyarrow as pa

    arr = np.ascontiguousarray(arr, dtype=U.UID_DTYPE)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(arr), [None, pa.py_buffer(arr.view(np.uint8))])


def _concat(paths: list[Path]) -> np.ndarray:
    """The buckets' sorted lists in bucket order; a uid outside its bucket's range cannot occur
    (tasks refuse made-up uids), but the result is checked and sorted if it ever is not."""
    import pyarrow.parquet as pq

    sizes = [json.loads(_marker(p).read_text())["uids"] for p in paths]
    arr = np.empty(sum(sizes), dtype=U.UID_DTYPE)
    start = 0
    for p, n in zip(paths, sizes):
        if not n:
            continue
        t = pq.read_table(p)
        if t.num_rows != n:
            raise PoolError(f"intermediate {str(p)!r} changed while the query ran", hint="re-run it")
        for chunk in t.column("uid").chunks:  # one copy of the 16-byte records
            m = len(chunk)
            arr[start : start + m] = np.frombuffer(chunk.buffers()[1], U.UID_DTYPE, count=m, offset=chunk.offset * 16)
            start += m
    return arr if U.is_sorted(arr) else U.sort(arr)


def _merge_topk(paths: list[Path], topk) -> tuple[np.ndarray, int]:
    import duckdb

    from dcdb.engine import sql_string

    files = "[" + ", ".join(sql_string(str(p)) for p in paths) + "]"
    con = duckdb.connect(":memory:")
    cols = [n for n, *_ in con.execute(f"DESCRIBE SELECT * FROM read_parquet({files})").fetchall()]
    sel = "uid" + (", copies" if "copies" in cols else "")
    reader = con.sql(
        f"SELECT {sel} FROM read_parquet({files}) ORDER BY {topk.order_sql} LIMIT {topk.limit} OFFSET {topk.offset}"
    ).to_arrow_reader(1 << 20)
    parts, copies_parts, nrows = _collect(reader, "top-k merge")
    arr = np.concatenate(parts) if parts else U.empty()
    if copies_parts is not None:
        arr = np.repeat(arr, np.concatenate(copies_parts) if copies_parts else np.empty(0, np.int64))
    return U.sort(arr), nrows
