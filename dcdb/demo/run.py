"""`dcdb demo`: DataComp's whole loop on the generated demo world, in one folder, on a laptop.

    world -> teachers (CLIP scores) -> ingest (+ shard index) -> annotate lang -> sql/ baselines
          -> reshard each subset -> train one tiny CLIP per subset (same recipe, same samples seen)
          -> evaluate each on the world's eval tasks -> leaderboard.md + leaderboard.png

Folder layout::

    FOLDER/world/        the demo world (dcdb.demo.world) with its teachers in world/teacher/{b32,l14}
    FOLDER/pool/         the pool store (ingested metadata + embeddings, shard index, lang column)
    FOLDER/subsets/      one DataComp uid list (.npy) per baseline, with its manifest
    FOLDER/shards/NAME/  the resharded subset (webdataset tars + meta.json)
    FOLDER/runs/NAME-sK/ one training run per subset and seed (checkpoints, info.json, eval_results.jsonl)
    FOLDER/leaderboard.md, leaderboard.png, scores.md (mean CLIP score per ground-truth defect)

Every step reuses what a previous run left (a finished step is skipped, an interrupted one resumes),
so re-running is cheap and ``--seeds 3`` after a 1-seed run only trains the new seeds.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: name -> (sql/ filter, params). Thresholds tuned for OpenAI's CLIP (laion2b's 0.28) do not carry
#: over to the demo's tiny teachers, so the CLIP-score baselines use DataComp's fraction form.
DEMO_FILTERS: dict[str, tuple[str, dict[str, str]]] = {
    "no_filter": ("no_filter", {}),
    "basic_filter": ("basic_filter", {}),
    "clip_score_l14_30": ("clip_score", {"arch": "l14", "fraction": "0.3"}),
    "clip_score_b32_30": ("clip_score", {"arch": "b32", "fraction": "0.3"}),
}

#: Demo sizes (measured to fit 10 minutes on 2 cores, see the README).
DEMO_SAMPLES = 12_000
DEMO_CONCEPTS = 20
TEACHER_SAMPLES_SEEN = 4_800
STUDENT_SAMPLES_SEEN = 6_400


def run_demo(
    folder: str | Path,
    *,
    samples: int = DEMO_SAMPLES,
    rows: int | None = None,
    concepts: int = DEMO_CONCEPTS,
    seeds: int | Sequence[int] = 1,
    samples_seen: int = STUDENT_SAMPLES_SEEN,
    teacher_samples_seen: int = TEACHER_SAMPLES_SEEN,
    filters: Sequence[str] | None = None,
    shard_size: int | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> str:
    """Run (or finish) the whole loop in ``folder`` and return the leaderboard as markdown.

    ``samples`` (alias ``rows``) is the world's pool size; ``seeds`` a count or a list of training
    seeds (with several, the summary gives each filter's mean and spread over seeds). ``workers``:
    world-building processes and training dataloader processes (default 1; 0 loads in-process).
    """
    from dcdb.eval import collect, evaluate, plot, to_markdown
    from dcdb.demo.teacher import build_teachers, format_scores, scores_by_defect
    from dcdb.train import train
    from dcdb.demo.world import build_world
    from dcdb.io import prepare_folder

    if rows is not None:
        samples = int(rows)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    names = list(filters or DEMO_FILTERS)
    folder = prepare_folder(folder, force=force, what="demo folder", clear=lambda p: True)  # --force: from scratch
    world, pool_dir, subsets, shards, runs = (folder / n for n in ("world", "pool", "subsets", "shards", "runs"))
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    def step(name: str):
        return _Timer(name, timings, log)

    with step(f"[1/7] world ({samples:,} samples, {concepts} concepts) in {world}"):
        if not (world / "world.json").is_file():
            shard = shard_size or max(1000, -(-samples // 4))
            build_world(world, concepts=concepts, samples=samples, seed=0, shard_size=shard,
                        teacher_samples=max(1000, samples // 2), workers=workers or None, progress=progress,
                        force=True)
    with step("[2/7] teachers (b32 <- dcdb-teacher-b32, l14 <- dcdb-teacher-l14) and pool embeddings"):
        build_teachers(world, samples_seen=teacher_samples_seen, progress=progress, log=log,
                       workers=1 if workers is None else workers)
        score_table = format_scores(scores_by_defect(world))
        (folder / "scores.md").write_text("Mean CLIP score by ground-truth defect\n\n" + score_table + "\n")
        log(score_table)
    with step(f"[3/7] ingest into {pool_dir}, index the shards, annotate lang"):
        pool = _ingest(world, pool_dir, progress, log)
    with step(f"[4/7] filters -> {subsets}"):
        kept = _filters(pool, names, subsets, log)
    with step(f"[5/7] reshard each subset -> {shards}"):
        for name in names:
            _reshard(pool, subsets / f"{name}.npy", shards / name, name, progress)
    with step(f"[6/7] train one tiny CLIP per subset and seed ({samples_seen:,} samples seen each)"):
        for seed in seed_list:
            for name in names:
                res = train(shards / name, runs / f"{name}-s{seed}", "tiny", seed=seed, resume="latest",
                            samples_seen=samples_seen, workers=1 if workers is None else workers,
                            progress=progress)
                log(f"  {name} seed {seed}: {res.summary()}")
    with step("[7/7] evaluate each run and write the leaderboard"):
        for seed in seed_list:
            for name in names:
                evaluate(runs / f"{name}-s{seed}", world / "eval")
        rows_, tasks = collect(runs)
        wanted = {f"{n}-s{s}" for n in names for s in seed_list}
        rows_ = [r for r in rows_ if r.run in wanted]
        table = to_markdown(rows_, tasks)
        plot(rows_, tasks, folder / "leaderboard.png", title="dcdb demo: zero-shot score by filter")
        summary = _by_filter(rows_, names, kept)
        (folder / "leaderboard.md").write_text(
            "# dcdb demo leaderboard\n\n" + summary + "\n\n## Runs\n\n" + table + "\n\n"
            "## Mean CLIP score by ground-truth defect\n\n" + score_table + "\n")
    total = time.perf_counter() - t_all
    times = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
    return (f"{summary}\n\n{table}\n\nleaderboard: {folder / 'leaderboard.md'} and {folder / 'leaderboard.png'}"
            f"\ntotal {total:.0f}s ({times})")


class _Timer:
    def __init__(self, name: str, timings: dict[str, float], log: Callable[[str], None]):
        self.name, self.timings, self.log = name, timings, log

    def __enter__(self):
        self.log(self.name)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        key = self.name.split("]")[0].strip("[")
        self.timings[key] = time.perf_counter() - self.t0
        return False


def _ingest(world: Path, pool_dir: Path, progress: bool, log: Callable[[str], None]):
    from dcdb.annotate import annotate, list_groups
    from dcdb.ingest.pool import ingest
    from dcdb.shards.index import index_shards
    from dcdb.store import open_pool

    if not (pool_dir / "dcdb.json").exists():
        log(ingest(world / "metadata", pool_dir, progress=progress).summary())
    index_shards(pool_dir, world / "shards", progress=progress, log=log)
    pool = open_pool(pool_dir)
    if not any(g.get("group", g.get("name")) == "lang" for g in list_groups(pool)):
        annotate(pool, "lang", progress=progress)
        pool = open_pool(pool_dir)
    return pool


def _filters(pool, names: Sequence[str], out: Path, log: Callable[[str], None]) -> dict[str, int]:
    from dcdb.query import load_filter, run_filter, write_output

    out.mkdir(parents=True, exist_ok=True)
    kept = {}
    for name in names:
        target = out / f"{name}.npy"
        if target.is_file():
            kept[name] = int(np.load(target).shape[0])
            continue
        sql, params = DEMO_FILTERS[name]
        res = run_filter(pool, load_filter(sql), dict(params))
        write_output(target, res.uids, "npy", res.manifest(output=str(target), fmt="npy"))
        kept[name] = res.rows
        log(f"  {name}: {res.rows:,} of {pool.rows:,} ({res.rows / pool.rows:.0%})")
    return kept


def _reshard(pool, uids: Path, out: Path, label: str, progress: bool) -> None:
    from dcdb.shards.reshard import reshard

    if (out / "meta.json").is_file():
        return
    reshard(uids, out, pool=pool, shard_size=2000, jobs=2, progress=progress, subset_label=label)


def _by_filter(rows: list, names: Sequence[str], kept: dict[str, int]) -> str:
    """One line per filter: subset size, mean average over seeds, spread (max - min) and stdev."""
    lines = ["| filter | subset size | seeds | mean average | spread (max-min) | stdev |",
             "|---|---:|---:|---:|---:|---:|"]
    stats: list[tuple[float, str]] = []
    for name in names:
        avgs = [r.average for r in rows if r.run.rsplit("-s", 1)[0] == name and r.average is not None]
        if not avgs:
            continue
        mean = statistics.fmean(avgs)
        spread = max(avgs) - min(avgs)
        sd = statistics.stdev(avgs) if len(avgs) > 1 else 0.0
        stats.append((mean, f"| {name} | {kept.get(name, 0):,} | {len(avgs)} | **{mean:.3f}** | {spread:.3f} | {sd:.3f} |"))
    stats.sort(key=lambda x: -x[0])
    return "\n".join(lines + [s for _, s in stats])


def demo_effect(folder: str | Path, better: str = "clip_score_l14_30", base: str = "no_filter") -> dict[str, Any]:
    """The DataComp effect in a finished demo folder: mean averages, spreads, and whether
    ``better`` beats ``base`` by more than the larger of their spreads across seeds."""
    from dcdb.eval import collect

    rows, _ = collect(Path(folder) / "runs")
    out: dict[str, Any] = {}
    for name in (better, base):
        avgs = [r.average for r in rows if r.run.rsplit("-s", 1)[0] == name and r.average is not None]
        out[name] = {"averages": avgs, "mean": statistics.fmean(avgs), "spread": max(avgs) - min(avgs)}
    gap = out[better]["mean"] - out[base]["mean"]
    out["gap"] = gap
    out["holds"] = gap > max(out[better]["spread"], out[base]["spread"])
    return out


if __name__ == "__main__":
    import sys

    print(json.dumps(demo_effect(sys.argv[1]), indent=1))
