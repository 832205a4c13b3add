"""Wrong types caught at the door and checks that were missing (issue 12, items 7 and 9), through
the CLI in-process: each bad input is one ``error:`` line with a hint, a non-zero exit, no
traceback, and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dcdb import uids as U
from dcdb.cli import cli
from dcdb.errors import QueryError
from dcdb.query import load_filter, run_filter
from dcdb.store import open_pool


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def refused(res, *says: str, code: int | None = None) -> str:
    """The result is one clear error: non-zero exit, `error:` + `hint:` on stderr, no traceback."""
    err = res.stderr
    assert res.exit_code != 0 and (code is None or res.exit_code == code), res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)  # not an escaped exception
    assert err.count("error: ") == 1 and "  hint: " in err and "Traceback" not in err, err
    for s in says:
        assert s in err, err
    return err


def pool_uids(pool: Path) -> list[str]:
    return pq.read_table(pool / "metadata").column("uid").to_pylist()


# ---------------------------------------------------------------------- uid files (item 7)


def _pickle_bomb(marker: Path):
    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return np.array([Bomb(), 1], dtype=object)


BAD_UID_FILES = {
    "f8.npy": (lambda p, a: np.save(p, np.zeros(len(a), "f8,f8")), "dtype [('f0', '<f8'), ('f1', '<f8')]"),
    "s8.npy": (lambda p, a: np.save(p, np.zeros(len(a), "S8,S8")), "dtype [('f0', 'S8'), ('f1', 'S8')]"),
    "i8.npy": (lambda p, a: np.save(p, a.astype("i8,i8")), "dtype [('f0', '<i8'), ('f1', '<i8')]"),
    "named.npy": (lambda p, a: np.save(p, a.astype([("hi", "<u8"), ("lo", "<u8")])), "('hi', '<u8')"),
    "pairs.npy": (lambda p, a: np.save(p, a.view("<u8").reshape(-1, 2)), "shape (3, 2)"),
    "2d.npy": (lambda p, a: np.save(p, a.reshape(1, -1)), "shape (1, 3)"),
    "zip.npz": (lambda p, a: np.savez(p, uids=a), "is an .npz (zip) archive"),
    "hex.txt": (lambda p, a: p.write_text("".join(u + "\n" for u in U.to_hex(a))), "text file of hex uids"),
    "cut.npy": (lambda p, a: p.write_bytes(_npy_bytes(a)[:-5]), "not a readable .npy"),
}


def _npy_bytes(a) -> bytes:
    import io

    f = io.BytesIO()
    np.save(f, a)
    return f.getvalue()


@pytest.mark.parametrize("bad", sorted(BAD_UID_FILES))
def test_uid_file_of_another_layout_is_refused_by_every_reader(small_pool, tmp_path, bad):
    a = U.sort(U.from_hex(pool_uids(small_pool)[:3]))
    good = tmp_path / "good.npy"
    U.save(good, a)
    write, says = BAD_UID_FILES[bad]
    path = tmp_path / bad
    write(path, a)
    out = tmp_path / "out.npy"
    for op in ("union", "intersect", "minus"):
        refused(run("-q", "subsets", op, good, path, "--pool", small_pool, "-o", out), str(path), says)
        assert not out.exists()
    refused(run("-q", "reshard", "--uids", path, "--pool", small_pool, "-o", tmp_path / "shards"), says)
    assert not (tmp_path / "shards").exists()


def test_pickled_uid_file_is_never_unpickled(small_pool, tmp_path):
    marker = tmp_path / "pwned"
    np.save(tmp_path / "obj.npy", _pickle_bomb(marker), allow_pickle=True)
    good = tmp_path / "good.npy"
    U.save(good, U.from_hex(pool_uids(small_pool)[:2]))
    refused(run("-q", "subsets", "union", good, tmp_path / "obj.npy", "-o", tmp_path / "o.npy"),
            "holds Python objects", "never unpickled")
    assert not marker.exists() and not (tmp_path / "o.npy").exists()


def test_documented_alternative_uid_layouts_read_the_same(small_pool, tmp_path):
    """DataComp's u8,u8; the same numbers big-endian; opaque V16 records; headerless raw records."""
    a = U.sort(U.from_hex(pool_uids(small_pool)[:50]))
    files = {"dc.npy": lambda p: np.save(p, a), "be.npy": lambda p: np.save(p, a.astype(">u8,>u8")),
             "v16.npy": lambda p: np.save(p, a.view("V16")), "raw.bin": lambda p: a.tofile(p)}
    outs = []
    for name, write in files.items():
        write(tmp_path / name)
        out = tmp_path / f"out_{name}.npy"
        res = run("-q", "subsets", "union", tmp_path / name, tmp_path / name, "-o", out)
        assert res.exit_code == 0, res.output
        outs.append(out.read_bytes())
        assert U.load(tmp_path / name).tobytes() == a.tobytes()
    assert all(o == outs[0] for o in outs) and np.array_equal(np.load(tmp_path / "out_dc.npy.npy"), a)


