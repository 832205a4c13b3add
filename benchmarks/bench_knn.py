"""kNN speed: dcdb's exact path and ANN index against numpy brute force over the same vectors.

    python benchmarks/bench_knn.py --dir /work/bench-knn --rows 1000000 --seeds 10000 -k 10 --clusters 1000

Makes (once) a synthetic pool of ``--rows`` rows with ``dcdb synth pool`` + ``dcdb ingest`` under
``--dir`` (768-d float16 ``l14_img`` as in DataComp; ``--clusters K``: the clustered, CLIP-like
vectors of ``dcdb synth pool --clusters``, else the default near structure-free ones), then, each
step in its own process so that its peak RSS is its own:

* ``numpy``: the baseline. Every vector loaded from the Lance table into one float32 matrix (load
  timed separately), normalised, then per chunk of 256 seeds one matmul + ``argpartition`` +
  sort of the top k. Needs the whole pool in RAM (rows x 768 x 4 bytes).
* ``exact``: ``dcdb.vectors.scan.exact_search`` (streaming, bounded memory), the same seeds.
* ``index``: ``dcdb.vectors.ann.build_index`` (``--kind``, ``--partitions``) build time.
* ``ann``: ``dcdb.vectors.knn.search(..., ann_only=True)`` through the index at each ``--nprobes``
  of the curve, recall@k measured on 64 seeds as ``dcdb knn`` does (its exact re-run is counted in
  the time), plus the recall against the full exact result: the recall / speed-up curve.
* ``--where SQL``: the same for a pre-filter: exact over the passing rows vs ANN probing only them
  (Lance row allow list).
* ``auto``: what ``dcdb knn`` picks without --exact/--ann (the cost model) and its estimates.
* ``--stats``: the spread of the pool's vectors (mean pairwise cosine, nearest-neighbour cosines,
  participation ratio) on a sample, the statistics the clustered synth matches to CLIP.

Seeds (``--seed-kind``): ``near`` = random pool rows plus Gaussian noise (cosine ~0.8 to their
row: what kNN subset building looks for), ``random`` = random unit vectors (no structure at all;
the worst case for an ANN index). Prints times, ratios against numpy, peak RSS. The machine has 2
shared cores: numbers are noisy, medians of ``--repeat`` runs are reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SPACE = "l14_img"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_pool(d: Path, rows: int, clusters: int = 0) -> Path:
    pool = d / (f"pool-{rows}" + (f"-c{clusters}" if clusters else ""))
    if (pool / "dcdb.json").is_file():
        return pool
    src = d / f"src-{rows}"
    shards = max(1, rows // 62_500)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dcdb", "-q", "synth", "pool", str(src), "--rows", str(rows),
                    "--shards", str(shards), "--clusters", str(clusters), "--force"], check=True)
    subprocess.run([sys.executable, "-m", "dcdb", "-q", "ingest", str(src), str(pool)], check=True)
    print(f"made pool {pool} ({rows:,} rows) in {time.perf_counter() - t0:.0f}s", flush=True)
    return pool


def make_seeds(pool: Path, n: int, kind: str, seed: int = 0) -> Path:
    from dcdb.vectors.seeds import vectors_of_rows
    from dcdb.store import open_pool

    out = pool.parent / f"seeds-{pool.name}-{kind}-{n}.npy"
    if out.is_file():
        return out
    rng = np.random.default_rng(seed)
    p = open_pool(pool)
    dim = int(p.spaces[SPACE]["dim"])
    if kind == "random":
        s = rng.standard_normal((n, dim)).astype(np.float32)
    else:
        rows = np.sort(rng.choice(p.rows, size=n, replace=False))
        base = vectors_of_rows(p, SPACE, rows)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        s = base + rng.standard_normal(base.shape).astype(np.float32) * (0.75 / np.sqrt(dim))
    np.save(out, s / np.linalg.norm(s, axis=1, keepdims=True))
    return out


# ----------------------------------------------------------------------------- the steps


def step_numpy(pool: str, seeds: str, k: int, out: str) -> dict:
    import lance

    t0 = time.perf_counter()
    ds = lance.dataset(str(Path(pool) / "embeddings" / f"{SPACE}.lance"))
    parts = []
    for b in ds.to_batches(columns=[SPACE], batch_size=1 << 16, scan_in_order=True):
        col = b.column(0)
        parts.append(col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(np.float32))
    p = np.concatenate(parts)
    del parts
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    load = time.perf_counter() - t0
    s = np.load(seeds).astype(np.float32)
    t1 = time.perf_counter()
    rows = np.empty((len(s), k), dtype=np.int64)
    for i in range(0, len(s), 256):
        sims = s[i : i + 256] @ p.T
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(sims, idx, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        rows[i : i + 256] = np.take_along_axis(idx, order, axis=1)
    compute = time.perf_counter() - t1
    np.save(out, rows)
    return {"load_s": load, "search_s": compute, "total_s": load + compute, "rss_mb": _rss_mb()}


def step_exact(pool: str, seeds: str, k: int, out: str) -> dict:
    from dcdb.vectors.scan import exact_search
    from dcdb.store import open_pool

    s = np.load(seeds).astype(np.float32)
    t0 = time.perf_counter()
    res = exact_search(open_pool(pool), SPACE, s, k)
    total = time.perf_counter() - t0
    np.save(out, res.rows)
    return {"total_s": total, "rss_mb": _rss_mb()}


def vector_stats(pool: str, n: int = 100_000, queries: int = 1000, seed: int = 0) -> dict:
    """Spread of the pool's vectors: mean pairwise cosine and participation ratio (sum(l)^2 /
    sum(l^2) of the covariance eigenvalues; dims holding 90% of the variance) on ``n`` sampled
    rows; cosine of the nearest and 10th nearest other row in the whole pool (percentiles over
    ``queries`` sampled rows, searched exactly)."""
    from dcdb.vectors.scan import exact_search
    from dcdb.vectors.seeds import vectors_of_rows
    from dcdb.store import open_pool

    p = open_pool(pool)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(p.rows, size=min(n, p.rows), replace=False))
    x = vectors_of_rows(p, SPACE, rows).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    m = len(x)
    mu = x.mean(0)
    ev = np.linalg.eigvalsh(np.cov((x - mu).T))[::-1]
    q = x[rng.choice(m, size=min(queries, m), replace=False)]
    sims = exact_search(p, SPACE, q, 11).sims  # rank 0 is the row itself
    return {"mean_pairwise_cos": round(float((m * m * (mu @ mu) - m) / (m * (m - 1))), 3),
            "nn_cos_p10_p50_p90": [round(float(v), 3) for v in np.percentile(sims[:, 1], [10, 50, 90])],
            "nn10_cos_p50": round(float(np.median(sims[:, 10])), 3),
            "participation_ratio": round(float(ev.sum() ** 2 / (ev ** 2).sum()), 1),
            "dims_90pct_var": int(np.searchsorted(np.cumsum(ev) / ev.sum(), 0.9)) + 1}


def step_index(pool: str, kind: str, partitions: int | None) -> dict:
    from dcdb.vectors.ann import build_index
    from dcdb.store import open_pool

    t0 = time.perf_counter()
    from dcdb.vectors.ann import DEFAULT_KIND

    rec = build_index(open_pool(pool), SPACE, kind=kind or DEFAULT_KIND, partitions=partitions, force=True)
    return {"build_s": time.perf_counter() - t0, "rss_mb": _rss_mb(), "params": rec["params"], "kind": rec["kind"]}


def step_ann(pool: str, seeds: str, k: int, out: str, min_recall: float | None, nprobes: int | None = None,
             where: str | None = None) -> dict:
    from dcdb.vectors.knn import search
    from dcdb.store import open_pool

    s = np.load(seeds).astype(np.float32)
    t0 = time.perf_counter()
    res = search(open_pool(pool), SPACE, s, k, min_recall=min_recall, nprobes=nprobes, where=where, ann_only=True)
    total = time.perf_counter() - t0
    np.save(out, res.rows)
    return {"total_s": total, "ann_s": res.details.get("ann_seconds"), "mode": res.mode, "recall_sample": res.recall,
            "details": res.details, "rss_mb": _rss_mb()}


def step_where_exact(pool: str, seeds: str, k: int, out: str, where: str) -> dict:
    from dcdb.vectors.knn import search
    from dcdb.store import open_pool

    s = np.load(seeds).astype(np.float32)
    t0 = time.perf_counter()
    res = search(open_pool(pool), SPACE, s, k, where=where, exact=True)
    total = time.perf_counter() - t0
    np.save(out, res.rows)
    return {"total_s": total, "eligible": res.eligible_rows, "rss_mb": _rss_mb()}


def step_auto(pool: str, n_seeds: int, k: int) -> dict:
    from dcdb.vectors.ann import choose_mode
    from dcdb.store import open_pool

    p = open_pool(pool)
    out = {}
    for n in sorted({64, 1000, n_seeds}):
        mode, why, est = choose_mode(p, SPACE, n, k)
        out[n] = {"mode": mode, "why": why, "estimate_s": {m: round(v, 1) for m, v in est.items()}}
    return out


def step_stats(pool: str) -> dict:
    return vector_stats(pool)


STEPS = {"numpy": step_numpy, "exact": step_exact, "index": step_index, "ann": step_ann,
         "where_exact": step_where_exact, "auto": step_auto, "stats": step_stats}


def run_step(name: str, *args) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--step", name, json.dumps(args)], check=True,
                          capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def recall(a: np.ndarray, b: np.ndarray) -> float:
    k = b.shape[1]
    return float(np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(a, b, strict=True)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/work/bench-knn")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--clusters", type=int, default=0, help="dcdb synth pool --clusters K (0: default vectors)")
    ap.add_argument("--seeds", type=int, default=10_000)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--seed-kind", choices=["near", "random"], default="near")
    ap.add_argument("--kind", default=None, help="index kind (default: dcdb.vectors.ann.DEFAULT_KIND)")
    ap.add_argument("--partitions", type=int, default=None)
    ap.add_argument("--nprobes", default="", help="comma-separated nprobes of the recall/speed curve "
                    "(default: the index's default only)")
    ap.add_argument("--where", default=None, help="also measure this pre-filter (exact vs ANN)")
    ap.add_argument("--min-recall", type=float, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--skip-numpy", action="store_true", help="no numpy baseline (its RAM: rows x 768 x 4 bytes)")
    ap.add_argument("--skip-ann", action="store_true")
    ap.add_argument("--reuse-index", action="store_true", help="keep the pool's index if it has one")
    ap.add_argument("--stats", action="store_true", help="print the spread of the pool's vectors")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("step_args", nargs="?", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.step:
        print(json.dumps(STEPS[a.step](*json.loads(a.step_args)), default=str))
        return
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    pool = make_pool(d, a.rows, a.clusters)
    seeds = make_seeds(pool, a.seeds, a.seed_kind)
    tag = f"{pool.name}-{a.seeds}-{a.k}-{a.seed_kind}"
    outs = {n: str(d / f"rows-{n}-{tag}.npy") for n in ("numpy", "exact", "ann", "where_exact", "where_ann")}
    vectors = f"clustered (--clusters {a.clusters})" if a.clusters else "default synth"
    import os

    print(f"pool {a.rows:,} x 768 float16, {vectors} vectors, {a.seeds:,} {a.seed_kind} seeds, k={a.k}; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start, medians of {a.repeat}", flush=True)
    if a.stats:
        print(f"vector spread: {run_step('stats', str(pool))}", flush=True)
    med = lambda runs, key: statistics.median(r[key] for r in runs)
    ex_runs = [run_step("exact", str(pool), str(seeds), a.k, outs["exact"]) for _ in range(a.repeat)]
    ex_total = med(ex_runs, "total_s")
    if not a.skip_numpy:
        np_runs = [run_step("numpy", str(pool), str(seeds), a.k, outs["numpy"]) for _ in range(a.repeat)]
        np_total, np_search = med(np_runs, "total_s"), med(np_runs, "search_s")
        same = recall(np.load(outs["exact"]), np.load(outs["numpy"]))
        print(f"numpy brute force: {np_total:.1f}s (load {med(np_runs, 'load_s'):.1f}s + search {np_search:.1f}s), "
              f"peak RSS {max(r['rss_mb'] for r in np_runs):,.0f} MB")
        print(f"dcdb exact:        {ex_total:.1f}s = {ex_total / np_total:.2f}x numpy total "
              f"({ex_total / np_search:.2f}x numpy search alone), peak RSS {max(r['rss_mb'] for r in ex_runs):,.0f} MB, "
              f"agreement with numpy {same:.4f}", flush=True)
    else:
        print(f"dcdb exact:        {ex_total:.1f}s, peak RSS {max(r['rss_mb'] for r in ex_runs):,.0f} MB", flush=True)
    if a.skip_ann:
        return
    rec_path = pool / "indexes" / f"{SPACE}.json"
    if not (a.reuse_index and rec_path.is_file()):
        ix = run_step("index", str(pool), a.kind, a.partitions)
        print(f"index {ix['kind']} {ix['params']}: build {ix['build_s']:.1f}s ({ix['build_s'] / a.rows * 1e6:.0f} us/row), "
              f"peak RSS {ix['rss_mb']:,.0f} MB", flush=True)
    else:
        print(f"index (kept): {json.loads(rec_path.read_text())['params']}", flush=True)
    print(f"auto (cost model) picks: {run_step('auto', str(pool), a.seeds, a.k)}", flush=True)
    print("recall/speed curve (ANN time includes the 64-seed exact recall check, as `dcdb knn` runs it):")
    print(f"  {'nprobes':>7} {'ANN s':>7} {'queries s':>9} {'speed-up':>8} {'recall@' + str(a.k):>9} {'sample':>7}")
    for npr in [int(v) for v in a.nprobes.split(",") if v] or [None]:
        runs = [run_step("ann", str(pool), str(seeds), a.k, outs["ann"], a.min_recall, npr) for _ in range(a.repeat)]
        total = med(runs, "total_s")
        r0 = runs[0]
        true_recall = recall(np.load(outs["ann"]), np.load(outs["exact"]))
        print(f"  {r0['details'].get('nprobes'):>7} {total:>7.1f} {r0['ann_s']:>9.1f} {ex_total / total:>7.1f}x "
              f"{true_recall:>9.4f} {r0['recall_sample']:>7.3f}   mode {r0['mode']}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end of the curve", flush=True)
    if a.where:
        wx = run_step("where_exact", str(pool), str(seeds), a.k, outs["where_exact"], a.where)
        wa = run_step("ann", str(pool), str(seeds), a.k, outs["where_ann"], a.min_recall, None, a.where)
        wr = recall(np.load(outs["where_ann"]), np.load(outs["where_exact"]))
        print(f"--where {a.where!r} ({wx['eligible']:,} rows pass): exact {wx['total_s']:.1f}s, ANN probing only the "
              f"passing rows {wa['total_s']:.1f}s = {wx['total_s'] / wa['total_s']:.1f}x, recall@{a.k} {wr:.4f}", flush=True)


if __name__ == "__main__":
    main()
