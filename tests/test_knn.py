"""kNN subsets, ANN index, seeds and the vector SQL functions, each against a numpy brute force."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dcdb import uids as U
from dcdb.cli import cli
from dcdb.errors import SourceError, UsageError

SPACE = "l14_img"


def run(*args, ok=True, input=None, quiet=True):
    res = CliRunner().invoke(cli, ["-q"] * quiet + [*map(str, args)], catch_exceptions=False, input=input)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def pool_vectors(pool, space=SPACE):
    """The pool's vectors and uids read straight from its Lance table (row order)."""
    import lance

    tbl = lance.dataset(str(pool / "embeddings" / f"{space}.lance")).to_table()
    col = tbl.column(space).combine_chunks()
    vec = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(np.float32)
    return vec, np.asarray(tbl.column("uid").to_pylist())


def brute(vec, seeds, k, rows=None):
    """numpy reference: cosine, similarity desc then row asc."""
    from dcdb.vectors.knn import numpy_bruteforce

    if rows is None:
        return numpy_bruteforce(vec, seeds, k)
    r, s = numpy_bruteforce(vec[rows], seeds, k)
    return rows[r], s


def assert_same_topk(rows, sims, ref_rows, ref_sims, tol=1e-5):
    """Equal similarities (within float32 noise) and equal rows except among near-ties."""
    np.testing.assert_allclose(sims, ref_sims, atol=tol)
    for a, b, s in zip(rows, ref_rows, ref_sims, strict=True):
        firm = s > s[-1] + tol  # neighbours not tied with the k-th
        assert set(a[firm]) == set(b[firm])
        assert set(a) == set(b) or np.isclose(s[-1], s[~firm]).all()


@pytest.fixture
def seeds_npy(tmp_path):
    s = np.random.default_rng(5).standard_normal((7, 768)).astype(np.float32)
    p = tmp_path / "seeds.npy"
    np.save(p, s)
    return p, s


# ------------------------------------------------------------------------------ exact top-k


def test_topk_blocks_match_numpy_with_ties():
    from dcdb.vectors.knn import numpy_bruteforce
    from dcdb.vectors.scan import exact_topk

    rng = np.random.default_rng(0)
    p = rng.standard_normal((3000, 16)).astype(np.float32)
    p[100:110] = p[5]  # exact duplicates inside one block: ties go to the lower row
    s = rng.standard_normal((40, 16)).astype(np.float32)
    s[0] = p[5]
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    sn = s / np.linalg.norm(s, axis=1, keepdims=True)
    blocks = ((np.arange(i, min(i + 700, len(p))), pn[i : i + 700]) for i in range(0, len(p), 700))
    top = exact_topk(sn, blocks, 8)
    ref_rows, ref_sims = numpy_bruteforce(p, s, 8)
    assert_same_topk(top.rows, top.vals, ref_rows, ref_sims)
    assert list(top.rows[0][:8]) == [5, *range(100, 107)]  # the 11 ties at ~1: lowest rows first


@pytest.mark.parametrize("space,k", [("l14_img", 5), ("b32_txt", 1), ("l14_img", 200)])
def test_exact_search_matches_numpy(small_pool, space, k):
    from dcdb.vectors.knn import exact_search
    from dcdb.store import open_pool

    vec, _ = pool_vectors(small_pool, space)
    s = np.random.default_rng(1).standard_normal((9, vec.shape[1])).astype(np.float32)
    sn = s / np.linalg.norm(s, axis=1, keepdims=True)
    res = exact_search(open_pool(small_pool), space, sn, k)
    ref_rows, ref_sims = brute(vec, s, k)
    assert_same_topk(res.rows, res.sims, ref_rows, ref_sims)


