"""The demo world generator: determinism and every format contract (DataComp pool metadata,
img2dataset shards, clip_benchmark eval tasks), defect ground truth, pool embeddings, the CLI."""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcdb.demo import world as W
from dcdb.errors import OutputError, SourceError, UsageError
from dcdb.store import DATACOMP_COLUMNS

SMALL = {
    "concepts": 8,
    "samples": 300,
    "seed": 3,
    "shard_size": 100,
    "teacher_samples": 150,
    "eval_per_class": 4,
    "retrieval_samples": 20,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    W.build_world(out, workers=1, **SMALL)
    return out


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def tables(folder: Path, pattern: str = "*.parquet") -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob(pattern))])


# ------------------------------------------------------------------------------ determinism


def test_same_seed_same_world_whatever_the_workers(world, tmp_path):
    again = tmp_path / "again"
    W.build_world(again, workers=2, **SMALL)
    for sub in ("metadata", "truth", "shards", "teacher/shards"):
        for p in sorted((world / sub).glob("*.parquet")):
            assert p.read_bytes() == (again / sub / p.name).read_bytes(), p  # (NaN scores: no Table.equals)
    tars = sorted(world.rglob("*.tar"))
    assert len(tars) == 3 + 2 + 4
    for p in tars:
        q = again / p.relative_to(world)
        assert p.read_bytes() == q.read_bytes(), p
    for name in ("eval/tasklist.json", "eval/concepts/classnames.txt"):
        assert (world / name).read_bytes() == (again / name).read_bytes()


def test_another_seed_another_world(world, tmp_path):
    other = tmp_path / "other"
    W.build_world(other, workers=1, **dict(SMALL, seed=4, samples=50, teacher_samples=10))
    a = set(tables(world / "metadata").column("uid").to_pylist())
    b = set(tables(other / "metadata").column("uid").to_pylist())
    assert not a & b


#: sha256 of the words of the SMALL world (captions, urls, download errors, retrieval captions, class
#: names, templates, tasklist.json), recorded when the vocabulary moved from world.py into
#: dcdb/demo/data/*.json: an edit or reordering of those files that changes the world shows here.
SMALL_WORDS_SHA256 = "06c0c0af27e3bb2bb4de49b948f3421f5b6e7f07cd2f56a099b63ba3aaf9339c"


def _words(world: Path) -> str:
    parts = []
    for sub, cols in (("metadata", ["text", "url"]), ("shards", ["error_message"])):
        for p in sorted((world / sub).glob("*.parquet")):
            t = pq.read_table(p, columns=cols)
            parts += [str(v) for c in cols for v in t.column(c).to_pylist()]
    members = tar_members(world / "eval" / "retrieval" / "test" / "0.tar")
    parts += [v.decode() for k, v in members.items() if k.endswith(".txt")]
    for name in ("concepts/classnames.txt", "shapes/zeroshot_classification_templates.txt", "tasklist.json"):
        parts.append((world / "eval" / name).read_text())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def test_vocabulary_files_draw_the_recorded_world(world):
    assert _words(world) == SMALL_WORDS_SHA256, "the world's words changed: if meant, record the new digest"


