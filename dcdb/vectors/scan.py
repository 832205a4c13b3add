"""Scans of a pool's embedding space: exact top-k (cosine), streaming -- what ``knn``, ``ann``,
``seeds`` and the SQL ``knn()`` share.

For each seed (a row of an ``(n, d)`` float32 matrix) the ``k`` pool rows of highest cosine
similarity. The pool's vectors are streamed from its Lance table a batch at a time (float16 on
disk, widened and L2-normalised per batch), multiplied with all seeds in sub-blocks sized so that
the similarity block stays within ``SIM_BUDGET`` bytes, and merged into a running top-k per seed:

* a row enters a seed's top-k only if its similarity is strictly greater than the seed's current
  k-th best (rows come in ascending row order, so an equal later row never displaces an earlier
  one); the candidates of a block are the few entries above that threshold (``np.nonzero``), so
  after the first blocks the merge costs almost nothing next to the matmul;
* while a seed's top-k is not yet full (the first block) the block's own k-th largest value
  (``np.partition``) bounds the candidates, so no block ever produces more than ~k candidates per
  seed plus ties.

**Tie rule** (deterministic): neighbours are ordered by similarity descending, then by pool row
index ascending; with equal similarities the lower row index wins the last place.

**Rows that never match**: pool rows whose vector is NULL, zero or not finite have no cosine and
are never neighbours. Memory is ``O(seeds x (d + k) + SIM_BUDGET + one Lance batch)`` whatever the
pool size (1M x 768 with 10,000 seeds stays well under 2 GB, see benchmarks/bench_knn.py).

Result positions are pool row indices (row i of ``pool``); ``uids_of`` maps them to uids through
the Lance table's ``uid`` column.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dcdb.errors import PoolError, UsageError

SIM_BUDGET = 192 << 20  # bytes of one seeds x rows similarity block (float32)
LANCE_BATCH = 1 << 15  # rows read from Lance at a time
TAKE_CHUNK = 1 << 15  # rows fetched per Lance take() on the filtered path
#: Below this fraction of passing rows, the filtered path fetches only those rows (take) instead
#: of streaming the whole table and dropping the others.
TAKE_FRACTION = 0.2


# --------------------------------------------------------------------------------- running top-k


class TopK:
    """Running top-k (similarity desc, row asc) of ``n`` seeds over blocks of ascending rows."""

    def __init__(self, n: int, k: int):
        self.k = int(k)
        self.vals = np.full((n, self.k), -np.inf, dtype=np.float32)
        self.rows = np.full((n, self.k), -1, dtype=np.int64)
        self.kth = np.full(n, -np.inf, dtype=np.float32)

    def push(self, sims: np.ndarray, rows: np.ndarray, seed_offset: int = 0) -> None:
        """Merge a similarity block ``sims`` (seeds x len(rows), seeds starting at
        ``seed_offset``) whose columns are pool rows ``rows`` (ascending, after every row seen)."""
        m, b = sims.shape
        if b == 0:
            return
        kth = self.kth[seed_offset : seed_offset + m]
        mask = sims > kth[:, None]
        if b > self.k and np.count_nonzero(mask) > 2 * m * self.k + 1024:
            # Bound the candidates by the block's own k-th largest value (ties included).
            part = np.partition(sims, b - self.k, axis=1)[:, b - self.k]
            mask &= sims >= part[:, None]
        si, bj = np.nonzero(mask)
        if len(si) == 0:
            return
        self._merge(si + seed_offset, sims[si, bj], rows[bj])

    def _merge(self, seeds: np.ndarray, vals: np.ndarray, rows: np.ndarray) -> None:
        k = self.k
        aff = np.unique(seeds)
        all_seed = np.concatenate([np.repeat(aff, k), seeds])
        all_val = np.concatenate([self.vals[aff].ravel(), vals.astype(np.float32, copy=False)])
        all_row = np.concatenate([self.rows[aff].ravel(), rows])
        # Empty slots (row -1, -inf) sort after every real candidate (finite similarity).
        order = np.lexsort((np.where(all_row < 0, np.iinfo(np.int64).max, all_row), -all_val, all_seed))
        s_sorted = all_seed[order]
        starts = np.searchsorted(s_sorted, aff)
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.append(starts, len(order))))
        keep = order[rank < k]
        self.vals[aff] = all_val[keep].reshape(len(aff), k)
        self.rows[aff] = all_row[keep].reshape(len(aff), k)
        self.kth[aff] = self.vals[aff, k - 1]


# ------------------------------------------------------------------------------------ pool scans


def open_space(pool, space: str):
    """The Lance dataset of ``space`` (checked against the pool's row count) and its dim."""
    from dcdb.store import open_lance

    path = pool.lance_path(space)  # PoolError naming the pool's spaces when unknown
    ds = open_lance(path)  # PoolError when a data file is missing or damaged
    if ds.count_rows() != pool.rows:
        raise PoolError(
            f"embedding table {space!r} has {ds.count_rows()} rows, the pool {pool.rows}",
            hint="the pool is damaged or was changed by hand; re-ingest it",
        )
    return ds, int(pool.spaces[space]["dim"])


def _to_matrix(col, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Arrow fixed-size-list column -> (float32 L2-normalised (n, d) matrix, valid mask)."""
    n = len(col)
    if col.null_count:
        import pyarrow as pa
        import pyarrow.compute as pc

        valid_arrow = pc.is_valid(col).to_numpy(zero_copy_only=False)
        filled = pc.if_else(pc.is_valid(col), col, pa.scalar([0.0] * dim, col.type))
        flat = filled.flatten()
    else:
        valid_arrow = None
        flat = col.flatten()
    mat = flat.to_numpy(zero_copy_only=False).reshape(n, dim).astype(np.float32, copy=False)
    if not mat.flags.writeable:
        mat = mat.copy()
    norms = np.sqrt(np.einsum("ij,ij->i", mat, mat))
    valid = np.isfinite(norms) & (norms > 0)
    if valid_arrow is not None:
        valid &= valid_arrow
    if not valid.all():
        mat[~valid] = 0.0
        norms[~valid] = 1.0
    mat /= norms[:, None]
    return mat, valid


def scan_vectors(ds, space: str, dim: int, rows: np.ndarray | None = None,
                 batch_rows: int = LANCE_BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (row indices, normalised float32 vectors) over the whole table or over ``rows``
    (sorted row indices); rows with no usable vector are left out."""
    n_total = ds.count_rows()
    if rows is not None and len(rows) < TAKE_FRACTION * n_total:
        for i in range(0, len(rows), TAKE_CHUNK):
            idx = rows[i : i + TAKE_CHUNK]
            tbl = ds.take(idx.tolist(), columns=[space])
            mat, valid = _to_matrix(tbl.column(0).combine_chunks(), dim)
            yield (idx[valid], mat[valid]) if not valid.all() else (idx, mat)
        return
    keep = None
    if rows is not None:
        keep = np.zeros(n_total, dtype=bool)
        keep[rows] = True
    start = 0
    from dcdb.store import lance_batches

    batches = lance_batches(ds.to_batches(columns=[space], batch_size=batch_rows, scan_in_order=True), ds.uri)
    for col in _gathered(batches, batch_rows):
        n = len(col)
        mat, valid = _to_matrix(col, dim)
        if keep is not None:
            valid &= keep[start : start + n]
        idx = np.arange(start, start + n, dtype=np.int64)
        start += n
        if valid.all():
            yield idx, mat
        elif valid.any():
            yield idx[valid], mat[valid]


def _gathered(batches, rows: int):
    """Lance yields small batches (about 1k rows); gather them into arrays of >= ``rows`` rows so
    each matmul is large enough to run at BLAS speed."""
    import pyarrow as pa

    parts, n = [], 0
    for b in batches:
        parts.append(b.column(0))
        n += b.num_rows
        if n >= rows:
            yield pa.concat_arrays(parts)
            parts, n = [], 0
    if parts:
        yield pa.concat_arrays(parts)


def exact_topk(seeds: np.ndarray, blocks, k: int, *, progress: Callable[[int], None] | None = None) -> TopK:
    """Top-k (cosine) of each (normalised) seed over ``blocks`` of (rows, normalised vectors)."""
    seeds = np.ascontiguousarray(seeds, dtype=np.float32)
    s = len(seeds)
    top = TopK(s, k)
    seed_block = min(s, 16384)
    sub = max(256, SIM_BUDGET // (4 * max(seed_block, 1)))
    for rows, mat in blocks:
        for r0 in range(0, len(rows), sub):
            part = mat[r0 : r0 + sub]
            prow = rows[r0 : r0 + sub]
            for s0 in range(0, s, seed_block):
                sims = seeds[s0 : s0 + seed_block] @ part.T
                top.push(sims, prow, seed_offset=s0)
        if progress:
            progress(len(rows))
    return top


# ------------------------------------------------------------------------------------- results


def rows_bar(total: int, desc: str, enabled: bool):
    """tqdm bar on stderr counting rows (rows/s)."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit="rows", unit_scale=True, desc=desc, file=sys.stderr, disable=not enabled)


@dataclass
class KnnResult:
    """Per-seed neighbours: ``rows[i, r]`` is the pool row of seed i's rank-r neighbour (-1 when
    fewer than k rows were eligible), ``sims`` its cosine similarity."""

    rows: np.ndarray
    sims: np.ndarray
    k: int
    mode: str  # "exact" or "ann"
    seconds: float
    eligible_rows: int
    recall: float | None = None  # ANN: recall@k on the sampled seeds
    recall_seeds: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def union_rows(self) -> np.ndarray:
        r = self.rows.ravel()
        return np.unique(r[r >= 0])


def uids_of(ds, rows: np.ndarray):
    """Pool rows -> the uid strings (Arrow array) of the Lance table, in the given order."""
    import pyarrow as pa

    if len(rows) == 0:
        return pa.array([], pa.string())
    order = np.argsort(rows, kind="stable")
    parts = []
    srt = rows[order]
    for i in range(0, len(srt), 1 << 16):
        parts.append(ds.take(srt[i : i + (1 << 16)].tolist(), columns=["uid"]).column(0).combine_chunks())
    got = pa.concat_arrays(parts)
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    return got.take(pa.array(inv))


def check_k(k: int, eligible: int, total: int, where: str | None) -> None:
    if k <= 0:
        raise UsageError(f"-k must be at least 1, got {k}", hint="e.g. -k 50")
    if k > total:
        raise UsageError(f"-k {k} is larger than the pool ({total:,} rows)", hint=f"use -k {total} or less")
    if k > eligible:
        raise UsageError(
            f"-k {k} is larger than the {eligible:,} rows that pass --where {where!r}",
            hint=f"use -k {eligible} or less, or loosen the filter",
        )


def exact_search(pool, space: str, seeds: np.ndarray, k: int, *, rows: np.ndarray | None = None,
                 where: str | None = None, progress: bool = False) -> KnnResult:
    """Exact top-k of each seed among the pool's rows (or among ``rows``), streaming."""
    ds, dim = open_space(pool, space)
    eligible = pool.rows if rows is None else len(rows)
    check_k(k, eligible, pool.rows, where)
    t0 = time.perf_counter()
    with rows_bar(eligible, f"knn {space}", progress) as pb:
        top = exact_topk(seeds, scan_vectors(ds, space, dim, rows), k, progress=pb.update)
    return KnnResult(rows=top.rows, sims=top.vals, k=k, mode="exact", seconds=time.perf_counter() - t0,
                     eligible_rows=eligible)
