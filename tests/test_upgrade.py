"""``dcdb upgrade POOL``: a store-format-1 pool rewritten as format 2 in place is the pool a fresh
ingest of its source gives (rows, uid halves, source positions, vectors), with its derived groups
re-aligned, its subsets kept, and a killed run finished by re-running."""

from __future__ import annotations

import hashlib
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

from dcdb import uids as U
from dcdb.errors import PoolError
from dcdb.store import STORED_COLUMNS, open_pool
from dcdb.upgrade import upgrade


class Killed(BaseException):
    pass


def _table(pool: Path, manifest) -> pa.Table:
    return pa.concat_tables([pq.read_table(pool / s["metadata"]) for s in manifest["shards"]])


def make_v1(v2: Path, dest: Path) -> None:
    """The format-1 pool of ``v2``'s source, as dcdb 1 wrote it: one shard per source shard in
    source order, no stored columns, a Lance table per space in that order; plus a derived group
    (``tag``: one value per row, from its text) and a stored subset."""
    m2 = json.loads((v2 / "dcdb.json").read_text())
    t = _table(v2, m2)
    order = np.lexsort((t.column("source_row").to_numpy(), t.column("source_shard").to_numpy()))
    meta = t.take(pa.array(order))
    (dest / "metadata").mkdir(parents=True)
    (dest / "derived" / "tag").mkdir(parents=True)
    shards, at = [], 0
    for src in m2["source_shards"]:
        part = meta.slice(at, src["rows"])
        at += src["rows"]
        pq.write_table(part.drop_columns(list(STORED_COLUMNS)), dest / "metadata" / f"{src['name']}.parquet")
        tags = pa.table({"tag": pa.array([len(x) % 7 for x in part.column("text").to_pylist()], pa.int32())})
        pq.write_table(tags, dest / "derived" / "tag" / f"{src['name']}.parquet")
        shards.append({"name": src["name"], "rows": src["rows"], "metadata": f"metadata/{src['name']}.parquet"})
    for space in m2["spaces"]:
        vec = lance.dataset(str(v2 / "embeddings" / f"{space}.lance")).to_table().take(pa.array(order))
        lance.write_dataset(vec, str(dest / "embeddings" / f"{space}.lance"), data_storage_version="legacy")
    manifest = {k: v for k, v in m2.items() if k not in ("buckets", "source_shards")}
    manifest.update(format_version=1, shards=shards,
                    columns=[c for c in m2["columns"] if c["name"] not in STORED_COLUMNS])
    (dest / "dcdb.json").write_text(json.dumps(manifest, indent=2))
    digest = hashlib.sha256((dest / "dcdb.json").read_bytes()).hexdigest()
    (dest / "derived" / "tag" / "_group.json").write_text(json.dumps(
        {"group": "tag", "columns": [{"name": "tag", "type": "int32"}], "pool_manifest_sha256": digest}))
    (dest / "subsets").mkdir()
    some = U.sort(U.from_hex(meta.column("uid").to_pylist()[::5]))
    np.save(dest / "subsets" / "fifth.npy", some)
    pq.write_table(pa.table({"uid": U.to_arrow(some)}), dest / "subsets" / "fifth.parquet")
    (dest / "subsets" / "fifth.json").write_text(json.dumps({"kind": "dcdb-subset", "rows": len(some),
                                                            "pool_manifest_sha256": digest}))


@pytest.fixture
def v1_pool(small_pool, tmp_path):
    dest = tmp_path / "v1"
    make_v1(small_pool, dest)
    return dest


