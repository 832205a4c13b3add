"""SQL functions and macros behind DataComp's baselines (``sql/*.sql``), registered on every pool
connection (``dcdb.connect``).

Table macro (built per pool, because it names the pool's columns; DuckDB 2.0 refuses scalar macros
that reference columns):

``baseline_pool(lang_column := 'lang', arch := NULL, centroids := NULL)``
    ``pool`` plus the columns the baselines select on, each chosen by a parameter; a column the
    query does not use is never computed (DuckDB drops unused projections):

    ``caption_lang``       the language column named ``lang_column``; a pool without it fails with
                           "run `dcdb annotate --pool P lang`" (or ``lang_cld3``, or import one)
    ``clip_score``         ``clip_l14_similarity_score`` (``arch`` l14) or ``clip_b32_...`` (b32)
    ``wordnet_offsets``    first-synset offsets of ``text.split()`` tokens: the derived column
                           ``wn_offsets`` (``dcdb annotate wordnet``) or computed on the fly
    ``assigned_centroid``  nearest centroid of ``l14_img``: the derived column ``centroid_id``
                           (``dcdb annotate centroids``, checked to come from the same file) or
                           computed on the fly (streaming matmul per DuckDB vector)

Scalar macros: ``clip_cut(arch, fraction, threshold)`` (DataComp's threshold: ``threshold`` in the
score's float32, or with a fraction the value at index ``int(N*f)`` of the scores sorted descending
with NaN last, N counting every row; NaN there keeps nothing), ``clip_threshold_as(arch, t)``,
``ft_tokens(text)`` (``len(fasttext.tokenize(text))``), ``ft_tokens_gt(text, n)`` (``ft_tokens(text) > n``,
linear-time for n <= 1).

Python functions (Arrow-vectorised): ``wordnet_hit(offsets, wordnet_ids_file)``,
``target_centroids(centroids_file, imagenet_embeddings_glob)``, ``nearest_centroid(vec, file)``,
``centroids_match(file)``, ``wordnet_offsets_of(text)``, ``clip_cut_mode``, ``clip_cut_index``,
``clip_cut_direct``, ``clip_cut_select``, ``clip_nth_desc`` and ``dcdb_fail(kind, message, hint)``.
Errors they raise are dcdb's typed errors (AssetError, ParameterError, PoolError);
``dcdb.filters.take_error(con)`` returns the last one raised on a connection so the caller can
re-raise it with its type after DuckDB wrapped it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dcdb.cuts import descending_nth, select_desc
from dcdb.errors import AssetError, DcdbError, ParameterError, PoolError
from dcdb.filters import REGISTRARS, arrow_function, constant_argument

ARCH_COLUMNS = {"l14": "clip_l14_similarity_score", "b32": "clip_b32_similarity_score"}
LANG_ANNOTATORS = {"lang": "lang", "lang_cld3": "lang_cld3"}
CENTROID_GROUP = "centroids"
CENTROID_COLUMN = "centroid_id"
WORDNET_COLUMN = "wn_offsets"
_BITMAP_MAX = 50_000_000

# ------------------------------------------------------------------------------ SQL helpers


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _s(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _fail(kind: str, message_sql: str, hint_sql: str) -> str:
    """SQL that raises a dcdb error of ``kind`` when evaluated (never constant-folded)."""
    return f"dcdb_fail({_s(kind)}, {message_sql}, {hint_sql})"


# ------------------------------------------------------------------------------- registering


def register(con, pool) -> None:
    """Register the baselines' functions and macros on a pool connection."""
    from dcdb.sandbox import read_access

    columns = {name: typ for name, typ, *_ in con.execute("DESCRIBE SELECT * FROM pool").fetchall()}
    info = _pool_facts(pool, columns)
    info["access"] = read_access(con)  # what the file arguments may name (dcdb.sandbox)
    info["threads"] = int(con.execute("SELECT current_setting('threads')").fetchall()[0][0])
    _register_functions(con, info)
    for sql in _macros(columns, info):
        con.execute(sql)


