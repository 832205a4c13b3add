"""Dedup: exact (sha256, url, normalised text) and semantic (k-means + per-cluster pairs), from
the library, SQL and the CLI, each checked against a brute force of the same rule."""

from __future__ import annotations

import itertools
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import dcdb.vectors.dedup as D
from dcdb.engine import connect
from dcdb.errors import ParameterError, PoolError, QueryError, UsageError
from dcdb.query import load_filter, run_filter
from dcdb.store import open_pool

DIM = 16
THRESHOLD = 0.95


def hexuid(i: int) -> str:
    return f"{(i * 0x9E3779B97F4A7C15) % (1 << 128):032x}"  # scrambled, so uid order != row order


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def rotate(a, b, cos):
    """A unit vector at cosine ``cos`` from unit ``a``, in the plane of a and b."""
    b = unit(b - (b @ a) * a)
    return cos * a + np.sqrt(1 - cos * cos) * b


def write_pool(tmp_path, vectors, *, texts=None, sha=None, urls=None, shards=2, dtype=np.float32, name="pool",
               more_spaces=(), uids=None):
    """A pool whose rows are ``vectors`` (space ``emb``) with the given metadata, in ``shards`` shards."""
    from dcdb.ingest.pool import ingest

    n = len(vectors)
    src = tmp_path / f"{name}_src"
    src.mkdir()
    table = pa.table({
        "uid": uids if uids is not None else [hexuid(i + 1) for i in range(n)],
        "url": urls if urls is not None else [f"https://x.example/{i}.jpg" for i in range(n)],
        "text": texts if texts is not None else [f"caption {i}" for i in range(n)],
        "original_width": [640] * n, "original_height": [480] * n,
        "sha256": sha if sha is not None else [f"{i:064x}" for i in range(n)],
        "clip_b32_similarity_score": pa.array([0.3] * n, pa.float32()),
        "clip_l14_similarity_score": pa.array([0.3] * n, pa.float32()),
    })
    vec = np.asarray(vectors, dtype=dtype)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for k in range(shards):
        lo, hi = bounds[k], bounds[k + 1]
        pq.write_table(table.slice(lo, hi - lo), src / f"{k:08d}.parquet")
        np.savez(src / f"{k:08d}.npz", emb=vec[lo:hi], **{sp: vec[lo:hi] for sp in more_spaces})
    ingest(src, tmp_path / name, jobs=1)
    return open_pool(tmp_path / name)


# ----------------------------------------------------------------------------- brute force


