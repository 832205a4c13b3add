"""Every command of the foundation, run in-process through click's CliRunner."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dcdb import uids as U
from dcdb.cli import cli


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    r = CliRunner()
    res = r.invoke(cli, ["synth", "pool", str(root / "src"), "--rows", "200", "--shards", "2", "--seed", "5"])
    assert res.exit_code == 0, res.output
    res = r.invoke(cli, ["ingest", str(root / "src"), str(root / "pool"), "-j", "1"])
    assert res.exit_code == 0, res.output
    (root / "f.sql").write_text(
        "-- Rows with a large original image.\n"
        "-- @param min_side int = 200 smallest side in pixels\n"
        "SELECT uid FROM pool WHERE least(original_width, original_height) >= $min_side\n"
    )
    return root


def run(args, input=None, env=None):
    return CliRunner().invoke(cli, args, input=input, env=env)


def test_query_writes_npy_and_manifest(built, tmp_path):
    out = tmp_path / "s.npy"
    res = run(["query", str(built / "f.sql"), "--pool", str(built / "pool"), "-p", "min_side", "300", "-o", str(out)])
    assert res.exit_code == 0, res.output
    arr = np.load(out)
    assert arr.dtype == np.dtype("u8,u8") and len(arr) > 0
    m = json.loads((tmp_path / "s.npy.json").read_text())
    assert m["rows"] == len(arr) and m["params"] == {"min_side": 300}
    assert len(m["sql_sha256"]) == 64 and len(m["pool_manifest_sha256"]) == 64
    assert "uids" in res.stderr and "rows/s" in res.stderr
    # the same through DCDB_POOL, formats from the suffix
    res = run(["query", str(built / "f.sql"), "-o", str(tmp_path / "s.txt")], env={"DCDB_POOL": str(built / "pool")})
    assert res.exit_code == 0, res.output
    lines = (tmp_path / "s.txt").read_text().split()
    assert len(lines) >= len(arr)  # the default min_side (200) keeps a superset of min_side 300
    assert set(U.to_hex(arr)) <= set(lines) and lines == sorted(lines)
    res = run(["query", "no_filter", "--pool", str(built / "pool"), "-o", str(tmp_path / "s.parquet")])
    assert res.exit_code == 0, res.output


def test_query_from_stdin_to_stdout(built):
    res = run(["-q", "query", "-", "--pool", str(built / "pool")], input="SELECT uid FROM pool ORDER BY uid DESC LIMIT 3")
    assert res.exit_code == 0, res.output
    lines = res.stdout.split()
    assert len(lines) == 3 and lines == sorted(lines) and all(len(u) == 32 for u in lines)


def test_output_exists_needs_force(built, tmp_path):
    out = tmp_path / "x.npy"
    out.write_bytes(b"keep me")
    res = run(["query", "no_filter", "--pool", str(built / "pool"), "-o", str(out)])
    assert res.exit_code != 0 and "already exists" in res.stderr and "--force" in res.stderr
    assert out.read_bytes() == b"keep me"
    res = run(["query", "no_filter", "--pool", str(built / "pool"), "-o", str(out), "--force"])
    assert res.exit_code == 0 and np.load(out).dtype == np.dtype("u8,u8")


@pytest.mark.parametrize(
    "args, message",
    [
        (["query", "no_filtr"], "did you mean 'no_filter'"),
        (["query", "{f}", "-p", "min_side", "big"], "expects an int"),
        (["query", "{f}", "-p", "max_side", "3"], "has no parameter $max_side"),
        (["query", "-"], "syntax error"),
    ],
)
def test_query_bad_input(built, tmp_path, args, message):
    args = [a.replace("{f}", str(built / "f.sql")) for a in args]
    out = tmp_path / "o.npy"
    res = run(args + ["--pool", str(built / "pool"), "-o", str(out)], input="SELEC uid FROM pool")
    assert res.exit_code != 0
    assert res.stderr.startswith("error:") and message in res.stderr, res.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_not_a_pool_and_unwritable_output(built, tmp_path):
    res = run(["query", "no_filter", "--pool", str(tmp_path), "-o", str(tmp_path / "o.npy")])
    assert res.exit_code != 0 and "not a dcdb pool" in res.stderr
    res = run(["query", "no_filter", "--pool", str(built / "pool"), "-o", str(tmp_path / "nope" / "o.npy")])
    assert res.exit_code != 0 and "does not exist" in res.stderr
    res = run(["info"], env={"DCDB_POOL": ""})
    assert res.exit_code != 0 and "DCDB_POOL" in res.stderr


def test_sql_and_info(built, tmp_path):
    res = run(["sql", "SELECT count(*) AS n, avg(clip_l14_similarity_score) AS s FROM pool", "--pool", str(built / "pool")])
    assert res.exit_code == 0, res.output
    assert "200" in res.stdout
    res = run(["sql", "SELECT uid, original_width FROM pool", "--pool", str(built / "pool"), "--format", "csv"])
    assert res.exit_code == 0 and len(res.stdout.strip().splitlines()) == 201
    res = run(["sql", "SELECT uid FROM pool WHERE original_width > $w", "-p", "w", "0", "--pool", str(built / "pool"),
               "--format", "parquet", "-o", str(tmp_path / "r.parquet")])
    assert res.exit_code == 0 and (tmp_path / "r.parquet").exists()
    res = run(["sql", "DROP VIEW pool", "--pool", str(built / "pool")])
    assert res.exit_code != 0 and "may only read" in res.stderr
    res = run(["info", "--pool", str(built / "pool")])
    assert res.exit_code == 0 and "200 in 1 uid bucket(s)" in res.stdout and "l14_img" in res.stdout
    info = json.loads(run(["info", "--pool", str(built / "pool"), "--json"]).stdout)
    assert info["rows"] == 200 and info["spaces"]["b32_img"]["dim"] == 512


def test_filters_lists_builtin_sql():
    res = run(["filters"])
    assert res.exit_code == 0 and "no_filter" in res.stdout
    rows = json.loads(run(["filters", "--json"]).stdout)
    assert any(r["name"] == "no_filter" and r["description"] for r in rows)


def test_subsets_save_list_show_combine(built, tmp_path):
    pool = str(built / "pool")
    assert run(["-q", "query", str(built / "f.sql"), "--pool", pool, "-p", "min_side", "400", "--save", "big"]).exit_code == 0
    assert run(["-q", "query", "-", "--pool", pool, "--save", "wide"],
               input="SELECT uid FROM pool WHERE original_width > 2 * original_height").exit_code == 0
    res = run(["subsets", "list", "--pool", pool])
    assert res.exit_code == 0 and "big" in res.stdout and "wide" in res.stdout
    assert json.loads(run(["subsets", "show", "big", "--pool", pool]).stdout)["params"] == {"min_side": 400}
    # a stored subset is a view usable from SQL
    res = run(["sql", "SELECT count(*) AS n FROM big", "--pool", pool, "--format", "csv"])
    n_big = int(res.stdout.split()[-1])
    for op in ("union", "intersect", "minus"):
        res = run(["-q", "subsets", op, "big", "wide", "--pool", pool, "-o", str(tmp_path / f"{op}.npy")])
        assert res.exit_code == 0, res.output
    a = np.load(built / "pool" / "subsets" / "big.npy")
    b = np.load(built / "pool" / "subsets" / "wide.npy")
    assert len(a) == n_big
    assert set(np.load(tmp_path / "union.npy").tolist()) == set(a.tolist()) | set(b.tolist())
    assert set(np.load(tmp_path / "intersect.npy").tolist()) == set(a.tolist()) & set(b.tolist())
    assert set(np.load(tmp_path / "minus.npy").tolist()) == set(a.tolist()) - set(b.tolist())
    res = run(["-q", "subsets", "union", "big", "wide", "--pool", pool, "--save", "either"])
    assert res.exit_code == 0 and (built / "pool" / "subsets" / "either.npy").exists()
    res = run(["-q", "query", "no_filter", "--pool", pool, "--save", "big"])
    assert res.exit_code != 0 and "already exists" in res.stderr
    res = run(["subsets", "show", "nosuch", "--pool", pool])
    assert res.exit_code != 0 and "no subset" in res.stderr
    res = run(["-q", "query", "no_filter", "--pool", pool, "--save", "Bad-Name"])
    assert res.exit_code != 0 and "invalid subset name" in res.stderr


def test_metadata_only_pool_says_so(tmp_path):
    assert run(["-q", "synth", "pool", str(tmp_path / "src"), "--rows", "30", "--shards", "1", "--no-embeddings"]).exit_code == 0
    assert run(["-q", "ingest", str(tmp_path / "src"), str(tmp_path / "pool"), "-j", "1"]).exit_code == 0
    res = run(["query", "-", "--pool", str(tmp_path / "pool"), "-o", str(tmp_path / "o.npy")],
              input="SELECT uid FROM pool WHERE dot(l14_img, l14_txt) > 0.3")
    assert res.exit_code != 0 and "metadata-only" in res.stderr
    res = run(["-q", "query", "no_filter", "--pool", str(tmp_path / "pool"), "-o", str(tmp_path / "o.npy")])
    assert res.exit_code == 0 and len(np.load(tmp_path / "o.npy")) == 30


def test_help_lists_commands():
    res = run(["--help"])
    for name in ("query", "sql", "ingest", "info", "synth", "subsets", "filters", "demo"):
        assert name in res.stdout


def test_quiet_works_after_the_command(built, tmp_path):
    """`dcdb query ... -q` is `dcdb -q query ...`: the summary line on stderr goes away."""
    args = ["query", str(built / "f.sql"), "--pool", str(built / "pool"), "-o"]
    loud = CliRunner().invoke(cli, args + [str(tmp_path / "a.npy")])
    quiet = CliRunner().invoke(cli, args + [str(tmp_path / "b.npy"), "-q"])
    quiet_before = CliRunner().invoke(cli, ["-q"] + args + [str(tmp_path / "c.npy")])
    assert loud.exit_code == quiet.exit_code == quiet_before.exit_code == 0, (loud.output, quiet.output)
    assert "uids" in loud.stderr and quiet.stderr == "" and quiet_before.stderr == ""
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["query"], "error: Missing argument 'FILE|NAME|-'."),
    (["query", "no_filter", "--bogus"], "error: No such option '--bogus'"),
    (["querry"], "error: No such command 'querry'. Did you mean 'query'?"),
    (["knn", "--pool", "x", "-k", "ten"], "error: Invalid value for '-k'"),
])
def test_usage_errors_are_one_error_line_with_a_hint(args, message):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert lines[0].startswith(message) and lines[1].startswith("  hint: see `dcdb"), res.stderr
    assert len(lines) == 2 and "Usage:" not in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""


def test_duckdb_messages_fold_onto_one_line():
    from dcdb.errors import one_line

    msg = 'Parser Error: syntax error at or near "whre"\n\nLINE 1: SELECT uid FROM pool whre x\n                             ^'
    assert one_line(msg) == 'Parser Error: syntax error at or near "whre" (SQL line 1, column 22)'
    assert one_line("a\n\nb\n") == "a; b"


def test_sql_syntax_error_is_one_line(built):
    res = run(["sql", "SELECT uid FROM pool whre x", "--pool", str(built / "pool")])
    assert res.exit_code != 0
    first = res.stderr.splitlines()[0]
    assert first.startswith("error: ") and 'near "x" (SQL line 1, column 27)' in first, res.stderr
    assert all(line.startswith("  hint: ") for line in res.stderr.splitlines()[1:]), res.stderr


def test_unexpected_exceptions_are_one_line_unless_debugging(built, monkeypatch):
    """A bug below the CLI prints one line that says how to get the traceback; OSErrors name the file."""
    import dcdb.store

    def broken(*_a, **_k):
        raise ValueError("boom")

    monkeypatch.setattr(dcdb.store, "open_pool", broken)
    res = run(["info", "--pool", str(built / "pool")])
    assert res.exit_code == 70 and res.stderr.startswith("error: internal error: ValueError: boom\n  hint: ")
    assert "DCDB_DEBUG=1" in res.stderr and "Traceback" not in res.stderr
    res = run(["info", "--pool", str(built / "pool")], env={"DCDB_DEBUG": "1"})
    assert isinstance(res.exception, ValueError)

    def denied(*_a, **_k):
        raise PermissionError(13, "Permission denied", "/some/file")

    monkeypatch.setattr(dcdb.store, "open_pool", denied)
    res = run(["info", "--pool", str(built / "pool")])
    assert res.exit_code == 1
    assert res.stderr == "error: permission denied: '/some/file'\n  hint: check that path's permissions, then re-run\n"

    def missing(*_a, **_k):
        raise FileNotFoundError(2, "No such file or directory", "/some/file")

    monkeypatch.setattr(dcdb.store, "open_pool", missing)
    res = run(["info", "--pool", str(built / "pool")])
    assert res.exit_code == 1
    assert res.stderr == "error: No such file or directory: '/some/file'\n  hint: check the path\n"
