"""uid-bucketed pools (ingest --buckets), the planner (dcdb/plan.py) and the bucket-group engine
(dcdb/dist/execute.py): bucketed and unbucketed pools, and every engine, give byte-identical uid
lists for every sql/ baseline; what cannot be split is refused by name.

The Ray test starts a real 2-CPU Ray cluster in a subprocess inside a fresh network namespace that
has only loopback (DESIGN §8: Ray contacts a cloud metadata address otherwise); it is skipped with
the reason when ``unshare --net`` is not permitted (non-root). Ray never runs outside it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dcdb import uids as U
from dcdb.cli import cli
from dcdb.errors import PlanError, PoolError, UsageError
from dcdb.query import load_filter, parse_filter, run_filter
from dcdb.store import open_pool

BUCKETS = 8
D14 = 768


def _unit(rng, n, d):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One source (600 rows + a repeated shard, so some uids are duplicated), ingested plain and
    with 8 buckets, both annotated with language ids; WordNet, centroid and ImageNet stand-ins."""
    from dcdb.annotate import annotate
    from dcdb.filters import wordnet
    from dcdb.ingest.pool import ingest
    from dcdb.demo.synth import synth_pool

    root = tmp_path_factory.mktemp("buckets")
    src = root / "src"
    synth_pool(src, rows=600, shards=3, seed=21, jobs=1)
    for ext in ("parquet", "npz"):  # duplicate uids: shard 0 again under another name
        shutil.copy(src / f"00000000.{ext}", src / f"00000003.{ext}")
    ingest(src, root / "plain", jobs=1)
    ingest(src, root / "bucketed", jobs=1, buckets=BUCKETS)
    for name in ("plain", "bucketed"):
        annotate(open_pool(root / name), "lang", jobs=1)
        annotate(open_pool(root / name), "lang_cld3", jobs=1)
    texts = [t for f in sorted(src.glob("*.parquet")) for t in pq.read_table(f, columns=["text"]).column(0).to_pylist()]
    vocab = sorted({w.lower() for t in texts for w in t.split() if re.fullmatch(r"[a-z]+", w.lower())})
    entries = {w: [("nvar"[i % 4], 1000 + 100 * i)] for i, w in enumerate(vocab)}
    wn_dir = wordnet.write_dict(root / "wn", entries)
    (root / "wnids.txt").write_text("".join(f"n{1000 + 100 * i:08d}\n" for i in range(0, len(vocab), 3)))
    rng = np.random.default_rng(4)
    emb = np.concatenate([np.load(f)["l14_img"] for f in sorted(src.glob("*.npz"))]).astype(np.float32)
    np.save(root / "cents.npy", emb[rng.choice(len(emb), 30, replace=False)] * 1.5)
    in1k = emb[rng.choice(len(emb), 20, replace=False)] + 0.05 * _unit(rng, 20, D14)
    np.save(root / "in1k_0.npy", in1k[:10])
    np.save(root / "in1k_1.npy", in1k[10:])
    img = {"centroids": str(root / "cents.npy"), "imagenet_embeddings": str(root / "in1k_*.npy")}
    cases = [
        ("no_filter", {}),
        ("basic_filter", {}),
        ("clip_score", {"arch": "l14", "fraction": "0.3"}),
        ("clip_score", {"arch": "b32", "threshold": "0.25"}),
        ("clip_score", {"arch": "b32", "fraction": "0.1"}),
        ("clip_score", {"arch": "l14", "fraction": "0.999"}),  # index in the NaN tail: nothing kept
        ("laion2b", {}),
        ("text_based", {"wordnet_ids": str(root / "wnids.txt")}),
        ("image_based", img),
        ("image_based_intersect_clip_score", {"arch": "l14", "fraction": "0.3", **img}),
    ]
    return {"root": root, "plain": root / "plain", "bucketed": root / "bucketed", "cases": cases,
            "env": {"DCDB_WORDNET": str(wn_dir)}}


def _args(name, params):
    return [name] + [x for k, v in params.items() for x in ("-p", k, v)]


def _query(pool, name, params, out, env, *extra):
    res = CliRunner().invoke(cli, ["-q", "query", *_args(name, params), "--pool", str(pool), "-o", str(out),
                                   *extra], env=env)
    assert res.exit_code == 0, res.output
    return out.read_bytes()


