"""``dcdb train``, ``dcdb eval`` and ``dcdb leaderboard``: thin commands over dcdb.train / dcdb.eval.

Imported by ``dcdb/cli/__init__.py``. torch and open_clip are imported inside the library
calls only, so ``dcdb --help`` stays fast.
"""

from __future__ import annotations

import json

import click

from dcdb.cli.base import Ctx, cli, command


@command(cli, "train")
@click.option("--scale", default="tiny", show_default=True,
              help="DataComp scale: tiny (CPU demo), debug, small, medium, large, xlarge.")
@click.option("--data", required=True, type=click.Path(path_type=str),
              help="Training shards: a `dcdb reshard` output folder (meta.json), any folder of .tar shards, or one .tar.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Run folder: info.json and checkpoints/epoch_latest.pt go here.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", default=None, metavar="latest|CHECKPOINT",
              help="Continue the run in --output ('latest') or from a checkpoint file.")
@click.option("--samples-seen", type=click.IntRange(min=1), default=None,
              help="Override the scale's samples seen (recorded in info.json).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Override the scale's global batch size (recorded in info.json).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Dataloader processes (default: one per spare core, at most 4).")
@click.option("--threads", type=click.IntRange(min=0), default=None,
              help="torch threads for training (default and 0: torch's default, every core).")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--save-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Also keep checkpoints/epoch_<k>.pt every k checkpoints (the last one is always kept).")
def train_cmd(c: Ctx, scale, data, output, seed, resume, samples_seen, batch_size, workers, threads, device,
              save_every):
    """Train a CLIP on --data with DataComp's fixed recipe for --scale.

    Prints the final checkpoint's path on stdout; progress and a summary go to stderr.
    """
    from dcdb.train import train

    result = train(data, output, scale, seed=seed, resume=resume, samples_seen=samples_seen,
                   batch_size=batch_size, workers=workers, threads=threads, device=device, save_every=save_every,
                   progress=not c.quiet, log=c.log)
    c.log(result.summary())
    click.echo(str(result.checkpoint))


@command(cli, "eval")
@click.argument("run", type=click.Path(exists=True, path_type=str))
@click.option("--tasks", "tasks_dir", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Folder of evaluation tasks (clip_benchmark layout) with an optional tasklist.yml/json.")
@click.option("--output", "-o", default=None, type=click.Path(file_okay=False, path_type=str),
              help="Folder for eval_results.jsonl (default: the run folder).")
@click.option("--model", default=None, help="Architecture of a checkpoint that does not record it (e.g. ViT-B-32).")
@click.option("--task", "only", multiple=True, help="Evaluate only this task key or name (repeatable).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Dataloader processes per task.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--overwrite", is_flag=True, help="Discard earlier results in the output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the result lines as JSON instead of a table.")
def eval_cmd(c: Ctx, run, tasks_dir, output, model, only, batch_size, workers, device, overwrite, as_json):
    """Zero-shot evaluate RUN (a training run folder or a checkpoint) on every task in --tasks.

    Writes eval_results.jsonl (one line per task, as DataComp); tasks already in it are skipped.
    Prints each task's main metric and the average on stdout.
    """
    from dcdb.eval import evaluate

    result = evaluate(run, tasks_dir, output=output, model=model, tasks=list(only) or None,
                      batch_size=batch_size, workers=workers, device=device, overwrite=overwrite, log=c.log)
    if as_json:
        for line in result.results:
            click.echo(json.dumps({k: v for k, v in line.items() if k != "main_metric_name"}))
    else:
        click.echo(result.table())
    c.log(result.summary())


@command(cli, "leaderboard")
@click.argument("runs_dir", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--output", "-o", default=None, type=click.Path(path_type=str), metavar="FILE",
              help="Write the markdown table to FILE instead of stdout.")
@click.option("--plot", "plot_path", default=None, type=click.Path(path_type=str), metavar="FILE",
              help="Also draw a PNG bar chart of each run's main metrics and average.")
def leaderboard_cmd(c: Ctx, runs_dir, output, plot_path):
    """Table of every evaluated run in RUNS_DIR: each task's main metric and the average."""
    from dcdb.eval import collect, plot, to_markdown
    from dcdb.io import atomic_path, check_output

    for path, what in ((output, "output"), (plot_path, "plot")):
        if path:
            check_output(path, force=True, what=what)  # a regular file or none (always replaced)
    rows, tasks = collect(runs_dir)
    table = to_markdown(rows, tasks)
    if output:
        with atomic_path(output) as tmp:
            tmp.write_text(table + "\n", encoding="utf-8")
        c.log(f"wrote {output}")
    else:
        click.echo(table)
    if plot_path:
        plot(rows, tasks, plot_path)
        c.log(f"wrote {plot_path}")
