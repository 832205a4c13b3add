"""The shard index and the resharder: the output contract (DESIGN §3 "resharded output"), readers
(webdataset, open_clip, dcdb.train), determinism, resumability, blurring and bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcdb.shards import reshard as R
from dcdb.shards import index as S
from dcdb import tario
from dcdb import uids as U
from dcdb.errors import OutputError, ReshardError, ShardIndexError, UidError, UsageError

WORLD = {
    "samples": 300,
    "concepts": 8,
    "seed": 5,
    "shard_size": 100,
    "teacher_samples": 10,
    "eval_per_class": 1,
    "retrieval_samples": 1,
}
# webdataset 1.0.2 leaves the tar files it reads to the garbage collector.
WDS_UNCLOSED = pytest.mark.filterwarnings("ignore:unclosed file:ResourceWarning")


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A demo world: 3 img2dataset shards of 100 attempted samples (some failed, some faces)."""
    from dcdb.demo.world import build_world

    out = tmp_path_factory.mktemp("reshard_world") / "w"
    build_world(out, workers=1, **WORLD)
    return out


@pytest.fixture(scope="module")
def pool_template(world, tmp_path_factory) -> Path:
    """The world's metadata ingested (metadata-only pool) with its shards indexed."""
    from dcdb.ingest.pool import ingest

    pool = tmp_path_factory.mktemp("reshard_pool") / "pool"
    ingest(world / "metadata", pool, jobs=1)
    S.index_shards(pool, world / "shards", jobs=1, log=lambda m: None)
    return pool


@pytest.fixture
def shards(world, tmp_path) -> Path:
    """A private copy of the world's shards folder (tests damage it)."""
    dest = tmp_path / "shards"
    shutil.copytree(world / "shards", dest)
    return dest


@pytest.fixture
def pool(pool_template, shards, tmp_path) -> Path:
    """A private pool whose shard index points at the private ``shards`` copy."""
    dest = tmp_path / "pool"
    shutil.copytree(pool_template, dest)
    S.index_shards(dest, shards, jobs=1, log=lambda m: None)
    return dest


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of a tar, read with tarfile."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def input_samples(shards: Path) -> dict[str, dict[str, bytes]]:
    """uid -> members of every sample in the input tars."""
    out = {}
    for tar in sorted(shards.glob("*.tar")):
        for members in tar_samples(tar).values():
            out[json.loads(members["json"])["uid"]] = members
    return out


def failed_uids(shards: Path) -> list[str]:
    table = pa.concat_tables([pq.read_table(p) for p in sorted(shards.glob("*.parquet"))])
    return [r["uid"] for r in table.to_pylist() if r["status"] != "success"]


def save_subset(path: Path, hexes: list[str], *, sort: bool = True) -> Path:
    arr = U.from_hex(hexes)
    np.save(path, U.sort(arr) if sort else arr)
    return path


def folder_bytes(out: Path, pattern: str = "*") -> dict[str, bytes]:
    return {
        p.name: p.read_bytes() for p in sorted(out.glob(pattern)) if p.name not in ("meta.json", R.STATE_FILE)
    }


def quiet(_msg: str) -> None:
    pass


