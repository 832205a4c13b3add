"""The ``dcdb`` command line's plumbing: the root group, shared options, error mapping.

The commands live beside this module, one module per family (``dcdb.cli.query``, ``.knn``, ...);
``dcdb.cli`` imports them all. No SQL or business logic here.

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

import click

from dcdb.version import __version__
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
    """The hint for an OSError ``_fault_error`` did not name (full, read-only and denied it does)."""
    import errno

    return {
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
    from dcdb.io import pool_write_lock

    folder = getattr(folder, "path", folder)
    click.get_current_context().with_resource(pool_write_lock(folder, doing, what=what, create=create))


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
    from dcdb.openmp import prefer_short_blas_spin, prefer_short_openmp_spin

    prefer_short_openmp_spin()  # before any command loads torch
    prefer_short_blas_spin()  # before any command loads numpy
    ctx.ensure_object(dict)
    ctx.obj["quiet"] = quiet


# ------------------------------------------------------------------------- shared by commands


def param_pairs(pairs) -> dict[str, str]:
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


def uid_destination(c: Ctx, *, output, save, force, fmt=None, format_flag=True):
    """The command's ``-o``/``--save``/stdout destination (dcdb.results), held until it ends."""
    from dcdb.results import UidDestination

    dest = UidDestination(output=output, save=save, force=force, fmt=fmt, format_flag=format_flag, log=c.log)
    return click.get_current_context().with_resource(dest)