def _pool_facts(pool, columns: dict[str, str]) -> dict[str, Any]:
    from dcdb.derived import groups

    l14 = pool.spaces.get("l14_img")
    derived = groups(pool)  # the groups the pool view joins (a group added later is not in it)
    return {
        "pool": pool,
        "derived": derived,
        "path": str(pool.path),
        "l14_dim": int(l14["dim"]) if l14 else None,
        "has_l14": "l14_img" in columns,
        "centroid_group": derived.get(CENTROID_GROUP) if CENTROID_COLUMN in columns else None,
    }


def _register_functions(con, info: dict[str, Any]) -> None:
    import duckdb

    arrow_function(con, "dcdb_fail", _dcdb_fail, ["VARCHAR", "VARCHAR", "VARCHAR"], "VARCHAR",
                    side_effects=True, special_nulls=True)
    arrow_function(con, "clip_cut_mode", _clip_cut_mode, ["DOUBLE", "DOUBLE"], "VARCHAR", special_nulls=True)
    arrow_function(con, "clip_nth_desc", _clip_nth_desc, [duckdb.list_type(duckdb.sqltype("DOUBLE")), "BIGINT"],
                    "DOUBLE", special_nulls=True)
    arrow_function(con, "clip_cut_index", _clip_cut_index, ["BIGINT", "BIGINT", "DOUBLE"], "BIGINT",
                    special_nulls=True)
    arrow_function(con, "clip_cut_direct", lambda a: _clip_cut_direct(a, info), ["VARCHAR"], "BOOLEAN",
                    special_nulls=True)
    arrow_function(con, "clip_cut_select", lambda a, f: _clip_cut_select(a, f, info), ["VARCHAR", "DOUBLE"], "DOUBLE",
                    special_nulls=True)
    arrow_function(con, "wordnet_hit", lambda o, p: _wordnet_hit(o, p, info["access"]),
                    [duckdb.list_type(duckdb.sqltype("INTEGER")), "VARCHAR"],
                    "BOOLEAN", special_nulls=True)
    arrow_function(con, "wordnet_offsets_of", _wordnet_offsets_of, ["VARCHAR"],
                    duckdb.list_type(duckdb.sqltype("INTEGER")), special_nulls=True)
    arrow_function(con, "centroids_match", lambda p: _centroids_match(p, info), ["VARCHAR"], "BOOLEAN")
    arrow_function(con, "target_centroids", lambda c, e: _target_centroids(c, e, info), ["VARCHAR", "VARCHAR"],
                    duckdb.list_type(duckdb.sqltype("INTEGER")))
    if info["has_l14"] and info["l14_dim"]:
        vec = duckdb.array_type(duckdb.sqltype("FLOAT"), info["l14_dim"])
        # side_effects: evaluated where the statement names it, once per row -- as a deterministic
        # function DuckDB would copy it into every filter pushed below `assigned_centroid` and
        # compute the matmul again there
        arrow_function(con, "nearest_centroid", lambda v, p: _nearest_centroid(v, p, info), [vec, "VARCHAR"],
                        "INTEGER", side_effects=True)


# ------------------------------------------------------------------------------------ macros


def _macros(columns: dict[str, str], info: dict[str, Any]) -> list[str]:
    return [
        _clip_threshold_macro(columns),
        _baseline_pool_macro(columns, info),
        _clip_cut_macro(),
        _ft_tokens_macro(),
        _ft_tokens_gt_macro(),
    ]


def _baseline_pool_macro(columns: dict[str, str], info: dict[str, Any]) -> str:
    """``baseline_pool(lang_column := 'lang', arch := NULL, centroids := NULL)``: ``pool`` plus the
    columns the baselines select on, each chosen by a parameter. A column the query does not use
    is never computed (DuckDB drops unused projections), so its parameter may stay NULL."""
    computed = {
        "caption_lang": _caption_lang_expr(columns, info),
        "clip_score": _arch_case("arch", lambda col, typ: _q(col) if typ else _missing(col), columns),
        "wordnet_offsets": _q(WORDNET_COLUMN) if WORDNET_COLUMN in columns else "wordnet_offsets_of(text)",
        "assigned_centroid": _centroid_expr(info),
    }
    select = ", ".join(f"{expr} AS {_q(name)}" for name, expr in computed.items())
    keep = [c for c in columns if c not in computed]
    star = "*" if len(keep) == len(columns) else "* EXCLUDE (" + ", ".join(_q(c) for c in columns if c in computed) + ")"
    return (
        "CREATE OR REPLACE MACRO baseline_pool(lang_column := 'lang', arch := NULL, centroids := NULL) AS TABLE "
        f"SELECT {star}, {select} FROM pool"
    )


