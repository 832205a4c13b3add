-- DataComp's `image_based_intersect_clip_score` baseline: the CLIP score threshold first (with a
-- fraction, computed over the whole pool exactly as `clip_score` does), then `image_based` on the
-- rows that pass it.
-- @param arch str   which score: l14 or b32
-- @param fraction float = null   keep this top fraction of the pool by score, in (0, 1]
-- @param threshold float = null  or keep scores >= this value (give fraction or threshold, not both)
-- @param centroids path   DataComp's {small,medium,large,xlarge}_centroids_l14.pt (K x 768) or a .npy
-- @param imagenet_embeddings path   glob of DataComp's in1k_clip_vit_l14_*.pt ({"image_features": tensor}) or .npy files
-- @param lang_column str = lang   column holding the caption language (DataComp: fastText lid.176)
-- @asset centroids   pool k-means centroids (-p centroids FILE)
-- @asset imagenet_embeddings   ImageNet-1k train CLIP L/14 image embeddings (-p imagenet_embeddings 'GLOB')
-- @asset lang   derived column: `dcdb annotate --pool P lang`; `dcdb annotate --pool P centroids` precomputes the assignment
SELECT uid
FROM baseline_pool(lang_column := $lang_column, arch := $arch, centroids := $centroids)
WHERE clip_score >= clip_cut($arch, $fraction, $threshold)
  AND caption_lang = 'en'
  AND ft_tokens_gt(text, 1)
  AND length(text) > 5
  AND assigned_centroid IN (SELECT unnest(target_centroids($centroids, $imagenet_embeddings)))