def test_vocabulary_tables_cover_every_concept():
    """Every shape, colour, texture and background has its words in every language (a data file
    edited by hand can miss one), and the shapes are the ones the renderer draws."""
    assert list(W.POLYGONS) == list(W.SHAPES) and set(W.EN_SHAPE) == set(W.SHAPES)
    assert set(W.EN_TEX_ADJ) == set(W.TEXTURES) and set(W.EN_TEX_WITH) == set(W.TEXTURES) - {"solid"}
    assert set(W.EN_COLOUR) <= set(W.COLOURS)
    for palette in (W.COLOURS, W.BACKGROUNDS, W.SHIFT_BACKGROUNDS):
        assert all(len(rgb) == 3 and all(0 <= v <= 255 for v in rgb) for rgb in palette.values())
    assert not set(W.BACKGROUNDS) & set(W.SHIFT_BACKGROUNDS)
    assert W.LANGUAGES == ("de", "fr", "es", "it")
    for lang, v in W.FOREIGN.items():
        assert set(v["shape"]) == set(W.SHAPES) and set(v["colour"]) == set(W.COLOURS), lang
        assert set(v["texture"]) == set(W.TEXTURES) and set(v["bg"]) == set(W.BACKGROUNDS), lang
        assert v["templates"] and all("{p}" in t for t in v["templates"]), lang
        if lang != "de":
            assert {g for _, g in v["shape"].values()} <= set(v["article"]), lang
            assert all(len(c) == 2 for c in v["colour"].values()), lang
    assert all("{p}" in t for t in W.EN_TEMPLATES) and all("{c}" in t for t in W.EVAL_TEMPLATES)
    assert W.vocabulary("eval")["tasks"] is W.EVAL_TASKS  # read once


# ------------------------------------------------------------------------------ pool metadata


def test_metadata_is_datacomp_shaped(world):
    files = sorted((world / "metadata").glob("*.parquet"))
    assert [p.name for p in files] == ["00000000.parquet", "00000001.parquet", "00000002.parquet"]
    assert not list((world / "metadata").glob("*.npz"))
    t = tables(world / "metadata")
    assert tuple(t.column_names) == DATACOMP_COLUMNS
    types = {f.name: f.type for f in t.schema}
    assert types["uid"] == pa.string() and types["original_width"] == pa.int64()
    assert types["clip_b32_similarity_score"] == pa.float32()
    assert types["face_bboxes"] == pa.list_(pa.list_(pa.float64()))
    uids = t.column("uid").to_pylist()
    assert len(uids) == 300 == len(set(uids))
    assert all(re.fullmatch(r"[0-9a-f]{32}", u) for u in uids)
    assert np.isnan(t.column("clip_l14_similarity_score").to_numpy()).all()
    for boxes in t.column("face_bboxes").to_pylist():
        for x1, y1, x2, y2 in boxes:
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1


def test_truth_redraws_every_image_exactly(world):
    meta, truth = tables(world / "metadata"), W.read_truth(world)
    assert truth.column("uid").equals(meta.column("uid"))
    concepts = W.world_concepts(W.load_world(world))
    for row, sha in zip(truth.to_pylist()[::7], meta.column("sha256").to_pylist()[::7]):
        jpg = W.scene_jpeg(W.scene_from_truth(row), concepts[row["concept"]])
        assert hashlib.sha256(jpg).hexdigest() == sha


# --------------------------------------------------------------------------- img2dataset shards


def test_download_shards_follow_img2dataset(world):
    meta = {r["uid"]: r for r in tables(world / "metadata").to_pylist()}
    manifest = W.load_world(world)
    width = manifest["key_width"]
    assert width == 8 + 2  # oom_shard_count 8 + digits of shard_size 100
    total_ok = 0
    for shard in range(3):
        members = tar_members(world / "shards" / f"{shard:08d}.tar")
        table = pq.read_table(world / "shards" / f"{shard:08d}.parquet").to_pylist()
        stats = json.loads((world / "shards" / f"{shard:08d}_stats.json").read_text())
        keys = sorted({n.split(".")[0] for n in members})
        assert set(members) == {f"{k}.{e}" for k in keys for e in ("jpg", "txt", "json")}
        assert stats["successes"] == len(keys) and stats["count"] == len(table) == 100
        assert stats["failed_to_download"] == sum(r["status"] == "failed_to_download" for r in table)
        assert stats["status_dict"]["success"] == len(keys)
        assert [r["key"] for r in table] == [f"{shard * 100 + i:0{width}d}" for i in range(100)]
        for r in table:
            in_tar = f"{r['key']}.jpg" in members
            assert in_tar == (r["status"] == "success")
            if not in_tar:
                assert r["error_message"] and r["sha256"] is None and r["width"] is None
        for k in keys:
            js = json.loads(members[f"{k}.json"])
            jpg = members[f"{k}.jpg"]
            m = meta[js["uid"]]
            assert js["key"] == k and js["status"] == "success" and js["error_message"] is None
            assert js["caption"] == m["text"] == members[f"{k}.txt"].decode()
            assert js["url"] == m["url"] and js["face_bboxes"] == m["face_bboxes"]
            assert (js["width"], js["height"]) == (64, 64)
            assert (js["original_width"], js["original_height"]) == (
                m["original_width"],
                m["original_height"],
            )
            assert js["sha256"] == hashlib.sha256(jpg).hexdigest() == m["sha256"]
            assert jpg[:2] == b"\xff\xd8"
        total_ok += len(keys)
    truth = W.read_truth(world)
    assert total_ok == sum(truth.column("downloaded").to_pylist()) == sum(manifest["pool"]["successes"])
    assert 0 < 300 - total_ok < 30


