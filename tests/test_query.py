"""Filters: header, parameters, read-only rule, results against brute force, outputs."""

import glob
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcdb import uids as U
from dcdb.engine import connect, embedding_scans
from dcdb.errors import (
    FilterNotFoundError,
    ParameterError,
    PoolError,
    QueryError,
    ReadOnlyError,
    UidError,
)
from dcdb.query import load_filter, parse_filter, run_filter
from dcdb.store import open_pool


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from dcdb.ingest.pool import ingest
    from dcdb.demo.synth import synth_pool

    root = tmp_path_factory.mktemp("qpool")
    synth_pool(root / "src", rows=300, shards=3, seed=3)
    ingest(root / "src", root / "pool", jobs=1)
    return open_pool(root / "pool")


@pytest.fixture(scope="module")
def source(pool):
    """The source metadata and embeddings, read straight from the DataComp files, in the pool's
    row order: the source's rows stably sorted by uid (store format 2 lays every pool out so)."""
    src = sorted(glob.glob(str(pool.manifest["source"]) + "/*.parquet"))
    meta = pa.concat_tables([pq.read_table(f) for f in src])
    emb = {}
    for f in src:
        z = np.load(f[: -len(".parquet")] + ".npz")
        for k in z.files:
            emb.setdefault(k, []).append(z[k])
    uid = U.from_hex(meta.column("uid").to_pylist())
    order = np.lexsort((uid["f1"], uid["f0"]))
    return meta.take(pa.array(order)), {k: np.concatenate(v).astype(np.float32)[order] for k, v in emb.items()}


def F(text, name="t"):
    return parse_filter(name, text, None)


# ------------------------------------------------------------------------------- header


def test_header_parsing():
    f = F(
        "-- Keep good rows.\n-- Second line.\n"
        "-- @param threshold float = 0.3 minimum score\n"
        "-- @param n int\n-- @param tag str = null optional\n"
        "-- @asset centroids a .npy of centroids\n"
        "SELECT uid FROM pool -- @param not_header int\n"
    )
    assert f.description == "Keep good rows.\nSecond line."
    assert f.params["threshold"].default == 0.3 and f.params["threshold"].doc == "minimum score"
    assert not f.params["n"].has_default
    assert f.params["tag"].has_default and f.params["tag"].default is None
    assert f.assets == [("centroids", "a .npy of centroids")]
    assert "not_header" not in f.params


def test_header_errors():
    with pytest.raises(QueryError, match="unknown type"):
        F("-- @param x decimal = 1\nSELECT 1")
    with pytest.raises(QueryError, match="unknown header tag"):
        F("-- @parm x int\nSELECT 1")
    with pytest.raises(ParameterError, match="expects a float"):
        F("-- @param x float = abc\nSELECT 1")


def test_unknown_filter_name_suggests_closest():
    with pytest.raises(FilterNotFoundError, match="no_filter"):
        load_filter("no_filtr")
    with pytest.raises(FilterNotFoundError, match="does not exist"):
        load_filter("missing/file.sql")


# ---------------------------------------------------------------------------- parameters


def test_parameters_found_by_parser_not_in_strings_or_comments(pool):
    f = F(
        "-- @param t float = 0.3\n"
        "SELECT uid FROM pool /* $inblock */ WHERE text <> '$instring' -- $incomment\n"
        "AND clip_l14_similarity_score >= $t"
    )
    res = run_filter(pool, f)
    assert res.params == {"t": 0.3}


def test_missing_unknown_and_mistyped_parameters(pool):
    f = F("-- @param t float\nSELECT uid FROM pool WHERE clip_l14_similarity_score >= $t")
    with pytest.raises(ParameterError, match=r"needs parameter\(s\) \$t"):
        run_filter(pool, f)
    with pytest.raises(ParameterError, match=r"no parameter \$tt.*did you mean 't'"):
        run_filter(pool, f, {"t": "0.2", "tt": "1"})
    with pytest.raises(ParameterError, match="expects a float, got 'high'"):
        run_filter(pool, f, {"t": "high"})
    g = F("SELECT uid FROM pool LIMIT $n")  # undeclared: type inferred
    assert run_filter(pool, g, {"n": "7"}).rows == 7


