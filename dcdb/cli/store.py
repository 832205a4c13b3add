"""``dcdb ingest``, ``dcdb upgrade`` and ``dcdb info``."""

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
              help="Lay the pool out in N uid buckets (a power of two; 1 = fully sorted), each sorted by uid "
                   "(default: buckets of ~256 MB, or of the largest source shard).")
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


# ---------------------------------------------------------------------------------- upgrade


@command(cli, "upgrade", reads_lance=True)
@click.argument("pool", type=click.Path(exists=True, file_okay=False, path_type=str))
@jobs_option
def upgrade_cmd(c: Ctx, pool, jobs):
    """Rewrite a pool of store format v1 as v2 in place (uid-sorted, binary uids).

    The pool's rows are re-laid out in uid buckets with their derived columns; stored subsets and
    the shard index stay. A re-run after an interruption resumes; until it finishes the pool
    stays v1 (or, past the point of exchanging files, says to re-run).
    """
    from dcdb.upgrade import upgrade

    report = upgrade(pool, jobs=jobs or os.cpu_count() or 1, progress=not c.quiet)
    c.log(report.summary())


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
