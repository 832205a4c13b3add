"""The ``dcdb`` command line: parse, call the library, format. No SQL or business logic here.

Data goes to stdout (or ``-o FILE``); logs, progress and summaries go to stderr; ``--quiet``
silences them. A ``DcdbError`` becomes ``error: <message>`` on stderr and a non-zero exit code.
Heavy libraries (duckdb, pyarrow, lance, torch) are imported inside the commands so that
``dcdb --help`` stays fast.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time

import click

from dcdb import __version__
from dcdb.errors import DcdbError, one_line

# ----------------------------------------------------------------------------------- plumbing


class Ctx:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def log(self, msg: str) -> None:
        if not self.quiet:
            click.echo(msg, err=True)


DEBUG_ENV = "DCDB_DEBUG"  # =1: unexpected errors show their Python traceback


def _fail(message: str, hint: str | None, code: int):
    text = f"error: {one_line(message)}" + (f"\n  hint: {one_line(hint)}" if hint else "")
    click.echo(text, err=True)
    sys.exit(code)


def _os_hint(exc: OSError) -> str:
    import errno

    return {
        errno.ENOSPC: "free some space on that disk, or write somewhere else",
        errno.EDQUOT: "your disk quota is used up: free some space, or write somewhere else",
        errno.EROFS: "that file system is read-only: write somewhere else",
        errno.EACCES: "check the permissions, or write somewhere else",
        errno.EPERM: "check the permissions, or write somewhere else",
        errno.ENOENT: "check the path",
        errno.EMFILE: "raise the open-file limit (ulimit -n) or use fewer -j workers",
    }.get(exc.errno, "check the path and the disk, then re-run (a re-run resumes or redoes cleanly)")


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DcdbError as exc:
            _fail(exc.message, exc.hint, exc.exit_code)
        except (click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            _fail("interrupted", "re-run the command: it resumes or redoes cleanly", 130)
        except Exception as exc:  # noqa: BLE001
            err = _fault_error(exc)  # faults of the machine no layer below turned into a DcdbError
            if err is not None:
                _fail(err.message, err.hint, err.exit_code)
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            if isinstance(exc, OSError):  # a file system fault: what the OS said, and where
                what = exc.strerror or type(exc).__name__
                where = f": {exc.filename!r}" if exc.filename else ""
                _fail(f"{what}{where}", _os_hint(exc), 1)
            # a bug: one line, the traceback on request
            _fail(f"internal error: {type(exc).__name__}: {exc}",
                  f"this is a bug in dcdb; re-run with {DEBUG_ENV}=1 for the traceback and report it", 70)

    return wrapper


def _fault_error(exc: Exception) -> DcdbError | None:
    """A last resort for faults of the machine rather than of dcdb: a full or read-only disk, a
    worker process killed, a damaged Lance file (Lance reports a panic)."""
    from concurrent.futures.process import BrokenProcessPool

    from dcdb.errors import DiskFullError, NotWritableError, PoolError, WorkerError
    from dcdb.io import write_fault

    kind = write_fault(exc)  # the layer below did not say which file: say what the OS said
    path = getattr(exc, "filename", None)
    where = f": {str(path)!r}" if path else ""
    if kind == "full":
        return DiskFullError(f"no space left on the device{where}",
                             hint="free space on that file system or choose another location, then re-run")
    if kind == "read-only":
        return NotWritableError(f"read-only file system{where}", hint="choose a writable location, then re-run")
    if kind == "denied":
        return DcdbError(f"permission denied{where}", hint="check that path's permissions, then re-run")
    if isinstance(exc, BrokenProcessPool):
        return WorkerError("a worker process died before finishing (killed, or out of memory)",
                           hint="re-run the same command (with fewer -j if memory is short): finished work is kept")
    text = str(exc)
    if "panicked" in text or "LanceError" in text:
        from dcdb.store import lance_failure

        return PoolError(f"reading an embedding table failed: {lance_failure(exc)}",
                         hint="a Lance file of the pool is damaged: re-ingest the pool (`dcdb ingest SRC NEW_POOL`)")
    return None


_PANIC_START = re.compile(rb"^thread '.*' (\(\d+\) )?panicked at ")


class _NativeStderrFilter:
    """Route what native code writes to file descriptor 2 through a small forked process that
    drops Rust panic reports: a damaged Lance file makes Lance panic in a background thread, and
    its report (with a backtrace under RUST_BACKTRACE) would reach the terminal besides dcdb's
    one-line error. Everything else is passed on; Python's ``sys.stderr`` (progress bars, dcdb's
    messages) keeps writing to the terminal directly. A separate process, not a thread, so that
    what a crashing dcdb writes last still gets through."""

    def __init__(self):
        self.pid = None

    def start(self) -> None:
        try:
            if not hasattr(os, "fork") or sys.stderr is None or sys.stderr.fileno() != 2:
                return  # not a real process stderr (e.g. a test runner's capture)
            sys.stderr.flush()
            real = os.dup(2)
            read, write = os.pipe()
            done, finished = os.pipe()  # EOF on ``done`` once the filter process has exited
            pid = os.fork()
        except (OSError, ValueError, AttributeError):
            return
        if pid == 0:  # the filter process: read the pipe until every writer is gone
            try:
                import signal

                signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: still pass on the last words
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1):  # hold no pipe of the pipeline dcdb's stdout is part of
                    os.dup2(null, fd)
                os.close(write)  # else the pipe never ends
                os.close(done)
                _pump_stderr(read, real)
            finally:
                os._exit(0)
        os.close(read)
        os.close(finished)
        self.saved, self.real, self.pid, self.done = sys.stderr, real, pid, done
        sys.stderr = open(os.dup(real), "w", buffering=1, encoding=self.saved.encoding,  # noqa: SIM115
                          errors=self.saved.errors)  # line-buffered like Python's own stderr
        os.dup2(write, 2)
        os.close(write)

    def stop(self) -> None:
        if self.pid is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.real, 2)  # closes this process's write end of the pipe
        os.close(self.real)
        ours, sys.stderr = sys.stderr, self.saved
        ours.close()
        # The filter exits once every writer is gone, normally at once; multiprocessing's resource
        # tracker (which holds the pipe too) only exits after this process does: wait briefly.
        import select

        if select.select([self.done], [], [], 0.05)[0]:
            os.waitpid(self.pid, 0)
        os.close(self.done)
        self.pid = None


def _pump_stderr(read: int, real: int) -> None:
    buf, dropping, traced, blank = b"", False, False, False

    def emit(data: bytes) -> None:
        try:
            os.write(real, data)
        except OSError:
            pass

    while True:
        try:
            chunk = os.read(read, 65536)
        except InterruptedError:
            continue
        except OSError:
            chunk = b""
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        out = []
        for line in lines:
            if _PANIC_START.match(line):
                dropping, traced, blank = True, False, False  # Rust opens the report with a blank line
            elif not dropping:
                if blank:
                    out.append(b"\n")
                blank = not line
                if line:
                    out.append(line + b"\n")
            elif line.startswith(b"note: "):
                dropping = False  # a panic report ends with a note ...
            elif line.startswith(b"stack backtrace:"):
                traced = True
            elif traced and line and not line[:1].isspace():
                dropping = False  # ... or, under RUST_BACKTRACE=full, with the last frame
                out.append(line + b"\n")
        if out:
            emit(b"".join(out))
    if not dropping:
        emit(b"\n" * blank + buf)


def hold_write_lock(folder, doing: str, *, what: str = "pool", create: bool = False) -> None:
    """Hold the write lock of a pool (or output folder) until the command ends: a second dcdb
    process writing it fails at once with one line. ``doing`` names the write for the hint when
    the folder is read-only."""
    from dcdb.errors import NotWritableError
    from dcdb.io import write_lock

    folder = getattr(folder, "path", folder)
    try:
        click.get_current_context().with_resource(write_lock(folder, what, create=create))
    except NotWritableError as exc:
        instead = "; or write the subset to a file with -o FILE instead" if doing == "--save" else ""
        raise NotWritableError(exc.message, hint=f"{doing} writes into the {what}: make it writable or work on "
                                                 f"a writable copy of it{instead}") from None


def pool_option(fn):
    """``--pool PATH`` (default: $DCDB_POOL) on every command that reads a pool."""
    return click.option(
        "--pool",
        "pool",
        type=click.Path(file_okay=False, path_type=str),
        default=None,
        envvar="DCDB_POOL",
        show_envvar=True,
        help="Pool folder written by `dcdb ingest`.",
    )(fn)


jobs_option = click.option(
    "-j", "--jobs", type=click.IntRange(min=1), default=None, help="Worker processes (default: all cores)."
)


def _pass_ctx(fn):
    @functools.wraps(fn)
    def wrapper(*args, _quiet=False, **kwargs):
        ctx = click.get_current_context()
        root = ctx.find_root()
        quiet = _quiet or bool((root.obj or {}).get("quiet"))
        return fn(Ctx(quiet), *args, **kwargs)

    return wrapper


_quiet_option = click.option("-q", "--quiet", "_quiet", is_flag=True,
                             help="No progress bars or summaries on stderr (same as `dcdb -q`).")


def command(group, name=None, *, reads_lance: bool = False, **kw):
    """Register a command on ``group`` with error mapping, ``-q/--quiet`` (also accepted after the
    command name) and a Ctx first argument. A command that ``reads_lance`` runs with Lance's panic
    reports kept off the terminal."""

    def deco(fn):
        run = _handle_errors(fn)
        if reads_lance:
            run = _native_stderr_filtered(run)
        return group.command(name, **kw)(_quiet_option(_pass_ctx(run)))

    return deco


def _native_stderr_filtered(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        filt = _NativeStderrFilter()
        filt.start()
        try:
            return fn(*args, **kwargs)
        finally:
            filt.stop()

    return wrapper




class DcdbGroup(click.Group):
    """The root group: click's own usage errors (unknown option, missing argument, bad value) are
    printed like dcdb's, as one ``error:`` line and a hint, with exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            path = exc.ctx.command_path if exc.ctx is not None else (prog_name or "dcdb")
            click.echo(f"error: {exc.format_message()}\n  hint: see `{path} --help`", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        except BrokenPipeError:  # `dcdb query ... | head`: stop quietly, as click does
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group("dcdb", cls=DcdbGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dcdb")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or summaries on stderr.")
@click.pass_context
def cli(ctx: click.Context, quiet: bool) -> None:
    """dcdb: query DataComp pools with SQL, build subsets, reshard, train and evaluate.

    \b
    Quick start:
      dcdb synth pool /tmp/src --rows 20000 --shards 4
      dcdb ingest /tmp/src /tmp/pool
      dcdb sql "SELECT count(*) FROM pool" --pool /tmp/pool
      dcdb query filter.sql --pool /tmp/pool -o subset.npy
    """
    from dcdb.openmp import prefer_short_openmp_spin

    prefer_short_openmp_spin()  # before any command loads torch
    ctx.ensure_object(dict)
    ctx.obj["quiet"] = quiet


def main(argv=None) -> None:
    cli.main(args=argv, prog_name="dcdb")


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
@click.option("--force", is_flag=True, help="Write into OUT even if it is not empty.")
def synth_pool_cmd(c: Ctx, out, rows, shards, seed, dtype, no_embeddings, force):
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
    )
    c.log(f"wrote {info['rows']:,} rows in {info['shards']} shards to {out} ({time.perf_counter() - t0:.1f}s)")


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


