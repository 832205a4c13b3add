"""Benchmark ``dcdb ingest`` against a naive single-process ingest written by hand.

    python benchmarks/bench_ingest.py                                  # 1M rows, float16 embeddings
    python benchmarks/bench_ingest.py --metadata-only --rows 12800000  # DataComp small's row count

The source pool is generated once with ``dcdb.demo.synth.synth_pool`` under ``--workdir`` and reused by
later runs with the same arguments. Each ingest runs in a fresh child process while this process
samples the resident memory of that child's whole process tree (workers included) from /proc, so
"tree RSS" is the largest simultaneous sum, not one process's maximum. Beside it, from
``resource.getrusage`` inside the child: the max RSS of the main process and of the largest
worker (an upper bound of the tree is main + jobs x worker).

The baseline is what one writes by hand: per shard, pandas reads the parquet and writes it back,
numpy loads the npz, and ``lance.write_dataset`` appends each embedding array (legacy format, as
dcdb uses) -- one process, no validation, no resume.

Before each timed run the benchmark flushes earlier writes (``os.sync``) and reads the whole source
once, so every method starts with the source in the page cache and no writeback debt. With
embeddings the run is bound by writing ~5 GB per 1M rows, so the disk sets the pace.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DCDB_INGEST = """
import json, sys
from dcdb.ingest.pool import ingest
r = ingest(sys.argv[1], sys.argv[2], jobs=int(sys.argv[3]), progress=False)
import resource
ru = lambda who: resource.getrusage(who).ru_maxrss * 1024
print(json.dumps({"rows": r.rows, "bytes_read": r.bytes_read, "seconds": r.seconds, "dups": r.duplicate_uids,
                  "self_rss": ru(resource.RUSAGE_SELF), "worker_rss": ru(resource.RUSAGE_CHILDREN)}))
"""

NAIVE_INGEST = """
import json, sys, time
from pathlib import Path
import numpy as np, pandas as pd, pyarrow as pa

src, out = Path(sys.argv[1]), Path(sys.argv[2])
t0 = time.perf_counter()
(out / "metadata").mkdir(parents=True)
rows = nbytes = 0
written = set()
for pq_path in sorted(src.glob("*.parquet")):
    df = pd.read_parquet(pq_path)
    df.to_parquet(out / "metadata" / pq_path.name)
    rows += len(df)
    nbytes += pq_path.stat().st_size
    npz_path = pq_path.with_suffix(".npz")
    if npz_path.exists():
        import lance
        nbytes += npz_path.stat().st_size
        with np.load(npz_path) as z:
            for key in z.files:
                arr = z[key]
                vec = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])
                table = pa.table({"uid": pa.array(df["uid"].tolist()), key: vec})
                mode = "append" if key in written else "create"
                lance.write_dataset(table, str(out / f"{key}.lance"), mode=mode,
                                    data_storage_version="legacy")
                written.add(key)
import resource
print(json.dumps({"rows": rows, "bytes_read": nbytes, "seconds": time.perf_counter() - t0, "dups": None,
                  "self_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "worker_rss": 0}))
"""


# ----------------------------------------------------------------------------- RSS sampling


def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants, from /proc (0 where unavailable)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * page
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return sum(rss.get(p, 0) for p in tree)


def settle(src: Path) -> None:
    """Same starting point for every method: earlier writes flushed, the source in page cache."""
    os.sync()
    for path in sorted(src.iterdir()):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def run_measured(code: str, args: list[str]) -> dict:
    """Run ``python -c code args`` and return its JSON result plus wall time and peak tree RSS."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, env=env, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["wall"] = wall
    result["peak_rss"] = peak
    return result


# ------------------------------------------------------------------------------------- main


def ensure_source(workdir: Path, rows: int, shards: int, embeddings: bool, dtype: str, seed: int) -> Path:
    """Generate the source pool once; reuse it when a finished one with these arguments exists."""
    from dcdb.demo.synth import synth_pool

    kind = dtype if embeddings else "meta"
    src = workdir / f"src-{rows}-{shards}-{kind}-{seed}"
    done = src / "_synth.json"
    if done.is_file():
        print(f"reusing source {src}", file=sys.stderr)
        return src
    t0 = time.perf_counter()
    info = synth_pool(
        src,
        rows=rows,
        shards=shards,
        seed=seed,
        dtype=dtype,
        embeddings=embeddings,
        force=True,
        progress=True,
    )
    info["seconds"] = time.perf_counter() - t0
    done.write_text(json.dumps(info))  # not *.parquet: ingest ignores it
    print(f"generated {rows:,} rows in {info['seconds']:.1f}s", file=sys.stderr)
    return src


def _row(name: str, r: dict) -> str:
    mb = r["bytes_read"] / 1e6
    return (
        f"{name:<28} {r['wall']:>8.1f} {r['rows'] / r['wall']:>12,.0f} {mb / r['wall']:>9.1f} "
        f"{r['peak_rss'] / 2**20:>11,.0f} {r['self_rss'] / 2**20:>11,.0f} {r['worker_rss'] / 2**20:>11,.0f}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dcdb-bench-ingest"))
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=None, help="default: one per 100,000 rows")
    ap.add_argument("--metadata-only", action="store_true")
    ap.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-baseline", action="store_true", help="skip the naive single-process ingest")
    ap.add_argument("--keep", action="store_true", help="keep the ingested pools")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    shards = args.shards or max(1, args.rows // 100_000)
    args.workdir.mkdir(parents=True, exist_ok=True)
    src = ensure_source(args.workdir, args.rows, shards, not args.metadata_only, args.dtype, args.seed)
    src_bytes = sum(p.stat().st_size for p in src.iterdir() if p.suffix in (".parquet", ".npz"))

    results = {}
    pool = args.workdir / "pool-dcdb"
    shutil.rmtree(pool, ignore_errors=True)
    settle(src)
    results[f"dcdb ingest (jobs={args.jobs})"] = run_measured(
        DCDB_INGEST, [str(src), str(pool), str(args.jobs)]
    )
    pool_bytes = sum(f.stat().st_size for f in pool.rglob("*") if f.is_file())
    if not args.no_baseline:
        naive = args.workdir / "pool-naive"
        shutil.rmtree(naive, ignore_errors=True)
        settle(src)
        results["naive (pandas + lance)"] = run_measured(NAIVE_INGEST, [str(src), str(naive)])
        if not args.keep:
            shutil.rmtree(naive, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(pool, ignore_errors=True)

    kind = "metadata only" if args.metadata_only else f"4 spaces, {args.dtype}"
    print(
        f"\ningest: {args.rows:,} rows, {shards} shards ({kind}), source {src_bytes / 1e9:.2f} GB, "
        f"pool {pool_bytes / 1e9:.2f} GB, {os.cpu_count()} cores"
    )
    print(
        f"{'method':<28} {'seconds':>8} {'rows/s':>12} {'MB/s':>9} "
        f"{'tree RSS MB':>11} {'main MB':>11} {'worker MB':>11}"
    )
    for name, r in results.items():
        print(_row(name, r))
    if len(results) == 2:
        dcdb_r, naive_r = results.values()
        print(f"speed-up over naive: {naive_r['wall'] / dcdb_r['wall']:.2f}x")
    limit = 4 * 2**30
    peak = next(iter(results.values()))["peak_rss"]
    print(f"dcdb peak RSS {peak / 2**30:.2f} GiB ({'under' if peak < limit else 'OVER'} the 4 GiB bound)")


if __name__ == "__main__":
    main()
