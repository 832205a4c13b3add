-- Decontamination: drops pool rows whose l14_img embedding has cosine >= threshold with any
-- embedding of an evaluation set (exact, streaming), keeps the rest. The evaluation set is a .npy
-- (n x 768) or .parquet of embeddings, or a folder of evaluation tasks in the clip_benchmark layout
-- (e.g. a demo world's eval/) whose images are encoded by the l14 model (see `dcdb encoder`).
-- @param eval path   evaluation embeddings (.npy/.parquet) or task folder
-- @param threshold float = 0.9   cosine at or above which a row counts as contaminated
-- @asset eval   the evaluation set
SELECT uid
FROM pool
WHERE NOT contaminated(l14_img, $eval, $threshold)
