"""DataComp's baselines: `dcdb query sql/<name>.sql` against a re-implementation of DataComp's own way,
same pool, same assets, same run; the derived columns' one-off cost reported separately.

    python benchmarks/bench_baselines.py --workdir bench-base                       # 1M rows with embeddings
    python benchmarks/bench_baselines.py --workdir bench-base --rows 200000         # ~10 minutes here
    python benchmarks/bench_baselines.py --workdir bench-base --meta-rows 12800000  # + metadata-only baselines
    python benchmarks/bench_baselines.py --workdir bench-base --rows 12800000 --no-embeddings  # those alone

The DataComp way (baselines/apply_filter.py, re-implemented): per shard, pandas reads the parquet
(and np.load the npz), language id per row in Python (fastText predict / gcld3, the same models dcdb
annotates with), len(x.split()) etc. through Series.apply, WordNet lookups per token with NLTK
(``wordnet.synsets(w)[0].offset()``) when NLTK can read the WordNet database, torch.einsum + argmax
for the centroids, uid conversion per row, np.sort; shards on ``--dc-workers`` processes
(DataComp's worker_threadpool). dcdb reads the precomputed derived columns (``dcdb annotate``: lang,
lang_cld3, wordnet, centroids), whose one-off cost is printed first. Every pair of outputs is
checked equal.

The metadata baselines are also run as hand-written DuckDB over the raw source Parquet (what a
DuckDB user writes without dcdb, with DataComp's NaN semantics: DuckDB orders NaN above every
number and ``NaN >= t`` is true, so the fraction threshold sorts NaN last and every comparison
excludes it; uids converted in SQL and sorted by DuckDB, np.save). Language ids come from the
pool's annotations, written once beside the source as row-aligned Parquet (not timed). Each
timing is the median of ``--repeat`` runs; the ratios are printed against dcdb in the same run.

Assets: WordNet is the real WordNet 3.0 (Debian's wordnet-base) when installed, else a stand-in over
the pool's vocabulary; the WNID list is every third first-synset offset of the pool's words;
centroids are ``--centroids`` scaled pool vectors (DataComp: 100,000 x 768; the einsum cost grows
linearly with it, on both sides of the comparison only for DataComp); ImageNet embeddings are
``--in1k`` vectors in 5 DataComp-style ``.pt`` files.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

BASELINES = ["no_filter", "basic_filter", "clip_score", "laion2b", "text_based", "image_based",
             "image_based_intersect_clip_score"]
META_BASELINES = ["no_filter", "basic_filter", "clip_score", "laion2b"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ------------------------------------------------------------------------------ DataComp way


_STATE: dict = {}


def _dc_init(wordnet_root: str | None, nltk_data: str | None) -> None:
    """Per worker: the models DataComp loads per shard (kept per worker here: cheaper for it)."""
    from dcdb.filters.langid import identifier

    _STATE["ft"] = identifier("fasttext")
    _STATE["cld3"] = identifier("cld3")
    if nltk_data:
        import warnings

        import nltk

        warnings.simplefilter("ignore")
        nltk.data.path.insert(0, nltk_data)
        from nltk.corpus import wordnet

        _STATE["synsets"] = wordnet.synsets
    elif wordnet_root:
        from dcdb.filters.wordnet import WordNet, locate

        wn = WordNet(locate(wordnet_root))
        _STATE["synsets"] = lambda w: [type("S", (), {"offset": lambda self, o=o: o})()
                                       for o in [wn.first_offset(w)] if o >= 0]


def _dc_uids(values):
    return np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in values], np.dtype("u8,u8"))


def _ft_lang(text):  # get_fasttext_language, one caption at a time
    return _STATE["ft"]([text.replace("\n", " ")])[0]


def _dc_basic(path):
    import pandas as pd

    df = pd.read_parquet(path, columns=["uid", "text", "original_width", "original_height"])
    lang = df.text.apply(_ft_lang)
    words = df.text.apply(lambda x: len(x.split()))
    chars = df.text.apply(len)
    mn = np.minimum(df.original_width, df.original_height)
    mx = np.maximum(df.original_width, df.original_height)
    mask = (lang == "en") & (words > 2) & (chars > 5) & (mn >= 200) & (mx / mn <= 3.0)
    return _dc_uids(df.uid[mask].values)


def _dc_clip(args):
    import pandas as pd

    path, key, threshold, cld3 = args
    if cld3:
        df = pd.read_parquet(path, columns=["uid", "text", key])
        lang = df.text.apply(lambda x: _STATE["cld3"]([x])[0])
        df = df[lang == "en"]
    else:
        df = pd.read_parquet(path, columns=["uid", key])
    return _dc_uids(df[df[key] >= threshold]["uid"].values)


def _dc_text(args):
    import pandas as pd

    path, entity = args
    df = pd.read_parquet(path, columns=["uid", "text"])
    synsets = _STATE["synsets"]

    def has(text):
        for w in text.split():
            s = synsets(w)
            if len(s) and s[0].offset() in entity:
                return True
        return False

    mask = (df.text.apply(_ft_lang) == "en") & df.text.apply(has)
    return _dc_uids(df.uid[mask].values)


def _dc_image(args):
    import pandas as pd
    import torch

    from dcdb.filters.tokens import fasttext_tokenize

    path, centroids, targets, key, threshold = args
    torch.set_num_threads(1)
    df = pd.read_parquet(path, columns=["uid", "text"] + ([key] if key else []))
    emb = torch.from_numpy(np.load(path[: -len(".parquet")] + ".npz")["l14_img"])
    if key:
        keep = (df[key] >= threshold).to_numpy()
        df, emb = df[keep], emb[torch.from_numpy(keep)]
    words = df.text.apply(lambda x: len(fasttext_tokenize(x)))
    chars = df.text.apply(len)
    english = np.array([_ft_lang(x) == "en" for x in df.text.values], bool)
    mask = (english & (words > 1) & (chars > 5)).to_numpy()
    feats = emb[torch.from_numpy(mask)]
    labels = torch.cat([torch.argmax(torch.einsum("ik,jk->ij", feats[i : i + 1024].float(), centroids), 1)
                        for i in range(0, len(feats), 1024)]) if len(feats) else torch.empty(0, dtype=torch.long)
    hit = np.isin(labels.numpy(), targets)
    return _dc_uids(df.uid[mask].values[hit])


def _dc_threshold(paths, key, fraction):
    import pandas as pd

    v = pd.concat([pd.read_parquet(p, columns=[key]) for p in paths])[key].values
    return -np.sort(-v)[int(len(v) * fraction)]


def datacomp_way(name, paths, assets, workers, init_args):
    """One baseline the DataComp way; returns the sorted uid array."""
    key = "clip_l14_similarity_score"
    if name == "no_filter":
        import pandas as pd

        parts = [_dc_uids(pd.read_parquet(p, columns=["uid"])["uid"].values) for p in paths]
        out = np.concatenate(parts)
        out.sort()
        return out
    if name == "basic_filter":
        fn, tasks = _dc_basic, paths
    elif name == "clip_score":
        t = _dc_threshold(paths, key, 0.3)
        fn, tasks = _dc_clip, [(p, key, t, False) for p in paths]
    elif name == "laion2b":
        fn, tasks = _dc_clip, [(p, "clip_b32_similarity_score", 0.28, True) for p in paths]
    elif name == "text_based":
        fn, tasks = _dc_text, [(p, assets["entity"]) for p in paths]
    else:
        import torch

        cents = torch.from_numpy(np.load(assets["centroids"]))
        in1k = torch.cat([torch.load(f)["image_features"] for f in assets["in1k_files"]])
        targets = torch.unique(torch.argmax(torch.einsum("ik,jk->ij", in1k.float(), cents), 1)).numpy()
        thr = _dc_threshold(paths, key, 0.3) if name.endswith("clip_score") else None
        fn = _dc_image
        tasks = [(p, cents, targets, key if thr is not None else None, thr) for p in paths]
    with mp.get_context("spawn").Pool(workers, initializer=_dc_init, initargs=init_args) as pool:
        parts = list(pool.imap_unordered(fn, tasks))
    out = np.concatenate(parts) if parts else np.empty(0, np.dtype("u8,u8"))
    out.sort()
    return out


# ----------------------------------------------------------------------------------- setup


def build_pool(work: Path, rows: int, shards: int, embeddings: bool, name: str, buckets: int | None = None):
    from dcdb.ingest.pool import ingest
    from dcdb.store import open_pool
    from dcdb.demo.synth import synth_pool

    src, pool = work / f"{name}_src", work / (f"{name}_b{buckets}" if buckets else name)
    if not (pool / "dcdb.json").is_file():
        if not any(src.glob("*.parquet")):
            t, _ = timed(lambda: synth_pool(src, rows=rows, shards=shards, seed=1, embeddings=embeddings, force=True))
            log(f"synth {name}: {rows:,} rows in {t:.0f}s")
        t, _ = timed(lambda: ingest(src, pool, jobs=os.cpu_count() or 1, buckets=buckets))
        log(f"ingest {name}: {t:.0f}s")
    return open_pool(pool), src


def make_wordnet(work: Path, src: Path):
    """(dict folder, nltk_data folder or None): the real WordNet when installed, else a stand-in."""
    from dcdb.filters import wordnet

    real = wordnet.Source(wordnet.DEBIAN_DICT)
    if real.complete():
        root = wordnet.DEBIAN_DICT
    else:
        import pyarrow.parquet as pq

        words = set()
        for f in sorted(src.glob("*.parquet"))[:2]:
            for t in pq.read_table(f, columns=["text"]).column(0).to_pylist():
                words.update(w.lower() for w in t.split() if re.fullmatch(r"[a-z]+", w.lower()))
        root = wordnet.write_dict(work / "wn", {w: [("n", 1000 + 100 * i)] for i, w in enumerate(sorted(words))})
    nltk_data = work / "nltk_data"
    dest = nltk_data / "corpora" / "wordnet"
    try:
        import nltk  # noqa: F401
    except ImportError:
        return root, None
    if not dest.is_dir():
        dest.mkdir(parents=True)
        for f in Path(root).iterdir():
            if f.is_file():
                shutil.copy(f, dest / f.name)
        if not (dest / "lexnames").exists():
            (dest / "lexnames").write_text("".join(f"{i:02d}\tlex.{i}\t1\n" for i in range(45)))
        for extra in ("index.sense", "cntlist.rev"):
            (dest / extra).touch()
    return root, str(nltk_data)


def make_assets(work: Path, pool, src: Path, wn_root, k: int, m: int):
    import pyarrow.parquet as pq
    import torch

    from dcdb.filters.wordnet import WordNet, locate

    wn = WordNet(locate(wn_root))
    words = set()
    for f in sorted(src.glob("*.parquet"))[:3]:
        for t in pq.read_table(f, columns=["text"]).column(0).to_pylist():
            words.update(t.split())
    offs = sorted({wn.first_offset(w) for w in words} - {-1})[::3]
    (work / "wnids.txt").write_text("".join(f"n{o:08d}\n" for o in offs))
    rng = np.random.default_rng(0)
    first = min(src.glob("*.npz"))
    emb = np.load(first)["l14_img"].astype(np.float32)
    cents = emb[rng.choice(len(emb), k, replace=len(emb) < k)] * rng.uniform(0.5, 2, (k, 1)).astype(np.float32)
    np.save(work / "centroids.npy", cents.astype(np.float32))
    in1k = emb[rng.choice(len(emb), m)] + 0.05 * rng.normal(size=(m, emb.shape[1])).astype(np.float32)
    files = []
    for i, part in enumerate(np.array_split(in1k.astype(np.float16), 5)):
        f = work / f"in1k_clip_vit_l14_{i}.pt"
        torch.save({"image_features": torch.from_numpy(part)}, f)
        files.append(f)
    return {"wnids": work / "wnids.txt", "entity": [int(o) for o in offs], "centroids": work / "centroids.npy",
            "in1k": str(work / "in1k_clip_vit_l14_*.pt"), "in1k_files": files}


def annotate_all(pool, assets, wn_root, names, reuse=False):
    from dcdb.annotate import annotate
    from dcdb.derived import groups
    from dcdb.store import open_pool

    costs = {}
    for name in names:
        if reuse and name in groups(open_pool(pool.path)):
            log(f"annotate {name}: reusing the stored columns (--reuse)")
            continue
        params = {}
        if name == "wordnet":
            params = {"wordnet": str(wn_root)}
        if name == "centroids":
            params = {"centroids": str(assets["centroids"]), "imagenet_embeddings": assets["in1k"]}
        t, _ = timed(lambda name=name, params=params: annotate(open_pool(pool.path), name, params, force=True))
        costs[name] = t
        log(f"annotate {name}: {t:.1f}s ({pool.rows / t:,.0f} rows/s)")
    return costs


def dcdb_params(name, assets):
    p = {}
    if "clip_score" in name:
        p.update(arch="l14", fraction="0.3")
    if name == "text_based":
        p["wordnet_ids"] = str(assets["wnids"])
    if name.startswith("image_based"):
        p.update(centroids=str(assets["centroids"]), imagenet_embeddings=assets["in1k"])
    return p


# ------------------------------------------------------------------- DuckDB by hand, raw Parquet

# {src}: the raw source parquet files (with the language ids positionally joined where needed);
# uid -> its two 64-bit halves in SQL; NaN: last in the threshold's sort, never passing a comparison.
HAND_SQL = {
    "no_filter": "SELECT {hilo} FROM {src} ORDER BY hi, lo",
    "clip_score": (
        "SELECT {hilo} FROM {src} WHERE clip_l14_similarity_score >= (SELECT s FROM (SELECT clip_l14_similarity_score AS s FROM {src}) "
        "ORDER BY isnan(s) OR s IS NULL, s DESC LIMIT 1 OFFSET (SELECT floor(count(*) * 0.3::DOUBLE)::BIGINT FROM {src})) "
        "AND NOT isnan(clip_l14_similarity_score) ORDER BY hi, lo"
    ),
    "basic_filter": (
        "SELECT {hilo} FROM {src} WHERE lang = 'en' AND words_gt(text, 2) AND length(text) > 5 "
        "AND least(original_width, original_height) >= 200 "
        "AND greatest(original_width, original_height) / least(original_width, original_height) <= 3.0 ORDER BY hi, lo"
    ),
    "laion2b": ("SELECT {hilo} FROM {src} WHERE lang_cld3 = 'en' AND clip_b32_similarity_score >= 0.28::FLOAT "
                "AND NOT isnan(clip_b32_similarity_score) ORDER BY hi, lo"),
}
HILO = "('0x' || uid[1:16])::UBIGINT AS hi, ('0x' || uid[17:32])::UBIGINT AS lo"


def write_source_langs(pool, src: Path, out: Path) -> Path:
    """The pool's language ids (derived groups lang, lang_cld3) back in the source's row order,
    one parquet per source shard beside it (``out/<shard>.parquet``), for the hand-written SQL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dcdb.engine import connect

    if (out / "_DONE").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    con = connect(pool)
    if "source_shards" in pool.manifest:  # store format 2: rows in uid order, each knows its source row
        names = [s["name"] for s in pool.manifest["source_shards"]]
        tables = [con.sql(f"SELECT lang, lang_cld3 FROM pool WHERE source_shard = {i} ORDER BY source_row")
                  .to_arrow_table() for i in range(len(names))]
    else:  # format 1 (to time the code before it): one pool shard per source shard, in source order
        names = [s["name"] for s in pool.shards]
        whole = con.sql("SELECT lang, lang_cld3 FROM pool").to_arrow_table()
        starts = np.cumsum([0] + [s["rows"] for s in pool.shards])
        tables = [whole.slice(a, b - a) for a, b in itertools.pairwise(starts)]
    for name, t in zip(names, tables):
        pq.write_table(pa.table({"lang": t.column(0), "lang_cld3": t.column(1)}), out / f"{name}.parquet")
    (out / "_DONE").write_text("")
    return out


