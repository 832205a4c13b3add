"""``dcdb annotate``: derived columns (language id, WordNet lookups, centroid ids) or imported ones."""

from __future__ import annotations

import click

from dcdb.cli.base import (
    Ctx,
    cli,
    command,
    hold_write_lock,
    jobs_option,
    param_option,
    param_pairs,
    pool_option,
)


@command(cli, "annotate", reads_lance=True)
@click.argument("name", required=False, metavar="[NAME]")
@pool_option
@param_option
@click.option("--from", "source", type=click.Path(dir_okay=False, path_type=str),
              help="Import the columns of a Parquet file keyed by uid instead of computing NAME.")
@click.option("--name", "--group", "group",
              help="Derived group to import into (default: the file's stem, e.g. my_lang for my_lang.parquet).")
@click.option("--columns", help="Comma-separated columns to import (default: all but uid).")
@click.option("--allow-unknown", is_flag=True, help="Skip (and count) uids of the file the pool lacks.")
@click.option("--force", is_flag=True, help="Recompute or replace an existing derived group.")
@jobs_option
@click.option("--list", "list_", is_flag=True, help="List the pool's derived groups.")
@click.option("--drop", metavar="GROUP", help="Delete a derived group.")
def annotate_cmd(c: Ctx, name, pool, params, source, group, columns, allow_unknown, force, jobs, list_, drop):
    """Compute derived column NAME once for every row of the pool, or import columns with --from.

    \b
    NAME is one of:
      lang        fastText language id (lid.176) of each caption -> column lang
      lang_cld3   CLD3 language id (DataComp's laion2b)          -> column lang_cld3
      wordnet     WordNet first-synset offsets of caption tokens -> column wn_offsets
                  [-p wordnet DICT_FOLDER, default $DCDB_WORDNET or /usr/share/wordnet]
      centroids   nearest centroid of l14_img                    -> column centroid_id
                  -p centroids FILE [-p imagenet_embeddings 'GLOB' to store the target set]

    Derived columns appear as columns of `pool` in every query. An existing group is recomputed
    only with --force. An imported column may not take the name of a metadata or embedding column,
    or of a column another group provides.
    """
    from dcdb.annotate import annotate, import_columns, list_groups
    from dcdb.errors import UsageError
    from dcdb.store import open_pool

    p = open_pool(pool)
    chosen = [x for x in (name and "NAME", source and "--from", list_ and "--list", drop and "--drop") if x]
    if len(chosen) != 1:
        raise UsageError("give exactly one of NAME, --from FILE, --list, --drop GROUP",
                         hint="e.g. dcdb annotate --pool P lang")
    if list_:
        for g in list_groups(p):
            stale = "" if g["current"] else "  (pool changed since)"
            click.echo(f"{g['group']}: {', '.join(g['columns'])}  [{g['annotator']}, {g['created']}]{stale}")
        return
    hold_write_lock(p, "dcdb annotate")
    if drop:
        from dcdb.derived import drop_group

        drop_group(p, drop)
        c.log(f"dropped derived group {drop!r}")
        return
    if source:
        if params:
            raise UsageError("-p is for computed annotators, not --from", hint="remove the -p options")
        cols = [x.strip() for x in columns.split(",") if x.strip()] if columns else None
        report = import_columns(p, source, group=group, columns=cols, force=force, allow_unknown=allow_unknown,
                                progress=not c.quiet)
    else:
        if group or columns or allow_unknown:
            raise UsageError("--name/--group, --columns and --allow-unknown go with --from", hint="remove them")
        report = annotate(p, name, param_pairs(params), force=force, jobs=jobs, progress=not c.quiet)
    c.log(report.summary())
