"""Every error dcdb raises on purpose.

One module, one base class. Each message says what went wrong *and what to do*; the CLI prints
``error: <message>`` on stderr and exits with the class's ``exit_code``. Library users catch
``DcdbError`` (or a subclass) and get the same message.
"""

from __future__ import annotations

import re


class DcdbError(Exception):
    """Base class of every error dcdb raises deliberately."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")


class UsageError(DcdbError):
    """Arguments that cannot be right (bad flag combination, value out of range)."""

    exit_code = 2


class ParameterError(UsageError):
    """A filter parameter is missing, unknown or of the wrong type."""


class FilterNotFoundError(UsageError):
    """A filter name that resolves to no file in ``sql/`` (the message suggests the closest)."""


class PoolError(DcdbError):
    """The pool path is not a pool, is incomplete, or lacks what the command needs."""


class SourceError(DcdbError):
    """Input data (a DataComp metadata folder, a uid file, ...) is malformed."""


class UidError(SourceError):
    """A uid is not 32 lowercase hex characters, or a uid file has the wrong layout."""


class QueryError(DcdbError):
    """A filter's SQL failed to parse or run, or its result is not a uid list."""


class ReadOnlyError(QueryError):
    """A filter tried to do something other than read (COPY, ATTACH, INSTALL, CREATE ...)."""


class SandboxError(ReadOnlyError):
    """User SQL (a filter, ``dcdb sql``, ``--where``, a sandboxed connection) tried to read a file
    outside the pool and its path parameters, or needed a DuckDB extension (dcdb.sandbox)."""


class OutputError(DcdbError):
    """The output path exists (and ``--force`` was not given) or cannot be written."""


class DiskFullError(OutputError):
    """The file system ran out of space (or quota) while dcdb wrote; the message names the path.
    Nothing half-written is left: temp files are removed, a pool keeps its earlier state."""


class NotWritableError(OutputError):
    """A file or folder dcdb must write is on a read-only file system or denied by permissions
    (a read-only pool given to ``--save``, ``annotate``, ``dedup``, ``index`` ...)."""


class BusyError(DcdbError):
    """Another dcdb process is writing the same pool or output folder (it holds the lock file
    ``.dcdb-lock`` there); the message gives its pid."""

    exit_code = 75  # EX_TEMPFAIL: try again later


class WorkerError(DcdbError):
    """A worker process died (killed, out of memory) before finishing its part of the work."""


class SubsetError(DcdbError):
    """A stored subset is unknown, or a subset name is invalid."""


class TrainError(DcdbError):
    """Training cannot start or continue: no usable training data, or a broken run folder."""


class ResumeError(TrainError):
    """``resume`` would continue a run with a different recipe, model, data or seed."""


class EvalError(DcdbError):
    """A checkpoint cannot be evaluated (wrong architecture, unreadable, results of another model)."""


class TaskError(EvalError):
    """An evaluation task folder or task list is incomplete or malformed (the message names the file)."""


class ShardIndexError(PoolError):
    """A pool has no shard index, an unfinished one, or one out of date with the tars it indexes."""


class ReshardError(DcdbError):
    """Resharding cannot go on: a damaged input sample under ``--strict``, or blurring without Pillow."""


class AssetError(UsageError):
    """An external asset a filter needs (centroids, ImageNet embeddings, WordNet ids, WordNet itself,
    a language-id model) is missing, unreadable or of the wrong shape/dtype; the message names the
    parameter that gave it."""


class PlanError(QueryError):
    """A filter cannot be split into uid buckets (``--engine ray``): the message names the construct
    that needs the whole pool at once."""


_SQL_CONTEXT = re.compile(r"\n+LINE (\d+): (.*)\n( *)\^+ *")


def one_line(text: str) -> str:
    """``text`` folded onto one line for the terminal: DuckDB's two-line position context
    (``LINE 1: SELECT ...`` and a caret under the offending token) becomes ``(SQL line 1, column
    28)``, other line breaks become ``; ``."""

    def position(m: re.Match) -> str:
        col = len(m.group(3)) - len(f"LINE {m.group(1)}: ") + 1
        return f" (SQL line {m.group(1)}, column {max(col, 1)})"

    text = _SQL_CONTEXT.sub(position, str(text).strip())
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())
