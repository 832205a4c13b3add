"""`dcdb query` against the DataComp way and against hand-written DuckDB, same data, same run.

    python benchmarks/bench_query.py --workdir bench-work                 # 12.8M metadata + 1M with embeddings
    python benchmarks/bench_query.py --workdir bench-work --meta-rows 1000000 --emb-rows 200000   # quick

Filters:
  top30_l14     DataComp's fraction mode: n = int(N * 0.3), threshold = the value at index n of the
                descending float32 sort (NaN last), keep score >= threshold.
  size_caption  min(w, h) >= 200, max/min <= 3, len(text.split()) > 2, len(text) > 5.
  agree_b32     (embedding pool only) cosine(b32_img, b32_txt) >= 0.3, against numpy on the npz.

Baselines:
  datacomp      what DataComp's baselines/apply_filter.py does: pandas reads each shard's parquet
                (2 worker processes), numpy sorts all scores for the threshold, uids converted per row
                in Python, np.sort of the structured array, np.save.
  duckdb-hand   one hand-written DuckDB SELECT over read_parquet(POOL/metadata/*.parquet), result
                fetched as Arrow (no uid conversion, no sort, no file): the floor dcdb can reach.
  dcdb          dcdb.query.run_filter + write_uids: checks, binding, conversion, sort, atomic .npy.
                top30_l14 runs the shipped sql/clip_score.sql (-p arch l14 -p fraction 0.3), whose
                threshold is a linear-time selection; the other filters run the text above on `pool`.
Every dcdb output is checked byte-identical to the DataComp-way .npy.

Doors (issue 14, item 3: only what the statement names): each pool gets three derived groups
(`dcdb annotate --from`: a language string, a float and an int column, a hash string) if it has
none, then one score statement runs through every door a user has, on `pool` and on
`pool_metadata` in the same run (ratio pool / pool_metadata: 1.0 is the goal): `con.sql` on the
live connection (the full view, which DuckDB cannot narrow: every positional join is scanned),
`dcdb.pool_sql`, `dcdb sql`, `dcdb query`, knn's `--where` (against the same predicate over
`pool_metadata` on a fresh connection) and clip_cut's inner scan. The last line is what deciding
the joins costs per statement (EXPLAIN + the TEMP view), against the count itself.

    python benchmarks/bench_query.py --workdir bench-work --meta-rows 1000000 --emb-rows 0 --only-doors
"""

from __future__ import annotations

import argparse
import glob
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _timing import timed

SQL = {
    "top30_l14": (
        "-- @param fraction float = 0.3\n"
        "SELECT uid FROM {src} WHERE {score} >= (\n"
        "  SELECT s FROM (SELECT {score} AS s FROM {src}) ORDER BY s DESC NULLS LAST\n"
        "  LIMIT 1 OFFSET (SELECT CAST(floor(count(*) * $fraction) AS BIGINT) FROM {src}))"
    ),
    "size_caption": (
        "SELECT uid FROM {src}\n"
        "WHERE least(original_width, original_height) >= 200\n"
        "  AND greatest(original_width, original_height) / least(original_width, original_height) <= 3.0\n"
        "  AND length(text) > 5\n"
        "  AND words_gt(text, 2)  -- len(text.split()) > 2, Python's whitespace"
    ),
    "agree_b32": "SELECT uid FROM {src} WHERE cosine(b32_img, b32_txt) >= 0.3",
}


def render(name, src, score):
    return SQL[name].replace("{src}", src).replace("{score}", score)



# --------------------------------------------------------------------------- DataComp way


def _dc_uids(uid_values):
    return np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uid_values], np.dtype("u8,u8"))


def _dc_scores(path):
    import pandas as pd

    return pd.read_parquet(path, columns=["clip_l14_similarity_score"])["clip_l14_similarity_score"].values


def _dc_threshold_shard(args):
    import pandas as pd

    path, threshold = args
    df = pd.read_parquet(path, columns=["uid", "clip_l14_similarity_score"])
    return _dc_uids(df[df["clip_l14_similarity_score"] >= threshold]["uid"].values)


