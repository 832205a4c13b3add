"""DataComp's baselines: `dcdb query sql/<name>.sql` against a re-implementation of DataComp's own way,
same pool, same assets, same run; the derived columns' one-off cost reported separately.

    python benchmarks/bench_baselines.py --workdir bench-base                       # 1M rows with embeddings
    python benchmarks/bench_baselines.py --workdir bench-base --rows 200000         # ~10 minutes here
    python benchmarks/bench_baselines.py --workdir bench-base --meta-rows 12800000  # + metadata-only baselines

The DataComp way (baselines/apply_filter.py, re-implemented): per shard, pandas reads the parquet
(and np.load the npz), language id per row in Python (fastText predict / gcld3, the same models dcdb
annotates with), len(x.split()) etc. through Series.apply, WordNet lookups per token with NLTK
(``wordnet.synsets(w)[0].offset()``) when NLTK can read the WordNet database, torch.einsum + argmax
for the centroids, uid conversion per row, np.sort; shards on ``--dc-workers`` processes
(DataComp's worker_threadpool). dcdb reads the precomputed derived columns (``dcdb annotate``: lang,
lang_cld3, wordnet, centroids), whose one-off cost is printed first. Every pair of outputs is
checked equal.

Assets: WordNet is the real WordNet 3.0 (Debian's wordnet-base) when installed, else a stand-in over
the pool's vocabulary; the WNID list is every third first-synset offset of the pool's words;
centroids are ``--centroids`` scaled pool vectors (DataComp: 100,000 x 768; the einsum cost grows
linearly with it, on both sides of the comparison only for DataComp); ImageNet embeddings are
``--in1k`` vectors in 5 DataComp-style ``.pt`` files.
"""

from __future__ import annotations

import argparse
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


def compare(pool, src, names, assets, workers, init_args, title):
    from dcdb.query import load_filter, run_filter
    from dcdb.store import open_pool

    paths = sorted(str(p) for p in src.glob("*.parquet"))
    rows = []
    for name in names:
        t_dcdb, res = timed(lambda name=name: run_filter(open_pool(pool.path), load_filter(name),
                                                         dcdb_params(name, assets)))
        t_dc, ref = timed(lambda name=name: datacomp_way(name, paths, assets, workers, init_args))
        same = np.array_equal(res.uids, ref)
        rows.append((name, t_dcdb, t_dc, len(ref), same))
        log(f"{name}: dcdb {t_dcdb:.2f}s, DataComp way {t_dc:.1f}s, x{t_dc / t_dcdb:.0f}, {len(ref):,} uids, "
            f"{'equal' if same else 'DIFFERENT'}")
    print(f"\n{title}\n")
    print("| baseline | dcdb query (s) | DataComp way (s) | speed-up | uids | same set |")
    print("|---|---:|---:|---:|---:|---|")
    for name, a, b, n, same in rows:
        print(f"| {name} | {a:.2f} | {b:.1f} | {b / a:.0f}x | {n:,} | {'yes' if same else 'NO'} |")
    return rows


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
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shards = args.shards or max(1, args.rows // 10_000)
    pool, src = build_pool(work, args.rows, shards, True, "pool")
    wn_root, nltk_data = make_wordnet(work, src)
    assets = make_assets(work, pool, src, wn_root, args.centroids, args.in1k)
    log(f"assets: {len(assets['entity']):,} WordNet ids, {args.centroids:,} centroids, {args.in1k:,} ImageNet "
        f"vectors; WordNet {wn_root}; DataComp way looks words up with {'NLTK' if nltk_data else 'dcdb reader'}")
    init_args = (str(wn_root), nltk_data)
    names = args.only or BASELINES
    if not args.meta_only:
        costs = annotate_all(pool, assets, wn_root, ["lang", "lang_cld3", "wordnet", "centroids"], args.reuse)
        compare(pool, src, names, assets, args.dc_workers, init_args,
                f"{pool.rows:,}-row pool with embeddings, {shards} shards, {os.cpu_count()} cores, "
                f"DataComp way on {args.dc_workers} processes")
        print("\nderived columns, one-off (dcdb annotate): " + ", ".join(f"{k} {v:.1f}s" for k, v in costs.items()))
    if args.meta_rows:
        mpool, msrc = build_pool(work, args.meta_rows, max(1, args.meta_rows // 10_000), False, "meta",
                                 args.meta_buckets)
        mcosts = annotate_all(mpool, assets, wn_root, ["lang", "lang_cld3"], args.reuse)
        compare(mpool, msrc, [n for n in names if n in META_BASELINES], assets, args.dc_workers, init_args,
                f"{mpool.rows:,}-row metadata-only pool"
                + (f" in {args.meta_buckets} uid buckets" if args.meta_buckets else ""))
        print("\nderived columns, one-off: " + ", ".join(f"{k} {v:.1f}s" for k, v in mcosts.items()))


if __name__ == "__main__":
    main()
