-- DataComp's `image_based` baseline: a caption filter (English by fastText language id, more than 1
-- fastText token -- newline counts as a token --, more than 5 characters) AND the row's l14_img is
-- nearest (plain dot product with the unnormalised centroids, first maximum wins) to a centroid that
-- is the nearest centroid of some ImageNet-1k training image embedding.
-- @param centroids path   DataComp's {small,medium,large,xlarge}_centroids_l14.pt (K x 768) or a .npy
-- @param imagenet_embeddings path   glob of DataComp's in1k_clip_vit_l14_*.pt ({"image_features": tensor}) or .npy files
-- @param lang_column str = lang   column holding the caption language (DataComp: fastText lid.176)
-- @asset centroids   pool k-means centroids (-p centroids FILE)
-- @asset imagenet_embeddings   ImageNet-1k train CLIP L/14 image embeddings (-p imagenet_embeddings 'GLOB')
-- @asset lang   derived column: `dcdb annotate --pool P lang`; `dcdb annotate --pool P centroids` precomputes the assignment
SELECT uid
FROM baseline_pool(lang_column := $lang_column, centroids := $centroids)
WHERE caption_lang = 'en'
  AND ft_tokens_gt(text, 1)
  AND length(text) > 5
  AND assigned_centroid IN (SELECT unnest(target_centroids($centroids, $imagenet_embeddings)))