def _missing(col: str) -> str:
    return f"CAST({_fail('pool', _s(f'the pool has no column {col}'), _s('ingest a DataComp pool'))} AS DOUBLE)"


def _caption_lang_expr(columns: dict[str, str], info: dict[str, Any]) -> str:
    pool = _s(info["path"])
    col = "lang_column"
    whens = " ".join(f"WHEN {_s(c)} THEN {_q(c)}" for c, t in columns.items() if t == "VARCHAR")
    hint = (
        f"CASE WHEN {col} = 'lang_cld3' THEN 'run `dcdb annotate --pool ' || {pool} || ' lang_cld3` (CLD3, as "
        f"DataComp''s laion2b), pass -p lang_column lang to use the fastText column, or import one with --from' "
        f"WHEN {col} = 'lang' THEN 'run `dcdb annotate --pool ' || {pool} || ' lang` (fastText language id), or "
        f"import a column with `dcdb annotate --pool ' || {pool} || ' --from FILE.parquet`' "
        f"ELSE 'import it with `dcdb annotate --pool ' || {pool} || ' --from FILE.parquet` (columns uid, ' || "
        f"coalesce({col}, 'NULL') || '), or pass -p lang_column lang' END"
    )
    fail = _fail("pool", f"'the pool has no language column ' || coalesce({col}, 'NULL')", hint)
    return f"CASE {col} {whens} ELSE {fail} END"


def _arch_case(arch_expr: str, branch, columns: dict[str, str]) -> str:
    whens = " ".join(f"WHEN {_s(a)} THEN {branch(c, columns.get(c))}" for a, c in ARCH_COLUMNS.items())
    fail = _fail("param", f"'unknown arch ''' || coalesce({arch_expr}, 'NULL') || ''''", "'use -p arch l14 or -p arch b32'")
    return f"CASE {arch_expr} {whens} ELSE CAST({fail} AS DOUBLE) END"


def _clip_threshold_macro(columns: dict[str, str]) -> str:
    """``clip_threshold_as(arch, t)``: ``t`` rounded to the score column's type (float32 in
    DataComp's parquet), so ``score >= t`` decides as numpy does on a float32 column."""
    def branch(col, typ):
        t = typ if typ in ("FLOAT", "DOUBLE") else "DOUBLE"
        return f"CAST(CAST(t AS {t}) AS DOUBLE)"

    return f"CREATE OR REPLACE MACRO clip_threshold_as(arch, t) AS {_arch_case('arch', branch, columns)}"


def _clip_cut_macro() -> str:
    """``clip_cut(arch, fraction, threshold)``: DataComp's threshold. Fraction mode: the value at
    index n = int(N*f) (N counts every row) of the scores sorted descending with NaN (NULL in
    ``pool``) last, as numpy sorts -scores; an index that falls on a NaN gives NULL: nothing kept.
    Selected in linear time by radix rounds (dcdb.cuts, the Ray driver's code): when the score is
    a float column of the metadata or of a derived group (``clip_cut_direct``), ``clip_cut_select``
    streams it from those Parquet files (two passes at most, 4 bytes per score kept up to 256 MB)
    and is evaluated once per statement (a constant, which DuckDB then pushes into the scan).
    Otherwise one scan collects the scores and ``clip_nth_desc`` selects in memory (8 bytes per
    scored row). At 12.8M rows (benchmarks/bench_cuts.py, same run) ``ORDER BY ... LIMIT 1 OFFSET
    n`` took 5.6x the stream's time, that collecting scan 2.7x, numpy's partition of the column 1.8x."""
    scores = "FROM baseline_pool(arch := arch) WHERE fraction IS NOT NULL AND NOT clip_cut_direct(arch)"
    return (
        "CREATE OR REPLACE MACRO clip_cut(arch, fraction, threshold) AS "
        "CASE WHEN clip_cut_mode(CAST(fraction AS DOUBLE), CAST(threshold AS DOUBLE)) = 'threshold' "
        "THEN clip_threshold_as(arch, threshold) "
        "WHEN clip_cut_direct(arch) THEN clip_cut_select(arch, CAST(fraction AS DOUBLE)) "
        "ELSE (SELECT clip_nth_desc(list(CAST(clip_score AS DOUBLE)) FILTER (WHERE clip_score IS NOT NULL), "
        f"clip_cut_index(count(*), count(clip_score), CAST(fraction AS DOUBLE))) {scores}) END"
    )


