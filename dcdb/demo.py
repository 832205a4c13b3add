"""`dcdb demo`: the main job on generated data, end to end, in one folder.

Today it runs the query half of the DataComp loop: a synthetic DataComp-format pool (metadata
parquet + float16 embeddings) is generated, ingested into a pool store, filtered by SQL files into
DataComp uid lists, and the lists are combined. Each step reuses what a previous run left in the
folder (ingest resumes; finished outputs are kept), so re-running is cheap.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

DEMO_FILTERS = {
    # name -> (SQL text, params)
    "no_filter": (None, {}),
    "clip_l14_above_0.3": (
        ("-- Rows whose L/14 CLIP score is at least $threshold.\n"
        "-- @param threshold float = 0.3 minimum clip_l14_similarity_score\n"
        "SELECT uid FROM pool WHERE clip_l14_similarity_score >= $threshold"),
        {},
    ),
    "size_aspect_caption": (
        ("-- DataComp's basic_filter without language id: image size/aspect, caption length.\n"
        "SELECT uid FROM pool\n"
        "WHERE least(original_width, original_height) >= 200\n"
        "  AND greatest(original_width, original_height) / least(original_width, original_height) <= 3.0\n"
        "  AND length(text) > 5 AND words_gt(text, 2)"),
        {},
    ),
    "text_image_agree": (
        ("-- Rows whose image embedding agrees with its caption embedding (cosine, B/32 space).\n"
        "-- @param min_cos float = 0.25 minimum cosine(b32_img, b32_txt)\n"
        "SELECT uid FROM pool WHERE cosine(b32_img, b32_txt) >= $min_cos"),
        {},
    ),
}


def run_demo(folder: str | Path, *, rows: int = 200_000, force: bool = False, progress: bool = True,
             log: Callable[[str], None] = print) -> str:
    """Build (or reuse) the demo folder and return a summary table."""
    from dcdb.ingest import ingest
    from dcdb.query import load_filter, parse_filter, run_filter, write_manifest, write_uids
    from dcdb.store import open_pool
    from dcdb.synth import synth_pool
    from dcdb.uids import intersect

    folder = Path(folder)
    if force and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src, pool_dir, out = folder / "src", folder / "pool", folder / "subsets"
    t0 = time.perf_counter()
    if not (src / "_SUCCESS").exists():
        log(f"[1/3] generating a {rows:,}-row DataComp-format pool in {src}")
        synth_pool(src, rows=rows, shards=max(1, rows // 25_000), seed=0, force=True, progress=progress)
        (src / "_SUCCESS").write_text("")
    if not (pool_dir / "dcdb.json").exists():
        log(f"[2/3] ingesting into the pool store {pool_dir}")
        log(ingest(src, pool_dir, progress=progress).summary())
    pool = open_pool(pool_dir)
    log("[3/3] running filters")
    out.mkdir(exist_ok=True)
    lines = ["| filter | uids kept | share of pool | seconds |", "|---|---:|---:|---:|"]
    results = {}
    for name, (text, params) in DEMO_FILTERS.items():
        filt = load_filter(name) if text is None else parse_filter(name, text, None)
        res = run_filter(pool, filt, params)
        target = out / f"{name}.npy"
        write_uids(target, res.uids, "npy")
        write_manifest(target.with_name(target.name + ".json"), res.manifest(output=str(target), fmt="npy"))
        results[name] = res.uids
        lines.append(f"| {name} | {res.rows:,} | {res.rows / pool.rows:.1%} | {res.seconds:.2f} |")
    both = intersect(results["clip_l14_above_0.3"], results["size_aspect_caption"])
    np.save(out / "clip_and_size.npy", both)
    lines.append(f"| clip_l14_above_0.3 ∩ size_aspect_caption | {len(both):,} | {len(both) / pool.rows:.1%} | - |")
    lines.append("")
    lines.append(f"uid lists (DataComp .npy) and their manifests are in {out}; total {time.perf_counter() - t0:.1f}s")
    lines.append(f"try: dcdb sql \"SELECT count(*), avg(clip_l14_similarity_score) FROM pool\" --pool {pool_dir}")
    return "\n".join(lines)
