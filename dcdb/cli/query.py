"""``dcdb query``, ``dcdb sql``, ``dcdb filters`` and ``dcdb subsets``."""

from __future__ import annotations

import os
import sys

import click

from dcdb.cli.base import (
    Ctx,
    cli,
    command,
    param_option,
    param_pairs,
    pool_option,
    uid_destination,
)


def _read_filter(ref: str):
    from dcdb.query import load_filter

    if ref == "-":
        return load_filter("stdin", text=sys.stdin.read())
    return load_filter(ref)


@command(cli, "query", reads_lance=True)
@click.argument("filter_ref", metavar="FILE|NAME|-")
@pool_option
@param_option
@click.option("-o", "--output", type=click.Path(path_type=str), metavar="FILE",
              help="Output uid file: .npy (DataComp's), .parquet or .txt (hex, one per line); no suffix: npy.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["npy", "parquet", "txt"]),
    help="Output format (default: from the -o suffix; a suffix that contradicts it is refused). "
    "Without -o only txt (hex uids on stdout).",
)
@click.option("--save", "save_name", metavar="NAME", help="Also store the subset in the pool as NAME.")
@click.option(
    "--reshard",
    "reshard_out",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="Also write the selected samples as webdataset shards in this folder (needs the pool's shard index).",
)
@click.option("--force", is_flag=True, help="Replace an existing output file or stored subset.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: one DuckDB on this machine; ray: one task per uid-bucket group on a Ray cluster "
              "(bucketed pools; RAY_ADDRESS or a local cluster). Same output.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=str), default=None,
              help="--engine ray: folder for intermediates and completion markers, on storage every node "
              "sees (default: OUTPUT.dcdb-work); a re-run reuses finished buckets.")
def query_cmd(c: Ctx, filter_ref, pool, params, output, fmt, save_name, reshard_out, force, engine, work_dir):
    """Run a filter and write its uid list (DataComp .npy: sorted u8,u8 pairs).

    FILE is a .sql file, NAME a filter shipped in sql/ (see `dcdb filters`), - reads stdin.
    A manifest (SQL, its sha256, parameters, pool hash, row count) is written beside the output
    as OUTPUT.json. Without -o and --save the uids are printed to stdout as hex, one per line
    (with --reshard too: the shards' sample_ids.npy holds them as well).
    """
    from dcdb.query import run_filter
    from dcdb.store import open_pool

    given = param_pairs(params)
    if fmt and fmt != "txt" and not output:
        from dcdb.errors import UsageError

        raise UsageError(f"--format {fmt} needs -o FILE",
                         hint=f"give -o FILE.{fmt}, or leave --format out to print hex uids")
    dest = uid_destination(c, output=output, save=save_name, force=force, fmt=fmt)
    p = open_pool(pool)
    dest.claim(p)
    if reshard_out:
        from dcdb.shards.reshard import preflight

        preflight(reshard_out, pool=p, overwrite=force)
    filt = _read_filter(filter_ref)
    if engine == "local":
        res = run_filter(p, filt, given)
    else:
        from dcdb.dist.execute import WORK_SUFFIX, run_distributed

        work_dir = work_dir or (f"{output}{WORK_SUFFIX}" if output else None)
        res = run_distributed(p, filt, given, engine=engine, work_dir=work_dir, progress=not c.quiet, log=c.log)
    where = dest.write(p, res.uids, lambda _kind, path, fmt: res.manifest(output=path, fmt=fmt), stdout=False)
    if reshard_out:
        from dcdb.shards.reshard import reshard

        rep = reshard(res.uids, reshard_out, pool=p, jobs=os.cpu_count() or 1, overwrite=force,
                      progress=not c.quiet, subset_label=f"dcdb query {filt.name}", engine=engine)
        c.log(rep.summary())
        where.append(f"shards in {reshard_out}")
    if dest.to_stdout:  # after the shards: the uids come last, as a pipe's reader expects them
        from dcdb.results import print_uids

        print_uids(res.uids)
        where.append("stdout")
    rate = p.rows / res.seconds if res.seconds > 0 else float("inf")
    where = ", ".join(where)
    c.log(
        f"{filt.name}: {res.rows:,} uids ({res.rows / max(p.rows, 1):.2%} of {p.rows:,} rows) "
        f"in {res.seconds:.2f}s ({rate:,.0f} rows/s) -> {where}"
    )


@command(cli, "sql", reads_lance=True)
@click.argument("sql_text", metavar="SQL")
@pool_option
@param_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json", "parquet"]),
    default=None,
    help="table (as printed), csv, json (one object per line) or parquet (needs -o). "
    "Default: from the -o suffix, else table.",
)
@click.option("-o", "--output", type=click.Path(path_type=str), metavar="FILE",
              help="Write to a file: .csv, .json/.jsonl/.ndjson, .parquet, or .txt (the table as printed, "
              "--max-rows rows); the suffix must agree with --format.")
