"""Shared fixtures: small seeded DataComp-format sources and an ingested pool.

- ``make_src(rows=..., shards=..., **synth_kwargs)``: a factory writing a fresh source folder under
  this test's tmp_path (seeded, so every call with the same arguments gives the same bytes).
- ``tiny_src``: 10 rows in 2 shards, with float16 embeddings.
- ``small_src``: 200 rows in 3 shards, with float16 embeddings.
- ``small_pool``: ``small_src`` ingested. Built once per session and copied for each test, so a
  test may write into its pool (stored subsets, derived columns) without affecting others.
- ``demo``: ``dcdb demo``'s whole loop, miniature (world, trained teachers, pool, subsets, students,
  leaderboard), run once per session for every test that needs a demo world or trained teachers.
  Only tests marked ``slow`` use it (it trains four small CLIPs: about a minute on 2 cores).

Sources are function-scoped because tests corrupt them on purpose: each is a private copy of a
source generated once per session for its arguments.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL_ROWS, SMALL_SHARDS, SMALL_SEED = 200, 3, 7
TINY_ROWS, TINY_SHARDS, TINY_SEED = 10, 2, 11


@pytest.fixture(scope="session")
def _src_cache(tmp_path_factory) -> dict:
    """Sources already generated this session: (rows, shards, seed, kwargs) -> folder (never handed out)."""
    return {"root": tmp_path_factory.mktemp("src_cache"), "made": {}}


#: synth_pool arguments that only select what is generated (a source with them is cached)
_DATA_KWARGS = {"dtype", "embeddings", "nan_fraction"}


@pytest.fixture
def make_src(tmp_path, _src_cache):
    """Factory: ``make_src(rows=200, shards=3, seed=0, name="src", **kwargs) -> Path``.

    synth_pool gives the same bytes for the same arguments (tests/test_synth.py), so each set of
    arguments is generated once per session and copied (files with fresh times) into the test's
    folder; an existing folder or other arguments (``force``) go to synth_pool itself.
    """
    from dcdb.demo.synth import synth_pool

    def make(
        rows: int = SMALL_ROWS, shards: int = SMALL_SHARDS, seed: int = 0, name: str = "src", **kwargs
    ) -> Path:
        out = tmp_path / name
        if out.exists() or not set(kwargs) <= _DATA_KWARGS:
            synth_pool(out, rows=rows, shards=shards, seed=seed, jobs=1, **kwargs)
            return out
        key = (rows, shards, seed, tuple(sorted(kwargs.items())))
        made = _src_cache["made"]
        if key not in made:
            made[key] = _src_cache["root"] / str(len(made))
            synth_pool(made[key], rows=rows, shards=shards, seed=seed, jobs=1, **kwargs)
        shutil.copytree(made[key], out, copy_function=shutil.copyfile)
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


#: ``run_demo`` arguments of the session's demo: 1,200 samples, 2 of the demo's filters, one seed.
#: The teachers see 1,280 samples (20 steps): enough for their CLIP scores to separate matched from
#: mismatched captions (after 320 they do not yet); each student sees 320.
DEMO_KW = {"samples": 1200, "concepts": 8, "samples_seen": 320, "teacher_samples_seen": 1280, "workers": 0,
           "filters": ["no_filter", "clip_score_l14_30"], "progress": False}


@dataclass
class DemoRun:
    folder: Path  # the demo folder (world/, pool/, subsets/, shards/, runs/, leaderboard.md)
    out: str  # what run_demo returned (the leaderboard as markdown)
    log: list[str]  # its log lines
    kwargs: dict = field(default_factory=lambda: dict(DEMO_KW))  # to run it again the same way

    @property
    def world(self) -> Path:
        return self.folder / "world"


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> DemoRun:
    """The first run of ``run_demo(FOLDER, **DEMO_KW)``, shared by the session. Read it; a test that
    may change its world works on a copy. Only test_run_demo_end_to_end runs the demo again in the
    folder itself, and that second run must reuse everything."""
    from dcdb.demo.run import run_demo

    folder = tmp_path_factory.mktemp("demo") / "demo"
    lines: list[str] = []
    out = run_demo(folder, **DEMO_KW, log=lines.append)
    return DemoRun(folder, out, lines)


@pytest.fixture
def loopback_netns():
    """``run(argv, **subprocess_kwargs)``: runs ``argv`` in a fresh network namespace with only
    loopback up, where Ray must run (DESIGN §8: Ray contacts a cloud metadata address otherwise).
    Skips, with the reason, when Ray is not installed or ``unshare --net`` is not permitted."""
    import shlex
    import subprocess

    pytest.importorskip("ray")
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("unshare or ip is not installed")
    r = subprocess.run(["unshare", "--net", "sh", "-c", "ip link set lo up"], capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot create a network namespace (unshare --net: {r.stderr.decode().strip()[:80]}); "
                    "Ray may only run where its traffic cannot leave the machine")

    def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        cmd = f"ip link set lo up && exec {shlex.join(argv)}"
        return subprocess.run(["unshare", "--net", "sh", "-c", cmd], capture_output=True, text=True, check=False,
                              **kwargs)

    return run
