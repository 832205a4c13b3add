"""Exact top-fraction cuts by radix selection (dcdb.cuts): the threshold DataComp's sort gives, on
random arrays and on pools, through every path (streamed or kept keys, 32- or 64-bit keys, gathered
or fixed by the rounds, the SQL fallback), with the same bits on each."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dcdb.cli import cli
from dcdb.cuts import RadixSelect, descending_nth, histogram, select_desc, sort_keys, with_prefix
from dcdb.query import parse_filter, run_filter
from dcdb.store import open_pool

FRACTIONS = [1e-9, 0.01, 0.1, 0.25, 0.29, 0.3, 0.5, 0.7, 0.9, 0.99, 0.999999, 1.0]


def reference(x: np.ndarray, f: float) -> float | None:
    """DataComp's threshold: index int(N*f) of -np.sort(-x) (NaN last); dcdb's f = 1: the last score."""
    desc = -np.sort(-x)
    n = int(len(x) * f)
    if n >= len(x):  # f = 1 (DataComp's index error): every scored row is kept
        n = int((~np.isnan(x)).sum()) - 1
    return None if n < 0 or np.isnan(desc[n]) else float(desc[n])


def index_of(f: float):
    from dcdb.filters.baselines import fraction_index

    return lambda rows, scored: fraction_index(rows, scored, f)


def random_scores(rng: np.random.Generator) -> np.ndarray:
    n = int(rng.choice([0, 1, 2, 3, 5, 17, 64, 300, 2000]))
    kind = rng.integers(6)
    if kind == 0:  # DataComp-like scores
        x = rng.normal(0.3, 0.05, n)
    elif kind == 1:  # heavy ties
        x = rng.choice([0.1, 0.2, 0.3], n)
    elif kind == 2:  # one value
        x = np.full(n, rng.normal())
    elif kind == 3:  # signed zeros, infinities, extremes
        x = rng.choice([-0.0, 0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.4e38, -3.4e38, 0.5, -0.5], n)
    elif kind == 4:  # every magnitude, both signs
        x = rng.choice([-1, 1], n) * 10.0 ** rng.uniform(-40, 38, n)
    else:  # neighbours in float32: differ only in the last bits (the second round decides)
        x = np.nextafter(np.float32(0.3), np.float32(1), dtype=np.float32) + rng.integers(0, 5, n) * np.float32(3e-8)
    x = np.asarray(x, np.float32)
    x[rng.random(n) < rng.choice([0.0, 0.1, 0.6, 1.0])] = np.nan
    return x


def batches_of(x: np.ndarray, rng: np.random.Generator):
    cuts = np.sort(rng.integers(0, len(x) + 1, rng.integers(0, 4)))
    parts = np.split(x, cuts)
    return lambda: iter(parts)


def same(a: float | None, b: float | None) -> bool:
    """The same threshold bits (both None, or equal with the same sign of zero)."""
    return (a is None and b is None) or (a is not None and b is not None and np.float64(a).tobytes() == np.float64(b).tobytes())


def test_selection_is_datacomps_threshold_on_random_scores():
    """Every path gives numpy's value (``==``: -0.0 and 0.0 are the same threshold) and all paths
    the same bits: kept keys or a re-read per round, rounds down to the full key or candidates
    gathered after the first round, float32 keys or the Ray driver's float64 keys."""
    rng = np.random.default_rng(14)
    checked = 0
    for _ in range(80):
        x = random_scores(rng)
        for f in rng.choice(FRACTIONS, 3, replace=False):
            f = float(f)
            want = reference(x, f)
            src = batches_of(x, rng)
            kept, rows, scored = descending_nth(src, index_of(f))
            assert (rows, scored) == (len(x), int((~np.isnan(x)).sum()))
            wide = [x.astype(np.float64)]
            got = [kept,
                   descending_nth(src, index_of(f), limit=0, keep_bytes=0)[0],  # 2 rounds, re-read each
                   descending_nth(lambda w=wide: iter(w), index_of(f), limit=0)[0],  # 4 rounds
                   descending_nth(lambda w=wide: iter(w), index_of(f), limit=3)[0]]
            n = index_of(f)(len(x), scored)
            got.append(select_desc(x[~np.isnan(x)], n))
            assert (kept is None) == (want is None) and (want is None or kept == want), (x, f, kept, want)
            assert all(same(g, kept) for g in got), (x, f, got)
            if kept is not None:  # the rows it keeps: DataComp's
                assert (x >= np.float32(kept)).sum() == (x >= np.float32(want)).sum()
            checked += want is not None
    assert checked > 90


@pytest.mark.parametrize(("n", "f"), [(10, 0.3), (10, 0.7), (100, 0.29), (1000, 0.001), (7, 1 / 7), (49, 0.57)])
def test_index_is_datacomps_int_of_n_times_f(n, f):
    """N*f in floating point, truncated as DataComp's int(): 100*0.29 = 28.999999999999996 -> 28."""
    x = np.arange(n, dtype=np.float32)[::-1].copy()  # x[i] = n-1-i: the value at descending index i
    assert descending_nth(lambda: iter([x]), index_of(f))[0] == n - 1 - int(n * f)


