"""dcdb.ingest.pool: DataComp metadata folder -> pool store; validation, atomicity, resume."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import dcdb.ingest.pool as ingest_mod
from dcdb.errors import OutputError, PoolError, SourceError, UidError
from dcdb.ingest.pool import IngestReport, count_duplicates, ingest
from dcdb.store import DATACOMP_SPACES, FORMAT, FORMAT_VERSION, MANIFEST, STAGING_DIR, STORED_COLUMNS, open_pool
from dcdb.demo.synth import write_npz
from dcdb.uids import from_hex

REAL_PROCESS_SHARD = ingest_mod.process_shard

# ---------------------------------------------------------------------------------- helpers


def source_table(src: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(src.glob("*.parquet"))])


def source_vectors(src: Path, key: str) -> np.ndarray:
    return np.concatenate([np.load(p)[key] for p in sorted(src.glob("*.npz"))])


def pool_rows(pool: Path) -> pa.Table:
    """The pool's metadata in its own (uid) order, every stored column."""
    manifest = json.loads((pool / MANIFEST).read_text())
    return pa.concat_tables([pq.read_table(pool / s["metadata"]) for s in manifest["shards"]])


def source_order(pool: Path) -> np.ndarray:
    """The permutation that puts the pool's rows back in source order (source_shard, source_row)."""
    t = pool_rows(pool)
    return np.lexsort((t.column("source_row").to_numpy(), t.column("source_shard").to_numpy()))


def pool_table(pool: Path) -> pa.Table:
    """The pool's metadata back in source order, without the columns the store adds: the source."""
    t = pool_rows(pool)
    return t.take(pa.array(source_order(pool))).drop_columns(list(STORED_COLUMNS))


def lance_table(pool: Path, space: str) -> pa.Table:
    return lance.dataset(str(pool / "embeddings" / f"{space}.lance")).to_table()