# ---------------------------------------------------------------------------------- layout


def test_bucketed_layout(world):
    plain, pool = open_pool(world["plain"]), open_pool(world["bucketed"])
    info = pool.manifest["buckets"]
    assert info["count"] == BUCKETS and info["bits"] == 3
    assert [s["name"] for s in pool.shards] == [f"bucket-{b:05d}" for b in range(BUCKETS)]
    assert pool.rows == plain.rows == 800 and pool.manifest["duplicate_uids"] == 200
    whole = []
    for b, f in enumerate(pool.metadata_files()):
        arr = U.from_arrow(pq.read_table(f, columns=["uid"]).column(0))
        assert U.is_sorted(arr) and np.all(arr["f0"] >> np.uint64(61) == b)
        whole.append(arr)
    # the concatenation of the buckets is the pool's sorted uid list
    assert np.array_equal(np.concatenate(whole), U.sort(U.from_arrow(pq.read_table(world["plain"] / "metadata",
                                                                                   columns=["uid"]).column(0))))
    import dcdb

    res = CliRunner().invoke(cli, ["info", "--pool", str(world["bucketed"])])
    assert res.exit_code == 0 and "800 in 8 uid bucket(s)" in res.output, res.output
    q = "SELECT uid, text, l14_img[1] AS v, b32_txt[7] AS w, lang FROM pool ORDER BY ALL"
    assert dcdb.connect(plain).sql(q).fetchall() == dcdb.connect(pool).sql(q).fetchall()


def test_bucket_view_sees_its_rows_and_subset_range(world, tmp_path):
    import dcdb
    from dcdb.ingest.buckets import bucket_view

    root = tmp_path / "p"
    shutil.copytree(world["bucketed"], root)
    pool = open_pool(root)
    res = CliRunner().invoke(cli, ["-q", "query", "no_filter", "--pool", str(root), "--save", "everything"])
    assert res.exit_code == 0, res.output
    view = bucket_view(pool, [2, 5])
    con = dcdb.connect(view)
    n = con.sql("SELECT count(*), count(l14_img), min(uid), max(uid) FROM pool").fetchall()[0]
    assert n[0] == n[1] == pool.shards[2]["rows"] + pool.shards[5]["rows"]
    assert con.sql("SELECT count(*) FROM everything").fetchall()[0][0] == n[0]
    assert n[2].startswith(("4", "5")) and n[3][0] in "ab"


def test_ingest_buckets_checks(world, tmp_path, small_src):
    from dcdb.ingest.pool import ingest

    with pytest.raises(UsageError, match="power of two"):
        ingest(small_src, tmp_path / "x", buckets=3)
    ingest(small_src, tmp_path / "b", jobs=1, buckets=4)
    assert ingest(small_src, tmp_path / "b", jobs=1, buckets=4).already_complete
    with pytest.raises(PoolError, match="bucketed by 4"):
        ingest(small_src, tmp_path / "b", jobs=1, buckets=2)
    res = CliRunner().invoke(cli, ["ingest", str(small_src), str(tmp_path / "c"), "--buckets", "6"])
    assert res.exit_code == 2 and "power of two" in res.output


def test_interrupted_bucketed_ingest_resumes(small_src, tmp_path, monkeypatch):
    from dcdb.ingest import pool as ingest_mod
    from dcdb.ingest.pool import ingest

    real_merge, real_split = ingest_mod._merge_bucket, ingest_mod._split_shard
    calls = {"split": 0}

    def failing_merge(task):
        if task.bucket == 2:
            raise KeyboardInterrupt  # the process dies while writing bucket 2
        return real_merge(task)

    def counting_split(task):
        calls["split"] += 1
        return real_split(task)

    monkeypatch.setattr(ingest_mod, "_merge_bucket", failing_merge)
    monkeypatch.setattr(ingest_mod, "_split_shard", counting_split)
    with pytest.raises(KeyboardInterrupt):
        ingest(small_src, tmp_path / "b", jobs=1, buckets=4)
    with pytest.raises(PoolError, match="incomplete"):
        open_pool(tmp_path / "b")
    assert calls["split"] == 3
    monkeypatch.setattr(ingest_mod, "_merge_bucket", real_merge)
    rep = ingest(small_src, tmp_path / "b", jobs=1, buckets=4)
    assert calls["split"] == 3  # the split shards were kept; only the buckets were finished
    assert rep.rows == 200 and not (tmp_path / "b" / ".ingest").exists()
    ingest(small_src, tmp_path / "fresh", jobs=1, buckets=4)
    for name in ("no_filter", "clip_score"):
        params = {"arch": "l14", "fraction": "0.5"} if name == "clip_score" else {}
        a = run_filter(open_pool(tmp_path / "b"), load_filter(name), params).uids
        assert np.array_equal(a, run_filter(open_pool(tmp_path / "fresh"), load_filter(name), params).uids)


