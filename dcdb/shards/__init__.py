"""Webdataset shards: the shard index of downloaded tars (``index``) and the resharder
(``reshard``) that writes a subset's samples in DataComp's layout."""