def duckdb_hand(name, src: Path, langs: Path | None, out: Path) -> np.ndarray:
    """A metadata baseline as one hand-written DuckDB statement over the raw Parquet -> .npy."""
    import duckdb

    from dcdb.engine import MACROS
    from dcdb.sqltext import parquet_list

    files = sorted(src.glob("*.parquet"))
    rel = f"read_parquet({parquet_list(files)})"
    if langs is not None and name in ("basic_filter", "laion2b"):
        rel = f"(SELECT * FROM {rel} POSITIONAL JOIN read_parquet({parquet_list([langs / f.name for f in files])}))"
    con = duckdb.connect()
    for m in MACROS:  # words_gt: len(text.split()) > n with Python's whitespace, one regex
        con.execute(m)
    tbl = con.sql(HAND_SQL[name].format(src=rel, hilo=HILO)).to_arrow_table()
    arr = np.empty(tbl.num_rows, np.dtype("u8,u8"))
    arr["f0"] = tbl.column("hi").to_numpy()
    arr["f1"] = tbl.column("lo").to_numpy()
    np.save(out, arr)
    return arr


def compare(pool, src, names, assets, workers, init_args, title, *, repeat=1, hand_langs=None, work=None):
    from dcdb.query import load_filter, run_filter, write_uids
    from dcdb.store import open_pool

    paths = sorted(str(p) for p in src.glob("*.parquet"))
    out = Path(work or ".")
    rows = []

    def dcdb_run(name):  # what `dcdb query NAME -o OUT.npy` does: run, write the .npy
        res = run_filter(open_pool(pool.path), load_filter(name), dcdb_params(name, assets))
        write_uids(out / f"_dcdb_{name}.npy", res.uids, "npy")
        return res

    for name in names:
        t_dcdb, res = _median(lambda name=name: dcdb_run(name), repeat)
        t_dc, ref = _median(lambda name=name: datacomp_way(name, paths, assets, workers, init_args), repeat)
        same = np.array_equal(res.uids, ref)
        t_hand = None
        if name in HAND_SQL and (hand_langs is not None or name not in ("basic_filter", "laion2b")):
            t_hand, hand = _median(lambda name=name: duckdb_hand(name, src, hand_langs, out / f"_hand_{name}.npy"),
                                   repeat)
            same = same and (out / f"_hand_{name}.npy").read_bytes() == (out / f"_dcdb_{name}.npy").read_bytes()
        rows.append((name, t_dcdb, t_dc, t_hand, len(ref), same))
        hand_txt = f", DuckDB by hand {t_hand:.2f}s" if t_hand is not None else ""
        log(f"{name}: dcdb {t_dcdb:.2f}s, DataComp way {t_dc:.1f}s, x{t_dc / t_dcdb:.0f}{hand_txt}, {len(ref):,} uids, "
            f"{'equal' if same else 'DIFFERENT'}")
    print(f"\n{title}\n")
    print("| baseline | dcdb query (s) | DataComp way (s) | speed-up | DuckDB by hand (s) | dcdb / hand | uids | same |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, a, b, h, n, same in rows:
        hand = f"{h:.2f} | {a / h:.2f}x" if h is not None else "- | -"
        print(f"| {name} | {a:.2f} | {b:.1f} | {b / a:.0f}x | {hand} | {n:,} | {'yes' if same else 'NO'} |")
    return rows


def _median(fn, repeat):
    import statistics

    ts, out = [], None
    for _ in range(max(1, repeat)):
        t, out = timed(fn)
        ts.append(t)
    return statistics.median(ts), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench-baselines")
    ap.add_argument("--rows", type=int, default=1_000_000, help="pool with embeddings")
    ap.add_argument("--shards", type=int, default=None, help="default: rows / 10,000 (DataComp's shard size)")
    ap.add_argument("--meta-rows", type=int, default=0, help="also a metadata-only pool (e.g. 12800000)")
    ap.add_argument("--centroids", type=int, default=1000, help="centroid count (DataComp: 100000)")
    ap.add_argument("--in1k", type=int, default=20000, help="ImageNet embedding count (DataComp: 1.28M)")
    ap.add_argument("--dc-workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", nargs="*", default=None, help="baselines to run")
    ap.add_argument("--meta-buckets", type=int, default=None,
                    help="lay the metadata-only pool out in N uid buckets (dcdb ingest --buckets N): outputs "
                         "come out in uid order, so no sort")
    ap.add_argument("--meta-only", action="store_true", help="only the metadata-only pool's comparison")
    ap.add_argument("--reuse", action="store_true", help="keep derived columns already annotated (no one-off cost)")
    ap.add_argument("--no-embeddings", action="store_true",
                    help="only a metadata-only pool of --rows rows and the metadata baselines (e.g. --rows 12800000)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per timing (the median is printed)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.no_embeddings:
        args.meta_rows, args.meta_only = args.rows, True
    shards = args.shards or max(1, args.rows // 10_000)
    names = args.only or BASELINES
    if args.no_embeddings:  # no embedding pool, no image or WordNet assets
        meta_baselines(work, args, names, {}, (None, None))
        return
    pool, src = build_pool(work, args.rows, shards, True, "pool")
    wn_root, nltk_data = make_wordnet(work, src)
    assets = make_assets(work, pool, src, wn_root, args.centroids, args.in1k)
    log(f"assets: {len(assets['entity']):,} WordNet ids, {args.centroids:,} centroids, {args.in1k:,} ImageNet "
        f"vectors; WordNet {wn_root}; DataComp way looks words up with {'NLTK' if nltk_data else 'dcdb reader'}")
    init_args = (str(wn_root), nltk_data)
    if not args.meta_only:
        costs = annotate_all(pool, assets, wn_root, ["lang", "lang_cld3", "wordnet", "centroids"], args.reuse)
        compare(pool, src, names, assets, args.dc_workers, init_args,
                f"{pool.rows:,}-row pool with embeddings, {shards} shards, {os.cpu_count()} cores, "
                f"DataComp way on {args.dc_workers} processes", repeat=args.repeat, work=work)
        print("\nderived columns, one-off (dcdb annotate): " + ", ".join(f"{k} {v:.1f}s" for k, v in costs.items()))
    if args.meta_rows:
        meta_baselines(work, args, names, assets, init_args)


def meta_baselines(work: Path, args, names, assets, init_args) -> None:
    """The metadata-only pool (``--meta-rows``): dcdb, the DataComp way and DuckDB by hand."""
    mpool, msrc = build_pool(work, args.meta_rows, max(1, args.meta_rows // 10_000), False, "meta",
                             args.meta_buckets)
    names = [n for n in names if n in META_BASELINES]
    langs = None
    if {"basic_filter", "laion2b"} & set(names):
        mcosts = annotate_all(mpool, assets, None, ["lang", "lang_cld3"], args.reuse)
        langs = write_source_langs(mpool, msrc, work / "meta_langs")
    else:
        mcosts = {}
    compare(mpool, msrc, names, assets, args.dc_workers, init_args,
            f"{mpool.rows:,}-row metadata-only pool ({mpool.manifest.get('buckets', {}).get('count', 'no')} uid buckets, "
            f"store format v{mpool.manifest['format_version']}), "
            f"{os.cpu_count()} cores, DataComp way on {args.dc_workers} processes, median of {args.repeat}",
            repeat=args.repeat, hand_langs=langs, work=work)
    if mcosts:
        print("\nderived columns, one-off: " + ", ".join(f"{k} {v:.1f}s" for k, v in mcosts.items()))


if __name__ == "__main__":
    main()