# ------------------------------------------------------------------ ingest types (item 7)


WRONG_COLUMNS = {
    "clip_b32_similarity_score": lambda n: pa.array([f"{0.1 * i:.2f}" for i in range(n)]),
    "clip_l14_similarity_score": lambda n: pa.array([b"0.3"] * n, pa.binary()),
    "original_width": lambda n: pa.array(["640"] * n),
    "original_height": lambda n: pa.array([True] * n),
    "text": lambda n: pa.array(range(n), pa.int64()),
    "face_bboxes": lambda n: pa.array(["[]"] * n),
}


@pytest.mark.parametrize("column", sorted(WRONG_COLUMNS))
def test_ingest_refuses_a_datacomp_column_of_the_wrong_type(make_src, tmp_path, column):
    src = make_src(rows=20, shards=2, name="src")
    shard = src / "00000001.parquet"
    t = pq.read_table(shard)
    t = t.set_column(t.schema.get_field_index(column), column, WRONG_COLUMNS[column](t.num_rows))
    pq.write_table(t, shard)
    res = run("-q", "ingest", src, tmp_path / "pool", "-j", "1")
    refused(res, f"{str(shard)!r}: column {column!r} has type", "expected")
    assert not (tmp_path / "pool" / "dcdb.json").exists()


def test_ingest_accepts_numeric_variants_and_null_columns(make_src, tmp_path):
    src = make_src(rows=20, shards=1, name="src")
    shard = src / "00000000.parquet"
    t = pq.read_table(shard)
    t = t.set_column(t.schema.get_field_index("original_width"), "original_width",
                     t.column("original_width").cast(pa.int32()))
    t = t.set_column(t.schema.get_field_index("clip_b32_similarity_score"), "clip_b32_similarity_score",
                     t.column("clip_b32_similarity_score").cast(pa.float64()))
    t = t.set_column(t.schema.get_field_index("sha256"), "sha256", pa.nulls(t.num_rows))
    pq.write_table(t, shard)
    assert run("-q", "ingest", src, tmp_path / "pool", "-j", "1").exit_code == 0
    res = run("-q", "query", "clip_score", "-p", "arch", "b32", "-p", "threshold", "0.2",
              "--pool", tmp_path / "pool", "-o", tmp_path / "o.npy")
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------- annotate --from (7, 9)


def test_annotate_from_refuses_shadowing_columns_and_the_pool_keeps_working(small_pool, tmp_path):
    uids = pool_uids(small_pool)
    for col in ("text", "clip_l14_similarity_score", "L14_IMG", "b32_txt"):
        f = tmp_path / "x.parquet"
        pq.write_table(pa.table({"uid": uids, "ok": list(range(len(uids))), col: list(range(len(uids)))}), f)
        what = "embedding" if col.lower().endswith(("_img", "_txt")) else "metadata"
        err = refused(run("-q", "annotate", "--pool", small_pool, "--from", f), f"column {col!r}", what,
                      code=2)
        assert "--columns" in err and "importable: ok" in err
        assert not (small_pool / "derived").exists() or not any((small_pool / "derived").iterdir())
    # the others import fine (--columns), and every later command still runs
    res = run("annotate", "--pool", small_pool, "--from", f, "--columns", "ok")
    assert res.exit_code == 0, res.output
    assert "derived group 'x' (ok)" in res.stderr and "named after x.parquet (choose with --name)" in res.stderr
    res = run("-q", "query", "no_filter", "--pool", small_pool, "-o", tmp_path / "all.npy")
    assert res.exit_code == 0 and len(np.load(tmp_path / "all.npy")) == len(uids)


