"""``dcdb annotate``: computed derived columns (language id, WordNet, centroids) and --from imports."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dcdb.annotate import annotate, import_columns, list_groups
from dcdb.engine import connect
from dcdb.errors import SourceError, UidError, UsageError
from dcdb.store import open_pool

CAPTIONS = [
    "a photo of a dog playing in the park",
    "Ein kleiner Hund spielt im Garten mit dem Ball",
    "un chat noir dort sur le canapé dans la maison",
    "公園で遊んでいる犬の写真です",
    "two\ncats sitting on a red sofa",
    "Собака играет в парке с мячом",
]


def hexuid(i: int) -> str:
    return f"{i:032x}"


@pytest.fixture
def text_pool(tmp_path):
    """A metadata-only pool of the captions above, in two shards."""
    from dcdb.ingest.pool import ingest

    src = tmp_path / "src"
    src.mkdir()
    n = len(CAPTIONS)
    table = pa.table({
        "uid": [hexuid(i + 1) for i in range(n)], "url": ["u"] * n, "text": CAPTIONS,
        "original_width": [640] * n, "original_height": [480] * n, "sha256": ["0" * 64] * n,
        "clip_b32_similarity_score": pa.array([0.3] * n, pa.float32()),
        "clip_l14_similarity_score": pa.array([0.3] * n, pa.float32()),
    })
    pq.write_table(table.slice(0, 3), src / "00000000.parquet")
    pq.write_table(table.slice(3), src / "00000001.parquet")
    ingest(src, tmp_path / "pool", jobs=1)
    return open_pool(tmp_path / "pool")


def column(pool, name):
    """A pool column in source order (the pool is stored in uid order)."""
    return [r[0] for r in connect(pool).sql(f"SELECT {name} FROM pool ORDER BY source_shard, source_row").fetchall()]


# ---------------------------------------------------------------------------- language id


def test_lang_is_stored_once_and_recomputed_only_with_force(text_pool):
    report = annotate(text_pool, "lang", jobs=1)
    assert report.rows == 6 and "top labels" in report.summary()
    pool = open_pool(text_pool.path)
    assert column(pool, "lang") == ["en", "de", "fr", "ja", "en", "ru"]
    with pytest.raises(UsageError, match="already has derived group 'lang'.*--force"):
        annotate(pool, "lang")
    annotate(pool, "lang", force=True, jobs=1)
    info = {g["group"]: g for g in list_groups(pool)}
    assert info["lang"]["columns"] == ["lang"] and info["lang"]["current"]


def test_lang_uses_datacomp_preprocessing(text_pool):
    """Newlines become spaces before the model sees the caption (fastText cannot take them)."""
    from dcdb.filters.langid import identifier

    lid = identifier("fasttext")
    assert lid(["two\ncats sitting on a red sofa"]) == lid(["two cats sitting on a red sofa"])
    assert lid([None]) == lid([""])


def test_lang_cld3(text_pool):
    annotate(text_pool, "lang_cld3", jobs=1)
    labels = column(open_pool(text_pool.path), "lang_cld3")
    assert labels[0] == "en" and labels[1] == "de" and labels[5] == "ru"


def test_parallel_workers_give_the_same_labels(text_pool):
    annotate(text_pool, "lang", jobs=1)
    one = column(open_pool(text_pool.path), "lang")
    annotate(text_pool, "lang", jobs=2, force=True)
    assert column(open_pool(text_pool.path), "lang") == one


def test_unknown_annotator_and_parameters(text_pool):
    with pytest.raises(UsageError, match="did you mean 'lang'"):
        annotate(text_pool, "langg")
    with pytest.raises(UsageError, match="has no parameter"):
        annotate(text_pool, "lang", {"centroids": "x"})
    with pytest.raises(UsageError, match="needs -p centroids"):
        annotate(text_pool, "centroids")


# ------------------------------------------------------------------------------- WordNet


def test_wordnet_annotation(text_pool, tmp_path, monkeypatch):
    from dcdb.filters.wordnet import write_dict

    d = write_dict(tmp_path / "wn", {"dog": [("n", 100)], "cat": [("n", 200)], "sofa": [("n", 300)]})
    monkeypatch.setenv("DCDB_WORDNET", str(d))
    annotate(text_pool, "wordnet", jobs=1)
    got = column(open_pool(text_pool.path), "wn_offsets")
    assert got[0] == [100] and got[4] == [200, 300] and got[1] == []


def test_missing_wordnet_says_where_to_get_it(text_pool, monkeypatch):
    from dcdb.errors import AssetError
    from dcdb.filters import wordnet

    monkeypatch.setenv("DCDB_WORDNET", "")
    monkeypatch.setattr(wordnet, "DEBIAN_DICT", text_pool.path / "nowhere")
    monkeypatch.setattr(wordnet, "_nltk_candidates", list)
    with pytest.raises(AssetError, match="apt-get install wordnet-base"):
        annotate(text_pool, "wordnet", jobs=1)


# ---------------------------------------------------------------------------------- import


def write_import(tmp_path, uids, name="imp.parquet", **cols):
    f = tmp_path / name
    pq.write_table(pa.table({"uid": uids, **cols}), f)
    return f


def test_import_adds_and_replaces(text_pool, tmp_path):
    uids = [hexuid(i + 1) for i in range(6)]
    f = write_import(tmp_path, list(reversed(uids)), lang=["x0", "x1", "x2", "x3", "x4", "x5"])
    report = import_columns(text_pool, f)
    assert report.group == "imp" and report.notes == ["named after imp.parquet (choose with --name)"]
    assert column(open_pool(text_pool.path), "lang") == ["x5", "x4", "x3", "x2", "x1", "x0"]  # keyed by uid
    with pytest.raises(UsageError, match="--force"):
        import_columns(text_pool, f)
    g = write_import(tmp_path, uids, name="g.parquet", lang=["en"] * 6)
    import_columns(text_pool, g, group="imp", force=True)
    assert column(open_pool(text_pool.path), "lang") == ["en"] * 6


def test_import_missing_uids_are_null_and_reported(text_pool, tmp_path):
    f = write_import(tmp_path, [hexuid(2), hexuid(5)], score=pa.array([1.5, 2.5], pa.float64()),
                     tag=["b", "e"])
    report = import_columns(text_pool, f, group="extra")
    assert report.notes == ["4 pool rows not in the file (NULL)"]
    pool = open_pool(text_pool.path)
    assert column(pool, "tag") == [None, "b", None, None, "e", None]
    assert column(pool, "score") == [None, 1.5, None, None, 2.5, None]


def test_import_errors(text_pool, tmp_path):
    dup = write_import(tmp_path, [hexuid(1), hexuid(1)], name="dup.parquet", v=[1, 2])
    with pytest.raises(SourceError, match="1 uids appear more than once"):
        import_columns(text_pool, dup)
    unknown = write_import(tmp_path, [hexuid(1), hexuid(99)], name="unk.parquet", v=[1, 2])
    with pytest.raises(SourceError, match="1 uids of .* are not in the pool.*--allow-unknown"):
        import_columns(text_pool, unknown)
    report = import_columns(text_pool, unknown, allow_unknown=True)
    assert "1 uids not in the pool skipped" in report.notes
    bad = write_import(tmp_path, ["XYZ"], name="bad.parquet", w=[1])
    with pytest.raises(UidError, match="not 32 lowercase hex"):
        import_columns(text_pool, bad)
    nouid = tmp_path / "nouid.parquet"
    pq.write_table(pa.table({"id": [1]}), nouid)
    with pytest.raises(SourceError, match="no uid column"):
        import_columns(text_pool, nouid)
    with pytest.raises(SourceError, match="does not exist"):
        import_columns(text_pool, tmp_path / "nothing.parquet")


def test_import_refuses_a_column_of_another_group(text_pool, tmp_path):
    annotate(text_pool, "lang", jobs=1)
    f = write_import(tmp_path, [hexuid(1)], lang=["xx"])
    with pytest.raises(UsageError, match="already comes from derived group 'lang'"):
        import_columns(text_pool, f, group="mine", allow_unknown=True)


# ------------------------------------------------------------------------------- centroids


def test_centroid_annotation_streams_and_records_the_file(tmp_path):
    from dcdb.ingest.pool import ingest
    from dcdb.demo.synth import synth_pool

    synth_pool(tmp_path / "src", rows=300, shards=3, seed=9, jobs=1)
    ingest(tmp_path / "src", tmp_path / "pool", jobs=1)
    pool = open_pool(tmp_path / "pool")
    rng = np.random.default_rng(0)
    cents = rng.normal(size=(20, 768)).astype(np.float32)
    np.save(tmp_path / "c.npy", cents)
    annotate(pool, "centroids", {"centroids": str(tmp_path / "c.npy")})
    emb = np.concatenate([np.load(f)["l14_img"] for f in sorted((tmp_path / "src").glob("*.npz"))])
    want = np.argmax(emb.astype(np.float32) @ cents.T, axis=1)
    assert column(open_pool(pool.path), "centroid_id") == want.tolist()
    meta = next(g for g in list_groups(open_pool(pool.path)) if g["group"] == "centroids")
    assert meta["annotator"] == "centroids"


# ------------------------------------------------------------------------------------- CLI


def cli(*args):
    from dcdb.cli import annotate  # noqa: F401  (registers the command)
    from dcdb.cli import cli as root

    return CliRunner().invoke(root, list(args))


def test_cli(text_pool, tmp_path):
    p = str(text_pool.path)
    r = cli("-q", "annotate", "--pool", p, "lang", "-j", "1")
    assert r.exit_code == 0, r.output
    r = cli("annotate", "--pool", p, "lang")
    assert r.exit_code == 2 and "--force" in r.output
    f = write_import(tmp_path, [hexuid(i + 1) for i in range(6)], name="t.parquet", topic=list("abcdef"))
    r = cli("annotate", "--pool", p, "--from", str(f))
    assert r.exit_code == 0 and "derived group 't'" in r.stderr and "named after t.parquet" in r.stderr
    r = cli("annotate", "--pool", p, "--list")
    assert "lang: lang" in r.output and "t: topic" in r.output
    r = cli("annotate", "--pool", p, "--drop", "t")
    assert r.exit_code == 0
    r = cli("annotate", "--pool", p)
    assert r.exit_code == 2 and "exactly one of" in r.output