# ----------------------------------------------------------------------------- results


def test_threshold_filter_matches_brute_force(pool, source):
    meta, _ = source
    f = F("-- @param t float = 0.3\nSELECT uid FROM pool WHERE clip_l14_similarity_score >= $t")
    res = run_filter(pool, f, {"t": "0.31"})
    score = meta.column("clip_l14_similarity_score").to_numpy(zero_copy_only=False)
    keep = score >= np.float32(0.31)  # NaN never passes, as in numpy
    expected = np.array(
        [(int(u[:16], 16), int(u[16:], 16)) for u in np.asarray(meta.column("uid"))[keep]], np.dtype("u8,u8")
    )
    expected.sort()
    assert res.uids.tobytes() == expected.tobytes()
    assert np.isnan(score).any(), "the synthetic pool should contain NaN scores"


def test_nan_scores_are_null_and_never_pass(pool, source):
    meta, _ = source
    n_nan = int(np.isnan(meta.column("clip_l14_similarity_score").to_numpy(zero_copy_only=False)).sum())
    assert n_nan > 0
    con = connect(pool)
    for view in ("pool", "pool_metadata"):
        assert con.execute(f"SELECT count(*) FROM {view} WHERE clip_l14_similarity_score IS NULL").fetchone()[0] == n_nan
        assert con.execute(f"SELECT count(*) FROM {view} WHERE isnan(clip_l14_similarity_score)").fetchone()[0] == 0
    kept = con.execute("SELECT count(*) FROM pool WHERE clip_l14_similarity_score >= -2").fetchone()[0]
    assert kept == pool.rows - n_nan


def test_copies_upsample_and_are_validated(pool):
    f = F("SELECT uid, CAST(original_width % 3 AS INTEGER) AS copies FROM pool")
    res = run_filter(pool, f)
    con = connect(pool)
    expect = con.execute("SELECT sum(original_width % 3) FROM pool").fetchone()[0]
    assert res.rows == expect
    assert U.is_sorted(res.uids)
    with pytest.raises(QueryError, match="negative copies"):
        run_filter(pool, F("SELECT uid, -1 AS copies FROM pool"))
    with pytest.raises(QueryError, match="not integer"):
        run_filter(pool, F("SELECT uid, 1.5 AS copies FROM pool"))


def test_duplicates_in_result_are_kept(pool):
    res = run_filter(pool, F("SELECT uid FROM pool UNION ALL SELECT uid FROM pool"))
    assert res.rows == 2 * pool.rows
    assert res.uids.tobytes() == np.repeat(run_filter(pool, F("SELECT uid FROM pool")).uids, 2).tobytes()


