"""Vector functions in SQL: prompts encoded by the pool's CLIP, kNN as a table, decontamination.

Registered on every pool connection (``dcdb.connect``), next to the engine's ``cosine(a, b)`` and
``dot(a, b)`` macros (embedding columns ``FLOAT[d]`` or constant vectors) and the baselines'
``nearest_centroid(l14_img, 'centroids.npy')``:

``clip_text(prompt, model)`` -> ``FLOAT[]``
    the prompt encoded by the text tower of the model behind a space (``'l14'``, or a space name
    such as ``'l14_img'``), L2-normalised. The checkpoint is the one ``dcdb encoder`` set (or the
    demo world's teacher); without one, an error says how to set it. A constant prompt is encoded
    once per query (DuckDB folds the call) and cached per process. Use it as
    ``cosine(l14_img, clip_text('a photo of a dog', 'l14')) > 0.22``.
``clip_image(path, model)`` -> ``FLOAT[]``: the same for an image file (image tower).
``knn(space, seeds, k)`` (table) -> ``seed, uid, rank, similarity, row``
    exact top-k pool rows (cosine) of each seed, as :func:`dcdb.vectors.scan.exact_search` (ties: lower
    row first). ``seeds`` is a list of vectors (``[[...], ...]``, ``$seeds``) or a subquery with
    one vector per row: ``knn('l14_img', (SELECT emb FROM read_parquet('seeds.parquet')), 10)``
    (dcdb rewrites that scalar subquery into ``(SELECT array_agg(emb) FROM (...))`` before the
    query runs; see :func:`rewrite_sql`). ``knn_ann(space, seeds, k)``: the same through the
    space's ANN index (``dcdb index``), with a ``recall`` column: recall@k measured on 64 seeds
    re-run exactly.
``contaminated(vec, source, threshold)`` -> ``BOOLEAN``
    true when the row's vector has cosine >= ``threshold`` with any embedding of an evaluation set:
    ``source`` is a ``.npy`` (n x d), a ``.parquet`` (one list column), or a folder of evaluation
    tasks (clip_benchmark layout, e.g. a demo world's ``eval/``) whose images are encoded by the
    image tower of the model of the pool spaces of that dim. Exact, streaming: DuckDB hands each
    chunk of rows to a matmul against the (cached) eval embeddings. Use
    ``WHERE NOT contaminated(l14_img, 'WORLD/eval', 0.9)``. NULL vectors are not contaminated.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from dcdb.errors import AssetError, ParameterError, PoolError, SourceError
from dcdb.filters import REGISTRARS, arrow_function, constant_argument

EVAL_IMAGE_EXTS = (".webp", ".png", ".jpg", ".jpeg")
EVAL_BLOCK = 8192
TABLE_FUNCTIONS = ("knn", "knn_ann")

_lock = threading.Lock()
_text_cache: dict[tuple, np.ndarray] = {}
_eval_cache: dict[tuple, np.ndarray] = {}


# ------------------------------------------------------------------------------- registering


def register(con, pool) -> None:
    import duckdb

    from dcdb.sandbox import read_access

    access = read_access(con)  # what the file arguments may name (dcdb.sandbox)
    flist = duckdb.list_type(duckdb.sqltype("FLOAT"))
    arrow_function(con, "clip_text", lambda p, m: _clip_text(pool, p, m), ["VARCHAR", "VARCHAR"], flist)
    arrow_function(con, "clip_image", lambda p, m: _clip_image(pool, p, m, access), ["VARCHAR", "VARCHAR"],
                    flist)
    row = duckdb.struct_type({"seed": duckdb.sqltype("INTEGER"), "uid": duckdb.sqltype("VARCHAR"),
                              "rank": duckdb.sqltype("INTEGER"), "similarity": duckdb.sqltype("FLOAT"),
                              "row": duckdb.sqltype("BIGINT"), "recall": duckdb.sqltype("DOUBLE")})
    seeds_t = duckdb.list_type(flist)
    for name, ann in (("knn", False), ("knn_ann", True)):
        # side_effects: never folded while planning, or a statement with constant seeds would search
        # once in dcdb's EXPLAIN (which joins a statement reads, dcdb.engine.narrow_pool) and again to run
        arrow_function(con, f"_dcdb_{name}_rows", _knn_function(pool, ann), ["VARCHAR", seeds_t, "BIGINT"],
                        duckdb.list_type(row), side_effects=True)
        cols = "r.seed AS seed, r.uid AS uid, r.rank AS rank, r.similarity AS similarity, r.row AS row"
        cols += ", r.recall AS recall" if ann else ""
        con.execute(
            f"CREATE OR REPLACE MACRO {name}(space, seeds, k) AS TABLE SELECT {cols} FROM "
            f"(SELECT unnest(_dcdb_{name}_rows(space, CAST(seeds AS FLOAT[][]), k)) AS r)"
        )
    dims = sorted({int(s["dim"]) for s in pool.spaces.values()})
    if len(dims) == 1:
        vec = duckdb.array_type(duckdb.sqltype("FLOAT"), dims[0])
        arrow_function(con, "contaminated", lambda v, src, t: _contaminated(pool, v, src, t, access),
                        [vec, "VARCHAR", "DOUBLE"], "BOOLEAN")
    elif dims:
        # One name, several dims: DuckDB casts FLOAT[d] to FLOAT[] for the list signature.
        arrow_function(con, "contaminated", lambda v, src, t: _contaminated(pool, v, src, t, access),
                        [flist, "VARCHAR", "DOUBLE"], "BOOLEAN")


def _knn_function(pool, ann: bool):
    def knn_rows(space, seeds, k):
        return _knn_rows(pool, space, seeds, k, ann)

    return knn_rows


# ---------------------------------------------------------------------------------- prompts


def _model_space(pool, model: str, modality: str) -> str:
    """A pool space of ``model`` ('l14' or a space name) -- used for its dim and checkpoint."""
    from dcdb.encoders import model_key

    key = model_key(model)
    spaces = [s for s in pool.spaces if model_key(s) == key]
    if not spaces:
        raise PoolError(f"the pool has no embedding space of model {model!r}; it has {', '.join(pool.spaces) or 'none'}",
                        hint="name a model like 'l14' or 'b32'")
    pref = [s for s in spaces if s.endswith(modality)]
    return (pref or spaces)[0]


def _normalised(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _clip_text(pool, prompts, models):
    import pyarrow as pa

    from dcdb.encoders import checkpoint_for, encode_texts

    out = {}
    values = prompts.to_pylist()
    model = constant_argument(models, "model")
    space = _model_space(pool, model, "txt")
    ckpt = checkpoint_for(pool, space)
    for p in set(values):
        if p is None:
            continue
        key = (str(ckpt), ckpt.stat().st_mtime_ns, p)
        with _lock:
            vec = _text_cache.get(key)
        if vec is None:
            vec = _normalised(encode_texts(pool, space, [p])[0])
            with _lock:
                _text_cache[key] = vec
        out[p] = vec.tolist()
    return pa.array([out.get(p) for p in values], pa.list_(pa.float32()))


def _clip_image(pool, paths, models, access=None):
    import pyarrow as pa

    from dcdb.encoders import encode_images
    from dcdb.vectors.seeds import open_image

    model = constant_argument(models, "model")
    space = _model_space(pool, model, "img")
    values = paths.to_pylist()
    out = {}
    uniq = [p for p in dict.fromkeys(values) if p is not None]
    for p in uniq if access is not None else ():
        access.check(p, "path")
    if uniq:
        vecs = _normalised(encode_images(pool, space, [open_image(p) for p in uniq]))
        out = {p: v.tolist() for p, v in zip(uniq, vecs, strict=True)}
    return pa.array([out.get(p) for p in values], pa.list_(pa.float32()))


# -------------------------------------------------------------------------------------- knn


def _knn_rows(pool, spaces, seeds, ks, ann: bool):
    import pyarrow as pa

    from dcdb.vectors import knn as K
    from dcdb.vectors.seeds import check_vectors, list_column_to_matrix

    space = constant_argument(spaces, "space")
    k = constant_argument(ks, "k")
    if k is None:
        raise ParameterError("knn(): k is NULL", hint="give k, e.g. knn('l14_img', seeds, 10)")
    pool.lance_path(space)
    dim = int(pool.spaces[space]["dim"])
    results = []
    cache: dict[bytes, Any] = {}
    for i in range(len(seeds)):
        one = seeds.slice(i, 1)
        if one.null_count:
            raise ParameterError("knn(): the seed list is NULL (the seed subquery returned no rows?)",
                                 hint="give at least one seed vector")
        inner = one.flatten()
        mat = list_column_to_matrix(inner, "knn() seeds")
        key = mat.tobytes() + int(k).to_bytes(8, "little")
        if key not in cache:
            vec = check_vectors(mat, dim, "knn() seeds")
            if ann:
                res = K.search(pool, space, vec, int(k), ann_only=True)
            else:
                res = K.exact_search(pool, space, vec, int(k))
            cache[key] = _rows_value(pool, space, res)
        results.append(cache[key])
    return pa.array(results, type=_row_list_type())


def _row_list_type():
    import pyarrow as pa

    return pa.list_(pa.struct([("seed", pa.int32()), ("uid", pa.string()), ("rank", pa.int32()),
                               ("similarity", pa.float32()), ("row", pa.int64()), ("recall", pa.float64())]))


def _rows_value(pool, space: str, res) -> list[dict[str, Any]]:
    from dcdb.vectors.scan import open_space, uids_of

    ds, _ = open_space(pool, space)
    s, k = res.rows.shape
    flat = res.rows.ravel()
    ok = flat >= 0
    uids = uids_of(ds, flat[ok]).to_pylist()
    seed = np.repeat(np.arange(s), k)[ok]
    rank = np.tile(np.arange(1, k + 1), s)[ok]
    sims = res.sims.ravel()[ok]
    recall = res.recall if res.mode == "ann" else None
    return [{"seed": int(a), "uid": u, "rank": int(r), "similarity": float(v), "row": int(w), "recall": recall}
            for a, u, r, v, w in zip(seed, uids, rank, sims, flat[ok], strict=True)]


def rewrite_sql(con, sql: str) -> str:
    """Turn ``knn(space, (SELECT emb FROM ...), k)`` (a scalar subquery, which SQL would cut to its
    first row) into ``knn(space, (SELECT array_agg(#1) FROM (SELECT emb FROM ...)), k)`` so the
    table function gets every seed. Other SQL is returned unchanged (not even re-printed)."""
    low = sql.lower()
    if not any(f"{name}" in low for name in TABLE_FUNCTIONS):
        return sql
    try:
        tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
    except Exception:  # noqa: BLE001 - leave unparsable SQL to the normal error path
        return sql
    if tree.get("error"):
        return sql
    template = json.loads(con.execute(
        "SELECT json_serialize_sql('SELECT (SELECT array_agg(#1) FROM (SELECT 1) AS _dcdb_seeds)')"
    ).fetchall()[0][0])["statements"][0]["node"]["select_list"][0]
    changed = [False]

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "TABLE_FUNCTION":
                fn = node.get("function") or {}
                args = fn.get("arguments") or []
                if fn.get("function_name", "").lower() in TABLE_FUNCTIONS and len(args) >= 2:
                    expr = args[1].get("expression") or {}
                    if expr.get("class") == "SUBQUERY" and expr.get("subquery_type") == "SCALAR":
                        new = copy.deepcopy(template)
                        new["subquery"]["node"]["from_table"]["subquery"] = expr["subquery"]
                        args[1]["expression"] = new
                        changed[0] = True
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(tree)
    if not changed[0]:
        return sql
    return con.execute("SELECT json_deserialize_sql(?)", [json.dumps(tree)]).fetchall()[0][0]


# -------------------------------------------------------------------------- decontamination


def _stat_key(path: Path) -> tuple:
    if path.is_file():
        st = path.stat()
        return (str(path.resolve()), st.st_size, st.st_mtime_ns)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return (str(path.resolve()), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def eval_task_folders(path: Path) -> list[Path]:
    """Task folders (``test/nshards.txt``) at ``path`` or one level below."""
    if (path / "test" / "nshards.txt").is_file():
        return [path]
    return sorted(p for p in path.iterdir() if (p / "test" / "nshards.txt").is_file())


def eval_images(path: Path) -> list:
    """Every image of the evaluation task(s) under ``path`` (PIL, RGB), in task and shard order."""
    import io
    import tarfile

    from PIL import Image

    from dcdb.eval.tasks import shard_paths

    tasks = eval_task_folders(path)
    if not tasks:
        raise AssetError(f"{str(path)!r} holds no evaluation task (no test/nshards.txt in it or its subfolders)",
                         hint="give a task folder, a folder of tasks (e.g. a demo world's eval/), or a .npy")
    images = []
    for task in tasks:
        for shard in shard_paths(task):
            with tarfile.open(shard) as tar:
                for m in tar:
                    if m.isfile() and m.name.lower().endswith(EVAL_IMAGE_EXTS):
                        with Image.open(io.BytesIO(tar.extractfile(m).read())) as im:
                            images.append(im.convert("RGB"))
    return images


def eval_embeddings(pool, source: str, dim: int) -> np.ndarray:
    """Normalised (m, dim) float32 eval embeddings from a .npy/.parquet or an eval task folder (cached)."""
    from dcdb.encoders import encode_images
    from dcdb.vectors.seeds import check_vectors, load_seed_file

    p = Path(os.path.expanduser(source))
    if not p.exists():
        raise AssetError(f"contaminated(): evaluation set {source!r} does not exist",
                         hint="give a .npy/.parquet of embeddings or an evaluation task folder")
    key = (_stat_key(p), dim)
    with _lock:
        got = _eval_cache.get(key)
    if got is not None:
        return got
    if p.is_dir():
        space = _space_of_dim(pool, dim)
        from dcdb.encoders import checkpoint_for

        checkpoint_for(pool, space)  # a clear error before reading the images
        emb = encode_images(pool, space, eval_images(p))
    else:
        emb = load_seed_file(str(p))
    try:
        emb = check_vectors(emb, dim, f"evaluation set {source}")
    except SourceError as exc:
        raise AssetError(exc.message, hint=exc.hint) from None
    with _lock:
        _eval_cache.clear()
        _eval_cache[key] = emb
    return emb


def _space_of_dim(pool, dim: int) -> str:
    from dcdb.encoders import model_key

    spaces = [s for s, spec in pool.spaces.items() if int(spec["dim"]) == dim]
    models = {model_key(s) for s in spaces}
    if len(models) != 1:
        raise PoolError(f"contaminated(): cannot tell which model encodes {dim}-d vectors "
                        f"(spaces of that dim: {', '.join(spaces) or 'none'})",
                        hint="pass precomputed eval embeddings as .npy instead of a task folder")
    img = [s for s in spaces if s.endswith("img")]
    return (img or spaces)[0]


def max_similarity(mat: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """Max cosine of each (normalised) row of ``mat`` over ``emb`` (blocked)."""
    best = np.full(len(mat), -np.inf, dtype=np.float32)
    for e0 in range(0, len(emb), EVAL_BLOCK):
        np.maximum(best, (mat @ emb[e0 : e0 + EVAL_BLOCK].T).max(axis=1), out=best)
    return best


def _contaminated(pool, vectors, sources, thresholds, access=None):
    import pyarrow as pa
    import pyarrow.compute as pc

    source = constant_argument(sources, "source")
    if access is not None:
        access.check(source, "eval")
    t = constant_argument(thresholds, "threshold")
    if t is None or not (-1.0 <= float(t) <= 1.0):
        raise ParameterError(f"contaminated(): threshold must be a cosine in [-1, 1], got {t}", hint="e.g. 0.9")
    n = len(vectors)
    if n == 0:
        return pa.array([], pa.bool_())
    valid = pc.is_valid(vectors).to_numpy(zero_copy_only=False)
    lens = pc.list_value_length(vectors).to_numpy(zero_copy_only=False)
    dim = int(lens[valid][0]) if valid.any() else 0
    out = np.zeros(n, dtype=bool)
    if not valid.any():
        return pa.array(out)
    emb = eval_embeddings(pool, source, dim)
    sub = vectors.filter(pa.array(valid))
    mat = pc.list_flatten(sub).to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    norms = np.linalg.norm(mat, axis=1)
    ok = np.isfinite(norms) & (norms > 0)
    mat = mat / np.where(ok, norms, 1.0)[:, None]
    hit = (max_similarity(mat, emb) >= np.float32(t)) & ok
    out[valid] = hit
    return pa.array(out)


def _install() -> None:
    if register not in REGISTRARS:
        REGISTRARS.append(register)


_install()
