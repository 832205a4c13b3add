-- DataComp's `clip_score` baseline: keep rows whose CLIP image-text score is at least a threshold.
-- With -p threshold T the score is compared with T in float32 (as numpy compares a float32 column).
-- With -p fraction F the threshold is DataComp's: over the whole pool (N rows, NaN scores included),
-- the value at index int(N*F) of the scores sorted in descending order with NaN last; rows >= it are
-- kept (so int(N*F)+1 rows plus ties). If that index falls on a NaN score, nothing is kept.
-- NaN scores never pass. Examples: -p arch l14 -p fraction 0.3; -p arch b32 -p threshold 0.25.
-- @param arch str   which score: l14 (clip_l14_similarity_score) or b32 (clip_b32_similarity_score)
-- @param fraction float = null   keep this top fraction of the pool, in (0, 1]
-- @param threshold float = null  keep scores >= this value (give fraction or threshold, not both)
-- @asset none
SELECT uid
FROM baseline_pool(arch := $arch)
WHERE clip_score >= clip_cut($arch, $fraction, $threshold)
