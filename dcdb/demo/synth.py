"""Random but valid DataComp-format metadata folders, for tests and benchmarks.

``synth_pool(out, rows=..., shards=...)`` writes, per shard, ``%08d.parquet`` with DataComp's nine
metadata columns and (unless ``embeddings=False``) a row-aligned ``%08d.npz`` with the four CLIP
embedding keys (DESIGN §3)::

    uid                          32 lowercase hex (128 random bits)
    url                          https://<domain>/<dir>/<hex><ext>
    text                         multilingual word salad: mostly English, some German, French,
                                 Spanish, Russian, Japanese, Chinese and junk; a few empty or
                                 one-word captions and a few with newlines
    original_width/_height       int64; mostly ordinary photos, a few tiny ones and a few with an
                                 extreme aspect ratio
    sha256                       64 lowercase hex
    clip_b32/l14_similarity_score  float32; the plain cosine of the shard's img/txt pair, computed in
                                 float32 from the stored (rounded) vectors; ``nan_fraction`` NaN
    face_bboxes                  list of [x1, y1, x2, y2] (relative); most rows have none

    npz: b32_img, b32_txt (512-d), l14_img, l14_txt (768-d), unit norm, in ``dtype``

Every column is drawn with vectorised numpy / pyarrow compute (no Python per row), shard by shard,
so 12.8M metadata rows take about a minute and a shard's memory is all that is ever held.

Determinism: each shard draws from its own generator seeded by ``(seed, shard index, stream)``;
metadata and embeddings use separate streams, so the same ``seed`` gives the same uids, captions
and sizes with or without embeddings (the scores of a metadata-only pool are the target cosines the
embeddings would have been drawn to). The same arguments give byte-identical files: parquet is
written with fixed options and the npz zip members carry a fixed timestamp.

Embeddings: each row has a concept (one of ``N_CONCEPTS``) shared by both models; an image vector
is its concept's centroid plus low-rank Gaussian noise, normalised; the text vector is
``c * img + sqrt(1 - c^2) * u`` with ``u`` a random unit vector orthogonal to ``img`` and ``c`` the
row's target cosine (~N(0.28, 0.06) for B/32, ~N(0.24, 0.06) for L/14, correlated between the two),
so the scores spread like DataComp's CLIP scores (about 0.1 to 0.45) and embeddings cluster.

Those default image vectors are nearly structure-free for nearest-neighbour search: mean pairwise
cosine ~0, a row's 1st and 10th nearest neighbours about equally far (cosine ~0.58 vs ~0.51 at
100k rows), so no index can find neighbours without scanning most of the pool. ``clusters=K``
(``dcdb synth pool --clusters K``; 0, the default, keeps the vectors above byte for byte) draws
the image vectors from a hierarchical model with the spread of real CLIP image embeddings
(:func:`_clustered_img`, statistics in its docstring and in benchmarks/bench_knn.py --stats):
a shared mean direction (CLIP's "cone"), K clusters of ``FINE_PER_CLUSTER`` fine concepts each
with skewed (log-normal) sizes, and per fine concept a few local directions, every direction drawn
from one power-law covariance spectrum. K about rows / 1000 gives ~60 rows per fine concept.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from dcdb import parallel
from dcdb.errors import UsageError
from dcdb.io import prepare_folder

SHARD_NAME = "{:08d}"
SHARD_FILE = re.compile(r"^\d{8}\.(parquet|npz)$")
EMBEDDING_DIMS = {"b32": 512, "l14": 768}
N_CONCEPTS = 256
NOISE_RANK = 64
PARALLEL_MIN_ROWS = 200_000  # below this, worker start-up costs more than it saves
CHUNK_ROWS = 2_048  # embedding rows generated at a time (fixed: determinism does not depend on it)
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_STREAM_META, _STREAM_EMB, _STREAM_GLOBAL = 0, 1, 2
_STREAM_CLUSTER = 3
MAX_CLUSTERS = 4096
#: The clustered model (``clusters=K``): weights of the mean direction, the cluster centre, the fine
#: concept centre and the local noise of an image vector (before normalising); power-law exponent of
#: the covariance spectrum (variance of component i ~ (i + 10) ** -SPECTRUM_POWER); fine concepts
#: per cluster, local directions per fine concept and the shared pool they are drawn from. Tuned so
#: that the statistics in :func:`_clustered_img`'s docstring land in the ranges real CLIP L/14 image
#: embeddings show.
CLUSTER_WEIGHTS = (0.6, 0.4, 0.45, 0.55)
SPECTRUM_POWER = 1.2
FINE_PER_CLUSTER = 16
LOCAL_DIRS = 16
DIRECTION_POOL = 4096

# ------------------------------------------------------------------------------- vocabulary


def _words(text: str) -> list[str]:
    """Whitespace-separated words of a literal block (keeps the vocabularies readable)."""
    return text.split()


_EN = _words(
    """
    a an the of in on at with and or to for from by near under over two three some many small large
    big little old new red blue green yellow black white brown pink orange purple gray golden wooden
    dark bright happy beautiful cute modern vintage cheap best free top sale photo picture image
    view close up portrait illustration drawing painting vector icon logo poster cartoon sketch
    print dog cat puppy kitten bird horse cow sheep pig chicken duck fish shark whale dolphin turtle
    frog snake lizard butterfly bee spider lion tiger bear wolf fox deer rabbit squirrel monkey
    elephant giraffe zebra camel owl eagle parrot penguin car truck bus bicycle motorcycle train
    airplane boat ship tractor house building church castle bridge tower street road city village
    beach mountain river lake forest garden park field desert island sky sunset cloud snow rain tree
    flower rose tulip grass leaf apple banana orange lemon strawberry pizza burger cake bread cheese
    coffee tea wine beer chair table sofa bed lamp clock door window kitchen bathroom bedroom laptop
    computer phone camera guitar piano violin drum book pen bag shoe shoes dress shirt jacket hat
    watch ring necklace man woman boy girl child baby family people team player soccer football
    basketball tennis golf wedding party christmas halloween birthday holiday summer winter spring
    autumn night morning is are was sitting standing running walking playing eating holding looking
    wearing flying swimming sleeping stock royalty high quality resolution background texture
    pattern design style art home decor interior kids men women print sticker card wallpaper
    """
)
_DE = _words(
    """
    der die das und ein eine mit auf im für von zum Hund Katze Haus Straße schöne große kleine
    Blumen Garten Auto Frau Mann Kinder Küche Möbel günstig kaufen neu Größe Geschenk Weihnachten
    Bild Foto Landschaft Berge über grün weiß schwarz Hochzeit Kleid Schuhe
    """
)
_FR = _words(
    """
    le la les un une des et avec pour sur dans chien chat maison rue belle grand petite fleurs
    jardin voiture femme homme enfants cuisine meubles pas cher nouveau taille cadeau Noël photo
    image paysage montagne été hiver café crème gâteau robe château
    """
)
_ES = _words(
    """
    el la los las un una y con para en de perro gato casa calle hermosa grande pequeña flores jardín
    coche mujer hombre niños cocina muebles barato nuevo tamaño regalo Navidad foto imagen paisaje
    montaña verano invierno año señor niña corazón
    """
)
_RU = _words(
    """
    и в на с для собака кошка дом улица красивая большой маленький цветы сад машина женщина мужчина
    дети кухня мебель купить новый фото картинка пейзаж горы зима лето
    """
)
_JA = _words(
    """
    写真 猫 犬 家 花 空 海 山 東京 かわいい 美しい 新しい 赤い 青い 車 料理
    ラーメン 寿司 桜 夏 冬 子供 女性 男性 風景 イラスト 無料
    """
)
_ZH = _words(
    """
    图片 猫 狗 房子 花 天空 大海 山 北京 可爱 美丽 新 红色 蓝色 汽车 美食
    中国 春节 夏天 冬天 孩子 女人 男人 风景 插画 免费 高清 壁纸
    """
)
_JUNK = _words(
    """
    IMG_0001 IMG_2034 DSC_4411 DSCN0921 P1010123 jpg jpeg png gif 1080p 4k HD 720 1920x1080 2014
    2019 2021 001 #1 # - | ... :: >> ** $19.99 50% www.example.com http://t.co/x @user #love
    #instagood 😀 ❤️ 🔥 ✨ ★★★★★ ™ © ® N/A null undefined untitled
    """
)

# (name, vocabulary, share of rows)
_LANGUAGES: tuple[tuple[str, list[str], float], ...] = (
    ("en", _EN, 0.55),
    ("de", _DE, 0.08),
    ("fr", _FR, 0.08),
    ("es", _ES, 0.08),
    ("ru", _RU, 0.06),
    ("ja", _JA, 0.05),
    ("zh", _ZH, 0.05),
    ("junk", _JUNK, 0.05),
)
_DOMAINS = _words(
    """
    images.example.com cdn.shopify.example i.pinimg.example img.stock.example
    upload.wikimedia.example media.tumblr.example farm4.static.flickr.example i.ebayimg.example
    photos.blogger.example cdn.news.example static.shop.example assets.example.org
    """
)
_DIRS = _words(
    """
    images uploads photos media img files wp-content/uploads/2019/05 p/large s/1600 cache
    """
)
_EXTS = _words(
    """
    .jpg .jpeg .png .webp .JPG .gif
    """
)

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


# ---------------------------------------------------------------------------------- columns


def _hex_strings(rng: np.random.Generator, n: int, nbytes: int):
    """``n`` random lowercase hex strings of ``2 * nbytes`` characters, as a pyarrow string array."""
    import pyarrow as pa

    raw = np.frombuffer(rng.bytes(n * nbytes), dtype=np.uint8).reshape(n, nbytes)
    chars = np.empty((n, 2 * nbytes), dtype=np.uint8)
    chars[:, 0::2] = _HEX[raw >> 4]
    chars[:, 1::2] = _HEX[raw & 15]
    width = 2 * nbytes
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(chars)])


def _choice_index(rng: np.random.Generator, probs: np.ndarray, n: int) -> np.ndarray:
    """Categorical draws (int32) by inverse CDF: vectorised and cheap."""
    cdf = np.cumsum(probs / probs.sum())
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1).astype(np.int32)


def _captions(rng: np.random.Generator, n: int):
    """Word-salad captions from per-language vocabularies, built with numpy + pyarrow compute."""
    import pyarrow as pa
    import pyarrow.compute as pc

    vocab = [w for _, words, _ in _LANGUAGES for w in words]
    sizes = np.array([len(words) for _, words, _ in _LANGUAGES], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    lang = _choice_index(rng, np.array([p for *_, p in _LANGUAGES]), n)

    nwords = np.clip(rng.poisson(9.0, n) + 1, 1, 40)
    u = rng.random(n)
    nwords[u < 0.05] = 1  # very short
    nwords[u < 0.01] = 0  # empty caption
    total = int(nwords.sum())

    word_lang = np.repeat(lang, nwords)
    word_idx = starts[word_lang] + (rng.random(total) * sizes[word_lang]).astype(np.int64)
    words = pa.array(vocab).take(pa.array(word_idx))
    # About one caption in twenty gets a line break after some word.
    newline = rng.random(total) < (1.0 / 200.0)
    words = pc.binary_join_element_wise(words, pa.array(np.where(newline, "\n", "")), "")
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(nwords, out=offsets[1:])
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), words), " ")


def _urls(rng: np.random.Generator, n: int):
    import pyarrow as pa
    import pyarrow.compute as pc

    domain = pa.array(_DOMAINS).take(pa.array(rng.integers(0, len(_DOMAINS), n)))
    folder = pa.array(_DIRS).take(pa.array(rng.integers(0, len(_DIRS), n)))
    ext = pa.array(_EXTS).take(pa.array(rng.integers(0, len(_EXTS), n)))
    name = _hex_strings(rng, n, 8)
    return pc.binary_join_element_wise("https://", domain, "/", folder, "/", name, ext, "")


def _sizes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Image sizes: ordinary photos, ~3% tiny (< 200 px), ~2% extreme aspect (3.5:1 to 12:1)."""
    long_side = np.exp(rng.uniform(np.log(200), np.log(4000), n))
    aspect = np.exp(np.clip(rng.normal(0.0, 0.3, n), -1.0, 1.0))
    u = rng.random(n)
    tiny = u < 0.03
    extreme = (u >= 0.03) & (u < 0.05)
    long_side[tiny] = rng.uniform(16, 199, int(tiny.sum()))
    aspect[extreme] = rng.uniform(3.5, 12.0, int(extreme.sum())) ** rng.choice(
        [-1.0, 1.0], int(extreme.sum())
    )
    width = np.where(aspect >= 1, long_side, long_side * aspect)
    height = np.where(aspect >= 1, long_side / aspect, long_side)
    return np.maximum(width.round(), 1).astype(np.int64), np.maximum(height.round(), 1).astype(np.int64)


