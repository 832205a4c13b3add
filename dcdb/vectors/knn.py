"""k-nearest-neighbour search of a pool's embedding space (cosine): ``search`` picks the exact
streaming scan (:mod:`dcdb.vectors.scan`) or the space's ANN index (:mod:`dcdb.vectors.ann`),
applies the ``--where`` pre-filter (:func:`where_rows`), and writes the results (pairs, uids,
manifest) for ``dcdb knn``.

Result positions are pool row indices (row i of ``pool``); ``uids_of`` maps them to uids through
the Lance table's ``uid`` column.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dcdb.errors import PoolError, UsageError
from dcdb.vectors.scan import KnnResult, check_k, exact_search, uids_of


def where_rows(pool, where: str) -> np.ndarray:
    """Row indices of the pool rows for which the SQL predicate ``where`` is true (pre-filter)."""
    import duckdb

    from dcdb.engine import connect, narrow_pool
    from dcdb.errors import QueryError
    from dcdb.sandbox import apply, check_statement, refusal

    con = connect(pool)
    sql = f"SELECT coalesce(({where}), false) AS keep FROM pool"
    check_statement(con, sql, "--where")
    apply(con, pool, who="--where", kind="where")
    try:
        with narrow_pool(con, sql):  # only the joins the predicate reads
            tbl = con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:
        from dcdb.filters import take_error

        err = take_error(con) or refusal(con, exc)
        if err is not None:
            raise err from None
        raise QueryError(f"--where {where!r} failed: {str(exc).strip()}",
                         hint="give an SQL predicate on pool columns, e.g. \"original_width >= 200\"") from None
    if tbl.num_rows != pool.rows:  # pragma: no cover - DuckDB keeps insertion order
        raise QueryError(f"--where returned {tbl.num_rows} rows for a pool of {pool.rows}",
                         hint="give a predicate on pool columns, not a query that adds or drops rows")
    keep = tbl.column(0).to_numpy(zero_copy_only=False).astype(bool)
    return np.flatnonzero(keep).astype(np.int64)


def numpy_bruteforce(pool_vectors: np.ndarray, seeds: np.ndarray, k: int, chunk: int = 256):
    """Reference: full similarity rows + argsort (stable, so ties go to the lower row). For tests
    and the benchmark baseline; needs the whole pool in memory."""
    p = pool_vectors.astype(np.float32)
    norms = np.linalg.norm(p, axis=1)
    valid = np.isfinite(norms) & (norms > 0)
    p = np.where(valid[:, None], p / np.where(valid, norms, 1)[:, None], 0)
    s = seeds / np.linalg.norm(seeds, axis=1, keepdims=True)
    out_rows = np.empty((len(s), k), dtype=np.int64)
    out_sims = np.empty((len(s), k), dtype=np.float32)
    for i in range(0, len(s), chunk):
        sims = s[i : i + chunk].astype(np.float32) @ p.T
        sims[:, ~valid] = -np.inf
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else np.argsort(-sims, axis=1)
        # exact order with ties by row: sort the candidates (and anything tied with the k-th)
        for j in range(len(sims)):
            kth = sims[j, idx[j]].min()
            cand = np.flatnonzero(sims[j] >= kth)
            o = np.lexsort((cand, -sims[j, cand]))[:k]
            out_rows[i + j] = cand[o]
            out_sims[i + j] = sims[j, cand[o]]
    return out_rows, out_sims


# --------------------------------------------------------------------------- subset building


def search(pool, space: str, seeds: np.ndarray, k: int, *, exact: bool = False, where: str | None = None,
           min_recall: float | None = None, recall_sample: int = 64, nprobes: int | None = None,
           refine_factor: int | None = None, seed: int = 0, progress: bool = False, ann_only: bool = False,
           log: Callable[[str], None] | None = None) -> KnnResult:
    """Top-k of each seed: exact, or through the space's ANN index.

    ``where`` is a **pre-filter**: neighbours are chosen among the rows for which it is true.
    Mode choice: ``exact=True`` -> exact; ``ann_only=True`` -> the index (error when there is none);
    otherwise (auto) no index -> exact; a ``where`` that keeps at most ``ann.SELECTIVE_FRACTION`` of
    the pool -> exact over the passing rows (faster and exact); else the cost model
    (:func:`dcdb.vectors.ann.choose_mode`: pool rows, seeds, k, dim) picks, exact on a pool or a
    seed count too small for the index to pay. The reason is kept in ``details`` (``why_exact`` /
    ``why_ann``). On the ANN path recall@k is measured on ``recall_sample`` seeds re-run exactly,
    with nprobes/refine raised (or the exact path taken) until ``min_recall``.
    """
    from dcdb.vectors import ann

    say = log or (lambda _m: None)
    if min_recall is not None and not (0.0 < min_recall <= 1.0):
        raise UsageError(f"--min-recall must be in (0, 1], got {min_recall}", hint="e.g. --min-recall 0.95")
    pool.lance_path(space)  # unknown space -> PoolError before any work
    rows = where_rows(pool, where) if where else None
    eligible = pool.rows if rows is None else len(rows)
    check_k(k, eligible, pool.rows, where)
    reason = why_ann = None
    estimate = None
    if ann_only and exact:
        raise UsageError("--ann and --exact exclude each other", hint="drop one of them")
    state = ann.index_state(pool, space)
    if ann_only and state is None:
        raise PoolError(f"space {space!r} has no ANN index",
                        hint=f"build one: dcdb index --pool {pool.path} --space {space} (or search with --exact)")
    if exact:
        reason = "--exact"
    elif ann_only:
        why_ann = "--ann"
    elif state is None:
        reason = "no ANN index (build one with `dcdb index`)"
    elif rows is not None and eligible <= ann.SELECTIVE_FRACTION * pool.rows:
        reason = f"--where keeps {eligible / pool.rows:.1%} of the rows: exact over them"
    else:
        mode, why, estimate = ann.choose_mode(pool, space, len(seeds), k, eligible=eligible,
                                              recall_sample=recall_sample)
        if mode == "exact":
            reason = why
        else:
            why_ann = why
    if reason is None:
        ann.check_fresh(pool, space, state)
        res = ann.ann_search(pool, space, seeds, k, rows=rows, min_recall=min_recall, recall_sample=recall_sample,
                             nprobes=nprobes, refine_factor=refine_factor, seed=seed, progress=progress, log=say)
        if res.mode == "ann":
            res.details["why_ann"] = why_ann
    else:
        res = exact_search(pool, space, seeds, k, rows=rows, where=where, progress=progress)
        res.details["why_exact"] = reason
    if estimate is not None:
        res.details["estimate_seconds"] = {m: round(v, 3) for m, v in estimate.items()}
    return res


def write_pairs(path, ds, result: KnnResult) -> None:
    """Per-seed table as Parquet: seed (0-based), uid, rank (1-based), similarity, row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dcdb.io import atomic_path, sweep_temps, writing

    s, k = result.rows.shape
    seed_id = np.repeat(np.arange(s, dtype=np.int32), k)
    rank = np.tile(np.arange(1, k + 1, dtype=np.int32), s)
    rows = result.rows.ravel()
    ok = rows >= 0
    tbl = pa.table({
        "seed": seed_id[ok], "uid": uids_of(ds, rows[ok]), "rank": rank[ok],
        "similarity": result.sims.ravel()[ok].astype(np.float32), "row": rows[ok],
    })
    sweep_temps(path)  # what a killed run left
    with writing(path, "output", redo="then re-run the command"), atomic_path(path) as tmp:
        pq.write_table(tbl, tmp)


