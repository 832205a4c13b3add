"""CLIP training with DataComp's fixed recipes (installed as ``dcdb.train``)."""
