"""Vectors: exact kNN over a space (``knn``), Lance ANN indexes (``ann``), seed sets (``seeds``)
and near-duplicate groups (``dedup``)."""
