"""Distributed execution of a filter's plan (``dcdb.plan``) over uid buckets: Ray or serial
(``execute``)."""
