"""The fraction cut alone -- ``clip_cut(arch, f, NULL)``, DataComp's threshold: the value at index
int(N*f) of the scores sorted in descending order (float32, NaN last) -- by dcdb's radix selection
(dcdb/cuts.py) against the ways to get the same number by sorting or partitioning, same pool, same
run, every value checked equal to numpy's.

    python benchmarks/bench_cuts.py --pool POOL                        # an existing pool
    python benchmarks/bench_cuts.py --workdir /tmp/bench-cuts --rows 12800000   # synth + ingest first

Methods (medians of ``--repeat`` runs; ratios are the method's time over dcdb's):
  order-by-offset  DuckDB: SELECT score FROM pool ORDER BY score DESC NULLS LAST LIMIT 1 OFFSET n
                   (a sort: what the SQL way costs)
  list-partition   DuckDB: one scan collects list(score), np.partition of it (clip_cut before
                   dcdb.cuts; still its path for a score column that is not a float column)
  np-partition     numpy brute force: the column read with pyarrow, np.partition (all in memory)
  np-sort          DataComp's own: -np.sort(-scores)[n] on the column read with pyarrow
  dcdb             SELECT clip_cut(arch, f, NULL) on a fresh connection (connect not timed):
                   clip_cut_select streams the Parquet column, keys kept, radix rounds
  dcdb-stream      the same with no key kept (KEEP_BYTES = 0): two passes over the files, constant
                   memory (the mode of pools whose keys pass 256 MB, 64M+ float32 scores)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

COLUMNS = {"l14": "clip_l14_similarity_score", "b32": "clip_b32_similarity_score"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_pool(workdir: Path, rows: int) -> Path:
    from dcdb.demo.synth import synth_pool
    from dcdb.ingest.pool import ingest

    pool = workdir / f"pool-{rows}"
    if not (pool / "dcdb.json").is_file():
        src = workdir / f"src-{rows}"
        log(f"synth {rows:,} rows (metadata only) + ingest into {pool}")
        synth_pool(src, rows=rows, shards=max(1, rows // 100_000), seed=1, embeddings=False, force=True)
        ingest(src, pool, jobs=os.cpu_count() or 1)
    return pool


def read_scores(pool, column: str) -> np.ndarray:
    import pyarrow.parquet as pq

    parts = [pq.read_table(f, columns=[column]).column(0).to_numpy() for f in pool.metadata_files()]
    return np.concatenate(parts) if parts else np.empty(0, np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", default=None, help="an existing pool (else --workdir/--rows)")
    ap.add_argument("--workdir", default="bench-cuts")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--arch", default="l14", choices=sorted(COLUMNS))
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], help="methods to leave out (e.g. order-by-offset)")
    args = ap.parse_args()

    import dcdb
    from dcdb import cuts
    from dcdb.filters.baselines import fraction_index
    from dcdb.store import open_pool

    pool = open_pool(args.pool or make_pool(Path(args.workdir), args.rows))
    column, f = COLUMNS[args.arch], args.fraction
    scores = read_scores(pool, column)
    n_rows, n_scored = len(scores), int((~np.isnan(scores)).sum())
    n = fraction_index(n_rows, n_scored, f)
    want = float(-np.sort(-scores)[n]) if n < n_rows and n < n_scored else None
    del scores
    log(f"pool {pool.path}: {n_rows:,} rows, {n_scored:,} scored; index {n:,} -> threshold {want!r}")

    def dcdb_cut(keep: bool):
        def run():
            saved = cuts.KEEP_BYTES
            cuts.KEEP_BYTES = saved if keep else 0
            try:
                return fresh["con"].execute(f"SELECT clip_cut('{args.arch}', {f!r}, NULL)").fetchall()[0][0]
            finally:
                cuts.KEEP_BYTES = saved
        return run

    duck = dcdb.connect(pool)
    fresh = {"con": None}

    def order_by_offset():
        return duck.execute(f'SELECT "{column}" FROM pool ORDER BY "{column}" DESC NULLS LAST '
                            f"LIMIT 1 OFFSET {n}").fetchall()[0][0]

    def list_partition():
        tbl = duck.sql(f'SELECT list(CAST("{column}" AS DOUBLE)) FILTER (WHERE "{column}" IS NOT NULL) '
                       "FROM pool").to_arrow_table()
        v = tbl.column(0)[0].values.to_numpy(zero_copy_only=False)
        j = len(v) - 1 - n
        return float(np.partition(v, j)[j]) if 0 <= j < len(v) else None

    def np_partition():
        v = read_scores(pool, column)
        v = v[~np.isnan(v)]
        j = len(v) - 1 - n
        return float(np.partition(v, j)[j]) if 0 <= j < len(v) else None

    def np_sort():
        v = read_scores(pool, column)
        d = -np.sort(-v)
        return None if n >= len(d) or np.isnan(d[n]) else float(d[n])

    methods = {"dcdb": dcdb_cut(True), "dcdb-stream": dcdb_cut(False), "np-partition": np_partition,
               "np-sort": np_sort, "list-partition": list_partition, "order-by-offset": order_by_offset}
    times: dict[str, list[float]] = {m: [] for m in methods if m not in args.skip}
    for r in range(args.repeat):  # interleaved: the machine's load hits every method alike
        for name, spent in times.items():
            if name.startswith("dcdb"):
                fresh["con"] = dcdb.connect(pool)  # no cut remembered
            t0 = time.perf_counter()
            got = methods[name]()
            spent.append(time.perf_counter() - t0)
            if got != want:
                raise SystemExit(f"{name} gave {got!r}, numpy {want!r}")
        log(f"repeat {r + 1}/{args.repeat}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med.get("dcdb")
    print(f"\nclip_cut({args.arch}, {f}) over {n_rows:,} rows, median of {args.repeat} (ratio = time / dcdb's)")
    print(f"{'method':<18}{'seconds':>10}{'ratio':>10}")
    for k, v in med.items():
        print(f"{k:<18}{v:>10.3f}{(v / base if base else float('nan')):>10.2f}")


if __name__ == "__main__":
    main()
