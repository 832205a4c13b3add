"""dcdb.demo.synth: random but valid DataComp metadata folders."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dcdb.errors import OutputError
from dcdb.store import DATACOMP_COLUMNS, DATACOMP_SPACES
from dcdb.demo.synth import synth_pool
from dcdb.uids import from_arrow


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _table(folder):
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))])


def _npz(folder, key):
    return np.concatenate([np.load(p)[key] for p in sorted(folder.glob("*.npz"))])


def _cosine32(a, b):
    """Plain cosine, float32 throughout (how DataComp's scores relate to the stored vectors)."""
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    return (a * b).sum(1, dtype=np.float32) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_layout_and_summary(tmp_path):
    info = synth_pool(tmp_path / "s", rows=25, shards=3, seed=1)
    assert info["rows"] == 25 and info["shards"] == 3 and info["path"] == str(tmp_path / "s")
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == [f"{i:08d}.{e}" for i in range(3) for e in ("npz", "parquet")]
    assert [pq.read_metadata(tmp_path / "s" / f"{i:08d}.parquet").num_rows for i in range(3)] == [9, 8, 8]


def test_same_arguments_give_identical_bytes(tmp_path):
    a = synth_pool(tmp_path / "a", rows=60, shards=2, seed=5)
    b = synth_pool(tmp_path / "b", rows=60, shards=2, seed=5)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert a["bytes"] == b["bytes"]
    synth_pool(tmp_path / "c", rows=60, shards=2, seed=6)
    assert _table(tmp_path / "a").column("uid") != _table(tmp_path / "c").column("uid")


def test_worker_processes_give_identical_bytes(tmp_path):
    synth_pool(tmp_path / "a", rows=40, shards=2, seed=2, jobs=1)
    synth_pool(tmp_path / "b", rows=40, shards=2, seed=2, jobs=2)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_columns_and_values(tmp_path):
    synth_pool(tmp_path / "s", rows=3000, shards=2, seed=3, embeddings=False)
    t = _table(tmp_path / "s")
    assert tuple(t.column_names) == DATACOMP_COLUMNS
    types = {f.name: f.type for f in t.schema}
    assert types["original_width"] == pa.int64() and types["original_height"] == pa.int64()
    assert types["clip_b32_similarity_score"] == pa.float32() == types["clip_l14_similarity_score"]
    assert all(t.column(c).null_count == 0 for c in t.column_names)

    uid = from_arrow(t.column("uid"))  # validates 32 lowercase hex
    assert len(np.unique(uid)) == len(uid)
    assert pc.all(pc.match_substring_regex(t.column("sha256"), r"^[0-9a-f]{64}$")).as_py()
    assert pc.all(pc.starts_with(t.column("url"), "https://")).as_py()

    text = t.column("text").to_pylist()
    assert any("\n" in s for s in text)
    assert any(len(s) <= 5 for s in text)
    assert any(not s.isascii() for s in text)
    assert sum(s.isascii() for s in text) > len(text) / 2

    w = t.column("original_width").to_numpy()
    h = t.column("original_height").to_numpy()
    assert (w >= 1).all() and (h >= 1).all()
    assert (np.minimum(w, h) < 200).any() and (np.minimum(w, h) >= 200).mean() > 0.5
    assert (np.maximum(w, h) / np.minimum(w, h) > 3).any()

    boxes = t.column("face_bboxes").to_pylist()
    assert sum(len(b) == 0 for b in boxes) > 0.7 * len(boxes)
    flat = [box for row in boxes for box in row]
    assert flat and all(len(b) == 4 and 0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1 for b in flat)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_embeddings_are_unit_and_scores_are_pair_cosines(tmp_path, dtype):
    synth_pool(tmp_path / "s", rows=400, shards=2, seed=4, dtype=dtype, nan_fraction=0.1)
    t = _table(tmp_path / "s")
    for model in ("b32", "l14"):
        img, txt = _npz(tmp_path / "s", f"{model}_img"), _npz(tmp_path / "s", f"{model}_txt")
        for arr, key in ((img, f"{model}_img"), (txt, f"{model}_txt")):
            assert arr.dtype == np.dtype(dtype) and arr.shape == (400, DATACOMP_SPACES[key]["dim"])
            np.testing.assert_allclose(np.linalg.norm(arr.astype(np.float64), axis=1), 1.0, atol=2e-3)
        score = t.column(f"clip_{model}_similarity_score").to_numpy()
        nan = np.isnan(score)
        assert 0.04 < nan.mean() < 0.16
        np.testing.assert_allclose(score[~nan], _cosine32(img, txt)[~nan], rtol=1e-6, atol=1e-6)
        lo, hi = np.percentile(score[~nan], [5, 95])
        assert 0.1 < lo < hi < 0.45


def test_nan_fraction_zero_and_score_correlation(tmp_path):
    synth_pool(tmp_path / "s", rows=2000, shards=1, seed=8, embeddings=False, nan_fraction=0.0)
    t = _table(tmp_path / "s")
    b32 = t.column("clip_b32_similarity_score").to_numpy()
    l14 = t.column("clip_l14_similarity_score").to_numpy()
    assert not np.isnan(b32).any() and not np.isnan(l14).any()
    assert np.corrcoef(b32, l14)[0, 1] > 0.5


def test_metadata_only_matches_embedding_pool_except_scores(tmp_path):
    synth_pool(tmp_path / "e", rows=50, shards=2, seed=9)
    synth_pool(tmp_path / "m", rows=50, shards=2, seed=9, embeddings=False)
    assert not list((tmp_path / "m").glob("*.npz"))
    e, m = _table(tmp_path / "e"), _table(tmp_path / "m")
    for col in ("uid", "url", "text", "original_width", "sha256", "face_bboxes"):
        assert e.column(col).equals(m.column(col))
    se = e.column("clip_l14_similarity_score").to_numpy()
    sm = m.column("clip_l14_similarity_score").to_numpy()
    np.testing.assert_allclose(se, sm, atol=5e-3)  # target cosine vs cosine of rounded vectors


def test_refuses_non_empty_output_unless_force(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        synth_pool(out, rows=10, shards=1)
    synth_pool(tmp_path / "big", rows=30, shards=3)
    synth_pool(tmp_path / "big", rows=10, shards=1, force=True)
    assert sorted(p.name for p in (tmp_path / "big").iterdir()) == ["00000000.npz", "00000000.parquet"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        synth_pool(tmp_path / "file", rows=10, shards=1)


def test_cli_synth_pool(tmp_path):
    from dcdb.cli import cli

    res = CliRunner().invoke(
        cli, ["-q", "synth", "pool", str(tmp_path / "s"), "--rows", "20", "--shards", "2"]
    )
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "s").glob("*.npz"))) == 2
    res = CliRunner().invoke(cli, ["synth", "pool", str(tmp_path / "s"), "--rows", "20", "--no-embeddings"])
    assert res.exit_code != 0
    assert "error:" in res.stderr and "not empty" in res.stderr