def test_empty_and_all_nan_pools_keep_nothing():
    for x in (np.empty(0, np.float32), np.full(5, np.nan, np.float32)):
        assert descending_nth(lambda x=x: iter([x]), index_of(1.0)) == (None, len(x), 0)
        assert descending_nth(lambda x=x: iter([x]), index_of(0.5)) == (None, len(x), 0)


def test_radix_rounds_by_hand():
    """The Ray driver's loop: histogram per chunk, summed; narrow; gather the candidates."""
    rng = np.random.default_rng(3)
    v = rng.normal(0.3, 0.05, 5000)
    keys = sort_keys(v)
    chunks = np.array_split(keys, 3)
    for rank in (0, 1234, 4999):
        sel = RadixSelect(rank, len(keys), 64)
        sel.narrow(sum(histogram(c, sel.prefix, sel.known) for c in chunks))
        sel.narrow(sum(histogram(c, sel.prefix, sel.known) for c in chunks))
        assert sel.known == 32 and not sel.fixed
        assert sel.value(np.concatenate([with_prefix(c, sel.prefix, sel.known) for c in chunks])) == np.sort(v)[rank]
    with pytest.raises(ValueError, match="expected 5000"):
        RadixSelect(0, 5000, 64).narrow(histogram(keys[:10]))


# ------------------------------------------------------------------------------------ pools


def write_pool(tmp_path, scores: np.ndarray, shards: int = 3, l14: bool = True):
    """A pool whose clip_l14 scores are ``scores`` and clip_b32 scores the same reversed (float32,
    NaN kept as NaN in the source; ingest stores NULL); without ``l14`` no clip_l14 column."""
    from dcdb.ingest.pool import ingest

    n = len(scores)
    src = tmp_path / "src"
    src.mkdir()
    table = pa.table({
        "uid": pa.array([f"{(i * 2654435761) % (1 << 64):016x}{i:016x}" for i in range(n)], pa.string()),
        "url": pa.array([f"https://x.example/{i}.jpg" for i in range(n)], pa.string()),
        "text": pa.array(["a photo"] * n, pa.string()),
        "original_width": pa.array([640] * n, pa.int64()),
        "original_height": pa.array([480] * n, pa.int64()),
        "sha256": pa.array(["0" * 64] * n, pa.string()),
        "clip_b32_similarity_score": pa.array(scores[::-1].copy(), pa.float32()),
        "clip_l14_similarity_score": pa.array(scores, pa.float32()),
        "face_bboxes": pa.array([[] for _ in range(n)], pa.list_(pa.list_(pa.float64()))),
    })
    if not l14:
        table = table.drop_columns(["clip_l14_similarity_score"])
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for s in range(shards):
        pq.write_table(table.slice(bounds[s], bounds[s + 1] - bounds[s]), src / f"{s:08d}.parquet")
    ingest(src, tmp_path / "pool", jobs=1)
    return open_pool(tmp_path / "pool"), table


def pool_scores(rng, n=600) -> np.ndarray:
    x = rng.normal(0.3, 0.05, n).astype(np.float32)
    x[rng.random(n) < 0.1] = np.nan
    x[rng.random(n) < 0.1] = np.float32(0.3)  # ties
    x[:4] = [-0.0, 0.0, np.inf, -np.inf]
    return x


# The threshold as main computed it before dcdb.cuts, by hand: ORDER BY ... LIMIT 1 OFFSET n.
BY_HAND = """-- @param n int   the descending index
SELECT uid FROM pool WHERE clip_l14_similarity_score >= (SELECT clip_l14_similarity_score FROM pool
ORDER BY clip_l14_similarity_score DESC NULLS LAST LIMIT 1 OFFSET $n)
"""


def test_clip_score_uids_byte_identical_to_order_by_offset(tmp_path):
    from dcdb.filters.baselines import fraction_index

    rng = np.random.default_rng(5)
    x = pool_scores(rng)
    pool, _ = write_pool(tmp_path, x)
    (tmp_path / "by_hand.sql").write_text(BY_HAND)
    scored = int((~np.isnan(x)).sum())
    for i, f in enumerate(["0.01", "0.3", "0.95", "1"]):
        out, ref = tmp_path / f"cut{i}.npy", tmp_path / f"ref{i}.npy"
        res = CliRunner().invoke(cli, ["-q", "query", "clip_score", "--pool", str(pool.path), "-p", "arch", "l14",
                                       "-p", "fraction", f, "-o", str(out)])
        assert res.exit_code == 0, res.output
        n = fraction_index(len(x), scored, float(f))
        res = CliRunner().invoke(cli, ["-q", "query", str(tmp_path / "by_hand.sql"), "--pool", str(pool.path),
                                       "-p", "n", str(n), "-o", str(ref)])
        assert res.exit_code == 0, res.output
        assert out.read_bytes() == ref.read_bytes(), f
        want = reference(x, float(f))
        assert len(np.load(out)) == (0 if want is None else int((x >= np.float32(want)).sum()))


