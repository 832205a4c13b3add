"""DataComp's baselines (sql/*.sql): every detail of apply_filter.py on crafted rows, set identity
with a pandas/numpy re-implementation of DataComp's code on a synthetic pool, and bad input.

Language labels come from the pool's ``lang``/``lang_cld3`` columns (imported here, or computed by
``dcdb annotate``), and the reference reads the same labels: fastText's lid.176.bin and gcld3 are
not what is being tested. WordNet is a small stand-in written by ``dcdb.filters.wordnet.write_dict``.
"""

from __future__ import annotations

import math
import os
import re
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcdb import uids as U
from dcdb.errors import DcdbError
from dcdb.query import load_filter, run_filter
from dcdb.store import open_pool

D14 = 768
WNID = {"dog": 2084, "goose": 1855, "box": 2883, "cat": 2300, "run": 1926}  # stand-in offsets


# ------------------------------------------------------------------------------- builders


def hexuid(i: int) -> str:
    return f"{i:032x}"


def unit(rng, n, d):
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_source(folder, rows: list[dict], *, l14_img=None, shards: int = 1, seed: int = 0):
    """A DataComp metadata folder: DataComp's columns from ``rows`` (defaults fill the rest);
    with ``l14_img`` (n x 768) a row-aligned npz per shard (other spaces random)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = len(rows)
    cols = {
        "uid": [r.get("uid", hexuid(i + 1)) for i, r in enumerate(rows)],
        "url": [f"https://x.example/{i}.jpg" for i in range(n)],
        "text": [r.get("text", "a photo of a dog") for r in rows],
        "original_width": [r.get("w", 640) for r in rows],
        "original_height": [r.get("h", 480) for r in rows],
        "sha256": ["0" * 64] * n,
        "clip_b32_similarity_score": [r.get("b32", 0.3) for r in rows],
        "clip_l14_similarity_score": [r.get("l14", 0.3) for r in rows],
        "face_bboxes": [[] for _ in range(n)],
    }
    schema = pa.schema([("uid", pa.string()), ("url", pa.string()), ("text", pa.string()),
                        ("original_width", pa.int64()), ("original_height", pa.int64()),
                        ("sha256", pa.string()), ("clip_b32_similarity_score", pa.float32()),
                        ("clip_l14_similarity_score", pa.float32()),
                        ("face_bboxes", pa.list_(pa.list_(pa.float64())))])
    table = pa.table(cols, schema=schema)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    for s in range(shards):
        a, b = bounds[s], bounds[s + 1]
        pq.write_table(table.slice(a, b - a), folder / f"{s:08d}.parquet")
        if l14_img is not None:
            m = b - a
            np.savez(folder / f"{s:08d}.npz", l14_img=np.asarray(l14_img[a:b], np.float16),
                     l14_txt=unit(rng, m, D14).astype(np.float16), b32_img=unit(rng, m, 512).astype(np.float16),
                     b32_txt=unit(rng, m, 512).astype(np.float16))
    return folder


def build_pool(tmp_path, rows, *, lang=None, l14_img=None, shards=1, name="p"):
    """Ingest crafted rows; ``lang``: labels per row imported as column lang (and lang_cld3)."""
    from dcdb.annotate import import_columns
    from dcdb.ingest.pool import ingest

    src = write_source(tmp_path / f"{name}_src", rows, l14_img=l14_img, shards=shards)
    ingest(src, tmp_path / name, jobs=1)
    pool = open_pool(tmp_path / name)
    if lang is not None:
        labels = dict(zip((r.get("uid", hexuid(i + 1)) for i, r in enumerate(rows)), lang, strict=True))
        f = tmp_path / f"{name}_lang.parquet"
        pq.write_table(pa.table({"uid": list(labels), "lang": list(labels.values()),
                                 "lang_cld3": list(labels.values())}), f)
        import_columns(pool, f, group="lang")
        pool = open_pool(tmp_path / name)
    return pool


def run(pool, name, **params):
    res = run_filter(pool, load_filter(name), {k: str(v) for k, v in params.items()})
    return res.uids


def hexes(arr) -> list[str]:
    return U.to_hex(arr)


def datacomp_uids(df: pd.DataFrame, mask) -> np.ndarray:
    """DataComp's uid conversion and final sort."""
    kept = df.uid[np.asarray(mask, dtype=bool)]
    arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in kept], np.dtype("u8,u8"))
    arr.sort()
    return arr


@pytest.fixture
def wordnet_dir(tmp_path, monkeypatch):
    from dcdb.filters import wordnet

    d = wordnet.write_dict(tmp_path / "nltk_data" / "corpora" / "wordnet", {
        "dog": [("n", WNID["dog"]), ("v", 2005)],
        "goose": [("n", WNID["goose"])],
        "box": [("n", WNID["box"])],
        "cat": [("n", 1500), ("n", WNID["cat"])],  # first synset is not the WNID one
        "run": [("v", WNID["run"])],  # a verb whose offset equals a WNID number
        "hot_dog": [("n", 3300)],
        "happy": [("a", 1148)],
    }, exceptions={"n": {"geese": ["goose"]}})
    monkeypatch.setenv("DCDB_WORDNET", str(d))
    return d


def wnid_file(tmp_path, offsets, pos="n"):
    f = tmp_path / "wnids.txt"
    f.write_text("".join(f"{pos}{o:08d}\n" for o in offsets))
    return f


# ------------------------------------------------------------------------- clip score details


def scores_pool(tmp_path, scores, **kw):
    rows = [{"l14": s, "b32": s} for s in scores]
    return build_pool(tmp_path, rows, **kw), rows


def reference_fraction(scores, f):
    v = np.asarray(scores, np.float32)
    t = -np.sort(-v)[int(len(v) * f)]
    return set(np.flatnonzero(v >= t))


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.3, 0.5, 0.7])
def test_fraction_is_index_n_of_descending_sort_with_nan_last(tmp_path, fraction):
    scores = [0.9, 0.8, 0.8, 0.8, math.nan, 0.6, 0.5, math.nan, 0.5, 0.1]
    pool, _ = scores_pool(tmp_path, scores)
    got = run(pool, "clip_score", arch="l14", fraction=fraction)
    want = reference_fraction(scores, fraction)
    assert sorted(hexes(got)) == sorted(hexuid(i + 1) for i in want)
    n = int(len(scores) * fraction)
    assert len(got) >= n + 1  # n+1 rows plus ties


