"""Dedup: exact (sha256, url, normalised text) and semantic (SemDeDup-style near duplicates).

**Exact duplicates** are computed by DuckDB when a query asks for them (``exact_duplicates(key)``,
see ``dcdb/filters/dedup.py``); nothing is stored. Rows with the same key value form a group;
NULL and empty keys are never duplicates. Keys:

- ``sha256``, ``url``: the metadata strings as they are.
- ``text``: the caption normalised by ``normalise_text``: Unicode NFKC, lower-cased, every run of
  whitespace (Python's ``str.isspace`` set) made one space, stripped at both ends; an empty
  result is NULL. Punctuation and accents are kept ("Dog!" and "dog" differ).
- any other column of ``pool`` that is not a vector (a derived perceptual hash, ...), as is.

**Near duplicates** of an embedding space at a cosine threshold ``t`` are computed once by
``semantic_dedup`` (``dcdb dedup``) and stored as a derived group (``dcdb/derived.py``) named
``neardup_<space>_<t>`` (``t`` with up to 6 decimals, ``.`` written ``_``: ``neardup_l14_img_0_95``):

1. Every vector is L2-normalised in float32 (zero or non-finite vectors are left out: cluster -1,
   never a duplicate).
2. Spherical k-means (Abbas et al. 2023, SemDeDup): ``clusters`` centroids (default
   ``round(sqrt(n / 2))``, which balances the assignment cost ``n*K`` against the pairwise cost
   ``n^2/(2K)``), trained on a seeded uniform sample of ``sample`` rows (default ``40 * K``)
   for at most ``iters`` iterations from ``K`` distinct sample rows; an empty cluster is re-seeded
   with the sample row farthest from its centroid. Then every row is assigned to its
   max-dot-product centroid (first maximum wins), streaming.
3. Within each cluster, every pair of rows with ``cosine >= t - 1e-6`` (float32 dot products of
   the normalised vectors; the tolerance makes ``t = 1`` find identical vectors despite rounding) is
   an edge (with ``probes`` P > 1 a row takes part in its P nearest clusters, so a pair that
   k-means put on two sides of a boundary can still meet; P = 1 is SemDeDup's scheme); the
   **groups are the connected components** of that graph, across clusters (union-find; a chain
   a~b, b~c is one group even when a and c are further apart than ``t``). This is stricter than
   SemDeDup's own rule (drop a row when *any* earlier row of its cluster is within the threshold),
   which can keep two rows of one chain. Pairs in different clusters are never compared, as in
   SemDeDup: with P = 1 a near duplicate across a cluster boundary is missed (more clusters, more
   misses; 2.3% of the planted pairs at 1M rows and 707 clusters, see benchmarks/bench_dedup.py).
4. **Keep rule**: in each group the row with the smallest uid (DataComp's uid order: the 128-bit
   number, i.e. the hex string's order) is kept; every other member is a duplicate to drop.

Stored columns (``<g>`` = the group name): ``<g>_cluster`` (INT32 k-means cluster, -1 for a vector
left out), ``<g>_group`` (the kept uid of the row's group; NULL when the row has no near
duplicate), ``<g>_size`` (group size, 1 when none), ``<g>_sim`` (the highest cosine to another row
of the same cluster, NULL in a one-row cluster). SQL reads them through ``near_duplicates(space,
t)`` and ``near_duplicate_groups(space, t)``.

Memory is bounded whatever the pool: the pool's vectors are never all held. The sample is
``sample x d`` float32; the assignment streams the Lance table; the pairwise phase loads a range of
clusters at a time (at most ``CHUNK_BYTES`` of vectors as stored) by one streaming pass per range,
and compares it in ``BLOCK x BLOCK`` similarity blocks; a cluster larger than a range is cut into
pieces compared two at a time. Per row the run holds about 20 + 4P bytes (cluster ids, its place
in the cluster order, similarity, group), 300 MB for DataComp's 12.8M-row medium pool at P = 1.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dcdb.errors import PoolError, UsageError
from dcdb.store import Pool, lance_batches

TOLERANCE = 1e-6
THRESHOLD_DECIMALS = 6
BLOCK = 2048  # rows per side of a similarity block
CHUNK_BYTES = 512 << 20  # vectors (as stored) loaded at a time in the pairwise phase
SCAN_ROWS = 65536
ASSIGN_BLOCK = 4096
SAMPLE_PER_CLUSTER = 40
DEFAULT_ITERS = 20
EDGE_FLUSH = 1 << 22  # compress a cluster's edge buffer to a spanning forest beyond this
GROUP_PREFIX = "neardup"
KIND = "near_duplicates"


# ---------------------------------------------------------------------------- exact dedup


def normalise_text(text: str | None) -> str | None:
    """The text key of exact dedup in Python (the reference of the SQL function ``norm_text``)."""
    import unicodedata

    if text is None:
        return None
    out = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    return out or None


def normalise_text_arrow(arr):
    """``normalise_text`` over a pyarrow string array, vectorised (utf8proc NFKC + lower)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(arr) == 0:
        return pa.array([], pa.string())
    x = pc.utf8_normalize(arr, form="NFKC")
    x = pc.utf8_lower(x)
    # every character for which str.isspace() is true, as an RE2 class
    from dcdb.engine import PY_WHITESPACE

    x = pc.replace_substring_regex(x, pattern=f"[{PY_WHITESPACE}]+", replacement=" ")
    x = pc.utf8_trim(x, characters=" ")
    return pc.if_else(pc.equal(x, ""), pa.scalar(None, pa.string()), x)