def test_cli_knn_outputs(small_pool, seeds_npy, tmp_path):
    path, s = seeds_npy
    out, pairs = tmp_path / "near.npy", tmp_path / "pairs.parquet"
    run("knn", "--pool", small_pool, "--space", SPACE, "--seeds", path, "-k", 4, "-o", out, "--pairs", pairs)
    vec, uids = pool_vectors(small_pool)
    ref_rows, ref_sims = brute(vec, s, 4)
    want = U.sort(np.unique(U.from_hex(list(uids[ref_rows.ravel()]))))
    got = U.load(out)
    assert np.array_equal(got, want) and U.is_sorted(got)
    tbl = pq.read_table(pairs).to_pydict()
    assert tbl["seed"] == list(np.repeat(np.arange(7), 4))
    assert tbl["rank"] == [1, 2, 3, 4] * 7
    assert tbl["uid"] == list(uids[ref_rows.ravel()])
    np.testing.assert_allclose(tbl["similarity"], ref_sims.ravel(), atol=1e-5)
    man = json.loads((tmp_path / "near.npy.json").read_text())
    assert man["mode"] == "exact" and man["k"] == 4 and man["seeds"] == 7 and man["rows"] == len(got)
    # no -o: hex uids on stdout
    res = run("knn", "--pool", small_pool, "--space", SPACE, "--seeds", path, "-k", 4)
    assert res.stdout.split() == U.to_hex(want)


def test_where_is_a_prefilter(small_pool, seeds_npy, tmp_path):
    import duckdb

    path, s = seeds_npy
    out, pairs = tmp_path / "near.npy", tmp_path / "pairs.parquet"
    where = "original_width >= 300"
    run("knn", "--pool", small_pool, "--space", SPACE, "--seeds", path, "-k", 3, "-o", out, "--pairs", pairs,
        "--where", where)
    meta = duckdb.sql(f"SELECT original_width FROM read_parquet('{small_pool}/metadata/*.parquet')").fetchnumpy()
    widths = np.concatenate([pq.read_table(p).column("original_width").to_numpy()
                             for p in sorted((small_pool / "metadata").glob("*.parquet"))])
    assert len(widths) == len(meta["original_width"])
    rows = np.flatnonzero(widths >= 300)
    assert 0 < len(rows) < len(widths)
    vec, _ = pool_vectors(small_pool)
    ref_rows, ref_sims = brute(vec, s, 3, rows)
    got = pq.read_table(pairs).column("row").to_numpy().reshape(7, 3)
    assert set(got.ravel()) <= set(rows)
    sims = pq.read_table(pairs).column("similarity").to_numpy().reshape(7, 3)
    assert_same_topk(got, sims, ref_rows, ref_sims)
    man = json.loads((tmp_path / "near.npy.json").read_text())
    assert man["where_semantics"] == "pre-filter" and man["eligible_rows"] == len(rows)


def test_seed_sources(small_pool, tmp_path):
    from dcdb.vectors.knn import exact_search
    from dcdb.vectors.seeds import load_seeds
    from dcdb.store import open_pool

    _, uids = pool_vectors(small_pool)
    p = open_pool(small_pool)
    # parquet (FLOAT[768] column) == npy
    s = np.random.default_rng(2).standard_normal((3, 768)).astype(np.float32)
    pq.write_table(pa.table({"name": ["a", "b", "c"],
                             "emb": pa.FixedSizeListArray.from_arrays(pa.array(s.ravel()), 768)}), tmp_path / "s.parquet")
    np.save(tmp_path / "s.npy", s)
    a = load_seeds(p, SPACE, parquet=str(tmp_path / "s.parquet")).vectors
    b = load_seeds(p, SPACE, npy=str(tmp_path / "s.npy")).vectors
    np.testing.assert_allclose(a, b)
    # a stored subset: its own rows are each seed's nearest neighbour
    run("query", "-", "--pool", small_pool, "--save", "few", input="SELECT uid FROM pool WHERE original_width < 120")
    sub = load_seeds(p, SPACE, subset="few")
    res = exact_search(p, SPACE, sub.vectors, 1)
    assert set(uids[res.rows[:, 0]]) == set(U.to_hex(U.load(small_pool / "subsets" / "few.npy")))
    run("knn", "--pool", small_pool, "--space", SPACE, "--subset", "few", "-k", 1, "-o", tmp_path / "few.npy")
    assert np.array_equal(U.load(tmp_path / "few.npy"), U.load(small_pool / "subsets" / "few.npy"))