def brute_force(vectors, uids, clusters, threshold):
    """Reference: pairs in the same cluster with cos >= t - 1e-6 (float64), union-find, keep the
    smallest uid. Returns {uid: kept uid} for rows in a group of 2+."""
    v = np.asarray(vectors, dtype=np.float64)
    norm = np.linalg.norm(v, axis=1)
    ok = np.isfinite(norm) & (norm > 0)
    parent = list(range(len(v)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in itertools.combinations(range(len(v)), 2):
        same = ok[i] and ok[j] and clusters[i] == clusters[j]
        if same and v[i] @ v[j] / (norm[i] * norm[j]) >= threshold - 1e-6:
            parent[find(i)] = find(j)
    comps: dict[int, list[int]] = {}
    for i in range(len(v)):
        comps.setdefault(find(i), []).append(i)
    out = {}
    for members in comps.values():
        if len(members) > 1:
            keep = min(uids[i] for i in members)
            out.update({uids[i]: keep for i in members})
    return out


def stored(pool, space="emb", threshold=THRESHOLD):
    """{uid: (cluster, group_uid, size, sim)} from the pool view."""
    cols = D.group_columns(D.group_name(space, threshold))
    sel = ", ".join(f'"{c}"' for c in (cols["cluster"], cols["group"], cols["size"], cols["sim"]))
    rows = connect(open_pool(pool.path)).sql(f"SELECT uid, {sel} FROM pool").fetchall()
    return {r[0]: r[1:] for r in rows}


def crafted_vectors():
    """Rows with a known structure (threshold 0.95), around 5 far-apart directions.

    0, 1: identical  |  2, 3: cos 0.96 (above)  |  4, 5: cos 0.94 (below)
    6, 7, 8: a chain, 6~7 and 7~8 at cos 0.96, 6-8 at 0.843  |  9: zero vector  |  10: NaN
    11..15: loners."""
    rng = np.random.default_rng(5)
    base = [unit(rng.standard_normal(DIM)) for _ in range(12)]
    v = [None] * 16
    v[0] = v[1] = base[0]
    v[2], v[3] = base[1], rotate(base[1], base[2], 0.96)
    v[4], v[5] = base[3], rotate(base[3], base[4], 0.94)
    v[6] = base[5]
    v[7] = rotate(base[5], base[6], 0.96)
    theta = 2 * np.arccos(0.96)
    w = unit(base[6] - (base[6] @ base[5]) * base[5])
    v[8] = np.cos(theta) * base[5] + np.sin(theta) * w
    v[9] = np.zeros(DIM)
    v[10] = np.full(DIM, np.nan)
    for k in range(11, 16):
        v[k] = base[k - 4]
    return np.array(v)


# ------------------------------------------------------------------------- components


def _union_find_roots(m, i, j):
    parent = list(range(m))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in zip(i, j, strict=True):
        parent[find(a)] = find(b)
    return [find(x) for x in range(m)]


def test_components_match_union_find():
    rng = np.random.default_rng(0)
    for m, e in ((1, 0), (10, 5), (200, 150), (500, 2000)):
        i, j = rng.integers(0, m, e), rng.integers(0, m, e)
        label = D.components(m, i, j)
        roots = _union_find_roots(m, i.tolist(), j.tolist())
        for a, b in itertools.combinations(range(min(m, 60)), 2):
            assert (label[a] == label[b]) == (roots[a] == roots[b])
        assert all(label[x] <= x for x in range(m))


# ---------------------------------------------------------------------------- semantic


def test_crafted_structure_one_cluster(tmp_path):
    vec = crafted_vectors()
    pool = write_pool(tmp_path, vec)
    rep = D.semantic_dedup(pool, "emb", THRESHOLD, clusters=1)
    uids = [hexuid(i + 1) for i in range(len(vec))]
    got = stored(pool)
    expect = brute_force(vec, uids, [0] * len(vec), THRESHOLD)
    assert {u: g for u, (_, g, _, _) in got.items() if g is not None} == expect
    groups = {frozenset(u for u in expect if expect[u] == k) for k in expect.values()}
    assert groups == {frozenset(uids[i] for i in (0, 1)), frozenset(uids[i] for i in (2, 3)),
                      frozenset(uids[i] for i in (6, 7, 8))}  # 4-5 below: no group; chain: one
    assert (rep.groups, rep.in_groups, rep.dropped, rep.left_out) == (3, 7, 4, 2)
    assert got[uids[9]][0] == -1 and got[uids[10]][0] == -1  # zero and NaN vectors left out
    assert got[uids[6]][2] == 3 and got[uids[4]][2] == 1
    assert got[uids[0]][3] == pytest.approx(1.0, abs=1e-6)
    assert got[uids[4]][3] == pytest.approx(0.94, abs=1e-6)
    assert got[uids[9]][3] is None


def test_threshold_one_finds_identical_vectors_only(tmp_path):
    pool = write_pool(tmp_path, crafted_vectors(), dtype=np.float16)
    D.semantic_dedup(pool, "emb", 1.0, clusters=1)
    got = stored(pool, threshold=1.0)
    assert {u for u, r in got.items() if r[1] is not None} == {hexuid(1), hexuid(2)}


def random_vectors(n=300, seed=1):
    """Clustered unit vectors with planted near duplicates at cosines 0.9-1 (none within 1e-3 of 0.95)."""
    rng = np.random.default_rng(seed)
    cents = np.array([unit(rng.standard_normal(DIM)) for _ in range(6)])
    v = cents[rng.integers(0, 6, n)] + 0.25 * rng.standard_normal((n, DIM))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for k in rng.choice(n, n // 3, replace=False):
        src = rng.integers(0, n)
        c = rng.uniform(0.9, 1.0)
        while abs(c - THRESHOLD) < 1e-3:
            c = rng.uniform(0.9, 1.0)
        v[k] = rotate(v[src], rng.standard_normal(DIM), c)
    return v


@pytest.mark.parametrize("small", [False, True], ids=["one-range", "pieces-blocks-flushes"])
def test_random_pool_matches_brute_force_over_the_same_clusters(tmp_path, monkeypatch, small):
    vec = random_vectors()
    pool = write_pool(tmp_path, vec, shards=3, dtype=np.float16)
    kw = {}
    if small:  # many ranges, clusters cut into pieces, several blocks per piece, edge compression
        monkeypatch.setattr(D, "BLOCK", 7)
        monkeypatch.setattr(D, "EDGE_FLUSH", 5)
        kw["chunk_bytes"] = 40 * DIM * 2
    D.semantic_dedup(pool, "emb", THRESHOLD, clusters=5, seed=3, **kw)
    got = stored(pool)
    uids = [hexuid(i + 1) for i in range(len(vec))]
    clusters = [got[u][0] for u in uids]
    assert len(set(clusters)) > 1
    stored16 = vec.astype(np.float16).astype(np.float64)
    expect = brute_force(stored16, uids, clusters, THRESHOLD)
    assert len(expect) > 20
    assert {u: r[1] for u, r in got.items() if r[1] is not None} == expect
    # max_sim: the highest cosine to another row of the same cluster
    unitv = stored16 / np.linalg.norm(stored16, axis=1, keepdims=True)
    for i in range(0, len(vec), 17):
        same = [j for j in range(len(vec)) if clusters[j] == clusters[i] and j != i]
        assert got[uids[i]][3] == pytest.approx(max(unitv[i] @ unitv[j] for j in same), abs=1e-5)


def test_probes_compare_rows_in_more_clusters(tmp_path, monkeypatch):
    vec = random_vectors(seed=6)
    pool = write_pool(tmp_path, vec, dtype=np.float16)
    uids = [hexuid(i + 1) for i in range(len(vec))]
    everywhere = brute_force(vec.astype(np.float16), uids, [0] * len(vec), THRESHOLD)

    def linked(probes, **kw):
        D.semantic_dedup(pool, "emb", THRESHOLD, clusters=5, seed=1, probes=probes, force=True, **kw)
        got = stored(pool)
        return {u: r[1] for u, r in got.items() if r[1] is not None}

    one, two, every = linked(1), linked(2), linked(5)
    assert every == everywhere  # each pair shares one of its 5 clusters: the global brute force

    def pairs(g):
        return {(a, b) for a in g for b in g if a < b and g[a] == g[b]}

    assert pairs(one) < pairs(two) <= pairs(everywhere)  # a boundary split a pair that 2 probes find
    monkeypatch.setattr(D, "BLOCK", 6)
    assert linked(2, chunk_bytes=50 * DIM * 2) == two  # pieces and ranges with repeated rows
    with pytest.raises(UsageError, match="probes"):
        D.semantic_dedup(pool, "emb", THRESHOLD, clusters=5, probes=6, force=True)


def test_chunking_gives_the_same_result(tmp_path, monkeypatch):
    vec = random_vectors(seed=2)
    pool = write_pool(tmp_path, vec, dtype=np.float16)
    D.semantic_dedup(pool, "emb", THRESHOLD, clusters=4)
    whole = stored(pool)
    monkeypatch.setattr(D, "BLOCK", 5)
    D.semantic_dedup(pool, "emb", THRESHOLD, clusters=4, force=True, chunk_bytes=30 * DIM * 2)
    _same(stored(pool), whole)


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][:3] == b[k][:3]
        assert (a[k][3] is None) == (b[k][3] is None)
        if a[k][3] is not None:
            assert a[k][3] == pytest.approx(b[k][3], abs=1e-6)
    return True


def test_seeded_deterministic_and_recomputed_only_when_asked(tmp_path):
    vec = random_vectors(seed=4)
    pool = write_pool(tmp_path, vec)
    D.semantic_dedup(pool, "emb", THRESHOLD, clusters=6, seed=9)
    first = stored(pool)
    meta = D.computed(pool)[("emb", THRESHOLD)]
    with pytest.raises(UsageError, match="already computed"):
        D.semantic_dedup(pool, "emb", THRESHOLD, clusters=6, seed=9)
    assert D.computed(pool)[("emb", THRESHOLD)]["created"] == meta["created"]
    rep = D.semantic_dedup(pool, "emb", THRESHOLD, clusters=6, seed=9, force=True)
    assert rep.reused_clusters  # same k-means settings: the stored clusters are reused
    _same(stored(pool), first)
    # another threshold with the same settings reuses the clusters; another seed does not
    rep = D.semantic_dedup(pool, "emb", 0.9, clusters=6, seed=9)
    assert rep.reused_clusters
    assert [r[0] for r in stored(pool, threshold=0.9).values()] == [r[0] for r in first.values()]
    rep = D.semantic_dedup(pool, "emb", 0.97, clusters=6, seed=10)
    assert not rep.reused_clusters
    # the same seed computed afresh (no reuse possible) gives the same clusters and groups
    other = write_pool(tmp_path, vec, name="pool2")
    D.semantic_dedup(other, "emb", THRESHOLD, clusters=6, seed=9)
    _same(stored(other), first)


def test_kmeans_sample_does_not_depend_on_the_layout(tmp_path):
    """The k-means sample is drawn by source position: the same source rows with their uids
    shuffled (so the pool, stored in uid order, holds them in another order) get the same clusters."""
    from dcdb.engine import connect

    vec = random_vectors(seed=8)
    perm = np.random.default_rng(2).permutation(len(vec))
    pools = [write_pool(tmp_path, vec, shards=3, name="ordered"),
             write_pool(tmp_path, vec, shards=3, name="shuffled", uids=[hexuid(int(i) + 1) for i in perm])]
    clusters = []
    for pool in pools:
        D.semantic_dedup(pool, "emb", THRESHOLD, clusters=5, seed=3, sample=60)
        col = f"{D.group_name('emb', THRESHOLD)}_cluster"
        rows = connect(pool).sql(f"SELECT {col} FROM pool ORDER BY source_shard, source_row").fetchall()
        clusters.append([r[0] for r in rows])
    assert len(set(clusters[0])) > 1 and clusters[0] == clusters[1]


def test_semantic_bad_input(tmp_path, small_pool):
    pool = open_pool(small_pool)
    with pytest.raises(PoolError, match="no embedding space 'nope'") as e:
        D.semantic_dedup(pool, "nope", 0.9)
    assert "l14_img" in e.value.hint
    for bad in (0, -0.1, 1.5, float("nan"), "x"):
        with pytest.raises(UsageError, match="threshold"):
            D.semantic_dedup(pool, "l14_img", bad)
    with pytest.raises(UsageError, match="decimals"):
        D.semantic_dedup(pool, "l14_img", 0.1234567)
    with pytest.raises(UsageError, match="clusters"):
        D.semantic_dedup(pool, "l14_img", 0.9, clusters=0)
    with pytest.raises(UsageError, match="sample"):
        D.semantic_dedup(pool, "l14_img", 0.9, clusters=50, sample=10)
    assert not D.computed(pool)


def test_group_name_clash_is_refused(tmp_path):
    pool = write_pool(tmp_path, crafted_vectors(), more_spaces=("e", "e_0"))
    D.semantic_dedup(pool, "e_0", 1.0, clusters=1)
    with pytest.raises(UsageError, match="already holds near duplicates of e_0 at 1") as e:
        D.semantic_dedup(pool, "e", 0.1, clusters=1, force=True)  # both would be neardup_e_0_1
    assert "--drop neardup_e_0_1" in e.value.hint


def test_group_names():
    assert D.group_name("l14_img", 0.95) == "neardup_l14_img_0_95"
    assert D.group_name("l14_img", 1) == "neardup_l14_img_1"
    assert D.group_name("b32_img", 0.000001) == "neardup_b32_img_0_000001"


# ----------------------------------------------------------------------------------- SQL


def test_near_duplicates_from_sql(tmp_path):
    vec = crafted_vectors()
    pool = write_pool(tmp_path, vec)
    D.semantic_dedup(pool, "emb", THRESHOLD, clusters=1)
    con = connect(open_pool(pool.path))
    uids = [hexuid(i + 1) for i in range(len(vec))]
    expect = brute_force(vec, uids, [0] * len(vec), THRESHOLD)
    drop = {r[0] for r in con.sql("SELECT uid FROM near_duplicates('emb', 0.95)").fetchall()}
    assert drop == {u for u, k in expect.items() if u != k}
    rows = con.sql("SELECT uid, group_uid, group_size, keep FROM near_duplicate_groups('emb', 0.95)").fetchall()
    assert {r[0]: r[1] for r in rows} == expect
    assert all(r[3] == (r[0] == r[1]) for r in rows)
    # the query shape: keep one per group, with a parameter for the threshold
    filt = load_filter("stdin", text="SELECT uid FROM pool WHERE clip_l14_similarity_score > 0.2 "
                                     "AND uid NOT IN (SELECT uid FROM near_duplicates('emb', $t))")
    res = run_filter(open_pool(pool.path), filt, {"t": "0.95"})
    assert res.rows == len(vec) - len(drop)
    # another keep rule, in SQL over the groups: the highest score of each group stays
    other = con.sql("SELECT uid FROM near_duplicate_groups('emb', 0.95) JOIN pool USING (uid) QUALIFY "
                    "row_number() OVER (PARTITION BY group_uid ORDER BY clip_b32_similarity_score DESC, "
                    "uid DESC) > 1").fetchall()
    by_group = {}
    for u, k in expect.items():
        by_group.setdefault(k, []).append(u)
    assert {r[0] for r in other} == {u for g in by_group.values() for u in g if u != max(g)}
    # the shipped filter file
    res = run_filter(open_pool(pool.path), load_filter("semantic_dedup"), {"space": "emb"})
    assert res.rows == len(vec) - len(drop)


def test_near_duplicates_sql_errors(tmp_path):
    pool = write_pool(tmp_path, crafted_vectors())
    D.semantic_dedup(pool, "emb", 0.9, clusters=1)

    def run(sql):
        return run_filter(open_pool(pool.path), load_filter("stdin", text=sql))

    with pytest.raises(PoolError, match="threshold 0.95 were not computed") as e:
        run("SELECT uid FROM near_duplicates('emb', 0.95)")
    assert "dcdb dedup --pool" in e.value.hint and "--threshold 0.95" in e.value.hint
    assert "computed for emb: 0.9" in e.value.message
    with pytest.raises(PoolError, match="no embedding space 'l14_img'"):
        run("SELECT uid FROM near_duplicates('l14_img', 0.95)")
    with pytest.raises(ParameterError, match=r"\(0, 1\]"):
        run("SELECT uid FROM near_duplicate_groups('emb', 1.5)")
    with pytest.raises(ParameterError, match="needs a space"):
        run("SELECT uid FROM near_duplicates(NULL, 0.9)")
    assert run("SELECT uid FROM near_duplicates('emb', 0.9)").rows >= 4


# ------------------------------------------------------------------------------- exact


TEXTS = [
    "A  Dog\non the beach",      # 0 ┐ the same after normalisation
    "a dog on the beach",        # 1 │
    "ａ DOG on\u3000the beach ",  # 2 ┘ fullwidth a, ideographic space
    "a dog on the beach!",       # 3: punctuation kept: differs
    "",                          # 4 ┐ empty / whitespace-only: never duplicates
    " \x85 ",                    # 5 ┘
    "ﬁsh",                       # 6 ┐ NFKC: the ligature is "fi"
    "FISH",                      # 7 ┘
    "unique caption",            # 8
    "café",                      # 9 ┐ composed / decomposed é
    "cafe\u0301",                # 10┘
    "Straße",                    # 11
]


def exact_pool(tmp_path):
    n = len(TEXTS)
    sha = [f"{i:064x}" for i in range(n)]
    sha[3] = sha[5] = sha[8] = sha[0]
    sha[9] = ""
    sha[10] = ""
    urls = [f"https://x.example/{i}.jpg" for i in range(n)]
    urls[1] = urls[7] = urls[11]
    return write_pool(tmp_path, np.eye(n, DIM), texts=TEXTS, sha=sha, urls=urls)


def reference_exact(values, uids):
    groups: dict[str, list[str]] = {}
    for v, u in zip(values, uids, strict=True):
        if v:
            groups.setdefault(v, []).append(u)
    return {u: min(g) for g in groups.values() if len(g) > 1 for u in g}


@pytest.mark.parametrize("key", ["sha256", "url", "text"])
def test_exact_duplicates_match_python(tmp_path, key):
    pool = exact_pool(tmp_path)
    con = connect(pool)
    meta = con.sql(f"SELECT uid, {key} FROM pool").fetchall()
    values = [D.normalise_text(v) if key == "text" else v for _, v in meta]
    expect = reference_exact(values, [u for u, _ in meta])
    rows = con.sql(f"SELECT uid, group_uid, group_size, keep FROM exact_duplicate_groups('{key}')").fetchall()
    assert {r[0]: r[1] for r in rows} == expect
    assert all(r[3] == (r[0] == r[1]) for r in rows)
    assert all(r[2] == sum(1 for g in expect.values() if g == r[1]) for r in rows)
    drop = {r[0] for r in con.sql(f"SELECT uid FROM exact_duplicates('{key}')").fetchall()}
    assert drop == {u for u, k in expect.items() if u != k}
    if key == "text":
        texts = {frozenset(TEXTS[i] for i in range(len(TEXTS)) if hexuid(i + 1) in grp)
                 for grp in [{u for u in expect if expect[u] == k} for k in set(expect.values())]}
        assert texts == {frozenset(TEXTS[:3]), frozenset(TEXTS[6:8]), frozenset(TEXTS[9:11])}
    if key == "sha256":
        assert len(expect) == 4  # empty sha256 is not a key


def test_norm_text_matches_python(tmp_path, small_pool):
    con = connect(small_pool)
    extra = ["x\u2028y\u00a0 z", "\tTAB\x0bvt\x1cfs", "Ǆ ǅ ǆ", "½ ⅓ ①", "\u200bzero", None]
    texts = [r[0] for r in con.sql("SELECT text FROM pool").fetchall()] + TEXTS + extra
    got = [r[0] for r in con.execute("SELECT norm_text(t) FROM (SELECT unnest($t) AS t)", {"t": texts}).fetchall()]
    expect = [D.normalise_text(t) for t in texts]
    assert got == expect
    assert D.normalise_text("ﬁ\u3000X") == "fi x" and unicodedata.normalize("NFKC", "ﬁ") == "fi"


def test_exact_key_errors(tmp_path, small_pool):
    def run(sql):
        return run_filter(open_pool(small_pool), load_filter("stdin", text=sql))

    with pytest.raises(ParameterError, match="unknown key 'nope'") as e:
        run("SELECT uid FROM exact_duplicates('nope')")
    assert "'sha256', 'url', 'text'" in e.value.hint
    with pytest.raises(ParameterError, match="is a vector"):
        run("SELECT uid FROM exact_duplicates('l14_img')")
    # another metadata column works as a key as is
    assert run("SELECT uid FROM exact_duplicates('original_width')").rows > 0
    assert run("SELECT uid FROM exact_duplicates('sha256')").rows == 0
    res = run_filter(open_pool(small_pool), load_filter("exact_dedup"), {"key": "url"})
    assert res.rows == 200


# ------------------------------------------------------------------------------- CLI


def invoke(*args):
    from dcdb.cli import cli

    return CliRunner().invoke(cli, list(args))


def test_cli(tmp_path):
    pool = write_pool(tmp_path, crafted_vectors())
    p = str(pool.path)
    r = invoke("dedup", "--pool", p, "--space", "emb", "--threshold", "0.95", "--clusters", "1")
    assert r.exit_code == 0, r.output
    assert "3 groups, 4 of 16 rows to drop" in r.output and "neardup_emb_0_95" in r.output
    r = invoke("dedup", "--pool", p, "--space", "emb", "--threshold", "0.95")
    assert r.exit_code == 2 and "already computed" in r.output and "--force" in r.output
    r = invoke("-q", "dedup", "--pool", p, "--space", "emb", "--threshold", "0.95", "--clusters", "1", "--force")
    assert r.exit_code == 0 and r.output == ""
    r = invoke("dedup", "--pool", p, "--list")
    assert r.exit_code == 0 and r.output.startswith("emb\t0.95\t3 groups\t4 to drop")
    from dcdb.cli import cli

    r = CliRunner().invoke(cli, ["query", "-", "--pool", p],  # stdin: the pattern
                           input="SELECT uid FROM pool WHERE uid NOT IN (SELECT uid FROM near_duplicates('emb', 0.95))")
    assert r.exit_code == 0 and len(r.stdout.split()) == 12
    r = invoke("dedup", "--pool", p, "--space", "nope")
    assert r.exit_code == 1 and "no embedding space 'nope'" in r.output
    r = invoke("dedup", "--pool", p, "--space", "emb", "--threshold", "0")
    assert r.exit_code == 2 and "(0, 1]" in r.output
    r = invoke("sql", "SELECT count(*) FROM near_duplicates('emb', 0.5)", "--pool", p)
    assert r.exit_code != 0 and "dcdb dedup --pool" in r.output
    r = invoke("filters")
    assert "semantic_dedup" in r.output and "exact_dedup" in r.output


def test_dedup_does_not_break_metadata_only_pools(tmp_path):
    from dcdb.ingest.pool import ingest
    from dcdb.demo.synth import synth_pool

    synth_pool(tmp_path / "src", rows=30, shards=1, seed=0, embeddings=False, jobs=1)
    ingest(tmp_path / "src", tmp_path / "pool", jobs=1)
    pool = open_pool(tmp_path / "pool")
    assert run_filter(pool, load_filter("stdin", text="SELECT uid FROM exact_duplicates('text')")).rows >= 0
    with pytest.raises(PoolError, match="metadata-only"):
        run_filter(pool, load_filter("stdin", text="SELECT uid FROM near_duplicates('l14_img', 0.9)"))
    with pytest.raises((PoolError, QueryError)):
        D.semantic_dedup(pool, "l14_img", 0.9)