# ----------------------------------------------------------------------------- group names


def check_threshold(threshold: Any) -> float:
    """A cosine threshold in (0, 1] with at most 6 decimals, as a float."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise UsageError(f"threshold must be a number in (0, 1], got {threshold!r}", hint="e.g. 0.95") from None
    if not (0.0 < t <= 1.0) or math.isnan(t):
        raise UsageError(f"threshold must be in (0, 1], got {threshold!r}",
                         hint="a cosine similarity: 0.95 groups very close vectors, 1 identical ones")
    if abs(round(t, THRESHOLD_DECIMALS) - t) > 1e-12:
        raise UsageError(f"threshold {threshold!r} has more than {THRESHOLD_DECIMALS} decimals",
                         hint=f"round it, e.g. {round(t, THRESHOLD_DECIMALS)}")
    return round(t, THRESHOLD_DECIMALS)


def threshold_tag(threshold: float) -> str:
    return f"{check_threshold(threshold):.{THRESHOLD_DECIMALS}f}".rstrip("0").rstrip(".").replace(".", "_")


def group_name(space: str, threshold: float) -> str:
    from dcdb.derived import GROUP_RE

    name = f"{GROUP_PREFIX}_{space}_{threshold_tag(threshold)}"
    if not GROUP_RE.match(name):
        raise UsageError(f"embedding space {space!r} cannot name a derived group ({name!r})",
                         hint="space names must be lowercase letters, digits and underscores, 40 at most")
    return name


def group_columns(name: str) -> dict[str, str]:
    return {k: f"{name}_{k}" for k in ("cluster", "group", "size", "sim")}


def check_space(pool: Pool, space: str) -> dict[str, Any]:
    if space not in pool.spaces:
        raise pool.unknown_space(space)
    return pool.spaces[space]


def computed(pool: Pool) -> dict[tuple[str, float], dict[str, Any]]:
    """Near-duplicate results stored in the pool: (space, threshold) -> their ``_group.json``."""
    from dcdb.derived import groups

    out = {}
    for name, info in groups(pool).items():
        if info.get("annotator") == KIND and "space" in info and "threshold" in info:
            out[(info["space"], float(info["threshold"]))] = info | {"name": name}
    return out


def group_info(pool: Pool, space: str, threshold: float) -> dict[str, Any]:
    """The stored result for (space, threshold), or a PoolError saying how to compute it."""
    check_space(pool, space)
    t = check_threshold(threshold)
    found = computed(pool).get((space, t))
    if found is None:
        have = sorted(th for (s, th) in computed(pool) if s == space)
        also = f" (computed for {space}: {', '.join(f'{x:g}' for x in have)})" if have else ""
        raise PoolError(
            f"near duplicates of {space} at threshold {t:g} were not computed{also}",
            hint=f"run `dcdb dedup --pool {pool.path} --space {space} --threshold {t:g}`",
        )
    return found | {"columns": group_columns(found["name"])}


# -------------------------------------------------------------------------- vector helpers


def _unit(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 L2-normalised copy, valid mask); rows with zero or non-finite norm are zeroed."""
    x = np.array(block, dtype=np.float32, copy=True)
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))
    valid = np.isfinite(norm) & (norm > 0)
    x[~valid] = 0.0
    x[valid] /= norm[valid, None]
    return x, valid


