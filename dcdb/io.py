"""Small file helpers: atomic writes, output-path checks, write locks and write errors.

Every file dcdb produces is written under a temporary name in the same folder and renamed into
place when complete, so a killed run never leaves a half file that looks whole.

Outputs are only ever regular files. A path that exists and is anything else (a directory, a
character or block device such as ``/dev/null``, a FIFO, a socket) is refused, whatever ``--force``
says: renaming onto it would replace the device itself (root may do that). A symlink is written
through (its target is replaced, the link kept) only when it points to a regular file.

Output *folders* (a world, a synth pool, reshard's OUT, a demo, run or results folder) are checked
and prepared by one function, :func:`prepare_folder`: a folder or nothing, a non-empty one only with
the command's --force/--overwrite, cleared of what the caller names, created with its parents.

The temp names carry the writer's pid: the next run writing the same output removes those whose process is gone
(:func:`sweep_temps`). A command that writes into a pool or a reshard output folder holds
:func:`write_lock` on it. :func:`writing` turns "disk full" and "read-only" into one clear error.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import stat
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dcdb.errors import BusyError, DcdbError, DiskFullError, NotWritableError, OutputError

TMP_MARK = ".dcdb-tmp-"
LOCK_NAME = ".dcdb-lock"
KILL_ENV = "DCDB_TEST_KILL_AT"  # test hook: SIGKILL this process at the named kill_point


def tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file"


_ONLY_FILES = "dcdb writes only regular files (--force does not change that): give another path"


def write_target(path: str | os.PathLike, *, what: str = "output") -> Path:
    """The file that writing ``path`` replaces: ``path`` itself (missing or a regular file), or the
    regular file a symlink at ``path`` leads to. Raises OutputError when ``path`` exists and is not
    a regular file (directory, device, FIFO, socket), or is a symlink that dangles, loops or leads
    to anything but a regular file."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except OSError:
        return path  # missing (or its folder is): check_output / the write itself says so
    if stat.S_ISREG(st.st_mode):
        return path
    if not stat.S_ISLNK(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{what} {str(path)!r} is a directory", hint="give a file name")
        raise OutputError(f"{what} {str(path)!r} is {_kind(st.st_mode)}, not a regular file", hint=_ONLY_FILES)
    target = Path(os.path.realpath(path))
    try:
        tst = os.stat(path)
    except FileNotFoundError:
        raise OutputError(
            f"{what} {str(path)!r} is a symlink to {str(target)!r}, which does not exist",
            hint="give the path of a regular file, or remove the link",
        ) from None
    except OSError as exc:
        raise OutputError(
            f"{what} {str(path)!r} is a symlink that cannot be followed ({exc.strerror})",
            hint="give the path of a regular file, or remove the link",
        ) from None
    if not stat.S_ISREG(tst.st_mode):
        raise OutputError(
            f"{what} {str(path)!r} is a symlink to {str(target)!r}, which is {_kind(tst.st_mode)}",
            hint=_ONLY_FILES,
        )
    return target
def kill_point(name: str) -> None:
    """Test hook: die by SIGKILL here when ``$DCDB_TEST_KILL_AT`` is ``name`` (the tests use it
    to kill a real run at an exact point: between two files, inside a worker)."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------ temps of killed runs


def _start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch, to the second), from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def owner_alive(pid: int, since: float) -> bool:
    """Whether the process ``pid`` that wrote a temp file last modified at ``since`` still runs
    (a pid reused by a process started after ``since`` does not count)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        pass
    started = _start_time(pid)
    return started is None or started <= since + 2  # /proc's boot time has 1 s resolution


_TMP_PID = re.compile(r"(\d+)-[0-9a-f]{8}$")


def remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_temps(path: str | os.PathLike) -> int:
    """Remove the temp files (``atomic_path`` names) that killed runs left for ``path``: only
    those whose writing process is gone, never a live concurrent run's. Returns how many."""
    path = Path(path)
    removed = 0
    try:
        names = os.listdir(path.parent if str(path.parent) else ".")
    except OSError:
        return 0
    prefix = path.name + TMP_MARK
    for name in names:
        m = _TMP_PID.match(name[len(prefix):]) if name.startswith(prefix) else None
        if m is None:
            continue
        p = path.with_name(name)
        try:
            mtime = p.lstat().st_mtime
        except OSError:
            continue
        if not owner_alive(int(m.group(1)), mtime):
            remove_tree(p)
            removed += 1
    return removed


def sweep_pid_dirs(folder: Path, pattern: str) -> int:
    """Remove entries of ``folder`` matching the glob ``pattern`` whose name ends in ``-<pid>``
    of a process that is gone (``derived/.<group>.tmp-PID`` of a killed ``annotate``)."""
    removed = 0
    for p in folder.glob(pattern):
        m = re.search(r"-(\d+)$", p.name)
        try:
            mtime = p.lstat().st_mtime
        except OSError:
            continue
        if m and not owner_alive(int(m.group(1)), mtime):
            remove_tree(p)
            removed += 1
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.
    ``fsync=False`` skips flushing the file to disk first: a killed process still leaves no half
    file, but after a machine crash the file may come back empty or short.

    Only a missing path or a regular file is replaced (see ``write_target``): a symlink to a regular
    file is written through (the temp file goes beside the target, the target is replaced, the link
    kept). The rule is checked again just before the rename, so a path that became a device, a FIFO
    or a folder meanwhile is not replaced either."""
    path = Path(path)
    target = write_target(path)
    tmp = tmp_name(target)
    try:
        yield tmp
        if fsync and tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        kill_point(f"rename:{path.name}")
        now = write_target(path)
        if now != target:
            raise OutputError(f"output {str(path)!r} changed while it was written (it now leads to {str(now)!r})",
                              hint="check what else writes there, then run again")
        os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def json_text(obj: Any) -> str:
    """The text of a JSON file dcdb writes (manifests, journals, records): indented, keys in order."""
    return json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json_text(obj))
    return path


def unfinished_output(path: str | os.PathLike, manifest: str | os.PathLike) -> bool:
    """Whether ``path`` is an output a killed run left without its manifest (written last): a
    regular file holding a uid list (a ``u8,u8`` .npy, a Parquet of one ``uid`` column, or hex
    uids as text) beside which ``manifest`` is missing. Such an output is redone without
    ``--force``; any other file is not ours to replace."""
    path, manifest = Path(path), Path(manifest)
    if not path.is_file() or manifest.exists():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(33)
            if head.startswith(b"\x93NUMPY"):
                import numpy as np

                f.seek(0)
                major, _minor = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                return read(f)[2] == np.dtype("u8,u8")
        if head.startswith(b"PAR1"):
            import pyarrow.parquet as pq

            return pq.read_schema(path).names == ["uid"]
    except (OSError, ValueError, SyntaxError, TypeError):  # unreadable: not a uid list (pyarrow: OSError)
        return False
    return head == b"" or re.fullmatch(rb"[0-9a-f]{32}\n", head) is not None


def check_output(path: str | os.PathLike, *, force: bool, what: str = "output") -> Path:
    """Validate an output path before any work: a regular file or missing (a symlink only to a
    regular file), its folder writable, and no clobbering without ``force``."""
    path = Path(path)
    target = write_target(path, what=what)
    if os.path.lexists(target) and not force:
        raise OutputError(
            f"{what} {str(path)!r} already exists", hint="pass --force to replace it"
        )
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(
            f"cannot write {what} {str(path)!r}: folder {str(parent)!r} does not exist",
            hint="create it first",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write {what} {str(path)!r}: folder {str(parent)!r} is not writable",
            hint="choose another output path",
        )
    return path


def _ours(name: str) -> bool:
    """dcdb's own bookkeeping in a folder (its write lock, temp files of a live or killed run)."""
    return name == LOCK_NAME or TMP_MARK in name


def prepare_folder(
    path: str | os.PathLike,
    *,
    force: bool = False,
    what: str = "output folder",
    hint: str = "give a folder path",
    not_empty: str | None = None,
    clear: Callable[[Path], bool] | None = None,
    create: bool = True,
    subfolders: Iterable[str] = (),
) -> Path:
    """The one check (and preparation) of a folder a command writes into; returns ``Path(path)``.

    - ``path`` is missing, a folder, or a symlink to one. Anything else (a file, a device, a FIFO,
      a socket, a dangling or looping symlink, a file on the way) is refused with ``hint``,
      whatever ``force`` says, and left as it is.
    - ``not_empty`` is the hint for a folder that holds anything (dcdb's lock and temp files aside):
      without ``force`` such a folder is refused (name the flag: "pass --force to replace it").
      None: the contents are the caller's business (an output that resumes).
    - With ``force``, the entries for which ``clear(entry)`` is true are removed; the rest is kept.
    - ``create``: make the folder (parents and ``subfolders`` too) and check that a file can be
      written into it. ``create=False`` checks before any work and changes nothing: a missing
      folder's nearest existing parent must be a writable folder.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise OutputError(
                f"{what} {str(path)!r} is a symlink to {os.path.realpath(path)!r}, which does not exist",
                hint="create that folder, or give another path",
            ) from None
        st = None
    except OSError as exc:  # a file on the way (ENOTDIR), a symlink loop, ...
        raise OutputError(f"cannot create {what} {str(path)!r} ({exc.strerror})", hint=hint) from None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        kind = "a file" if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)
        raise OutputError(f"{what} {str(path)!r} is {kind}, not a folder", hint=hint)
    entries: list[Path] = []
    if st is not None and (not_empty is not None or (force and clear is not None)):
        try:
            entries = sorted(p for p in path.iterdir() if not _ours(p.name))
        except OSError as exc:
            raise OutputError(f"cannot read {what} {str(path)!r} ({exc.strerror})", hint=hint) from None
    if entries and not_empty is not None and not force:
        raise OutputError(f"{what} {str(path)!r} is not empty", hint=not_empty)
    if not create:
        if st is None:
            parent = next((p for p in path.absolute().parents if p.exists()), None)
            if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(
                    f"cannot create {what} {str(path)!r}: {str(parent)!r} is not a writable folder",
                    hint=f"choose another {what}",
                )
        return path
    if force and clear is not None:
        for p in entries:
            if clear(p):
                try:
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
                except OSError as exc:
                    raise OutputError(f"cannot remove {str(p)!r} from {what} {str(path)!r}: {exc}",
                                      hint=f"remove it yourself, or choose another {what}") from exc
    try:
        path.mkdir(parents=True, exist_ok=True)
        for sub in subfolders:
            (path / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {what} {str(path)!r}: {exc}",
                          hint=f"make it writable, or choose another {what}") from exc
    probe = tmp_name(path / ".dcdb-probe")
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write into {what} {str(path)!r}: {exc}",
                          hint=f"make it writable, or choose another {what}") from exc
    return path


def dir_size(path: str | os.PathLike) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


# -------------------------------------------------------------------------------- write errors


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS}
_DENIED = {errno.EACCES, errno.EPERM}
_FULL_TEXT = re.compile(
    r"No space left on device|os error 28\b|Disk quota exceeded|os error 122\b|File too large"
    r"|\d+ requested and \d+ written"  # numpy's tofile on a short write
)
_READ_ONLY_TEXT = re.compile(r"Read-only file system|os error 30\b")
_DENIED_TEXT = re.compile(r"Permission denied|os error 13\b|Operation not permitted|os error 1\b")


def write_fault(exc: BaseException) -> str | None:
    """"full", "read-only", "denied" or None: what kind of write failure ``exc`` is. Also knows
    the texts pyarrow, Lance and numpy put in the errors they raise without an errno."""
    if isinstance(exc, DcdbError) or not isinstance(exc, Exception):
        return None
    code = getattr(exc, "errno", None)
    if code in _FULL:
        return "full"
    if code in _READ_ONLY:
        return "read-only"
    if code in _DENIED:
        return "denied"
    text = str(exc)
    if _FULL_TEXT.search(text):
        return "full"
    if _READ_ONLY_TEXT.search(text):
        return "read-only"
    if isinstance(exc, OSError) and _DENIED_TEXT.search(text):
        return "denied"
    return None


def write_error(exc: BaseException, path: str | os.PathLike | None, what: str = "output",
                redo: str | None = None) -> DcdbError | None:
    """The dcdb error for a failed write of ``what`` at ``path`` (None if ``exc`` is not a
    disk-full / read-only / permission failure). ``redo`` says how to finish afterwards."""
    kind = write_fault(exc)
    if kind is None:
        return None
    if kind == "denied" and not _inside(getattr(exc, "filename", None), path):
        return None  # reading can be denied too: only a file of ``path`` makes it a write error
    where = f" {str(path)!r}" if path is not None else ""
    then = f"; {redo}" if redo else ""
    if kind == "full":
        return DiskFullError(
            f"no space left on the device while writing {what}{where}",
            hint=f"free space on that file system or choose another location{then}",
        )
    why = "the file system is read-only" if kind == "read-only" else "permission denied"
    return NotWritableError(
        f"cannot write {what}{where}: {why}",
        hint=f"make it writable or choose another location{then}",
    )


def _inside(name, folder) -> bool:
    if name is None or folder is None:
        return False
    name, folder = os.path.abspath(os.fsdecode(name)), os.path.abspath(folder)
    return name == folder or name.startswith(folder.rstrip(os.sep) + os.sep)


@contextmanager
def writing(path: str | os.PathLike | None, what: str = "output", redo: str | None = None) -> Iterator[None]:
    """Turn a disk-full / read-only / permission failure inside the block into one DcdbError
    naming ``what`` and ``path``; other errors pass unchanged."""
    try:
        yield
    except Exception as exc:
        err = write_error(exc, path, what, redo)
        if err is None:
            raise
        raise err from exc


# ---------------------------------------------------------------------------------- write lock


_HELD: dict[str, list] = {}  # folder -> [fd, depth]: the locks this process holds


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f" (pid {text})" if text.isdigit() else ""


def _acquire(folder: Path, what: str) -> int | None:
    import fcntl

    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            err = write_error(exc, folder, what)
            if err is None:
                raise
            raise err from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise BusyError(
                f"{what} {str(folder)!r} is being written by another dcdb process{holder}",
                hint="wait for it to finish and re-run, or stop it (its lock is released when it exits)",
            ) from None
        except OSError:  # a file system without flock (some network mounts): go on unlocked
            os.close(fd)
            return None
        try:  # the holder before us may have removed the file: lock the one at the path
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:  # a full disk: the lock holds without the pid in it
        pass
    return fd


@contextmanager
def pool_write_lock(folder: str | os.PathLike, doing: str, *, what: str = "pool", create: bool = False) -> Iterator[None]:
    """:func:`write_lock` for a command that writes into ``folder``: a read-only folder's error
    says which write (``doing``: "--save", "dcdb annotate", ...) and what to do instead."""
    from dcdb.errors import NotWritableError

    try:
        lock = write_lock(folder, what, create=create)
        lock.__enter__()
    except NotWritableError as exc:
        instead = "; or write the subset to a file with -o FILE instead" if doing == "--save" else ""
        raise NotWritableError(exc.message, hint=f"{doing} writes into the {what}: make it writable or work on "
                                                 f"a writable copy of it{instead}") from None
    try:
        yield
    finally:
        lock.__exit__(*sys.exc_info())


@contextmanager
def write_lock(folder: str | os.PathLike, what: str = "pool", *, create: bool = False) -> Iterator[None]:
    """Hold the write lock of ``folder`` (a pool, a reshard output folder) for the block: an
    ``flock`` on ``folder/.dcdb-lock``, released by the kernel if the process dies, removed on
    exit. Another process holding it -> BusyError at once (with its pid); a read-only folder ->
    NotWritableError. Re-entrant within a process. ``create`` makes ``folder`` if missing (and
    removes it again on exit if it is still empty)."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    made = False
    if create and not folder.is_dir():
        try:
            folder.mkdir(parents=True)
            made = True
        except FileExistsError:
            pass
        except OSError as exc:
            err = write_error(exc, folder, what)
            if err is None:
                raise
            raise err from exc
    key = os.path.realpath(folder)
    fd = _acquire(folder, what)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        if fd is not None:
            try:
                (folder / LOCK_NAME).unlink(missing_ok=True)  # while holding it: see _acquire
            except OSError:
                pass
            os.close(fd)
        if made:
            try:
                folder.rmdir()
            except OSError:
                pass
