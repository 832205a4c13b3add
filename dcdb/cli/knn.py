"""``dcdb knn``, ``dcdb index`` and ``dcdb encoder``: nearest-neighbour subsets and their set-up."""

from __future__ import annotations

import click

from dcdb.cli.base import Ctx, cli, command, hold_write_lock, pool_option, uid_destination

space_option = click.option("--space", required=True, help="Embedding space, e.g. l14_img (see `dcdb info`).")


@command(cli, "knn", reads_lance=True)
@pool_option
@space_option
@click.option("--seeds", "seed_file", type=click.Path(dir_okay=False, path_type=str),
              help="Seed vectors: .npy (n x d) or .parquet (a list column).")
@click.option("--seed-column", help="Column of --seeds FILE.parquet holding the vectors.")
@click.option("--subset", "seed_subset", metavar="NAME", help="Use the vectors of a stored subset as seeds.")
@click.option("--text", "texts", multiple=True, metavar="PROMPT",
              help="A text prompt, encoded by the space's model (repeatable; see `dcdb encoder`).")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False, path_type=str),
              help="An image file, encoded by the space's model (repeatable).")
@click.option("-k", "k", type=int, required=True, help="Neighbours per seed.")
@click.option("-o", "--output", type=click.Path(path_type=str), metavar="FILE",
              help="Output uid file: the union of every seed's k neighbours, as .npy (DataComp's), .parquet or "
              ".txt by its suffix; no suffix: npy.")
@click.option("--pairs", type=click.Path(path_type=str), metavar="FILE",
              help="Also write the per-seed table (seed, uid, rank, similarity, row) as Parquet.")
@click.option("--exact", is_flag=True, help="Exact search (streaming matmul) even when an ANN index exists.")
@click.option("--ann", "ann_only", is_flag=True, help="Use the ANN index even where the cost model would search "
              "exactly (error when the space has none).")
@click.option("--where", help="SQL predicate on pool columns; a PRE-filter: neighbours among the rows that pass.")
@click.option("--min-recall", type=float, help="ANN: raise nprobes/refine until the measured recall@k reaches "
              "this, else fall back to exact.")
@click.option("--recall-sample", type=click.IntRange(min=0), default=64, show_default=True,
              help="ANN: seeds re-run exactly to measure recall@k.")
@click.option("--nprobes", type=click.IntRange(min=1), help="ANN: IVF partitions probed (default per index kind).")
@click.option("--refine-factor", type=click.IntRange(min=0), help="ANN: re-rank refine_factor x k candidates exactly.")
@click.option("--save", "save_name", metavar="NAME", help="Also store the subset in the pool as NAME.")
@click.option("--force", is_flag=True, help="Replace existing outputs.")
def knn_cmd(c: Ctx, pool, space, seed_file, seed_column, seed_subset, texts, images, k, output, pairs, exact,
            ann_only, where, min_recall, recall_sample, nprobes, refine_factor, save_name, force):
    """Subset of the k nearest pool rows (cosine) of each seed: the union of their uids.

    Without --exact / --ann a cost model picks: exact when the space has no ANN index (`dcdb index`)
    or when the pool and seed count are too small for the index to pay (the log and the manifest say
    why), else ANN. An ANN result reports its recall@k, measured by re-running --recall-sample seeds
    exactly. Ties: higher similarity first, then the lower pool row. A manifest (mode, recall, seeds,
    parameters, the reason for the mode) is written beside -o as OUTPUT.json.
    """
    from dcdb.io import check_output
    from dcdb.store import open_pool
    from dcdb.vectors import knn as K
    from dcdb.vectors.scan import open_space
    from dcdb.vectors.seeds import load_seeds

    if pairs:
        check_output(pairs, force=force)
    dest = uid_destination(c, output=output, save=save_name, force=force, format_flag=False)
    p = open_pool(pool)
    dest.claim(p)
    npy = parquet = None
    if seed_file:
        if seed_file.lower().endswith(".npy"):
            npy = seed_file
        else:
            parquet = seed_file
    seeds = load_seeds(p, space, npy=npy, parquet=parquet, column=seed_column, subset=seed_subset,
                       texts=tuple(texts), images=tuple(images))
    res = K.search(p, space, seeds.vectors, k, exact=exact, where=where, min_recall=min_recall,
                   recall_sample=recall_sample, nprobes=nprobes, refine_factor=refine_factor,
                   progress=not c.quiet, ann_only=ann_only, log=c.log)
    ds, _ = open_space(p, space)
    arr = K.result_uids(ds, res)
    manifest = K.manifest(p, space, seeds, res, arr, where=where, output=output)
    dest.write(p, arr, lambda _kind, _dest, _fmt: manifest)
    if pairs:
        K.write_pairs(pairs, ds, res)
    c.log(K.summary(res, len(seeds), len(arr)))
    if res.details.get("why_exact"):
        c.log(f"exact path: {res.details['why_exact']}")


