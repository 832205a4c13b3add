"""Where a uid result goes: ``-o FILE`` (with its manifest ``FILE.json``), ``--save NAME`` (a
stored subset in the pool), or stdout (hex, one per line) when neither is given.

One object serves ``dcdb query``, ``dcdb knn`` and ``dcdb subsets union|intersect|minus``, in
two steps so that every check runs before the work: ``UidDestination(...)`` checks the output
path, its format and the subset name (no pool needed); ``claim(pool)`` takes the pool's write
lock and checks the subset's files when there is a ``--save``. After the work, ``write(...)``
writes each destination and returns their labels for the summary line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import numpy as np

from dcdb.store import Pool

# manifest(kind, destination, fmt): the manifest written beside -o FILE (kind "output", the
# file's path and format) or with a stored subset (kind "save", the subset's .npy path, "npy")
Manifest = Callable[[str, str, str], dict[str, Any]]


def replaces_unfinished(output: str, log: Callable[[str], None]) -> bool:
    """An OUTPUT without its OUTPUT.json is a killed run's: redone without --force (see README)."""
    from dcdb.io import unfinished_output
    from dcdb.query import manifest_path

    if unfinished_output(output, manifest_path(output)):
        log(f"{output} has no manifest ({manifest_path(output).name}): an unfinished earlier run; replacing it")
        return True
    return False


class UidDestination:
    """``-o``/``--save``/stdout of a uid result; a context manager that holds the pool's write
    lock (taken by :meth:`claim`) until it exits."""

    def __init__(self, *, output: str | None, save: str | None, force: bool, fmt: str | None = None,
                 format_flag: bool = True, log: Callable[[str], None] = lambda _msg: None):
        from dcdb.engine import check_subset_name
        from dcdb.io import check_output
        from dcdb.query import manifest_path, output_format

        self.output, self.save, self.force, self.log = output, save, force, log
        self.fmt = output_format(output, fmt, format_flag=format_flag) if output else None
        if output:
            check_output(output, force=force or replaces_unfinished(output, log))
            check_output(manifest_path(output), force=True, what="manifest")
        if save:
            check_subset_name(save)
        self._stack = ExitStack()

    def __enter__(self) -> UidDestination:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def claim(self, pool: Pool | None) -> None:
        """With ``--save``: hold ``pool``'s write lock and check the subset's files (regular files;
        an existing subset only with ``force``)."""
        if not self.save:
            return
        from dcdb.io import pool_write_lock
        from dcdb.subsets import check_save

        self._stack.enter_context(pool_write_lock(pool.path, "--save"))
        check_save(pool, self.save, force=self.force)

    @property
    def to_stdout(self) -> bool:
        return not self.output and not self.save

    def write(self, pool: Pool | None, uids: np.ndarray, manifest: Manifest, *, stdout: bool = True) -> list[str]:
        """Write ``uids`` (sorted, one entry per copy) to every destination; the labels of where
        they went (``stdout`` when neither -o nor --save was given). ``stdout=False`` leaves the
        printing to the caller (``print_uids``), for one that writes something else first."""
        from dcdb.query import write_output
        from dcdb.subsets import store_subset

        where = []
        if self.output:
            write_output(self.output, uids, self.fmt, manifest("output", self.output, self.fmt))
            where.append(self.output)
        if self.save:
            npy = str(pool.subsets_dir / f"{self.save}.npy")
            store_subset(pool, self.save, uids, manifest("save", npy, "npy"), force=self.force)
            where.append(f"subset {self.save}")
        if self.to_stdout and stdout:
            print_uids(uids)
            where.append("stdout")
        return where


def print_uids(uids: np.ndarray, out=None) -> None:
    """Hex uids on stdout, one per line, in blocks (a large result is not one string)."""
    from dcdb import uids as U

    out = out or sys.stdout
    for i in range(0, len(uids), 1 << 16):
        out.write("".join(u + "\n" for u in U.to_hex(uids[i : i + (1 << 16)])))