def test_fraction_reaching_nan_tail_keeps_nothing(tmp_path):
    pool, _ = scores_pool(tmp_path, [0.5, 0.4, math.nan, math.nan, math.nan])
    assert len(run(pool, "clip_score", arch="b32", fraction=0.5)) == 0  # index 2 is NaN
    assert len(run(pool, "clip_score", arch="b32", fraction=0.39)) == 2  # index 1 is 0.4


def test_fraction_one_keeps_every_scored_row(tmp_path):
    pool, _ = scores_pool(tmp_path, [0.5, math.nan, 0.1, 0.3])
    assert sorted(hexes(run(pool, "clip_score", arch="l14", fraction=1))) == [hexuid(1), hexuid(3), hexuid(4)]


def test_threshold_compares_in_float32_and_nan_never_passes(tmp_path):
    exact = float(np.float32(0.35))  # 0.3499999940395355 < 0.35 in float64
    pool, _ = scores_pool(tmp_path, [exact, 0.34, math.nan, 0.36])
    got = hexes(run(pool, "clip_score", arch="l14", threshold=0.35))
    assert got == [hexuid(1), hexuid(4)]
    assert hexuid(3) not in hexes(run(pool, "clip_score", arch="l14", threshold=-5))
    v = np.array([exact, 0.34, math.nan, 0.36], np.float32)
    assert list(np.flatnonzero(pd.Series(v) >= 0.35)) == [0, 3]  # what DataComp's pandas does


def test_laion2b_uses_cld3_column_and_b32_028(tmp_path):
    rows = [{"b32": 0.28}, {"b32": 0.2799}, {"b32": 0.5}, {"b32": math.nan}]
    pool = build_pool(tmp_path, rows, lang=["en", "en", "de", "en"])
    assert hexes(run(pool, "laion2b")) == [hexuid(1)]


# ------------------------------------------------------------------------------- basic filter


BASIC_ROWS = [
    ({"text": "ab cd ef"}, True),  # 3 words, 8 chars
    ({"text": "a b c"}, False),  # 3 words but len 5
    ({"text": "abcdef ghijkl"}, False),  # 2 words
    ({"text": "aa\u00a0bb cc"}, True),  # NBSP is whitespace for str.split(): 3 words
    ({"text": "aa\u200bbb cc dd"}, True),  # ZWSP is not: 3 words
    ({"text": "aa\u200bbb cc"}, False),  # 2 words
    ({"text": "é é é"}, False),  # 5 code points (7 bytes in UTF-8)
    ({"text": "éé é é"}, True),  # 6 code points
    ({"text": "one two\nthree"}, True),
    ({"w": 200, "h": 600, "text": "ab cd ef"}, True),  # ratio exactly 3.0
    ({"w": 200, "h": 601, "text": "ab cd ef"}, False),
    ({"w": 199, "h": 300, "text": "ab cd ef"}, False),
    ({"w": 900, "h": 300, "text": "ab cd ef"}, True),
    ({"w": 0, "h": 0, "text": "ab cd ef"}, False),
]


def test_basic_filter_details(tmp_path):
    rows = [r for r, _ in BASIC_ROWS] + [{"text": "ab cd ef"}]
    lang = ["en"] * len(BASIC_ROWS) + ["fr"]
    pool = build_pool(tmp_path, rows, lang=lang)
    got = set(hexes(run(pool, "basic_filter")))
    want = {hexuid(i + 1) for i, (_, keep) in enumerate(BASIC_ROWS) if keep}
    assert got == want
    for r, keep in BASIC_ROWS:  # the expectations agree with Python itself
        t, w, h = r.get("text"), r.get("w", 640), r.get("h", 480)
        py = len(t.split()) > 2 and len(t) > 5 and min(w, h) >= 200 and (max(w, h) / min(w, h) <= 3.0)
        assert py == keep, r


def test_basic_filter_null_size_or_text_never_passes(tmp_path):
    pool = build_pool(tmp_path, [{"text": "ab cd ef", "w": None}, {"text": None}, {"text": "ab cd ef"}],
                      lang=["en"] * 3)
    assert hexes(run(pool, "basic_filter")) == [hexuid(3)]


def test_lang_column_parameter(tmp_path):
    from dcdb.annotate import import_columns

    pool = build_pool(tmp_path, [{"text": "ab cd ef"}] * 2, lang=["en", "de"])
    f = tmp_path / "other.parquet"
    pq.write_table(pa.table({"uid": [hexuid(1), hexuid(2)], "my_lang": ["de", "en"]}), f)
    import_columns(pool, f)
    pool = open_pool(pool.path)
    assert hexes(run(pool, "basic_filter")) == [hexuid(1)]
    assert hexes(run(pool, "basic_filter", lang_column="my_lang")) == [hexuid(2)]


def test_duplicates_kept_and_output_sorted(tmp_path):
    rows = [{"uid": "ff" * 16}, {"uid": "01" * 16}, {"uid": "ff" * 16}, {"uid": "80" * 16}]
    pool = build_pool(tmp_path, rows, lang=["en"] * 4)
    for name, params in [("no_filter", {}), ("basic_filter", {}), ("clip_score", {"arch": "l14", "threshold": 0.1})]:
        got = run(pool, name, **params)
        assert hexes(got) == ["01" * 16, "80" * 16, "ff" * 16, "ff" * 16], name
        assert U.is_sorted(got)


# ------------------------------------------------------------------------------- text based


def test_text_based_wordnet_semantics(tmp_path, wordnet_dir):
    texts = [
        ("a dog here", True),
        ("Dogs running", True),  # lower-case + morphy (dogs -> dog)
        ("DOG", True),
        ("dog, barking", False),  # punctuation is kept: 'dog,' has no synset
        ("geese flying", True),  # exception list: geese -> goose
        ("boxes", True),  # rule xes -> x
        ("a cat", False),  # cat's first synset is not in the list (a later one is)
        ("we run", True),  # a verb synset whose offset equals a WNID number (POS dropped)
        ("hot_dog stand", False),
        ("nothing to see", False),
    ]
    rows = [{"text": t} for t, _ in texts] + [{"text": "a dog here"}]
    pool = build_pool(tmp_path, rows, lang=["en"] * len(texts) + ["de"])
    ids = wnid_file(tmp_path, [WNID["dog"], WNID["goose"], WNID["box"], WNID["cat"], WNID["run"]])
    want = {hexuid(i + 1) for i, (_, keep) in enumerate(texts) if keep}
    assert set(hexes(run(pool, "text_based", wordnet_ids=ids))) == want  # on the fly
    from dcdb.annotate import annotate

    annotate(open_pool(pool.path), "wordnet")
    assert set(hexes(run(open_pool(pool.path), "text_based", wordnet_ids=ids))) == want  # derived column