# -------------------------------------------------------------------------------- sql/query


def _param_pairs(pairs) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in pairs:
        if name in out:
            from dcdb.errors import ParameterError

            raise ParameterError(f"parameter {name!r} given twice", hint="pass each -p NAME VALUE once")
        out[name] = value
    return out


param_option = click.option(
    "-p",
    "--param",
    "params",
    type=(str, str),
    multiple=True,
    metavar="NAME VALUE",
    help="Bind $NAME in the SQL to VALUE (repeatable).",
)


def replaces_unfinished(c: Ctx, output: str) -> bool:
    """An OUTPUT without its OUTPUT.json: a killed run's, redone without --force (see README)."""
    from dcdb.io import unfinished_output
    from dcdb.query import manifest_path

    if unfinished_output(output, manifest_path(output)):
        c.log(f"{output} has no manifest ({manifest_path(output).name}): an unfinished earlier run; replacing it")
        return True
    return False


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
    from dcdb.engine import check_subset_name
    from dcdb.io import check_output
    from dcdb.query import check_save, manifest_path, output_format, run_filter, save_subset, write_output
    from dcdb.store import open_pool

    given = _param_pairs(params)
    if fmt and fmt != "txt" and not output:
        from dcdb.errors import UsageError

        raise UsageError(f"--format {fmt} needs -o FILE",
                         hint=f"give -o FILE.{fmt}, or leave --format out to print hex uids")
    fmt = output_format(output, fmt) if output else None
    if output:
        check_output(output, force=force or replaces_unfinished(c, output))
        check_output(manifest_path(output), force=True, what="manifest")
    if save_name:
        check_subset_name(save_name)
    p = open_pool(pool)
    if save_name:
        hold_write_lock(p, "--save")
    if reshard_out:
        from dcdb.shards.reshard import preflight

        preflight(reshard_out, pool=p, overwrite=force)
    if save_name:
        check_save(p, save_name, force=force)
    filt = _read_filter(filter_ref)
    if engine == "local":
        res = run_filter(p, filt, given)
    else:
        from dcdb.dist.execute import WORK_SUFFIX, run_distributed

        work_dir = work_dir or (f"{output}{WORK_SUFFIX}" if output else None)
        res = run_distributed(p, filt, given, engine=engine, work_dir=work_dir, progress=not c.quiet, log=c.log)
    if output:
        write_output(output, res.uids, fmt, res.manifest(output=output, fmt=fmt))
    if save_name:
        save_subset(p, save_name, res, force=force)
    if reshard_out:
        from dcdb.shards.reshard import reshard

        rep = reshard(res.uids, reshard_out, pool=p, jobs=os.cpu_count() or 1, overwrite=force,
                      progress=not c.quiet, subset_label=f"dcdb query {filt.name}", engine=engine)
        c.log(rep.summary())
    to_stdout = not output and not save_name
    if to_stdout:
        from dcdb import uids as U

        out = sys.stdout
        for i in range(0, len(res.uids), 1 << 16):
            out.write("".join(u + "\n" for u in U.to_hex(res.uids[i : i + (1 << 16)])))
    rate = p.rows / res.seconds if res.seconds > 0 else float("inf")
    where = ", ".join(x for x in (output, save_name and f"subset {save_name}",
                                  reshard_out and f"shards in {reshard_out}", to_stdout and "stdout") if x)
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
    text = run_sql(pool, sql_text, _param_pairs(params), fmt=fmt, output=output, max_rows=max_rows)
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
        from dcdb.io import check_output
        from dcdb.query import check_save, manifest_path, output_format, write_output
        from dcdb.store import open_pool
        from dcdb.subsets import combination_manifest, combine, save_combination

        if not output and not save_name:
            raise UsageError(f"subsets {op}: give -o FILE or --save NAME", hint=f"e.g. dcdb subsets {op} A B -o out.npy")
        fmt = output_format(output, None, format_flag=False) if output else None
        if output:
            check_output(output, force=force or replaces_unfinished(c, output))
            check_output(manifest_path(output), force=True, what="manifest")
        needs_pool = bool(save_name) or any(not os.path.isfile(r) for r in operands)
        p = open_pool(pool) if needs_pool else None
        if save_name:
            hold_write_lock(p, "--save")
            check_save(p, save_name, force=force)
        arr, names = combine(op, list(operands), p)
        if output:
            write_output(output, arr, fmt, combination_manifest(op, list(operands), arr, p, output))
        if save_name:
            save_combination(p, save_name, arr, combination_manifest(op, list(operands), arr, p, save_name), force=force)
        c.log(f"{op} of {', '.join(names)}: {len(arr):,} uids")

    return _cmd


_combine_command("union", "Uids in any operand (each with its largest count).")
_combine_command("intersect", "Uids in every operand (each with its smallest count).")
_combine_command("minus", "Uids of A that are not in B (all copies dropped).")


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
    from dcdb.io import check_folder

    check_folder(folder, what="demo folder")
    click.echo(run_demo(folder, samples=samples, seeds=seeds, samples_seen=samples_seen, force=force,
                        progress=not c.quiet, log=c.log))


# Commands defined in their own modules register themselves on `cli` when imported.
from dcdb import (
    cli_annotate,  # noqa: E402,F401  (dcdb annotate)
    cli_dedup,  # noqa: E402,F401  (dcdb dedup)
    cli_knn,  # noqa: E402,F401  (dcdb knn, dcdb index, dcdb encoder)
    cli_reshard,  # noqa: E402,F401  (dcdb reshard, dcdb index-shards)
    cli_train,  # noqa: E402,F401  (dcdb train, dcdb eval, dcdb leaderboard)
    cli_world,  # noqa: E402,F401  (dcdb world)
)