@pytest.mark.parametrize("args,code,msg", [
    (["-k", 3, "--space", "l14_img", "--seeds", "{bad_dim}"], 1, "dim 512, the space has dim 768"),
    (["-k", 3, "--space", "l99_img", "--seeds", "{ok}"], 1, "no embedding space 'l99_img'"),
    (["-k", 3, "--space", "l14_img", "--seeds", "{nan}"], 1, "NaN or infinity, first row 1"),
    (["-k", 3, "--space", "l14_img", "--seeds", "{zero}"], 1, "zero vectors"),
    (["-k", 0, "--space", "l14_img", "--seeds", "{ok}"], 2, "-k must be at least 1"),
    (["-k", 201, "--space", "l14_img", "--seeds", "{ok}"], 2, "larger than the pool (200 rows)"),
    (["-k", 3, "--space", "l14_img"], 2, "no seeds given"),
    (["-k", 3, "--space", "l14_img", "--seeds", "{ok}", "--where", "original_width > 100000"], 2,
     "larger than the 0 rows that pass --where"),
    (["-k", 3, "--space", "l14_img", "--seeds", "{ok}", "--ann"], 1, "has no ANN index"),
    (["-k", 3, "--space", "l14_img", "--text", "a dog"], 2, "dcdb encoder --pool"),
    (["-k", 3, "--space", "l14_img", "--seeds", "{pq}", "--seed-column", "nope"], 1, "has no column 'nope'"),
])
def test_knn_bad_input(small_pool, tmp_path, args, code, msg):
    files = {"ok": np.ones((2, 768)), "bad_dim": np.ones((2, 512)), "nan": np.array([[1.0] * 768, [np.nan] * 768]),
             "zero": np.zeros((2, 768))}
    for name, arr in files.items():
        np.save(tmp_path / f"{name}.npy", arr.astype(np.float32))
    pq.write_table(pa.table({"emb": [[1.0] * 768]}), tmp_path / "pq.parquet")
    args = [str(tmp_path / (a[1:-1] + (".parquet" if a == "{pq}" else ".npy"))) if str(a).startswith("{") else a
            for a in args]
    res = run("knn", "--pool", small_pool, *args, "-o", tmp_path / "out.npy", ok=False)
    assert res.exit_code == code, res.output
    assert msg in res.output
    assert not (tmp_path / "out.npy").exists()


# ------------------------------------------------------------------------------------- ANN


