"""Every error dcdb raises on purpose says what to do next: each DcdbError (or subclass) built in
the package is given a ``hint=``. Checked on the source, so a new error without one fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import dcdb.errors as errors

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dcdb", "filters", "train", "eval")


def _error_classes() -> set[str]:
    return {name for name, obj in vars(errors).items()
            if isinstance(obj, type) and issubclass(obj, errors.DcdbError)}


def test_every_error_has_a_hint():
    classes = _error_classes()
    assert {"DcdbError", "QueryError", "PoolError", "OutputError"} <= classes
    missing, seen = [], 0
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            text = path.read_text()
            for node in ast.walk(ast.parse(text)):
                if not isinstance(node, ast.Call):
                    continue
                fn = node.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
                if name not in classes:
                    continue
                seen += 1
                # hint= given, or **kwargs passed on (a wrapper re-raising with the hint it was given)
                if not any(k.arg == "hint" or k.arg is None for k in node.keywords):
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.get_source_segment(text, node)[:90]}")
    assert seen > 300  # the check really walks the package
    assert not missing, "errors without a hint:\n" + "\n".join(missing)