def _batch_vectors(batch, column: str) -> np.ndarray:
    arr = batch.column(column)
    if hasattr(arr, "combine_chunks"):
        arr = arr.combine_chunks()
    d = arr.type.list_size
    values = arr.values.to_numpy(zero_copy_only=False)
    start = arr.offset * d
    return np.asarray(values[start : start + len(arr) * d]).reshape(len(arr), d)


def _scan(ds, space: str):
    """(first row, stored vectors) for every batch of the Lance table, in pool order."""
    row = 0
    for batch in lance_batches(ds.to_batches(columns=[space], batch_size=SCAN_ROWS), ds.uri):
        v = _batch_vectors(batch, space)
        yield row, v
        row += len(v)


def _assign_scores(x: np.ndarray, cents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argmax, max) of x @ cents.T per row, blocked (first maximum wins)."""
    idx = np.empty(len(x), dtype=np.int32)
    val = np.empty(len(x), dtype=np.float32)
    for s in range(0, len(x), ASSIGN_BLOCK):
        sims = x[s : s + ASSIGN_BLOCK] @ cents.T
        a = np.argmax(sims, axis=1)
        idx[s : s + len(a)] = a
        val[s : s + len(a)] = sims[np.arange(len(a)), a]
    return idx, val


def _assign_top(x: np.ndarray, cents: np.ndarray, p: int) -> np.ndarray:
    """(n, p) indices of the p max-dot-product centroids of each row, best first (p = 1: argmax,
    first maximum wins)."""
    if p == 1:
        return _assign_scores(x, cents)[0][:, None]
    out = np.empty((len(x), p), dtype=np.int32)
    for s in range(0, len(x), ASSIGN_BLOCK):
        sims = x[s : s + ASSIGN_BLOCK] @ cents.T
        part = np.argpartition(-sims, p - 1, axis=1)[:, :p]
        best = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
        out[s : s + len(sims)] = np.take_along_axis(part, best, axis=1)
    return out


def spherical_kmeans(x: np.ndarray, k: int, *, iters: int, seed: int, bar=None) -> tuple[np.ndarray, int]:
    """Spherical k-means of unit rows ``x``: (k x d unit centroids, iterations run)."""
    rng = np.random.default_rng([seed, 1])
    n = len(x)
    cents = x[np.sort(rng.choice(n, k, replace=False))].copy()
    prev = None
    done = 0
    for done in range(1, iters + 1):
        a, score = _assign_scores(x, cents)
        if prev is not None and np.array_equal(a, prev):
            break
        prev = a
        order = np.argsort(a, kind="stable")
        counts = np.bincount(a, minlength=k)
        nonempty = np.flatnonzero(counts)
        sums = np.add.reduceat(x[order], np.concatenate([[0], np.cumsum(counts[nonempty])[:-1]]), axis=0)
        new = np.zeros_like(cents)
        new[nonempty] = sums
        empty = np.flatnonzero(counts == 0)
        if len(empty):  # re-seed with the rows that fit their centroid worst
            worst = np.argsort(score, kind="stable")[: len(empty)]
            new[empty] = x[worst]
        norm = np.linalg.norm(new, axis=1)
        norm[norm == 0] = 1.0
        cents = (new / norm[:, None]).astype(np.float32)
        if bar is not None:
            bar.update(1)
    return cents, done


def components(m: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of the graph on ``m`` nodes with edges (i, j): a label per node, the
    smallest node index of its component (vectorised union-find: hooking + pointer jumping)."""
    label = np.arange(m, dtype=np.int64)
    if len(i) == 0:
        return label
    while True:
        li, lj = label[i], label[j]
        lo = np.minimum(li, lj)
        new = label.copy()
        np.minimum.at(new, li, lo)
        np.minimum.at(new, lj, lo)
        while True:
            nxt = new[new]
            if np.array_equal(nxt, new):
                break
            new = nxt
        if np.array_equal(new, label):
            return label
        label = new