def _dc_size_shard(path):
    import pandas as pd

    df = pd.read_parquet(path, columns=["uid", "text", "original_width", "original_height"])
    words = df.text.apply(lambda x: len(x.split()))
    chars = df.text.apply(len)
    mn = np.minimum(df.original_width, df.original_height)
    mx = np.maximum(df.original_width, df.original_height)
    keep = (words > 2) & (chars > 5) & (mn >= 200) & (mx / mn <= 3.0)
    return _dc_uids(df.uid[keep].values)


def datacomp_way(src_dir, name, out, workers=2):
    files = sorted(glob.glob(os.path.join(src_dir, "*.parquet")))
    with multiprocessing.get_context("forkserver").Pool(workers) as pool:
        if name == "top30_l14":
            scores = np.concatenate(pool.map(_dc_scores, files))
            n = int(len(scores) * 0.3)
            threshold = -np.sort(-scores)[n]
            parts = pool.map(_dc_threshold_shard, [(f, threshold) for f in files])
        else:
            parts = pool.map(_dc_size_shard, files)
    uids = np.concatenate(parts)
    uids.sort()
    np.save(out, uids)
    return len(uids)


def numpy_agree(src_dir, out):
    """The agree_b32 filter by hand: numpy over each shard's npz, DataComp-style uid conversion."""
    import pandas as pd

    parts = []
    for f in sorted(glob.glob(os.path.join(src_dir, "*.parquet"))):
        z = np.load(f[: -len(".parquet")] + ".npz")
        a, b = z["b32_img"].astype(np.float32), z["b32_txt"].astype(np.float32)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        uids = pd.read_parquet(f, columns=["uid"])["uid"].values
        parts.append(_dc_uids(uids[cos >= np.float32(0.3)]))
    uids = np.concatenate(parts)
    uids.sort()
    np.save(out, uids)
    return len(uids)


# ---------------------------------------------------------------------------------- dcdb


def dcdb_query(pool, name, out):
    from dcdb.query import load_filter, parse_filter, run_filter, write_uids

    if name == "top30_l14":  # what a dcdb user runs: the shipped filter, O(N) threshold
        res = run_filter(pool, load_filter("clip_score"), {"arch": "l14", "fraction": "0.3"})
    else:
        res = run_filter(pool, parse_filter(name, render(name, "pool", "clip_l14_similarity_score"), None))
    write_uids(out, res.uids, "npy")
    return res.rows


def duckdb_hand(pool_dir, name):
    import duckdb

    files = sorted(glob.glob(os.path.join(pool_dir, "metadata", "*.parquet")))
    src = "read_parquet([" + ", ".join(f"'{f}'" for f in files) + "])"
    score = "clip_l14_similarity_score"  # ingest stores NaN as NULL, so NULLS LAST sorts like numpy
    text = render(name, src, score)
    if name == "top30_l14":
        text = text.split("\n", 1)[1]  # drop the header line
    from dcdb.engine import MACROS

    con = duckdb.connect()
    for m in MACROS:  # the same word-count regex by hand
        con.execute(m)
    params = {"fraction": 0.3} if name == "top30_l14" else None
    tbl = con.sql(text, params=params).to_arrow_table()
    return tbl.num_rows


# ---------------------------------------------------------------------------------- doors

DOOR_WHERE = "clip_l14_similarity_score >= 0.3"


def add_groups(pool, workdir: Path):
    """Three derived groups imported from Parquet keyed by uid (skipped when the pool has groups)."""
    import duckdb

    from dcdb.annotate import import_columns
    from dcdb.derived import groups
    from dcdb.store import open_pool

    if groups(pool):
        return open_pool(pool.path)
    meta = f"read_parquet('{pool.path}/metadata/*.parquet')"
    con = duckdb.connect()
    for name, cols in (("lang", "CASE WHEN hash(uid) % 3 = 0 THEN 'de' ELSE 'en' END AS lang"),
                       ("extra", "(hash(uid) % 1000) / 1000.0 AS score2, CAST(hash(uid) % 50 AS INTEGER) AS n_tok"),
                       ("tags", "md5(uid) AS tag")):
        out = workdir / f"groups-{name}.parquet"
        con.execute(f"COPY (SELECT uid, {cols} FROM {meta}) TO '{out}'")
        import_columns(pool, out)
        out.unlink()
    return open_pool(pool.path)


