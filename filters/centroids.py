"""Nearest-centroid assignment for DataComp's image-based filter, streaming and exact.

DataComp assigns each vector to ``argmax_j <x, c_j>``: the plain dot product of the float32 vector
with the *unnormalised* centroids (k-means was L2, the assignment is not), computed by
``torch.einsum`` in float32, ties going to the first maximum. Here the same argmax is a numpy
float32 matmul over blocks of rows x blocks of centroids with a running (max, argmax), so the
memory is ``row_block x centroid_block`` floats whatever the pool or centroid count (100,000 x 768
centroids, a 12.8M-row pool), and later centroid blocks replace the running best only when strictly
greater (first maximum wins, as in torch/numpy argmax).

Float32 dot products summed in a different order (BLAS here, cuBLAS in DataComp) can differ in the
last bit, so a row whose two best centroids are within ~1e-6 may be assigned differently; on
random data this never happens, on real data it is a handful of rows per million.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

ROW_BLOCK = 4096
CENTROID_BLOCK = 8192


def assign(features: np.ndarray, centroids: np.ndarray, *, row_block: int = ROW_BLOCK,
           centroid_block: int = CENTROID_BLOCK) -> np.ndarray:
    """Index (int32) of the max-dot-product centroid of each row of ``features`` (first max wins).

    ``features`` (n, d) is converted to float32 a block at a time; ``centroids`` (k, d) float32.
    """
    n = features.shape[0]
    out = np.empty(n, dtype=np.int32)
    cents = np.ascontiguousarray(centroids, dtype=np.float32)
    for start in range(0, n, row_block):
        block = np.ascontiguousarray(features[start : start + row_block], dtype=np.float32)
        out[start : start + len(block)] = _assign_block(block, cents, centroid_block)
    return out


def _assign_block(block: np.ndarray, cents: np.ndarray, centroid_block: int) -> np.ndarray:
    best_val = None
    best_idx = None
    for c0 in range(0, cents.shape[0], centroid_block):
        sims = block @ cents[c0 : c0 + centroid_block].T
        idx = np.argmax(sims, axis=1)
        val = sims[np.arange(len(block)), idx]
        if best_val is None:
            best_val, best_idx = val, idx.astype(np.int64)
        else:
            # NaN never replaces (comparison false) unless already NaN; argmax treats NaN as max,
            # so a row with NaN similarities keeps the first NaN's index like numpy/torch.
            better = (val > best_val) | (np.isnan(val) & ~np.isnan(best_val))
            best_val = np.where(better, val, best_val)
            best_idx = np.where(better, idx + c0, best_idx)
    return best_idx.astype(np.int32)


def assign_batches(batches: Iterable[np.ndarray], centroids: np.ndarray) -> Iterator[np.ndarray]:
    """``assign`` over an iterator of (m, d) blocks (a pool scanned batch by batch)."""
    for b in batches:
        yield assign(b, centroids)


def target_centroids(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Sorted unique nearest-centroid ids of ``embeddings`` (DataComp: ``torch.unique`` of the
    ImageNet-1k embeddings' assignments)."""
    return np.unique(assign(embeddings, centroids)).astype(np.int32)