@pytest.fixture
def subset(world, tmp_path) -> tuple[Path, list[str]]:
    """Half of the downloaded uids, one listed three times, plus 2 failed downloads and 1 unknown."""
    downloaded = sorted(input_samples(world / "shards"))
    rng = np.random.default_rng(0)
    chosen = sorted(rng.choice(downloaded, size=len(downloaded) // 2, replace=False).tolist())
    hexes = chosen + [chosen[3]] * 2 + failed_uids(world / "shards")[:2] + ["f" * 32]
    return save_subset(tmp_path / "subset.npy", hexes), hexes


# -------------------------------------------------------------------------------- tar basics


@pytest.mark.parametrize("window", [600, 5000, 1 << 20])
def test_window_reader_walks_and_reads_like_pread(shards, tmp_path, window):
    """Through a read-ahead window (smaller than a member, a few members, the whole tar), a damaged
    and truncated tar walks to the same members and damage, and every read returns pread's bytes."""
    tar = tmp_path / "t.tar"
    shutil.copy(shards / "00000001.tar", tar)
    _damage_header(tar, 5)
    os.truncate(tar, tar.stat().st_size - 1700)
    size = tar.stat().st_size
    fd = os.open(tar, os.O_RDONLY)
    try:
        plain = list(tario.walk_tar(fd, size))
        reader = tario.WindowReader(fd, size, window)
        windowed = list(tario.walk_tar(fd, size, reader))
        assert windowed == plain
        assert any(isinstance(x, tario.Damage) and x.fatal for x in plain)
        assert any(isinstance(x, tario.Damage) and "checksum" in x.reason for x in plain)
        members = [m for m in plain if isinstance(m, tario.Member)]
        assert len(members) > 20
        for m in members[::-1] + members:  # backwards too: every read leaves the window somewhere
            assert reader(m.size, m.offset) == os.pread(fd, m.size, m.offset)
        assert reader(512, size - 100) == os.pread(fd, 512, size - 100)  # short read at the end
        assert reader(10, size + 5) == b""
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ shard index


def test_index_locates_every_sample_and_knows_failed_downloads(pool, shards):
    import duckdb

    con = duckdb.connect()
    con.execute(S.view_sql(pool))
    rows = con.sql("SELECT * FROM shard_index").to_arrow_table().to_pylist()
    truth = input_samples(shards)
    got = [r for r in rows if r["downloaded"]]
    assert sorted(r["uid"] for r in got) == sorted(truth)
    for r in got:
        assert r["error"] is None and (r["width"], r["height"]) == (64, 64) and r["status"] == "success"
        with open(shards / r["tar"], "rb") as f:
            for m in r["members"]:
                f.seek(m["byte_offset"])
                assert f.read(m["size"]) == truth[r["uid"]][m["ext"]]
        assert r["byte_length"] == sum(512 + -(-m["size"] // 512) * 512 for m in r["members"])
    failed = [r for r in rows if not r["downloaded"]]
    assert sorted(r["uid"] for r in failed) == sorted(failed_uids(shards))
    assert all(r["byte_offset"] is None and r["status"] == "failed_to_download" for r in failed)
    faces = con.sql("SELECT count(*) FROM shard_index WHERE len(face_bboxes) > 0").fetchall()[0][0]
    assert faces > 0
    manifest = json.loads((pool / S.INDEX_MANIFEST).read_text())
    assert manifest["samples"] == len(got) and manifest["failed"] == len(failed)


def test_index_is_resumable_and_the_same_on_two_processes(pool, shards):
    first = {p.name: pq.read_table(p) for p in sorted((pool / S.INDEX_DIR).glob("*.parquet"))}
    again = S.index_shards(pool, shards, jobs=2, log=quiet)
    assert again.reused == 3
    (pool / S.INDEX_DIR / "00000001.parquet").unlink()  # as if killed before this tar finished
    os.utime(shards / "00000002.tar", ns=(1, 1))  # a tar that changed
    redo = S.index_shards(pool, shards, jobs=2, log=quiet)
    assert (redo.reused, redo.tars) == (1, 3)
    for name, table in first.items():
        assert pq.read_table(pool / S.INDEX_DIR / name).equals(table), name


def test_pool_without_index_says_how_to_build_one(pool_template, tmp_path, subset):
    bare = tmp_path / "bare"
    shutil.copytree(pool_template, bare)
    shutil.rmtree(bare / S.SHARDS_DIR)
    with pytest.raises(ShardIndexError, match="no shard index") as exc:
        R.reshard(subset[0], tmp_path / "out", pool=bare, jobs=1, warn=quiet)
    assert "dcdb index-shards" in exc.value.hint
    assert not (tmp_path / "out").exists()
    with pytest.raises(ShardIndexError, match="no shard index"):  # what `dcdb query --reshard` checks first
        R.preflight(tmp_path / "out", pool=bare)
    R.preflight(tmp_path / "out", pool=pool_template)


def test_pool_finds_moved_shards_with_the_shards_option(pool, shards, subset, tmp_path):
    moved = tmp_path / "moved"
    shards.rename(moved)
    with pytest.raises(ShardIndexError, match="does not exist any more"):
        R.reshard(subset[0], tmp_path / "out", pool=pool, jobs=1, warn=quiet)
    report = R.reshard(subset[0], tmp_path / "out", pool=pool, shards=moved, jobs=1, warn=quiet)
    assert report.output_count > 0 and report.unknown == 1


# --------------------------------------------------------------------------- output contract


def test_output_contract(pool, shards, subset, tmp_path):
    path, hexes = subset
    out = tmp_path / "out"
    report = R.reshard(path, out, pool=pool, shard_size=40, jobs=1, warn=quiet)
    truth = input_samples(shards)
    want = Counter(h for h in hexes if h in truth)
    tars = sorted(out.glob("*.tar"))
    assert [t.name for t in tars] == [f"{i:08d}.tar" for i in range(len(tars))]
    written: Counter = Counter()
    for tar in tars:
        samples = tar_samples(tar)
        assert 0 < len(samples) <= 40
        assert json.loads(tar.with_name(tar.stem + "_stats.json").read_text()) == {"successes": len(samples)}
        for key, members in samples.items():
            uid, j = key.rsplit("-", 1)
            assert members == truth[uid]  # every member, byte for byte
            written[uid] += 1
            assert int(j) < want[uid]
    assert written == want  # the uid listed 3 times is there 3 times, as uid-0, uid-1, uid-2
    assert report.output_count == sum(want.values()) and report.output_shards == len(tars)
    ids = np.load(out / "sample_ids.npy")
    assert ids.dtype == U.UID_DTYPE and np.array_equal(ids, U.sort(U.from_hex(hexes)))
    missing = np.load(out / "missing_uids.npy")
    assert sorted(U.to_hex(missing)) == sorted(h for h in hexes if h not in truth)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["output_shard_count"] == len(tars) and meta["output_shard_format"] == "{:08d}.tar"
    assert meta["output_count"] == report.output_count and meta["processed_count"] == len(want)
    assert (meta["not_downloaded_count"], meta["unknown_count"], meta["missing_count"]) == (2, 1, 3)
    assert meta["output_count"] + meta["missing_count"] == meta["subset_count"] == len(hexes)


def test_samples_are_in_input_order(pool, shards, subset, tmp_path):
    out = tmp_path / "out"
    R.reshard(subset[0], out, pool=pool, jobs=1, warn=quiet)
    order = {
        json.loads(m["json"])["uid"]: i
        for i, m in enumerate(ms for tar in sorted(shards.glob("*.tar")) for ms in tar_samples(tar).values())
    }
    with tarfile.open(out / "00000000.tar") as tf:
        keys = list(dict.fromkeys(n.split(".", 1)[0] for n in tf.getnames()))
    positions = [(order[k.rsplit("-", 1)[0]], int(k.rsplit("-", 1)[1])) for k in keys]
    assert positions == sorted(positions)


def test_tars_stay_under_the_byte_limit(pool, subset, tmp_path):
    out = tmp_path / "out"
    limit = 64 * 1024
    R.reshard(subset[0], out, pool=pool, jobs=1, max_shard_bytes=limit, warn=quiet)
    sizes = [p.stat().st_size for p in out.glob("*.tar")]
    assert len(sizes) > 3 and max(sizes) <= limit


@WDS_UNCLOSED
def test_webdataset_reads_the_output(pool, subset, tmp_path):
    import webdataset as wds

    out = tmp_path / "out"
    report = R.reshard(subset[0], out, pool=pool, shard_size=50, jobs=1, warn=quiet)
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    samples = list(
        wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")
    )
    assert len(samples) == report.output_count
    key, image, text, meta = samples[0]
    assert key.startswith(meta["uid"] + "-") and image.size == (64, 64) and text == meta["caption"]


@WDS_UNCLOSED
def test_open_clip_loaders_read_the_output(pool, subset, tmp_path):
    """open_clip_train's webdataset loader (its eval pipeline runs on webdataset 1.x; its training
    pipeline's grouping needs the 0.2.x file stream, emulated here) and dcdb.train's reader."""
    import argparse

    pytest.importorskip("open_clip_train")
    open_clip = pytest.importorskip("open_clip")
    from open_clip_train import data as ocd
    from torchvision import transforms as T
    from webdataset.tariterators import tar_file_expander, url_opener

    out = tmp_path / "out"
    report = R.reshard(subset[0], out, pool=pool, shard_size=50, jobs=1, warn=quiet)
    n = report.output_shards
    pattern = str(out / f"{{00000000..{n - 1:08d}}}.tar")
    preprocess, tokenizer = T.Compose([T.Resize((32, 32)), T.ToTensor()]), open_clip.get_tokenizer("ViT-B-32")
    args = argparse.Namespace(
        val_data=pattern,
        val_num_samples=report.output_count,
        batch_size=16,
        workers=0,
        world_size=1,
        train_data=None,
        dataset_resampled=False,
        train_data_upsampling_factors=None,
        seed=0,
    )
    loader = ocd.get_wds_dataset(args, preprocess, is_train=False, tokenizer=tokenizer).dataloader
    seen = 0
    for images, texts in loader:
        assert images.shape[1:] == (3, 32, 32) and texts.shape[1] == 77
        seen += len(images)
    assert seen == report.output_count
    files = (
        f
        for f in tar_file_expander(url_opener([{"url": u} for u in sorted(map(str, out.glob("*.tar")))]))
        if "fname" in f
    )  # webdataset 1.x adds end-of-shard markers that 0.2.x did not have
    grouped = list(ocd.group_by_keys_nothrow(files))
    assert len(grouped) == report.output_count and all(ocd.filter_no_caption_or_no_image(s) for s in grouped)
    try:
        from dcdb.train import data as train_data
    except ImportError:
        return
    if hasattr(train_data, "find_shards") and hasattr(train_data, "sample_pipeline"):
        found = train_data.find_shards(out)
        assert found.num_samples == report.output_count and len(found.shards) == n
        batches = train_data.sample_pipeline(
            found, preprocess=preprocess, tokenizer=tokenizer, batch_size=8, seed=0, batches_per_worker=2
        )
        assert [b[0].shape[0] for b in batches] == [8, 8]


# --------------------------------------------------------------------- determinism, resuming


def test_same_bytes_whatever_jobs_and_with_or_without_pool(pool, shards, subset, tmp_path):
    runs = {
        "pool-j1": {"pool": pool, "jobs": 1},
        "pool-j2": {"pool": pool, "jobs": 2},
        "scan-j2": {"shards": shards, "jobs": 2},
    }
    outputs = {}
    for name, kw in runs.items():
        R.reshard(subset[0], tmp_path / name, shard_size=30, warn=quiet, **kw)
        outputs[name] = folder_bytes(tmp_path / name)
    assert len(outputs["pool-j1"]) > 6
    assert outputs["pool-j1"] == outputs["pool-j2"] == outputs["scan-j2"]


def test_shuffle_seed_is_a_reproducible_permutation(pool, subset, tmp_path):
    plain, a, b = (tmp_path / n for n in ("plain", "a", "b"))
    R.reshard(subset[0], plain, pool=pool, jobs=1, warn=quiet)
    R.reshard(subset[0], a, pool=pool, jobs=1, shuffle_seed=7, warn=quiet)
    R.reshard(subset[0], b, pool=pool, jobs=1, shuffle_seed=7, warn=quiet)
    assert folder_bytes(a) == folder_bytes(b)
    keys = {n: list(tar_samples(d / "00000000.tar")) for n, d in (("plain", plain), ("a", a))}
    assert keys["plain"] != keys["a"] and sorted(keys["plain"]) == sorted(keys["a"])
    assert json.loads((a / "meta.json").read_text())["order"] == "shuffle"


def test_killed_run_resumes_keeping_finished_tars(pool, subset, tmp_path, monkeypatch):
    clean, out = tmp_path / "clean", tmp_path / "out"
    R.reshard(subset[0], clean, pool=pool, shard_size=20, jobs=1, warn=quiet)
    real, calls = R.write_shard, []

    def dies_on_third(task):
        calls.append(task.index)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed mid-run
        return real(task)

    monkeypatch.setattr(R, "write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        R.reshard(subset[0], out, pool=pool, shard_size=20, jobs=1, warn=quiet)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000000.tar", "00000001.tar"]
    assert not (out / "meta.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    monkeypatch.setattr(R, "write_shard", real)
    report = R.reshard(subset[0], out, pool=pool, shard_size=20, jobs=2, warn=quiet)
    assert report.resumed_shards == 2
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in kept.items())
    assert folder_bytes(out) == folder_bytes(clean)
    again = R.reshard(subset[0], out, pool=pool, shard_size=20, jobs=1, warn=quiet)
    assert again.already_complete and folder_bytes(out) == folder_bytes(clean)
    (out / "00000001.tar").unlink()  # a finished run with a tar lost since: only that tar is redone
    repaired = R.reshard(subset[0], out, pool=pool, shard_size=20, jobs=1, warn=quiet)
    assert repaired.resumed_shards == report.output_shards - 1 and folder_bytes(out) == folder_bytes(clean)


def test_a_run_state_of_an_older_layout_or_a_lost_stats_file_is_redone(pool, subset, tmp_path):
    """The run's markers (OUT/.dcdb-reshard.json): a state file an older dcdb wrote for the same plan
    is this run with nothing recorded (every tar redone, same bytes, no error); a tar whose stats
    file is lost or of another size is redone alone."""
    out = tmp_path / "out"
    first = R.reshard(subset[0], out, pool=pool, shard_size=20, jobs=1, warn=quiet)
    want = folder_bytes(out)
    fp = json.loads((out / "meta.json").read_text())["plan_fingerprint"]
    (out / R.STATE_FILE).write_text(json.dumps({"format": R.STATE_FORMAT, "fingerprint": fp, "shards": 3,
                                                "done": {"0": {"bytes_written": 1}}, "complete": True}))
    again = R.reshard(subset[0], out, pool=pool, shard_size=20, jobs=1, warn=quiet)
    assert not again.already_complete and again.resumed_shards == 0 and folder_bytes(out) == want
    assert again.output_count == first.output_count
    (out / "00000001_stats.json").write_text('{"successes": 1000}')
    fixed = R.reshard(subset[0], out, pool=pool, shard_size=20, jobs=1, warn=quiet)
    assert fixed.resumed_shards == first.output_shards - 1 and folder_bytes(out) == want
    assert R.reshard(subset[0], out, pool=pool, shard_size=20, jobs=1, warn=quiet).already_complete


def test_out_of_another_run_is_refused_unless_overwrite(pool, subset, tmp_path):
    out = tmp_path / "out"
    R.reshard(subset[0], out, pool=pool, shard_size=10, jobs=1, warn=quiet)
    before = folder_bytes(out)
    with pytest.raises(OutputError, match="different reshard run"):
        R.reshard(subset[0], out, pool=pool, shard_size=100, jobs=1, warn=quiet)
    (tmp_path / "bad.npy").write_bytes(b"123")
    with pytest.raises(UidError):  # invalid arguments: nothing deleted, even with --overwrite
        R.reshard(tmp_path / "bad.npy", out, pool=pool, shard_size=100, jobs=1, overwrite=True, warn=quiet)
    assert folder_bytes(out) == before
    R.reshard(subset[0], out, pool=pool, shard_size=100, jobs=1, overwrite=True, warn=quiet)
    meta = json.loads((out / "meta.json").read_text())
    assert sorted(p.name for p in out.glob("*.tar")) == [
        f"{i:08d}.tar" for i in range(meta["output_shard_count"])
    ]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        R.reshard(subset[0], foreign, pool=pool, jobs=1, warn=quiet)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------------ blurring


def test_blur_boxes_changes_the_box_and_nothing_far_from_it():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(100, 120, 3), dtype=np.uint8)
    out = R.blur_boxes(img, [[0.1, 0.1, 0.3, 0.3]])  # 24x20 px box -> sigma 2.4, kernel 21
    assert np.abs(out[12:28, 14:34].astype(int) - img[12:28, 14:34]).mean() > 30
    assert np.array_equal(out[60:, 70:], img[60:, 70:])
    assert np.array_equal(R.blur_boxes(img, []), img)


def test_blur_writes_webp_with_the_faces_blurred(pool, shards, tmp_path):
    from PIL import Image

    truth = input_samples(shards)
    faces = {
        u: json.loads(m["json"])["face_bboxes"]
        for u, m in truth.items()
        if json.loads(m["json"])["face_bboxes"]
    }
    plain = sorted(set(truth) - set(faces))[:5]
    path = save_subset(tmp_path / "faces.npy", sorted(faces) + plain)
    report = R.reshard(path, tmp_path / "out", pool=pool, jobs=1, blur=True, warn=quiet)
    assert report.blurred == len(faces) > 0
    samples = tar_samples(tmp_path / "out" / "00000000.tar")
    for key, members in samples.items():
        uid = key.rsplit("-", 1)[0]
        if uid in plain:
            assert members == truth[uid]
            continue
        assert set(members) == {"webp", "json", "txt"}
        assert json.loads(members["json"])["face_bboxes"] == faces[uid]
        before = np.asarray(Image.open(io.BytesIO(truth[uid]["jpg"])).convert("RGB")).astype(int)
        after = np.asarray(Image.open(io.BytesIO(members["webp"])).convert("RGB")).astype(int)
        x1, y1, x2, y2 = (int(v * 64) for v in faces[uid][0])
        inside = np.abs(after[y1:y2, x1:x2] - before[y1:y2, x1:x2]).mean()
        far = np.ones((64, 64), bool)
        side = max(x2 - x1, y2 - y1)
        reach = int(0.1 * side) + 2 * (int(2 * np.ceil(0.4 * side)) + 1)
        far[max(0, y1 - reach) : y2 + reach, max(0, x1 - reach) : x2 + reach] = False
        if len(faces[uid]) == 1 and far.sum() > 100:
            assert inside > 4 * max(1.0, np.abs(after[far] - before[far]).mean()), uid
            assert np.abs(after[far] - before[far]).mean() < 3  # only webp re-encoding noise


# ---------------------------------------------------------------------------------- bad input


def test_unsorted_uid_file_is_sorted_with_a_warning(pool, subset, tmp_path):
    _, hexes = subset
    shuffled = save_subset(tmp_path / "shuffled.npy", hexes[::-1], sort=False)
    said = []
    R.reshard(shuffled, tmp_path / "a", pool=pool, jobs=1, warn=said.append)
    R.reshard(subset[0], tmp_path / "b", pool=pool, jobs=1, warn=quiet)
    assert any("not sorted" in m for m in said)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")


@pytest.mark.parametrize(
    "content, message",
    [
        (lambda p: np.save(p, np.zeros(4, np.float64)), "dtype float64"),
        (lambda p: p.write_bytes(b"\0" * 17), "not a whole number of 16-byte"),
    ],
)
def test_uid_file_of_wrong_dtype_or_size(pool, tmp_path, content, message):
    bad = tmp_path / "bad.npy"
    content(bad)
    with pytest.raises(UidError, match=message):
        R.reshard(bad, tmp_path / "out", pool=pool, jobs=1, warn=quiet)
    assert not (tmp_path / "out").exists()


def _damage_header(tar: Path, nth_sample: int) -> str:
    """Overwrite the first header of the nth sample of a tar with junk; return its uid."""
    fd = os.open(tar, os.O_RDONLY)
    try:
        samples = list(tario.group_samples(tario.walk_tar(fd, tar.stat().st_size), []))
        victim = samples[nth_sample]
        uid = S.sample_row(fd, tar.name, victim)["uid"]
    finally:
        os.close(fd)
    with open(tar, "r+b") as f:
        f.seek(victim.start)
        f.write(b"\xff" * 512)
    return uid


def test_member_name_over_100_bytes_is_refused(tmp_path):
    """Output members are plain USTAR (no pax header): an input extension that makes the name
    longer than 100 bytes is a ReshardError with a hint, and no tar is left behind."""
    uid = "0123456789abcdef0123456789abcdef"
    (tmp_path / "in").mkdir()
    tario.write_tar(tmp_path / "in" / "00000000.tar", [
        ("000.jpg", b"J"), ("000.json", json.dumps({"uid": uid}).encode()), ("000." + "x" * 70, b"long")])
    with pytest.raises(ReshardError, match=r"member name b'0123456789abcdef0123456789abcdef-0\.x+' is longer than 100") as exc:
        R.reshard(save_subset(tmp_path / "s.npy", [uid]), tmp_path / "out", shards=tmp_path / "in", jobs=1, warn=quiet)
    assert "rename it" in exc.value.hint
    assert not list((tmp_path / "out").glob("*.tar"))


def test_corrupt_sample_is_skipped_and_counted_or_fails_with_strict(shards, tmp_path):
    victim = _damage_header(shards / "00000001.tar", 5)
    truth = {u for t in sorted(shards.glob("*.tar")) for u in _uids_readable(t)}
    path = save_subset(tmp_path / "all.npy", sorted(truth | {victim}))
    said = []
    report = R.reshard(path, tmp_path / "out", shards=shards, jobs=1, warn=said.append)
    assert report.corrupt == 1 and report.output_count == len(truth - {victim})
    assert U.to_hex(np.load(tmp_path / "out" / "missing_uids.npy")) == [victim]
    assert any("bad header checksum" in m for m in said)
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["corrupt_count"] == 1


def _uids_readable(tar: Path) -> set[str]:
    out = set()
    for members in tar_samples_lenient(tar):
        out.add(json.loads(members["json"])["uid"])
    return out


def tar_samples_lenient(tar: Path):
    fd = os.open(tar, os.O_RDONLY)
    try:
        for s in tario.group_samples(tario.walk_tar(fd, tar.stat().st_size), []):
            if s.damage is None:
                yield {e: os.pread(fd, m.size, m.offset) for e, m in s.members}
    finally:
        os.close(fd)


def test_damage_found_while_reading_is_counted_or_fails_with_strict(pool, shards, subset, tmp_path):
    """A tar damaged after indexing, with its mtime put back (so the index looks current)."""
    tar = shards / "00000000.tar"
    st = tar.stat()
    victim = _damage_header(tar, 0)
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    path = save_subset(tmp_path / "s.npy", sorted(set(subset[1]) | {victim}))
    with pytest.raises(ReshardError, match=f"sample {victim}-0 .* bad header checksum"):
        R.reshard(path, tmp_path / "strict", pool=pool, jobs=1, strict=True, warn=quiet)
    report = R.reshard(path, tmp_path / "out", pool=pool, jobs=1, warn=quiet)
    assert report.corrupt == 1
    assert victim in U.to_hex(np.load(tmp_path / "out" / "missing_uids.npy"))


def test_truncated_tar_keeps_the_whole_samples(shards, tmp_path):
    tar = shards / "00000002.tar"
    fd = os.open(tar, os.O_RDONLY)
    samples = list(tario.group_samples(tario.walk_tar(fd, tar.stat().st_size), []))
    rows = [S.sample_row(fd, tar.name, s) for s in samples]
    os.close(fd)
    cut = samples[40].members[0][1].offset + 100  # inside the 41st sample's first member
    os.truncate(tar, cut)
    everything = save_subset(tmp_path / "all.npy", sorted(r["uid"] for r in rows))
    said = []
    report = R.reshard(everything, tmp_path / "out", shards=shards, jobs=1, warn=said.append)
    assert report.output_count == 40 and report.corrupt == len(rows) - 40
    assert any("truncated" in m for m in said) and any("successes" in m for m in said)
    with pytest.raises(ReshardError):
        R.reshard(everything, tmp_path / "strict", shards=shards, jobs=1, strict=True, warn=quiet)


def test_missing_stats_json_is_reported(shards, subset, tmp_path):
    (shards / "00000001_stats.json").unlink()
    said = []
    report = R.reshard(subset[0], tmp_path / "out", shards=shards, jobs=1, warn=said.append)
    assert report.output_count > 0
    assert any("00000001_stats.json is missing" in m for m in said)


def test_stale_index_is_detected(pool, shards, subset, tmp_path):
    with open(shards / "00000001.tar", "ab") as f:
        f.write(b"\0" * 1024)
    with pytest.raises(
        ShardIndexError, match="out of date.*00000001.tar.*changed since it was indexed"
    ) as exc:
        R.reshard(subset[0], tmp_path / "out", pool=pool, jobs=1, warn=quiet)
    assert "dcdb index-shards" in exc.value.hint
    S.index_shards(pool, shards, jobs=1, log=quiet)
    assert R.reshard(subset[0], tmp_path / "out", pool=pool, jobs=1, warn=quiet).output_count > 0


def test_unwritable_output_is_refused_before_any_work(pool, subset, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        R.reshard(subset[0], a_file, pool=pool, jobs=1, warn=quiet)
    with pytest.raises(OutputError, match="cannot create output folder"):
        R.reshard(subset[0], a_file / "out", pool=pool, jobs=1, warn=quiet)
    with pytest.raises(UsageError, match="nothing to reshard from"):
        R.reshard(subset[0], tmp_path / "out", warn=quiet)


# ------------------------------------------------------------------------------------------ CLI


def test_cli_index_and_reshard(pool_template, world, subset, tmp_path):
    from click.testing import CliRunner

    import dcdb.cli.reshard  # noqa: F401  (registers the commands)
    from dcdb.cli import cli

    p = tmp_path / "p"
    shutil.copytree(pool_template, p)
    shutil.rmtree(p / S.SHARDS_DIR)
    runner = CliRunner()
    r = runner.invoke(cli, ["index-shards", str(world / "shards"), "--pool", str(p), "-j", "1"])
    assert r.exit_code == 0, r.output
    assert "indexed" in r.stderr and (p / S.INDEX_MANIFEST).is_file()
    out = tmp_path / "out"
    args = [
        "reshard",
        "--pool",
        str(p),
        "--uids",
        str(subset[0]),
        "-o",
        str(out),
        "--shard-size",
        "50",
        "-j",
        "1",
    ]
    r = runner.invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "resharded" in r.stderr and "samples/s" in r.stderr and (out / "meta.json").is_file()
    r = runner.invoke(cli, args[:-4] + ["--shard-size", "7", "-j", "1"])
    assert r.exit_code == 1 and "error: output folder" in r.stderr and "--overwrite" in r.stderr
    r = runner.invoke(
        cli, ["reshard", "--uids", str(subset[0]), "-o", str(tmp_path / "o2")], env={"DCDB_POOL": ""}
    )
    assert r.exit_code == 2 and "nothing to reshard from" in r.stderr


@pytest.mark.parametrize("name", ["sample_ids.npy", R.STATE_FILE, "00000000.tar", "00000000_stats.json"])
def test_output_files_must_be_regular_files(pool, subset, tmp_path, name):
    """Issue 12 item 4: a FIFO where reshard writes one of its files is refused before any work,
    --overwrite or not, and left as it was (the run state is never read from it either)."""
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / name)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="is a FIFO"):
            R.reshard(subset[0], out, pool=pool, jobs=1, overwrite=overwrite, warn=quiet)
    assert [p.name for p in out.iterdir()] == [name] and os.path.exists(out / name)
    assert not (out / name).is_file() and not (out / name).is_symlink()


def test_query_reshard_without_o_prints_the_uids(pool, tmp_path):
    """Issue 12 item 6: `dcdb query --reshard OUT` without -o and --save prints the uids (as the
    help says) and the log line says where everything went."""
    from click.testing import CliRunner

    from dcdb.cli import cli

    out = tmp_path / "out"
    sql = "SELECT uid FROM pool ORDER BY uid LIMIT 40"
    r = CliRunner().invoke(cli, ["query", "-", "--pool", str(pool), "--reshard", str(out)], input=sql)
    assert r.exit_code == 0, r.output
    printed = r.stdout.split()
    assert len(printed) == 40 and printed == sorted(printed)
    written = U.to_hex(np.load(out / "sample_ids.npy"))
    assert written and set(written) <= set(printed)
    assert f"-> shards in {out}, stdout" in r.stderr
    r = CliRunner().invoke(cli, ["query", "-", "--pool", str(pool), "--reshard", str(tmp_path / "o2"),
                                 "--save", "first40"], input=sql)
    assert r.exit_code == 0 and r.stdout == "" and f"-> subset first40, shards in {tmp_path / 'o2'}" in r.stderr