def test_ann_index_recall_and_staleness(small_pool, seeds_npy, tmp_path):
    path, s = seeds_npy
    res = run("index", "--pool", small_pool, "--space", SPACE, "--partitions", 2, quiet=False)
    assert "below the" in res.output and "search exactly unless given --ann" in res.output
    rec = json.loads((small_pool / "indexes" / f"{SPACE}.json").read_text())
    assert rec["kind"] == "ivf_sq" and rec["rows"] == 200 and rec["params"]["num_partitions"] == 2
    assert not list((small_pool / "indexes").glob(".build-*"))  # the partition table is gone
    res = run("index", "--pool", small_pool, "--space", SPACE, ok=False)
    assert res.exit_code == 2 and "--force" in res.output
    out = tmp_path / "near.npy"
    # auto: 7 seeds on a 200-row pool -> exact, and the manifest says why
    res = run("knn", "--pool", small_pool, "--space", SPACE, "--seeds", path, "-k", 5, "-o", out, quiet=False)
    man = json.loads((tmp_path / "near.npy.json").read_text())
    assert man["mode"] == "exact" and "--recall-sample" in man["details"]["why_exact"]
    assert "exact path:" in res.output
    run("knn", "--pool", small_pool, "--space", SPACE, "--seeds", path, "-k", 5, "-o", out, "--pairs",
        tmp_path / "p.parquet", "--min-recall", "1.0", "--recall-sample", 7, "--ann", "--force")
    man = json.loads((tmp_path / "near.npy.json").read_text())
    vec, _ = pool_vectors(small_pool)
    ref_rows, _ = brute(vec, s, 5)
    got = pq.read_table(tmp_path / "p.parquet").column("row").to_numpy().reshape(7, 5)
    true_recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, ref_rows, strict=True)])
    if man["mode"] == "ann":  # all 7 seeds were the recall sample: the measured recall is the true one
        assert man["recall_at_k"] == pytest.approx(true_recall) and man["recall_at_k"] >= 1.0
        assert man["details"]["why_ann"] == "--ann"
    else:
        assert "below --min-recall" in man["details"]["why_exact"] and true_recall == 1.0
    # a non-selective --where on the ANN path: a pre-filter through Lance's row allow list
    widths = np.concatenate([pq.read_table(f).column("original_width").to_numpy()
                             for f in sorted((small_pool / "metadata").glob("*.parquet"))])
    passing = set(np.flatnonzero(widths >= 250))
    assert 0.05 * 200 < len(passing) < 200
    run("knn", "--pool", small_pool, "--space", SPACE, "--seeds", path, "-k", 3, "-o", out, "--force",
        "--pairs", tmp_path / "pw.parquet", "--where", "original_width >= 250", "--recall-sample", 7, "--ann")
    man = json.loads((tmp_path / "near.npy.json").read_text())
    got = pq.read_table(tmp_path / "pw.parquet").column("row").to_numpy()
    assert man["mode"] == "ann" and man["details"]["prefilter"] == "row_addr_allowlist" and set(got) <= passing
    ref_rows, _ = brute(vec, s, 3, np.array(sorted(passing)))
    assert len(got) == 21  # every seed found 3 passing rows
    want = np.mean([len(set(a) & set(b)) / 3 for a, b in zip(got.reshape(7, 3), ref_rows, strict=True)])
    assert man["recall_at_k"] == pytest.approx(want)  # the 7 sampled seeds are all the seeds
    # a selective --where takes the exact path over the passing rows
    run("knn", "--pool", small_pool, "--space", SPACE, "--seeds", path, "-k", 2, "-o", out, "--force",
        "--where", "original_width < 100")
    man = json.loads((tmp_path / "near.npy.json").read_text())
    assert man["mode"] == "exact" and "exact over them" in man["details"]["why_exact"]
    # HNSW's ef is raised to cover refine_factor x k (Lance refuses ef < k)
    run("index", "--pool", small_pool, "--space", SPACE, "--kind", "ivf_hnsw_sq", "--force")
    run("knn", "--pool", small_pool, "--space", SPACE, "--seeds", path, "-k", 12, "-o", out, "--force",
        "--refine-factor", 8, "--ann")
    assert json.loads((tmp_path / "near.npy.json").read_text())["mode"] == "ann"
    # re-ingested pool (deleted, ingested again from a changed source) that kept indexes/: stale
    from dcdb.ingest.pool import ingest
    from dcdb.demo.synth import synth_pool

    synth_pool(tmp_path / "src2", rows=200, shards=3, seed=99, jobs=1)
    ingest(tmp_path / "src2", tmp_path / "pool2", jobs=1)
    shutil.copytree(small_pool / "indexes", tmp_path / "pool2" / "indexes")
    res = run("knn", "--pool", tmp_path / "pool2", "--space", SPACE, "--seeds", path, "-k", 2, "-o", out, "--force",
              "--ann", ok=False)
    assert res.exit_code == 1 and "stale" in res.output and "dcdb index" in res.output
    # ... or whose embedding table was replaced (the index is gone from it): stale too
    shutil.rmtree(small_pool / "embeddings" / f"{SPACE}.lance")
    shutil.copytree(tmp_path / "pool2" / "embeddings" / f"{SPACE}.lance", small_pool / "embeddings" / f"{SPACE}.lance")
    res = run("knn", "--pool", small_pool, "--space", SPACE, "--seeds", path, "-k", 2, "-o", out, "--force",
              "--ann", ok=False)
    assert res.exit_code == 1 and "no longer holds it" in res.output
    run("knn", "--pool", small_pool, "--space", SPACE, "--seeds", path, "-k", 2, "-o", out, "--force", "--exact")


def test_ann_query_rows_map_to_pool_rows(small_pool):
    """Each pool vector's ANN top-1 is its own row (row addresses -> pool rows across fragments)."""
    from dcdb.vectors.ann import build_index
    from dcdb.vectors.knn import search
    from dcdb.store import open_pool

    p = open_pool(small_pool)
    build_index(p, "b32_img", partitions=1)
    vec, _ = pool_vectors(small_pool, "b32_img")
    rows = np.array([0, 67, 68, 150, 199])
    res = search(p, "b32_img", vec[rows] / np.linalg.norm(vec[rows], axis=1, keepdims=True), 1, min_recall=1.0,
                 recall_sample=5, ann_only=True)
    assert res.mode == "ann" and list(res.rows[:, 0]) == list(rows)
    # the queries split over worker processes give the same neighbours and similarities
    from dcdb.vectors.ann import ann_search

    seeds = vec[::9] / np.linalg.norm(vec[::9], axis=1, keepdims=True)
    # (with a recall sample the exact check runs as a worker task beside the queries: same recall)
    one = ann_search(p, "b32_img", seeds, 4, recall_sample=9, jobs=1)
    two = ann_search(p, "b32_img", seeds, 4, recall_sample=9, jobs=2)
    assert two.details["query_processes"] == 2 and two.recall == one.recall and two.recall_seeds == 9
    assert np.array_equal(one.rows, two.rows) and np.array_equal(one.sims, two.sims)


