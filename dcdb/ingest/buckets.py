"""uid-bucketed pools: every pool of store format 2 (``dcdb ingest SRC POOL [--buckets N]``).

A DataComp uid is a uniform 128-bit hash, so its top ``b = log2(N)`` bits split a pool into N
buckets of about equal size. A pool's *shards are the buckets*:
``metadata/bucket-00042.parquet``, Lance fragment 42 of every embedding space, and
``derived/<group>/bucket-00042.parquet``, all holding exactly the rows whose uid starts with
bucket 42's bits, **sorted by uid** (rows with the same uid keep their source order). Consequences:

* the local engine reads the layout unchanged (``pool`` is the buckets in order);
* uid joins, subset algebra and exact dedup are co-partitioned: a uid lives in one bucket;
* a sorted uid list of the pool is the concatenation of the per-bucket sorted lists, so a
  distributed query needs no global sort;
* one bucket (or a group of buckets) is a self-contained unit of work (:func:`bucket_view`).

The manifest records ``"buckets": {"count": N, "bits": b, "key": "uid"}``. Without ``--buckets``
ingest picks N with :func:`default_buckets`; N = 1 is one fully sorted bucket.

This module is the layout (which bucket a uid is in, its uid range, a view of some buckets); the
ingest pre-pass that stages SRC as buckets is ``repartition`` in dcdb/ingest/pool.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dcdb.errors import PoolError, UsageError
from dcdb.store import Pool

MAX_BUCKETS = 1 << 16
BUCKET_BYTES = 256 << 20  # the rows (in memory) a default bucket may hold, unless a source shard holds more
METADATA_ROW_BYTES = 512  # a DataComp metadata row in memory, roughly (url, caption, sha256, uid, numbers)
BUCKET_PREFIX = "bucket-"


def bucket_bits(count: int) -> int:
    """log2 of a bucket count; UsageError unless it is a power of two in [1, 65536]."""
    if not isinstance(count, int) or count < 1 or count > MAX_BUCKETS or count & (count - 1):
        raise UsageError(
            f"--buckets must be a power of two between 1 and {MAX_BUCKETS}, got {count}",
            hint="e.g. --buckets 256 (aim for buckets of 10k-1M rows)",
        )
    return count.bit_length() - 1


def default_buckets(rows: int, shard_rows: list[int], row_bytes: int = 512) -> int:
    """The bucket count ingest uses when none is given: the smallest power of two whose average
    bucket holds at most ``max(largest source shard, BUCKET_BYTES / row_bytes)`` rows. A bucket is
    held in memory while it is sorted, as a source shard is while it is split, so the peak stays
    what the source's own shards need, or ~BUCKET_BYTES when they are smaller (then fewer, larger
    buckets: fewer files for every query to open). ``row_bytes``: a row's size in memory
    (metadata plus its embedding vectors). 12.8M metadata-only rows: 32 buckets of 400k rows."""
    largest = max(shard_rows, default=0)
    if rows <= 0:
        return 1
    per_bucket = max(largest, BUCKET_BYTES // max(1, row_bytes), 1)
    need = -(-rows // per_bucket)  # ceil
    return min(MAX_BUCKETS, 1 << (need - 1).bit_length())


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
