"""``dcdb dedup``: near-duplicate groups of an embedding space, computed once and stored."""

from __future__ import annotations

import click

from dcdb.cli.base import Ctx, cli, command, hold_write_lock, pool_option


@command(cli, "dedup", reads_lance=True)
@pool_option
@click.option("--space", default="l14_img", show_default=True, help="Embedding space to deduplicate.")
@click.option("--threshold", type=float, default=0.95, show_default=True,
              help="Cosine similarity at or above which two rows are near duplicates, in (0, 1].")
@click.option("--clusters", type=int, default=None, help="k-means clusters (default: round(sqrt(rows / 2))).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the k-means sample and start.")
@click.option("--sample", type=int, default=None, help="Rows k-means trains on (default: 40 per cluster).")
@click.option("--iters", type=int, default=20, show_default=True, help="Most k-means iterations.")
@click.option("--probes", type=int, default=1, show_default=True,
              help="Clusters each row is compared in: 1 (SemDeDup) or more, to find near duplicates that "
                   "k-means put on either side of a boundary (costs about PROBES x the pair comparisons).")
@click.option("--force", is_flag=True, help="Recompute a result that is already stored.")
@click.option("--list", "list_", is_flag=True, help="List the near-duplicate results stored in the pool.")
def dedup_cmd(c: Ctx, pool, space, threshold, clusters, seed, sample, iters, probes, force, list_):
    """Find near duplicates in an embedding space (SemDeDup-style) and store them in the pool.

    \b
    Spherical k-means on the normalised vectors, then within each cluster every pair with
    cosine >= THRESHOLD is linked; linked rows form a group (connected components) and the
    row with the smallest uid of each group is kept. Computed once; --force recomputes.
    With --probes 1, a run with the same space and k-means settings reuses the clusters of an
    earlier threshold.

    \b
    Use it from SQL:
      SELECT uid FROM pool WHERE uid NOT IN (SELECT uid FROM near_duplicates('l14_img', 0.95))
      SELECT * FROM near_duplicate_groups('l14_img', 0.95)
    Exact duplicates need no command: exact_duplicates('sha256' | 'url' | 'text').
    """
    from dcdb.store import open_pool
    from dcdb.vectors.dedup import computed, semantic_dedup

    p = open_pool(pool)
    if list_:
        for (sp, t), info in sorted(computed(p).items()):
            stale = "" if info.get("pool_manifest_sha256") == p.manifest_hash else "  (pool changed since)"
            km = info.get("kmeans", {})
            click.echo(f"{sp}\t{t:g}\t{info.get('groups', 0)} groups\t{info.get('dropped', 0)} to drop\t"
                       f"{km.get('clusters')} clusters, seed {km.get('seed')}, {km.get('probes', 1)} probe(s)\t{info['name']}{stale}")
        return
    hold_write_lock(p, "dcdb dedup")
    report = semantic_dedup(p, space, threshold, clusters=clusters, seed=seed, sample=sample, iters=iters,
                            probes=probes, force=force, progress=not c.quiet)
    c.log(report.summary())
