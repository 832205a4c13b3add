"""Small file helpers: atomic writes and output-path checks.

Every file dcdb produces is written under a temporary name in the same folder and renamed into
place when complete, so a killed run never leaves a half file that looks whole.

Outputs are only ever regular files. A path that exists and is anything else (a directory, a
character or block device such as ``/dev/null``, a FIFO, a socket) is refused, whatever ``--force``
says: renaming onto it would replace the device itself (root may do that). A symlink is written
through (its target is replaced, the link kept) only when it points to a regular file.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dcdb.errors import OutputError

TMP_MARK = ".dcdb-tmp-"


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


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    return path


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


def check_folder(path: str | os.PathLike, *, what: str = "output folder", hint: str = "give a folder path") -> Path:
    """An output folder before any work: missing (created later) or a folder, a symlink to one
    included. Anything else (a file, a device, a FIFO, a socket, a dangling symlink) is refused."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise OutputError(
                f"{what} {str(path)!r} is a symlink to {os.path.realpath(path)!r}, which does not exist",
                hint="create that folder, or give another path",
            ) from None
        return path
    except OSError as exc:  # a file on the way (ENOTDIR), a symlink loop, ...
        raise OutputError(f"cannot create {what} {str(path)!r} ({exc.strerror})", hint=hint) from None
    if not stat.S_ISDIR(st.st_mode):
        kind = "a file" if stat.S_ISREG(st.st_mode) else _kind(st.st_mode)
        raise OutputError(f"{what} {str(path)!r} is {kind}, not a folder", hint=hint)
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
