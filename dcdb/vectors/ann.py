"""Approximate kNN through a Lance vector index on a pool's embedding table, with measured recall.

``build_index(pool, space, kind=...)`` builds a Lance index (cosine) on ``embeddings/<space>.lance``
itself, so Lance's own scanner uses it; the build is one Lance commit (a new table version that
references the index files only once they are complete), so a killed build leaves the table as it
was (``dcdb index`` reports nothing and a query says there is no index). Beside it dcdb writes
``indexes/<space>.json`` (atomically, after the commit): kind, parameters, build time, the index's
uuid, the Lance version, and the pool manifest's sha256 and row count at build time.

**Build** (every kind is IVF; the default ``ivf_sq`` keeps 8-bit scalar-quantised vectors in each
partition): dcdb trains the IVF centroids itself (spherical k-means in float32 BLAS on a seeded
sample of ``KMEANS_SAMPLE`` rows per partition, at most ``KMEANS_MAX_SAMPLE``), assigns every row to
its nearest centroid in one streaming pass, and hands Lance the centroids and the assignment
(``ivf_centroids`` + ``precomputed_partition_dataset``), so Lance only quantises and writes: Lance's
own k-means and assignment ran ~8x below BLAS speed (a 100k pool: 245 s for one IVF_HNSW_SQ
partition before, ~10 s now). Partitions: 2 sqrt(rows) (2,000 of 500 rows at 1M), so the build
is one pass over the pool plus ~2 rows x sqrt(rows) dot products at BLAS speed and a query probes
nprobes x sqrt(rows) / 2 rows; HNSW kinds keep one graph per ``HNSW_PARTITION_ROWS`` rows with
``HNSW_PARAMS`` (bounded graphs: linear build). The build is deterministic given the table.
Superseded index files of the table are removed after the commit (a --force rebuild would
otherwise leave the old index on disk).

**Queries**: Lance returns k x refine_factor candidates per seed by its quantised distances and dcdb
re-ranks them by the exact cosine of their stored vectors (exact similarities; ties to the lower
row), probing max(8, sqrt(partitions) / 2) partitions by default. Lance answers a batch query one
seed at a time on one core and scans every centroid for every seed (~1.1 ms of a ~1.6 ms query at
2,000 partitions); from ``PARALLEL_MIN_SEEDS`` seeds the seeds go to one worker process per core,
with the recall check as one more task beside them.

**Staleness**: a query refuses an index whose record names another pool manifest (the pool was
re-ingested), another row count, or an index uuid the table no longer has (re-ingest rewrote the
table): "the index is stale, rebuild it with `dcdb index --force`".

**When ANN pays** (:func:`choose_mode`, used by ``dcdb knn`` without --exact/--ann): exact search
costs one pass over the pool plus seeds x rows x dim multiply-adds; ANN costs a fixed time per seed
plus the recall check, which re-runs ``recall_sample`` seeds exactly (one more pass). So with at most
``recall_sample`` seeds ANN is never faster, and on a small pool the exact matmul per seed is
cheaper than Lance's per-query cost: the estimate picks exact there, and says so.

**Recall**: every ANN search re-runs a random sample of its seeds (64 by default, seeded) with the
exact path and reports recall@k = |ANN top-k ∩ exact top-k| / k averaged over the sample. With
``min_recall`` the sample is first searched with the starting probes/refine factor and, while its
recall is below the target, with nprobes and refine factor doubled (at most ``MAX_TRIES`` times);
if the target is still not met, the whole search runs exactly (``mode == "exact"``).

**--where with ANN**: a true pre-filter: the passing rows go to Lance as a row-address allow list
(``row_addr_allowlist``), applied before the vector search, so each seed gets its k nearest passing
rows and only those are ranked. A filter keeping at most ``SELECTIVE_FRACTION`` of the rows never
gets here unless --ann asks: the exact path over the passing rows is chosen automatically.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dcdb.errors import DcdbError, PoolError, UsageError

INDEX_DIR = "indexes"
KINDS = {"ivf_sq": "IVF_SQ", "ivf_rq": "IVF_RQ", "ivf_flat": "IVF_FLAT", "ivf_pq": "IVF_PQ",
         "ivf_hnsw_sq": "IVF_HNSW_SQ"}
#: per-kind Lance build parameters: RaBitQ with 1 bit a dimension (96 bytes a 768-d row instead of
#: SQ's 768; on clustered vectors re-ranking 2 x k of its candidates reaches SQ's recall at about
#: SQ's query time, on flat neighbourhoods it needs a larger refine factor)
KIND_PARAMS = {"ivf_rq": {"num_bits": 1}}
DEFAULT_KIND = "ivf_sq"
SELECTIVE_FRACTION = 0.05
QUERY_BATCH = 256
MAX_TRIES = 4
#: Lance answers a batch query on one core (and holds the GIL): from this many seeds the queries
#: are split over worker processes, one per core (a worker costs ~1-2 s to start).
PARALLEL_MIN_SEEDS = 4096
QUERY_CHUNK = 1024  # seeds per worker task (the recall check is one more task beside them)
#: IVF partitions: sqrt(rows) (:func:`default_partitions`); HNSW kinds keep one graph per
#: HNSW_PARTITION_ROWS rows (bounded graphs: build time linear in the rows) with Lance's graph made
#: cheaper to build than its defaults (m 20, ef_construction 300).
HNSW_PARTITION_ROWS = 50_000
HNSW_PARAMS = {"m": 16, "ef_construction": 100}
MAX_PARTITIONS = 65_536
KMEANS_SAMPLE = 64  # sample rows per partition for k-means
KMEANS_MAX_SAMPLE = 1 << 17  # 400 MB of float32 768-d rows
KMEANS_ITERS = 10
ASSIGN_BLOCK = 1 << 14
#: starting query parameters per kind (measured on clustered CLIP-like vectors, see bench_knn.py)
#: (nprobes None: max(MIN_NPROBES, sqrt(partitions)), see default_nprobes; refine_factor: Lance
#: returns k x refine_factor candidates, re-ranked by their exact cosine)
DEFAULT_QUERY = {"ivf_sq": {"nprobes": None, "refine_factor": 1, "ef": None},
                 "ivf_rq": {"nprobes": None, "refine_factor": 2, "ef": None},
                 "ivf_flat": {"nprobes": None, "refine_factor": 1, "ef": None},
                 "ivf_pq": {"nprobes": None, "refine_factor": 4, "ef": None},
                 "ivf_hnsw_sq": {"nprobes": 4, "refine_factor": 1, "ef": 64}}
MIN_NPROBES = 8


def index_name(space: str) -> str:
    return f"dcdb_{space}_idx"


def record_path(pool, space: str) -> Path:
    return pool.path / INDEX_DIR / f"{space}.json"


def default_partitions(rows: int, kind: str) -> int:
    """IVF partitions for a pool of ``rows``: 2 sqrt(rows) (2,000 partitions of 500 rows at 1M),
    HNSW kinds one graph per HNSW_PARTITION_ROWS rows."""
    if kind.startswith("ivf_hnsw"):
        return max(1, min(MAX_PARTITIONS, round(rows / HNSW_PARTITION_ROWS)))
    return max(1, min(MAX_PARTITIONS, rows, 2 * math.isqrt(max(rows, 1))))


def default_nprobes(kind: str, partitions: int) -> int:
    """Starting nprobes: sqrt(partitions) / 2 (at least MIN_NPROBES): a query then scans about
    0.35 rows^0.75 rows (22 x 500 at 1M); the --min-recall ladder doubles it when needed."""
    fixed = DEFAULT_QUERY.get(kind, {}).get("nprobes")
    return max(1, min(partitions, fixed or max(MIN_NPROBES, round(math.sqrt(partitions) / 2))))


# ------------------------------------------------------------------------------------- build


def build_index(pool, space: str, *, kind: str = DEFAULT_KIND, partitions: int | None = None,
                sub_vectors: int | None = None, force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Build (or with ``force`` replace) the ANN index of ``space``; return its record."""
    from dcdb.io import write_json
    from dcdb.vectors.scan import open_space

    if kind not in KINDS:
        raise UsageError(f"unknown index kind {kind!r}", hint=f"use one of {', '.join(KINDS)}")
    ds, dim = open_space(pool, space)
    existing = index_state(pool, space)
    if existing is not None and not force:
        raise UsageError(f"space {space!r} already has an ANN index ({existing['record'].get('kind')})",
                         hint="pass --force to rebuild it")
    parts = partitions or default_partitions(pool.rows, kind)
    if parts < 1 or parts > pool.rows:
        raise UsageError(f"--partitions must be in 1..{pool.rows} (the pool's rows), got {parts}",
                         hint="leave it out for the default (about 2 sqrt(rows))")
    params: dict[str, Any] = dict(KIND_PARAMS.get(kind, {}))
    if kind == "ivf_pq":
        m = sub_vectors or _default_sub_vectors(dim)
        if dim % m:
            raise UsageError(f"--sub-vectors {m} does not divide the dim {dim}", hint="e.g. 48 or 96 for 768-d")
        if pool.rows < 256:
            raise UsageError(f"an ivf_pq index needs at least 256 rows to train its codebook, the pool has {pool.rows}",
                             hint="use --kind ivf_sq, or the exact path (--exact)")
        params["num_sub_vectors"] = m
    if kind.startswith("ivf_hnsw"):
        params.update(HNSW_PARAMS)
    bar, cb = _progress(progress)
    t0 = time.perf_counter()
    tmp = None
    try:
        centroids, assignment = train_partitions(ds, space, dim, parts, progress=progress)
        parts = len(centroids)
        tmp = _write_assignment(pool, space, ds, assignment)
        ds.create_index(space, KINDS[kind], name=index_name(space), metric="cosine", replace=True,
                        progress_callback=cb, num_partitions=parts, ivf_centroids=centroids,
                        precomputed_partition_dataset=str(tmp / "partitions.lance"), **params)
    except Exception as exc:
        if isinstance(exc, DcdbError):  # a damaged table or no usable vector, said by the scan
            raise
        from dcdb.io import write_error

        err = write_error(exc, pool.path, "the index into pool", redo="the table is unchanged")
        raise err or PoolError(f"building the {kind} index of {space!r} failed: {exc}",
                               hint="check the parameters (--partitions, --sub-vectors); the table is unchanged") from exc
    finally:
        bar.close()
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    from dcdb.store import open_lance

    ds = open_lance(pool.lance_path(space))
    _drop_superseded(ds)
    idx = _lance_index(ds, space)
    record = {
        "space": space, "kind": kind, "metric": "cosine", "params": {"num_partitions": parts, **params},
        "name": index_name(space), "uuid": idx.get("uuid") if idx else None, "lance_version": ds.version,
        "rows": pool.rows, "pool_manifest_sha256": pool.manifest_hash, "build_seconds": round(seconds, 2),
        "query_defaults": {**DEFAULT_QUERY[kind], "nprobes": default_nprobes(kind, parts)},
    }
    (pool.path / INDEX_DIR).mkdir(exist_ok=True)
    write_json(record_path(pool, space), record)
    return record