class _Edges:
    """Edges of one cluster's graph (local indices), compressed to a spanning forest when large."""

    def __init__(self, m: int):
        self.m = m
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.count = 0

    def add(self, i: np.ndarray, j: np.ndarray) -> None:
        if len(i):
            self.parts.append((i.astype(np.int64), j.astype(np.int64)))
            self.count += len(i)
            if self.count > EDGE_FLUSH:
                self._compress()

    def _compress(self) -> None:
        label = self.labels()
        k = np.flatnonzero(label != np.arange(self.m))
        self.parts = [(k, label[k])]
        self.count = len(k)

    def labels(self) -> np.ndarray:
        if not self.parts:
            return np.arange(self.m, dtype=np.int64)
        i = np.concatenate([p[0] for p in self.parts])
        j = np.concatenate([p[1] for p in self.parts])
        return components(self.m, i, j)


def _pairs(a: np.ndarray, b: np.ndarray | None, cut: float, edges: _Edges, sim: np.ndarray,
           a0: int, b0: int) -> None:
    """Compare unit rows ``a`` (local offset a0) with ``b`` (offset b0; None: ``a`` with itself,
    upper triangle) in BLOCK x BLOCK blocks: record edges >= cut and update per-row max ``sim``."""
    same = b is None
    if same:
        b, b0 = a, a0
    for r in range(0, len(a), BLOCK):
        ra = a[r : r + BLOCK]
        for c in range(r if same else 0, len(b), BLOCK):
            s = ra @ b[c : c + BLOCK].T
            if not s.size:
                continue
            diagonal = same and c == r
            if diagonal:
                np.fill_diagonal(s, -np.inf)
            row_max = s.max(axis=1)
            seg = sim[a0 + r : a0 + r + len(ra)]
            np.maximum(seg, row_max, out=seg)
            if not diagonal:  # a diagonal block is symmetric: its column maxima are its row maxima
                seg = sim[b0 + c : b0 + c + s.shape[1]]
                np.maximum(seg, s.max(axis=0), out=seg)
            hit = np.flatnonzero(row_max >= cut)  # look for edges only in rows that have one
            if len(hit):
                rows, cols = np.nonzero(s[hit] >= cut)
                rows = hit[rows]
                if diagonal:
                    keep = cols > rows
                    rows, cols = rows[keep], cols[keep]
                edges.add(rows + a0 + r, cols + b0 + c)


# ------------------------------------------------------------------------------ semantic


@dataclass
class DedupReport:
    """What a semantic dedup run did (``summary()`` is the CLI's line)."""

    group: str
    space: str
    threshold: float
    rows: int
    clusters: int
    groups: int
    in_groups: int
    dropped: int
    left_out: int
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)
    reused_clusters: bool = False

    def summary(self) -> str:
        extra = f"; {self.left_out:,} zero/NaN vectors left out" if self.left_out else ""
        reuse = " (clusters reused)" if self.reused_clusters else ""
        return (f"near duplicates of {self.space} at cosine >= {self.threshold:g}: {self.groups:,} groups, "
                f"{self.dropped:,} of {self.rows:,} rows to drop ({self.dropped / max(self.rows, 1):.2%}); "
                f"{self.clusters:,} clusters{reuse}; {self.seconds:.1f}s -> derived group {self.group!r}{extra}")


def _progress(total: int, desc: str, enabled: bool, unit: str = "rows"):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, file=sys.stderr, disable=not enabled)


def default_clusters(n: int) -> int:
    return max(1, min(n, round(math.sqrt(n / 2))))