def test_upgrade_gives_the_fresh_ingest(small_pool, v1_pool):
    from dcdb.engine import connect
    from dcdb.query import load_filter, run_filter

    with pytest.raises(PoolError, match="store format v1"):
        open_pool(v1_pool)
    report = upgrade(v1_pool, jobs=1)
    assert "upgraded" in report.summary() and report.groups == ["tag"]
    fresh, up = json.loads((small_pool / "dcdb.json").read_text()), json.loads((v1_pool / "dcdb.json").read_text())
    for key in ("format_version", "rows", "shards", "columns", "spaces", "buckets", "source_shards", "source",
                "source_fingerprint", "duplicate_uids"):
        assert up[key] == fresh[key], key
    assert up["upgraded_from"]["format_version"] == 1
    assert _table(v1_pool, up).equals(_table(small_pool, fresh))  # every row, every column, same order
    for space in fresh["spaces"]:
        a = lance.dataset(str(v1_pool / "embeddings" / f"{space}.lance")).to_table()
        assert a.equals(lance.dataset(str(small_pool / "embeddings" / f"{space}.lance")).to_table())
    pool = open_pool(v1_pool)
    con = connect(pool)
    assert con.sql("SELECT count(*) FROM pool WHERE tag <> length(text) % 7").fetchall() == [(0,)]  # re-aligned
    assert con.sql("SELECT count(*) FROM fifth").fetchall() == [(40,)]
    from dcdb.subsets import list_subsets

    assert [s["stale"] for s in list_subsets(pool)] == [False]
    from dcdb.annotate import list_groups

    assert [g["current"] for g in list_groups(pool)] == [True]
    for name, params in (("no_filter", {}), ("clip_score", {"arch": "l14", "fraction": "0.3"})):
        a = run_filter(pool, load_filter(name), params).uids
        assert a.tobytes() == run_filter(open_pool(small_pool), load_filter(name), params).uids.tobytes()
    assert not (v1_pool / ".upgrade").exists()
    assert upgrade(v1_pool).already


def test_killed_while_swapping_is_finished_by_a_rerun(small_pool, v1_pool, monkeypatch):
    real = os.replace
    calls = []

    def replace(a, b):
        if Path(a).parent.name == "new" and Path(a).name in ("metadata", "embeddings"):  # a folder moved in
            calls.append(a)
            if len(calls) == 2:  # metadata/ moved in, embeddings/ not yet
                raise Killed()
        return real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        upgrade(v1_pool, jobs=1)
    monkeypatch.setattr(os, "replace", real)
    with pytest.raises(PoolError, match="middle of `dcdb upgrade`") as info:
        open_pool(v1_pool)
    assert "re-run `dcdb upgrade" in info.value.hint
    from dcdb.cli import cli

    res = CliRunner().invoke(cli, ["-q", "upgrade", str(v1_pool), "-j", "1"])
    assert res.exit_code == 0, res.output
    assert _table(v1_pool, open_pool(v1_pool).manifest).equals(_table(small_pool, open_pool(small_pool).manifest))


def test_killed_before_the_swap_leaves_the_v1_pool_and_resumes(small_pool, v1_pool, monkeypatch):
    import dcdb.upgrade as up

    before = (v1_pool / "dcdb.json").read_bytes()
    real = up._finish_new

    def finish(*a):
        raise Killed()

    monkeypatch.setattr(up, "_finish_new", finish)
    with pytest.raises(Killed):
        upgrade(v1_pool, jobs=1)
    assert (v1_pool / "dcdb.json").read_bytes() == before and (v1_pool / "metadata" / "00000000.parquet").is_file()
    monkeypatch.setattr(up, "_finish_new", real)
    upgrade(v1_pool, jobs=1)
    assert _table(v1_pool, open_pool(v1_pool).manifest).equals(_table(small_pool, open_pool(small_pool).manifest))


def test_bucketed_v1_pool_is_refused(v1_pool):
    m = json.loads((v1_pool / "dcdb.json").read_text())
    m["buckets"] = {"count": 1, "bits": 0, "key": "uid"}
    (v1_pool / "dcdb.json").write_text(json.dumps(m))
    with pytest.raises(PoolError, match="--buckets") as info:
        upgrade(v1_pool, jobs=1)
    assert "re-ingest" in info.value.hint
    shutil.rmtree(v1_pool / "metadata")  # nothing was touched before the refusal: still v1
    assert json.loads((v1_pool / "dcdb.json").read_text())["format_version"] == 1
