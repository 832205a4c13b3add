"""The package's import graph stays a layered one: no import cycle, no module taking another's
``_private`` name, no core module importing the demo.

Its own small AST walk (CI's clone has only the repository): dcdb/, filters/, train/ and eval/ are
read as the installed names dcdb, dcdb.filters, dcdb.train and dcdb.eval. Every import statement
counts wherever it is (a lazy import inside a function is still an arrow), and ``from P import m``
is an arrow to the submodule ``P.m`` when there is one. Private names are taken by ``from M import
_x`` or through a module bound by an import (``import dcdb.m as m; m._x``, ``from dcdb import m;
m._x``). Tests and benchmarks are not part of the package and are not read.

What another module needs is public API of its owner (no underscore) or moves there; a lazy import
does not break a cycle -- move the shared code below both modules instead.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"dcdb": "dcdb", "filters": "dcdb.filters", "train": "dcdb.train", "eval": "dcdb.eval"}
CORE = ("store", "engine", "query", "ingest", "vectors", "shards", "dist", "plan", "cuts", "uids", "subsets",
        "annotate", "derived", "sandbox", "io", "errors", "sqltext", "tario", "results", "version", "parallel")
DEMO = "dcdb.demo"

# Exceptions the checks allow (none: every edge they count is a finding).
KNOWN: dict[str, set] = {"cycles": set(), "private": set(), "core_demo": set()}


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for folder, pkg in FOLDERS.items():
        for f in sorted((root / folder).rglob("*.py")):
            parts = [p for p in f.relative_to(root / folder).with_suffix("").parts if p != "__init__"]
            if folder == "dcdb" and parts and parts[0] in ("filters", "train", "eval"):
                continue  # (a stray copy; the real ones are the top-level folders)
            mods[".".join([pkg, *parts])] = f
    return mods


def _owner(name: str, mods) -> str | None:
    """The project module ``name`` is, or is inside (``dcdb.x.y`` -> ``dcdb.x`` when y is a name)."""
    while name not in mods and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in mods else None


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@functools.lru_cache
def _graph(root: Path = ROOT):
    """(module -> modules it imports, private names taken: 'user <- owner.name')."""
    mods = _modules(root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private: set[str] = set()
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        bound: dict[str, str] = {}  # local name -> the project module an import bound to it

        def arrow(target: str, attr: str | None = None, *, name=name, mods=mods) -> str | None:
            owner = _owner(target, mods)
            if owner is not None and owner != name:
                edges[name].add(owner)
                if attr is not None and _private(attr):
                    private.add(f"{name} <- {owner}.{attr}")
            return owner

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    owner = arrow(a.name)
                    if owner is not None:
                        if a.asname:
                            bound[a.asname] = owner
                        elif "." not in a.name:
                            bound[a.name] = owner
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for a in node.names:
                    sub = f"{source}.{a.name}"
                    if sub in mods:
                        if arrow(sub) is not None:
                            bound[a.asname or a.name] = sub
                    else:
                        arrow(source, a.name)
        for node in ast.walk(tree):  # m._x through a module an import bound
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                owner = bound.get(node.value.id)
                if owner is None:
                    continue
                if owner != name and _private(node.attr):
                    private.add(f"{name} <- {owner}.{node.attr}")
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(frozenset(comp))
    return out


def _is_core(module: str) -> bool:
    return any(module == f"dcdb.{c}" or module.startswith(f"dcdb.{c}.") for c in CORE)


def _core_demo(edges: dict[str, set[str]]) -> set[str]:
    return {f"{a} -> {b}" for a, bs in edges.items() for b in bs
            if _is_core(a) and (b == DEMO or b.startswith(DEMO + "."))}


def test_no_import_cycles():
    edges, _ = _graph()
    new = [sorted(c) for c in _cycles(edges) if c not in KNOWN["cycles"]]
    assert not new, (f"import cycles: {new} -- move what both modules use below them (a lazy import "
                     "is still an arrow)")


def test_no_private_names_taken_across_modules():
    _, private = _graph()
    new = sorted(private - KNOWN["private"])
    assert not new, (f"private names taken across modules: {new} -- make them public API of their owner, "
                     "or move them")


def test_core_imports_nothing_from_the_demo():
    edges, _ = _graph()
    new = sorted(_core_demo(edges) - KNOWN["core_demo"])
    assert not new, f"core modules import the demo: {new}"


def test_the_walk_finds_the_package_arrows():
    edges, _ = _graph()
    assert "dcdb.vectors.scan" in edges["dcdb.vectors.ann"]  # a from-import inside a function
    assert "dcdb.uids" in edges["dcdb.query"]  # from dcdb import uids as U: the submodule
    assert "dcdb.filters" in edges["dcdb.filters.baselines"]  # a package (the filter registry)
    assert "dcdb.train.checkpoint" in edges["dcdb.eval.model"]  # train/ and eval/ by their names


def test_the_walk_reports_each_kind(tmp_path):
    """On a tiny tree with one of each: a cycle closed by a lazy relative import, a private name
    taken by from-import and one through a module, a core module importing the demo."""
    files = {
        "dcdb/__init__.py": "",
        "dcdb/engine.py": "def f():\n    from dcdb.demo import world\n",
        "dcdb/io.py": "from dcdb import uids as U\nx = U._check\n",
        "dcdb/uids.py": "def _check():\n    from .io import x\n",
        "dcdb/demo/__init__.py": "",
        "dcdb/demo/world.py": "from dcdb.uids import _raw\n",
        "filters/__init__.py": "import dcdb.io as io\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    edges, private = _graph(tmp_path)
    assert _cycles(edges) == [frozenset({"dcdb.io", "dcdb.uids"})]
    assert private == {"dcdb.io <- dcdb.uids._check", "dcdb.demo.world <- dcdb.uids._raw"}
    assert _core_demo(edges) == {"dcdb.engine -> dcdb.demo.world"}
    assert edges["dcdb.filters"] == {"dcdb.io"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
