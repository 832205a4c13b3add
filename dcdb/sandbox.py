"""DuckDB's own sandbox around SQL that someone else may have written.

Filters are shared as files, so running someone's ``.sql`` must be safe. Every statement dcdb runs
for a user's text runs on a connection sandboxed by :func:`apply` first: ``dcdb query`` (local and
the ``--engine ray`` driver and tasks), ``dcdb sql``, ``dcdb knn --where``, and
``dcdb.connect(pool, sandboxed=True)``. The rule:

* it may **read only the pool** (its folder, and the folders its views' Parquet files really live
  in: symlinks are resolved, as DuckDB resolves them before it checks) **and the files given as
  its path parameters**: the value of every parameter declared ``-- @param NAME path`` -- a file,
  a folder (everything under it, e.g. a clip_benchmark task folder) or a glob (the pattern and the
  files it matches). A value given to an undeclared parameter (``$x`` with no header line) is
  never a path, whatever it names: only the filter's header can say what it reads.
* it may **not install or load DuckDB extensions** (nothing reaches the network).

DuckDB enforces both (``allowed_directories`` / ``allowed_paths``, ``enable_external_access =
false``, ``autoinstall_known_extensions = false``, ``autoload_known_extensions = false``), and
``lock_configuration = true`` is set before the user's text runs, so no statement, function or
table function can change them back. Python functions registered on the connection
(``contaminated``, ``nearest_centroid``, ``target_centroids``, ``centroids_match``,
``wordnet_hit``, ``clip_image``) read their files from Python, not through DuckDB: each checks its
path argument with :meth:`ReadAccess.check` against the same allowance, so a literal path in the
SQL (``contaminated(l14_img, '/etc/passwd', 0.9)``) is refused just like ``read_csv('/etc/passwd')``.
What the operator configured rather than the filter -- the CLIP checkpoint set with
``dcdb encoder``, the WordNet database (``$DCDB_WORDNET``) -- is read as before.

A refusal is one :class:`dcdb.errors.SandboxError` naming what was read and the rule
(:func:`refusal` turns DuckDB's PermissionException and its "exists in the X extension" catalog
errors into one). Before any of it, :func:`check_statement` admits only one read-only SELECT.
"""

from __future__ import annotations

import glob as globlib
import os
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcdb.errors import QueryError, ReadOnlyError, SandboxError
from dcdb.sqltext import sql_string

# who runs the text -> (the rule, what to do instead)
RULES = {
    "filter": ("a filter may read only the pool and the files given as its path parameters",
               "pass the file as a path parameter: declare `-- @param NAME path` in the filter's header and "
               "give -p NAME FILE"),
    "sql": ("dcdb sql may read only the pool and the files given as path parameters",
            "pass the file as a path parameter: start the SQL with `-- @param NAME path` (e.g. from a file "
            "with `dcdb sql - < q.sql`) and give -p NAME FILE"),
    "where": ("--where may read only the pool",
              "--where is a predicate on pool columns; read other files from a filter (dcdb query) with a "
              "path parameter"),
    "connection": ("this sandboxed connection may read only the pool and its allowed_paths",
                   "add the file or folder to dcdb.connect(pool, sandboxed=True, allowed_paths=[...])"),
}

_ACCESS: weakref.WeakKeyDictionary[Any, ReadAccess] = weakref.WeakKeyDictionary()
_SOURCES: weakref.WeakKeyDictionary[Any, list[Path]] = weakref.WeakKeyDictionary()


def set_view_sources(con, sources: list[Path]) -> None:
    """Record the Parquet files the views of ``con`` read (``dcdb.engine.connect`` does, once its
    views exist): :func:`apply` allows their folders."""
    _SOURCES[con] = sources


def view_sources(con) -> list[Path]:
    """The Parquet files the views of a ``connect`` connection read (what its sandbox allows)."""
    return list(_SOURCES.get(con, []))