# --------------------------------------------------------------------- identical everywhere


def test_every_baseline_identical_bucketed_and_serial_engine(world, tmp_path):
    from dcdb.dist.execute import run_distributed

    env = world["env"]
    pool = open_pool(world["bucketed"])
    os.environ["DCDB_WORDNET"] = env["DCDB_WORDNET"]
    try:
        for i, (name, params) in enumerate(world["cases"]):
            a = _query(world["plain"], name, params, tmp_path / f"a{i}.npy", env)
            b = _query(world["bucketed"], name, params, tmp_path / f"b{i}.npy", env)
            assert a == b, (name, params)
            arr = np.load(tmp_path / f"a{i}.npy")
            assert (len(arr) == 0) == (params.get("fraction") == "0.999"), (name, params, len(arr))
            got = run_distributed(pool, load_filter(name), params, engine="serial", per_task=3)
            assert np.array_equal(got.uids, arr), (name, params)
    finally:
        del os.environ["DCDB_WORDNET"]


SPLIT = [
    "SELECT uid, 2 AS copies FROM pool ORDER BY clip_l14_similarity_score DESC NULLS LAST, uid LIMIT 37 OFFSET 5",
    "SELECT uid, count(*)::INTEGER AS copies FROM pool GROUP BY uid HAVING count(*) > 1",
    "SELECT DISTINCT uid FROM pool WHERE original_width > 300",
    "SELECT uid FROM pool WHERE uid IN (SELECT uid FROM everything) AND clip_b32_similarity_score > 0.3",
    "SELECT p.uid FROM pool p JOIN everything e USING (uid) WHERE p.original_height < 400",
    "SELECT uid FROM pool WHERE original_width < 300 INTERSECT SELECT uid FROM pool WHERE original_height < 300",
    "SELECT uid FROM pool WHERE original_width < 250 UNION ALL SELECT uid FROM pool_metadata WHERE original_height > 350",
    "SELECT uid FROM pool QUALIFY row_number() OVER (PARTITION BY uid ORDER BY url) = 1",
    ("-- @param f path   a file a filter may read (sandbox): declared, given with -p\n"
     "SELECT uid FROM pool WHERE original_width IN (SELECT w FROM (SELECT original_width AS w FROM "
     "read_parquet($f)) WHERE w % 7 = 0)"),
    ("WITH top AS (SELECT uid, clip_score FROM baseline_pool(arch := 'b32') WHERE clip_score >= "
     "clip_cut('b32', 0.25, NULL)) SELECT uid FROM top WHERE uid IN (SELECT uid FROM baseline_pool(arch := 'l14') "
     "WHERE clip_score >= clip_cut('l14', 0.5, NULL))"),
    "SELECT uid FROM pool ORDER BY cosine(l14_img, b32_img[1:1] || l14_txt[2:]) DESC, uid LIMIT 11",
]