def _face_bboxes(rng: np.random.Generator, n: int):
    """list<list<double>>: most rows empty, some with 1-5 relative [x1, y1, x2, y2] boxes."""
    import pyarrow as pa

    counts = _choice_index(rng, np.array([0.85, 0.10, 0.035, 0.01, 0.004, 0.001]), n)
    nb = int(counts.sum())
    x1 = rng.uniform(0.0, 0.85, nb)
    y1 = rng.uniform(0.0, 0.85, nb)
    w = rng.uniform(0.03, 0.3, nb)
    h = w * rng.uniform(0.9, 1.5, nb)
    boxes = np.stack([x1, y1, np.minimum(x1 + w, 1.0), np.minimum(y1 + h, 1.0)], axis=1).ravel()
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, 4 * nb + 1, 4, dtype=np.int32)), pa.array(boxes))
    outer = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=outer[1:])
    return pa.ListArray.from_arrays(pa.array(outer), inner)


def _target_scores(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Correlated target cosines for B/32 and L/14 (float64), spread like DataComp's scores."""
    quality = rng.normal(0.0, 1.0, n)
    b32 = 0.28 + 0.06 * (0.85 * quality + 0.53 * rng.normal(0.0, 1.0, n))
    l14 = 0.24 + 0.06 * (0.85 * quality + 0.53 * rng.normal(0.0, 1.0, n))
    return np.clip(b32, -0.05, 0.6), np.clip(l14, -0.05, 0.6)


# ------------------------------------------------------------------------------- embeddings


def _global_params(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per model: concept centroids (N_CONCEPTS, dim) and a noise basis (NOISE_RANK, dim)."""
    rng = np.random.default_rng([seed, 0, _STREAM_GLOBAL])
    params = {}
    for model, dim in EMBEDDING_DIMS.items():
        cent = rng.standard_normal((N_CONCEPTS, dim), dtype=np.float32)
        cent /= np.linalg.norm(cent, axis=1, keepdims=True)
        basis = rng.standard_normal((NOISE_RANK, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
        params[model] = (cent, basis)
    return params


@functools.lru_cache(maxsize=1)
def _cluster_params(seed: int, clusters: int) -> dict[str, dict[str, np.ndarray]]:
    """Per model, the clustered model's fixed parts (see :func:`_clustered_img`); computed once per
    process (the shards of one run share them; callers only read them)."""
    rng = np.random.default_rng([seed, 0, _STREAM_CLUSTER])
    params = {}
    fine = clusters * FINE_PER_CLUSTER
    for model, dim in EMBEDDING_DIMS.items():
        # a random basis: Gaussian columns are orthogonal to within ~1/sqrt(dim) (a QR would be exact
        # but costs seconds on a loaded machine)
        q = rng.standard_normal((dim, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
        sig = (np.arange(dim, dtype=np.float64) + 10.0) ** (-SPECTRUM_POWER / 2)
        sig = (sig / np.sqrt((sig**2).sum())).astype(np.float32)

        def draw(n: int) -> np.ndarray:
            return _normalise((rng.standard_normal((n, dim), dtype=np.float32) * sig) @ q.T)

        weights = rng.lognormal(0.0, 1.0, fine)
        cdf = np.cumsum(weights / weights.sum())
        cdf[-1] = 1.0
        local = (np.arange(LOCAL_DIRS, dtype=np.float64) + 1.0) ** -0.5
        params[model] = {
            "mean": draw(1)[0], "cluster": draw(clusters), "fine": draw(fine), "dirs": draw(DIRECTION_POOL),
            "fine_dirs": rng.integers(0, DIRECTION_POOL, (fine, LOCAL_DIRS)), "fine_cdf": cdf,
            "local_scale": (local / np.sqrt((local**2).sum())).astype(np.float32), "spectrum": sig, "basis": q,
        }
    return params


def _clustered_img(rng: np.random.Generator, n: int, p: dict[str, np.ndarray]) -> np.ndarray:
    """``n`` unit image vectors of the clustered model: fine concept f (log-normal sizes) of
    cluster f // FINE_PER_CLUSTER, ``a*mean + b*cluster + c*fine + d*sum_j z_j s_j dir[f, j]``
    with CLUSTER_WEIGHTS (a, b, c, d), z ~ N(0, 1), s_j ~ 1/sqrt(j), normalised.

    Matched to real CLIP image embeddings (ViT-L/14 in DataComp), measured on 100k rows with
    ``--clusters 100`` (about 60 rows per fine concept, as with rows / 1000 clusters; targets from
    the literature, no real embeddings are at hand here): mean pairwise cosine 0.36 (CLIP's "cone":
    image embeddings share a mean direction, 0.2-0.5 reported); nearest-neighbour cosine
    p10/p50/p90 0.87/0.92/0.95 and 0.85 for the 10th neighbour (web-scale pools are dense in CLIP
    space: near duplicates and many photos of one thing, with a gradient from the 1st to the 10th
    neighbour); participation ratio of the covariance ~96 of 768 dims, ~210 dims for 90% of the
    variance (a decaying spectrum, neither isotropic nor a few dims). The default model gives 0.00,
    0.55/0.58/0.63 and 0.51, 115 (nearly isotropic noise in a 320-dim span).
    """
    a, b, c, d = (np.float32(w) for w in CLUSTER_WEIGHTS)
    fine = np.searchsorted(p["fine_cdf"], rng.random(n), side="right")
    z = rng.standard_normal((n, LOCAL_DIRS), dtype=np.float32) * p["local_scale"]
    img = np.einsum("nk,nkd->nd", z, p["dirs"][p["fine_dirs"][fine]])
    img *= d
    img += a * p["mean"]
    img += b * p["cluster"][fine // FINE_PER_CLUSTER]
    img += c * p["fine"][fine]
    return _normalise(img)


def _clustered_pair(rng: np.random.Generator, cos: np.ndarray, p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(img, txt) as :func:`_pair` but with a clustered image vector; the text vector is
    ``c * img + sqrt(1 - c^2) * u``, ``u`` a random direction of the model's spectrum orthogonal to img."""
    m = len(cos)
    img = _clustered_img(rng, m, p)
    u = (rng.standard_normal((m, len(p["spectrum"])), dtype=np.float32) * p["spectrum"]) @ p["basis"].T
    return img, _text_vector(img, u, cos)


def _text_vector(img: np.ndarray, u: np.ndarray, cos: np.ndarray) -> np.ndarray:
    """The unit text vectors ``c * img + sqrt(1 - c^2) * u'``, ``u'`` the part of ``u`` orthogonal to
    ``img`` (unit rows), so each row's cosine with ``img`` is ``cos``; ``u`` is used up."""
    u -= np.einsum("ij,ij->i", u, img)[:, None] * img
    _normalise(u)
    c = cos.astype(np.float32)[:, None]
    u *= np.sqrt(np.float32(1.0) - c * c)
    u += c * img
    return _normalise(u)


def _normalise(x: np.ndarray) -> np.ndarray:
    """Scale the rows of a float32 matrix to unit L2 norm, in place."""
    x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x


def _pair(
    rng: np.random.Generator, concept: np.ndarray, cos: np.ndarray, cent: np.ndarray, basis: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """An (img, txt) float32 unit-vector pair per row whose cosine is ``cos``."""
    m = len(concept)
    scale = np.float32(1.0 / np.sqrt(NOISE_RANK))
    z = rng.standard_normal((2, m, NOISE_RANK), dtype=np.float32) * scale
    img = z[0] @ basis
    img += np.float32(0.7) * cent[concept]
    _normalise(img)
    u = z[1] @ basis
    return img, _text_vector(img, u, cos)


def pair_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise plain cosine of two stored embedding arrays, computed in float32."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    dot = np.einsum("ij,ij->i", a, b)
    norms = np.sqrt(np.einsum("ij,ij->i", a, a)) * np.sqrt(np.einsum("ij,ij->i", b, b))
    return (dot / norms).astype(np.float32)


def _embeddings(
    rng: np.random.Generator,
    targets: dict[str, np.ndarray],
    params: dict[str, tuple[np.ndarray, np.ndarray]],
    dtype: np.dtype,
    clustered: dict[str, dict[str, np.ndarray]] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Stored arrays per npz key, and the float32 pair cosine per model, in CHUNK_ROWS pieces."""
    n = len(next(iter(targets.values())))
    concept = rng.integers(0, N_CONCEPTS, n) if clustered is None else None
    arrays = {
        f"{m}_{k}": np.empty((n, d), dtype=dtype) for m, d in EMBEDDING_DIMS.items() for k in ("img", "txt")
    }
    scores = {m: np.empty(n, dtype=np.float32) for m in EMBEDDING_DIMS}
    for lo in range(0, n, CHUNK_ROWS):
        hi = min(lo + CHUNK_ROWS, n)
        for model in EMBEDDING_DIMS:
            if clustered is None:
                img, txt = _pair(rng, concept[lo:hi], targets[model][lo:hi], *params[model])
            else:
                img, txt = _clustered_pair(rng, targets[model][lo:hi], clustered[model])
            arrays[f"{model}_img"][lo:hi] = img
            arrays[f"{model}_txt"][lo:hi] = txt
            scores[model][lo:hi] = pair_cosine(arrays[f"{model}_img"][lo:hi], arrays[f"{model}_txt"][lo:hi])
    return arrays, scores


# ------------------------------------------------------------------------------------ shard


def shard_rows(rows: int, shards: int) -> list[int]:
    base, extra = divmod(rows, shards)
    return [base + (i < extra) for i in range(shards)]


def _shard_table(seed: int, index: int, n: int, dtype: np.dtype | None, params, nan_fraction: float,
                 clustered=None):
    """One shard: (pyarrow table with DataComp's columns, npz arrays or None)."""
    import pyarrow as pa

    rng = np.random.default_rng([seed, index, _STREAM_META])
    uid = _hex_strings(rng, n, 16)
    url = _urls(rng, n)
    text = _captions(rng, n)
    width, height = _sizes(rng, n)
    sha = _hex_strings(rng, n, 32)
    b32_target, l14_target = _target_scores(rng, n)
    faces = _face_bboxes(rng, n)
    nan_b32 = rng.random(n) < nan_fraction
    nan_l14 = rng.random(n) < nan_fraction

    arrays = None
    if dtype is None:
        b32 = b32_target.astype(np.float32)
        l14 = l14_target.astype(np.float32)
    else:
        emb_rng = np.random.default_rng([seed, index, _STREAM_EMB])
        arrays, scores = _embeddings(emb_rng, {"b32": b32_target, "l14": l14_target}, params, dtype, clustered)
        b32, l14 = scores["b32"], scores["l14"]
    b32[nan_b32] = np.nan
    l14[nan_l14] = np.nan
    table = pa.table(
        {
            "uid": uid,
            "url": url,
            "text": text,
            "original_width": pa.array(width),
            "original_height": pa.array(height),
            "sha256": sha,
            "clip_b32_similarity_score": pa.array(b32, pa.float32()),
            "clip_l14_similarity_score": pa.array(l14, pa.float32()),
            "face_bboxes": faces,
        }
    )
    return table, arrays


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` equivalent (uncompressed .npz) with fixed member timestamps: reproducible bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def _write_shard(out: Path, index: int, table, arrays) -> None:
    import pyarrow.parquet as pq

    from dcdb.io import atomic_path

    stem = SHARD_NAME.format(index)
    if arrays is not None:
        with atomic_path(out / f"{stem}.npz") as tmp:
            write_npz(tmp, arrays)
    with atomic_path(out / f"{stem}.parquet") as tmp:
        pq.write_table(table, tmp, compression="snappy", row_group_size=1 << 20)


# ------------------------------------------------------------------------------------ entry


def _make_shard(task: tuple[str, int, int, int, str | None, float, int]) -> int:
    """Generate and write shard ``index`` of ``(out, seed, index, n, dtype, nan_fraction, clusters)``
    (in a worker or in-process); return its bytes on disk."""
    out, seed, index, n, dtype, nan_fraction, clusters = task
    out_path = Path(out)
    np_dtype = np.dtype(dtype) if dtype else None
    params = _global_params(seed) if dtype else None
    clustered = _cluster_params(seed, clusters) if dtype and clusters else None
    table, arrays = _shard_table(seed, index, n, np_dtype, params, nan_fraction, clustered)
    _write_shard(out_path, index, table, arrays)
    exts = ("parquet", "npz") if dtype else ("parquet",)
    return sum((out_path / f"{SHARD_NAME.format(index)}.{e}").stat().st_size for e in exts)


def _default_jobs(rows: int, shards: int) -> int:
    """Worker processes worth starting: none for small pools (start-up costs ~1 s)."""
    if rows < PARALLEL_MIN_ROWS or shards < 2:
        return 1
    return max(1, min(os.cpu_count() or 1, shards))


def synth_pool(
    out: str | os.PathLike,
    *,
    rows: int,
    shards: int,
    seed: int = 0,
    dtype: str = "float16",
    embeddings: bool = True,
    force: bool = False,
    progress: bool = False,
    nan_fraction: float = 0.01,
    jobs: int | None = None,
    clusters: int = 0,
) -> dict[str, Any]:
    """Write a random but valid DataComp metadata folder ``out``; return a summary dict.

    ``rows`` are split as evenly as possible over ``shards`` files (``%08d.parquet`` and, with
    ``embeddings``, ``%08d.npz``). Deterministic in all arguments except ``jobs`` (worker
    processes; default: all cores for pools of 200k rows or more, else in-process), which changes
    only the speed. Refuses a non-empty ``out`` unless ``force`` (then shard-named files this run
    does not write are removed). ``clusters`` > 0 draws the image vectors from the clustered
    model (see the module doc); 0 keeps the default vectors. Returns ``{"rows", "shards", "path",
    "seed", "dtype", "embeddings", "bytes"}`` (and ``"clusters"`` when clustered).
    """
    from tqdm import tqdm

    if rows < 0 or shards < 1:
        raise UsageError(f"need rows >= 0 and shards >= 1, got rows={rows}, shards={shards}", hint="pass --rows N --shards K")
    if seed < 0:
        raise UsageError(f"seed must be a non-negative integer, got {seed}", hint="pass e.g. --seed 0")
    if dtype not in ("float16", "float32"):
        raise UsageError(f"embedding dtype must be float16 or float32, not {dtype!r}", hint="pass --dtype float16 or --dtype float32")
    if not 0.0 <= nan_fraction <= 1.0:
        raise UsageError(f"nan_fraction must be in [0, 1], got {nan_fraction}", hint="e.g. 0.01")
    if not 0 <= clusters <= MAX_CLUSTERS:
        raise UsageError(f"clusters must be in 0..{MAX_CLUSTERS}, got {clusters}",
                         hint="e.g. --clusters 1000 for 1M rows (about rows / 1000), or 0 for the default vectors")
    if clusters and not embeddings:
        raise UsageError("--clusters shapes the embeddings; a pool without embeddings has none",
                         hint="drop --clusters or --no-embeddings")
    out = Path(out)
    exts = ("parquet", "npz") if embeddings else ("parquet",)
    keep = {f"{SHARD_NAME.format(i)}.{e}" for i in range(shards) for e in exts}
    prepare_folder(  # with force, shard files of an earlier, larger run go: they would join this pool
        out, force=force, what="synth output folder",
        not_empty="give a new or empty folder, or pass --force to write into it",
        clear=lambda p: bool(SHARD_FILE.match(p.name)) and p.name not in keep and p.is_file(),
    )

    jobs = _default_jobs(rows, shards) if jobs is None else max(1, min(jobs, shards))
    tasks = [
        (str(out), seed, i, n, dtype if embeddings else None, nan_fraction, clusters)
        for i, n in enumerate(shard_rows(rows, shards))
    ]
    total_bytes = 0
    with tqdm(
        total=rows, unit="rows", unit_scale=True, desc="synth", file=sys.stderr, disable=not progress
    ) as bar:
        for _task, size in parallel.as_completed(_make_shard, tasks, jobs,
                                                 progress=lambda task, size: bar.update(task[3])):
            total_bytes += size
    info = {
        "rows": rows,
        "shards": shards,
        "path": str(out),
        "seed": seed,
        "dtype": dtype if embeddings else None,
        "embeddings": embeddings,
        "bytes": total_bytes,
    }
    if clusters:
        info["clusters"] = clusters
    return info