def bench_doors(pool, repeat):
    """(door, seconds on pool, seconds on pool_metadata, same result) rows, and the per-statement
    cost of deciding the joins."""
    import dcdb
    from dcdb.adhoc import run_sql
    from dcdb.engine import narrow_pool
    from dcdb.query import parse_filter, run_filter
    from dcdb.vectors.knn import where_rows

    con = dcdb.connect(pool)
    count = "SELECT count(*) AS n FROM {src} WHERE " + DOOR_WHERE
    uids = "SELECT uid FROM {src} WHERE " + DOOR_WHERE
    cut = "SELECT uid FROM {src} WHERE clip_l14_similarity_score >= clip_cut('l14', 0.3, NULL)"

    def keep(src):
        return dcdb.connect(pool).sql(f"SELECT coalesce(({DOOR_WHERE}), false) FROM {src}").to_arrow_table()

    doors = [
        ("con.sql count (full view)", lambda src: con.sql(count.format(src=src)).fetchall()),
        ("dcdb.pool_sql count", lambda src: dcdb.pool_sql(con, count.format(src=src)).to_pylist()),
        ("dcdb sql count", lambda src: run_sql(pool, count.format(src=src), {})),
        ("dcdb query uids", lambda src: run_filter(pool, parse_filter("q", uids.format(src=src), None)).uids.tobytes()),
        ("knn --where", lambda src: where_rows(pool, DOOR_WHERE).tolist() if src == "pool"
         else np.flatnonzero(keep(src).column(0).to_numpy(zero_copy_only=False)).tolist()),
        ("clip_cut fraction 0.3", lambda src: run_filter(pool, parse_filter("q", cut.format(src=src), None)).uids.tobytes()),
    ]
    rows = []
    for name, fn in doors:
        fn("pool")  # warm the page cache and the asset caches
        times = {"pool": [], "pool_metadata": []}
        out = {}
        for _ in range(repeat):  # alternately, so the machine's load falls on both alike
            for src, ts in times.items():
                t0 = time.perf_counter()
                out[src] = fn(src)
                ts.append(time.perf_counter() - t0)
        rows.append((name, statistics.median(times["pool"]), statistics.median(times["pool_metadata"]),
                     out["pool"] == out["pool_metadata"]))
    stmt = count.format(src="pool")

    def decide():
        with narrow_pool(con, stmt):
            pass

    t_decide, _ = timed(decide, max(repeat, 5))
    t_count, _ = timed(lambda: con.sql(count.format(src="pool_metadata")).fetchall(), max(repeat, 5))
    return rows, t_decide, t_count


def print_doors(label, rows, t_decide, t_count, repeat):
    print(f"\n{label}: one statement through every door, median of {repeat} (alternating), {os.cpu_count()} cores")
    print(f"  where {DOOR_WHERE}; the pool has 3 derived groups")
    print(f"  {'door':<28} {'pool s':>8} {'pool_metadata s':>16} {'ratio':>7} same")
    for name, t_pool, t_meta, same in rows:
        print(f"  {name:<28} {t_pool:>8.3f} {t_meta:>16.3f} {t_pool / t_meta:>6.2f}x {same}")
    print(f"  deciding the joins (EXPLAIN + TEMP view) {t_decide * 1000:.1f} ms per statement; "
          f"the count on pool_metadata {t_count * 1000:.1f} ms")


# ---------------------------------------------------------------------------------- setup