REFUSED = [
    ("SELECT uid FROM pool WHERE clip_l14_similarity_score > (SELECT avg(clip_l14_similarity_score) FROM pool)",
     "aggregate avg()"),
    ("SELECT min(uid) AS uid FROM pool", "aggregate min()"),
    ("SELECT any_value(uid) AS uid FROM pool GROUP BY text", "any_value()"),
    ("SELECT uid FROM pool GROUP BY uid, text HAVING text > 'a' INTERSECT SELECT text FROM pool", "INTERSECT"),
    ("SELECT uid FROM pool QUALIFY row_number() OVER (ORDER BY clip_b32_similarity_score) < 5", "row_number()"),
    ("SELECT uid FROM pool LIMIT 5", "LIMIT without ORDER BY"),
    ("SELECT uid FROM (SELECT uid FROM pool ORDER BY uid LIMIT 5)", "LIMIT inside a subquery"),
    ("SELECT a.uid FROM pool a JOIN pool b ON a.text = b.text", "not on uid"),
    ("SELECT a.uid FROM pool a POSITIONAL JOIN everything b", "POSITIONAL JOIN"),
    ("SELECT uid FROM pool USING SAMPLE 10%", "SAMPLE"),
    ("SELECT uid FROM shard_index", "shard_index"),
    ("SELECT DISTINCT text AS uid FROM pool", "DISTINCT"),
    ("SELECT '0123456789abcdef0123456789abcdef' AS uid", "reads nothing bucketed"),
    ("SELECT uid FROM pool WHERE EXISTS (SELECT 1 FROM pool_metadata m WHERE m.text = 'x')", "EXISTS subquery"),
    ("SELECT uid FROM pool UNION ALL SELECT '0123456789abcdef0123456789abcdef'", "UNION"),
    ("SELECT uid FROM pool WHERE clip_l14_similarity_score > geomean(clip_b32_similarity_score)", "geomean()"),
    ("SELECT uid FROM pool WHERE clip_l14_similarity_score >= clip_cut_select('l14', 0.3)", "clip_cut_select(...)"),
]


@pytest.fixture(scope="module")
def saved(world, tmp_path_factory):
    """Both pools with the stored subset ``everything`` (no_filter) for subset-view queries."""
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for name in ("plain", "bucketed"):
        shutil.copytree(world[name], root / name)
        res = CliRunner().invoke(cli, ["-q", "query", "no_filter", "--pool", str(root / name), "--save", "everything"])
        assert res.exit_code == 0, res.output
        out[name] = open_pool(root / name)
    out["file"] = str(world["root"] / "src" / "00000001.parquet")
    return out


@pytest.mark.parametrize("sql", SPLIT)
def test_split_constructs_match_local(saved, sql):
    from dcdb.dist.execute import run_distributed

    filt = parse_filter("q", sql, None)
    given = {"f": saved["file"]} if "$f" in sql else {}
    want = run_filter(saved["plain"], filt, given).uids
    assert len(want) > 0
    assert np.array_equal(run_filter(saved["bucketed"], filt, given).uids, want)
    got = run_distributed(saved["bucketed"], filt, given, engine="serial", per_task=4)
    assert np.array_equal(got.uids, want)


@pytest.mark.parametrize("fraction", ["0.0125", "0.3", "0.97"])
def test_exact_cut_through_every_radix_round(world, monkeypatch, fraction):
    """With the candidate limit at 5, the threshold is narrowed 16 bits per round down to the full
    64-bit key; it must still be DataComp's value exactly."""
    from dcdb.dist import execute as distributed
    from dcdb.filters.baselines import fraction_index

    monkeypatch.setattr(distributed, "COLLECT_LIMIT", 5)
    pool = open_pool(world["bucketed"])
    filt, given = load_filter("clip_score"), {"arch": "b32", "fraction": fraction}
    want = run_filter(open_pool(world["plain"]), filt, given).uids
    assert np.array_equal(distributed.run_distributed(pool, filt, given, engine="serial", per_task=3).uids, want)
    scores = pq.read_table(world["plain"] / "metadata", columns=["clip_b32_similarity_score"]).column(0)
    s = np.sort(scores.drop_null().to_numpy().astype(np.float64))[::-1]
    n = fraction_index(len(scores), len(s), float(fraction))
    assert len(want) == int((s >= s[n]).sum()) if n < len(s) else len(want) == 0