def test_teacher_split_is_clean(world):
    t = tables(world / "teacher" / "shards")
    assert t.num_rows == 150 and set(t.column("status").to_pylist()) == {"success"}
    pool = set(tables(world / "metadata").column("uid").to_pylist())
    assert not pool & set(t.column("uid").to_pylist())
    members = tar_members(world / "teacher" / "shards" / "00000000.tar")
    assert sum(n.endswith(".jpg") for n in members) == 100
    concept_words = {c["shape"] for c in W.load_world(world)["concepts"]}
    captions = t.column("caption").to_pylist()
    synonyms = {w for c in concept_words for s in W.EN_SHAPE[c] for w in s.split()}
    assert all(any(w in cap for w in synonyms) for cap in captions)


# ------------------------------------------------------------------------------------ defects


def test_defects_match_rates_and_ground_truth(world):
    t = W.read_truth(world).to_pylist()
    meta = tables(world / "metadata").to_pylist()
    manifest = W.load_world(world)
    counts = {d: sum(r["defect"] == d for r in t) for d in W.DEFECTS}
    assert counts == manifest["counts"]["defect"]
    for d, rate in W.DEFAULT_RATES.items():
        assert counts[d] == round(rate * 300)
    by_uid = {m["uid"]: (m, r) for m, r in zip(meta, t)}
    for m, r in zip(meta, t):
        lo, hi = sorted((m["original_width"], m["original_height"]))
        d = r["defect"]
        if d == "tiny":
            assert lo < 200
        elif d == "extreme_aspect":
            assert hi / lo > 3 and lo >= 200 and not m["face_bboxes"]
        elif d not in ("duplicate", "near_duplicate"):
            assert lo >= 200 and hi / lo <= 3
        if d == "mismatched":
            assert r["text_concept"] != r["concept"]
        elif d == "junk":
            assert r["text_concept"] == -1 and r["lang"] == ""
        else:
            assert r["text_concept"] == r["concept"]
        assert (r["lang"] in W.LANGUAGES) == (d == "non_english")
        assert r["has_face"] == bool(m["face_bboxes"])
        if d in ("duplicate", "near_duplicate"):
            om, orow = by_uid[r["duplicate_of"]]
            assert orow["defect"] == "none" and orow["concept"] == r["concept"]
            assert (m["sha256"] == om["sha256"]) == (d == "duplicate")
            assert (m["text"] == om["text"]) or d == "near_duplicate"
            assert m["url"] != om["url"]
        else:
            assert r["duplicate_of"] is None


def test_captions_name_the_concept_in_english(world):
    t = W.read_truth(world).to_pylist()
    meta = tables(world / "metadata").to_pylist()
    concepts = W.world_concepts(W.load_world(world))
    for m, r in zip(meta, t):
        if r["defect"] in ("none", "tiny", "mismatched"):
            c = concepts[r["text_concept"]]
            colours = W.EN_COLOUR.get(c.colour, [c.colour])
            assert any(w in m["text"] for w in colours), m["text"]


