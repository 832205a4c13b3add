"""Benchmark ``dcdb reshard`` against a full-scan resharder written the DataComp way.

    python benchmarks/bench_reshard.py                       # 100 shards x 600 samples, 1/10/50 %
    python benchmarks/bench_reshard.py --shards 200 --per-shard 1000 --jobs 2

Input: ``--shards`` img2dataset shards of small JPEGs (64x64, ~2-3 KB; ``%08d.tar`` with
``.jpg/.txt/.json`` members, ``%08d.parquet`` with ~5 % failed downloads, ``%08d_stats.json``),
made once under ``--workdir`` by a fast generator (pre-encoded images, no rendering), plus the
matching DataComp metadata, ingested as a metadata-only pool whose shards are then indexed
(``dcdb.shards.index.index_shards``; its time is printed too: it is paid once per pool).

At each selectivity (a seeded random subset of the downloaded uids), in the same run:

* ``datacomp-way``: what ``resharder.py`` does: ``--jobs`` processes, each a webdataset pipeline
  over its share of the tars (every byte read, every sample grouped), the json parsed for the uid,
  ``np.searchsorted`` in the subset, selected samples written with ``webdataset.TarWriter`` as
  ``uid-j`` (10,000 per tar);
* ``dcdb --pool``: ``dcdb.shards.reshard.reshard(pool=...)``: the shard index, then only the selected
  byte ranges (``--jobs`` processes);
* ``dcdb --shards``: the same without a pool: tar headers and json walked, then selected ranges.

Each method runs in a fresh Python process; "s" is the time of the resharding call itself (imports
and interpreter start excluded for every method; the fastest of ``--repeat`` runs), samples/s and MB/s are the written samples and
bytes per second. The input stays in the page cache between methods (it is read once first), so
this measures CPU and memory-copy cost; on cold disks reading only the selected bytes gains more.
Both outputs are checked to hold the same sample keys.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

DATACOMP_WAY = r"""
import json, os, sys, time
from multiprocessing import get_context
import numpy as np
import webdataset as wds

u16 = np.dtype("u8,u8")

def work(args):
    wid, urls, subset_path, out = args
    subset = np.load(subset_path, mmap_mode="r")
    ds = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=wds.warn_and_continue))
    writer, count, shard, seen, written, nbytes = None, 0, 0, 0, 0, 0
    for d in ds:
        seen += 1
        uid = json.loads(d["json"])["uid"]
        key = np.array([divmod(int(uid, 16), 2**64)], u16)[0]
        copies = np.searchsorted(subset, key, "right") - np.searchsorted(subset, key, "left")
        for j in range(copies):
            if writer is None or count >= 10000:
                if writer is not None:
                    writer.close()
                writer = wds.TarWriter(f"{out}/w{wid:02d}_{shard:05d}.tar")
                shard, count = shard + 1, 0
            nbytes += writer.write({**d, "__key__": f"{uid}-{j}"})
            count += 1
            written += 1
    if writer is not None:
        writer.close()
    return seen, written, nbytes

