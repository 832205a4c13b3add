"""Ingest: a DataComp metadata folder into a pool store (``pool``), and the uid-bucket layout
(``buckets``)."""