def test_result_errors(pool):
    with pytest.raises(QueryError, match="no uid column"):
        run_filter(pool, F("SELECT url FROM pool"))
    with pytest.raises(UidError, match="not 32 lowercase hex"):
        run_filter(pool, F("SELECT upper(uid) AS uid FROM pool"))
    with pytest.raises(UidError, match="expected 32 lowercase hex"):
        run_filter(pool, F("SELECT 'abc' AS uid"))
    with pytest.raises(QueryError, match="(?s)syntax error.*LINE 2"):
        run_filter(pool, F("SELECT uid\nFROM WHERE pool"))
    with pytest.raises(QueryError, match="nonexistent_column"):
        run_filter(pool, F("SELECT uid FROM pool WHERE nonexistent_column > 1"))


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT uid FROM pool) TO 'x.csv'",
        "ATTACH 'x.db'",
        "INSTALL vss",
        "CREATE TABLE t AS SELECT uid FROM pool",
        "SET threads = 1",
        "PRAGMA show_tables",
        "SELECT uid FROM pool; DROP VIEW pool",
    ],
)
def test_filters_only_read(pool, sql, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(QueryError):
        run_filter(pool, F(sql))
    assert not list(tmp_path.iterdir())


def test_write_statement_is_read_only_error(pool):
    with pytest.raises(ReadOnlyError, match="may only read"):
        run_filter(pool, F("COPY (SELECT uid FROM pool) TO 'x.csv'"))


# ------------------------------------------------------------------------------- engine


def test_pool_view_embeddings_match_npz(pool, source):
    _, emb = source
    con = connect(pool)
    types = {r[0]: r[1] for r in con.execute("DESCRIBE pool").fetchall()}
    assert types["l14_img"] == "FLOAT[768]" and types["b32_txt"] == "FLOAT[512]"
    got = con.sql("SELECT l14_img, b32_txt FROM pool").to_arrow_table()
    l14 = np.asarray(got.column("l14_img").combine_chunks().flatten()).reshape(-1, 768)
    assert np.array_equal(l14, emb["l14_img"])
    b32 = np.asarray(got.column("b32_txt").combine_chunks().flatten()).reshape(-1, 512)
    assert np.array_equal(b32, emb["b32_txt"])


def test_metadata_query_reads_no_vector_bytes(pool):
    con = connect(pool)
    assert con.execute("SELECT count(*), avg(original_width) FROM pool WHERE text LIKE '%a%'").fetchone()[0] >= 0
    assert all(s.vector_bytes_read == 0 for s in embedding_scans(con))
    con.execute("SELECT max(l14_img[1]) FROM pool").fetchone()
    read = {s._column: s.vector_bytes_read for s in embedding_scans(con)}
    assert read["l14_img"] > 0 and read["b32_img"] == 0


def test_metadata_query_does_not_import_lance(pool):
    code = (
        "import sys, dcdb; con = dcdb.connect(sys.argv[1]);"
        "con.sql('SELECT count(*) FROM pool WHERE clip_l14_similarity_score > 0.1').fetchall();"
        "assert 'lance' not in sys.modules, 'lance imported by a metadata query';"
        "con.sql('SELECT max(l14_img[1]) FROM pool').fetchall(); assert 'lance' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code, str(pool.path)], check=True)


def test_damaged_embedding_table_is_a_pool_error(small_pool):
    import lance

    pool = open_pool(small_pool)
    path = str(pool.lance_path("l14_img"))
    lance.write_dataset(lance.dataset(path).to_table().slice(0, 5), path, mode="overwrite")
    res = run_filter(pool, F("SELECT uid FROM pool WHERE clip_l14_similarity_score > 0"))  # no vectors: fine
    assert len(res.uids) > 0
    with pytest.raises(PoolError, match="has 5 rows, the pool 200"):
        run_filter(pool, F("SELECT uid FROM pool WHERE cosine(l14_img, l14_txt) > 0"))
    shutil.rmtree(pool.lance_path("b32_img"))
    with pytest.raises(PoolError, match="embedding table .* is missing"):
        connect(pool)


def test_embedding_scan_over_an_open_dataset_counts_its_rows(pool, source):
    import duckdb
    import lance

    from dcdb.engine import embedding_scan

    _, emb = source
    scan = embedding_scan(lance.dataset(str(pool.lance_path("b32_img"))), "b32_img", 512)
    assert scan.count_rows() == pool.rows
    con = duckdb.connect()
    con.register("emb", scan)
    got = con.sql("SELECT b32_img FROM emb").to_arrow_table().column(0).combine_chunks()
    assert np.array_equal(np.asarray(got.flatten()).reshape(-1, 512), emb["b32_img"])


def test_cosine_and_dot_macros_match_numpy(pool, source):
    _, emb = source
    con = connect(pool)
    got = con.sql("SELECT cosine(b32_img, b32_txt) AS c, dot(l14_img, l14_txt) AS d FROM pool").to_arrow_table()
    a, b = emb["b32_img"], emb["b32_txt"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(got.column("c").to_numpy(), cos, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.column("d").to_numpy(), (emb["l14_img"] * emb["l14_txt"]).sum(1), rtol=1e-5, atol=1e-6)
    q = np.zeros(512, np.float32)
    q[0] = 1.0
    got = con.execute("SELECT cosine(b32_img, $q) FROM pool", {"q": q.tolist()}).fetchall()
    np.testing.assert_allclose([r[0] for r in got], a[:, 0] / np.linalg.norm(a, axis=1), rtol=1e-5, atol=1e-6)


def test_scores_equal_pair_cosines(pool):
    con = connect(pool)
    worst = con.execute(
        "SELECT max(abs(clip_l14_similarity_score - dot(l14_img, l14_txt))) FROM pool "
        "WHERE clip_l14_similarity_score IS NOT NULL"
    ).fetchone()[0]
    assert worst < 1e-3


def test_word_count_macros_follow_python_split(pool):
    import random

    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    rnd = random.Random(0)
    alphabet = spaces + ["a", "é", "\u200b", "x y"]
    texts = ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 9))) for _ in range(3000)]
    con = connect(pool)
    got = con.sql(
        "SELECT t, py_words(t) AS n, words_gt(t, 0) AS g0, words_gt(t, 2) AS g2 FROM (SELECT unnest($texts) AS t)",
        params={"texts": texts},
    ).fetchall()
    for t, n, g0, g2 in got:
        assert n == len(t.split()) and g0 == (len(t.split()) > 0) and g2 == (len(t.split()) > 2), repr(t)