def _ft_tokens_macro() -> str:
    from dcdb.filters.tokens import FT_TOKEN_SQL_PATTERN

    return f"CREATE OR REPLACE MACRO ft_tokens(s) AS len(regexp_extract_all(s, {_s(FT_TOKEN_SQL_PATTERN)}))"


def _ft_tokens_gt_macro() -> str:
    """``ft_tokens_gt(s, n)`` = ``ft_tokens(s) > n`` without building the token list for n <= 1
    (the image-based filter's caption rule): 1M captions in ~0.4 s instead of ~4 s. A token is a
    maximal run of non-delimiters (W) or a newline; so at least two tokens <=> two W-runs, or a
    newline and a W, or two newlines; at least one <=> a W or a newline. Larger n count."""
    from dcdb.filters.tokens import FASTTEXT_DELIMITERS as d

    delim = "[" + d.encode("unicode_escape").decode("ascii") + "]"
    word = "[^" + d.encode("unicode_escape").decode("ascii") + "]"
    nl = "contains(s, chr(10))"
    has_word = f"regexp_matches(s, {_s(word)})"
    two_runs = f"regexp_matches(s, {_s('^' + delim + '*' + word + '+' + delim + '+' + word)})"
    two_nl = "strlen(s) - strlen(replace(s, chr(10), '')) >= 2"
    return (
        "CREATE OR REPLACE MACRO ft_tokens_gt(s, n) AS CASE "
        f"WHEN n = 0 THEN {has_word} OR {nl} "
        f"WHEN n = 1 THEN {two_runs} OR ({nl} AND ({has_word} OR {two_nl})) "
        "ELSE ft_tokens(s) > n END"
    )


def _centroid_expr(info: dict[str, Any]) -> str:
    if info["centroid_group"] is not None:
        return f"CASE WHEN centroids_match(centroids) THEN {_q(CENTROID_COLUMN)} END"
    if info["has_l14"] and info["l14_dim"]:
        return "nearest_centroid(l14_img, centroids)"
    msg = _s("the pool has no l14_img embeddings and no centroid_id column")
    hint = _s("ingest the .npz files with the metadata, or import centroid ids with dcdb annotate --from")
    return f"CAST({_fail('pool', msg, hint)} AS INTEGER)"


# ------------------------------------------------------------------------------ functions


def _dcdb_fail(kind, message, hint):
    cls = {"pool": PoolError, "param": ParameterError, "asset": AssetError}.get(kind[0].as_py(), DcdbError)
    raise cls(message[0].as_py() or "error", hint=hint[0].as_py())


def check_clip_params(fraction: float | None, threshold: float | None) -> str:
    """DataComp's rules: exactly one of fraction and threshold; fraction in (0, 1]."""
    if fraction is None and threshold is None:
        raise ParameterError("give -p fraction F or -p threshold T", hint="e.g. -p fraction 0.3 (top 30% by score)")
    if fraction is not None and threshold is not None:
        raise ParameterError("give either -p fraction or -p threshold, not both", hint="drop one of them")
    if fraction is not None and not (0.0 < fraction <= 1.0):
        raise ParameterError(f"-p fraction must be in (0, 1], got {fraction}", hint="e.g. -p fraction 0.3")
    return "fraction" if fraction is not None else "threshold"


def _clip_cut_mode(fraction, threshold):
    import pyarrow as pa

    f, t = fraction[0].as_py(), threshold[0].as_py()
    mode = check_clip_params(f, t)
    return pa.array([mode] * len(fraction), pa.string())


def fraction_index(n_rows: int, n_scored: int, fraction: float) -> int:
    """Index into the descending sort: DataComp's ``int(N * f)``. With f = 1 (where DataComp's
    ``np.sort(...)[N]`` raises IndexError) the last scored row, so every row with a score is kept."""
    check_clip_params(fraction, None)
    n = int(n_rows * fraction)
    if n >= n_rows:
        return n_scored - 1 if n_scored > 0 else n_rows
    return n


