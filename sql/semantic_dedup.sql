-- Keep one row per group of near duplicates (SemDeDup-style): within k-means clusters of an
-- embedding space, rows at cosine >= threshold are linked, linked rows form a group, the row
-- with the smallest uid of each group is kept. Compute the groups once first:
-- `dcdb dedup --pool P --space l14_img --threshold 0.95`.
-- @param space str = l14_img     embedding space the groups were computed on
-- @param threshold float = 0.95  cosine threshold they were computed at
-- @asset none
SELECT uid FROM pool
WHERE uid NOT IN (SELECT uid FROM near_duplicates($space, $threshold))
