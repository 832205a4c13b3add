"""``dcdb ingest`` and ``dcdb info``."""

from __future__ import annotations

import os

import click

from dcdb.cli.base import Ctx, cli, command, hold_write_lock, jobs_option, pool_option

# ----------------------------------------------------------------------------------- ingest


@command(cli, "ingest")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.argument("pool", type=click.Path(file_okay=False, path_type=str))
@jobs_option
@click.option(
    "--shards",
    "shards_dir",
    type=click.Path(exists=True, file_okay=False, path_type=str),
    default=None,
    metavar="DOWNLOAD/shards",
    help="Also index these img2dataset shards (uid -> tar, byte range) for `dcdb reshard --pool`.",
)
@click.option("--buckets", type=int, default=None, metavar="N",
              help="Lay the pool out in N uid buckets (a power of two), each sorted by uid (for --engine ray).")
def ingest_cmd(c: Ctx, src, pool, jobs, shards_dir, buckets):
    """Ingest a DataComp metadata folder SRC (parquet + same-stem .npz) into the pool store POOL.

    Streams shard by shard; a re-run after an interruption resumes where it stopped.
    """
    from dcdb.ingest.pool import ingest

    jobs = jobs or os.cpu_count() or 1
    if shards_dir:
        from dcdb.shards.index import list_tars

        list_tars(shards_dir)  # refuse a folder without tars before ingesting
        hold_write_lock(os.path.abspath(pool), "ingest", create=True)  # over ingest and indexing
    report = ingest(src, pool, jobs=jobs, progress=not c.quiet, buckets=buckets)
    c.log(report.summary())
    if shards_dir:
        from dcdb.shards.index import index_shards

        c.log(index_shards(pool, shards_dir, jobs=jobs, progress=not c.quiet).summary())


# ------------------------------------------------------------------------------------- info


@command(cli, "info")
@pool_option
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def info_cmd(c: Ctx, pool, as_json):
    """Rows, columns, embedding spaces, subsets and size on disk of a pool."""
    import json

    from dcdb.store import open_pool
    from dcdb.summary import format_pool_info, pool_info

    info = pool_info(open_pool(pool))
    click.echo(json.dumps(info, indent=2) if as_json else format_pool_info(info))
