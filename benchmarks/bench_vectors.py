"""How DuckDB should reach a pool's float16 embeddings: the options measured side by side.

    python benchmarks/bench_vectors.py --rows 1000000 --dim 768 --workdir bench-work/vectors

Same vectors (unit-norm float16, as DataComp ships them) stored five ways, each queried by DuckDB:
  lance-f16-legacy  Lance table, float16, legacy file format, read through dcdb's EmbeddingScan
                    (numpy widens each batch to float32)                           <- dcdb's choice
  lance-f16-v2.1    the same in Lance's current default file format
  lance-f32-legacy  Lance, float32 on disk (2x the bytes), scanned by DuckDB with no cast
  parquet-f16       a Parquet mirror, float16 fixed-size lists (DuckDB reads them as FLOAT[])
  numpy             np.load of an .npy + one matmul: the floor
Query: sum over rows of dot(vector, q) for a fixed q (a full pass over the vectors), plus a
metadata-only count through the positional join (must cost the same as without the join).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _timing import timed


def size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def make(workdir: Path, rows: int, dim: int, shards: int):
    import lance
    from lance.fragment import LanceFragment

    rng = np.random.default_rng(0)
    paths = {k: workdir / f"{k}" for k in ("lance-f16-legacy", "lance-f16-v2.1", "lance-f32-legacy")}
    paths["parquet-f16"] = workdir / "parquet-f16.parquet"
    paths["numpy"] = workdir / "numpy.npy"
    paths["meta"] = workdir / "meta.parquet"
    if (workdir / "_DONE").exists():
        return paths
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    per = -(-rows // shards)
    frags = {k: [] for k in ("lance-f16-legacy", "lance-f16-v2.1", "lance-f32-legacy")}
    schemas = {
        16: pa.schema([("v", pa.list_(pa.float16(), dim))]),
        32: pa.schema([("v", pa.list_(pa.float32(), dim))]),
    }
    mm = np.lib.format.open_memmap(paths["numpy"], mode="w+", dtype=np.float16, shape=(rows, dim))
    pw = pq.ParquetWriter(paths["parquet-f16"], schemas[16])
    metas = []
    for s in range(shards):
        n = min(per, rows - s * per)
        v = rng.standard_normal((n, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        v16 = v.astype(np.float16)
        mm[s * per : s * per + n] = v16
        t16 = pa.table({"v": pa.FixedSizeListArray.from_arrays(pa.array(v16.ravel()), dim)}, schema=schemas[16])
        t32 = pa.table({"v": pa.FixedSizeListArray.from_arrays(pa.array(v16.astype(np.float32).ravel()), dim)},
                       schema=schemas[32])
        pw.write_table(t16, row_group_size=65536)
        for key, tbl, ver in (("lance-f16-legacy", t16, "legacy"), ("lance-f16-v2.1", t16, "2.1"),
                              ("lance-f32-legacy", t32, "legacy")):
            frags[key].append(LanceFragment.create(str(paths[key]), tbl, fragment_id=s, schema=tbl.schema,
                                                   max_rows_per_group=8192, data_storage_version=ver))
        metas.append(pa.table({"score": rng.random(n).astype(np.float32)}))
    pw.close()
    mm.flush()
    for key, fr in frags.items():
        sch = schemas[32] if "f32" in key else schemas[16]
        lance.LanceDataset.commit(str(paths[key]), lance.LanceOperation.Overwrite(sch, fr))
    pq.write_table(pa.concat_tables(metas), paths["meta"], row_group_size=122880)
    (workdir / "_DONE").write_text("")
    return paths


def main(argv=None):
    import duckdb
    import lance

    from dcdb.engine import embedding_scan

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default="bench-work/vectors")
    args = ap.parse_args(argv)
    paths = make(Path(args.workdir), args.rows, args.dim, args.shards)
    q = np.random.default_rng(1).standard_normal(args.dim).astype(np.float32)
    q /= np.linalg.norm(q)

    t_np, ref = timed(lambda: float((np.load(paths["numpy"]).astype(np.float32) @ q).sum()), args.repeat)
    rows = [("numpy", size(paths["numpy"]), t_np, float("nan"), ref)]
    for key in ("lance-f16-legacy", "lance-f16-v2.1", "lance-f32-legacy", "parquet-f16"):
        con = duckdb.connect()
        if key.startswith("lance"):
            ds = lance.dataset(str(paths[key]))
            if "f16" in key:
                con.register("emb", embedding_scan(ds, "v", args.dim))
            else:
                con.register("emb", ds)
            src = "emb"
        else:
            src = f"(SELECT v::FLOAT[{args.dim}] AS v FROM read_parquet('{paths[key]}'))"
        con.execute(f"CREATE VIEW j AS SELECT m.score, e.v FROM read_parquet('{paths['meta']}') m POSITIONAL JOIN {src} e")
        t_vec, val = timed(lambda: con.sql("SELECT sum(list_inner_product(v::FLOAT[], $q::FLOAT[])) FROM j",
                                           params={"q": q.tolist()}).fetchall()[0][0], args.repeat)
        t_meta, _ = timed(lambda: con.sql("SELECT count(*) FROM j WHERE score > 0.5").fetchall(), args.repeat)
        rows.append((key, size(paths[key]), t_vec, t_meta, val))
    con = duckdb.connect()
    t_plain, _ = timed(lambda: con.sql(f"SELECT count(*) FROM read_parquet('{paths['meta']}') WHERE score > 0.5").fetchall(),
                       args.repeat)
    print(f"\n{args.rows:,} x {args.dim} float16 unit vectors, {os.cpu_count()} cores, median of {args.repeat}")
    print(f"{'storage':<18} {'MB on disk':>10} {'dot pass s':>11} {'vs numpy':>9} {'meta-only s':>12} {'vs no join':>11}  checksum")
    for key, nbytes, tv, tm, val in rows:
        print(f"{key:<18} {nbytes / 1e6:>10.0f} {tv:>11.3f} {tv / t_np:>8.1f}x {tm:>12.4f} {tm / t_plain:>10.2f}x  {val:.4f}")
    print(f"metadata-only count without any join: {t_plain:.4f}s")


if __name__ == "__main__":
    main()