def _drop_superseded(ds) -> None:
    """Remove the files of older table versions (a replaced index's), kept by Lance until cleaned:
    each --force rebuild would otherwise leave a whole index behind. Disk only: never fatal."""
    from datetime import timedelta

    try:
        ds.cleanup_old_versions(older_than=timedelta(0), error_if_tagged_old_versions=False)
    except Exception:  # noqa: BLE001 - best effort, the new index is committed
        pass


# ------------------------------------------------------------------------- IVF partitions


def train_partitions(ds, space: str, dim: int, parts: int, *, seed: int = 0,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(float32 unit centroids (P, dim), partition of every pool row (int64, -1 for rows with no
    usable vector)): spherical k-means on a seeded sample, then every row to its nearest
    centroid."""
    from dcdb.vectors.scan import rows_bar, scan_vectors

    n = ds.count_rows()
    rng = np.random.default_rng(seed)
    size = min(n, max(parts, min(KMEANS_SAMPLE * parts, KMEANS_MAX_SAMPLE)))
    sample = np.sort(rng.choice(n, size=size, replace=False))
    blocks = list(scan_vectors(ds, space, dim, sample))
    x = np.concatenate([m for _, m in blocks]) if blocks else np.empty((0, dim), np.float32)
    del blocks
    if len(x) == 0:
        raise PoolError(f"space {space!r} has no usable vector (all NULL, zero or not finite)",
                        hint="nothing to index; check the embeddings the pool was ingested from")
    centroids = _kmeans(x, min(parts, len(x)), rng)
    del x
    part = np.full(n, -1, dtype=np.int64)
    with rows_bar(n, f"index {space}: assign", progress) as pb:
        for rows, mat in scan_vectors(ds, space, dim):
            part[rows] = _assign(mat, centroids)
            pb.update(len(rows))
    return np.ascontiguousarray(centroids, dtype=np.float32), part


def _assign(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Nearest (max dot product, first on ties) row of ``c`` for each row of ``x``, blocked."""
    out = np.empty(len(x), dtype=np.int64)
    for i in range(0, len(x), ASSIGN_BLOCK):
        out[i : i + ASSIGN_BLOCK] = np.argmax(x[i : i + ASSIGN_BLOCK] @ c.T, axis=1)
    return out


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = KMEANS_ITERS) -> np.ndarray:
    """Spherical k-means (cosine) of the unit rows of ``x`` into ``k`` unit centroids (a centroid
    that loses all its rows keeps its place)."""
    k = min(k, len(x))
    c = x[np.sort(rng.choice(len(x), size=k, replace=False))].copy()
    for _ in range(iters):
        sums = np.zeros_like(c)
        for i in range(0, len(x), ASSIGN_BLOCK):
            blk = x[i : i + ASSIGN_BLOCK]
            a = np.argmax(blk @ c.T, axis=1)
            order = np.argsort(a, kind="stable")
            counts = np.bincount(a, minlength=k)
            present = np.flatnonzero(counts)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[present]
            sums[present] += np.add.reduceat(blk[order], starts, axis=0)
        norms = np.linalg.norm(sums, axis=1)
        ok = norms > 0
        c[ok] = sums[ok] / norms[ok, None]
    return c