@dataclass
class ReadAccess:
    """What a connection's statements may read. Unrestricted until :func:`apply` restricts it;
    the connection's Python functions hold this object and check their paths with it."""

    dirs: tuple[str, ...] | None = None  # real paths of allowed folders; None: no sandbox
    files: frozenset[str] = frozenset()  # allowed files (real paths) and glob patterns (as given)
    who: str = ""  # "filter 'x'", "the SQL", "--where", "this sandboxed connection"
    kind: str = "filter"  # a key of RULES

    @property
    def sandboxed(self) -> bool:
        return self.dirs is not None

    def allows(self, path: str | os.PathLike) -> bool:
        if self.dirs is None:
            return True
        given = os.path.abspath(os.path.expanduser(str(path)))
        real = os.path.realpath(given)
        if given in self.files or real in self.files:
            return True
        return any(_under(real, d) for d in self.dirs)

    def check(self, path: str | os.PathLike | None, param: str | None = None) -> None:
        """Raise SandboxError unless ``path`` may be read (call it before touching the file)."""
        if path is None or self.dirs is None or self.allows(path):
            return
        raise self.error(str(path), param)

    def check_glob(self, pattern: str | None, param: str | None = None) -> None:
        """A glob given to a Python function: the pattern itself is a path parameter's value, or
        the folder it lists is allowed (its matches are checked one by one with :meth:`check`)."""
        if pattern is None or self.dirs is None:
            return
        pat = os.path.abspath(os.path.expanduser(str(pattern)))
        if pat in self.files:
            return
        if globlib.has_magic(pat):
            parts = Path(pat).parts
            fixed = next(i for i, p in enumerate(parts) if globlib.has_magic(p))
            base = os.path.join(*parts[:fixed]) if fixed else os.sep
            if not any(_under(os.path.realpath(base), d) for d in self.dirs):
                raise self.error(str(pattern), param)
            return
        self.check(pat, param)

    def error(self, path: str, param: str | None = None) -> SandboxError:
        rule, hint = RULES[self.kind]
        via = f" (argument {param})" if param else ""
        return SandboxError(f"{self.who} tried to read {path!r}{via}: {rule}", hint=hint)

    def extension_error(self, what: str, name: str, ext: str) -> SandboxError:
        hint = "write it with DuckDB's built-in functions"
        if name and not re.fullmatch(r"\w+", name):  # an operator: most likely a typo (>>= for >=)
            hint = f"is {name!r} a typo? it is an operator of the {ext} extension; " + hint
        return SandboxError(f"{self.who} uses {what}, which needs the DuckDB extension {ext!r}: SQL run by "
                            "dcdb may not install or load extensions (nothing is fetched)", hint=hint)


def _under(real: str, folder: str) -> bool:
    return real == folder or real.startswith(folder.rstrip(os.sep) + os.sep)


def read_access(con) -> ReadAccess:
    """The connection's ReadAccess (created unrestricted on first use)."""
    access = _ACCESS.get(con)
    if access is None:
        access = _ACCESS[con] = ReadAccess()
    return access


@dataclass
class Allowance:
    """Folders and files (real paths, plus glob patterns as given) a sandbox allows."""

    dirs: set[str] = field(default_factory=set)
    files: set[str] = field(default_factory=set)

    def add(self, value: str | os.PathLike) -> None:
        """A path parameter's value: a folder, a file, or a glob (the pattern and its matches).
        A path that does not exist is allowed as itself (reading it fails as it would anyway)."""
        p = os.path.abspath(os.path.expanduser(str(value)))
        if os.path.isdir(p):
            self.dirs.add(os.path.realpath(p))
        elif os.path.exists(p):
            self.files.update({p, os.path.realpath(p)})
        elif globlib.has_magic(p):
            self.files.add(p)
            for m in globlib.glob(p):
                self.add(m)
        else:
            self.files.add(p)


def pool_allowance(pool, sources: Iterable[Path] = ()) -> Allowance:
    """The pool's folder and what its views read (``sources``: the Parquet files of the views),
    as real paths: a view's file that is a symlink is allowed as its target."""
    out = Allowance(dirs={os.path.realpath(pool.path)})
    seen: set[str] = set()
    for f in sources:
        parent = str(f.parent)
        if parent not in seen:
            seen.add(parent)
            out.dirs.add(os.path.realpath(parent))
        if os.path.islink(f):
            out.files.add(os.path.realpath(f))
    return out


SQL_HINT = "a filter is one SELECT with a uid column; `dcdb filters` lists working examples"