def test_derived_columns_join_and_override(tmp_path):
    import pyarrow.compute as pc

    from dcdb.derived import groups, write_group
    from dcdb.errors import PoolError
    from dcdb.ingest.pool import ingest
    from dcdb.demo.synth import synth_pool

    synth_pool(tmp_path / "src", rows=90, shards=3, seed=11)
    ingest(tmp_path / "src", tmp_path / "pool", jobs=1)
    pool = open_pool(tmp_path / "pool")

    def compute(shard):
        t = pq.read_table(pool.path / shard["metadata"], columns=["uid", "text"])
        return pa.table({"chars": pc.utf8_length(t["text"]), "text": pc.utf8_upper(t["text"]),
                         "uid_copy": t["uid"]})

    write_group(pool, "extra", compute, info={"how": "test"})
    assert "extra" in groups(pool)
    con = connect(pool)
    bad = con.execute("SELECT count(*) FROM pool WHERE uid <> uid_copy OR chars <> length(text)").fetchone()[0]
    assert bad == 0  # row-aligned across shards
    assert con.execute("SELECT count(*) FROM pool WHERE text <> upper(text)").fetchone()[0] == 0  # override
    assert con.execute("SELECT count(*) FROM pool_metadata WHERE text <> upper(text)").fetchone()[0] > 0

    def wrong_rows(shard):
        return pa.table({"x": [1]})

    with pytest.raises(PoolError, match=f"got 1 rows, expected {pool.shards[0]['rows']}"):
        write_group(pool, "broken", wrong_rows)
    assert "broken" not in groups(pool) and not list((pool.path / "derived").glob(".broken*"))


# ------------------------------------------------------- the pool view a statement needs


