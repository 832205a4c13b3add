"""Zero-shot evaluation of CLIP checkpoints (installed as ``dcdb.eval``)."""