def test_wordnet_reader_matches_nltk(tmp_path, wordnet_dir):
    """Our reader against NLTK's own WordNetCorpusReader (the installed version: without
    NLTK 3.8.1's repeated rule application, which ``iterate=False`` mirrors)."""
    nltk = pytest.importorskip("nltk")
    import warnings

    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    from dcdb.filters.wordnet import WordNet, locate

    data_dir = str(wordnet_dir.parent.parent)  # .../nltk_data (the stand-in is corpora/wordnet)
    mine = WordNet(locate(wordnet_dir), iterate=False)
    nltk.data.path.insert(0, data_dir)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = WordNetCorpusReader(nltk.data.find("corpora/wordnet"), None)
        try:
            for w in ["dog", "Dogs", "dogs", "geese", "boxes", "cat", "cats", "running", "runs", "happier",
                      "hot_dog", "x"]:
                s = ref.synsets(w)
                assert mine.first_offset(w) == (s[0].offset() if s else -1), w
        finally:
            for f in ref._data_file_map.values():
                f.close()
    finally:
        nltk.data.path.remove(data_dir)


def test_morphy_iterates_like_nltk_381(tmp_path):
    from dcdb.filters.wordnet import WordNet, locate, write_dict

    d = write_dict(tmp_path / "wn2", {"box": [("n", 500)]})
    # "boxess": one rule step gives "boxes" (not a lemma); NLTK 3.8.1 keeps applying rules -> "box".
    assert WordNet(locate(d), iterate=True).first_offset("boxess") == 500
    assert WordNet(locate(d), iterate=False).first_offset("boxess") == -1
    assert WordNet(locate(d)).first_offset("es" * 400) == -1  # pathological tokens stay fast


REQUIRE_WORDNET_ENV = "DCDB_TEST_REQUIRE_WORDNET"  # .ci/run installs wordnet-base and sets it


def _real_wordnet():
    from dcdb.filters.wordnet import DEBIAN_DICT, Source

    src = Source(DEBIAN_DICT)
    if not src.complete():
        if os.environ.get(REQUIRE_WORDNET_ENV) == "1":
            pytest.fail(f"{REQUIRE_WORDNET_ENV}=1 but Debian's wordnet-base is not in {DEBIAN_DICT}")
        pytest.skip("Debian's wordnet-base is not installed (`apt-get install wordnet-base`; .ci/run does)")
    return src


def test_real_wordnet_offsets():
    from dcdb.filters.wordnet import WordNet

    wn = WordNet(_real_wordnet())
    assert wn.first_offset("dog") == 2084071  # n02084071, ImageNet's dog
    assert wn.first_offset("Dogs") == 2084071
    assert wn.first_offset("geese") == 1855672


def test_real_wordnet_matches_nltk(tmp_path):
    """dcdb's reader against NLTK's WordNetCorpusReader on the real WordNet 3.0 database: the first
    synset offset of a few thousand lemmas and inflected forms (every part of speech)."""
    nltk = pytest.importorskip("nltk")
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    from dcdb.filters.wordnet import DEBIAN_DICT, WordNet

    src = _real_wordnet()
    # NLTK also opens `lexnames` and `index.sense`, which Debian does not ship; offsets do not use them
    d = tmp_path / "nltk_data" / "corpora" / "wordnet"
    d.mkdir(parents=True)
    for f in DEBIAN_DICT.iterdir():
        shutil.copyfile(f, d / f.name)  # NLTK's path checks refuse symlinks out of its data path
    (d / "lexnames").write_text("".join(f"{i:02d}\tlex{i}\t0\n" for i in range(64)))
    (d / "index.sense").write_text("")
    nltk.data.path.insert(0, str(tmp_path / "nltk_data"))
    try:
        _compare_with_nltk(nltk, WordNetCorpusReader, WordNet(src, iterate=False), DEBIAN_DICT)
    finally:
        nltk.data.path.remove(str(tmp_path / "nltk_data"))


def _compare_with_nltk(nltk, reader_class, mine, dict_dir):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reader_class(nltk.data.find("corpora/wordnet"), None)
    # ``mine`` reads with iterate=False: NLTK >= 3.8.2 applies one morphy rule, as that does
    words = []
    for pos in ("noun", "verb", "adj", "adv"):
        lemmas = [line.split(" ", 1)[0] for line in (dict_dir / f"index.{pos}").read_text().splitlines()
                  if line and not line.startswith(" ")]
        words += lemmas[::97]
    words += [w + suffix for w in words[::3] for suffix in ("s", "es", "ing", "ed", "er", "est")]
    words += [w.capitalize() for w in words[::5]] + ["mice", "geese", "children", "ran", "better", "x", ""]
    try:
        wrong = []
        for w in words:
            s = ref.synsets(w)
            if mine.first_offset(w) != (s[0].offset() if s else -1):
                wrong.append(w)
        assert len(words) > 2000
        assert not wrong, wrong[:20]
    finally:
        for f in ref._data_file_map.values():
            f.close()


# ------------------------------------------------------------------------------ image based


def test_fasttext_tokenize_rules():
    from dcdb.filters.tokens import EOS, fasttext_token_count, fasttext_tokenize

    cases = {
        "hello": ["hello"], "hello world": ["hello", "world"], "hello\n": ["hello", EOS],
        "\n\n": [EOS, EOS], "a\r\nb": ["a", EOS, "b"], " \t\x0b\x0cx\x00y ": ["x", "y"],
        "a\u00a0b": ["a\u00a0b"], "a\u3000b": ["a\u3000b"], "": [],
    }
    for text, toks in cases.items():
        assert fasttext_tokenize(text) == toks, repr(text)
        assert fasttext_token_count(text) == len(toks)
    try:
        import fasttext
    except ImportError:
        return
    if hasattr(fasttext, "tokenize"):  # the full fastText package: check against it
        for text in cases:
            assert fasttext.tokenize(text) == fasttext_tokenize(text), repr(text)