def _clip_nth_desc(values, index):
    """The value at ``index`` of the descending sort of ``values`` (a one-row list of the non-NULL
    scores), NULL when the index is past the last score."""
    import pyarrow as pa

    out = []
    for i in range(len(values)):
        lst, k = values[i], index[i].as_py()
        scores = lst.values.to_numpy(zero_copy_only=False) if lst.is_valid else np.empty(0)
        out.append(None if k is None else select_desc(scores, k))
    return pa.array(out, pa.float64())


def score_column(pool, arch: str, derived: dict[str, dict[str, Any]] | None = None) -> tuple[str | None, str] | None:
    """Where ``baseline_pool``'s ``clip_score`` for ``arch`` is stored when it is a float column
    read as it is: ``(group, column)`` for a derived group (the last group that has the column
    wins, as in the ``pool`` view; ``derived``: the groups the view joins, default the pool's
    now) or ``(None, column)`` for the metadata. None when the column is of another type, absent,
    or ``arch`` unknown: the SQL path then computes it (or raises the error)."""
    from dcdb.derived import groups

    column = ARCH_COLUMNS.get(arch)
    if column is None:
        return None

    def has(cols) -> bool | None:  # None: not there; False: there but not a float column
        for c in cols:
            if c.get("name") == column:
                return c.get("type") in ("float", "double")
        return None

    for name, group in reversed(list((groups(pool) if derived is None else derived).items())):
        found = has(group.get("columns", []))
        if found is not None:
            return (name, column) if found else None
    return (None, column) if has(pool.manifest.get("columns", [])) else None


def _score_files(info: dict[str, Any], arch: str) -> tuple[list, str] | None:
    """(the Parquet files, the column) that the pool view reads ``clip_score`` of ``arch`` from."""
    from dcdb.derived import group_files

    known = info.setdefault("score_files", {})
    if arch not in known:
        src = score_column(info["pool"], arch, info["derived"])
        if src is not None:
            group, column = src
            files = group_files(info["pool"], group) if group else info["pool"].metadata_files()
            src = (files, column)
        known[arch] = src
    return known[arch]


def _clip_cut_direct(arch, info):
    import pyarrow as pa

    return pa.array([a is not None and _score_files(info, a) is not None for a in arch.to_pylist()], pa.bool_())


def _clip_cut_select(arch, fraction, info):
    import pyarrow as pa

    memo: dict[tuple, float | None] = {}
    out = []
    for a, f in zip(arch.to_pylist(), fraction.to_pylist()):
        if (a, f) not in memo:
            memo[a, f] = None if a is None or f is None else _fraction_cut(info, a, f)
        out.append(memo[a, f])
    return pa.array(out, pa.float64())


def _fraction_cut(info: dict[str, Any], arch: str, fraction: float) -> float | None:
    """DataComp's fraction threshold of ``arch``'s score over the pool, from its Parquet files
    (``_score_files``) by radix selection (dcdb.cuts); None when the index falls on a NaN.
    Remembered per connection while those files are unchanged: DuckDB may evaluate the constant
    more than once for one statement (planning it for EXPLAIN, then running it)."""
    import os

    files, column = _score_files(info, arch)
    try:
        stamp = tuple((st.st_size, st.st_mtime_ns) for st in map(os.stat, files))
    except OSError as exc:
        raise PoolError(f"pool {info['path']!r} is damaged: {exc.strerror}: {exc.filename!r}",
                        hint="re-ingest the pool (or recompute the derived group)") from None
    cache = info.setdefault("cuts", {})
    key = (arch, float(fraction), tuple(map(str, files)), stamp)
    if key not in cache:
        value, rows, _ = descending_nth(lambda: _read_column(files, column),
                                        lambda n_rows, n_scored: fraction_index(n_rows, n_scored, fraction))
        if rows != info["pool"].rows:
            raise PoolError(f"pool {info['path']!r} is damaged: its {column} column has {rows} rows, the "
                            f"manifest says {info['pool'].rows}", hint="re-ingest the pool")
        if len(cache) >= 16:
            cache.clear()
        cache[key] = value
    return cache[key]