def _write_assignment(pool, space: str, ds, part: np.ndarray) -> Path:
    """The (row address, partition) table Lance's ``precomputed_partition_dataset`` reads, in a
    temporary folder under ``indexes/`` (removed by the caller; a killed build's is swept here)."""
    import shutil
    import tempfile

    import lance
    import pyarrow as pa

    root = pool.path / INDEX_DIR
    root.mkdir(exist_ok=True)
    for old in root.glob(f".build-{space}-*"):
        shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{space}-", dir=root))
    ok = part >= 0
    addr = _row_addresses(ds)[ok]
    tbl = pa.table({"row_id": pa.array(addr, pa.uint64()), "partition": pa.array(part[ok].astype(np.uint32))})
    lance.write_dataset(tbl, str(tmp / "partitions.lance"), max_rows_per_file=max(1, len(addr)),
                        max_rows_per_group=max(1, len(addr)))
    return tmp


def _row_addresses(ds) -> np.ndarray:
    """Lance row address (fragment id << 32 | offset) of every pool row, in pool row order."""
    parts = [(np.uint64(f.fragment_id) << np.uint64(32)) | np.arange(f.count_rows(), dtype=np.uint64)
             for f in ds.get_fragments()]
    return np.concatenate(parts) if parts else np.empty(0, np.uint64)


