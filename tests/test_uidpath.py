"""Store format 2's binary uid path (dcdb/uidpath.py): a filter whose result is the stored uid reads
``uid_hi``/``uid_lo`` and gives the same bytes as the hex path and as numpy over the source
parquet; everything else, and every use of ``uid`` inside SQL, keeps the hex string."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dcdb import uids as U
from dcdb.engine import binary_uid_sources, connect, pool_reader
from dcdb.errors import PoolError, UidError
from dcdb.query import collect_into, parse_filter, run_filter
from dcdb.store import open_pool
from dcdb.uidpath import binary_uid_sql


def F(text):
    return parse_filter("t", text, None)


def source(pool) -> pa.Table:
    """The pool's source parquet files, concatenated in name order (what DataComp's code reads)."""
    files = sorted(Path(pool.manifest["source"]).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def hex_path(pool, sql: str) -> np.ndarray:
    """The result as the hex path computes it (the uid strings decoded, then sorted)."""
    con = connect(pool)
    with pool_reader(con, sql) as reader:
        assert "uid" in reader.schema.names
        arr, copies, _ = collect_into(reader, "t", pool.rows)
    if copies is not None:
        arr = np.repeat(arr, np.concatenate(copies) if copies else np.empty(0, np.int64))
    return U.sort(arr)


def test_layout_is_uid_sorted_and_keeps_source_positions(small_pool):
    pool = open_pool(small_pool)
    src = source(pool)
    rows = connect(pool).sql("SELECT uid, uid_hi, uid_lo, source_shard, source_row, text FROM pool").fetchall()
    uid = U.from_hex([r[0] for r in rows])
    assert U.is_sorted(uid) and len(rows) == src.num_rows
    assert [(r[1], r[2]) for r in rows] == list(zip(uid["f0"].tolist(), uid["f1"].tolist()))
    names = [s["name"] for s in pool.manifest["source_shards"]]
    files = {n: pq.read_table(Path(pool.manifest["source"]) / f"{n}.parquet") for n in names}
    for u, _hi, _lo, shard, row, text in rows:  # each row points back at its source row
        t = files[names[shard]]
        assert (t.column("uid")[row].as_py(), t.column("text")[row].as_py()) == (u, text)


CASES = [
    # (sql, fast path taken, numpy reference over the source: mask -> kept rows, copies)
    ("SELECT uid FROM pool", True, lambda t: np.ones(t.num_rows, bool)),
    ("SELECT uid FROM pool_metadata WHERE clip_l14_similarity_score >= 0.3", True,
     lambda t: _f(t, "clip_l14_similarity_score") >= 0.3),
    ("SELECT uid FROM baseline_pool(arch := 'b32') WHERE clip_score >= clip_cut('b32', NULL, 0.25)", True,
     lambda t: _f(t, "clip_b32_similarity_score") >= np.float32(0.25)),
    ("SELECT p.uid, 3 AS copies FROM pool AS p JOIN pool_metadata AS m USING (uid) WHERE m.original_width > 300",
     True, lambda t: np.repeat(_i(t, "original_width") > 300, 1)),
    (("WITH big AS (SELECT * FROM pool WHERE original_height >= 200) SELECT uid FROM big "
      "UNION ALL SELECT uid FROM pool_metadata WHERE original_width < 200"), True,
     lambda t: np.concatenate([np.flatnonzero(_i(t, "original_height") >= 200), np.flatnonzero(_i(t, "original_width") < 200)])),
    ("SELECT uid FROM pool WHERE uid < '8' INTERSECT SELECT uid FROM pool WHERE uid LIKE '%a%'", True,
     lambda t: _s(t, lambda u: u < "8" and "a" in u)),
    ("SELECT DISTINCT uid FROM pool ORDER BY uid", True, lambda t: np.ones(t.num_rows, bool)),  # falls back
    ("SELECT uid FROM pool ORDER BY clip_l14_similarity_score DESC NULLS LAST, uid LIMIT 7", True, None),
    ("SELECT uid FROM pool ORDER BY 1 LIMIT 5", False, None),
    ("SELECT lower(uid) AS uid FROM pool", False, lambda t: np.ones(t.num_rows, bool)),
    ("SELECT uid FROM (SELECT uid, uid_lo AS uid_hi, uid_lo FROM pool)", False, lambda t: np.ones(t.num_rows, bool)),
    ("SELECT uid FROM pool AS p(x)", False, None),  # renames pool's first column (uid) to x: a binder error
    ("SELECT uid FROM pool GROUP BY uid", False, lambda t: np.unique(U.from_hex(t.column("uid").to_pylist()),
                                                                       return_index=True)[1]),
    ("SELECT * FROM pool WHERE original_width > 500", False, lambda t: _i(t, "original_width") > 500),
    ("SELECT uid, 2 AS copies FROM pool WHERE source_shard = 1", True, None),
]


def _f(t, c):
    return t.column(c).to_numpy(zero_copy_only=False).astype(np.float32)


def _i(t, c):
    return t.column(c).to_numpy(zero_copy_only=False)


def _s(t, keep):
    return np.array([keep(u) for u in t.column("uid").to_pylist()])


@pytest.mark.parametrize(("sql", "fast", "ref"), CASES, ids=[c[0][:60] for c in CASES])
def test_fast_path_only_when_proven_and_same_bytes(small_pool, sql, fast, ref):
    pool = open_pool(small_pool)
    con = connect(pool)
    assert (binary_uid_sql(con, sql, binary_uid_sources(con)) is not None) == fast
    if "p(x)" in sql:
        with pytest.raises(Exception, match="uid"):
            run_filter(pool, F(sql))
        return
    got = run_filter(pool, F(sql)).uids
    assert got.tobytes() == hex_path(pool, sql).tobytes()  # the rewritten statement and the original agree
    if ref is not None:  # and both agree with numpy over the source parquet
        t = source(pool)
        want = U.from_hex(t.column("uid").to_pylist())[ref(t)]
        if "copies" in sql:
            want = np.repeat(want, 3 if "3 AS copies" in sql else 2)
        assert got.tobytes() == U.sort(want).tobytes()


def test_derived_column_named_like_a_half_keeps_the_hex_path(small_pool):
    from dcdb.derived import write_group

    pool = open_pool(small_pool)
    write_group(pool, "odd", lambda shard: pa.table({"uid_lo": pa.array(np.zeros(shard["rows"], np.uint64))}))
    con = connect(open_pool(small_pool))
    assert binary_uid_sources(con) == {"pool_metadata"}  # pool's uid_lo is not the stored one now
    assert binary_uid_sql(con, "SELECT uid FROM pool", binary_uid_sources(con)) is None
    assert binary_uid_sql(con, "SELECT uid FROM pool_metadata", binary_uid_sources(con)) is not None
    got = run_filter(open_pool(small_pool), F("SELECT uid FROM pool")).uids
    assert got.tobytes() == U.sort(U.from_hex(source(pool).column("uid").to_pylist())).tobytes()


def test_user_sql_sees_the_hex_uid(small_pool, tmp_path):
    import dcdb
    from dcdb.cli import cli

    pool = open_pool(small_pool)
    con = dcdb.connect(pool)
    first = con.sql("SELECT uid FROM pool ORDER BY uid LIMIT 1").fetchall()[0][0]
    assert con.sql("SELECT typeof(uid), length(uid) FROM pool LIMIT 1").fetchall() == [("VARCHAR", 32)]
    assert con.sql(f"SELECT count(*) FROM pool WHERE uid = '{first}'").fetchall() == [(1,)]
    pq.write_table(pa.table({"uid": [first, "f" * 32]}), tmp_path / "u.parquet")
    joined = con.sql(f"SELECT p.uid FROM pool p JOIN read_parquet('{tmp_path / 'u.parquet'}') USING (uid)").fetchall()
    assert joined == [(first,)]
    res = CliRunner().invoke(cli, ["-q", "sql", "--pool", str(small_pool), "--format", "csv",
                                   "SELECT uid FROM pool WHERE uid LIKE '0%' ORDER BY uid"])
    assert res.exit_code == 0, res.output
    lines = res.output.split()
    assert lines[0] == "uid" and lines[1:] and all(len(u) == 32 and u.startswith("0") for u in lines[1:])
    # -o with the fast path: DataComp's .npy, byte for byte what numpy makes of the source
    res = CliRunner().invoke(cli, ["-q", "query", "no_filter", "--pool", str(small_pool), "-o", str(tmp_path / "a.npy")])
    assert res.exit_code == 0, res.output
    want = tmp_path / "want.npy"
    np.save(want, np.sort(U.from_hex(source(pool).column("uid").to_pylist())))
    assert (tmp_path / "a.npy").read_bytes() == want.read_bytes()


def test_null_uid_from_an_outer_join_is_refused_on_both_paths(small_pool):
    pool = open_pool(small_pool)
    sql = "SELECT p.uid FROM range(2) AS r(i) LEFT JOIN pool AS p ON r.i < 0"
    con = connect(pool)
    assert binary_uid_sql(con, sql, binary_uid_sources(con)) is not None
    with pytest.raises(UidError, match="uid at row 0 is NULL"):
        run_filter(pool, F(sql))
    with pytest.raises(UidError, match="uid at row 0 is NULL"):
        hex_path(pool, sql)


def test_v1_pool_is_refused_with_the_upgrade_command(small_pool, small_src):
    from dcdb.cli import cli
    from dcdb.ingest.pool import ingest

    m = json.loads((small_pool / "dcdb.json").read_text())
    m["format_version"] = 1
    (small_pool / "dcdb.json").write_text(json.dumps(m))
    with pytest.raises(PoolError, match="store format v1") as info:
        open_pool(small_pool)
    assert "dcdb upgrade" in info.value.hint and "re-ingest" in info.value.hint
    res = CliRunner().invoke(cli, ["info", "--pool", str(small_pool)])
    assert res.exit_code != 0 and "error: " in res.stderr and "hint: run `dcdb upgrade" in res.stderr
    with pytest.raises(PoolError, match="store format v1") as info:
        ingest(m["source"], small_pool, jobs=1)
    assert "dcdb upgrade" in info.value.hint


def test_default_bucket_count():
    from dcdb.ingest.buckets import default_buckets

    assert default_buckets(0, []) == 1
    assert default_buckets(200, [67, 67, 66]) == 1  # small: one fully sorted bucket
    assert default_buckets(12_800_000, [100_000] * 128) == 32  # metadata only: ~256 MB buckets
    assert default_buckets(12_800_000, [100_000] * 128, row_bytes=5632) == 128  # with 4 spaces: a shard's size
    assert default_buckets(12_800_000, [10_000] * 1280, row_bytes=5632) == 512  # small shards: ~256 MB buckets
    assert default_buckets(4_000_000, [2_000_000, 2_000_000], row_bytes=5632) == 2  # as large as a source shard
    assert default_buckets(3_000_000, [1_000_000] * 3, row_bytes=1 << 30) == 4  # rounded up to a power of two