def _npz_digest(folder):
    import hashlib

    h = hashlib.sha256()
    for p in sorted(folder.glob("*.npz")):
        z = np.load(p)
        for key in sorted(z.files):
            h.update(z[key].tobytes())
    return h.hexdigest()


def test_default_embeddings_unchanged_by_the_clustered_option(tmp_path):
    # the digest of the default vectors as main wrote them before --clusters existed
    synth_pool(tmp_path / "a", rows=60, shards=2, seed=5, jobs=1, clusters=0)
    assert _npz_digest(tmp_path / "a") == "cb0e15a3caafa93126759d839009bb76b94f35ec68935bb80f3cc4c16bb8c1aa"


def _spread(x):
    """Mean pairwise cosine, median cosine of the nearest and 10th nearest other row, participation
    ratio of the covariance, sum(l)^2 / sum(l^2) = trace(C)^2 / |C|_F^2 (the statistics the
    clustered model is matched on)."""
    x = x.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    mu = x.mean(0)
    sims = x @ x.T
    np.fill_diagonal(sims, -2)
    top = -np.partition(-sims, 9, axis=1)[:, :10]
    top.sort(axis=1)
    cov = np.cov((x - mu).T)
    return ((n * n * (mu @ mu) - n) / (n * (n - 1)), np.median(top[:, -1]), np.median(top[:, 0]),
            np.trace(cov) ** 2 / (cov**2).sum())


def test_clustered_embeddings_deterministic_and_clip_like(tmp_path):
    a = synth_pool(tmp_path / "a", rows=2000, shards=2, seed=3, jobs=1, clusters=2)
    synth_pool(tmp_path / "b", rows=2000, shards=2, seed=3, jobs=1, clusters=2)
    assert a["clusters"] == 2 and _files(tmp_path / "a") == _files(tmp_path / "b")
    synth_pool(tmp_path / "c", rows=60, shards=1, seed=3, jobs=1, clusters=2)
    synth_pool(tmp_path / "c2", rows=60, shards=1, seed=4, jobs=1, clusters=2)
    assert not np.array_equal(_npz(tmp_path / "c", "l14_img"), _npz(tmp_path / "c2", "l14_img"))
    synth_pool(tmp_path / "d", rows=2000, shards=2, seed=3, jobs=1)
    # metadata streams are shared with the default pool: same uids and sizes, other vectors
    assert _table(tmp_path / "a").column("uid") == _table(tmp_path / "d").column("uid")
    img, txt = _npz(tmp_path / "a", "l14_img"), _npz(tmp_path / "a", "l14_txt")
    mean_cos, nn, nn10, pr = _spread(img)
    assert 0.2 < mean_cos < 0.5  # CLIP's cone (the default vectors: ~0)
    assert 0.85 < nn < 0.97 and nn - 0.1 < nn10 < nn  # dense neighbourhoods, a gradient to the 10th
    assert 10 < pr < 200  # a decaying spectrum over 768 dims, neither isotropic nor a few dims
    d_mean, d_nn, _, _ = _spread(_npz(tmp_path / "d", "l14_img"))
    assert abs(d_mean) < 0.05 and d_nn < nn - 0.2
    # text vectors still sit at the target CLIP score from their image vector
    scores = _table(tmp_path / "a").column("clip_l14_similarity_score").to_numpy(zero_copy_only=False)
    ok = ~np.isnan(scores)
    assert np.allclose(_cosine32(img, txt)[ok], scores[ok], atol=1e-6)
    assert 0.2 < np.nanmean(scores) < 0.3


def test_clustered_option_checks(tmp_path):
    from dcdb.cli import cli
    from dcdb.errors import UsageError

    with pytest.raises(UsageError, match="no embeddings|none"):
        synth_pool(tmp_path / "m", rows=10, shards=1, embeddings=False, clusters=2)
    with pytest.raises(UsageError, match="clusters must be in"):
        synth_pool(tmp_path / "m", rows=10, shards=1, clusters=10**6)
    res = CliRunner().invoke(cli, ["-q", "synth", "pool", str(tmp_path / "s"), "--rows", "30", "--shards", "1",
                                   "--clusters", "2"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["synth", "pool", str(tmp_path / "t"), "--rows", "30", "--no-embeddings",
                                   "--clusters", "2"])
    assert res.exit_code != 0 and "error:" in res.stderr and "hint:" in res.stderr