def test_annotate_from_names_the_group_after_the_file_or_name(small_pool, tmp_path):
    uids = pool_uids(small_pool)
    f = tmp_path / "My-Scores.v2.parquet"
    pq.write_table(pa.table({"uid": uids, "s1": [0.5] * len(uids), "s2": [1] * len(uids)}), f)
    res = run("annotate", "--pool", small_pool, "--from", f)
    assert res.exit_code == 0 and "derived group 'my_scores_v2' (s1, s2)" in res.stderr, res.output
    assert "named after My-Scores.v2.parquet" in res.stderr
    g = tmp_path / "one.parquet"
    pq.write_table(pa.table({"uid": uids, "s3": [2] * len(uids)}), g)
    res = run("annotate", "--pool", small_pool, "--from", g, "--name", "chosen")
    assert res.exit_code == 0 and "derived group 'chosen' (s3)" in res.stderr and "named after" not in res.stderr
    res = run("annotate", "--pool", small_pool, "--list")
    assert "my_scores_v2: s1, s2" in res.stdout and "chosen: s3" in res.stdout
    # a column another group provides is refused, for imports and for computed annotators
    refused(run("-q", "annotate", "--pool", small_pool, "--from", g, "--name", "other"),
            "'s3' already comes from derived group 'chosen'")
    cents = tmp_path / "cents.npy"
    np.save(cents, np.eye(4, 768, dtype=np.float32))
    h = tmp_path / "cid.parquet"
    pq.write_table(pa.table({"uid": uids, "centroid_id": [0] * len(uids)}), h)
    assert run("-q", "annotate", "--pool", small_pool, "--from", h).exit_code == 0
    refused(run("-q", "annotate", "--pool", small_pool, "centroids", "-p", "centroids", cents),
            "'centroid_id' already comes from derived group 'cid'")


# --------------------------------------------------------------------------- copies (item 7)


def _filter(sql: str):
    return load_filter("stdin", text=sql)


@pytest.mark.parametrize("sql, says", [
    ("SELECT uid, 1001 AS copies FROM pool", "returned 1,001 copies of a uid; at most 1,000"),
    ("SELECT uid, CAST(1e12 AS BIGINT) AS copies FROM pool", "returned 1,000,000,000,000 copies"),
    ("SELECT uid, 1000 AS copies FROM pool, range(6)", "copies add up to more than 1,000,000 uids"),
    ("SELECT uid, -1 AS copies FROM pool", "negative copies"),
    ("SELECT uid, 1e12 AS copies FROM pool", "not integer"),
])
def test_copies_outside_the_cap_are_one_error(small_pool, tmp_path, sql, says):
    out = tmp_path / "o.npy"
    refused(run("-q", "query", "-", "--pool", small_pool, "-o", out, input=sql), says)
    assert not out.exists() and not list(tmp_path.glob("o.npy*"))


def test_copies_at_the_cap_and_zero(small_pool):
    pool = open_pool(small_pool)
    res = run_filter(pool, _filter("SELECT uid, CASE WHEN original_width % 2 = 0 THEN 1000 ELSE 0 END AS copies "
                                   "FROM pool"))
    even = run_filter(pool, _filter("SELECT uid FROM pool WHERE original_width % 2 = 0")).uids
    assert np.array_equal(res.uids, np.repeat(even, 1000))  # 0 drops the row


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory):
    from dcdb.ingest.pool import ingest
    from dcdb.demo.synth import synth_pool

    root = tmp_path_factory.mktemp("bucketed")
    synth_pool(root / "src", rows=300, shards=2, seed=3, jobs=1)
    ingest(root / "src", root / "pool", jobs=1, buckets=4)
    return open_pool(root / "pool")


@pytest.mark.parametrize("sql, says", [
    ("SELECT uid, 1001 AS copies FROM pool", "at most 1,000"),
    ("SELECT uid, 1000 AS copies FROM pool, range(4)", "more than 1,000,000 uids"),  # 1.2M over all buckets
    ("SELECT uid, 1001 AS copies FROM pool ORDER BY uid LIMIT 5", "at most 1,000"),  # the top-k merge
])
def test_copies_cap_on_the_bucket_engine(bucketed, tmp_path, sql, says):
    from dcdb.dist.execute import run_distributed

    with pytest.raises(QueryError, match=says):
        run_distributed(bucketed, _filter(sql), engine="serial", per_task=1, work_dir=tmp_path / "w")


# ------------------------------------------------------------ --engine work folder (item 9)