def _default_sub_vectors(dim: int) -> int:
    for m in (dim // 16, dim // 8, dim // 4, 1):
        if m >= 1 and dim % m == 0:
            return m
    return 1


def _progress(enabled: bool):
    import sys

    from tqdm import tqdm

    state = {"stage": None, "bar": None}

    def cb(p):
        if not enabled:
            return
        if state["stage"] != p.stage:
            if state["bar"] is not None:
                state["bar"].close()
            state["stage"] = p.stage
            state["bar"] = tqdm(total=p.total or None, desc=f"index {p.stage}", unit=p.unit or "it",
                                file=sys.stderr, leave=False)
        bar = state["bar"]
        bar.n = p.completed or 0
        bar.refresh()

    class _Closer:
        def close(self):
            if state["bar"] is not None:
                state["bar"].close()

    return _Closer(), cb


def _lance_index(ds, space: str) -> dict[str, Any] | None:
    """{"uuid", "rows"} of dcdb's index on ``space`` in the Lance table, or None."""
    for idx in ds.describe_indices():
        if idx.name == index_name(space):
            uuids = sorted(seg.uuid for seg in idx.segments)
            return {"uuid": ",".join(uuids), "rows": int(idx.num_rows_indexed)}
    return None


# --------------------------------------------------------------------------------- state


def index_state(pool, space: str) -> dict[str, Any] | None:
    """{"record": ..., "present": bool} when an index was built for ``space``, else None."""
    import json

    p = record_path(pool, space)
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return {"record": {}, "present": False}
    return {"record": rec}


def check_fresh(pool, space: str, state: dict[str, Any]) -> None:
    """PoolError when the index no longer matches the pool (re-ingested or rewritten table)."""
    from dcdb.store import open_lance

    rec = state["record"]
    hint = f"rebuild it: dcdb index --pool {pool.path} --space {space} --force (or use --exact)"
    if rec.get("pool_manifest_sha256") != pool.manifest_hash or rec.get("rows") != pool.rows:
        raise PoolError(f"the ANN index of {space!r} is stale: it was built for another version of the pool "
                        f"({rec.get('rows')} rows; the pool was re-ingested since)", hint=hint)
    ds = open_lance(pool.lance_path(space))
    idx = _lance_index(ds, space)
    if idx is None or idx["uuid"] != rec.get("uuid") or idx["rows"] != pool.rows:
        raise PoolError(f"the ANN index of {space!r} is stale: the embedding table no longer holds it", hint=hint)


# -------------------------------------------------------------------------------- search


def _row_mapper(ds):
    """Lance row address (fragment id << 32 | offset) -> pool row index."""
    frags = ds.get_fragments()
    ids = np.array([f.fragment_id for f in frags], dtype=np.int64)
    counts = np.array([f.count_rows() for f in frags], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    lookup = dict(zip(ids.tolist(), starts.tolist(), strict=True))

    def to_rows(addr: np.ndarray) -> np.ndarray:
        frag = (addr >> 32).astype(np.int64)
        off = (addr & 0xFFFFFFFF).astype(np.int64)
        base = np.array([lookup[int(f)] for f in np.unique(frag)], dtype=np.int64)
        return base[np.searchsorted(np.unique(frag), frag)] + off

    return to_rows


def _ann_query(ds, space: str, dim: int, seeds: np.ndarray, k: int, nprobes: int, refine: int, ef: int | None,
               keep: np.ndarray | None, allow: bytes | None, to_rows,
               progress: Callable[[int], None] | None = None):
    """Top-k of each seed through the index: Lance returns ``k x max(1, refine)`` candidates per
    seed (by its quantised distances); dcdb re-ranks them with the exact cosine of their stored
    vectors (one batched take per QUERY_BATCH seeds), so similarities are exact and ties go to the
    lower row, as on the exact path."""
    from dcdb.vectors.scan import scan_vectors

    s = len(seeds)
    fetch = k * max(1, refine)
    rows = np.full((s, k), -1, dtype=np.int64)
    sims = np.full((s, k), -np.inf, dtype=np.float32)
    for i in range(0, s, QUERY_BATCH):
        q = np.ascontiguousarray(seeds[i : i + QUERY_BATCH], dtype=np.float32)
        tbl = _nearest_table(ds, space, q, fetch, nprobes, ef, allow)
        qi = (tbl.column("query_index").to_numpy() if "query_index" in tbl.column_names
              else np.zeros(tbl.num_rows, np.int64)).astype(np.int64)
        r = to_rows(tbl.column("_rowid").to_numpy().astype(np.uint64))
        if keep is not None:
            qi, r = qi[keep[r]], r[keep[r]]
        uniq, inv = np.unique(r, return_inverse=True)
        vec = np.zeros((len(uniq), dim), dtype=np.float32)
        ok_row = np.zeros(len(uniq), dtype=bool)
        for idx, mat in scan_vectors(ds, space, dim, uniq):  # rows with no usable vector are left out
            pos = np.searchsorted(uniq, idx)
            vec[pos], ok_row[pos] = mat, True
        sim = np.einsum("ij,ij->i", q[qi], vec[inv])
        ok = ok_row[inv]
        qi, r, sim = qi[ok], r[ok], sim[ok]
        order = np.lexsort((r, -sim, qi))
        qi, r, sim = qi[order], r[order], sim[order]
        starts = np.searchsorted(qi, np.arange(len(q)))
        rank = np.arange(len(qi)) - starts[qi]
        sel = rank < k
        rows[i + qi[sel], rank[sel]] = r[sel]
        sims[i + qi[sel], rank[sel]] = sim[sel]
        if progress:
            progress(len(q))
    return rows, sims


def _nearest_table(ds, space: str, q: np.ndarray, fetch: int, nprobes: int, ef: int | None, allow: bytes | None):
    """Lance's batch nearest-neighbour query: (query_index, _distance, _rowid) for each row of
    ``q``. With an allow list Lance may probe more than nprobes partitions when those hold fewer
    than ``fetch`` passing rows."""
    from lance.dataset import ScannerBuilder

    probes = {"minimum_nprobes": int(nprobes)} if allow is not None else {"nprobes": int(nprobes)}
    params = {"k": int(fetch), "metric": "cosine", **probes, **({"ef": int(max(ef, fetch))} if ef else {})}
    sb = ScannerBuilder(ds).nearest(space, q[0], **params).columns(["_distance"]).with_row_id(True)
    if allow is not None:
        sb = sb.row_addr_prefilter(allow, None)
    nearest = getattr(sb, "_nearest", None)
    if len(q) > 1 and isinstance(nearest, dict) and "q" in nearest:
        # Lance's own coercion of a 2-D query turns each row into Python objects (~0.5 ms a seed,
        # as much as the search itself): hand it the list<float32> array it would build.
        offsets = np.arange(0, (len(q) + 1) * q.shape[1], q.shape[1], dtype=np.int32)
        nearest["q"] = _list_array(offsets, q)
    elif len(q) > 1:
        sb = ScannerBuilder(ds).nearest(space, q, **params).columns(["_distance"]).with_row_id(True)
        if allow is not None:
            sb = sb.row_addr_prefilter(allow, None)
    return sb.to_scanner().to_table()


def _list_array(offsets: np.ndarray, q: np.ndarray):
    import pyarrow as pa

    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(q.ravel()))


def query_workers(seeds: int) -> int:
    """Processes for the queries of ``seeds`` seeds: one per core from PARALLEL_MIN_SEEDS seeds."""
    import os

    if seeds < PARALLEL_MIN_SEEDS:
        return 1
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
                      seeds // (PARALLEL_MIN_SEEDS // 2)))


def query_task(task):
    """One worker task of :func:`ann_search` (module level: parallel.map spawns workers):
    ``("ann", ...)`` -> (rows, sims) of a chunk of seeds through the index; ``("exact", ...)`` ->
    the exact top-k rows of the recall sample."""
    from dcdb.store import open_lance

    ds = open_lance(task[1])
    if task[0] == "exact":
        from dcdb.vectors.scan import exact_topk, scan_vectors

        _, _, space, dim, seeds, k, rows = task
        return exact_topk(seeds, scan_vectors(ds, space, dim, rows), k).rows
    _, _, space, dim, seeds, k, nprobes, refine, ef, keep, allow = task
    return _ann_query(ds, space, dim, seeds, k, nprobes, refine, ef, keep, allow, _row_mapper(ds))


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    hits = [len(np.intersect1d(a[a >= 0], e[e >= 0])) / k for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits)) if hits else 1.0


