"""Vectors: shared space scans and exact top-k (``scan``), kNN search over a space (``knn``), Lance
ANN indexes (``ann``), seed sets (``seeds``) and near-duplicate groups (``dedup``)."""
