"""Centroid assignment in a query (`image_based` without the stored column) against numpy's GEMM.

    python benchmarks/bench_centroids.py --pool POOL --centroids 4096          # POOL: dcdb ingest output
    python benchmarks/bench_centroids.py --workdir bench-work/centroids --rows 200000
    python benchmarks/bench_centroids.py --ties --rows 200000 --centroids 4096  # exact vs float32 argmax

Same process, same pool, same centroids, alternating, median of ``--repeat``:

  numpy GEMM  the reference: the pool's l14_img streamed from its Lance table (float16 widened to
              float32), ``x @ C.T`` and ``argmax`` per 4,096 rows, over every row of the pool
  image_based `dcdb query image_based` with the assignment computed in the query (no
              ``dcdb annotate centroids`` column): DuckDB hands the rows that pass the caption rules
              to ``nearest_centroid``
  intersect   `image_based_intersect_clip_score` (l14, fraction 0.3): the score threshold first

Printed: wall and CPU seconds, rows assigned, the ratio to the numpy reference over the whole pool
and per assigned row, and intersect against image_based. Like every ``dcdb`` command, the script
shortens OpenBLAS's idle spin before numpy loads (``dcdb.openmp.prefer_short_blas_spin``), for the
reference too. Run it under another checkout's Python
(``/path/to/main/.venv/bin/python benchmarks/bench_centroids.py ...``) for a before/after table.

The pool needs the ``lang`` column (``dcdb annotate --pool P lang``; made here for a generated pool).
Centroids are pool vectors scaled by U(0.5, 2) (as ``bench_baselines.py`` makes them); the ImageNet
stand-ins are 20,000 noisy pool vectors.

``--ties``: how often float32 argmax (numpy's BLAS, torch's einsum, which is DataComp's code)
differs from the exact argmax dcdb computes, and how many rows dcdb re-scored as near-ties: on the
pool's vectors with those centroids, and on a stress case (8 centroids within ~1e-5 of each of 512
centres, vectors drawn towards the centres: nearly every row a near-tie).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

try:  # what every dcdb command does before numpy loads (a checkout from before it has no such call)
    from dcdb.openmp import prefer_short_blas_spin

    prefer_short_blas_spin()
except ImportError:
    pass

import numpy as np  # after the spin setting: OpenBLAS reads it when it loads


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_pool(work: Path, rows: int) -> Path:
    from dcdb.annotate import annotate
    from dcdb.demo.synth import synth_pool
    from dcdb.derived import groups
    from dcdb.ingest.pool import ingest
    from dcdb.store import open_pool

    pool = work / "pool"
    if not (pool / "dcdb.json").is_file():
        synth_pool(work / "src", rows=rows, shards=max(1, rows // 10_000), seed=1, force=True)
        ingest(work / "src", pool, jobs=os.cpu_count() or 1)
    if "lang" not in groups(open_pool(pool)):
        annotate(open_pool(pool), "lang")
    return pool


def make_assets(work: Path, pool: Path, k: int, m: int = 20_000) -> dict[str, str]:
    import lance

    out = work / f"assets_k{k}"
    if not (out / "centroids.npy").is_file():
        out.mkdir(parents=True, exist_ok=True)
        ds = lance.dataset(str(pool / "embeddings" / "l14_img.lance"))
        first = list(range(min(ds.count_rows(), 200_000)))
        emb = ds.take(first, columns=["l14_img"]).column(0).combine_chunks()
        emb = emb.flatten().to_numpy().astype(np.float32).reshape(len(emb), -1)
        rng = np.random.default_rng(0)
        scale = rng.uniform(0.5, 2, (k, 1)).astype(np.float32)
        cents = emb[rng.choice(len(emb), k, replace=len(emb) < k)] * scale
        np.save(out / "centroids.npy", cents.astype(np.float32))
        in1k = emb[rng.choice(len(emb), m)] + 0.05 * rng.normal(size=(m, emb.shape[1])).astype(np.float32)
        np.save(out / "in1k.npy", in1k.astype(np.float16))
    return {"centroids": str(out / "centroids.npy"), "imagenet_embeddings": str(out / "in1k.npy")}


def pool_batches(pool: Path, batch: int = 65_536):
    import lance

    ds = lance.dataset(str(pool / "embeddings" / "l14_img.lance"))
    for b in ds.to_batches(columns=["l14_img"], batch_size=batch):
        col = b.column(0)
        yield col.flatten().to_numpy().reshape(len(col), -1)


def numpy_reference(pool: Path, cents: np.ndarray) -> np.ndarray:
    """DataComp's assignment done the bare numpy way: stream, widen, x @ C.T, argmax."""
    out = []
    for x16 in pool_batches(pool):
        for s in range(0, len(x16), 4096):
            x = x16[s : s + 4096].astype(np.float32)
            out.append(np.argmax(x @ cents.T, axis=1))
    return np.concatenate(out)


def rows_assigned() -> int | None:
    from dcdb.filters import centroids

    return getattr(centroids, "rows_assigned", None)


