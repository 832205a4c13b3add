"""uid-bucketed pools: ``dcdb ingest SRC POOL --buckets N``.

A DataComp uid is a uniform 128-bit hash, so its top ``b = log2(N)`` bits split a pool into N
buckets of about equal size. A bucketed pool is an ordinary pool whose *shards are the buckets*:
``metadata/bucket-00042.parquet``, Lance fragment 42 of every embedding space, and
``derived/<group>/bucket-00042.parquet``, all holding exactly the rows whose uid starts with
bucket 42's bits, **sorted by uid** (rows with the same uid keep their source order). Consequences:

* the local engine reads the layout unchanged (``pool`` is the buckets in order);
* uid joins, subset algebra and exact dedup are co-partitioned: a uid lives in one bucket;
* a sorted uid list of the pool is the concatenation of the per-bucket sorted lists, so a
  distributed query needs no global sort;
* one bucket (or a group of buckets) is a self-contained unit of work (:func:`bucket_view`).

The manifest records ``"buckets": {"count": N, "bits": b, "key": "uid"}``.

Ingest stages the repartition inside ``POOL/.ingest/`` in two resumable phases before the normal
ingest runs on the buckets (dcdb/ingest/pool.py):

A. per source shard (parallel): read parquet + npz, split the rows by bucket into one Arrow IPC
   file (one record batch per bucket present) and journal it;
B. per bucket (parallel): gather its batch from every shard's file (memory-mapped), sort by uid
   (stable), write ``bucket-XXXXX.parquet`` + ``.npz`` -- a DataComp-format source shard.

Only one source shard (phase A) or one bucket (phase B) is in a worker's memory at a time, so N
must make a bucket fit in memory (12.8M rows / 256 buckets = 50k rows, ~340 MB with embeddings).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dcdb import uids as U
from dcdb.errors import PoolError, UsageError
from dcdb.io import atomic_path, write_json
from dcdb.store import STAGING_DIR, Pool

MAX_BUCKETS = 1 << 16
BUCKET_PREFIX = "bucket-"
_STAGE = "buckets"


def bucket_bits(count: int) -> int:
    """log2 of a bucket count; UsageError unless it is a power of two in [1, 65536]."""
    if not isinstance(count, int) or count < 1 or count > MAX_BUCKETS or count & (count - 1):
        raise UsageError(
            f"--buckets must be a power of two between 1 and {MAX_BUCKETS}, got {count}",
            hint="e.g. --buckets 256 (aim for buckets of 10k-1M rows)",
        )
    return count.bit_length() - 1


def bucket_name(b: int) -> str:
    return f"{BUCKET_PREFIX}{b:05d}"


def bucket_of(uids: np.ndarray, bits: int) -> np.ndarray:
    """Bucket index of each uid (u8,u8 array): the top ``bits`` bits of the high word."""
    if bits == 0:
        return np.zeros(len(uids), dtype=np.int64)
    return (uids["f0"] >> np.uint64(64 - bits)).astype(np.int64)


def uid_range(b: int, bits: int) -> tuple[str, str | None]:
    """Hex uid bounds [lo, hi) of bucket ``b`` (hi None for the last bucket). Lowercase 32-char
    hex strings order like the numbers, so ``uid >= lo AND uid < hi`` selects the bucket."""
    shift = 128 - bits
    lo = format(b << shift, "032x") if bits else "0" * 32
    hi = None if b + 1 >= (1 << bits) else format((b + 1) << shift, "032x")
    return lo, hi


def pool_buckets(pool: Pool) -> dict[str, Any] | None:
    """The manifest's bucketing record, or None for an unbucketed pool."""
    return pool.manifest.get("buckets") or None


def check_same_buckets(pool_path: Path, manifest: dict[str, Any], buckets: int | None) -> None:
    have = (manifest.get("buckets") or {}).get("count")
    if have != buckets:
        def say(n):
            return "unbucketed" if n is None else f"bucketed by {n}"

        raise PoolError(
            f"{str(pool_path)!r} is already a complete pool, {say(have)}; this ingest asks for {say(buckets)}",
            hint="give a new POOL path to lay the source out another way",
        )


# ------------------------------------------------------------------------------ bucket views


def bucket_view(pool: Pool, buckets: list[int]) -> Pool:
    """A Pool restricted to some buckets of a bucketed pool, for ``dcdb.engine.connect``: its
    ``pool`` view holds exactly those buckets' rows (metadata, derived columns, embeddings from
    their Lance fragments), and stored-subset views only the subset uids inside their uid range."""
    info = pool_buckets(pool)
    if info is None:
        raise PoolError(
            f"pool {str(pool.path)!r} is not bucketed",
            hint="re-ingest it with `dcdb ingest SRC POOL --buckets 256` to run on buckets",
        )
    bits = int(info["bits"])
    buckets = sorted({int(b) for b in buckets})
    shards = pool.manifest["shards"]
    chosen = [shards[b] for b in buckets]
    if any(s["name"] != bucket_name(b) for s, b in zip(chosen, buckets)):
        raise PoolError(f"pool {str(pool.path)!r} has a damaged bucket list", hint="re-ingest the pool")
    manifest = dict(pool.manifest)
    manifest["shards"] = chosen
    manifest["rows"] = sum(int(s["rows"]) for s in chosen)
    manifest["_view"] = {
        "fragment_ids": [b for b, s in zip(buckets, chosen) if int(s["rows"]) > 0],
        "uid_ranges": [uid_range(b, bits) for b in buckets],
    }
    return Pool(path=pool.path, manifest=manifest)