# --------------------------------------------------------------------------------- embeddings


def _pixel_encoder(dim: int, seed: int):
    proj = np.random.default_rng(seed).standard_normal((8 * 8 * 3, dim))

    def encode(images):
        x = np.stack([np.asarray(im.resize((8, 8)), np.float32).ravel() / 255 for im in images])
        return (x - 0.5) @ proj

    return encode


def _text_encoder(dim: int):
    def encode(texts):
        out = np.zeros((len(texts), dim))
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % dim] += 1
        return out + 1e-3

    return encode


def test_write_pool_embeddings(world, tmp_path):
    import shutil

    w = tmp_path / "w"
    shutil.copytree(world, w)
    seen = []

    def images(batch):
        seen.extend(batch)
        return _pixel_encoder(24, 0)(batch)

    W.write_pool_embeddings(
        w,
        {"b32": images, "l14": _pixel_encoder(32, 1)},
        {"b32": _text_encoder(24), "l14": _text_encoder(32)},
        batch_size=64,
        models={"b32": "teacher-small"},
    )
    assert len(seen) == 300 and all(im.size == (64, 64) and im.mode == "RGB" for im in seen)
    before = tables(world / "metadata")
    for shard in range(3):
        t = pq.read_table(w / "metadata" / f"{shard:08d}.parquet")
        assert tuple(t.column_names) == DATACOMP_COLUMNS
        assert t.drop_columns(["clip_b32_similarity_score", "clip_l14_similarity_score"]).equals(
            before.slice(shard * 100, 100).drop_columns(
                ["clip_b32_similarity_score", "clip_l14_similarity_score"]
            )
        )
        with np.load(w / "metadata" / f"{shard:08d}.npz") as z:
            assert sorted(z.files) == ["b32_img", "b32_txt", "l14_img", "l14_txt"]
            for space, dim in (("b32", 24), ("l14", 32)):
                img, txt = z[f"{space}_img"], z[f"{space}_txt"]
                assert img.dtype == np.float16 and img.shape == txt.shape == (100, dim)
                assert np.allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1, atol=2e-3)
                score = t.column(f"clip_{space}_similarity_score").to_numpy()
                assert score.dtype == np.float32
                np.testing.assert_allclose(score, W.cosine(img, txt), rtol=0, atol=1e-6)
        # row alignment: the image vector of row i is the encoding of row i's image
        imgs = [im for _, im in W.pool_images(w, shard)]
        expect = _pixel_encoder(24, 0)(imgs[:5])
        expect /= np.linalg.norm(expect, axis=1, keepdims=True)
        np.testing.assert_allclose(
            np.load(w / "metadata" / f"{shard:08d}.npz")["b32_img"][:5], expect, atol=2e-3
        )
    emb = W.load_world(w)["embeddings"]
    assert emb["b32"] == {
        "dim": 24,
        "dtype": "float16",
        "model": "teacher-small",
        "keys": ["b32_img", "b32_txt"],
    }


def test_write_pool_embeddings_rejects_bad_encoders(world):
    with pytest.raises(UsageError, match="returned shape"):
        W.write_pool_embeddings(world, lambda b: np.zeros(len(b)), _text_encoder(8))
    with pytest.raises(UsageError, match="no encoder for space"):
        W.write_pool_embeddings(world, {"b32": _pixel_encoder(8, 0)}, _text_encoder(8))
    assert not list((world / "metadata").glob("*.npz"))


# --------------------------------------------------------------------------------- eval tasks


def read_wds(path: Path) -> list[dict]:
    """All samples of a tar through webdataset, decoded to PIL (webdataset 1.0.2 never closes the
    shard's file, so its ResourceWarning is silenced and the file collected here)."""
    import gc
    import warnings

    import webdataset as wds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        ds = wds.WebDataset(str(path), shardshuffle=False, empty_check=False).decode("pil")
        samples = list(ds)
        del ds
        gc.collect()
    return samples


