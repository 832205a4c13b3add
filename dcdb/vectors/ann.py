"""Approximate kNN through a Lance vector index on a pool's embedding table, with measured recall.

``build_index(pool, space, kind=...)`` builds a Lance index (cosine) on ``embeddings/<space>.lance``
itself, so Lance's own scanner uses it; the build is one Lance commit (a new table version that
references the index files only once they are complete), so a killed build leaves the table as it
was (``dcdb index`` reports nothing and a query says there is no index). Beside it dcdb writes
``indexes/<space>.json`` (atomically, after the commit): kind, parameters, build time, the index's
uuid, the Lance version, and the pool manifest's sha256 and row count at build time.

**Staleness**: a query refuses an index whose record names another pool manifest (the pool was
re-ingested), another row count, or an index uuid the table no longer has (re-ingest rewrote the
table): "the index is stale, rebuild it with `dcdb index --force`".

**Recall**: every ANN search re-runs a random sample of its seeds (64 by default, seeded) with the
exact path and reports recall@k = |ANN top-k ∩ exact top-k| / k averaged over the sample. With
``min_recall`` the sample is first searched with the starting probes/refine factor and, while its
recall is below the target, with nprobes and refine factor doubled (at most ``MAX_TRIES`` times);
if the target is still not met, the whole search runs exactly (``mode == "exact"``).

**--where with ANN**: still a pre-filter (neighbours among the passing rows): the index is queried
for ``k / fraction`` candidates (over-fetch) and the rows that fail the filter are dropped; a seed
may then keep fewer than k (reported through recall, which is measured against the exact
pre-filtered result). A filter keeping at most ``SELECTIVE_FRACTION`` of the rows never gets here:
the exact path over the passing rows is chosen automatically.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dcdb.errors import PoolError, UsageError

INDEX_DIR = "indexes"
KINDS = {"ivf_pq": "IVF_PQ", "ivf_hnsw_sq": "IVF_HNSW_SQ"}
DEFAULT_KIND = "ivf_hnsw_sq"
SELECTIVE_FRACTION = 0.05
QUERY_BATCH = 256
MAX_TRIES = 4
#: starting query parameters per kind (measured on synthetic unit vectors, see bench_knn.py)
DEFAULT_QUERY = {"ivf_pq": {"nprobes": 32, "refine_factor": 10, "ef": None},
                 "ivf_hnsw_sq": {"nprobes": 8, "refine_factor": 2, "ef": 64}}


def index_name(space: str) -> str:
    return f"dcdb_{space}_idx"


def record_path(pool, space: str) -> Path:
    return pool.path / INDEX_DIR / f"{space}.json"


def default_partitions(rows: int, kind: str) -> int:
    if kind == "ivf_pq":
        return max(1, min(4096, int(math.sqrt(rows))))
    return max(1, min(1024, rows // 100_000 or 1))


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
                         hint="leave it out for the default (about sqrt(rows))")
    params: dict[str, Any] = {"num_partitions": parts}
    if kind == "ivf_pq":
        m = sub_vectors or _default_sub_vectors(dim)
        if dim % m:
            raise UsageError(f"--sub-vectors {m} does not divide the dim {dim}", hint="e.g. 48 or 96 for 768-d")
        if pool.rows < 256:
            raise UsageError(f"an ivf_pq index needs at least 256 rows to train its codebook, the pool has {pool.rows}",
                             hint="use --kind ivf_hnsw_sq, or the exact path (--exact)")
        params["num_sub_vectors"] = m
    bar, cb = _progress(progress)
    t0 = time.perf_counter()
    try:
        ds.create_index(space, KINDS[kind], name=index_name(space), metric="cosine", replace=True,
                        progress_callback=cb, **params)
    except Exception as exc:
        from dcdb.io import write_error

        err = write_error(exc, pool.path, "the index into pool", redo="the table is unchanged")
        raise err or PoolError(f"building the {kind} index of {space!r} failed: {exc}",
                               hint="check the parameters (--partitions, --sub-vectors); the table is unchanged") from exc
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    from dcdb.store import open_lance

    ds = open_lance(pool.lance_path(space))
    idx = _lance_index(ds, space)
    record = {
        "space": space, "kind": kind, "metric": "cosine", "params": params, "name": index_name(space),
        "uuid": idx.get("uuid") if idx else None, "lance_version": ds.version, "rows": pool.rows,
        "pool_manifest_sha256": pool.manifest_hash, "build_seconds": round(seconds, 2),
        "query_defaults": DEFAULT_QUERY[kind],
    }
    (pool.path / INDEX_DIR).mkdir(exist_ok=True)
    write_json(record_path(pool, space), record)
    return record


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


def _ann_query(ds, space: str, seeds: np.ndarray, k: int, fetch: int, nprobes: int, refine: int, ef: int | None,
               keep: np.ndarray | None, to_rows, progress: Callable[[int], None] | None = None):
    s = len(seeds)
    rows = np.full((s, k), -1, dtype=np.int64)
    sims = np.full((s, k), -np.inf, dtype=np.float32)
    for i in range(0, s, QUERY_BATCH):
        q = seeds[i : i + QUERY_BATCH]
        tbl = ds.to_table(
            nearest={"column": space, "q": q if len(q) > 1 else q[0], "k": fetch, "nprobes": int(nprobes),
                     "refine_factor": int(refine) if refine else None, "metric": "cosine",
                     **({"ef": int(max(ef, fetch * max(1, refine)))} if ef else {})},
            columns=["_distance"], with_row_id=True,
        )
        qi = (tbl.column("query_index").to_numpy() if "query_index" in tbl.column_names
              else np.zeros(tbl.num_rows, np.int64)).astype(np.int64)
        r = to_rows(tbl.column("_rowid").to_numpy().astype(np.uint64))
        sim = (1.0 - tbl.column("_distance").to_numpy(zero_copy_only=False)).astype(np.float32)
        ok = np.isfinite(sim)
        if keep is not None:
            ok &= keep[r]
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


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    hits = [len(np.intersect1d(a[a >= 0], e[e >= 0])) / k for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits)) if hits else 1.0


def ann_search(pool, space: str, seeds: np.ndarray, k: int, *, rows: np.ndarray | None = None,
               min_recall: float | None = None, recall_sample: int = 64, nprobes: int | None = None,
               refine_factor: int | None = None, seed: int = 0, progress: bool = False,
               log: Callable[[str], None] | None = None):
    """ANN top-k of every seed with recall measured on a sample (see the module doc)."""
    from dcdb.vectors.scan import KnnResult, exact_search, exact_topk, rows_bar, scan_vectors
    from dcdb.store import open_lance

    say = log or (lambda _m: None)
    state = index_state(pool, space)
    rec = state["record"]
    ds = open_lance(pool.lance_path(space))
    dim = int(pool.spaces[space]["dim"])
    to_rows = _row_mapper(ds)
    keep = None
    fetch = k
    if rows is not None:
        keep = np.zeros(pool.rows, dtype=bool)
        keep[rows] = True
        fetch = min(pool.rows, math.ceil(k * pool.rows / max(len(rows), 1) * 1.5) + 10)
    q = dict(DEFAULT_QUERY.get(rec.get("kind"), {"nprobes": 16, "refine_factor": 4, "ef": None}))
    parts = int(rec.get("params", {}).get("num_partitions", 1))
    nprobes = min(parts, int(nprobes or q["nprobes"]))
    refine = int(refine_factor if refine_factor is not None else q["refine_factor"])
    ef = q.get("ef")
    t0 = time.perf_counter()
    n = len(seeds)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(recall_sample, n), replace=False)) if recall_sample > 0 else np.empty(0, int)
    exact_rows = None
    if len(sample):
        exact_rows = exact_topk(seeds[sample], scan_vectors(ds, space, dim, rows), k).rows
    tries = []
    for attempt in range(MAX_TRIES):
        r_s, _ = _ann_query(ds, space, seeds[sample], k, fetch, nprobes, refine, ef, keep, to_rows) if len(sample) else (None, None)
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
        out_rows, out_sims = _ann_query(ds, space, seeds, k, fetch, nprobes, refine, ef, keep, to_rows, pb.update)
    ann_seconds = time.perf_counter() - t1
    return KnnResult(rows=out_rows, sims=out_sims, k=k, mode="ann", seconds=time.perf_counter() - t0,
                     eligible_rows=pool.rows if rows is None else len(rows), recall=recall,
                     recall_seeds=len(sample),
                     details={"index": rec.get("kind"), "nprobes": nprobes, "refine_factor": refine, "ef": ef,
                              "fetch": fetch, "ann_seconds": round(ann_seconds, 4), "tries": tries})