def uid_range_predicate(pool: Pool, column: str = "uid") -> str | None:
    """SQL predicate keeping uids inside a bucket view's ranges (None for a whole pool)."""
    view = pool.manifest.get("_view")
    if not view:
        return None
    parts = []
    for lo, hi in view["uid_ranges"]:
        cond = f"{column} >= '{lo}'" + (f" AND {column} < '{hi}'" if hi else "")
        parts.append(f"({cond})")
    return " OR ".join(parts) if parts else "false"


# ------------------------------------------------------------------------------ repartition


@dataclass
class _SplitTask:
    shard: Any  # ingest.ShardTask
    out: str
    bits: int


@dataclass
class _MergeTask:
    bucket: int
    parts: list[tuple[str, int]]  # (arrow file, batch index) in source shard order
    out: str
    schema: Any
    spaces: dict[str, dict[str, Any]]


def _stage_dir(pool: Path, bits: int, fingerprint: str) -> Path:
    return pool / STAGING_DIR / _STAGE / f"b{bits}-{fingerprint[:16]}"


def _split_shard(task: _SplitTask) -> dict[str, Any]:
    """Phase A: one source shard -> an Arrow IPC file, one record batch per bucket present."""
    import pyarrow as pa

    from dcdb.ingest.pool import _load_embedding, _read_shard_table

    shard = task.shard
    table = _read_shard_table(shard)
    uid_arr = U.from_arrow(table.column("uid"), source=shard.parquet)
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
    import pyarrow as pa
    import pyarrow.parquet as pq

    batches = []
    for path, i in task.parts:
        with pa.memory_map(path) as src:
            batches.append(pa.ipc.open_file(src).get_batch(i))
    names = [f.name for f in task.schema]
    if batches:
        table = pa.Table.from_batches(batches)
        uid_arr = U.from_arrow(table.column("uid"), source=f"bucket {task.bucket}")
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


def _run_all(fn, tasks: list, jobs: int, label: str, progress: bool) -> list:
    """``fn`` over ``tasks`` on ``jobs`` processes (dcdb.parallel; in this process for one job)."""
    from tqdm import tqdm

    from dcdb import parallel

    with tqdm(total=len(tasks), desc=label, unit="part", file=sys.stderr, disable=not progress) as bar:
        return list(parallel.map(fn, tasks, jobs, progress=lambda task, result: bar.update(1)))


def repartition(plan, pool: Path, buckets: int, *, jobs: int = 2, progress: bool = False):
    """Stage SRC as N uid buckets (phases A and B above) and return the ingest plan whose shards
    are the buckets, with SRC's fingerprint and the bucketing record. Resumable."""
    from dcdb.ingest.pool import Plan, plan_source

    bits = bucket_bits(buckets)
    stage = _stage_dir(pool, bits, plan.fingerprint)
    if (pool / STAGING_DIR / _STAGE).is_dir():  # stages of another source or bucket count
        for d in (pool / STAGING_DIR / _STAGE).iterdir():
            if d != stage:
                shutil.rmtree(d, ignore_errors=True)
    parts, src = stage / "parts", stage / "src"
    parts.mkdir(parents=True, exist_ok=True)
    src.mkdir(parents=True, exist_ok=True)
    complete = src / "_complete"  # phases A and B done: the split parts are gone, buckets stay
    if not complete.is_file():
        _split_and_merge(plan, pool, parts, src, buckets, bits, jobs, progress)
        complete.write_text("")
        shutil.rmtree(parts, ignore_errors=True)  # a full copy of the pool: free it before ingesting
    bplan = plan_source(src)
    if bplan.rows != plan.rows or len(bplan.shards) != buckets:
        raise PoolError(
            f"bucket staging in {str(stage)!r} holds {bplan.rows:,} rows in {len(bplan.shards)} buckets, "
            f"expected {plan.rows:,} in {buckets}",
            hint=f"delete {str(stage)!r} and re-run the same command",
        )
    spaces = {k: dict(v) for k, v in plan.spaces.items()}
    return Plan(
        src=plan.src,
        shards=bplan.shards,
        schema=plan.schema,
        spaces=spaces,
        source_fingerprint=plan.fingerprint,
        buckets={"count": buckets, "bits": bits, "key": "uid", "order": "uid"},
    )


def _split_and_merge(plan, pool: Path, parts: Path, src: Path, buckets: int, bits: int, jobs: int,
                     progress: bool) -> None:
    from dcdb.ingest.pool import _read_json, _tasks

    # Phase A: split every source shard not split yet (journal = parts/<shard>.json).
    journals: dict[str, dict[str, Any]] = {}
    todo = []
    for task in _tasks(pool, plan, plan.shards):
        j = _read_json(parts / f"{task.name}.json")
        if j and j.get("signature") == task.signature and (parts / j["file"]).is_file():
            journals[task.name] = j
        else:
            todo.append(_SplitTask(task, str(parts / f"{task.name}.arrow"), bits))
    for j in _run_all(_split_shard, todo, jobs, "split", progress):
        write_json(parts / f"{j['name']}.json", j)
        journals[j["name"]] = j
    # Phase B: every bucket whose parquet + npz are not written yet.
    merges = []
    for b in range(buckets):
        name = bucket_name(b)
        done = (src / f"{name}.parquet").is_file() and (not plan.spaces or (src / f"{name}.npz").is_file())
        if done:
            continue
        where = [(str(parts / journals[s.name]["file"]), journals[s.name]["batches"][str(b)])
                 for s in plan.shards if str(b) in journals[s.name]["batches"]]
        merges.append(_MergeTask(b, where, str(src), plan.schema, plan.spaces))
    _run_all(_merge_bucket, merges, jobs, "buckets", progress)