def test_eval_tasks_in_clip_benchmark_layout(world):
    tasks = json.loads((world / "eval" / "tasklist.json").read_text())
    assert set(tasks) == {"concepts", "concepts_shift", "shapes", "retrieval"}
    assert tasks["retrieval"]["main_metric"] == "mean_recall@1"
    for name, spec in tasks.items():
        folder = world / "eval" / name
        assert (folder / "test" / "nshards.txt").read_text().strip() == "1"
        samples = read_wds(folder / "test" / "0.tar")
        assert len(samples) == spec["size"]
        assert samples[0]["__key__"] == "s0000000"
        assert all(s["webp"].size == (64, 64) for s in samples)
        if spec["type"] == "zeroshot_classification":
            assert spec["main_metric"] == "acc1"
            classes = (folder / "classnames.txt").read_text().splitlines()
            templates = (folder / "zeroshot_classification_templates.txt").read_text().splitlines()
            assert len(classes) == spec["num_classes"] == len(set(classes))
            assert templates and all("{c}" in t and t.format(c=classes[0]) for t in templates)
            labels = [s["cls"] for s in samples]
            assert sorted(set(labels)) == list(range(len(classes)))
            assert len(samples) == 4 * len(classes)
        else:
            assert all(len(s["txt"].splitlines()) == 2 for s in samples)


# -------------------------------------------------------------------------------- bad input


def test_refuses_non_empty_output_unless_forced(world, tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "metadata").mkdir()
    (out / "metadata" / "00000099.parquet").write_text("stale")
    with pytest.raises(OutputError, match="not empty"):
        W.build_world(out, **dict(SMALL, samples=20, teacher_samples=10))
    W.build_world(out, force=True, **dict(SMALL, samples=20, teacher_samples=10))
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (out / "metadata" / "00000099.parquet").exists()
    assert W.load_world(out)["samples"] == 20


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"concepts": 1}, "concepts must be between"),
        ({"samples": 0}, "samples must be at least"),
        ({"rates": {"blurry": 0.1}}, "unknown defect"),
        ({"rates": {"junk": 0.9}}, "sum to"),
        (
            {
                "rates": {
                    "duplicate": 0.5,
                    "near_duplicate": 0.5,
                    "mismatched": 0,
                    "non_english": 0,
                    "junk": 0,
                    "tiny": 0,
                    "extreme_aspect": 0,
                }
            },
            "no original rows",
        ),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(UsageError, match=match):
        W.build_world(tmp_path / "w", **dict(dict(SMALL, samples=20, teacher_samples=10), **kwargs))


def test_load_world_says_what_to_do(tmp_path):
    with pytest.raises(SourceError, match="dcdb world"):
        W.load_world(tmp_path)


# ---------------------------------------------------------------------------------------- CLI


def test_cli_world(tmp_path):
    from click.testing import CliRunner

    import dcdb.cli.demo  # noqa: F401  (registers the command)
    from dcdb.cli import cli

    out = tmp_path / "w"
    args = [
        "world",
        str(out),
        "--concepts",
        "6",
        "--samples",
        "120",
        "--shard-size",
        "100",
        "--seed",
        "1",
        "--teacher-samples",
        "30",
        "--eval-per-class",
        "2",
        "--retrieval-samples",
        "10",
    ]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "wrote a world of 120 samples, 6 concepts" in res.output
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == ["00000000.tar", "00000001.tar"]
    res = CliRunner().invoke(cli, args)
    assert (
        res.exit_code == OutputError.exit_code
        and "error: world output" in res.output
        and "--force" in res.output
    )
    res = CliRunner().invoke(cli, ["-q", *args, "--force"])
    assert res.exit_code == 0 and res.output == ""