@pytest.mark.parametrize("chunk", [48, 4 << 20])  # 3 records: moves in many chunks, some overlapping
def test_compact_moves_each_bucket_behind_the_previous(tmp_path, monkeypatch, chunk):
    from dcdb.dist import execute as D

    monkeypatch.setattr(D, "COMPACT_CHUNK", chunk)
    rng = np.random.default_rng(0)
    rows = [7, 0, 5, 9, 4, 6]  # rows per bucket: each bucket's room in the shared file
    kept = [3, 0, 5, 1, 0, 6]  # records each bucket wrote at the front of its room
    recs = U.sort(U.from_hex([f"{x:032x}" for x in rng.integers(0, 2**62, sum(kept), dtype=np.int64)]))
    path = tmp_path / D.RESULT
    raw = np.zeros(sum(rows), dtype=U.UID_DTYPE)
    done, start, k = {}, 0, 0
    for b, (r, n) in enumerate(zip(rows, kept)):
        raw[start : start + n] = recs[k : k + n]
        done[b] = {"offset": start * 16, "uids": n}
        start, k = start + r, k + n
    raw.tofile(path)
    got = D._compact(path, done)
    assert got.dtype == U.UID_DTYPE and got.tobytes() == recs.tobytes()
    got2 = D._compact(path, {b: {"offset": e["offset"], "uids": 0} for b, e in done.items()})
    assert len(got2) == 0


def test_sort_keys_order_like_floats():
    from dcdb.cuts import key_value, sort_keys

    v = np.array([-np.inf, -3.5, -1e-300, -0.0, 0.0, 5e-324, 0.25, 0.2500001, 7.0, np.inf])
    keys = sort_keys(v)
    assert keys.dtype == np.uint64 and np.all(np.diff(keys.astype(object)) > 0)
    assert [key_value(int(k), 64) for k in keys] == v.tolist()
    assert [np.signbit(key_value(int(k), 64)) for k in keys[3:5]] == [True, False]


@pytest.fixture(scope="module")
def driver_con(saved):
    import dcdb

    return dcdb.connect(saved["bucketed"])


@pytest.mark.parametrize(("sql", "says"), REFUSED)
def test_unsplittable_filters_refused_by_name(driver_con, sql, says):
    from dcdb.plan import plan_filter

    with pytest.raises(PlanError, match=re.escape(says)):
        plan_filter(driver_con, parse_filter("q", sql, None), {}, subsets={"everything"})


def test_unbucketed_pool_and_bad_params(world):
    from dcdb.dist.execute import run_distributed
    from dcdb.errors import ParameterError

    # every pool is bucketed (store format 2): one ingested without --buckets runs too
    res = run_distributed(open_pool(world["plain"]), load_filter("no_filter"), {}, engine="serial")
    assert res.uids.tobytes() == run_filter(open_pool(world["plain"]), load_filter("no_filter")).uids.tobytes()
    made_up = parse_filter("q", "SELECT '0123456789abcdef0123456789abcdef' AS uid FROM pool", None)
    with pytest.raises(PlanError, match="not the uid of a row it read"):
        run_distributed(open_pool(world["bucketed"]), made_up, {}, engine="serial", per_task=1)
    with pytest.raises(ParameterError, match="not both"):
        run_distributed(open_pool(world["bucketed"]), load_filter("clip_score"),
                        {"arch": "l14", "fraction": "0.3", "threshold": "0.2"}, engine="serial")


def test_rerun_redoes_only_missing_groups(world, tmp_path):
    from dcdb.dist.execute import run_distributed

    pool = open_pool(world["bucketed"])
    filt, given = load_filter("clip_score"), {"arch": "l14", "fraction": "0.3"}
    logs: list[str] = []
    first = run_distributed(pool, filt, given, engine="serial", work_dir=tmp_path, keep_work=True,
                            per_task=1, log=logs.append)
    assert "0 bucket result(s) reused" in logs[-1]
    markers = sorted(tmp_path.glob("*/parts/*.done.json"))
    assert len(markers) == BUCKETS
    markers[3].unlink()  # a lost worker / killed driver: this bucket never finished
    # the shared result file lost its end (a crash before the data reached the disk): the buckets
    # whose records lay past the new end (the last two) are redone too
    info = json.loads(markers[6].read_text())  # a dcdb.parallel.Ledger marker
    (name,) = {**info["outputs"], **info["at_least"]}
    result = markers[6].with_name(name)
    with open(result, "r+b") as f:
        f.truncate(info["info"]["buckets"][0]["offset"] + 1)
    # a marker of an older layout (an earlier dcdb's) is no marker: its bucket is redone, no error
    old = json.loads(markers[0].read_text())
    markers[0].write_text(json.dumps({"file": name, "min_bytes": 0, "buckets": old["info"]["buckets"]}))
    # other groups (4 buckets per task) than the first run: markers are per bucket
    again = run_distributed(pool, filt, given, engine="serial", work_dir=tmp_path, per_task=4, log=logs.append)
    # the global threshold (cut value) was kept, 4 of the 8 buckets' query results are reused
    assert f"{BUCKETS - 4} bucket result(s) reused" in logs[-1]
    assert np.array_equal(first.uids, again.uids)
    assert not any(tmp_path.iterdir())  # removed after success without keep_work