def _sample(ds, space: str, n: int, size: int, seed: int, pool: Pool | None = None) -> np.ndarray:
    """Unit float32 vectors of a seeded uniform sample of rows (one streaming pass). With
    ``pool``, the rows are drawn by their position in the *source* (``source_shard``,
    ``source_row``) and come in source order, so the sample, and the k-means it seeds, do not
    depend on how the pool is laid out (store format 1 kept the source order, format 2 sorts by uid)."""
    rng = np.random.default_rng([seed, 0])
    want = np.sort(rng.choice(n, size, replace=False)) if size < n else np.arange(n)
    rows, rank = _pool_rows(pool, want) if pool is not None else (want, np.arange(len(want)))
    x = np.zeros((len(want), ds.schema.field(space).type.list_size), np.float32)
    usable = np.zeros(len(want), bool)
    for start, v in _scan(ds, space):
        lo, hi = np.searchsorted(rows, [start, start + len(v)])
        if hi > lo:
            x[rank[lo:hi]], usable[rank[lo:hi]] = _unit(v[rows[lo:hi] - start])
    return x[usable]


def _pool_rows(pool: Pool, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pool rows, ascending; for each, the index in ``positions`` of its source position) for the
    sorted source positions ``positions`` (row i of the source files read in name order). One
    streaming pass over the metadata's source columns."""
    import pyarrow.parquet as pq

    from dcdb.store import SOURCE_ROW, SOURCE_SHARD

    sources = pool.manifest.get("source_shards")
    if not sources:  # no source positions recorded: the pool's own order
        return positions, np.arange(len(positions))
    offsets = np.cumsum([0] + [int(s["rows"]) for s in sources])
    rows, ranks, at = [], [], 0
    for path in pool.metadata_files():
        t = pq.read_table(path, columns=[SOURCE_SHARD, SOURCE_ROW])
        pos = offsets[t.column(0).to_numpy()] + t.column(1).to_numpy()
        idx = np.searchsorted(positions, pos)
        hit = np.flatnonzero(positions[np.minimum(idx, len(positions) - 1)] == pos) if len(positions) else idx[:0]
        rows.append(at + hit)
        ranks.append(idx[hit])
        at += len(pos)
    return np.concatenate(rows) if rows else positions[:0], np.concatenate(ranks) if ranks else positions[:0]


def _reusable_clusters(pool: Pool, space: str, params: dict[str, Any]) -> np.ndarray | None:
    """Cluster ids of an earlier run on the same space with the same k-means parameters."""
    import pyarrow.parquet as pq

    from dcdb.derived import group_files

    for (s, _t), info in sorted(computed(pool).items()):
        if s != space or info.get("pool_manifest_sha256") != pool.manifest_hash:
            continue
        if info.get("kmeans") != params:
            continue
        col = group_columns(info["name"])["cluster"]
        try:
            files = group_files(pool, info["name"])
            return np.concatenate([pq.read_table(f, columns=[col]).column(0).to_numpy() for f in files]).astype(
                np.int32)
        except (PoolError, OSError, ValueError, KeyError):  # a damaged earlier group: compute afresh
            return None
    return None


