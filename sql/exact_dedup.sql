-- Keep one row per group of exact duplicates: rows sharing a key value, the smallest uid kept.
-- Keys: sha256 (same image bytes), url, text (caption normalised: NFKC, lower case, whitespace
-- collapsed; punctuation kept), or any other non-vector column of the pool. NULL and empty
-- values are never duplicates. Computed on the fly; nothing to prepare.
-- @param key str = sha256   the column whose equal values make duplicates
-- @asset none
SELECT uid FROM pool
WHERE uid NOT IN (SELECT uid FROM exact_duplicates($key))