@click.option("--max-rows", type=int, default=40, show_default=True, help="Rows shown by --format table.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def sql_cmd(c: Ctx, sql_text, pool, params, fmt, output, max_rows, force):
    """Run one ad hoc read-only SQL statement on the pool and print the result.

    The pool is the view `pool` (metadata + embedding columns); `pool_metadata` has the metadata
    alone; stored subsets are views named after them. Use - to read the SQL from stdin.
    """
    from dcdb.adhoc import run_sql, sql_format
    from dcdb.io import check_output

    fmt = sql_format(output, fmt)
    if output:
        check_output(output, force=force)
    if sql_text == "-":
        sql_text = sys.stdin.read()
    text = run_sql(pool, sql_text, param_pairs(params), fmt=fmt, output=output, max_rows=max_rows)
    if text:  # csv and json text ends with a newline already: no blank line after it
        click.echo(text, nl=not text.endswith("\n"))


@command(cli, "filters")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable listing.")
def filters_cmd(c: Ctx, as_json):
    """List the filters shipped in sql/: what each keeps, its parameters and assets."""
    import json

    from dcdb.query import builtin_filters, load_filter

    rows = []
    for name in builtin_filters():
        f = load_filter(name)
        rows.append(
            {
                "name": name,
                "description": f.description,
                "params": {
                    p.name: {"type": p.type, "default": p.default if p.has_default else None,
                             "required": not p.has_default, "doc": p.doc}
                    for p in f.params.values()
                },
                "assets": [{"name": a, "doc": d} for a, d in f.assets],
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['name']}")
        for line in r["description"].splitlines():
            click.echo(f"    {line}")
        for pname, p in r["params"].items():
            dflt = "required" if p["required"] else f"default {p['default']}"
            click.echo(f"    -p {pname} {p['type'].upper()}  ({dflt})  {p['doc']}")
        for a in r["assets"]:
            click.echo(f"    asset {a['name']}: {a['doc']}")


# ---------------------------------------------------------------------------------- subsets


@cli.group()
def subsets() -> None:
    """List, show and combine stored subsets (union, intersect, minus)."""


@command(subsets, "list")
@pool_option
def subsets_list_cmd(c: Ctx, pool):
    """Stored subsets of the pool with row counts and the filter that made them."""
    from dcdb.store import open_pool
    from dcdb.subsets import list_subsets

    rows = list_subsets(open_pool(pool))
    if not rows:
        c.log("no stored subsets (store one with `dcdb query FILTER --save NAME`)")
    for r in rows:
        params = " ".join(f"{k}={v}" for k, v in (r["params"] or {}).items())
        stale = "  (pool changed since)" if r["stale"] else ""
        click.echo(f"{r['name']}\t{r['rows']}\t{r['filter'] or ''}\t{params}{stale}")


@command(subsets, "show")
@click.argument("name")
@pool_option
def subsets_show_cmd(c: Ctx, name, pool):
    """Print a stored subset's manifest (JSON)."""
    import json

    from dcdb.engine import check_subset_name
    from dcdb.store import open_pool
    from dcdb.subsets import read_manifest

    check_subset_name(name)
    click.echo(json.dumps(read_manifest(open_pool(pool), name), indent=2))


def _combine_command(op: str, doc: str):
    @command(subsets, op, help=doc)
    @click.argument("operands", nargs=-1, required=True, metavar="A B [C...]")
    @pool_option
    @click.option("-o", "--output", type=click.Path(path_type=str), metavar="FILE",
                  help="Output uid file: .npy (DataComp's), .parquet or .txt by its suffix; no suffix: npy.")
    @click.option("--save", "save_name", metavar="NAME", help="Store the result in the pool as NAME.")
    @click.option("--force", is_flag=True, help="Replace an existing output or stored subset.")
    def _cmd(c: Ctx, operands, pool, output, save_name, force):
        from dcdb.errors import UsageError
        from dcdb.store import open_pool
        from dcdb.subsets import combination_manifest, combine

        if not output and not save_name:
            raise UsageError(f"subsets {op}: give -o FILE or --save NAME", hint=f"e.g. dcdb subsets {op} A B -o out.npy")
        dest = uid_destination(c, output=output, save=save_name, force=force, format_flag=False)
        needs_pool = bool(save_name) or any(not os.path.isfile(r) for r in operands)
        p = open_pool(pool) if needs_pool else None
        dest.claim(p)
        arr, names = combine(op, list(operands), p)
        dest.write(p, arr, lambda kind, _path, _fmt: combination_manifest(
            op, list(operands), arr, p, output if kind == "output" else save_name))
        c.log(f"{op} of {', '.join(names)}: {len(arr):,} uids")

    return _cmd


_combine_command("union", "Uids in any operand (each with its largest count).")
_combine_command("intersect", "Uids in every operand (each with its smallest count).")
_combine_command("minus", "Uids of A that are not in B (all copies dropped).")