def _plan(starts: np.ndarray, sizes: np.ndarray, budget: int) -> list[tuple]:
    """Tasks over position ranges of the cluster-sorted order.

    ``("range", lo, hi, [clusters])``: whole clusters loaded together (at most ``budget`` rows);
    ``("piece", c, (lo1, hi1), (lo2, hi2))``: two pieces of a cluster larger than ``budget``."""
    tasks: list[tuple] = []
    cur: list[int] = []
    cur_lo, cur_rows = 0, 0
    for c in np.flatnonzero(sizes > 1):
        c = int(c)
        m, s = int(sizes[c]), int(starts[c])
        if m > budget:
            half = max(1, budget // 2)
            pieces = [(s + p, s + min(p + half, m)) for p in range(0, m, half)]
            for x in range(len(pieces)):
                for y in range(x, len(pieces)):
                    tasks.append(("piece", c, pieces[x], pieces[y]))
            continue
        if cur and s + m - cur_lo > budget:
            tasks.append(("range", cur_lo, cur_lo + cur_rows, cur))
            cur, cur_rows = [], 0
        if not cur:
            cur_lo = s
        cur.append(c)
        cur_rows = s + m - cur_lo
    if cur:
        tasks.append(("range", cur_lo, cur_lo + cur_rows, cur))
    return tasks


def _gather(ds, space: str, lists: list[np.ndarray], dim: int) -> list[np.ndarray]:
    """One streaming pass: the stored vectors of the rows in each list, in the list's order (a row
    may be listed more than once: with probes it is in several clusters of a range)."""
    prepared = []
    for rows in lists:
        srt = np.argsort(rows, kind="stable")
        prepared.append((srt, rows[srt]))
    bufs = [None] * len(lists)
    for start, v in _scan(ds, space):
        for k, (srt, sorted_rows) in enumerate(prepared):
            lo, hi = np.searchsorted(sorted_rows, [start, start + len(v)])
            if hi > lo:
                if bufs[k] is None:
                    bufs[k] = np.zeros((len(sorted_rows), dim), dtype=v.dtype)
                bufs[k][srt[lo:hi]] = v[sorted_rows[lo:hi] - start]
    return [b if b is not None else np.zeros((len(r), dim), np.float32) for b, r in zip(bufs, lists, strict=True)]


def semantic_dedup(pool: Pool, space: str, threshold: float, *, clusters: int | None = None, seed: int = 0,
                   sample: int | None = None, iters: int = DEFAULT_ITERS, force: bool = False,
                   probes: int = 1, progress: bool = False, chunk_bytes: int = CHUNK_BYTES) -> DedupReport:
    """Compute near-duplicate groups of ``space`` at cosine ``threshold`` and store them as the
    derived group ``neardup_<space>_<t>`` (see the module docstring for the exact rule)."""
    import pyarrow as pa

    from dcdb import uids as U
    from dcdb.derived import write_group
    from dcdb.store import DERIVED_DIR, open_lance

    t_start = time.perf_counter()
    spec = check_space(pool, space)
    t = check_threshold(threshold)
    name = group_name(space, t)
    other = computed(pool)
    clash = next((i for i in other.values() if i["name"] == name and (i["space"], i["threshold"]) != (space, t)), None)
    if clash is not None:
        raise UsageError(f"derived group {name!r} already holds near duplicates of {clash['space']} at "
                         f"{clash['threshold']:g}", hint=f"drop it first: dcdb annotate --pool {pool.path} --drop {name}")
    if (pool.path / DERIVED_DIR / name).exists() and not force:
        raise UsageError(f"near duplicates of {space} at threshold {t:g} are already computed (derived group "
                         f"{name!r})", hint="pass --force to recompute them")
    n, dim = pool.rows, int(spec["dim"])
    if clusters is not None and not (1 <= clusters <= max(n, 1)):
        raise UsageError(f"--clusters must be between 1 and the pool's {n:,} rows, got {clusters}",
                         hint="leave it out for the default, round(sqrt(rows / 2))")
    if iters < 1:
        raise UsageError(f"--iters must be at least 1, got {iters}", hint="leave it out for the default")
    k = clusters or default_clusters(n)
    size = min(n, sample if sample is not None else max(SAMPLE_PER_CLUSTER * k, 1))
    if size < k:
        raise UsageError(f"--sample {size:,} is smaller than --clusters {k:,}", hint="sample at least one row per cluster")
    if not (1 <= probes <= k):
        raise UsageError(f"--probes must be between 1 and the {k:,} clusters, got {probes}",
                         hint="1 compares rows within their nearest cluster (SemDeDup); 2 also the second nearest")
    params = {"clusters": k, "seed": seed, "sample": size, "iters": iters, "probes": probes}
    ds = open_lance(pool.lance_path(space))
    phases: dict[str, float] = {}

    # 1-2. clusters: reuse an earlier run's, or sample + spherical k-means + streaming assignment
    cluster = _reusable_clusters(pool, space, params) if n and probes == 1 else None
    reused = cluster is not None and len(cluster) == n
    kinfo: dict[str, Any] = {}
    if reused:
        cluster_p = cluster[:, None]
    else:
        t0 = time.perf_counter()
        x = _sample(ds, space, n, size, seed, pool)
        phases["sample"] = time.perf_counter() - t0
        if len(x) < k:
            raise UsageError(f"only {len(x):,} usable (non-zero, finite) vectors in the sample for {k:,} clusters",
                             hint="lower --clusters or raise --sample")
        t0 = time.perf_counter()
        with _progress(iters, f"k-means {k:,} clusters on {len(x):,} rows", progress, unit="iter") as bar:
            cents, ran = spherical_kmeans(x, k, iters=iters, seed=seed, bar=bar)
        del x
        phases["kmeans"] = time.perf_counter() - t0
        kinfo = {"iterations_run": ran}
        t0 = time.perf_counter()
        cluster_p = np.full((n, probes), -1, dtype=np.int32)
        with _progress(n, f"assign {space}", progress) as bar:
            for start, v in _scan(ds, space):
                xb, ok = _unit(v)
                cluster_p[start : start + len(v)] = np.where(ok[:, None], _assign_top(xb, cents, probes), -1)
                bar.update(len(v))
        phases["assign"] = time.perf_counter() - t0
        cluster = cluster_p[:, 0].copy()

    # 3. pairs within clusters (a row is in each of its `probes` nearest) -> connected components
    t0 = time.perf_counter()
    idx_t = np.int32 if n < np.iinfo(np.int32).max else np.int64
    valid = cluster >= 0
    ent_cluster = cluster_p[valid].ravel()
    order = np.repeat(np.flatnonzero(valid).astype(idx_t), probes)  # rows, sorted by cluster below
    o = np.argsort(ent_cluster, kind="stable")
    order = order[o]
    sizes = np.bincount(ent_cluster, minlength=k)
    del cluster_p, ent_cluster, o
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    sim_row = np.full(n, -np.inf, dtype=np.float32)
    forest: list[tuple[np.ndarray, np.ndarray]] = []  # (row, row of its component's root) per cluster
    itemsize = 2 if spec.get("dtype") == "float16" else 4
    budget = max(2, chunk_bytes // (dim * itemsize))
    tasks = _plan(starts, sizes, budget)
    cut = np.float32(t - TOLERANCE)
    big: dict[int, tuple[_Edges, np.ndarray]] = {}

    def finish(c: int, edges: _Edges, local_sim: np.ndarray) -> None:
        rows = order[int(starts[c]) : int(starts[c] + sizes[c])]
        sim_row[rows] = np.maximum(sim_row[rows], local_sim)  # a row is at most once in a cluster
        lab = edges.labels()
        nontrivial = np.flatnonzero(np.bincount(lab, minlength=edges.m)[lab] > 1)
        if len(nontrivial):
            forest.append((rows[nontrivial], rows[lab[nontrivial]]))

    with _progress(int(sizes[sizes > 1].sum()), f"pairs {space}", progress) as bar:
        for task in tasks:
            if task[0] == "range":
                _, lo, hi, cs = task
                (buf,) = _gather(ds, space, [order[lo:hi]], dim)
                for c in cs:
                    s, m = int(starts[c]), int(sizes[c])
                    v, _ = _unit(buf[s - lo : s - lo + m])
                    edges = _Edges(m)
                    local_sim = np.full(m, -np.inf, dtype=np.float32)
                    _pairs(v, None, cut, edges, local_sim, 0, 0)
                    finish(c, edges, local_sim)
                    bar.update(m)
                del buf
            else:
                _, c, (lo1, hi1), (lo2, hi2) = task
                s, m = int(starts[c]), int(sizes[c])
                edges, local_sim = big.setdefault(c, (_Edges(m), np.full(m, -np.inf, dtype=np.float32)))
                if (lo1, hi1) == (lo2, hi2):
                    (b1,) = _gather(ds, space, [order[lo1:hi1]], dim)
                    _pairs(_unit(b1)[0], None, cut, edges, local_sim, lo1 - s, 0)
                    bar.update(hi1 - lo1)
                else:
                    b1, b2 = _gather(ds, space, [order[lo1:hi1], order[lo2:hi2]], dim)
                    _pairs(_unit(b1)[0], _unit(b2)[0], cut, edges, local_sim, lo1 - s, lo2 - s)
                if hi2 == s + m and hi1 == s + m:  # the last piece pair of this cluster
                    finish(c, *big.pop(c))
    phases["pairs"] = time.perf_counter() - t0

    # 4. groups across clusters (a row in two clusters joins their components); keep the smallest uid
    t0 = time.perf_counter()
    if forest:
        fi = np.concatenate([f[0] for f in forest])
        fj = np.concatenate([f[1] for f in forest])
        members = np.unique(np.concatenate([fi, fj]))
        comp = components(len(members), np.searchsorted(members, fi), np.searchsorted(members, fj))
    else:
        members, comp = np.zeros(0, np.int64), np.zeros(0, np.int64)
    forest.clear()
    member_uids = _uids_at(pool, members)
    _, inv, cnt = np.unique(comp, return_inverse=True, return_counts=True)
    o = np.lexsort((member_uids["f1"], member_uids["f0"], inv))
    first = np.flatnonzero(np.r_[True, inv[o][1:] != inv[o][:-1]]) if len(o) else np.zeros(0, np.int64)
    reps = U.to_arrow(member_uids[o[first]])  # the kept uid of group g is reps[g]
    rep_id = np.full(n, -1, dtype=idx_t)
    rep_id[members] = inv
    group_size = np.ones(n, dtype=np.int32)
    group_size[members] = cnt[inv]
    sim = np.where(np.isfinite(sim_row), sim_row, np.float32(np.nan))
    n_groups = len(cnt)

    cols = group_columns(name)

    def compute(shard):
        a, b = shard["_start"], shard["_start"] + shard["rows"]
        return pa.table({
            cols["cluster"]: pa.array(cluster[a:b], pa.int32()),
            cols["group"]: reps.take(pa.array(rep_id[a:b], mask=rep_id[a:b] < 0)),
            cols["size"]: pa.array(group_size[a:b], pa.int32()),
            cols["sim"]: pa.array(sim[a:b], pa.float32()),
        })

    shards, start = [], 0
    for s in pool.shards:
        shards.append(s | {"_start": start})
        start += s["rows"]
    info = {
        "annotator": KIND,
        "space": space,
        "threshold": t,
        "tolerance": TOLERANCE,
        "kmeans": params,
        **kinfo,
        "clusters_reused": reused,
        "rule": "spherical k-means on L2-normalised float32 vectors; within a cluster, pairs with "
                "cosine >= threshold - tolerance are edges; groups = connected components; keep the "
                "smallest uid of each group",
        "groups": n_groups,
        "rows_in_groups": len(members),
        "probes": probes,
        "dropped": len(members) - n_groups,
        "left_out": int((~valid).sum()),
        "largest_cluster": int(sizes.max()) if len(sizes) else 0,
    }
    write_group(pool, name, compute, info=info, replace=force, shards=shards)
    phases["write"] = time.perf_counter() - t0
    return DedupReport(group=name, space=space, threshold=t, rows=n, clusters=k, groups=n_groups,
                       in_groups=len(members), dropped=len(members) - n_groups, left_out=int((~valid).sum()),
                       seconds=time.perf_counter() - t_start, phases=phases, reused_clusters=reused)


def _uids_at(pool: Pool, rows: np.ndarray) -> np.ndarray:
    """uids (u8,u8) of the given sorted global rows, reading the metadata shard by shard."""
    import pyarrow.parquet as pq

    from dcdb import uids as U

    out = [U.empty()]
    start = 0
    for s, path in zip(pool.shards, pool.metadata_files(), strict=True):
        lo, hi = np.searchsorted(rows, [start, start + s["rows"]])
        if hi > lo:
            col = pq.read_table(path, columns=["uid"]).column("uid")
            out.append(U.from_arrow(col.take(rows[lo:hi] - start), source=str(path)))
        start += s["rows"]
    return np.concatenate(out)