def test_ft_tokens_macro_matches_python(tmp_path):
    from dcdb.engine import connect
    from dcdb.filters.tokens import fasttext_token_count

    texts = ["hello", "hello world", "hello\n", "\n", "a\r\nb", " x\x0by ", "a\u00a0b", "ünï cödé\tz", "",
             "x\x00y"]
    pool = build_pool(tmp_path, [{"text": t} for t in texts])
    got = connect(pool).sql("SELECT ft_tokens(text) FROM pool").fetchall()
    assert [g[0] for g in got] == [fasttext_token_count(t) for t in texts]


def test_ft_tokens_gt_matches_the_count(tmp_path):
    from dcdb.engine import connect
    from dcdb.filters.tokens import fasttext_token_count

    rng = np.random.default_rng(5)
    alphabet = ["a", "b", "ü", " ", "\n", "\r", "\t", "\x0b", "\x0c", "\x00", "\u00a0", "\u3000"]
    texts = ["", "a", "ab", "a b", "\n", "\n\n", "a\n", "\na", " \n ", "\r\n", "\x00a\x00", "a\u00a0b"]
    texts += ["".join(rng.choice(alphabet, size=int(rng.integers(0, 7)))) for _ in range(400)]
    pool = build_pool(tmp_path, [{"text": t} for t in texts])
    con = connect(pool)
    for n in (0, 1, 2, 3):
        got = [r[0] for r in con.sql("SELECT ft_tokens_gt(text, $n) FROM pool", params={"n": n}).fetchall()]
        assert got == [fasttext_token_count(t) > n for t in texts], n


def image_assets(tmp_path, rng):
    """Centroids where dot product and cosine disagree, two identical centroids (tie), and
    ImageNet embeddings (.pt, DataComp's {"image_features": tensor}) near a subset."""
    import torch

    base = unit(rng, 6, D14)
    cents = np.concatenate([base * np.array([[1.0], [3.0], [1.0], [1.0], [1.0], [1.0]], np.float32), base[2:3]])
    # a pickled numpy array, written as DataComp's image_based_clustering.py writes it
    torch.save(cents.astype(np.float32), tmp_path / "cents.pt", pickle_protocol=4)
    feats = np.concatenate([base[[0, 2]] + 0.01 * unit(rng, 2, D14)])
    torch.save({"image_features": torch.from_numpy(feats.astype(np.float16))}, tmp_path / "in1k_0.pt")
    torch.save({"image_features": torch.from_numpy(base[[2]].astype(np.float16))}, tmp_path / "in1k_1.pt")
    return cents, tmp_path / "cents.pt", str(tmp_path / "in1k_*.pt")


def test_image_based_details(tmp_path):
    rng = np.random.default_rng(1)
    cents, cpath, glob = image_assets(tmp_path, rng)
    base = cents[[0, 1, 2, 3, 4, 5]] / np.array([[1], [3], [1], [1], [1], [1]], np.float32)
    v0 = base[0] + 0.6 * base[1]  # cosine prefers 0, dot product prefers the scaled centroid 1
    v0 /= np.linalg.norm(v0)
    vecs = np.stack([v0, base[0], base[2], base[3], base[2], base[2], base[2], base[2]])
    texts = ["a dog photo", "a dog photo", "a dog photo", "a dog photo", "hello\n", "hello", "a\u00a0b c",
             "ab\nc"]
    pool = build_pool(tmp_path, [{"text": t} for t in texts], lang=["en"] * 8, l14_img=vecs)
    got = set(hexes(run(pool, "image_based", centroids=cpath, imagenet_embeddings=glob)))
    # targets: centroids 0 and 2 (the tie between 2 and its copy 6 goes to 2); row 0 -> 1 (dot)
    assert got == {hexuid(2), hexuid(3), hexuid(5)}
    from dcdb.filters.centroids import assign

    assert assign(vecs, cents).tolist()[:4] == [1, 0, 2, 3]
    assert assign(base[[2]], cents, centroid_block=3).tolist() == [2]  # first max across blocks


def test_intersect_applies_global_threshold_first(tmp_path):
    rng = np.random.default_rng(2)
    cents, cpath, glob = image_assets(tmp_path, rng)
    vecs = np.repeat(cents[[0]] / np.linalg.norm(cents[0]), 6, axis=0)
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, math.nan]
    texts = ["a dog photo", "hello", "a dog photo", "a dog photo", "a dog photo", "a dog photo"]
    pool = build_pool(tmp_path, [{"text": t, "l14": s} for t, s in zip(texts, scores, strict=True)],
                      lang=["en"] * 6, l14_img=vecs)
    # fraction 0.5 over all 6 rows: index 3 of the sort -> 0.6; of rows >= 0.6, row 2 fails the caption
    got = hexes(run(pool, "image_based_intersect_clip_score", arch="l14", fraction=0.5, centroids=cpath,
                    imagenet_embeddings=glob))
    assert got == [hexuid(1), hexuid(3), hexuid(4)]


# ------------------------------------------------------------------- centroid assignment


def tie_assets(rng, n=90):
    """Vectors (float16-exact) and centroids with deliberate ties: a duplicate centroid (5 = 2), two
    distinct centroids with exactly equal dot products (8 = 1 with values 0 and 1 swapped, rows with
    x0 == x1), and near-ties below float32 resolution (7 = 3 but one ulp larger in value 0: the exact
    winner is 7 when x0 > 0, 3 when x0 < 0; both dot products are ~250, where a float32 ulp is 3e-5
    and the gap 1e-8). Values are multiples of 1/64 so the float64 reference is exact on the ties."""
    cents = (rng.integers(-64, 65, size=(9, D14)) / 64).astype(np.float32)
    cents[5] = cents[2]
    cents[8] = cents[1]
    cents[8, [0, 1]] = cents[1, [1, 0]]
    cents[3, 0] = 0.5
    cents[7] = cents[3]
    cents[7, 0] = np.nextafter(np.float32(0.5), np.float32(1))
    noise = rng.integers(-1, 2, size=(n, D14)) / 64
    vecs = np.empty((n, D14), np.float32)
    for i in range(n):
        kind = i % 5
        vecs[i] = noise[i] + (cents[[2, 1, 3, 3, 0][kind]] if kind < 4 else rng.integers(-8, 9, D14) / 8)
        if kind == 1:
            vecs[i, 1] = vecs[i, 0]
        if kind in (2, 3):
            vecs[i, 0] = 0.5 if kind == 2 else -0.5
    assert np.array_equal(vecs.astype(np.float16).astype(np.float32), vecs)
    return vecs, cents