def _copy_group(marker: Path, tag: str) -> None:
    """What a task retried after it had finished leaves: its buckets in a second file + marker."""
    info = json.loads(marker.read_text())  # a dcdb.parallel.Ledger marker
    if not info["outputs"]:  # the shared result file: the retry wrote the same bytes in place
        marker.with_name(marker.name.replace(marker.name.split("-")[2].split(".")[0], tag)).write_text(
            json.dumps(info))
        return
    (data,) = [marker.with_name(n) for n in info["outputs"]]
    name = data.name.replace(data.name.split("-")[2].split(".")[0], tag)
    shutil.copy(data, data.with_name(name))
    marker.with_name(name + ".done.json").write_text(
        json.dumps({**info, "key": name, "outputs": {name: info["outputs"][data.name]}}))


def test_resume_reuses_buckets_and_ignores_retried_copies(world, tmp_path, monkeypatch):
    """Buckets finished twice (a retried task) count once; a lost score file is redone and the
    exact cut recomputed from old and new key files; the score pass through SQL (a pool without
    the score column in its Parquet files) gives the same cut as the direct column read."""
    from dcdb.dist import execute as distributed
    from dcdb.plan import Cut

    pool = open_pool(world["bucketed"])
    for filt, given in [(load_filter("clip_score"), {"arch": "b32", "fraction": "0.3"}),
                        (parse_filter("q", SPLIT[0], None), {})]:
        want = run_filter(open_pool(world["plain"]), filt, given).uids
        logs: list[str] = []
        first = distributed.run_distributed(pool, filt, given, engine="serial", work_dir=tmp_path, keep_work=True,
                                            per_task=4, log=logs.append)
        assert np.array_equal(first.uids, want)
        for marker in sorted(tmp_path.glob("*/*/*.done.json")):
            _copy_group(marker, "00retry0")
        cut_dirs = list(tmp_path.glob("*/__dcdb_cut_0"))
        if cut_dirs:  # the score files of the first group lost, with the cut value
            (cut_dirs[0] / "value.json").unlink()
            for m in sorted(cut_dirs[0].glob("00000-*.done.json")):
                m.unlink()
        again = distributed.run_distributed(pool, filt, given, engine="serial", work_dir=tmp_path, keep_work=True,
                                            per_task=3, log=logs.append)
        assert f"{BUCKETS} bucket result(s) reused" in logs[-1]
        assert np.array_equal(again.uids, want)
        shutil.rmtree(next(tmp_path.iterdir()))
    monkeypatch.setattr(distributed, "_score_source", lambda pool, arch: ("sql", Cut.score_sql))
    filt, given = load_filter("clip_score"), {"arch": "l14", "fraction": "0.2"}
    assert np.array_equal(distributed.run_distributed(pool, filt, given, engine="serial", per_task=3).uids,
                          run_filter(open_pool(world["plain"]), filt, given).uids)


# ----------------------------------------------------------------------------------- Ray


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_ray_address_fails_fast():
    """RAY_ADDRESS is checked before Ray is asked (ray.init retries a dead address for minutes):
    only loopback sockets here, no Ray."""
    import socket

    from dcdb.parallel import check_ray_address

    for ok in (None, "", "auto", "local"):
        check_ray_address(ok)  # left to Ray: a local cluster
    with pytest.raises(UsageError, match="not HOST:PORT"):
        check_ray_address("head-node")
    with pytest.raises(UsageError, match="not HOST:PORT"):
        check_ray_address("ray://head:port")
    with pytest.raises(UsageError, match="no Ray cluster answers at RAY_ADDRESS") as exc:
        check_ray_address(f"127.0.0.1:{_closed_port()}")
    assert "ray start --head" in exc.value.hint
    with socket.socket() as server:  # something listening: let Ray try
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_ray_address(f"127.0.0.1:{server.getsockname()[1]}")
        check_ray_address(f"ray://127.0.0.1:{server.getsockname()[1]}")