def test_cost_model_picks_exact_below_the_size_where_an_index_pays(small_pool):
    from dcdb.store import open_pool
    from dcdb.vectors import ann
    from dcdb.vectors.knn import search

    p = open_pool(small_pool)
    assert ann.choose_mode(p, SPACE, 5000, 10)[:2] == ("exact", "no ANN index (build one with `dcdb index`)")
    ann.build_index(p, SPACE, partitions=2)
    mode, why, est = ann.choose_mode(p, SPACE, 64, 10)
    assert mode == "exact" and "--recall-sample 64" in why  # the recall check alone re-runs every seed
    mode, why, est = ann.choose_mode(p, SPACE, 5000, 10)
    assert mode == "exact" and "below the size where the index pays" in why and est["ann"] > est["exact"] / 2
    # the same estimates on DataComp-sized pools: 100k rows x 64 seeds -> exact, 1M x 10,000 -> ANN
    small = ann.estimate_seconds(100_000, 100_000, 64, 10, 768, 64)
    assert small["ann"] > small["exact"]
    big = ann.estimate_seconds(1_000_000, 1_000_000, 10_000, 10, 768, 64)
    assert big["ann"] * ann.ANN_MARGIN * 5 < big["exact"]
    assert 10_000 < ann.min_index_rows(768) < 1_000_000
    assert ann.min_index_rows(512) > ann.min_index_rows(768)  # fewer dims: cheaper exact, a larger pool to pay
    # --ann is still honoured on the small pool; without an index it is an error (test_knn_bad_input)
    res = search(p, SPACE, np.eye(768, dtype=np.float32)[:3], 2, ann_only=True, recall_sample=0)
    assert res.mode == "ann" and res.details["why_ann"] == "--ann"


def test_index_partitions_scale_with_the_pool(small_pool):
    from dcdb.store import open_lance, open_pool
    from dcdb.vectors import ann

    # 2 sqrt(rows) partitions of sqrt(rows) / 2 rows: a query probes sqrt(rows) / 2 rows per probe
    # and the build's assignment costs 2 rows x sqrt(rows) dot products; HNSW graphs of a bounded size
    for rows in (10_000, 250_000, 1_000_000, 12_800_000):
        assert ann.default_partitions(rows, "ivf_sq") == 2 * math.isqrt(rows)
        assert abs(ann.default_partitions(4 * rows, "ivf_sq") - 4 * math.isqrt(rows)) <= 2
        assert ann.default_partitions(rows, "ivf_hnsw_sq") == max(1, round(rows / ann.HNSW_PARTITION_ROWS))
    assert ann.default_partitions(3, "ivf_sq") == 2 and ann.default_partitions(1, "ivf_sq") == 1
    p = open_pool(small_pool)
    ds = open_lance(p.lance_path(SPACE))
    cents, part = ann.train_partitions(ds, SPACE, 768, 14)
    again, part2 = ann.train_partitions(ds, SPACE, 768, 14)
    assert np.array_equal(cents, again) and np.array_equal(part, part2)  # deterministic given the table
    assert cents.shape == (14, 768) and np.allclose(np.linalg.norm(cents, axis=1), 1, atol=1e-5)
    vec, _ = pool_vectors(small_pool)
    unit = vec / np.linalg.norm(vec, axis=1, keepdims=True)
    assert np.array_equal(part, np.argmax(unit @ cents.T, axis=1))  # every row in its nearest partition
    assert len(np.unique(part)) > 7
    rec = ann.build_index(p, SPACE, kind="ivf_hnsw_sq")
    assert rec["params"] == {"num_partitions": 1, **ann.HNSW_PARAMS}


def test_index_bad_input(small_pool):
    res = run("index", "--pool", small_pool, "--space", SPACE, "--kind", "ivf_pq", ok=False)
    assert res.exit_code == 2 and "at least 256 rows" in res.output
    res = run("index", "--pool", small_pool, "--space", "nope", ok=False)
    assert res.exit_code == 1 and "no embedding space 'nope'" in res.output


# ------------------------------------------------------------------------------------ SQL