def float64_argmax(vecs, cents):
    """numpy's float64 argmax (first maximum), the reference."""
    return np.argmax(vecs.astype(np.float64) @ cents.astype(np.float64).T, axis=1)


def test_assignment_is_the_float64_argmax_on_ties_and_near_ties_in_any_blocking():
    from dcdb.filters.centroids import assign

    rng = np.random.default_rng(11)
    vecs, cents = tie_assets(rng)
    want = float64_argmax(vecs, cents)
    assert set(want[0::5]) == {2} and set(want[1::5]) == {1}  # exact ties: the first centroid
    assert set(want[2::5]) == {7} and set(want[3::5]) == {3}  # near-ties: the exact winner
    for row_block, centroid_block in [(4096, 8192), (1, 8192), (7, 3), (64, 1), (13, 5)]:
        got = assign(vecs, cents, row_block=row_block, centroid_block=centroid_block)
        assert got.tolist() == want.tolist(), (row_block, centroid_block)
    for rows in (np.arange(2, 90, 5), np.arange(89, -1, -1)):  # any subset, any order
        assert assign(vecs[rows], cents).tolist() == want[rows].tolist()
    # random data, many centroids, a few blocks
    big = rng.normal(size=(300, D14)).astype(np.float16).astype(np.float32)
    many = rng.normal(size=(2500, D14)).astype(np.float32)
    got = assign(big, many, row_block=128, centroid_block=1000)
    assert got.tolist() == float64_argmax(big, many).tolist()


def test_assignment_in_a_query_equals_the_stored_column(tmp_path):
    """nearest_centroid in SQL (DuckDB hands it chunks of the rows that pass the WHERE), the
    derived column of `dcdb annotate centroids` and image_based agree with the float64 argmax."""
    from dcdb.annotate import annotate
    from dcdb.engine import connect

    rng = np.random.default_rng(12)
    vecs, cents = tie_assets(rng)
    np.save(tmp_path / "cents.npy", cents)
    np.save(tmp_path / "in1k.npy", vecs[[2, 1]] + 1 / 64)  # targets: centroids 7 and 1
    want = float64_argmax(vecs, cents)
    texts = ["a dog photo" if i % 3 else "hi" for i in range(len(vecs))]
    pool = build_pool(tmp_path, [{"text": t} for t in texts], lang=["en"] * len(vecs), l14_img=vecs, shards=2)
    c = str(tmp_path / "cents.npy")
    con = connect(pool)
    got = [r[0] for r in con.execute("SELECT nearest_centroid(l14_img, $c) FROM pool", {"c": c}).fetchall()]
    assert got == want.tolist()
    got = con.execute("SELECT uid, assigned_centroid FROM baseline_pool(centroids := $c) "
                      "WHERE length(text) > 5", {"c": c}).fetchall()
    assert got == [(hexuid(i + 1), int(want[i])) for i in range(len(vecs)) if i % 3]
    before = run(pool, "image_based", centroids=c, imagenet_embeddings=tmp_path / "in1k.npy")
    assert hexes(before) == [hexuid(i + 1) for i in range(len(vecs)) if i % 3 and want[i] in (7, 1)]
    annotate(pool, "centroids", {"centroids": c, "imagenet_embeddings": str(tmp_path / "in1k.npy")})
    pool = open_pool(pool.path)
    stored = [r[0] for r in connect(pool).execute("SELECT centroid_id FROM pool").fetchall()]
    assert stored == want.tolist()
    after = run(pool, "image_based", centroids=c, imagenet_embeddings=tmp_path / "in1k.npy")
    assert np.array_equal(after, before)


def test_a_stored_float32_assignment_is_not_used(tmp_path):
    """A centroid column stored by an older dcdb (float32 argmax) may differ on near-ties: refused."""
    import json

    from dcdb.annotate import annotate

    rng = np.random.default_rng(13)
    vecs, cents = tie_assets(rng, n=10)
    np.save(tmp_path / "cents.npy", cents)
    pool = build_pool(tmp_path, [{"text": "a dog photo"}] * 10, lang=["en"] * 10, l14_img=vecs)
    annotate(pool, "centroids", {"centroids": str(tmp_path / "cents.npy")})
    meta = pool.path / "derived" / "centroids" / "_group.json"
    info = json.loads(meta.read_text())
    meta.write_text(json.dumps({**info, "assignment": "argmax of float32 dot product, first maximum"}))
    with pytest.raises(DcdbError, match="computed by an older dcdb") as exc:
        run(open_pool(pool.path), "image_based", centroids=tmp_path / "cents.npy",
            imagenet_embeddings=tmp_path / "cents.npy")
    assert "--force" in exc.value.hint


def test_the_assignment_runs_once_per_row_that_needs_it(tmp_path):
    """A filter naming assigned_centroid twice assigns each row once (DuckDB would copy a
    deterministic function into the filter it pushes down), and the intersect baseline assigns
    only the rows above the score threshold (the cut is a constant DuckDB filters the scan with)."""
    from dcdb.engine import connect
    from dcdb.filters import centroids as C

    rng = np.random.default_rng(14)
    vecs, cents = tie_assets(rng, n=40)
    np.save(tmp_path / "cents.npy", cents)
    scores = [0.5 if i < 10 else 0.1 for i in range(40)]
    pool = build_pool(tmp_path, [{"text": "a dog photo", "l14": s} for s in scores], lang=["en"] * 40,
                      l14_img=vecs)
    c = str(tmp_path / "cents.npy")
    want = float64_argmax(vecs, cents)
    before = C.rows_assigned
    got = connect(pool).execute("SELECT uid FROM baseline_pool(centroids := $c) WHERE assigned_centroid <> 0 "
                                "AND assigned_centroid % 2 = 1", {"c": c}).fetchall()
    assert C.rows_assigned - before == 40
    assert [r[0] for r in got] == [hexuid(i + 1) for i in range(40) if want[i] % 2 == 1]
    before = C.rows_assigned
    got = run(pool, "image_based_intersect_clip_score", arch="l14", fraction=0.2, centroids=c,
              imagenet_embeddings=c)
    assert C.rows_assigned - before == len(cents) + 10  # the targets, then the 10 rows above the cut
    targets = set(float64_argmax(cents, cents).tolist())
    assert hexes(got) == [hexuid(i + 1) for i in range(10) if want[i] in targets]


