-- DataComp's `laion2b` baseline (the LAION-2B recipe): English captions by CLD3 language id AND
-- clip_b32_similarity_score >= 0.28 (compared in float32). NaN scores never pass.
-- @param lang_column str = lang_cld3   language column; DataComp used CLD3 (gcld3) here
-- @param threshold float = 0.28        minimum clip_b32_similarity_score
-- @asset lang_cld3   derived column: `dcdb annotate --pool P lang_cld3` (CLD3), or -p lang_column lang
SELECT uid
FROM baseline_pool(lang_column := $lang_column)
WHERE caption_lang = 'en'
  AND clip_b32_similarity_score >= clip_threshold_as('b32', $threshold)