def sql_rows(pool, sql, **params):
    from dcdb.engine import connect
    from dcdb.filters.vectors import rewrite_sql

    con = connect(pool)
    return con.execute(rewrite_sql(con, sql), params or None).fetchall()


def test_cosine_dot_columns_and_constants(small_pool):
    vec, _ = pool_vectors(small_pool)
    txt, _ = pool_vectors(small_pool, "l14_txt")
    q = np.random.default_rng(4).standard_normal(768).astype(np.float32)
    got = np.array(sql_rows(small_pool, "SELECT cosine(l14_img, l14_txt), cosine(l14_img, $q), dot(l14_img, $q) "
                            "FROM pool", q=q.tolist()))
    cos = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    np.testing.assert_allclose(got[:, 0], cos(vec, txt), atol=1e-5)
    np.testing.assert_allclose(got[:, 1], cos(vec, q[None]), atol=1e-5)
    np.testing.assert_allclose(got[:, 2], vec @ q, rtol=1e-4, atol=1e-4)


def test_nearest_centroid_matches_numpy(small_pool, tmp_path):
    vec, _ = pool_vectors(small_pool)
    c = np.random.default_rng(6).standard_normal((13, 768)).astype(np.float32)
    np.save(tmp_path / "c.npy", c)
    got = [r[0] for r in sql_rows(small_pool, f"SELECT nearest_centroid(l14_img, '{tmp_path / 'c.npy'}') FROM pool")]
    assert got == list(np.argmax(vec @ c.T, axis=1))


def test_knn_table_function(small_pool, tmp_path):
    vec, uids = pool_vectors(small_pool)
    s = np.random.default_rng(8).standard_normal((5, 768)).astype(np.float32)
    pq.write_table(pa.table({"emb": pa.FixedSizeListArray.from_arrays(pa.array(s.ravel()), 768)}),
                   tmp_path / "seeds.parquet")
    got = sql_rows(small_pool, "SELECT seed, uid, rank, similarity, row FROM knn('l14_img', (SELECT emb FROM "
                   f"read_parquet('{tmp_path / 'seeds.parquet'}')), 3) ORDER BY seed, rank")
    ref_rows, ref_sims = brute(vec, s, 3)
    assert [r[0] for r in got] == list(np.repeat(np.arange(5), 3)) and [r[2] for r in got] == [1, 2, 3] * 5
    assert_same_topk(np.array([r[4] for r in got]).reshape(5, 3), np.array([r[3] for r in got]).reshape(5, 3),
                     ref_rows, ref_sims)
    assert [r[1] for r in got] == [uids[r[4]] for r in got]
    # through dcdb query (read-only filter, sandboxed: the seed file is a path parameter): the union of uids
    run("query", "-", "--pool", small_pool, "-o", tmp_path / "q.npy", "-p", "seeds", tmp_path / "seeds.parquet",
        input="-- @param seeds path\n"
              "SELECT DISTINCT uid FROM knn('l14_img', (SELECT emb FROM read_parquet($seeds)), 3)")
    assert set(U.to_hex(U.load(tmp_path / "q.npy"))) == set(uids[ref_rows.ravel()])
    # a list literal / parameter works too, and knn_ann says how to build the missing index
    one = sql_rows(small_pool, "SELECT row FROM knn('l14_img', [$v], 1)", v=s[0].tolist())
    assert one[0][0] == ref_rows[0, 0]
    res = run("sql", "SELECT * FROM knn_ann('l14_img', [$v], 1)", "--pool", small_pool, "-p", "v",
              json.dumps(s[0].tolist()), ok=False)
    assert res.exit_code != 0 and "dcdb index" in res.output


def test_planning_a_knn_statement_does_not_search(small_pool):
    """dcdb plans a statement (EXPLAIN) to learn which joins it reads; a knn with constant seeds
    must not be folded into that plan, or it would search twice. k above the pool's rows makes a
    search fail with a dcdb error, which the connection records (DuckDB drops a failed folding)."""
    import duckdb

    from dcdb.engine import _VIEWS, _read_joins, connect
    from dcdb.errors import UsageError
    from dcdb.filters import take_error

    con = connect(small_pool)
    sql = "SELECT uid FROM knn('l14_img', [$v], 100000)"
    v = {"v": np.ones(768, np.float32).tolist()}
    assert _read_joins(con, sql, v, _VIEWS[con].join_columns) == set()
    assert take_error(con) is None  # the plan did not search
    with pytest.raises(duckdb.Error):
        con.execute(sql, v).fetchall()
    assert isinstance(take_error(con), UsageError)  # running it does