tars, subset_path, out, jobs = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
os.makedirs(out)
t0 = time.perf_counter()
chunks = [tars[i * len(tars) // jobs:(i + 1) * len(tars) // jobs] for i in range(jobs)]
with get_context("fork").Pool(jobs) as pool:
    res = pool.map(work, [(i, c, subset_path, out) for i, c in enumerate(chunks)])
secs = time.perf_counter() - t0
print(json.dumps({"seconds": secs, "written": sum(r[1] for r in res), "bytes": sum(r[2] for r in res),
                  "read": sum(os.path.getsize(t) for t in tars)}))
"""

DCDB_WAY = r"""
import json, sys, time
from dcdb.shards.reshard import reshard
import dcdb.shards.index, dcdb.store, pyarrow.compute, pyarrow.parquet, tqdm  # imported lazily by reshard
mode, src, subset_path, out, jobs = sys.argv[1:6]
kw = {"pool": src} if mode == "pool" else {"shards": src}
t0 = time.perf_counter()
r = reshard(subset_path, out, jobs=int(jobs), warn=lambda m: None, **kw)
secs = time.perf_counter() - t0
print(json.dumps({"seconds": secs, "written": r.output_count, "bytes": r.bytes_written, "read": r.bytes_read}))
"""


# ------------------------------------------------------------------------------- generator


def _images(n: int, seed: int) -> list[bytes]:
    """Small JPEGs (64x64, smooth colour fields with a little noise: 2-3 KB each)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((64, 64), Image.BILINEAR)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, size=(64, 64, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def generate(root: Path, shards: int, per_shard: int, seed: int = 0) -> None:
    """img2dataset shards + DataComp metadata under root/shards and root/metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dcdb.tario import TarWriter

    rng = np.random.default_rng(seed)
    images = _images(256, seed)
    (root / "shards").mkdir(parents=True)
    (root / "metadata").mkdir()
    for s in range(shards):
        uid_ints = rng.integers(0, 2**63, size=(per_shard, 2), dtype=np.int64)
        uids = [f"{int(a):016x}{int(b):016x}" for a, b in uid_ints]
        failed = rng.random(per_shard) < 0.05
        rows, meta_rows = [], []
        with open(root / "shards" / f"{s:08d}.tar", "wb") as f:
            tar = TarWriter(f)
            for i, uid in enumerate(uids):
                key = f"{s:08d}{i:04d}"
                caption = f"a photo number {s * per_shard + i} of something"
                ok = not failed[i]
                jpg = images[int(rng.integers(len(images)))]
                meta = {
                    "uid": uid,
                    "url": f"https://example.com/{uid}.jpg",
                    "caption": caption,
                    "key": key,
                    "status": "success" if ok else "failed_to_download",
                    "error_message": None if ok else "HTTP Error 404",
                    "width": 64 if ok else None,
                    "height": 64 if ok else None,
                    "original_width": 640,
                    "original_height": 480,
                    "sha256": hashlib.sha256(jpg).hexdigest() if ok else None,
                    "face_bboxes": [],
                }
                rows.append({k: meta[k] for k in ("uid", "key", "status")})
                meta_rows.append(
                    {
                        "uid": uid,
                        "url": meta["url"],
                        "text": caption,
                        "original_width": 640,
                        "original_height": 480,
                    }
                )
                if ok:
                    for ext, data in (
                        ("jpg", jpg),
                        ("json", json.dumps(meta, indent=4).encode()),
                        ("txt", caption.encode()),
                    ):
                        tar.add(f"{key}.{ext}", data)
            tar.close()
        pq.write_table(pa.Table.from_pylist(rows), root / "shards" / f"{s:08d}.parquet")
        (root / "shards" / f"{s:08d}_stats.json").write_text(
            json.dumps({"count": per_shard, "successes": int((~failed).sum())})
        )
        pq.write_table(pa.Table.from_pylist(meta_rows), root / "metadata" / f"{s:08d}.parquet")


# --------------------------------------------------------------------------------- running


def _child(code: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, check=False
    )
    if out.returncode:
        sys.exit(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _keys(folder: Path) -> list[str]:
    keys = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            keys += sorted({m.name.split(".", 1)[0] for m in tf.getmembers()})
    return sorted(keys)


def _warm(folder: Path) -> None:
    for p in sorted(folder.glob("*.tar")):
        with open(p, "rb") as f:
            while f.read(1 << 22):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/dcdb-bench-reshard")
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--per-shard", type=int, default=600)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--selectivity", type=float, nargs="+", default=[0.01, 0.10, 0.50])
    ap.add_argument("--repeat", type=int, default=1, help="Runs per method; the fastest counts.")
    args = ap.parse_args()

    root = Path(args.workdir) / f"s{args.shards}x{args.per_shard}"
    if not (root / "done").is_file():
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        generate(root, args.shards, args.per_shard)
        (root / "done").write_text("")
        print(f"generated {args.shards} shards x {args.per_shard} samples in {time.perf_counter() - t0:.1f}s")
    tars = sorted(str(p) for p in (root / "shards").glob("*.tar"))
    in_bytes = sum(os.path.getsize(t) for t in tars)
    pool = root / "pool"
    if not (pool / "shards" / "index.json").is_file():
        from dcdb.ingest.pool import ingest
        from dcdb.shards.index import index_shards

        shutil.rmtree(pool, ignore_errors=True)
        ingest(root / "metadata", pool, jobs=args.jobs)
        rep = index_shards(pool, root / "shards", jobs=args.jobs, log=lambda m: None)
        print(f"index: {rep.summary()}")

    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from dcdb import uids as U

    idx = ds.dataset(str(pool / "shards" / "index"), format="parquet").to_table(columns=["uid", "downloaded"])
    downloaded = U.from_arrow(idx.filter(pc.field("downloaded")).column("uid"))
    print(
        f"input: {len(tars)} tars, {len(downloaded):,} downloaded samples, {in_bytes / 1e6:,.0f} MB; "
        f"{os.cpu_count()} cores, -j {args.jobs}"
    )
    print(
        f"{'selected':>9} {'method':<14} {'s':>7} {'samples/s':>10} {'MB/s':>7} {'MB read':>8} {'vs datacomp':>11}"
    )
    rng = np.random.default_rng(1)
    runs = root / "runs"
    for frac in args.selectivity:
        pick = U.sort(downloaded[rng.random(len(downloaded)) < frac])
        subset = root / f"subset_{frac}.npy"
        np.save(subset, pick)
        commands = {
            "datacomp-way": (DATACOMP_WAY, json.dumps(tars), str(subset), str(runs / "dc"), str(args.jobs)),
            "dcdb --pool": (DCDB_WAY, "pool", str(pool), str(subset), str(runs / "pool"), str(args.jobs)),
            "dcdb --shards": (
                DCDB_WAY,
                "shards",
                str(root / "shards"),
                str(subset),
                str(runs / "scan"),
                str(args.jobs),
            ),
        }
        results: dict[str, dict] = {}
        for _ in range(args.repeat):
            shutil.rmtree(runs, ignore_errors=True)
            runs.mkdir()
            _warm(root / "shards")
            for name, cmd in commands.items():
                r = _child(*cmd)
                if name not in results or r["seconds"] < results[name]["seconds"]:
                    results[name] = r
        if not (_keys(runs / "dc") == _keys(runs / "pool") == _keys(runs / "scan")):
            sys.exit("outputs differ: the methods did not write the same samples")
        base = results["datacomp-way"]["seconds"]
        for name, r in results.items():
            s = r["seconds"]
            print(
                f"{frac:>8.0%} {name:<14} {s:>7.2f} {r['written'] / s:>10,.0f} {r['bytes'] / 1e6 / s:>7,.1f} "
                f"{r['read'] / 1e6:>8,.1f} {base / s:>10.1f}x"
            )
    shutil.rmtree(runs, ignore_errors=True)


if __name__ == "__main__":
    main()