def _reshard_inputs(tmp_path):
    """A tiny demo world's img2dataset shards, indexed in a pool, its uid list and a local reshard."""
    from dcdb.demo.world import build_world

    build_world(tmp_path / "w", samples=60, concepts=3, seed=2, shard_size=20, teacher_samples=0,
                eval_per_class=2, retrieval_samples=10, workers=1)  # no teacher split: unused here
    wpool, uids = tmp_path / "wpool", tmp_path / "all.npy"
    r = CliRunner()
    res = r.invoke(cli, ["-q", "ingest", str(tmp_path / "w" / "metadata"), str(wpool), "-j", "1",
                         "--shards", str(tmp_path / "w" / "shards")])
    assert res.exit_code == 0, res.output
    assert r.invoke(cli, ["-q", "query", "no_filter", "--pool", str(wpool), "-o", str(uids)]).exit_code == 0
    res = r.invoke(cli, ["-q", "reshard", "--pool", str(wpool), "--uids", str(uids), "-o", str(tmp_path / "rl"),
                         "-j", "1", "--shard-size", "7"])
    assert res.exit_code == 0, res.output
    return ["--pool", str(wpool), "--uids", str(uids), "-o", str(tmp_path / "rr"), "--shard-size", "7"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # webdataset 1.0.2 leaves tar files open
def test_ray_engine_identical_to_local(loopback_netns, world, tmp_path):
    """Every baseline with --engine ray (2-CPU local cluster, loopback-only netns) gives the same
    bytes as --engine local; a worker killed mid-run still does; an unsplittable filter is refused;
    dcdb reshard --engine ray writes the same tars."""
    env = world["env"]
    reshard_args = _reshard_inputs(tmp_path)
    want = [_query(world["plain"], n, p, tmp_path / f"local{i}.npy", env) for i, (n, p) in enumerate(world["cases"])]
    spec = tmp_path / "spec.json"
    cases = [c for c in world["cases"] if c[1].get("fraction") != "0.1"]  # every sql/ file; Ray is slow
    want = [w for w, c in zip(want, world["cases"]) if c in cases]
    spec.write_text(json.dumps({"pool": str(world["bucketed"]), "out": str(tmp_path), "cases": cases,
                                "refuse": "SELECT uid FROM pool LIMIT 5", "reshard": reshard_args,
                                "bad_address": f"127.0.0.1:{_closed_port()}"}))
    driver = Path(__file__).with_name("ray_driver.py")
    child_env = {**os.environ, **env, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    r = loopback_netns([sys.executable, str(driver), str(spec)], env=child_env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for i, (name, params) in enumerate(cases):
        assert report["codes"][i] == 0, report["outputs"][i]
        assert (tmp_path / f"ray{i}.npy").read_bytes() == want[i], (name, params)
    assert report["fault_code"] == 0, report["fault_output"]
    assert not list(tmp_path.glob("*.dcdb-work"))  # finished runs leave no work folder (OUT.dcdb-work)
    assert "killed" in (tmp_path / "fault.txt").read_text()  # the hook really killed a worker
    assert (tmp_path / "fault.npy").read_bytes() == want[2]
    assert report["refuse_code"] != 0 and "LIMIT without ORDER BY" in report["refuse_output"]
    assert report["bad_address_code"] == 2, report["bad_address_output"]
    assert "no Ray cluster answers at RAY_ADDRESS" in report["bad_address_output"]
    assert report["reshard_code"] == 0, report["reshard_output"]
    tars = sorted(p.name for p in (tmp_path / "rl").glob("*.tar"))
    assert len(tars) > 3 and tars == sorted(p.name for p in (tmp_path / "rr").glob("*.tar"))
    for name in [*tars, "sample_ids.npy"]:
        assert (tmp_path / "rr" / name).read_bytes() == (tmp_path / "rl" / name).read_bytes(), name