def _read_column(files: list, column: str):
    """``column`` of ``files`` in pool order, batch by batch, as numpy floats (NULL -> NaN); the
    files are read ahead on pyarrow's threads (1.7x a file-by-file read of 128 files here)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    if not files:
        return
    try:
        for batch in ds.dataset([str(f) for f in files], format="parquet").to_batches(columns=[column]):
            yield batch.column(0).to_numpy(zero_copy_only=False)
    except (OSError, pa.ArrowException) as exc:
        raise PoolError(f"cannot read column {column!r} of the pool's files: {exc}",
                        hint="the pool may be damaged; re-ingest it (or recompute the derived group)") from None


def _clip_cut_index(n_rows, n_scored, fraction):
    import pyarrow as pa

    n = fraction_index(int(n_rows[0].as_py()), int(n_scored[0].as_py()), fraction[0].as_py())
    return pa.array([n] * len(n_rows), pa.int64())


# WordNet ----------------------------------------------------------------------------------


_lookup_cache: dict[tuple, Any] = {}


def _wordnet_lookup(path: str):
    """A function offsets -> bool for the WordNet ids in ``path`` (a bitmap when small)."""
    from dcdb.filters.assets import existing_file, load_wordnet_ids, stat_key

    p = existing_file(path, "wordnet_ids")
    key = stat_key(p)
    if key not in _lookup_cache:
        ids = load_wordnet_ids(p)
        if ids.max() < _BITMAP_MAX:
            table = np.zeros(int(ids.max()) + 2, dtype=bool)
            table[ids] = True
            last = len(table) - 1  # False sentinel for offsets beyond every id

            def hit(values, table=table, last=last):
                return table[np.minimum(values, last)]
        else:
            def hit(values, ids=ids):
                return np.isin(values, ids)
        _lookup_cache.clear()
        _lookup_cache[key] = hit
    return _lookup_cache[key]


def _wordnet_hit(offsets, ids_path, access=None):
    """Per row: does some offset (a token's first synset) appear in the WordNet id file?"""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(offsets)
    path = constant_argument(ids_path, "wordnet_ids")
    if access is not None:
        access.check(path, "wordnet_ids")
    hit = _wordnet_lookup(path)
    flat = pc.list_flatten(offsets).to_numpy(zero_copy_only=False)
    if len(flat) == 0:
        return pa.array(np.zeros(n, dtype=bool))
    parents = pc.list_parent_indices(offsets).to_numpy(zero_copy_only=False)
    flat = flat.astype(np.int64, copy=False)
    found = hit(np.maximum(flat, 0)) & (flat >= 0)
    return pa.array(np.bincount(parents[found], minlength=n) > 0)


def _wordnet_offsets_of(texts):
    import pyarrow as pa

    from dcdb.filters.wordnet import open_wordnet

    wn = open_wordnet()
    return pa.array([wn.caption_offsets(t) for t in texts.to_pylist()], pa.list_(pa.int32()))


# Centroids -------------------------------------------------------------------------------


def _nearest_centroid(vectors, path, info):
    import pyarrow as pa

    from dcdb.filters.centroids import assign
    from dcdb.openmp import blas_threads

    path = constant_argument(path, "centroids")
    info["access"].check(path, "centroids")
    cents = prepared_centroids(path, info["l14_dim"])
    d = info["l14_dim"]
    n = len(vectors)
    values = vectors.values.to_numpy(zero_copy_only=False)
    start = vectors.offset * d
    feats = values[start : start + n * d].reshape(n, d)
    with blas_threads(info.get("threads")):  # no more BLAS threads than the statement's DuckDB threads
        ids = assign(feats, cents)
    mask = vectors.is_null().to_numpy(zero_copy_only=False) if vectors.null_count else None
    return pa.array(ids, pa.int32(), mask=mask)


_prepared: list = []  # [(centroid array, its Centroids)]: the file last used


def prepared_centroids(path, dim: int | None):
    """The centroid file's :class:`~dcdb.filters.centroids.Centroids` (loaded and prepared once
    while the file is unchanged; ``load_centroids`` caches by path, size and mtime)."""
    from dcdb.filters.assets import load_centroids
    from dcdb.filters.centroids import Centroids

    arr = load_centroids(path, dim=dim)
    got = _prepared[0] if _prepared else None
    if got is None or got[0] is not arr:
        got = (arr, Centroids.of(arr))
        _prepared[:] = [got]
    return got[1]


def _group_centroids_file(info):
    group = info["centroid_group"]
    rec = (group or {}).get("centroids")
    return group, rec


def _current_assignment(group) -> bool:
    """Was a stored assignment computed the way :func:`dcdb.filters.centroids.assign` computes now?"""
    from dcdb.filters.centroids import ASSIGNMENT

    return (group or {}).get("assignment") == ASSIGNMENT


def _centroids_match(path, info):
    import pyarrow as pa

    from dcdb.filters.assets import existing_file, same_file

    p = constant_argument(path, "centroids")
    info["access"].check(p, "centroids")
    p = existing_file(p, "centroids")
    group, rec = _group_centroids_file(info)
    if rec is not None and not _current_assignment(group):
        raise AssetError(
            "-p centroids: the pool's centroid ids (dcdb annotate centroids) were computed by an older dcdb "
            "(argmax of float32 dot products, which may differ from the exact one on near-ties)",
            hint=f"recompute them: dcdb annotate --pool {info['path']} centroids -p centroids {p} --force",
        )
    if rec is None or not same_file(rec, p):
        was = rec.get("path") if rec else "an unknown file"
        raise AssetError(
            f"-p centroids: the pool's centroid ids (dcdb annotate centroids) were computed from {was!r}, "
            f"not {str(p)!r}",
            hint=f"recompute them: dcdb annotate --pool {info['path']} centroids -p centroids {p} --force",
        )
    return pa.array([True] * len(path))


_target_cache: dict[tuple, np.ndarray] = {}


def _stored_targets(info, centroids_path, files) -> np.ndarray | None:
    """Target ids stored by ``dcdb annotate centroids -p imagenet_embeddings`` if they were
    computed from these very files."""
    from dcdb.filters.assets import same_file

    group, rec = _group_centroids_file(info)
    targets = (group or {}).get("targets")
    if not rec or not targets or not _current_assignment(group) or not same_file(rec, centroids_path):
        return None
    recorded = targets.get("imagenet_embeddings", [])
    if len(recorded) != len(files) or not all(same_file(r, f) for r, f in zip(recorded, files, strict=True)):
        return None
    return np.asarray(targets["ids"], dtype=np.int32)


def compute_targets(centroids_path, pattern, dim: int | None) -> tuple[np.ndarray, list, Any]:
    """(target ids, embedding files, centroid path): nearest centroids of the ImageNet embeddings."""
    from dcdb.filters.assets import existing_file, expand_glob, load_centroids, load_embeddings
    from dcdb.filters.centroids import target_centroids

    cpath = existing_file(centroids_path, "centroids")
    cents = load_centroids(cpath, dim=dim)
    files = expand_glob(pattern, "imagenet_embeddings")
    emb = load_embeddings(pattern, dim=cents.shape[1])
    return target_centroids(emb, cents), files, cpath


def _target_centroids(centroids, embeddings, info):
    import pyarrow as pa

    from dcdb.filters.assets import existing_file, expand_glob, stat_key

    access = info["access"]
    cpath = constant_argument(centroids, "centroids")
    access.check(cpath, "centroids")
    cpath = existing_file(cpath, "centroids")
    pattern = constant_argument(embeddings, "imagenet_embeddings")
    access.check_glob(pattern, "imagenet_embeddings")
    files = expand_glob(pattern, "imagenet_embeddings")
    for f in files:
        access.check(f, "imagenet_embeddings")
    key = (stat_key(cpath), tuple(stat_key(f) for f in files))
    ids = _target_cache.get(key)
    if ids is None:
        ids = _stored_targets(info, cpath, files)
        if ids is None:
            ids, _, _ = compute_targets(cpath, pattern, info["l14_dim"])
        _target_cache.clear()
        _target_cache[key] = ids
    value = pa.array([ids.tolist()], pa.list_(pa.int32()))
    return pa.concat_arrays([value] * len(centroids)) if len(centroids) > 1 else value


def _install() -> None:
    if register not in REGISTRARS:
        REGISTRARS.append(register)


_install()
