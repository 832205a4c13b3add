"""The ``dcdb`` command line: ``dcdb.cli.base`` holds the root group and the plumbing, each
module beside it one family of commands (they register themselves on the group when imported).

Data goes to stdout (or ``-o FILE``); logs, progress and summaries go to stderr; ``--quiet``
silences them. A ``DcdbError`` becomes ``error: <message>`` on stderr and a non-zero exit code.
Heavy libraries (duckdb, pyarrow, lance, torch) are imported inside the commands so that
``dcdb --help`` stays fast.
"""

from __future__ import annotations

from dcdb.cli import annotate, dedup, demo, knn, query, reshard, store, train  # noqa: F401  (register commands)
from dcdb.cli.base import cli

__all__ = ["cli", "main"]


def main(argv=None) -> None:
    cli.main(args=argv, prog_name="dcdb")
