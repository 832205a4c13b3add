"""Shared fixtures: small seeded DataComp-format sources and an ingested pool.

- ``make_src(rows=..., shards=..., **synth_kwargs)``: a factory writing a fresh source folder under
  this test's tmp_path (seeded, so every call with the same arguments gives the same bytes).
- ``tiny_src``: 10 rows in 2 shards, with float16 embeddings.
- ``small_src``: 200 rows in 3 shards, with float16 embeddings.
- ``small_pool``: ``small_src`` ingested. Built once per session and copied for each test, so a
  test may write into its pool (stored subsets, derived columns) without affecting others.

Sources are function-scoped because tests corrupt them on purpose; generating one takes ~20 ms.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL_ROWS, SMALL_SHARDS, SMALL_SEED = 200, 3, 7
TINY_ROWS, TINY_SHARDS, TINY_SEED = 10, 2, 11


@pytest.fixture
def make_src(tmp_path):
    """Factory: ``make_src(rows=200, shards=3, seed=0, name="src", **kwargs) -> Path``."""
    from dcdb.demo.synth import synth_pool

    def make(
        rows: int = SMALL_ROWS, shards: int = SMALL_SHARDS, seed: int = 0, name: str = "src", **kwargs
    ) -> Path:
        out = tmp_path / name
        synth_pool(out, rows=rows, shards=shards, seed=seed, jobs=1, **kwargs)
        return out

    return make


@pytest.fixture
def tiny_src(make_src) -> Path:
    """10 rows in 2 shards (parquet + float16 npz)."""
    return make_src(rows=TINY_ROWS, shards=TINY_SHARDS, seed=TINY_SEED, name="tiny_src")


@pytest.fixture
def small_src(make_src) -> Path:
    """200 rows in 3 shards (parquet + float16 npz)."""
    return make_src(rows=SMALL_ROWS, shards=SMALL_SHARDS, seed=SMALL_SEED, name="small_src")


@pytest.fixture(scope="session")
def _small_pool_template(tmp_path_factory) -> Path:
    from dcdb.ingest.pool import ingest
    from dcdb.demo.synth import synth_pool

    root = tmp_path_factory.mktemp("small_pool_template")
    synth_pool(root / "src", rows=SMALL_ROWS, shards=SMALL_SHARDS, seed=SMALL_SEED, jobs=1)
    ingest(root / "src", root / "pool", jobs=1)
    return root / "pool"


@pytest.fixture
def small_pool(_small_pool_template, tmp_path) -> Path:
    """A complete pool of ``small_src``'s data (200 rows, 3 shards, 4 spaces); a private copy."""
    dest = tmp_path / "small_pool"
    shutil.copytree(_small_pool_template, dest)
    return dest
