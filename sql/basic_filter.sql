-- DataComp's `basic_filter` baseline: English captions (top-1 fastText language id of the caption,
-- newlines as spaces) with more than 2 words (Python's text.split()) and more than 5 characters,
-- images at least 200 px on the short side with max/min side ratio at most 3.
-- Rows with a NULL/NaN width, height or caption never pass. Duplicate uids stay duplicated.
-- @param lang_column str = lang   column holding the caption language (DataComp: fastText lid.176)
-- @asset lang   derived column: `dcdb annotate --pool P lang` (fastText), or import one with --from
SELECT uid
FROM baseline_pool(lang_column := $lang_column)
WHERE caption_lang = 'en'
  AND words_gt(text, 2)
  AND length(text) > 5
  AND original_width >= 200
  AND original_height >= 200
  AND greatest(original_width, original_height) / least(original_width, original_height) <= 3.0