def test_finished_bucket_run_leaves_no_work_folder(bucketed, tmp_path):
    from dcdb.dist.execute import run_distributed

    want = run_filter(bucketed, _filter("SELECT uid FROM pool")).uids
    work = tmp_path / "o.npy.dcdb-work"  # what `dcdb query -o o.npy --engine ray` uses
    got = run_distributed(bucketed, _filter("SELECT uid FROM pool"), engine="serial", work_dir=work)
    assert np.array_equal(got.uids, want) and not work.exists()
    # a killed run left it behind: the finishing re-run removes it too
    first = run_distributed(bucketed, _filter("SELECT uid FROM pool"), engine="serial", work_dir=work,
                            keep_work=True)
    assert np.array_equal(first.uids, want) and any(work.iterdir())
    run_distributed(bucketed, _filter("SELECT uid FROM pool"), engine="serial", work_dir=work)
    assert not work.exists()
    # a folder the user made stays, and so does what else is in it
    mine = tmp_path / "mine"
    (mine / "keep").mkdir(parents=True)
    run_distributed(bucketed, _filter("SELECT uid FROM pool"), engine="serial", work_dir=mine)
    assert [p.name for p in mine.iterdir()] == ["keep"]


# ------------------------------------------------------------------ subset names (item 9)


def test_subset_names_that_are_sql_keywords_are_refused(small_pool, tmp_path, seeds):
    for name in ("both", "select", "from", "order", "left"):
        refused(run("-q", "query", "no_filter", "--pool", small_pool, "--save", name), f"subset name {name!r}",
                "SQL keyword", f"{name}_subset")
        assert not (small_pool / "subsets" / f"{name}.npy").exists()
    assert run("-q", "query", "no_filter", "--pool", small_pool, "--save", "a").exit_code == 0
    refused(run("-q", "subsets", "union", "a", "a", "--pool", small_pool, "--save", "both"), "SQL keyword")
    refused(run("-q", "knn", "--pool", small_pool, "--space", "l14_img", "--seeds", seeds, "-k", "2",
                "--save", "where"), "SQL keyword")
    # keywords DuckDB takes as table names unquoted stay allowed, and work in SQL
    for name in ("year", "either", "map"):
        assert run("-q", "subsets", "union", "a", "a", "--pool", small_pool, "--save", name).exit_code == 0
        res = run("sql", f"SELECT count(*) AS n FROM {name}", "--pool", small_pool, "--format", "csv")
        assert res.exit_code == 0 and res.stdout.split()[-1] == "200", res.output


@pytest.fixture
def seeds(tmp_path):
    p = tmp_path / "seeds.npy"
    np.save(p, np.random.default_rng(1).standard_normal((3, 768)).astype(np.float32))
    return p


# --------------------------------------------------------------------- --space typo (item 9)


def test_space_typo_names_the_pools_spaces(small_pool, tmp_path, seeds):
    cases = [
        ("knn", "--space", "l14", "--seeds", seeds, "-k", "2", "-o", tmp_path / "k.npy"),
        ("index", "--space", "l14"),
        ("dedup", "--space", "l14", "--threshold", "0.9"),
    ]
    for args in cases:
        err = refused(run("-q", *args, "--pool", small_pool), "no embedding space 'l14'",
                      "did you mean l14_img or l14_txt?", "b32_img, b32_txt, l14_img, l14_txt")
        assert "ingest" not in err
    err = refused(run("-q", "dedup", "--space", "b32_im", "--threshold", "0.9", "--pool", small_pool),
                  "did you mean b32_img?")


def test_space_on_a_metadata_only_pool_says_how_to_add_embeddings(make_src, tmp_path, seeds):
    src = make_src(rows=20, shards=1, embeddings=False)
    assert run("-q", "ingest", src, tmp_path / "pool", "-j", "1").exit_code == 0
    refused(run("-q", "index", "--space", "l14_img", "--pool", tmp_path / "pool"), "metadata-only",
            "ingest the .npz")


