"""Packaging contract (DESIGN §2): one import root, sql/ as package data, lazy heavy imports."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_has_only_dcdb_at_top_level(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("dcdb-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"dcdb", next(t for t in top if t.endswith(".dist-info"))}
    for pkg in ("dcdb/filters/__init__.py", "dcdb/train/__init__.py", "dcdb/eval/__init__.py", "dcdb/sql/no_filter.sql"):
        assert pkg in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dcdb = dcdb.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    # the demo world's vocabulary tables are package data: in the wheel, and read from an install of it
    tables = sorted(p.name for p in (ROOT / "dcdb" / "demo" / "data").glob("*.json"))
    assert tables and all(f"dcdb/demo/data/{t}" in names for t in tables)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure wheel installs as its files
    code = ("import dcdb.demo.world as W; assert W.__file__.startswith(%r), W.__file__; "
            "print(W.SHAPES[0], W.FOREIGN['de']['colour']['green'], len(W.EVAL_TASKS))" % str(site))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.stdout.split() == ["circle", "Grün", "4"]


def test_sql_files_are_package_data():
    from dcdb.query import builtin_filters

    assert "no_filter" in builtin_filters()


def _modules_after(code: str) -> set:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        check=True,
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(ROOT)},
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_help_imports_nothing_heavy():
    mods = _modules_after("from dcdb.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    for heavy in ("torch", "open_clip", "duckdb", "pyarrow", "lance", "polars"):
        assert heavy not in mods


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "dcdb", "--version"], capture_output=True, text=True, check=True)
    assert "dcdb" in out.stdout


@pytest.mark.slow
def test_query_commands_do_not_import_torch(tmp_path):
    code = f"""
from dcdb.cli import main
def run(args):
    try:
        main(args)
    except SystemExit as e:
        assert not e.code, (args, e.code)
run(['-q', 'synth', 'pool', r'{tmp_path}/src', '--rows', '50', '--shards', '2'])
run(['-q', 'ingest', r'{tmp_path}/src', r'{tmp_path}/pool', '-j', '1'])
run(['info', '--pool', r'{tmp_path}/pool'])
run(['sql', 'SELECT count(*) FROM pool', '--pool', r'{tmp_path}/pool'])
run(['-q', 'query', 'no_filter', '--pool', r'{tmp_path}/pool', '-o', r'{tmp_path}/a.npy'])
"""
    mods = _modules_after(code)
    assert "duckdb" in mods
    for heavy in ("torch", "open_clip", "torchvision"):
        assert heavy not in mods
