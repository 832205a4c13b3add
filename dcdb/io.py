"""Small file helpers: atomic writes and output-path checks.

Every file dcdb produces is written under a temporary name in the same folder and renamed into
place when complete, so a killed run never leaves a half file that looks whole.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dcdb.errors import OutputError

TMP_MARK = ".dcdb-tmp-"


def tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.
    ``fsync=False`` skips flushing the file to disk first: a killed process still leaves no half
    file, but after a machine crash the file may come back empty or short."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        yield tmp
        if fsync and tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
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
    """Validate an output path before any work: parent writable, refuse to clobber without force."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise OutputError(f"{what} {str(path)!r} is a directory", hint="give a file name")
    if path.exists() and not force:
        raise OutputError(
            f"{what} {str(path)!r} already exists", hint="pass --force to replace it"
        )
    parent = path.parent if str(path.parent) else Path(".")
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


def dir_size(path: str | os.PathLike) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total
