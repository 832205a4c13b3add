"""Dedup on a pool of N rows (default 1M): exact (sha256, url, normalised text) and semantic
(SemDeDup-style k-means + per-cluster pairwise cosine), each against a named baseline measured in
the same run.

    python benchmarks/bench_dedup.py --rows 1000000 --workdir /work/bench-dedup

The pool is made once in WORKDIR (reused by later runs with the same --rows): ``dcdb synth pool``'s
metadata (no embeddings) plus one embedding space ``l14_img`` (768-d float16, unit norm, clustered
around 256 concepts like synth's) with planted duplicates: per shard 2% exact duplicates (same
sha256 and vector; half also the same url; same caption), 3% near duplicates (a vector at cosine
0.90-0.995 of another row's, the caption re-cased and re-spaced so that only normalised text
matches), then ``dcdb ingest``.

Exact dedup, ``SELECT count(*) FROM exact_duplicates(KEY)`` through ``dcdb.connect`` vs pandas
(``read_parquet`` of uid + key, ``sort_values('uid')``, ``duplicated(KEY)``; the text key
normalised with pandas' vectorised str methods), median of --repeats runs, counts checked equal.

Semantic dedup, ``dcdb dedup``'s library call (``dcdb.vectors.dedup.semantic_dedup``: k-means on a sample,
streaming assignment, per-cluster blocks) vs a naive numpy SemDeDup over the *same* cluster ids:
all vectors loaded into RAM as float32, one full similarity matrix per cluster, scipy
connected components. The kept/dropped sets are checked equal. Peak RSS is read per phase
(``ru_maxrss`` of a fresh child process for each side, so they do not hide each other).

The machine has 2 cores shared with other work: numbers are noisy; times are medians where
repeated, and one-shot for the long semantic runs (say so when quoting them).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from _timing import timed

DIM = 768
SPACE = "l14_img"
N_CONCEPTS = 256
NOISE_RANK = 64


# ------------------------------------------------------------------------------------ data


def _shard_vectors(rng, n, cent, basis):
    concept = rng.integers(0, N_CONCEPTS, n)
    z = rng.standard_normal((n, NOISE_RANK), dtype=np.float32) / np.float32(np.sqrt(NOISE_RANK))
    v = z @ basis
    v += np.float32(0.7) * cent[concept]
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def _near(rng, v, cos):
    u = rng.standard_normal(v.shape, dtype=np.float32)
    u -= np.einsum("ij,ij->i", u, v)[:, None] * v
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    c = cos.astype(np.float32)[:, None]
    out = c * v + np.sqrt(1 - c * c) * u
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _vary_text(rng, texts):
    out = []
    for t in texts:
        r = rng.random()
        if r < 0.3:
            t = t.upper()
        elif r < 0.6:
            t = "  " + t.replace(" ", "   ") + " "
        else:
            t = t.title()
        out.append(t)
    return out


def build_pool(workdir: Path, rows: int, shards: int, seed: int = 0) -> Path:
    """Make (once) WORKDIR/pool-<rows> with planted duplicates; return the pool path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dcdb.ingest.pool import ingest
    from dcdb.demo.synth import synth_pool, write_npz

    pool = workdir / f"pool-{rows}"
    if (pool / "dcdb.json").is_file():
        return pool
    src = workdir / f"src-{rows}"
    t0 = time.perf_counter()
    synth_pool(src, rows=rows, shards=shards, seed=seed, embeddings=False, force=True, jobs=1)
    grng = np.random.default_rng([seed, 99])
    cent = grng.standard_normal((N_CONCEPTS, DIM), dtype=np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    basis = grng.standard_normal((NOISE_RANK, DIM), dtype=np.float32) / np.float32(np.sqrt(DIM))
    for i, path in enumerate(sorted(src.glob("*.parquet"))):
        rng = np.random.default_rng([seed, 100 + i])
        tbl = pq.read_table(path)
        n = tbl.num_rows
        vec = _shard_vectors(rng, n, cent, basis)
        role = rng.random(n)
        exact = np.flatnonzero(role < 0.02)
        near = np.flatnonzero((role >= 0.02) & (role < 0.05))
        originals = np.flatnonzero(role >= 0.05)
        cols = {name: tbl.column(name).to_pylist() for name in ("url", "text", "sha256")}
        src_e = rng.choice(originals, len(exact))
        src_n = rng.choice(originals, len(near))
        vec[exact] = vec[src_e]
        vec[near] = _near(rng, vec[src_n], rng.uniform(0.90, 0.995, len(near)))
        same_url = rng.random(len(exact)) < 0.5
        for k, j, su in zip(exact, src_e, same_url, strict=True):
            cols["sha256"][k] = cols["sha256"][j]
            cols["text"][k] = cols["text"][j]
            if su:
                cols["url"][k] = cols["url"][j]
        for k, t in zip(near, _vary_text(rng, [cols["text"][j] for j in src_n]), strict=True):
            cols["text"][k] = t
        for name, values in cols.items():
            tbl = tbl.set_column(tbl.schema.get_field_index(name), name, pa.array(values, pa.string()))
        pq.write_table(tbl, path)
        write_npz(path.with_suffix(".npz"), {SPACE: vec.astype(np.float16)})
    ingest(src, pool, jobs=min(2, os.cpu_count() or 1))
    import shutil

    shutil.rmtree(src, ignore_errors=True)
    print(f"built {pool} ({rows:,} rows, {shards} shards) in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return pool


# ------------------------------------------------------------------------------------ exact


def _normalise_text_pandas(s):
    import unicodedata

    s = s.map(lambda t: None if t is None else unicodedata.normalize("NFKC", t))
    return s.str.lower().str.split().str.join(" ")


def exact_pandas(pool: Path, key: str) -> int:
    import pandas as pd

    from dcdb.store import open_pool

    p = open_pool(pool)
    df = pd.concat([pd.read_parquet(f, columns=["uid", key]) for f in p.metadata_files()], ignore_index=True)
    if key == "text":
        df["text"] = _normalise_text_pandas(df["text"])
        df.loc[df["text"] == "", "text"] = None
    df = df[df[key].notna()].sort_values("uid")
    return int(df.duplicated(key).sum())


def exact_dcdb(pool: Path, key: str) -> int:
    import dcdb

    con = dcdb.connect(pool)
    return int(con.execute(f"SELECT count(*) FROM exact_duplicates('{key}')").fetchall()[0][0])



# --------------------------------------------------------------------------------- semantic


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(fn, args, q):
    t0 = time.perf_counter()
    out = fn(*args)
    q.put((time.perf_counter() - t0, _rss_mb(), out))


def in_child(fn, *args):
    """Run fn(*args) in a fresh process: (seconds, peak RSS MB, result)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, q))
    proc.start()
    res = q.get()
    proc.join()
    return res


def semantic_dcdb(pool: str, threshold: float, clusters: int | None, seed: int, probes: int = 1):
    from dcdb.vectors.dedup import computed, semantic_dedup
    from dcdb.derived import drop_group
    from dcdb.store import open_pool

    p = open_pool(pool)
    for (space, _), info in computed(p).items():  # a fresh run: no clusters to reuse
        if space == SPACE:
            drop_group(p, info["name"])
    rep = semantic_dedup(p, SPACE, threshold, clusters=clusters, seed=seed, probes=probes)
    return {"phases": rep.phases, "dropped": rep.dropped, "groups": rep.groups, "clusters": rep.clusters}


def semantic_naive(pool: str, threshold: float):
    """Naive SemDeDup over dcdb's own cluster ids: everything in RAM, one matrix per cluster."""
    import lance
    import pyarrow.parquet as pq
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from dcdb.vectors.dedup import TOLERANCE, group_info
    from dcdb.store import open_pool

    p = open_pool(pool)
    info = group_info(p, SPACE, threshold)
    files = sorted(Path(info["path"]).glob("*.parquet"))
    cluster = np.concatenate([pq.read_table(f).column(info["columns"]["cluster"]).to_numpy() for f in files])
    uid = np.concatenate([pq.read_table(f, columns=["uid"]).column(0).to_numpy(zero_copy_only=False)
                          for f in p.metadata_files()])
    t0 = time.perf_counter()
    tbl = lance.dataset(str(p.lance_path(SPACE))).to_table(columns=[SPACE])
    vec = tbl.column(0).combine_chunks().values.to_numpy().reshape(-1, DIM).astype(np.float32)
    del tbl
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    load = time.perf_counter() - t0
    order = np.argsort(cluster, kind="stable")
    bounds = np.flatnonzero(np.diff(cluster[order])) + 1
    drop = []
    for members in np.split(order, bounds):
        if cluster[members[0]] < 0 or len(members) < 2:
            continue
        v = vec[members]
        sim = v @ v.T
        i, j = np.nonzero(np.triu(sim >= threshold - TOLERANCE, 1))
        if not len(i):
            continue
        g = coo_matrix((np.ones(len(i)), (i, j)), shape=(len(members),) * 2)
        _, label = connected_components(g, directed=False)
        u = uid[members]
        o = np.lexsort((u, label))
        first = np.r_[True, label[o][1:] != label[o][:-1]]
        sizes = np.bincount(label)
        in_group = sizes[label[o]] > 1
        drop.extend(u[o][~first & in_group].tolist())
    return {"load_s": load, "dropped": sorted(drop)}


def planted_pairs(rows: int, shards: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, its original's row, planted cosine) of every near duplicate ``build_pool`` planted,
    replaying its random draws (no vectors are made)."""
    from dcdb.demo.synth import shard_rows

    out_k, out_j, out_c, start = [], [], [], 0
    for i, n in enumerate(shard_rows(rows, shards)):
        rng = np.random.default_rng([seed, 100 + i])
        rng.integers(0, N_CONCEPTS, n)
        rng.standard_normal((n, NOISE_RANK), dtype=np.float32)
        role = rng.random(n)
        exact = np.flatnonzero(role < 0.02)
        near = np.flatnonzero((role >= 0.02) & (role < 0.05))
        originals = np.flatnonzero(role >= 0.05)
        rng.choice(originals, len(exact))
        src_n = rng.choice(originals, len(near))
        cos = rng.uniform(0.90, 0.995, len(near))
        out_k.append(near + start)
        out_j.append(src_n + start)
        out_c.append(cos)
        start += n
    return np.concatenate(out_k), np.concatenate(out_j), np.concatenate(out_c)


def recall(pool: str, rows: int, shards: int, threshold: float, seed: int) -> str:
    """How many planted near-duplicate pairs clearly above the threshold ended in one group (the
    rest were split by a k-means boundary), and how many clearly below were linked directly."""
    import pyarrow.parquet as pq

    from dcdb.vectors.dedup import group_info
    from dcdb.store import open_pool

    info = group_info(open_pool(pool), SPACE, threshold)
    files = sorted(Path(info["path"]).glob("*.parquet"))
    group = np.concatenate([pq.read_table(f, columns=[info["columns"]["group"]]).column(0).to_numpy(
        zero_copy_only=False) for f in files])
    k, j, c = planted_pairs(rows, shards, seed)
    above = c >= threshold + 0.005  # float16 storage moves a cosine by ~1e-3
    found = (group[k] == group[j]) & np.not_equal(group[k], None)
    return (f"planted near-duplicate pairs at cosine >= {threshold + 0.005:g}: {found[above].mean():.2%} of "
            f"{above.sum():,} found in one group (the rest split by k-means boundaries)")


def dropped_dcdb(pool: str, threshold: float) -> list[str]:
    import dcdb

    con = dcdb.connect(pool)
    return sorted(r[0] for r in con.execute(f"SELECT uid FROM near_duplicates('{SPACE}', {threshold})").fetchall())


# ------------------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=Path("/work/bench-dedup"))
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--clusters", type=int, default=None, help="k-means clusters (default: dcdb's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probes", type=int, default=1, help="clusters per row (> 1: no naive baseline, recall only)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per exact-dedup measurement (median)")
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--skip-semantic", action="store_true")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    pool = build_pool(args.workdir, args.rows, args.shards, args.seed)
    print(f"pool {pool}: {args.rows:,} rows; 2 shared cores, timings noisy (medians of {args.repeats})")
    results = {"rows": args.rows}
    if not args.skip_exact:
        print("\nexact dedup: rows dropped by exact_duplicates(KEY) vs pandas duplicated() (baseline)")
        print(f"{'key':8} {'dropped':>9} {'dcdb s':>8} {'pandas s':>9} {'dcdb/pandas':>12}")
        for key in ("sha256", "url", "text"):
            td, nd = timed(lambda k=key: exact_dcdb(pool, k), args.repeats)
            tp, np_ = timed(lambda k=key: exact_pandas(pool, k), args.repeats)
            ok = "" if nd == np_ else f"   MISMATCH pandas {np_:,}"
            print(f"{key:8} {nd:>9,} {td:>8.2f} {tp:>9.2f} {td / tp:>12.2f}{ok}")
            results[f"exact_{key}"] = {"dropped": nd, "dcdb_s": td, "pandas_s": tp}
    if not args.skip_semantic:
        print(f"\nsemantic dedup of {SPACE}, threshold {args.threshold} (one run each; fresh process each)")
        sd, rss_d, rep = in_child(semantic_dcdb, str(pool), args.threshold, args.clusters, args.seed, args.probes)
        print(f"dcdb dedup: {sd:.1f}s total, peak RSS {rss_d:,.0f} MB; {rep['clusters']:,} clusters, "
              f"{args.probes} probe(s), {rep['groups']:,} groups, {rep['dropped']:,} rows dropped")
        print("  phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in rep["phases"].items()))
        if args.probes > 1:
            print("  " + recall(str(pool), args.rows, args.shards, args.threshold, args.seed))
            print("\n" + json.dumps(results | {"semantic": {"dcdb_s": sd, "dcdb_rss_mb": rss_d, **rep}}))
            return
        sn, rss_n, naive = in_child(semantic_naive, str(pool), args.threshold)
        pair_d = rep["phases"].get("pairs", float("nan"))
        pair_n = sn - naive["load_s"]
        print(f"naive numpy SemDeDup over the same clusters (baseline): {sn:.1f}s total "
              f"({naive['load_s']:.1f}s loading + normalising every vector, {pair_n:.1f}s pairwise), "
              f"peak RSS {rss_n:,.0f} MB")
        same = dropped_dcdb(str(pool), args.threshold) == naive["dropped"]
        # dcdb's pairs phase streams and normalises its vectors itself: compare it with the naive total
        print(f"  given the clusters (load + pairs + groups): dcdb {pair_d:.1f}s / naive {sn:.1f}s = "
              f"{pair_d / sn:.2f}; peak RSS dcdb/naive = {rss_d / rss_n:.2f}; "
              f"dropped sets {'identical' if same else 'DIFFER'} ({len(naive['dropped']):,})")
        print("  " + recall(str(pool), args.rows, args.shards, args.threshold, args.seed))
        results["semantic"] = {"dcdb_s": sd, "dcdb_rss_mb": rss_d, "phases": rep["phases"], "naive_s": sn,
                               "naive_load_s": naive["load_s"], "naive_rss_mb": rss_n, "same": same,
                               "dropped": rep["dropped"], "groups": rep["groups"], "clusters": rep["clusters"]}
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