def ann_search(pool, space: str, seeds: np.ndarray, k: int, *, rows: np.ndarray | None = None,
               min_recall: float | None = None, recall_sample: int = 64, nprobes: int | None = None,
               refine_factor: int | None = None, seed: int = 0, progress: bool = False,
               log: Callable[[str], None] | None = None, jobs: int | None = None):
    """ANN top-k of every seed with recall measured on a sample (see the module doc); the seeds'
    queries run on ``jobs`` worker processes (default: one per core from PARALLEL_MIN_SEEDS seeds),
    with the same result as in one process."""
    from dcdb.vectors.scan import KnnResult, exact_search, exact_topk, rows_bar, scan_vectors
    from dcdb.store import open_lance

    say = log or (lambda _m: None)
    state = index_state(pool, space)
    rec = state["record"]
    ds = open_lance(pool.lance_path(space))
    dim = int(pool.spaces[space]["dim"])
    to_rows = _row_mapper(ds)
    keep = allow = None
    if rows is not None:
        from lance.dataset import serialize_row_addrs

        keep = np.zeros(pool.rows, dtype=bool)
        keep[rows] = True
        allow = serialize_row_addrs(_row_addresses(ds)[rows].tolist())
    kind = rec.get("kind")
    q = dict(rec.get("query_defaults") or DEFAULT_QUERY.get(kind, {"nprobes": None, "refine_factor": 4, "ef": None}))
    parts = int(rec.get("params", {}).get("num_partitions", 1))
    nprobes = min(parts, int(nprobes or q.get("nprobes") or default_nprobes(kind, parts)))
    refine = int(refine_factor if refine_factor is not None else (q.get("refine_factor") or 0))
    ef = q.get("ef")
    t0 = time.perf_counter()
    n = len(seeds)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(recall_sample, n), replace=False)) if recall_sample > 0 else np.empty(0, int)
    workers = query_workers(n) if jobs is None else max(1, jobs)
    # Without --min-recall nothing waits for the recall check: it runs as one more worker task
    # beside the queries (the sample's ANN rows are then taken from the full run: the same rows).
    beside = workers > 1 and min_recall is None and len(sample) > 0
    exact_rows = None
    tries = []
    recall = None
    if len(sample) and not beside:
        exact_rows = exact_topk(seeds[sample], scan_vectors(ds, space, dim, rows), k).rows
    for attempt in range(0 if beside else MAX_TRIES):
        r_s, _ = (_ann_query(ds, space, dim, seeds[sample], k, nprobes, refine, ef, keep, allow, to_rows)
                  if len(sample) else (None, None))
        recall = recall_at_k(r_s, exact_rows) if len(sample) else None
        tries.append({"nprobes": nprobes, "refine_factor": refine, "ef": ef, "recall": recall})
        if min_recall is None or recall is None or recall >= min_recall:
            break
        if attempt == MAX_TRIES - 1 or (nprobes >= parts and refine >= 64 and (not ef or ef >= 1024)):
            say(f"ANN recall@{k} {recall:.3f} < {min_recall} even with nprobes={nprobes}, refine_factor={refine}: "
                "falling back to the exact path")
            res = exact_search(pool, space, seeds, k, rows=rows, progress=progress)
            res.details.update(why_exact=f"ANN recall {recall:.3f} below --min-recall {min_recall}", ann_tries=tries)
            res.seconds = time.perf_counter() - t0
            return res
        nprobes, refine = min(parts, nprobes * 2), min(64, max(1, refine) * 2)
        ef = min(1024, ef * 2) if ef else ef
        say(f"ANN recall@{k} {recall:.3f} < {min_recall}: retrying with nprobes={nprobes}, refine_factor={refine}"
            + (f", ef={ef}" if ef else ""))
    t1 = time.perf_counter()
    with rows_bar(n, f"ann {space}", progress) as pb:
        if workers > 1:
            from dcdb import parallel

            path = str(pool.lance_path(space))
            tasks = [("ann", path, space, dim, seeds[a : a + QUERY_CHUNK], k, nprobes, refine, ef, keep, allow)
                     for a in range(0, n, QUERY_CHUNK)]
            if beside:
                tasks.insert(0, ("exact", path, space, dim, seeds[sample], k, rows))
            out = list(parallel.map(query_task, tasks, workers,
                                    progress=lambda task, _res: pb.update(len(task[4]) if task[0] == "ann" else 0)))
            if beside:
                exact_rows = out.pop(0)
            out_rows = np.concatenate([r for r, _ in out])
            out_sims = np.concatenate([v for _, v in out])
        else:
            out_rows, out_sims = _ann_query(ds, space, dim, seeds, k, nprobes, refine, ef, keep, allow, to_rows,
                                            pb.update)
    if beside:
        recall = recall_at_k(out_rows[sample], exact_rows)
        tries.append({"nprobes": nprobes, "refine_factor": refine, "ef": ef, "recall": recall})
    ann_seconds = time.perf_counter() - t1
    return KnnResult(rows=out_rows, sims=out_sims, k=k, mode="ann", seconds=time.perf_counter() - t0,
                     eligible_rows=pool.rows if rows is None else len(rows), recall=recall,
                     recall_seeds=len(sample),
                     details={"index": kind, "nprobes": nprobes, "refine_factor": refine, "ef": ef,
                              "prefilter": "row_addr_allowlist" if rows is not None else None,
                              "query_processes": workers,
                              "ann_seconds": round(ann_seconds, 4), "tries": tries})