def check_statement(con, sql: str, name: str) -> list[str]:
    """Parse ``sql`` with DuckDB: exactly one read-only SELECT. Returns its named parameters."""
    import duckdb

    try:
        stmts = con.extract_statements(sql)
    except duckdb.ParserException as exc:
        raise QueryError(f"SQL syntax error in filter {name!r}: {str(exc).strip()}",
                         hint=f"fix the SQL at that position; {SQL_HINT}") from None
    except duckdb.Error as exc:
        raise QueryError(f"filter {name!r} cannot be parsed: {str(exc).strip()}", hint=SQL_HINT) from None
    if not stmts:
        raise QueryError(f"filter {name!r} contains no SQL statement", hint="write one SELECT with a uid column")
    if len(stmts) > 1:
        raise QueryError(
            f"filter {name!r} contains {len(stmts)} statements; a filter is exactly one SELECT",
            hint="combine them with WITH ... SELECT, or remove the extra statements",
        )
    st = stmts[0]
    if st.type != duckdb.StatementType.SELECT:
        raise ReadOnlyError(
            f"filter {name!r} is {'an' if st.type.name[:1] in 'AEIOU' else 'a'} {st.type.name} statement; "
            "filters may only read (one SELECT)",
            hint="COPY, ATTACH, INSTALL, CREATE, SET and other writes are not allowed in a filter",
        )
    return sorted(st.named_parameters)


def path_values(filt, params: dict[str, Any]) -> list[str]:
    """The values of the filter's declared ``path`` parameters (what it may read besides the pool)."""
    return [str(v) for k, v in params.items()
            if v is not None and (spec := filt.params.get(k)) is not None and spec.type == "path"]


def _sql_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(sql_string(v) for v in sorted(values)) + "]"


def apply(con, pool, allow: Iterable[str | os.PathLike] = (), *, who: str,
          kind: str = "filter") -> ReadAccess:
    """Sandbox ``con`` (a ``dcdb.engine.connect`` connection on ``pool``): from now on it reads
    only the pool and ``allow`` (path parameter values), loads no extension, and its settings are
    locked. Run it after dcdb's own setup and before any statement of the user's text."""
    access = read_access(con)
    if access.sandboxed:  # already locked: only the same or a narrower allowance could be asked
        raise SandboxError(f"{who}: the connection is already sandboxed for {access.who}",
                           hint="open a new connection for each filter")
    a = pool_allowance(pool, view_sources(con))
    for v in allow:
        a.add(v)
    con.execute(f"SET allowed_directories = {_sql_list(a.dirs)}")
    con.execute(f"SET allowed_paths = {_sql_list(a.files)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")
    access.dirs, access.files, access.who, access.kind = tuple(sorted(a.dirs)), frozenset(a.files), who, kind
    return access


_FILE_RE = re.compile(r'Cannot access (?:file|directory) "(?P<path>.*?)" - ')
_EXT_RE = re.compile(r'(?P<what>[\w ]+?) with name "?(?P<name>[^"]+?)"? '
                     r'(?:is not in the catalog|does not exist).*?exists in the (?P<ext>\w+) extension', re.S)


def refusal(con, exc: Exception) -> SandboxError | None:
    """The SandboxError behind a DuckDB error on a sandboxed connection, or None: a file outside
    the allowance (PermissionException), an extension that would have to be loaded (DuckDB's
    "... exists in the X extension" catalog error) or refused extension loading."""
    import duckdb

    access = _ACCESS.get(con)
    if access is None or not access.sandboxed:
        return None
    msg = str(exc)
    if isinstance(exc, duckdb.PermissionException):
        m = _FILE_RE.search(msg)
        if m:
            return access.error(m["path"])
        if "extension" in msg.lower():
            return access.extension_error("an extension", "", "?")
        rule, hint = RULES[access.kind]
        first = msg.strip().splitlines()[0]
        return SandboxError(f"{access.who} was refused by the sandbox: {first} ({rule})", hint=hint)
    if isinstance(exc, (duckdb.CatalogException, duckdb.BinderException)):
        m = _EXT_RE.search(msg)
        if m:
            return access.extension_error(f"{m['what'].strip().lower()} {m['name']!r}", m["name"], m["ext"])
    return None


__all__ = ["ReadAccess", "apply", "check_statement", "path_values", "read_access", "refusal"]