def test_contaminated_matches_numpy(small_pool, tmp_path):
    vec, uids = pool_vectors(small_pool)
    rng = np.random.default_rng(9)
    ev = np.concatenate([vec[[3, 50, 51]] + rng.standard_normal((3, 768)).astype(np.float32) * 0.01,
                         rng.standard_normal((20, 768)).astype(np.float32)])
    np.save(tmp_path / "eval.npy", ev)
    vn = vec / np.linalg.norm(vec, axis=1, keepdims=True)
    en = ev / np.linalg.norm(ev, axis=1, keepdims=True)
    for t in (0.9, 0.1):
        got = [r[0] for r in sql_rows(small_pool, f"SELECT contaminated(l14_img, '{tmp_path / 'eval.npy'}', {t}) "
                                      "FROM pool")]
        want = (vn @ en.T).max(axis=1) >= t
        assert got == list(want)
    assert sum(got) > 3
    res = run("query", "-", "--pool", small_pool, "-o", tmp_path / "clean.npy",
              "-p", "eval", tmp_path / "eval.npy",
              input="-- @param eval path\nSELECT uid FROM pool WHERE NOT contaminated(l14_img, $eval, 0.9)")
    assert set(U.to_hex(U.load(tmp_path / "clean.npy"))) == set(uids) - set(uids[[3, 50, 51]])
    np.save(tmp_path / "bad.npy", np.ones((2, 512), np.float32))
    res = run("query", "-", "--pool", small_pool, "-p", "eval", tmp_path / "bad.npy", ok=False,
              input="-- @param eval path\nSELECT uid FROM pool WHERE contaminated(l14_img, $eval, 0.9)")
    assert res.exit_code != 0 and "dim 512" in res.output


# ------------------------------------------------------------------------- prompts (a real CLIP)


@pytest.fixture(scope="module")
def l14_checkpoint(tmp_path_factory):
    """A randomly initialised dcdb-teacher-l14 (768-d, as the pool's l14 spaces) saved as a checkpoint."""
    import open_clip
    import torch

    from dcdb.train.models import quiet_random_init, register_models

    register_models()
    torch.manual_seed(0)
    with quiet_random_init():
        model = open_clip.create_model("dcdb-teacher-l14")
    path = tmp_path_factory.mktemp("ckpt") / "l14.pt"
    torch.save({"state_dict": model.state_dict(), "dcdb": {"model": "dcdb-teacher-l14"}}, path)
    return path