def test_statements_join_only_what_they_read_and_get_the_same_rows(small_pool, tmp_path):
    """``pool_reader`` drops the positional joins of derived groups and embedding spaces a statement
    does not read; every statement must return exactly what the full view returns."""
    import duckdb

    from dcdb.annotate import import_columns
    from dcdb.engine import _VIEWS, _read_joins, pool_reader

    pool = open_pool(small_pool)
    uids = duckdb.sql(f"SELECT uid FROM read_parquet('{small_pool}/metadata/*.parquet')").fetchall()
    uids = [u for (u,) in uids]
    rng = np.random.default_rng(5)
    pq.write_table(pa.table({"uid": uids, "lang": rng.choice(["en", "de"], len(uids))}), tmp_path / "l.parquet")
    import_columns(pool, tmp_path / "l.parquet")
    # a group that replaces a metadata column: pool's text is the group's (`dcdb annotate --from`
    # refuses such a column, so the group is written directly, as a Python user may)
    from dcdb.derived import write_group

    t = pa.table({"text": [f"t{i}" for i in range(len(uids))], "score2": rng.random(len(uids))})
    first = dict(zip([s["name"] for s in pool.shards], np.cumsum([0] + [s["rows"] for s in pool.shards])))
    write_group(pool, "retext", lambda shard: t.slice(int(first[shard["name"]]), shard["rows"]))
    pool = open_pool(small_pool)
    con = connect(pool)
    view = _VIEWS[con]
    cases = {
        "SELECT uid FROM pool WHERE clip_l14_similarity_score > 0.2": set(),
        "SELECT uid, lang FROM pool WHERE lang = 'en'": {"lang"},
        "SELECT uid FROM pool WHERE text LIKE 't1%'": {"text", "score2"},
        "SELECT uid FROM pool WHERE score2 > (SELECT avg(score2) FROM pool)": {"text", "score2"},
        "SELECT uid FROM baseline_pool(lang_column := 'lang') WHERE caption_lang = 'de'": {"lang"},
        "SELECT uid FROM pool WHERE cosine(l14_img, l14_txt) > 0.1": {"l14_img", "l14_txt"},
        "SELECT uid FROM pool ORDER BY b32_img[1] LIMIT 7": {"b32_img"},
        "SELECT * FROM pool": {c for cols in view.join_columns for c in cols},
        "SELECT count(*) FROM pool": set(),
        # names decide, so a metadata column read keeps the group that shadows it in pool (a superset)
        "SELECT uid FROM pool_metadata WHERE text LIKE 'a%'": {"text", "score2"},
        "SELECT uid FROM pool_metadata WHERE original_width > 300": set(),
    }
    for sql, reads in cases.items():
        keep = _read_joins(con, sql, None, view.join_columns)
        assert {c for i in keep for c in view.join_columns[i]} == reads, sql
        full = con.sql(sql).to_arrow_table()
        with pool_reader(con, sql) as reader:
            narrow = reader.read_all()
        assert narrow.equals(full), sql
    # the full view is back after each statement, also after one that failed half-way
    failing = "SELECT uid, lang FROM pool WHERE error('boom') IS NULL"
    with pytest.raises(duckdb.Error), pool_reader(con, failing) as r:
        r.read_all()
    assert con.sql("SELECT count(lang), count(l14_img) FROM pool").fetchall() == [(len(uids), len(uids))]