@command(cli, "index", reads_lance=True)
@pool_option
@space_option
@click.option("--kind", type=click.Choice(["ivf_sq", "ivf_rq", "ivf_flat", "ivf_pq", "ivf_hnsw_sq"]), default="ivf_sq",
              show_default=True, help="Lance index type (cosine): IVF with 8-bit scalar quantisation (sq), 1-bit "
              "RaBitQ codes (rq), full vectors (flat), product quantisation (pq), or an HNSW graph per partition.")
@click.option("--partitions", type=click.IntRange(min=1), help="IVF partitions (default: 2 sqrt(rows); "
              "rows / 50,000 for ivf_hnsw_sq).")
@click.option("--sub-vectors", type=click.IntRange(min=1), help="ivf_pq: PQ sub-vectors (default dim/16).")
@click.option("--force", is_flag=True, help="Rebuild an existing index.")
def index_cmd(c: Ctx, pool, space, kind, partitions, sub_vectors, force):
    """Build a Lance ANN index on a space's embedding table, used by `dcdb knn` and knn_ann() in SQL.

    The build is one Lance commit: a killed build leaves the table and any older index as they were.
    Below the pool size where an index can pay, `dcdb knn` keeps searching exactly unless --ann.
    """
    from dcdb.store import open_pool
    from dcdb.vectors.ann import build_index, min_index_rows

    p = open_pool(pool)
    hold_write_lock(p, "dcdb index")
    floor = min_index_rows(int(p.spaces[space]["dim"])) if space in p.spaces else 0
    if p.rows < floor:
        c.log(f"note: {p.rows:,} rows is below the ~{floor:,} rows where an ANN index pays; "
              "`dcdb knn` will search exactly unless given --ann")
    rec = build_index(p, space, kind=kind, partitions=partitions, sub_vectors=sub_vectors,
                      force=force, progress=not c.quiet)
    params = ", ".join(f"{k}={v}" for k, v in rec["params"].items())
    c.log(f"built {rec['kind']} index on {space} ({rec['rows']:,} rows, {params}) in {rec['build_seconds']:.1f}s")


@command(cli, "encoder")
@pool_option
@click.option("--space", required=True, help="Model of the space (l14, or a space name such as l14_img).")
@click.option("--checkpoint", type=click.Path(exists=True, path_type=str),
              help="open_clip checkpoint (.pt) or dcdb training run folder that made the space's embeddings.")
def encoder_cmd(c: Ctx, pool, space, checkpoint):
    """Show or set the CLIP checkpoint that encodes text prompts and images for a space's model
    (used by `dcdb knn --text/--image`, clip_text() and clip_image() in SQL, contaminated())."""
    from dcdb.store import open_pool
    from dcdb.encoders import checkpoint_for, set_checkpoint

    p = open_pool(pool)
    if checkpoint:
        hold_write_lock(p, "dcdb encoder --checkpoint")
        set_checkpoint(p, space, checkpoint)
    click.echo(str(checkpoint_for(p, space)))