# ---------------------------------------------------------------------------- cost model

#: Seconds per unit of work, measured by benchmarks/bench_knn.py on 1M x 768 (2 cores; exact and
#: ANN in the same run, the quietest run of the session). Only their ratios decide, and all are CPU
#: work, so the choice carries over to other machines. Exact path: ``SCAN_S`` per stored value read,
#: widened and normalised (rows x dim), ``MAC_S`` per multiply-add of the seeds x rows matmul (both
#: cores). ANN, per seed on one core (Lance answers a batch on one core): ``QUERY_S`` plus
#: ``CENTROID_S`` per centroid value (partitions x dim: Lance scans every centroid for every query)
#: plus ``PROBE_S`` per value of the partitions probed (nprobes x rows / partitions x dim) plus
#: ``RESULT_S`` per candidate re-ranked (k x refine factor: a take of its vector).
SCAN_S = 5.2e-9
MAC_S = 2.3e-11
QUERY_S = 1e-4
CENTROID_S = 7e-10
PROBE_S = 6.6e-11
RESULT_S = 2.4e-5
#: ANN is chosen only when its estimate is at least this many times below the exact one: it is
#: approximate, so a near tie goes to the exact answer.
ANN_MARGIN = 2.0


def estimate_seconds(rows: int, eligible: int, seeds: int, k: int, dim: int, recall_sample: int,
                     partitions: int | None = None, nprobes: int | None = None,
                     candidates: int | None = None) -> dict[str, float]:
    """Estimated seconds of the exact path and of the ANN path (queries + the recall check) for
    ``seeds`` seeds over ``eligible`` of the pool's ``rows``, with an index of ``partitions``
    probed ``nprobes`` at a time (default: the default index's) and ``candidates`` re-ranked per
    seed (default k)."""
    def exact(n_seeds: int) -> float:
        return rows * dim * SCAN_S + eligible * dim * n_seeds * MAC_S

    parts = partitions or default_partitions(rows, DEFAULT_KIND)
    probes = nprobes or default_nprobes(DEFAULT_KIND, parts)
    per_seed = (QUERY_S + parts * dim * CENTROID_S + probes * (rows / parts) * dim * PROBE_S
                + (candidates or k) * RESULT_S)
    check = exact(min(recall_sample, seeds)) if recall_sample > 0 else 0.0
    return {"exact": exact(seeds), "ann": seeds * per_seed / query_workers(seeds) + check}