def build(workdir: Path, rows: int, shards: int, embeddings: bool, label: str):
    from dcdb.ingest.pool import ingest
    from dcdb.store import open_pool
    from dcdb.demo.synth import synth_pool

    src, pool = workdir / f"{label}-src", workdir / f"{label}-pool"
    if not (src / "_DONE").exists():
        t0 = time.perf_counter()
        synth_pool(src, rows=rows, shards=shards, seed=0, embeddings=embeddings, force=True, progress=True)
        (src / "_DONE").write_text("")
        print(f"  synth {label}: {rows:,} rows in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if not (pool / "dcdb.json").exists():
        t0 = time.perf_counter()
        rep = ingest(src, pool, jobs=2, progress=True)
        print(f"  ingest {label}: {rep.summary()}", file=sys.stderr)
    return src, open_pool(pool)


def help_time(n=5):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dcdb", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_pool(src, pool, names, workdir, label, repeat):
    rows = []
    for name in names:
        dc_out, db_out = workdir / f"{label}-{name}-datacomp.npy", workdir / f"{label}-{name}-dcdb.npy"
        if name == "agree_b32":
            t_dc, n_dc = timed(lambda: numpy_agree(src, dc_out), repeat)
            t_hand = float("nan")
        else:
            t_dc, n_dc = timed(lambda: datacomp_way(src, name, dc_out), repeat)
            t_hand, n_hand = timed(lambda: duckdb_hand(str(pool.path), name), repeat)
            assert n_hand == n_dc, (name, n_hand, n_dc)
        t_db, n_db = timed(lambda: dcdb_query(pool, name, db_out), repeat)
        same = dc_out.read_bytes() == db_out.read_bytes()
        if not same and name == "agree_b32":
            # numpy and DuckDB round the cosine differently: only rows at the threshold may differ
            a, b = np.load(dc_out), np.load(db_out)
            diff = np.setxor1d(a, b)
            same = f"{len(diff)} rows at the threshold differ"
        rows.append((label, name, n_db, t_dc, t_hand, t_db, same))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench-work")
    ap.add_argument("--meta-rows", type=int, default=12_800_000)
    ap.add_argument("--meta-shards", type=int, default=128)
    ap.add_argument("--emb-rows", type=int, default=1_000_000)
    ap.add_argument("--emb-shards", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only-doors", action="store_true", help="only the doors section (no DataComp runs)")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    results, doors = [], []
    if args.meta_rows:
        src, pool = build(workdir, args.meta_rows, args.meta_shards, False, f"meta{args.meta_rows}")
        label = f"{args.meta_rows:,} metadata"
        if not args.only_doors:
            results += bench_pool(src, pool, ["top30_l14", "size_caption"], workdir, label, args.repeat)
        doors.append((label, *bench_doors(add_groups(pool, workdir), args.repeat)))
    if args.emb_rows:
        src, pool = build(workdir, args.emb_rows, args.emb_shards, True, f"emb{args.emb_rows}")
        label = f"{args.emb_rows:,} + embeddings"
        if not args.only_doors:
            results += bench_pool(src, pool, ["top30_l14", "size_caption", "agree_b32"], workdir, label, args.repeat)
        doors.append((label, *bench_doors(add_groups(pool, workdir), args.repeat)))
    for label, rows, t_decide, t_count in doors:
        print_doors(label, rows, t_decide, t_count, args.repeat)
    if not all(r[-1] for d in doors for r in d[1]):
        sys.exit("a door gave another result on pool than on pool_metadata")
    if args.only_doors:
        return
    print(f"\nmedian of {args.repeat} runs, {os.cpu_count()} cores; ratios: datacomp/dcdb (speed-up), dcdb/duckdb-hand (overhead)")
    print(f"{'pool':<26} {'filter':<13} {'uids':>10} {'datacomp s':>11} {'hand s':>8} {'dcdb s':>8} {'speed-up':>9} {'overhead':>9} identical")
    for label, name, n, t_dc, t_hand, t_db, same in results:
        over = t_db / t_hand if t_hand == t_hand else float("nan")
        print(f"{label:<26} {name:<13} {n:>10,} {t_dc:>11.2f} {t_hand:>8.2f} {t_db:>8.2f} {t_dc / t_db:>8.1f}x {over:>8.2f}x {same}")
    print(f"\ndcdb --help: {help_time():.3f}s (median of 5, fresh process)")
    if not all(r[-1] is True or isinstance(r[-1], str) for r in results):
        sys.exit("dcdb and the DataComp way disagree")


if __name__ == "__main__":
    main()
