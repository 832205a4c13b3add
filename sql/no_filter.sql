-- Keep every row of the pool (DataComp's `no_filter` baseline).
-- Duplicate uids in the pool stay duplicated in the output, as in DataComp.
-- @asset none
SELECT uid FROM pool