def test_clip_cut_reads_the_score_the_pool_view_shows(tmp_path):
    """A pool whose metadata lacks the L/14 score takes it from a derived group, as ``pool`` shows
    it: float64 (64-bit keys from the group's Parquet files), then a later group's integer column
    (not read from the files: the SQL path). A group imported after a connection opened is in
    neither its view nor its cut."""
    import dcdb
    from dcdb.annotate import import_columns
    from dcdb.errors import PoolError

    rng = np.random.default_rng(7)
    x = pool_scores(rng, 400)
    pool, table = write_pool(tmp_path, x, shards=2, l14=False)
    uids = table.column("uid")

    def cut(con, f, arch="l14"):
        return con.execute(f"SELECT clip_cut('{arch}', {f}, NULL), clip_cut_direct('{arch}')").fetchall()[0]

    before = dcdb.connect(pool)
    assert cut(before, 0.3, "b32") == (reference(x[::-1].copy(), 0.3), True)
    with pytest.raises(PoolError, match="no column clip_l14_similarity_score"):
        run_filter(pool, parse_filter("q", "SELECT uid FROM pool WHERE 1 < clip_cut('l14', 0.3, NULL)", None))
    d = rng.normal(0.5, 0.2, len(x))  # float64 scores
    d[::7] = np.nan
    pq.write_table(pa.table({"uid": uids, "clip_l14_similarity_score": pa.array(d, pa.float64())}), tmp_path / "d.parquet")
    import_columns(open_pool(pool.path), tmp_path / "d.parquet", group="rescored")
    con = dcdb.connect(open_pool(pool.path))
    for f in (0.01, 0.3, 0.77, 1.0):
        assert cut(con, f) == (reference(d, f), True)
    assert cut(before, 0.3, "b32") == (reference(x[::-1].copy(), 0.3), True)
    assert before.execute("SELECT clip_cut_direct('l14')").fetchall() == [(False,)]  # its view has no l14
    ints = rng.integers(-50, 50, len(x))
    pq.write_table(pa.table({"uid": uids, "clip_l14_similarity_score": pa.array(ints, pa.int64())}), tmp_path / "i.parquet")
    import_columns(open_pool(pool.path), tmp_path / "i.parquet", group="rescored", force=True)
    con = dcdb.connect(open_pool(pool.path))
    assert cut(con, 0.3) == (reference(ints.astype(np.float32), 0.3), False)
    assert cut(con, 1.0) == (float(ints.min()), False)


def test_cut_engines_agree_on_a_bucketed_pool(tmp_path):
    """The local engine on the plain and the bucketed layout and the Ray driver (serial backend):
    the same uid bytes."""
    from dcdb.dist.execute import run_distributed
    from dcdb.query import load_filter

    rng = np.random.default_rng(9)
    x = pool_scores(rng, 500)
    pool, _ = write_pool(tmp_path, x, shards=2)
    from dcdb.ingest.pool import ingest

    ingest(tmp_path / "src", tmp_path / "bucketed", jobs=1, buckets=4)
    bucketed = open_pool(tmp_path / "bucketed")
    for f in ("0.3", "1"):
        given = {"arch": "b32", "fraction": f}
        want = run_filter(pool, load_filter("clip_score"), given).uids
        assert run_filter(bucketed, load_filter("clip_score"), given).uids.tobytes() == want.tobytes()
        got = run_distributed(bucketed, load_filter("clip_score"), given, engine="serial", per_task=2)
        assert got.uids.tobytes() == want.tobytes()


def test_damaged_score_file_is_a_pool_error(tmp_path):
    from dcdb.errors import PoolError

    x = pool_scores(np.random.default_rng(2), 50)
    pool, _ = write_pool(tmp_path, x, shards=2)
    f = pool.metadata_files()[-1]
    f.write_bytes(f.read_bytes()[:-100] + b"\0" * 100)  # the footer gone
    with pytest.raises(PoolError):
        run_filter(pool, parse_filter("q", "SELECT uid FROM pool WHERE clip_l14_similarity_score >= "
                                      "clip_cut('l14', 0.5, NULL)", None))


def test_nan_scores_are_never_keys():
    x = np.array([np.nan, 0.5, np.nan, 0.25], np.float32)
    assert descending_nth(lambda: iter([x]), index_of(0.2)) == (0.5, 4, 2)  # index int(0.8) = 0
    assert descending_nth(lambda: iter([x]), index_of(0.25)) == (0.25, 4, 2)
    assert descending_nth(lambda: iter([x]), index_of(0.5)) == (None, 4, 2)  # index 2: a NaN
    assert math.isclose(descending_nth(lambda: iter([x]), index_of(1.0))[0], 0.25)


@pytest.mark.parametrize("scores", [np.empty(0, np.float32), np.full(9, np.nan, np.float32)], ids=["empty", "all-nan"])
def test_clip_score_on_a_pool_with_no_score_keeps_nothing(tmp_path, scores):
    from dcdb.query import load_filter

    pool, _ = write_pool(tmp_path, scores, shards=1)
    for f in ("0.3", "1"):
        assert len(run_filter(pool, load_filter("clip_score"), {"arch": "l14", "fraction": f}).uids) == 0
