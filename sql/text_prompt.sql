-- Rows whose image embedding is close to a text prompt encoded by the pool's own CLIP model:
-- cosine(l14_img, clip_text(prompt, 'l14')) >= threshold. The model's checkpoint is the one set
-- with `dcdb encoder --pool P --space l14 --checkpoint CKPT` (a demo-world pool finds its teacher).
-- @param prompt str   the text, e.g. "a photo of a dog"
-- @param threshold float = 0.22   minimum cosine similarity
-- @asset checkpoint   the CLIP checkpoint behind the l14 space (dcdb encoder)
SELECT uid
FROM pool
WHERE cosine(l14_img, clip_text($prompt, 'l14')) >= $threshold