def result_uids(ds, result: KnnResult) -> np.ndarray:
    """The union of the per-seed neighbours as a sorted DataComp uid array (each uid once)."""
    from dcdb import uids as U

    arr = U.from_arrow(uids_of(ds, result.union_rows()), source="pool uids")
    return U.sort(np.unique(arr))


def manifest(pool, space: str, seeds, result: KnnResult, arr: np.ndarray, *, where: str | None,
             output: str | None) -> dict[str, Any]:
    from datetime import UTC, datetime

    from dcdb.version import __version__

    return {
        "kind": "dcdb-subset",
        "filter": "knn",
        "space": space,
        "k": result.k,
        "seeds": len(seeds),
        "seed_sources": list(seeds.sources),
        "where": where,
        "where_semantics": "pre-filter" if where else None,
        "mode": result.mode,
        "recall_at_k": result.recall,
        "recall_seeds": result.recall_seeds,
        "details": result.details,
        "tie_rule": "similarity desc, then pool row asc",
        "pool": str(pool.path.resolve()),
        "pool_manifest_sha256": pool.manifest_hash,
        "pool_rows": pool.rows,
        "eligible_rows": result.eligible_rows,
        "rows": len(arr),
        "unique_uids": len(arr),
        "output": output,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(result.seconds, 4),
        "dcdb_version": __version__,
    }


def summary(result: KnnResult, n_seeds: int, n_uids: int) -> str:
    rec = ""
    if result.mode == "ann":
        rec = (f", recall@{result.k} {result.recall:.3f} on {result.recall_seeds} seeds"
               if result.recall is not None else ", recall not measured (--recall-sample 0)")
    return (f"knn ({result.mode}{rec}): {n_seeds:,} seeds x k={result.k} over {result.eligible_rows:,} rows -> "
            f"{n_uids:,} uids in {result.seconds:.2f}s")