@pytest.mark.slow
def test_prompts_encoded_by_the_configured_model(small_pool, l14_checkpoint, tmp_path):
    from PIL import Image

    from dcdb.encoders import ClipEncoder

    res = run("sql", "SELECT clip_text('a dog', 'l14')", "--pool", small_pool, ok=False)
    assert res.exit_code != 0 and "dcdb encoder --pool" in res.output
    run("encoder", "--pool", small_pool, "--space", "l14", "--checkpoint", l14_checkpoint)
    enc = ClipEncoder(l14_checkpoint)
    t = enc.texts(["a photo of a dog"])[0]
    t = t / np.linalg.norm(t)
    vec, uids = pool_vectors(small_pool)
    got = np.array(sql_rows(small_pool, "SELECT cosine(l14_img, clip_text('a photo of a dog', 'l14')), "
                            "clip_text('a photo of a dog', 'l14_img') FROM pool"), dtype=object)
    np.testing.assert_allclose(np.array(got[0, 1]), t, atol=1e-5)
    cos = vec @ t / np.linalg.norm(vec, axis=1)
    np.testing.assert_allclose(got[:, 0].astype(float), cos, atol=1e-4)
    srt = np.sort(cos)
    i = int(np.argmax(np.diff(srt[150:170]))) + 150  # a threshold between two well-separated scores
    thr = float((srt[i] + srt[i + 1]) / 2)
    run("query", "text_prompt", "--pool", small_pool, "-p", "prompt", "a photo of a dog", "-p", "threshold", thr,
        "-o", tmp_path / "dog.npy")
    assert set(U.to_hex(U.load(tmp_path / "dog.npy"))) == set(uids[cos >= thr])
    # text and image seeds for dcdb knn == the same vectors given as .npy
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    im = enc.images([Image.open(tmp_path / "red.png").convert("RGB")])[0]
    np.save(tmp_path / "s.npy", np.stack([t, im]))
    run("knn", "--pool", small_pool, "--space", SPACE, "--text", "a photo of a dog", "--image", tmp_path / "red.png",
        "-k", 3, "-o", tmp_path / "a.npy")
    run("knn", "--pool", small_pool, "--space", SPACE, "--seeds", tmp_path / "s.npy", "-k", 3, "-o", tmp_path / "b.npy")
    assert np.array_equal(U.load(tmp_path / "a.npy"), U.load(tmp_path / "b.npy"))
    # decontamination against eval task folders: their images encoded by the same model
    from dcdb.eval.tasks import write_task

    ims = [Image.new("RGB", (32, 32), (i * 60, 255 - i * 60, 90)) for i in range(4)]
    write_task(tmp_path / "eval" / "colours", [(m, "a colour") for m in ims[:3]], image_format="png")
    write_task(tmp_path / "eval" / "more", [(ims[3], "another")], image_format="png")
    ev = enc.images(ims)
    ev = ev / np.linalg.norm(ev, axis=1, keepdims=True)
    best = (vec / np.linalg.norm(vec, axis=1, keepdims=True) @ ev.T).max(axis=1)
    t = float(np.quantile(best, 0.7))
    got = [r[0] for r in sql_rows(small_pool, f"SELECT contaminated(l14_img, '{tmp_path / 'eval'}', {t}) FROM pool")]
    assert got == list(best >= np.float32(t)) and 0 < sum(got) < len(got)
    # the decontaminate filter, sandboxed: the task folder is its path parameter, so it may be read
    run("query", "decontaminate", "--pool", small_pool, "-p", "eval", tmp_path / "eval", "-p", "threshold", t,
        "-o", tmp_path / "clean.npy")
    assert set(U.to_hex(U.load(tmp_path / "clean.npy"))) == set(uids[best < np.float32(t)])


def test_checkpoint_from_demo_world_or_encoder_command(make_src, tmp_path):
    """A pool ingested from WORLD/metadata finds the world's teacher; `dcdb encoder` overrides it."""
    from dcdb.ingest.pool import ingest
    from dcdb.encoders import checkpoint_for
    from dcdb.store import open_pool

    world = tmp_path / "world"
    world.mkdir()
    shutil.move(str(make_src(rows=20, shards=1, name="metadata")), world / "metadata")
    ckpt = world / "teacher" / "l14" / "checkpoints" / "epoch_latest.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    (world / "world.json").write_text(json.dumps(
        {"embeddings": {"l14": {"checkpoint": "teacher/l14/checkpoints/epoch_latest.pt"}}}))
    ingest(world / "metadata", tmp_path / "pool", jobs=1)
    p = open_pool(tmp_path / "pool")
    assert checkpoint_for(p, "l14_img") == ckpt and checkpoint_for(p, "l14_txt") == ckpt
    with pytest.raises(UsageError, match="dcdb encoder --pool"):
        checkpoint_for(p, "b32_img")
    other = tmp_path / "other.pt"
    other.write_bytes(b"w")
    res = run("encoder", "--pool", tmp_path / "pool", "--space", "b32", "--checkpoint", other)
    assert res.stdout.strip() == str(other.resolve())
    assert checkpoint_for(p, "b32_txt") == other.resolve()
    res = run("encoder", "--pool", tmp_path / "pool", "--space", "h14", "--checkpoint", other, ok=False)
    assert res.exit_code == 1 and "no embedding space of model 'h14'" in res.output


def test_seed_validation_messages():
    from dcdb.vectors.seeds import check_vectors

    with pytest.raises(SourceError, match="dim 3, the space has dim 4"):
        check_vectors(np.ones((2, 3)), 4, "x")
    with pytest.raises(SourceError, match="first row 2"):
        check_vectors(np.array([[1.0, 0], [0, 1], [np.inf, 0]]), 2, "x")
    with pytest.raises(SourceError, match="no seed vectors"):
        check_vectors(np.ones((0, 2)), 2, "x")
    out = check_vectors(np.array([3.0, 4.0]), 2, "x")
    np.testing.assert_allclose(out, [[0.6, 0.8]])
