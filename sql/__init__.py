"""Filter files (``*.sql``), shipped as package data and found by name (installed as ``dcdb.sql``)."""
