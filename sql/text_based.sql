-- DataComp's `text_based` baseline: English captions (fastText language id) with some whitespace
-- token (text.split(), punctuation kept) whose first WordNet synset -- wordnet.synsets(token)[0]
-- with NLTK 3.8.1's morphy lemmatisation, any part of speech -- has its offset in the list of
-- ImageNet-21k WordNet ids (the POS letter of each id is dropped, as DataComp does).
-- @param wordnet_ids path   DataComp's imagenet21k_wordnet_ids.txt (one WNID like n01440764 per line)
-- @param lang_column str = lang   column holding the caption language (DataComp: fastText lid.176)
-- @asset wordnet_ids   the WNID list (-p wordnet_ids FILE)
-- @asset wordnet   WordNet 3.0 database: Debian's wordnet-base (/usr/share/wordnet) or $DCDB_WORDNET
-- @asset lang   derived column: `dcdb annotate --pool P lang`; `dcdb annotate --pool P wordnet` precomputes the lookups
SELECT uid
FROM baseline_pool(lang_column := $lang_column)
WHERE caption_lang = 'en'
  AND wordnet_hit(wordnet_offsets, $wordnet_ids)
