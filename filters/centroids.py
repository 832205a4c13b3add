"""Nearest-centroid assignment for DataComp's image-based filter: exact, streaming, at GEMM speed.

DataComp assigns each vector to ``argmax_j <x, c_j>``: the plain dot product of the float32 vector
with the *unnormalised* centroids (k-means was L2, the assignment is not), computed by
``torch.einsum`` in float32 on a GPU, ties going to the first maximum. A float32 dot product
depends on the order its 768 products are summed in (cuBLAS, MKL and OpenBLAS each have their own,
which may even change with the batch size), so when the two best centroids of a row are closer than
the rounding error, which one "wins" in float32 is an accident of the library.

dcdb computes the argmax of the *exact* dot products instead, first maximum winning on exact ties,
at the price of a float32 matmul:

1. a float32 matmul over blocks of rows x blocks of centroids keeps, per row, the best value, its
   index (first maximum: a later centroid block replaces it only when strictly greater) and the
   runner-up value. Memory is ``row_block x centroid_block`` floats whatever the pool or centroid
   count (100,000 x 768 centroids, a 12.8M-row pool);
2. every float32 dot product is within ``E = gamma_d * |x| * |c|`` of the exact one, whatever the
   summation order (``gamma_d = d*u / (1 - d*u)``, ``u = 2**-24``; Higham, *Accuracy and Stability
   of Numerical Algorithms*, 3.1). A row whose runner-up is below ``best - 2 * gamma_d * |x| *
   max|c|`` has a certain winner: the float32 argmax is the exact argmax;
3. the other rows (near-ties: 0.14% of the benchmark's rows with 4,096 centroids) get their
   candidates (every centroid within that margin of the best: provably a superset of the exact
   maxima) re-scored in float64, where the same bound (``u = 2**-53``) settles all but exact or
   sub-1e-13 ties; those are scored with ``math.fsum`` of the float64 products, which are exact: the
   correctly rounded dot product, the same on every machine. The first largest candidate wins.

So the result is the argmax of the exact dot products (first maximum on exact ties), bit for bit
the same on every CPU, BLAS, thread count and batch size -- the derived column (``dcdb annotate
centroids``) and an assignment computed in a query, on any subset of rows, always agree -- and it is
numpy's float64 argmax wherever float64 itself separates the two best. It equals DataComp's float32
result except on rows where float32 rounding decides a near-tie (``benchmarks/bench_centroids.py
--ties``: no row of 200,000 pool vectors x 4,096 centroids differs from torch's einsum; in a stress
case of centroids in tight groups, 1.8% of rows differ from torch's einsum and 3.6% from numpy's
float32 matmul -- which differ from each other on 3.7%). Vectors with NaN or infinite values keep
float32 argmax semantics (NaN counts as the maximum, as in numpy and torch).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

ROW_BLOCK = 4096
CENTROID_BLOCK = 8192
#: What a stored assignment (``dcdb annotate centroids``) records; the query uses a stored one only
#: when it says this (an older float32-argmax column may differ on near-ties).
ASSIGNMENT = "argmax of the exact dot product (float32 matmul, near-ties re-scored exactly), first maximum"
_U = 2.0**-24  # unit roundoff of float32

#: Rows assigned by :func:`assign` in this process so far, and how many of them were near-ties
#: re-scored exactly (benchmarks and tests read them: how many rows a statement really assigned).
rows_assigned = 0
rows_rescored = 0
_count_lock = threading.Lock()


@dataclass(frozen=True)
class Centroids:
    """Centroids prepared once for many :func:`assign` calls: float32 (K, d) C-contiguous, the
    largest row norm (for the rounding bound) and whether every value is finite."""

    matrix: np.ndarray
    max_norm: float
    finite: bool

    @classmethod
    def of(cls, centroids: np.ndarray | Centroids) -> Centroids:
        if isinstance(centroids, Centroids):
            return centroids
        mat = np.ascontiguousarray(centroids, dtype=np.float32)
        if mat.ndim != 2:
            raise ValueError(f"centroids must be a 2-D array, got shape {mat.shape}")
        finite = bool(np.isfinite(mat).all())
        norm = 0.0
        if finite and len(mat):
            norm = float(np.sqrt(np.einsum("ij,ij->i", mat, mat, dtype=np.float64).max()))
        return cls(mat, norm, finite)


def rounding_bound(dim: int, unit: float = _U) -> float:
    """``gamma_d``: the relative error bound of a dot product of length ``dim`` summed in any order
    in a format of unit roundoff ``unit`` (float32 by default)."""
    du = dim * unit
    return du / (1.0 - du)


def assign(features: np.ndarray, centroids: np.ndarray | Centroids, *, row_block: int = ROW_BLOCK,
           centroid_block: int = CENTROID_BLOCK) -> np.ndarray:
    """Index (int32) of the max-dot-product centroid of each row of ``features``: the argmax of the
    exact dot products, first maximum winning (see the module docstring).

    ``features`` (n, d) is converted to float32 a block at a time; ``centroids`` (k, d) float32,
    or a :class:`Centroids` prepared once.
    """
    cents = Centroids.of(centroids)
    n = features.shape[0]
    out = np.empty(n, dtype=np.int32)
    for start in range(0, n, row_block):
        block = np.ascontiguousarray(features[start : start + row_block], dtype=np.float32)
        out[start : start + len(block)] = _assign_block(block, cents, centroid_block)
    _count(assigned=n)
    return out


def _count(assigned: int = 0, rescored: int = 0) -> None:
    global rows_assigned, rows_rescored
    with _count_lock:
        rows_assigned += assigned
        rows_rescored += rescored


def _assign_block(block: np.ndarray, cents: Centroids, centroid_block: int) -> np.ndarray:
    mat = cents.matrix
    one_block = mat.shape[0] <= centroid_block
    sims = block @ mat.T if one_block else None
    best_val, best_idx, second = _best_two(block, mat, centroid_block, sims)
    if not cents.finite or mat.shape[0] < 2 or len(block) == 0:
        return best_idx.astype(np.int32)
    # Rows whose runner-up is within the rounding margin of the best: the float32 order may be wrong.
    margin = _margin(block, cents)
    with np.errstate(invalid="ignore"):
        near = np.isfinite(best_val) & (second.astype(np.float64) >= best_val - margin)
    rows = np.flatnonzero(near)
    if len(rows):
        _count(rescored=len(rows))
        if sims is None:
            sims = np.concatenate([block[rows] @ mat[c0 : c0 + centroid_block].T
                                   for c0 in range(0, mat.shape[0], centroid_block)], axis=1)
        else:
            sims = sims[rows]  # (the best entries were overwritten: re-take them below)
            sims[np.arange(len(rows)), best_idx[rows]] = best_val[rows]
        best_idx[rows] = _exact_argmax(block[rows], mat, sims, margin[rows])
    return best_idx.astype(np.int32)


def _margin(block: np.ndarray, cents: Centroids) -> np.ndarray:
    """2 * gamma_d * |x| * max|c| per row (float64), widened by 2% for the rounding of the norms
    (float32 sums of squares: relative error below gamma_d) and of this product."""
    norms = np.sqrt(np.einsum("ij,ij->i", block, block).astype(np.float64))
    return 2.04 * rounding_bound(block.shape[1]) * norms * cents.max_norm


def _best_two(block: np.ndarray, cents: np.ndarray, centroid_block: int, sims: np.ndarray | None):
    """(best value, its index (first maximum), runner-up value) of ``block @ cents.T`` per row;
    ``sims`` is that product when it was computed in one piece (its best entries are overwritten)."""
    n = len(block)
    rows = np.arange(n)
    best_val = np.full(n, -np.inf, dtype=np.float32)
    best_idx = np.zeros(n, dtype=np.int64)
    second = np.full(n, -np.inf, dtype=np.float32)
    for c0 in range(0, cents.shape[0], centroid_block):
        part = sims if sims is not None else block @ cents[c0 : c0 + centroid_block].T
        idx = np.argmax(part, axis=1)
        val = part[rows, idx]
        if part.shape[1] > 1:
            part[rows, idx] = -np.inf
            runner = part.max(axis=1)
        else:
            runner = np.full(n, -np.inf, dtype=np.float32)
        if c0 == 0:
            best_val, best_idx, second = val, idx.astype(np.int64), runner
            continue
        # A later block wins only when strictly greater (first maximum). NaN: argmax treats it as the
        # maximum, so a NaN replaces a number and is never replaced (numpy/torch keep the first NaN).
        better = (val > best_val) | (np.isnan(val) & ~np.isnan(best_val))
        second = np.where(better, np.maximum(best_val, runner), np.maximum(second, val))
        best_val = np.where(better, val, best_val)
        best_idx = np.where(better, idx + c0, best_idx)
    return best_val, best_idx, second


def _exact_argmax(rows: np.ndarray, cents: np.ndarray, sims: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """First maximum of the exact dot products of each row with the centroids whose float32 value
    ``sims`` is within ``margin`` of the row's largest: a superset of the exact maxima, since each
    float32 value is within half the margin of its exact value. The candidates are scored in float64
    (within ``gamma_d`` of float64 of the exact value: one of them is then certain unless two are
    within that bound), and those still tied by ``math.fsum`` of the float64 products, which are
    exact: the correctly rounded dot product."""
    out = np.empty(len(rows), dtype=np.int64)
    rows64 = rows.astype(np.float64)
    margin64 = margin * (rounding_bound(rows.shape[1], 2.0**-53) / rounding_bound(rows.shape[1]))
    for i, (x, s, m, m64) in enumerate(zip(rows64, sims, margin, margin64, strict=True)):
        candidates = np.flatnonzero(s.astype(np.float64) >= float(s.max()) - m)  # ascending
        c64 = cents[candidates].astype(np.float64)
        v = c64 @ x
        close = np.flatnonzero(v >= v.max() - m64)
        if len(close) == 1:
            out[i] = candidates[close[0]]
            continue
        # float32 x float32 products are exact in float64; fsum rounds their sum once
        exact = list(map(math.fsum, (c64[close] * x).tolist()))
        out[i] = candidates[close[exact.index(max(exact))]]  # the first of the largest
    return out


def assign_batches(batches: Iterable[np.ndarray], centroids: np.ndarray | Centroids) -> Iterator[np.ndarray]:
    """``assign`` over an iterator of (m, d) blocks (a pool scanned batch by batch)."""
    cents = Centroids.of(centroids)
    for b in batches:
        yield assign(b, cents)


def target_centroids(embeddings: np.ndarray, centroids: np.ndarray | Centroids) -> np.ndarray:
    """Sorted unique nearest-centroid ids of ``embeddings`` (DataComp: ``torch.unique`` of the
    ImageNet-1k embeddings' assignments)."""
    return np.unique(assign(embeddings, centroids)).astype(np.int32)