def rewrite_npz(path: Path, **changes) -> None:
    """Replace (or with None, drop) arrays of an npz."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    write_npz(path, arrays)


def rewrite_parquet(path: Path, fn) -> None:
    pq.write_table(fn(pq.read_table(path)), path)


def set_column(table: pa.Table, name: str, values) -> pa.Table:
    i = table.column_names.index(name)
    return table.set_column(i, name, pa.array(values, table.schema.field(name).type))


def assert_tables_equal(a: pa.Table, b: pa.Table) -> None:
    """Same schema and values; NaN equals NaN (DataComp scores contain NaN)."""
    assert a.schema.equals(b.schema), (a.schema, b.schema)
    for name in a.column_names:
        ca, cb = a.column(name), b.column(name)
        if pa.types.is_floating(ca.type):
            np.testing.assert_array_equal(ca.to_numpy(), cb.to_numpy(), err_msg=name)
        else:
            assert ca.equals(cb), name


def assert_no_manifest(pool: Path) -> None:
    assert not (pool / MANIFEST).exists()


def assert_same_pool(a: Path, b: Path) -> None:
    """Same metadata rows and same embedding tables (content, order, dtypes)."""
    ma, mb = (json.loads((p / MANIFEST).read_text()) for p in (a, b))
    for key in ("rows", "shards", "columns", "spaces", "duplicate_uids", "format", "format_version"):
        assert ma[key] == mb[key], key
    assert_tables_equal(pool_table(a), pool_table(b))
    for space in ma["spaces"]:
        assert lance_table(a, space).equals(lance_table(b, space))


# -------------------------------------------------------------------------------- round trip


def test_round_trip(small_src, tmp_path):
    pool = tmp_path / "pool"
    report = ingest(small_src, pool, jobs=1, buckets=4)
    assert isinstance(report, IngestReport)
    assert (report.rows, report.shards, report.skipped_shards, report.duplicate_uids) == (200, 4, 0, 0)
    assert report.source_shards == 3 and "from 3 shards" in report.summary() and "4 uid buckets" in report.summary()
    assert "(1 uid bucket)" in ingest(small_src, tmp_path / "one", jobs=1).summary()  # small: one sorted bucket
    assert report.spaces == list(DATACOMP_SPACES)
    assert report.bytes_read == sum(p.stat().st_size for p in small_src.iterdir())
    assert "200 rows" in report.summary() and "rows/s" in report.summary() and "MB/s" in report.summary()

    src = source_table(small_src)
    meta = pool_table(pool)
    assert_tables_equal(meta, src)
    rows, order = pool_rows(pool), source_order(pool)
    uid = from_hex(rows.column("uid").to_pylist())
    assert np.all(np.diff(order) != 0) and (uid == np.sort(uid)).all()  # stored in uid order
    assert rows.column("uid_hi").to_numpy().tolist() == uid["f0"].tolist()
    assert rows.column("uid_lo").to_numpy().tolist() == uid["f1"].tolist()
    for space, info in DATACOMP_SPACES.items():
        t = lance_table(pool, space)
        assert t.schema.field(space).type == pa.list_(pa.float16(), info["dim"])
        assert t.column("uid").equals(rows.column("uid"))  # row-aligned with the metadata
        vectors = t.column(space).combine_chunks().values.to_numpy().reshape(-1, info["dim"])
        np.testing.assert_array_equal(vectors[order], source_vectors(small_src, space))

    assert not (pool / STAGING_DIR).exists()
    p = open_pool(pool)
    m = p.manifest
    assert (m["format"], m["format_version"]) == (FORMAT, FORMAT_VERSION)
    assert m["source"] == str(small_src.resolve()) and len(m["source_fingerprint"]) == 64
    assert m["rows"] == 200 and m["duplicate_uids"] == 0 and m["dcdb_version"] and m["created"]
    assert [s["name"] for s in m["shards"]] == [f"bucket-{b:05d}" for b in range(4)]
    assert m["buckets"] == {"count": 4, "bits": 2, "key": "uid", "order": "uid"}
    assert m["source_shards"] == [{"name": f"0000000{i}", "rows": n} for i, n in enumerate((67, 67, 66))]
    assert sum(s["rows"] for s in m["shards"]) == 200
    assert all((pool / s["metadata"]).is_file() for s in m["shards"])
    assert [c["name"] for c in m["columns"]] == src.column_names + ["source_shard", "source_row", "uid_hi", "uid_lo"]
    assert {c["name"]: c["type"] for c in m["columns"]}["clip_l14_similarity_score"] == "float"
    assert m["spaces"]["l14_img"] == {
        "model": "openai ViT-L-14",
        "dim": 768,
        "dtype": "float16",
        "path": "embeddings/l14_img.lance",
        "rows": 200,
    }
    assert m["bytes"] > 0


def test_metadata_parquet_is_compressed_in_row_groups(small_pool):
    md = pq.read_metadata(small_pool / "metadata" / "bucket-00000.parquet")
    assert md.row_group(0).column(0).compression == "ZSTD"


def test_nan_scores_are_stored_as_null(small_pool, small_src):
    """Source NaN scores become NULL in the pool, so DuckDB compares and sorts them like numpy
    does NaN (never passes a threshold, last in a descending sort); nothing else changes."""
    import duckdb

    src = source_table(small_src)
    files = [str(p) for p in sorted((small_pool / "metadata").glob("*.parquet"))]
    for col in ("clip_b32_similarity_score", "clip_l14_similarity_score"):
        want = int(np.isnan(src.column(col).to_numpy(zero_copy_only=False)).sum())
        assert want > 0
        got = duckdb.sql(
            f"SELECT count(*) FILTER (WHERE {col} IS NULL), count(*) FILTER (WHERE isnan({col})) "
            f"FROM read_parquet({files})"
        ).fetchall()[0]
        assert got == (want, 0), col


def test_parallel_equals_inline(small_src, tmp_path):
    ingest(small_src, tmp_path / "one", jobs=1)
    report = ingest(small_src, tmp_path / "two", jobs=2)
    assert report.rows == 200
    assert_same_pool(tmp_path / "one", tmp_path / "two")


def test_small_pool_fixture_matches_small_src(small_pool, small_src):
    assert_tables_equal(pool_table(small_pool), source_table(small_src))


def test_metadata_only(make_src, tmp_path):
    src = make_src(rows=30, shards=2, embeddings=False)
    report = ingest(src, tmp_path / "pool", jobs=1)
    assert report.spaces == [] and "metadata only" in report.summary()
    m = open_pool(tmp_path / "pool").manifest
    assert m["spaces"] == {} and m["rows"] == 30
    assert not any((tmp_path / "pool" / "embeddings").iterdir())
    assert_tables_equal(pool_table(tmp_path / "pool"), source_table(src))


def test_float32_embeddings_are_kept_float32(make_src, tmp_path):
    src = make_src(rows=20, shards=2, dtype="float32")
    ingest(src, tmp_path / "pool", jobs=1)
    assert open_pool(tmp_path / "pool").spaces["b32_txt"]["dtype"] == "float32"
    t = lance_table(tmp_path / "pool", "b32_txt")
    assert t.schema.field("b32_txt").type == pa.list_(pa.float32(), 512)


def test_mixed_dtypes_promote_to_float32(tiny_src, tmp_path):
    npz = tiny_src / "00000001.npz"
    with np.load(npz) as z:
        l14 = z["l14_img"]
    rewrite_npz(npz, l14_img=l14.astype(np.float32))
    ingest(tiny_src, tmp_path / "pool", jobs=1)
    spaces = open_pool(tmp_path / "pool").spaces
    assert spaces["l14_img"]["dtype"] == "float32" and spaces["l14_txt"]["dtype"] == "float16"
    got = lance_table(tmp_path / "pool", "l14_img").column("l14_img").combine_chunks().values.to_numpy()
    np.testing.assert_array_equal(
        got.reshape(-1, 768)[source_order(tmp_path / "pool")], source_vectors(tiny_src, "l14_img").astype(np.float32)
    )


def test_extra_npz_key_becomes_a_space(tiny_src, tmp_path):
    for i, npz in enumerate(sorted(tiny_src.glob("*.npz"))):
        rows = pq.read_metadata(npz.with_suffix(".parquet")).num_rows
        rewrite_npz(npz, dino_img=np.full((rows, 8), i, np.float16))
    ingest(tiny_src, tmp_path / "pool", jobs=1)
    spaces = open_pool(tmp_path / "pool").spaces
    assert spaces["dino_img"] == {
        "model": "unknown",
        "dim": 8,
        "dtype": "float16",
        "path": "embeddings/dino_img.lance",
        "rows": 10,
    }
    assert list(spaces)[:4] == list(DATACOMP_SPACES)


def test_schema_differences_are_unified(tiny_src, tmp_path):
    def widen(t):
        t = t.set_column(3, "original_width", t.column("original_width").cast(pa.int32()))
        return t.append_column("caption_lang", pa.array(["en"] * t.num_rows))

    rewrite_parquet(tiny_src / "00000001.parquet", widen)
    ingest(tiny_src, tmp_path / "pool", jobs=1)
    meta = pool_table(tmp_path / "pool")
    assert meta.schema.field("original_width").type == pa.int64()
    assert meta.column("caption_lang").null_count == pq.read_metadata(tiny_src / "00000000.parquet").num_rows


def test_empty_shard(make_src, tmp_path):
    src = make_src(rows=2, shards=3)  # the third shard has no rows
    report = ingest(src, tmp_path / "pool", jobs=1)
    assert report.rows == 2 and report.source_shards == 3
    assert lance_table(tmp_path / "pool", "b32_img").num_rows == 2


def test_compressed_npz_is_read(tiny_src, tmp_path):
    npz = tiny_src / "00000000.npz"
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez_compressed(npz, **arrays)
    ingest(tiny_src, tmp_path / "pool", jobs=1)
    got = lance_table(tmp_path / "pool", "b32_img").column("b32_img").combine_chunks().values.to_numpy()
    np.testing.assert_array_equal(got.reshape(-1, 512)[source_order(tmp_path / "pool")],
                                  source_vectors(tiny_src, "b32_img"))


# -------------------------------------------------------------------------------- duplicates


def test_duplicate_uids_are_counted_not_refused(tiny_src, tmp_path):
    first = pq.read_table(tiny_src / "00000000.parquet").column("uid").to_pylist()

    # shard 1 repeats two uids of shard 0, and one of its own rows twice
    def dup(t):
        u = t.column("uid").to_pylist()
        return set_column(t, "uid", first[:2] + u[2:4] + [u[3]] + u[5:])

    rewrite_parquet(tiny_src / "00000001.parquet", dup)
    report = ingest(tiny_src, tmp_path / "pool", jobs=1)
    assert report.duplicate_uids == 3 and "3 duplicate uids" in report.summary()
    assert open_pool(tmp_path / "pool").manifest["duplicate_uids"] == 3
    meta = pool_rows(tmp_path / "pool")
    assert lance_table(tmp_path / "pool", "b32_img").column("uid").equals(meta.column("uid"))
    assert_tables_equal(pool_table(tmp_path / "pool"), source_table(tiny_src))  # duplicates kept in source order


def test_count_duplicates(tmp_path):
    a = from_hex(["0" * 32, "f" * 32, "0" * 31 + "1"])
    b = from_hex(["f" * 32, "f" * 32])
    assert count_duplicates([a, b]) == 2
    assert count_duplicates([]) == 0
    # distinct uids whose 64-bit hashes collide are not duplicates
    c = np.zeros(3, a.dtype)
    mult = np.array([0x9E3779B97F4A7C15], np.uint64)
    c["f1"] = [1, 2, 2]
    c["f0"] = [5, 0, 0]
    c["f0"][1:] = np.uint64(5) ^ (np.array([1], np.uint64) * mult) ^ (np.array([2], np.uint64) * mult)
    assert count_duplicates([c]) == 1
    np.save(tmp_path / "c.npy", c)
    assert count_duplicates([tmp_path / "c.npy", a]) == 1


# ------------------------------------------------------------------------------- bad inputs


def _wrong_rows(src):
    with np.load(src / "00000001.npz") as z:
        rewrite_npz(src / "00000001.npz", l14_txt=z["l14_txt"][:-1])
    return SourceError, r"00000001\.npz.*'l14_txt'.*4 rows but 00000001\.parquet has 5"


def _bad_uid(src):
    rewrite_parquet(
        src / "00000001.parquet",
        lambda t: set_column(
            t, "uid", t.column("uid").to_pylist()[:3] + ["NOT-HEX"] + t.column("uid").to_pylist()[4:]
        ),
    )
    return UidError, r"00000001\.parquet.*row 3.*NOT-HEX"


def _upper_uid(src):
    rewrite_parquet(
        src / "00000000.parquet",
        lambda t: set_column(t, "uid", [u.upper() for u in t.column("uid").to_pylist()]),
    )
    return UidError, r"00000000\.parquet.*row 0"


def _wrong_dim(src):
    with np.load(src / "00000000.npz") as z:
        rewrite_npz(src / "00000000.npz", l14_img=z["l14_img"][:, :512])
    return SourceError, r"00000000\.npz.*'l14_img'.*dim 512.*768"


def _int8(src):
    with np.load(src / "00000000.npz") as z:
        rewrite_npz(src / "00000000.npz", b32_img=(z["b32_img"] * 100).astype(np.int8))
    return SourceError, r"'b32_img'.*dtype int8.*float16 or float32"


def _float64(src):
    with np.load(src / "00000001.npz") as z:
        rewrite_npz(src / "00000001.npz", b32_txt=z["b32_txt"].astype(np.float64))
    return SourceError, r"'b32_txt'.*dtype float64"


def _corrupt_parquet(src):
    (src / "00000001.parquet").write_bytes(b"this is not parquet" * 10)
    return SourceError, r"cannot read parquet .*00000001\.parquet"


def _truncated_parquet(src):
    data = (src / "00000000.parquet").read_bytes()
    (src / "00000000.parquet").write_bytes(data[: len(data) // 2])
    return SourceError, r"00000000\.parquet"


def _corrupt_npz(src):
    (src / "00000000.npz").write_bytes(b"garbage" * 100)
    return SourceError, r"cannot read npz .*00000000\.npz"


def _truncated_npz(src):
    data = (src / "00000001.npz").read_bytes()
    (src / "00000001.npz").write_bytes(data[: len(data) - 5000])
    return SourceError, r"00000001\.npz"


def _missing_npz(src):
    (src / "00000001.npz").unlink()
    return SourceError, r"00000001\.parquet.*no 00000001\.npz"


def _different_keys(src):
    rewrite_npz(src / "00000001.npz", l14_txt=None)
    return SourceError, r"00000001\.npz.*keys.*same embeddings"


def _no_uid(src):
    rewrite_parquet(src / "00000000.parquet", lambda t: t.drop_columns(["uid"]))
    return SourceError, r"00000000\.parquet.*no uid column"


def _conflicting_types(src):  # an extra column, strings in one shard, numbers in the next
    rewrite_parquet(src / "00000000.parquet", lambda t: t.append_column("extra", pa.array(["x"] * t.num_rows)))
    rewrite_parquet(src / "00000001.parquet", lambda t: t.append_column("extra", pa.array(range(t.num_rows))))
    return SourceError, r"00000001\.parquet.*do not match"


def _no_parquet(src):
    for p in src.iterdir():
        p.unlink()
    return SourceError, r"no \*\.parquet"


BAD_INPUTS = [
    _wrong_rows,
    _bad_uid,
    _upper_uid,
    _wrong_dim,
    _int8,
    _float64,
    _corrupt_parquet,
    _truncated_parquet,
    _corrupt_npz,
    _truncated_npz,
    _missing_npz,
    _different_keys,
    _no_uid,
    _conflicting_types,
    _no_parquet,
]


@pytest.mark.parametrize("damage", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_is_a_typed_error(tiny_src, tmp_path, damage):
    error, pattern = damage(tiny_src)
    pool = tmp_path / "pool"
    with pytest.raises(error, match=pattern) as info:
        ingest(tiny_src, pool, jobs=1)
    assert "Traceback" not in str(info.value)
    assert_no_manifest(pool)
    if pool.exists():  # failed in a worker: the pool is marked incomplete
        with pytest.raises(PoolError, match="incomplete"):
            open_pool(pool)


def test_bad_shard_in_parallel_run_keeps_finished_shards(make_src, tmp_path, monkeypatch):
    src = make_src(rows=40, shards=4)
    good = pq.read_table(src / "00000003.parquet")
    rewrite_parquet(src / "00000003.parquet", lambda t: set_column(t, "uid", ["x" * 32] * t.num_rows))
    pool = tmp_path / "pool"
    with pytest.raises(UidError, match=r"00000003\.parquet.*row 0") as info:
        ingest(src, pool, jobs=2)
    assert "lowercase hex" in str(info.value)
    assert_no_manifest(pool)
    # the bucket pre-pass journals each source shard it split (dcdb/ingest/pool.py, phase A)
    journal = {p.stem for p in (pool / STAGING_DIR / "buckets").glob("*/parts/*.json")}
    assert {"00000000", "00000001"} <= journal and "00000003" not in journal

    pq.write_table(good, src / "00000003.parquet")  # the user fixes the shard and re-runs
    splits = []
    real = ingest_mod._split_shard
    monkeypatch.setattr(ingest_mod, "_split_shard", lambda task: splits.append(task.shard.name) or real(task))
    ingest(src, pool, jobs=1)
    assert sorted(splits) == sorted({"00000000", "00000001", "00000002", "00000003"} - journal)
    ingest(src, tmp_path / "clean", jobs=1)
    assert_same_pool(tmp_path / "clean", pool)


def test_foreign_pool_folder_is_refused_and_untouched(tiny_src, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="not empty and is not a dcdb pool"):
        ingest(tiny_src, pool, jobs=1)
    assert sorted(p.name for p in pool.iterdir()) == ["thesis.tex"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        ingest(tiny_src, tmp_path / "afile", jobs=1)


def test_empty_existing_pool_folder_is_fine(tiny_src, tmp_path):
    (tmp_path / "pool").mkdir()
    assert ingest(tiny_src, tmp_path / "pool", jobs=1).rows == 10


# ------------------------------------------------------------------------- atomic + resume


class Killed(BaseException):
    """Stands in for SIGKILL / Ctrl-C: not an Exception, so nothing catches it on the way."""


def _kill_after(monkeypatch, n_done: int) -> list[str]:
    """Make the in-process worker die on shard number ``n_done`` (0-based); return calls."""
    calls: list[str] = []

    def worker(task):
        calls.append(task.name)
        if len(calls) > n_done:
            raise Killed()
        return REAL_PROCESS_SHARD(task)

    monkeypatch.setattr(ingest_mod, "process_shard", worker)
    return calls


def _count_calls(monkeypatch) -> list[str]:
    calls: list[str] = []

    def worker(task):
        calls.append(task.name)
        return REAL_PROCESS_SHARD(task)

    monkeypatch.setattr(ingest_mod, "process_shard", worker)
    return calls


def test_killed_ingest_resumes_and_redoes_only_missing_shards(make_src, tmp_path, monkeypatch):
    src = make_src(rows=60, shards=4)
    ingest(src, tmp_path / "clean", jobs=1, buckets=4)

    pool = tmp_path / "pool"
    _kill_after(monkeypatch, 2)
    with pytest.raises(Killed):
        ingest(src, pool, jobs=1, buckets=4)
    assert_no_manifest(pool)
    with pytest.raises(PoolError, match="incomplete.*re-run"):
        open_pool(pool)
    assert sorted(p.name for p in (pool / STAGING_DIR / "shards").iterdir()) == [
        "bucket-00000.json",
        "bucket-00001.json",
    ]

    calls = _count_calls(monkeypatch)
    report = ingest(src, pool, jobs=1, buckets=4)
    assert calls == ["bucket-00002", "bucket-00003"]
    rows = {s["name"]: s["rows"] for s in open_pool(pool).shards}
    assert report.skipped_shards == 2 and report.rows == 60
    assert report.rows_ingested == rows["bucket-00002"] + rows["bucket-00003"]
    assert_same_pool(tmp_path / "clean", pool)
    assert not (pool / STAGING_DIR).exists()
    # the killed shard's fragments were never committed and are gone from disk
    for space in DATACOMP_SPACES:
        assert len(list((pool / "embeddings" / f"{space}.lance" / "data").iterdir())) == 4


def test_resume_redoes_shards_with_damaged_outputs_or_changed_source(make_src, tmp_path, monkeypatch):
    src = make_src(rows=40, shards=4)
    pool = tmp_path / "pool"
    _kill_after(monkeypatch, 3)
    with pytest.raises(Killed):
        ingest(src, pool, jobs=1, buckets=4)
    (pool / "metadata" / "bucket-00000.parquet").unlink()  # output lost
    (pool / "metadata" / "bucket-00002.parquet.dcdb-tmp-99-deadbeef").write_bytes(b"half a file")

    calls = _count_calls(monkeypatch)
    ingest(src, pool, jobs=1, buckets=4)
    assert calls == ["bucket-00000", "bucket-00003"]
    assert not list((pool / "metadata").glob("*dcdb-tmp*"))
    ingest(src, tmp_path / "clean", jobs=1, buckets=4)
    assert_same_pool(tmp_path / "clean", pool)

    # a source shard that changed since an interrupted run changes every bucket: all are redone
    shutil.rmtree(pool)
    _kill_after(monkeypatch, 3)
    with pytest.raises(Killed):
        ingest(src, pool, jobs=1, buckets=4)
    os.utime(src / "00000001.npz", ns=(1, 1))
    calls = _count_calls(monkeypatch)
    ingest(src, pool, jobs=1, buckets=4)
    assert calls == [f"bucket-{b:05d}" for b in range(4)]


def test_killed_parallel_ingest_resumes(make_src, tmp_path, monkeypatch):
    src = make_src(rows=40, shards=4)
    real = ingest_mod._record
    recorded: list[str] = []

    def record(pool, entry):
        if recorded:
            raise Killed()
        recorded.append(entry["name"])
        real(pool, entry)

    monkeypatch.setattr(ingest_mod, "_record", record)
    with pytest.raises(Killed):
        ingest(src, tmp_path / "pool", jobs=2, buckets=4)
    assert_no_manifest(tmp_path / "pool")
    monkeypatch.setattr(ingest_mod, "_record", real)
    report = ingest(src, tmp_path / "pool", jobs=1, buckets=4)
    assert report.skipped_shards == 1 and report.rows == 40
    ingest(src, tmp_path / "clean", jobs=1, buckets=4)
    assert_same_pool(tmp_path / "clean", tmp_path / "pool")


def test_killed_after_manifest_is_complete(small_src, tmp_path):
    pool = tmp_path / "pool"
    ingest(small_src, pool, jobs=1)
    (pool / STAGING_DIR).mkdir()  # a kill between writing dcdb.json and removing .ingest/
    report = ingest(small_src, pool, jobs=1)
    assert report.already_complete and not (pool / STAGING_DIR).exists()


def test_unfinished_ingest_with_other_layout_starts_over(make_src, tmp_path, monkeypatch):
    src = make_src(rows=30, shards=3, name="a")
    pool = tmp_path / "pool"
    _kill_after(monkeypatch, 1)
    with pytest.raises(Killed):
        ingest(src, pool, jobs=1, buckets=4)
    monkeypatch.undo()
    other = make_src(rows=30, shards=3, embeddings=False, name="b")  # no spaces this time
    report = ingest(other, pool, jobs=1, buckets=4)
    assert report.skipped_shards == 0 and report.spaces == []
    assert not any((pool / "embeddings").iterdir())


def test_rerun_on_complete_pool(small_src, small_pool, tmp_path):
    before = (small_pool / MANIFEST).read_bytes()
    src = Path(json.loads(before)["source"])
    report = ingest(src, small_pool, jobs=1)
    assert report.already_complete and report.skipped_shards == 1 and report.rows == 200
    assert "already complete" in report.summary()
    assert (small_pool / MANIFEST).read_bytes() == before

    with pytest.raises(PoolError, match="already a complete pool") as info:
        ingest(small_src, small_pool, jobs=1)  # same data, but other files
    assert "new POOL path" in str(info.value)


def test_changed_source_refused_on_complete_pool(tiny_src, tmp_path):
    pool = tmp_path / "pool"
    ingest(tiny_src, pool, jobs=1)
    shutil.copy(tiny_src / "00000001.parquet", tiny_src / "00000002.parquet")
    shutil.copy(tiny_src / "00000001.npz", tiny_src / "00000002.npz")
    with pytest.raises(PoolError, match="differs"):
        ingest(tiny_src, pool, jobs=1)
    assert open_pool(pool).rows == 10


# ------------------------------------------------------------------------------------- CLI


def test_cli_ingest(tiny_src, tmp_path):
    from dcdb.cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["ingest", str(tiny_src), str(tmp_path / "pool"), "-j", "1"])
    assert res.exit_code == 0, res.output
    assert "ingested 10 rows from 2 shards" in res.stderr
    assert open_pool(tmp_path / "pool").rows == 10

    res = runner.invoke(cli, ["ingest", str(tiny_src), str(tmp_path / "pool"), "-j", "1"])
    assert res.exit_code == 0 and "already complete" in res.stderr


def test_cli_ingest_bad_input(tiny_src, tmp_path):
    from dcdb.cli import cli

    _wrong_rows(tiny_src)
    res = CliRunner().invoke(cli, ["-q", "ingest", str(tiny_src), str(tmp_path / "pool"), "-j", "1"])
    assert res.exit_code != 0
    assert res.stderr.startswith("error: ") and "l14_txt" in res.stderr and "hint:" in res.stderr
    assert "Traceback" not in res.output
    assert_no_manifest(tmp_path / "pool")