def min_index_rows(dim: int) -> int:
    """Pool rows from which an index can pay (with many seeds): where one seed's exact matmul
    costs ANN_MARGIN x one ANN query of the default index."""
    rows = 1000
    while rows < 1 << 40:
        est = estimate_seconds(rows, rows, 1, 10, dim, 0)
        if rows * dim * MAC_S >= ANN_MARGIN * (est["ann"]):
            return rows
        rows = int(rows * 1.1)
    return rows


def choose_mode(pool, space: str, seeds: int, k: int, *, eligible: int | None = None,
                recall_sample: int = 64) -> tuple[str, str, dict[str, float]]:
    """("exact" | "ann", why, estimates) for ``dcdb knn`` without --exact / --ann, from the pool's
    rows, the rows a --where keeps, seeds, k, dim and the space's index (none: exact)."""
    dim = int(pool.spaces[space]["dim"])
    eligible = pool.rows if eligible is None else eligible
    state = index_state(pool, space)
    rec = state["record"] if state else {}
    parts = int(rec.get("params", {}).get("num_partitions") or default_partitions(pool.rows, DEFAULT_KIND))
    kind = rec.get("kind", DEFAULT_KIND)
    q = rec.get("query_defaults") or {}
    nprobes = int(q.get("nprobes") or default_nprobes(kind, parts))
    refine = max(1, int(q.get("refine_factor") or 1))
    est = estimate_seconds(pool.rows, eligible, seeds, k, dim, recall_sample, partitions=parts, nprobes=nprobes,
                           candidates=k * refine)
    if state is None:
        return "exact", "no ANN index (build one with `dcdb index`)", est
    if recall_sample > 0 and seeds <= recall_sample:
        return "exact", (f"{seeds} seeds <= --recall-sample {recall_sample}: the recall check alone re-runs "
                         "them all exactly, so the index cannot pay"), est
    if est["ann"] * ANN_MARGIN > est["exact"]:
        return "exact", (f"cost model: exact ~{est['exact']:.1f}s vs ANN ~{est['ann']:.1f}s for {seeds:,} seeds "
                         f"over {eligible:,} rows: below the size where the index pays (pass --ann to use it)"), est
    return "ann", f"cost model: ANN ~{est['ann']:.1f}s vs exact ~{est['exact']:.1f}s", est
