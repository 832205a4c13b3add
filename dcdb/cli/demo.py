"""The demo world's commands: ``dcdb synth pool``, ``dcdb world``, ``dcdb demo``."""

from __future__ import annotations

import time

import click

from dcdb.cli.base import Ctx, cli, command

# ------------------------------------------------------------------------------------ synth


@cli.group()
def synth() -> None:
    """Generate random but valid DataComp-format data (for tests and benchmarks)."""


@command(synth, "pool")
@click.argument("out", type=click.Path(file_okay=False, path_type=str))
@click.option("--rows", type=click.IntRange(min=1), default=10_000, show_default=True)
@click.option("--shards", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="Embedding dtype in the .npz files.",
)
@click.option("--no-embeddings", is_flag=True, help="Write metadata parquet only (no .npz).")
@click.option("--clusters", type=click.IntRange(min=0), default=0, show_default=True, metavar="K",
              help="Draw image embeddings from K clusters with the spread of real CLIP embeddings "
              "(about rows/1000; for ANN benchmarks); 0: the default, nearly structure-free vectors.")
@click.option("--force", is_flag=True, help="Write into OUT even if it is not empty.")
def synth_pool_cmd(c: Ctx, out, rows, shards, seed, dtype, no_embeddings, clusters, force):
    """Write a DataComp metadata folder OUT: per shard a parquet and a row-aligned .npz."""
    from dcdb.demo.synth import synth_pool

    t0 = time.perf_counter()
    info = synth_pool(
        out,
        rows=rows,
        shards=shards,
        seed=seed,
        dtype=dtype,
        embeddings=not no_embeddings,
        force=force,
        progress=not c.quiet,
        clusters=clusters,
    )
    c.log(f"wrote {info['rows']:,} rows in {info['shards']} shards to {out} ({time.perf_counter() - t0:.1f}s)")


# ------------------------------------------------------------------------------------- demo


@command(cli, "demo", reads_lance=True)
@click.argument("folder", default="dcdb-demo", type=click.Path(file_okay=False, path_type=str))
@click.option("--samples", "--rows", "samples", type=click.IntRange(min=1000), default=12_000, show_default=True,
              help="Pool size of the demo world (--rows is the old name).")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train each subset with this many seeds; the table gives mean and spread.")
@click.option("--samples-seen", type=click.IntRange(min=5), default=6_400, show_default=True,
              help="Samples seen by each subset's tiny CLIP (the same for every subset).")
@click.option("--force", is_flag=True, help="Rebuild the demo folder from scratch.")
def demo_cmd(c: Ctx, folder, samples, seeds, samples_seen, force):
    """DataComp's loop on the demo world: world -> teachers -> ingest -> sql/ baselines -> reshard
    -> train a tiny CLIP per subset -> evaluate -> leaderboard.md + leaderboard.png."""
    from dcdb.demo.run import run_demo

    click.echo(run_demo(folder, samples=samples, seeds=seeds, samples_seen=samples_seen, force=force,
                        progress=not c.quiet, log=c.log))


@command(cli, "world")
@click.argument("out", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--concepts",
    type=click.IntRange(min=2),
    default=40,
    show_default=True,
    help="Visual concepts (shape x colour x texture).",
)
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=60_000,
    show_default=True,
    help="Rows of the pool (failed downloads included).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Everything follows from it.")
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Samples per shard (img2dataset's number_sample_per_shard).",
)
@click.option(
    "--teacher-samples",
    type=click.IntRange(min=0),
    default=None,
    help="Samples of the clean teacher split  [default: samples/3, at least 1000]",
)
@click.option(
    "--eval-per-class",
    type=click.IntRange(min=1),
    default=25,
    show_default=True,
    help="Images per class in the classification eval tasks.",
)
@click.option(
    "--retrieval-samples",
    type=click.IntRange(min=1),
    default=500,
    show_default=True,
    help="Images in the retrieval eval task.",
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes (default: up to 2; small worlds build in-process).",
)
@click.option("--force", is_flag=True, help="Replace the world files in a non-empty OUT.")
def world_cmd(
    c: Ctx,
    out,
    concepts,
    samples,
    seed,
    shard_size,
    teacher_samples,
    eval_per_class,
    retrieval_samples,
    jobs,
    force,
):
    """Build the demo world in OUT: pool metadata, img2dataset shards, a teacher split, eval tasks.

    \b
    OUT/metadata      DataComp metadata parquet (+ .npz once a teacher has encoded the pool)
    OUT/shards        img2dataset tars, shard parquet and _stats.json (a few failed downloads)
    OUT/truth         ground truth per row: concept, defect, scene
    OUT/teacher       a clean split to train the teacher CLIP on
    OUT/eval          zero-shot tasks in the clip_benchmark layout + tasklist.json
    """
    from dcdb.demo.world import build_world

    t0 = time.perf_counter()
    m = build_world(
        out,
        concepts=concepts,
        samples=samples,
        seed=seed,
        shard_size=shard_size,
        teacher_samples=teacher_samples,
        eval_per_class=eval_per_class,
        retrieval_samples=retrieval_samples,
        workers=jobs,
        progress=not c.quiet,
        force=force,
    )
    counts = m["counts"]
    defects = ", ".join(f"{k} {v:,}" for k, v in counts["defect"].items())
    c.log(f"defects: {defects}; failed downloads {counts['failed_to_download']:,}; faces {counts['faces']:,}")
    c.log(f"eval tasks: {', '.join(f'{k} ({v:,})' for k, v in m['eval'].items())}")
    c.log(
        f"wrote a world of {m['samples']:,} samples, {len(m['concepts'])} concepts, "
        f"{m['teacher']['samples']:,} teacher samples to {out} ({time.perf_counter() - t0:.1f}s)"
    )