def clock(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def bench(pool: Path, assets: dict[str, str], repeat: int, save: Path | None = None) -> None:
    from dcdb.query import load_filter, run_filter
    from dcdb.store import open_pool

    cents = np.load(assets["centroids"])
    p = open_pool(pool)
    runs = {
        "numpy GEMM": lambda: numpy_reference(pool, cents),
        "image_based": lambda: run_filter(p, load_filter("image_based"), assets).uids,
        "intersect": lambda: run_filter(p, load_filter("image_based_intersect_clip_score"),
                                        {**assets, "arch": "l14", "fraction": "0.3"}).uids,
    }
    times: dict[str, list] = {k: [] for k in runs}
    assigned: dict[str, int | None] = {}
    outputs: dict[str, int] = {}
    runs["image_based"]()  # warm: the target centroids are computed once per process, the files cached
    for r in range(repeat):
        for name, fn in runs.items():
            before = rows_assigned()
            w, c, out = clock(fn)
            times[name].append((w, c))
            after = rows_assigned()
            assigned[name] = None if before is None else after - before
            outputs[name] = len(out)
            if save is not None and name != "numpy GEMM":
                save.mkdir(parents=True, exist_ok=True)
                np.save(save / f"{name}.npy", out)
            log(f"[{r + 1}/{repeat}] {name}: {w:.2f}s wall, {c:.2f}s cpu, {outputs[name]:,} rows out")
    med = {k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v))
           for k, v in times.items()}
    n = p.rows
    assigned["numpy GEMM"] = n
    print(f"\n{n:,}-row pool, {len(cents):,} x {cents.shape[1]} centroids, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}, median of {repeat}")
    print("| run | wall (s) | cpu (s) | rows assigned | x numpy (wall) | x numpy per assigned row |")
    print("|---|---:|---:|---:|---:|---:|")
    ref_w = med["numpy GEMM"][0]
    for name, (w, c) in med.items():
        a = assigned.get(name)
        count, per = (f"{a:,}", f"{(w / a) / (ref_w / n):.2f}") if a else ("?", "-")
        print(f"| {name} | {w:.2f} | {c:.2f} | {count} | {w / ref_w:.2f} | {per} |")
    print(f"\nintersect / image_based: {med['intersect'][0] / med['image_based'][0]:.2f} (wall), "
          f"{med['intersect'][1] / med['image_based'][1]:.2f} (cpu)")


def ties(pool: Path, assets: dict[str, str], rows: int) -> None:
    import torch

    xs, n = [], 0
    for b in pool_batches(pool):
        xs.append(b[: rows - n].astype(np.float32))
        n += len(xs[-1])
        if n >= rows:
            break
    x = np.concatenate(xs)
    compare(x, np.load(assets["centroids"]), "pool vectors, the benchmark's centroids")
    # Tight groups: 8 centroids within ~1e-4 of each of 512 centres, vectors drawn towards the
    # centres: the top two are often closer than float32 resolves (a stress case, not CLIP's spread).
    rng = np.random.default_rng(5)
    centres = x[rng.choice(len(x), 512, replace=False)]
    cents = np.repeat(centres, 8, axis=0) + rng.normal(scale=4e-6, size=(4096, x.shape[1])).astype(np.float32)
    near = centres[rng.integers(0, 512, len(x))] + 0.5 * x
    near = (near / np.linalg.norm(near, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)
    compare(near, cents.astype(np.float32), "tight groups (stress)")
    del torch


def compare(x: np.ndarray, cents: np.ndarray, what: str) -> None:
    import torch

    from dcdb.filters import centroids as C

    before = getattr(C, "rows_rescored", 0)
    t, _, exact = clock(lambda: C.assign(x, cents))
    rescored = getattr(C, "rows_rescored", 0) - before
    f32 = np.concatenate([np.argmax(x[i : i + 4096] @ cents.T, 1) for i in range(0, len(x), 4096)])
    tt = torch.from_numpy(cents)
    ein = torch.cat([torch.argmax(torch.einsum("ik,jk->ij", torch.from_numpy(x[i : i + 1024]), tt), 1)
                     for i in range(0, len(x), 1024)]).numpy()
    f64 = np.concatenate([np.argmax(x[i : i + 4096].astype(np.float64) @ cents.astype(np.float64).T, 1)
                          for i in range(0, len(x), 4096)])
    print(f"\n{what}: {len(x):,} vectors x {len(cents):,} centroids; dcdb re-scored {rescored:,} rows "
          f"({rescored / len(x):.2%}) as near-ties ({t:.1f}s for the assignment)")
    print(f"  dcdb (exact) vs numpy float64 argmax:       {int((exact != f64).sum())} rows differ")
    print(f"  numpy float32 argmax vs exact:              {int((f32 != exact).sum())} rows differ")
    print(f"  torch einsum float32 (DataComp's) vs exact: {int((ein != exact).sum())} rows differ")
    print(f"  numpy float32 vs torch float32:             {int((f32 != ein).sum())} rows differ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", default=None, help="an ingested pool with l14_img (default: generate one)")
    ap.add_argument("--workdir", default="bench-work/centroids")
    ap.add_argument("--rows", type=int, default=200_000, help="rows of a generated pool / of --ties")
    ap.add_argument("--centroids", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ties", action="store_true", help="count float32 vs exact argmax differences instead")
    ap.add_argument("--save", default=None, help="write the filters' uid lists here (to compare checkouts)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    pool = Path(args.pool) if args.pool else make_pool(work, args.rows)
    assets = make_assets(work, pool, args.centroids)
    if args.ties:
        ties(pool, assets, args.rows)
    else:
        bench(pool, assets, args.repeat, Path(args.save) if args.save else None)


if __name__ == "__main__":
    main()
