"""``dcdb reshard`` and ``dcdb index-shards``: selected uids -> webdataset shards in DataComp's layout."""

from __future__ import annotations

import os

import click
from click.core import ParameterSource

from dcdb.cli.base import Ctx, cli, command, hold_write_lock, jobs_option, pool_option


@command(cli, "index-shards")
@click.argument("shards_dir", metavar="DOWNLOAD/shards", type=click.Path(file_okay=False, path_type=str))
@pool_option
@jobs_option
def index_shards_cmd(c: Ctx, shards_dir, pool, jobs):
    """Index img2dataset shards (tar + parquet + _stats.json) into the pool: uid -> tar, byte range.

    The index lets `dcdb reshard --pool` read only the selected samples' bytes, and is queryable
    as the view `shard_index` (uid, downloaded, status, width, height, tar, byte_offset, ...).
    Resumable: a re-run reads only the tars that changed or were not indexed yet.
    """
    from dcdb.io import writing
    from dcdb.shards.index import index_shards
    from dcdb.store import open_pool

    p = open_pool(pool)
    hold_write_lock(p, "dcdb index-shards")
    with writing(p.path, "the shard index into pool", redo="then re-run: indexed tars are kept"):
        report = index_shards(pool, shards_dir, jobs=jobs or os.cpu_count() or 1, progress=not c.quiet)
    c.log(report.summary())


@command(cli, "reshard")
@pool_option
@click.option(
    "--shards",
    "shards_dir",
    metavar="DOWNLOAD/shards",
    type=click.Path(file_okay=False, path_type=str),
    help="The img2dataset shards. Without --pool they are scanned; with --pool, where the indexed tars are now.",
)
@click.option(
    "--uids",
    "subset",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Subset: a DataComp uid list (.npy of u8,u8, or raw 16-byte records).",
)
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=str), help="Output folder.")
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Samples per output tar.",
)
@jobs_option
@click.option(
    "--blur", is_flag=True, help="Blur face_bboxes like DataComp: re-encode as .webp, boxes into the json."
)
@click.option(
    "--shuffle-seed",
    type=int,
    default=None,
    help="Write samples in a seeded random order (default: input order).",
)
@click.option("--overwrite", is_flag=True, help="Replace the shards in a non-empty OUT from another run.")
@click.option(
    "--strict", is_flag=True, help="Fail on a corrupt input sample instead of skipping and counting it."
)
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: one Ray task per output tar (RAY_ADDRESS or a local cluster; OUT on shared storage).")
def reshard_cmd(
    c: Ctx, pool, shards_dir, subset, out, shard_size, jobs, blur, shuffle_seed, overwrite, strict, engine
):
    """Write the samples of a uid list as webdataset shards in DataComp's layout.

    \b
    dcdb reshard --pool POOL --uids subset.npy -o OUT          reads only the selected bytes
    dcdb reshard --shards DOWNLOAD/shards --uids subset.npy -o OUT   no pool: scans the tars

    OUT gets %08d.tar (keys uid-j for the j-th copy, all members kept, at most --shard-size
    samples and 3 GB each), %08d_stats.json, sample_ids.npy, missing_uids.npy and meta.json.
    Samples are in input order (tar by tar), or shuffled with --shuffle-seed; the output is
    byte-identical whatever -j is. A killed run resumes when re-run with the same arguments.
    """
    from dcdb.shards.reshard import reshard

    ctx = click.get_current_context()
    if shards_dir and ctx.get_parameter_source("pool") is ParameterSource.ENVIRONMENT:
        pool = None  # --shards alone means scan mode, whatever $DCDB_POOL says
    report = reshard(
        subset,
        out,
        pool=pool,
        shards=shards_dir,
        shard_size=shard_size,
        jobs=jobs or os.cpu_count() or 1,
        blur=blur,
        shuffle_seed=shuffle_seed,
        overwrite=overwrite,
        strict=strict,
        progress=not c.quiet,
        engine=engine,
    )
    c.log(report.summary())