# ------------------------------------------------------------ index-shards of a pool (item 9)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Two tiny demo worlds (img2dataset shards + metadata); world 1's metadata ingested whole
    and its first shard alone."""
    from dcdb.ingest.pool import ingest
    from dcdb.demo.world import build_world

    root = tmp_path_factory.mktemp("index_worlds")
    for i, seed in ((1, 2), (2, 3)):
        build_world(root / f"w{i}", samples=40, concepts=2, seed=seed, shard_size=20, teacher_samples=0,
                    eval_per_class=1, retrieval_samples=4, workers=1)  # no teacher split: unused here
    ingest(root / "w1" / "metadata", root / "pool1", jobs=1)
    (root / "half").mkdir()
    shutil.copy(root / "w1" / "metadata" / "00000000.parquet", root / "half")
    ingest(root / "half", root / "pool_half", jobs=1)
    return root


def test_index_shards_refuses_another_pools_shards(worlds, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(worlds / "pool1", pool)
    refused(run("-q", "index-shards", worlds / "w2" / "shards", "--pool", pool, "-j", "1"),
            "none of the", "is in pool", "another pool", "nothing was written")
    assert not (pool / "shards").exists()
    res = run("-q", "index-shards", worlds / "w1" / "shards", "--pool", pool, "-j", "1")
    assert res.exit_code == 0, res.output
    before = {p.name: p.read_bytes() for p in sorted((pool / "shards").rglob("*")) if p.is_file()}
    refused(run("-q", "index-shards", worlds / "w2" / "shards", "--pool", pool, "-j", "1"), "another pool")
    after = {p.name: p.read_bytes() for p in sorted((pool / "shards").rglob("*")) if p.is_file()}
    assert after == before  # the old index is kept, whole
    res = run("sql", "SELECT count(*) FROM shard_index WHERE downloaded", "--pool", pool, "--format", "csv")
    assert res.exit_code == 0 and int(res.stdout.split()[-1]) > 0


def test_index_shards_warns_with_counts_when_some_uids_are_missing(worlds, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(worlds / "pool_half", pool)
    res = run("index-shards", worlds / "w1" / "shards", "--pool", pool, "-j", "1")
    assert res.exit_code == 0, res.output
    known = len(pq.read_table(worlds / "half" / "00000000.parquet").column("uid"))
    total = sum(len(pq.read_table(f).column("uid")) for f in (worlds / "w1" / "metadata").glob("*.parquet"))
    assert f"warning: {total - known:,} of {total:,} uids in the shards are not in the pool" in res.stderr
    manifest = json.loads((pool / "shards" / "index.json").read_text())
    assert manifest["tars"] and not (pool / "shards" / "index.new").exists()


def test_a_group_written_before_the_shadow_check_is_named_with_the_fix(small_pool, tmp_path):
    """A pool whose derived group hides an embedding column (made by an older dcdb, or by hand):
    every command that opens the pool says which group and how to drop it; dropping it repairs it."""
    from dcdb.derived import write_group

    p = open_pool(small_pool)
    write_group(p, "old", lambda shard: pa.table({"l14_img": [0.0] * shard["rows"]}))
    refused(run("-q", "query", "no_filter", "--pool", small_pool, "-o", tmp_path / "a.npy"),
            "derived group 'old'", "'l14_img'", "--drop old")
    assert run("-q", "annotate", "--pool", small_pool, "--drop", "old").exit_code == 0
    res = run("-q", "query", "no_filter", "--pool", small_pool, "-o", tmp_path / "a.npy")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("change, says", [
    (lambda m: m.update(rows="x"), "rows is 'x'"),
    (lambda m: m.update(rows=m["rows"] + 1), "its shards hold"),
    (lambda m: m["shards"][0].update(metadata="../../etc/passwd"), "shard entry 0"),
    (lambda m: m["spaces"]["l14_img"].update(path="/etc"), "embedding space 'l14_img'"),
    (lambda m: m["spaces"]["l14_img"].update(dim=None), "embedding space 'l14_img'"),
    (lambda m: m.update(columns="uid"), "columns is not a list"),
])
def test_damaged_manifest_fields_are_one_error(small_pool, tmp_path, change, says):
    m = json.loads((small_pool / "dcdb.json").read_text())
    change(m)
    (small_pool / "dcdb.json").write_text(json.dumps(m))
    for args in (["info"], ["query", "no_filter", "-o", tmp_path / "a.npy"], ["sql", "SELECT 1"]):
        refused(run(*args, "--pool", small_pool), "manifest", "is damaged", says, "re-ingest")
    assert not (tmp_path / "a.npy").exists()


@pytest.mark.parametrize("shard", [0, -1])
@pytest.mark.parametrize("damage", ["truncate", "scribble"])
def test_damaged_metadata_files_are_named(small_pool, tmp_path, shard, damage):
    """A truncated or overwritten metadata parquet, first or last shard: one error naming the file."""
    f = sorted((small_pool / "metadata").glob("*.parquet"))[shard]
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        data = data[:100]
    else:  # overwrite the footer's thrift bytes (the last 4 bytes before the magic are its length)
        for i in range(len(data) - 300, len(data) - 8):
            data[i] = (i * 131) % 256
    f.write_bytes(bytes(data))
    for args in (["query", "no_filter", "-o", tmp_path / "a.npy"], ["sql", "SELECT count(*) FROM pool"],
                 ["query", "-", "-o", tmp_path / "a.npy"]):
        err = refused(run(*args, "--pool", small_pool, input="SELECT uid FROM pool WHERE text <> ''"),
                      "is damaged", f.name, "re-ingest")
        assert "internal error" not in err
    assert not (tmp_path / "a.npy").exists()