@pytest.mark.parametrize(("env", "code", "expected"), [
    ({}, "", "16"),  # nothing set: a short spin
    ({"OPENBLAS_THREAD_TIMEOUT": "25"}, "", "25"),  # the user's choice stays
    ({}, "import numpy; ", None),  # too late once numpy (its OpenBLAS) is loaded: leave it
])
def test_short_blas_spin_only_before_numpy_and_never_over_the_user(env, code, expected):
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    prog = (f"{code}import os; from dcdb.openmp import prefer_short_blas_spin; prefer_short_blas_spin(); "
            "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))")
    out = subprocess.run([sys.executable, "-c", prog], env={**base, **env}, check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == str(expected)
    prog = ("import os, sys; from dcdb.cli import main\ntry:\n    main(['filters'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'), file=sys.stderr)")
    err = subprocess.run([sys.executable, "-c", prog], env={**base, **env}, check=True, capture_output=True,
                         text=True).stderr.strip().splitlines()[-1]
    assert err == env.get("OPENBLAS_THREAD_TIMEOUT", "16")  # every dcdb command, before numpy loads


def test_blas_threads_lowers_the_limit_inside_the_block_only():
    import threading

    from dcdb.openmp import _openblas_threads_api, blas_threads

    api = _openblas_threads_api()
    if api is None:
        pytest.skip("numpy's BLAS is not an OpenBLAS with openblas_set_num_threads_local (>= 0.3.27)")
    current = api[0]

    start = current()
    with blas_threads(1) as limited:
        assert limited and current() == 1
        with blas_threads(start + 7):
            assert current() == 1  # never raised
    assert current() == start
    with blas_threads(None) as limited:
        assert not limited and current() == start

    def work(n):
        for _ in range(200):
            with blas_threads(n):
                pass

    threads = [threading.Thread(target=work, args=(n,)) for n in (1, 1, 2, start + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert current() == start  # concurrent blocks never leave a lowered limit behind


# ------------------------------------------------------------- set identity with DataComp


@pytest.fixture(scope="module")
def synth_world(tmp_path_factory):
    """A synthetic pool with real language ids, a WordNet stand-in over its vocabulary, assets."""
    import torch

    from dcdb.annotate import annotate
    from dcdb.filters import wordnet
    from dcdb.ingest.pool import ingest
    from dcdb.demo.synth import synth_pool

    root = tmp_path_factory.mktemp("synthworld")
    synth_pool(root / "src", rows=900, shards=3, seed=5, jobs=1)
    ingest(root / "src", root / "pool", jobs=1)
    pool = open_pool(root / "pool")
    annotate(pool, "lang", jobs=1)
    annotate(pool, "lang_cld3", jobs=1)
    df = pd.concat([pd.read_parquet(f) for f in sorted((root / "src").glob("*.parquet"))], ignore_index=True)
    vocab = sorted({w.lower() for t in df.text for w in t.split() if re.fullmatch(r"[a-z]+", w.lower())})
    entries = {w: [("nvar"[i % 4], 1000 + 100 * i)] for i, w in enumerate(vocab) if not w.endswith("s")}
    wn_dir = wordnet.write_dict(root / "wn", entries, exceptions={"n": {"mice": ["mouse"]}})
    offsets = [1000 + 100 * i for i in range(0, len(vocab), 3)]
    (root / "wnids.txt").write_text("".join(f"n{o:08d}\n" for o in offsets))
    rng = np.random.default_rng(3)
    emb = np.concatenate([np.load(f)["l14_img"] for f in sorted((root / "src").glob("*.npz"))])
    cents = (emb[rng.choice(len(emb), 40, replace=False)].astype(np.float32)
             * rng.uniform(0.5, 2.0, size=(40, 1)).astype(np.float32))
    np.save(root / "cents.npy", cents)
    in1k = emb[rng.choice(len(emb), 30, replace=False)].astype(np.float32) + 0.05 * unit(rng, 30, D14)
    torch.save({"image_features": torch.from_numpy(in1k[:15])}, root / "in1k_0.pt")
    torch.save({"image_features": torch.from_numpy(in1k[15:])}, root / "in1k_1.pt")
    # the pool is stored in uid order; its language ids back in source order (source_shard, source_row)
    where = pd.concat([pd.read_parquet(f, columns=["source_shard", "source_row"]) for f in pool.metadata_files()])
    order = np.lexsort((where.source_row.to_numpy(), where.source_shard.to_numpy()))
    lang = pd.concat([pd.read_parquet(f) for f in sorted((root / "pool/derived/lang").glob("*.parquet"))]).lang
    cld3 = pd.concat([pd.read_parquet(f) for f in sorted((root / "pool/derived/lang_cld3").glob("*.parquet"))])
    return {"root": root, "pool": pool, "df": df, "emb": emb, "lang": lang.to_numpy()[order],
            "cld3": cld3.lang_cld3.to_numpy()[order], "wn_dir": wn_dir, "cents": cents, "in1k": in1k}


def ref_clip_mask(df, arch, threshold=None, fraction=None):
    key = "clip_l14_similarity_score" if arch == "l14" else "clip_b32_similarity_score"
    if threshold is None:
        n = int(len(df) * fraction)
        threshold = -np.sort(-df[key].values)[n]
    return (df[key] >= threshold).to_numpy()


def ref_caption_mask(df, lang):
    from dcdb.filters.tokens import fasttext_token_count

    words = df.text.apply(fasttext_token_count)
    return (lang == "en") & (words > 1).to_numpy() & (df.text.apply(len) > 5).to_numpy()


def ref_image_mask(world, lang, extra=None):
    import torch

    df = world["df"]
    cents = torch.from_numpy(world["cents"])
    target = torch.unique(torch.argmax(torch.einsum("ik,jk->ij", torch.from_numpy(world["in1k"]).float(), cents), 1))
    mask = ref_caption_mask(df, lang) if extra is None else extra.copy()
    if extra is not None:
        mask &= ref_caption_mask(df, lang)
    ids = torch.argmax(torch.einsum("ik,jk->ij", torch.from_numpy(world["emb"]).float(), cents), 1).numpy()
    return mask & np.isin(ids, target.numpy())


def test_every_baseline_matches_datacomp_reference(synth_world, monkeypatch):
    from dcdb.filters.wordnet import WordNet, locate

    w = synth_world
    df, pool, root, lang = w["df"], w["pool"], w["root"], w["lang"]
    monkeypatch.setenv("DCDB_WORDNET", str(w["wn_dir"]))
    wn = WordNet(locate(w["wn_dir"]))
    entity = [int(x.strip()[1:]) for x in (root / "wnids.txt").read_text().splitlines()]

    def text_entity(text):  # DataComp's does_contain_text_entity with wordnet.synsets(w)[0].offset()
        return any(wn.first_offset(t) in entity for t in text.split())

    words = df.text.apply(lambda x: len(x.split()))
    chars = df.text.apply(len)
    mn = np.minimum(df.original_width, df.original_height)
    mx = np.maximum(df.original_width, df.original_height)
    basic = (lang == "en") & ((words > 2) & (chars > 5)).to_numpy() & ((mn >= 200) & (mx / mn <= 3.0)).to_numpy()
    clip = ref_clip_mask(df, "l14", fraction=0.3)
    glob = str(root / "in1k_*.pt")
    cases = [
        ("no_filter", {}, np.ones(len(df), bool)),
        ("basic_filter", {}, basic),
        ("clip_score", {"arch": "l14", "fraction": 0.3}, clip),
        ("clip_score", {"arch": "b32", "threshold": 0.25}, ref_clip_mask(df, "b32", threshold=0.25)),
        ("clip_score", {"arch": "b32", "fraction": 0.1}, ref_clip_mask(df, "b32", fraction=0.1)),
        ("laion2b", {}, (w["cld3"] == "en") & (df.clip_b32_similarity_score >= 0.28).to_numpy()),
        ("text_based", {"wordnet_ids": root / "wnids.txt"}, (lang == "en") & df.text.apply(text_entity).to_numpy()),
        ("image_based", {"centroids": root / "cents.npy", "imagenet_embeddings": glob}, ref_image_mask(w, lang)),
        ("image_based_intersect_clip_score", {"arch": "l14", "fraction": 0.3, "centroids": root / "cents.npy",
                                              "imagenet_embeddings": glob}, ref_image_mask(w, lang, clip)),
    ]
    for name, params, mask in cases:
        got = run(pool, name, **params)
        want = datacomp_uids(df, mask)
        assert np.array_equal(got, want), f"{name} {params}: {len(got)} vs {len(want)}"
        assert 0 < len(got) < len(df) or name == "no_filter", (name, len(got))


def test_derived_columns_give_the_same_sets(synth_world, monkeypatch):
    """wordnet and centroids annotations change speed, not results."""
    from dcdb.annotate import annotate

    w = synth_world
    root = w["root"]
    monkeypatch.setenv("DCDB_WORDNET", str(w["wn_dir"]))
    glob = str(root / "in1k_*.pt")
    params = {"centroids": root / "cents.npy", "imagenet_embeddings": glob}
    before_text = run(w["pool"], "text_based", wordnet_ids=root / "wnids.txt")
    before_img = run(w["pool"], "image_based", **params)
    annotate(w["pool"], "wordnet", force=True)
    annotate(w["pool"], "centroids", {"centroids": str(root / "cents.npy"), "imagenet_embeddings": glob},
             force=True)
    pool = open_pool(root / "pool")
    assert np.array_equal(run(pool, "text_based", wordnet_ids=root / "wnids.txt"), before_text)
    assert np.array_equal(run(pool, "image_based", **params), before_img)


# ---------------------------------------------------------------------------------- bad input


@pytest.fixture
def small_image_pool(tmp_path):
    rng = np.random.default_rng(4)
    pool = build_pool(tmp_path, [{"text": "a dog photo"}] * 3, lang=["en"] * 3, l14_img=unit(rng, 3, D14))
    return pool


def expect_error(pool, name, match, **params):
    with pytest.raises(DcdbError, match=match):
        run(pool, name, **params)


def test_bad_clip_parameters(tmp_path):
    pool, _ = scores_pool(tmp_path, [0.1, 0.2, 0.3])
    for f in (0, -0.1, 1.5):
        expect_error(pool, "clip_score", r"fraction must be in \(0, 1\]", arch="l14", fraction=f)
    expect_error(pool, "clip_score", "unknown arch 'h14'", arch="h14", threshold=0.3)
    expect_error(pool, "clip_score", "give -p fraction F or -p threshold T", arch="l14")
    expect_error(pool, "clip_score", "not both", arch="l14", fraction=0.3, threshold=0.2)


def test_missing_language_column_says_how_to_make_it(tmp_path):
    pool = build_pool(tmp_path, [{"text": "a b c d"}])
    expect_error(pool, "basic_filter", r"no language column lang.*dcdb annotate --pool .* lang")
    expect_error(pool, "laion2b", r"no language column lang_cld3.*lang_cld3")


def test_bad_assets_name_the_parameter(tmp_path, small_image_pool, wordnet_dir):
    import torch

    pool = small_image_pool
    _, cpath, glob = image_assets(tmp_path, np.random.default_rng(5))
    np.save(tmp_path / "flat.npy", np.zeros(768, np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((4, 768), np.int64))
    np.save(tmp_path / "c512.npy", np.ones((4, 512), np.float32))
    torch.save({"features": torch.zeros(2, 768)}, tmp_path / "wrongkey.pt")
    ok = {"centroids": cpath, "imagenet_embeddings": glob}
    cases = [
        ({"centroids": tmp_path / "missing.pt"}, r"-p centroids: file .*missing.pt' does not exist"),
        ({"centroids": tmp_path / "flat.npy"}, r"-p centroids: .*shape \(768,\)"),
        ({"centroids": tmp_path / "ints.npy"}, r"-p centroids: .*dtype int64"),
        ({"centroids": tmp_path / "c512.npy"}, r"-p centroids: .*512-d vectors, the pool's l14_img is 768-d"),
        ({"imagenet_embeddings": str(tmp_path / "nothing_*.pt")}, r"-p imagenet_embeddings: no file matches"),
        ({"imagenet_embeddings": str(tmp_path / "wrongkey.pt")}, r"-p imagenet_embeddings: .*image_features"),
    ]
    for change, match in cases:
        expect_error(pool, "image_based", match, **{**ok, **change})
    (tmp_path / "bad_ids.txt").write_text("n01440764\nfish\n")
    expect_error(pool, "text_based", r"-p wordnet_ids: line 2 .*'fish'", wordnet_ids=tmp_path / "bad_ids.txt")
    expect_error(pool, "text_based", r"-p wordnet_ids: file .* does not exist", wordnet_ids=tmp_path / "no.txt")


def test_embedding_dim_mismatch_between_assets(tmp_path, small_image_pool):
    _, cpath, _ = image_assets(tmp_path, np.random.default_rng(6))
    np.save(tmp_path / "in512.npy", np.ones((3, 512), np.float32))
    expect_error(small_image_pool, "image_based", r"-p imagenet_embeddings: .*512-d",
                 centroids=cpath, imagenet_embeddings=tmp_path / "in512.npy")


class _Evil:
    """Unpickling it would create the file ``marker`` (os.system with touch)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_untrusted_pickles_are_refused(tmp_path, protocol, capfd):
    import pickle

    import torch

    from dcdb.errors import AssetError
    from dcdb.filters.assets import clear_cache, load_centroids, load_embeddings

    marker = tmp_path / "pwned"
    torch.save({"x": _Evil(marker)}, tmp_path / "evil.pt", pickle_protocol=protocol)
    torch.save(_Evil(marker), tmp_path / "evil_top.pt", pickle_protocol=protocol)
    torch.save({"image_features": torch.zeros(2, 4), "y": _Evil(marker)}, tmp_path / "evil_in1k.pt",
               pickle_protocol=protocol)
    with open(tmp_path / "evil_raw.pt", "wb") as f:  # a bare pickle, not a torch.save archive
        pickle.dump(_Evil(marker), f, protocol=protocol)
    clear_cache()
    for name in ("evil.pt", "evil_top.pt", "evil_raw.pt"):
        with pytest.raises(AssetError, match="DCDB_TRUST_ASSETS"):
            load_centroids(tmp_path / name)
    with pytest.raises(AssetError, match="posix.system|os.system|DCDB_TRUST_ASSETS"):
        load_embeddings(str(tmp_path / "evil_in1k.pt"))
    assert not marker.exists()  # nothing was executed
    out, err = capfd.readouterr()
    assert "pickle protocol" not in err + out


def test_datacomp_centroid_file_loads(tmp_path, capfd):
    """DataComp's image_based_clustering.py: ``torch.save(centroids, path, pickle_protocol=4)`` with
    ``centroids`` a float32 numpy array. torch's weights-only unpickler refuses protocol 4 (and warns
    first); dcdb's allow-listed reader loads it, silently."""
    import torch

    from dcdb.filters.assets import clear_cache, load_centroids

    arr = np.random.default_rng(3).standard_normal((5, 768)).astype(np.float32)
    torch.save(arr, tmp_path / "small_centroids_l14.pt", pickle_protocol=4)
    clear_cache()
    got = load_centroids(tmp_path / "small_centroids_l14.pt", dim=768)
    assert got.dtype == np.float32 and np.array_equal(got, arr)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@pytest.mark.parametrize("protocol", [2, 4])
def test_tensor_files_read_as_numpy(tmp_path, protocol):
    """Tensors come back as the arrays torch would give: dtype, shape, strides, offsets."""
    import torch

    from dcdb.filters.assets import read_torch_zip

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    tensors = {
        "f32": base, "f16": base.half(), "f64": base.double(), "i64": torch.arange(12).reshape(3, 4),
        "bool": base > 0, "transposed": base.t(), "slice": base[2:5, 1::3], "empty": torch.zeros(0, 768),
        "scalar": torch.tensor(3.5),
    }
    torch.save({"image_features": tensors["f16"], "all": tensors, "list": [base[0], np.ones(3)]},
               tmp_path / "t.pt", pickle_protocol=protocol)
    got = read_torch_zip(tmp_path / "t.pt")
    for name, t in tensors.items():
        want = t.numpy()
        assert got["all"][name].dtype == want.dtype and np.array_equal(got["all"][name], want), name
    assert np.array_equal(got["image_features"], tensors["f16"].numpy())
    assert np.array_equal(got["list"][0], base[0].numpy()) and np.array_equal(got["list"][1], np.ones(3))


def test_tensor_reaching_past_its_storage_is_refused(tmp_path):
    """A crafted file whose tensor strides point past the storage bytes (a memory read) is refused."""
    import io
    import zipfile

    import torch

    from dcdb.errors import AssetError
    from dcdb.filters.assets import clear_cache, load_centroids

    buf = io.BytesIO()
    torch.save(torch.zeros(2, 3).as_strided((2, 3), (3, 1)), buf, pickle_protocol=2)
    zin = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(tmp_path / "bad.pt", "w") as out:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):  # stride (3, 1) -> (300, 1): BININT1 3 -> BININT2 300
                assert data.count(b"K\x03K\x01\x86") == 1
                data = data.replace(b"K\x03K\x01\x86", b"M,\x01K\x01\x86")
            out.writestr(info, data)
    clear_cache()
    with pytest.raises(AssetError, match="reaches past its storage"):
        load_centroids(tmp_path / "bad.pt")


def test_datacomp_numpy1_centroid_pickle_loads(tmp_path):
    """DataComp's centroid files were pickled under numpy 1.x (numpy.core.multiarray)."""
    import io
    import zipfile

    import torch

    from dcdb.filters.assets import clear_cache, load_centroids

    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    buf = io.BytesIO()
    torch.save(arr, buf)
    zin = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = zipfile.ZipFile(tmp_path / "old.pt", "w")
    for info in zin.infolist():
        data = zin.read(info.filename)
        if info.filename.endswith("data.pkl"):
            data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            assert b"numpy.core.multiarray" in data
        out.writestr(info, data)
    out.close()
    clear_cache()
    assert np.array_equal(load_centroids(tmp_path / "old.pt"), arr)
