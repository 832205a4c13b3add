-- Nearest-neighbour subset: the union of the k nearest pool rows (cosine, exact) of every seed
-- vector in a Parquet file (one vector per row, e.g. ImageNet image embeddings of the space's model).
-- Ties: higher similarity first, then the lower pool row. For ANN search through a Lance index with
-- recall reported, per-seed tables and --where pre-filters use `dcdb knn`; knn_ann(...) is the
-- SQL form with a recall column.
-- @param seeds path   Parquet file with a column emb (list of floats, the space's dim)
-- @param k int = 10   neighbours per seed
-- @param space str = l14_img   embedding space searched
-- @asset seeds   the seed embeddings
SELECT DISTINCT uid
FROM knn($space, (SELECT emb FROM read_parquet($seeds)), $k)