def test_an_unread_derived_group_is_never_opened_through_any_door(small_src, tmp_path):
    """A statement that names no column of a derived group never opens the group's files, through
    every door (dcdb query, dcdb sql and the plan its EXPLAIN shows, knn --where, clip_cut's scan,
    dcdb.pool_sql), and gives the rows the intact pool gives. Proof: one shard file of the group
    (not the first, whose schema connect reads) is overwritten with junk; DuckDB's full ``pool``
    view then fails on every statement, since it scans every positional join in step."""
    import duckdb
    from click.testing import CliRunner

    import dcdb
    from dcdb.annotate import import_columns
    from dcdb.cli import cli
    from dcdb.ingest.pool import ingest
    from dcdb.vectors.knn import where_rows

    small_pool = tmp_path / "pool"  # in 4 uid buckets: a group has a shard file besides the first
    ingest(small_src, small_pool, jobs=1, buckets=4)
    pool = open_pool(small_pool)
    meta = pq.read_table(small_pool / "metadata", columns=["uid"])
    n = meta.num_rows
    rng = np.random.default_rng(14)
    pq.write_table(pa.table({"uid": meta.column(0), "lang": rng.choice(["en", "de"], n)}), tmp_path / "lang.parquet")
    pq.write_table(pa.table({"uid": meta.column(0), "score2": rng.random(n)}), tmp_path / "extra.parquet")
    import_columns(pool, tmp_path / "lang.parquet")
    import_columns(pool, tmp_path / "extra.parquet")

    def cli_run(*args, input=None):
        return CliRunner().invoke(cli, ["-q", *map(str, args)], input=input)

    where = "clip_l14_similarity_score > 0.2"
    doors = {  # door -> what it gives
        "query": lambda: (cli_run("query", "-", "--pool", small_pool, "-o", tmp_path / "q.npy",
                                  input=f"SELECT uid FROM pool WHERE {where}"), (tmp_path / "q.npy").read_bytes()),
        "clip_cut": lambda: (cli_run("query", "clip_score", "--pool", small_pool, "-p", "arch", "l14", "-p",
                                     "fraction", "0.3", "-o", tmp_path / "c.npy", "--force"),
                             (tmp_path / "c.npy").read_bytes()),
        "sql": lambda: cli_run("sql", f"SELECT count(*) AS n FROM pool WHERE {where}", "--pool", small_pool).output,
        "knn --where": lambda: where_rows(open_pool(small_pool), where).tolist(),
        "pool_sql": lambda: dcdb.pool_sql(dcdb.connect(small_pool), f"SELECT uid, lang FROM pool WHERE {where} "
                                          "ORDER BY uid").to_pylist(),
    }

    def give(door):
        got = doors[door]()
        (tmp_path / "q.npy").unlink(missing_ok=True)
        if isinstance(got, tuple):  # (CLI result, its output file)
            assert got[0].exit_code == 0, (door, got[0].output)
            return got[1]
        return got

    intact = {door: give(door) for door in doors}
    assert len(intact["knn --where"]) > 0 and intact["pool_sql"][0]["lang"] in ("en", "de")

    (small_pool / "derived" / "extra" / f"{pool.shards[1]['name']}.parquet").write_bytes(b"junk" * 100)
    con = dcdb.connect(small_pool)
    with pytest.raises(duckdb.Error, match="extra"):  # the full view opens every group
        con.sql(f"SELECT count(*) FROM pool WHERE {where}").fetchall()
    for door in doors:
        assert give(door) == intact[door], door
    res = cli_run("sql", f"EXPLAIN SELECT count(*) FROM pool WHERE {where}", "--pool", small_pool)
    assert res.exit_code == 0 and "POSITIONAL" not in res.output.upper(), res.output
    assert dcdb.pool_sql(con, "SELECT count(*) AS n FROM pool").to_pylist() == [{"n": n}]
    # a statement that reads the group still opens it, and says which file is damaged
    with pytest.raises(duckdb.Error, match="extra"):
        dcdb.pool_sql(con, "SELECT avg(score2) FROM pool")
    res = cli_run("query", "-", "--pool", small_pool, "-o", tmp_path / "s.npy", input="SELECT uid FROM pool WHERE score2 > 0.5")
    assert res.exit_code != 0 and "damaged" in res.output and "extra" in res.output, res.output
    # the narrow view shadows the full one for the statement only
    from dcdb.engine import narrow_pool

    with narrow_pool(con, "SELECT count(*) FROM pool"):
        assert con.sql("SELECT count(lang) FROM pool").fetchall() == [(0,)]  # unread: typed NULLs
    assert con.sql("SELECT count(*) FROM duckdb_views() WHERE view_name = 'pool' AND temporary").fetchall() == [(0,)]
    assert dcdb.pool_sql(con, "SELECT count(lang) AS c FROM pool").to_pylist() == [{"c": n}]
