"""User SQL runs inside DuckDB's own sandbox (dcdb/sandbox.py): a filter (`dcdb query`), `dcdb sql`,
`dcdb knn --where`, the connections of `--engine ray` tasks and `dcdb.connect(pool, sandboxed=True)`
read only the pool and the files given as path parameters, and never install or load an extension.

Every hostile read below is real (the files exist, outside the pool or behind a symlink inside it)
and every refusal must be one `error:` line naming the rule, with a hint, and no traceback.
"""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from types import SimpleNamespace

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dcdb import uids as U
from dcdb.cli import cli
from dcdb.errors import SandboxError, UsageError
from dcdb.store import open_pool

D = 768


@pytest.fixture(scope="module")
def site(_small_pool_template, tmp_path_factory):
    """A pool (200 rows) with a symlink inside it pointing out of it, a folder of secrets beside
    it, and a folder of files a filter is given as path parameters."""
    root = tmp_path_factory.mktemp("sandbox")
    pool = root / "pool"
    shutil.copytree(_small_pool_template, pool)
    rng = np.random.default_rng(3)
    secret = root / "secret"
    secret.mkdir()
    (secret / "passwd.csv").write_text("user,pw\nroot,hunter2\n")
    np.save(secret / "eval.npy", rng.standard_normal((3, D)).astype(np.float32))
    np.save(secret / "cents.npy", rng.standard_normal((4, D)).astype(np.float32))
    (secret / "wnids.txt").write_text("n01440764\n")
    os.symlink(secret, pool / "escape")  # inside the pool folder, pointing out of it
    given = root / "given"
    given.mkdir()
    seeds = rng.standard_normal((4, D)).astype(np.float32)
    for name in ("seeds.parquet", "more.parquet"):
        pq.write_table(pa.table({"emb": pa.FixedSizeListArray.from_arrays(pa.array(seeds.ravel()), D)}), given / name)
    np.save(given / "seeds.npy", seeds)
    return SimpleNamespace(root=root, pool=pool, secret=secret, given=given, seeds=seeds)


def _hostile(site):
    """(id, boolean SQL predicate, what the error names) -- each one must be refused."""
    s, p = site.secret, site.pool
    return [
        ("read_csv", f"uid IN (SELECT CAST(pw AS VARCHAR) FROM read_csv('{s}/passwd.csv'))", f"'{s}/passwd.csv'"),
        ("etc_passwd", "(SELECT count(*) FROM read_csv('/etc/passwd')) > 0", "'/etc/passwd'"),
        ("read_blob", "(SELECT count(*) FROM read_blob('/etc/passwd')) > 0", "'/etc/passwd'"),
        ("glob", "(SELECT count(*) FROM glob('/root/*')) > 0", "'/root/*'"),
        ("url", "(SELECT count(*) FROM read_parquet('http://127.0.0.1:9/x.parquet')) > 0", "'http://127.0.0.1:9/"),
        ("read_text", f"(SELECT count(*) FROM read_text('{s}/wnids.txt')) > 0", "wnids.txt'"),
        ("symlink_in_pool", f"(SELECT count(*) FROM read_text('{p}/escape/passwd.csv')) > 0", "escape/passwd.csv'"),
        ("dotdot", f"(SELECT count(*) FROM read_text('{p}/../secret/passwd.csv')) > 0", "secret/passwd.csv'"),
        ("sqlite_scan", f"(SELECT count(*) FROM sqlite_scan('{s}/x.db', 't')) > 0", "extension 'sqlite_scanner'"),
        ("typo_inet_operator", "original_width >>= 3", "extension 'inet'"),
        ("inet_type", "CAST('1.2.3.4' AS INET) IS NOT NULL", "extension 'inet'"),
        ("contaminated", f"NOT contaminated(l14_img, '{s}/eval.npy', 0.9)", f"'{s}/eval.npy' (argument eval)"),
        ("contaminated_via_link", f"contaminated(l14_img, '{p}/escape/eval.npy', 0.9)", "escape/eval.npy'"),
        ("nearest_centroid", f"nearest_centroid(l14_img, '{s}/cents.npy') = 0", "(argument centroids)"),
        ("target_centroids", f"0 IN (SELECT unnest(target_centroids('{s}/cents.npy', '{s}/*.npy')))",
         "(argument centroids)"),
        ("wordnet_hit", f"wordnet_hit([1440764], '{s}/wnids.txt')", "(argument wordnet_ids)"),
        ("clip_image", f"cosine(l14_img, clip_image('{s}/x.png', 'l14')) > 0", "x.png' (argument path)"),
    ]


CASES = [c[0] for c in _hostile(SimpleNamespace(secret="S", pool="P"))]


def _case(site, name):
    return next(c for c in _hostile(site) if c[0] == name)


def _invoke(*args, input=None):
    return CliRunner().invoke(cli, ["-q", *map(str, args)], input=input)


def _one_error(res, *needles):
    """Exit 1, exactly one `error:` line (containing every needle) and its hint, no traceback."""
    lines = res.output.strip().splitlines()
    errors = [x for x in lines if x.startswith("error: ")]
    assert res.exit_code == 1 and len(errors) == 1, res.output
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    i = lines.index(errors[0])
    assert lines[i + 1].startswith("  hint: ") and len(lines) == i + 2, res.output
    for n in needles:
        assert n in errors[0], (n, res.output)
    return errors[0]


def _rule(needle):
    return "extension" if "extension" in needle else "may read only the pool"


@pytest.mark.parametrize("name", CASES)
def test_filter_refused(site, name, tmp_path):
    _, pred, needle = _case(site, name)
    res = _invoke("query", "-", "--pool", site.pool, "-o", tmp_path / "x.npy",
                  input=f"SELECT uid FROM pool WHERE {pred}")
    line = _one_error(res, needle, _rule(needle), "filter 'stdin'")
    assert "extension" in needle or "a filter may read only the pool and the files given as its path parameters" in line
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.parametrize("name", CASES)
def test_sql_refused(site, name):
    _, pred, needle = _case(site, name)
    _one_error(_invoke("sql", f"SELECT uid FROM pool WHERE {pred}", "--pool", site.pool), needle, _rule(needle))


@pytest.mark.parametrize("name", CASES)
def test_knn_where_refused(site, name, tmp_path):
    _, pred, needle = _case(site, name)
    res = _invoke("knn", "--pool", site.pool, "--space", "l14_img", "--seeds", site.given / "seeds.npy", "-k", 3,
                  "--exact", "--where", pred, "-o", tmp_path / "near.npy")
    _one_error(res, needle, "extension" if "extension" in needle else "--where may read only the pool")


@pytest.mark.parametrize("stmt", ["COPY (SELECT 1) TO 'OUT'", "ATTACH 'OUT' AS x", "INSTALL inet", "LOAD inet",
                                  "SET enable_external_access = true", "RESET lock_configuration"])
def test_statements_other_than_select_are_one_error(site, stmt, tmp_path):
    """Refused by the statement check before the sandbox is even needed; nothing is written."""
    stmt = stmt.replace("OUT", str(tmp_path / "out.db"))
    _one_error(_invoke("query", "-", "--pool", site.pool, input=stmt), "filters may only read")
    _one_error(_invoke("sql", stmt, "--pool", site.pool), "filters may only read")
    assert not list(tmp_path.iterdir())


def test_rule_hint_says_how_to_allow_a_file(site):
    res = _invoke("query", "-", "--pool", site.pool, input=f"SELECT uid FROM read_csv('{site.secret}/passwd.csv')")
    _one_error(res)
    assert "pass the file as a path parameter" in res.output and "-p NAME FILE" in res.output
    res = _invoke("sql", "SELECT uid FROM pool WHERE original_width >>= 3", "--pool", site.pool)
    assert "is '>>=' a typo?" in res.output


def test_user_sql_sees_the_locked_settings(site):
    res = _invoke("sql", "SELECT current_setting('enable_external_access') AS a, current_setting('lock_configuration') "
                  "AS b, current_setting('autoinstall_known_extensions') AS c, current_setting('autoload_known_extensions') "
                  "AS d", "--pool", site.pool, "--format", "csv")
    assert res.exit_code == 0 and res.output.split() == ["a,b,c,d", "false,true,false,false"], res.output


def test_path_parameters_are_what_a_filter_may_read(site, tmp_path):
    """Declared path parameters allow a file, a folder (everything under it) or a glob; the same
    value through an undeclared parameter does not (only the header says what a filter reads)."""
    g = site.given
    count = "SELECT uid FROM pool WHERE (SELECT count(*) FROM read_parquet({})) = {}"
    for header, value, source, n in [
        ("-- @param f path\n", g / "seeds.parquet", "$f", 4),
        ("-- @param f path\n", g, "$f || '/seeds.parquet'", 4),  # a folder: any file under it
        ("-- @param f path\n", g / "*.parquet", "$f", 8),  # a glob: the pattern and its matches
    ]:
        res = _invoke("query", "-", "--pool", site.pool, "-p", "f", value, "-o", tmp_path / "a.npy", "--force",
                      input=header + count.format(source, n))
        assert res.exit_code == 0, res.output
        assert len(U.load(tmp_path / "a.npy")) == 200
    res = _invoke("query", "-", "--pool", site.pool, "-p", "f", g / "seeds.parquet",
                  input=count.format("$f", 4))  # undeclared: an 'auto' parameter is never a path
    _one_error(res, "seeds.parquet", "a filter may read only the pool")
    # a folder parameter allows what is under it, not its neighbours
    res = _invoke("query", "-", "--pool", site.pool, "-p", "f", g,
                  input="-- @param f path\nSELECT uid FROM pool, read_csv($f || '/../secret/passwd.csv')")
    _one_error(res, "/../secret/passwd.csv'")
    # dcdb sql: a header in the SQL declares its path parameters too
    res = _invoke("sql", "-", "--pool", site.pool, "-p", "s", g / "seeds.parquet", "--format", "csv",
                  input="-- @param s path\nSELECT count(*) AS n FROM read_parquet($s)")
    assert res.exit_code == 0 and res.output.split() == ["n", "4"], res.output
    # Python functions: a parameter's file is readable, the same file named literally is not
    res = _invoke("query", "-", "--pool", site.pool, "-p", "e", site.secret / "eval.npy", "-o", tmp_path / "b.npy",
                  input="-- @param e path\nSELECT uid FROM pool WHERE NOT contaminated(l14_img, $e, 0.99)")
    assert res.exit_code == 0, res.output


def test_builtin_filters_with_their_assets(site, tmp_path):
    """knn_seeds and decontaminate read their files through path parameters (the other sql/ filters
    run sandboxed in test_baselines, test_buckets, test_dedup and test_knn)."""
    from dcdb.engine import connect

    res = _invoke("query", "knn_seeds", "--pool", site.pool, "-p", "seeds", site.given / "seeds.parquet",
                  "-p", "k", 3, "-o", tmp_path / "near.npy")
    assert res.exit_code == 0, res.output
    con = connect(site.pool)  # a full connection: the same knn, no sandbox
    want = {r[0] for r in con.execute("SELECT uid FROM knn('l14_img', $s, 3)", {"s": site.seeds.tolist()}).fetchall()}
    assert set(U.to_hex(U.load(tmp_path / "near.npy"))) == want and len(want) > 3
    ev = site.given / "eval.npy"
    np.save(ev, np.load(site.given / "seeds.npy")[:2])
    res = _invoke("query", "decontaminate", "--pool", site.pool, "-p", "eval", ev, "-p", "threshold", -1,
                  "-o", tmp_path / "clean.npy")
    assert res.exit_code == 0 and len(U.load(tmp_path / "clean.npy")) == 0, res.output  # every row is >= -1
    # a parameter may name its file through a symlink: the file it names is what was given
    res = _invoke("query", "decontaminate", "--pool", site.pool, "-p", "eval", site.pool / "escape" / "eval.npy",
                  "-o", tmp_path / "clean2.npy")
    assert res.exit_code == 0 and len(U.load(tmp_path / "clean2.npy")) == 200, res.output


@pytest.mark.parametrize("name", CASES)
def test_connect_sandboxed(site, name):
    """dcdb.connect(pool, sandboxed=True): the same refusals, as DuckDB errors the connection's
    owner sees; dcdb.sandbox.refusal / take_error give the typed one."""
    from dcdb.engine import connect
    from dcdb.filters import take_error
    from dcdb.sandbox import refusal

    _, pred, needle = _case(site, name)
    con = connect(site.pool, sandboxed=True)
    with pytest.raises(duckdb.Error) as info:
        con.execute(f"SELECT uid FROM pool WHERE {pred}").fetchall()
    err = take_error(con) or refusal(con, info.value)
    assert isinstance(err, SandboxError) and needle in err.message, (err, info.value)
    assert "extension" in needle or "this sandboxed connection may read only the pool" in err.message


def test_connect_sandboxed_settings_are_locked_and_allowed_paths_work(site):
    from dcdb.engine import connect

    con = connect(site.pool, sandboxed=True, allowed_paths=[site.secret / "passwd.csv", site.given])
    assert con.execute(f"SELECT pw FROM read_csv('{site.secret}/passwd.csv')").fetchall() == [("hunter2",)]
    assert con.execute(f"SELECT count(*) FROM read_parquet('{site.given}/*.parquet')").fetchall() == [(8,)]
    assert con.execute("SELECT count(*) FROM pool WHERE NOT contaminated(l14_img, $e, 0.99)",
                       {"e": str(site.given / "eval.npy")}).fetchall()[0][0] >= 0
    for setting in ("enable_external_access = true", "autoload_known_extensions = true",
                    "autoinstall_known_extensions = true", "allowed_directories = ['/']", "lock_configuration = false"):
        with pytest.raises(duckdb.InvalidInputException, match="locked"):
            con.execute(f"SET {setting}")
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("RESET enable_external_access")
    with pytest.raises(duckdb.PermissionException):
        con.execute("SELECT * FROM read_csv('/etc/passwd')")
    # the default connection stays a full one (its owner's), and allowed_paths needs sandboxed=True
    full = connect(site.pool)
    assert full.execute(f"SELECT pw FROM read_csv('{site.secret}/passwd.csv')").fetchall() == [("hunter2",)]
    with pytest.raises(UsageError, match="sandboxed=True"):
        connect(site.pool, allowed_paths=[site.given])


@pytest.fixture
def extension_server():
    """A local extension repository that answers 404 and records every request: the stand-in for
    DuckDB's network repository (nothing leaves the machine)."""
    hits: list[str] = []

    class Repo(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 -- http.server's name
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *_args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Repo)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", hits
    srv.shutdown()
    srv.server_close()
    thread.join()


def test_no_extension_is_installed_or_loaded(site, tmp_path, extension_server):
    """Where DuckDB would download an extension (an empty extension folder, a repository it can
    reach), the sandbox refuses before any request; the same query on a full connection asks."""
    from dcdb.engine import connect
    from dcdb.sandbox import apply, refusal

    url, hits = extension_server

    def prepared():
        con = connect(site.pool)
        con.execute(f"SET extension_directory = '{tmp_path / 'ext'}'")
        con.execute(f"SET autoinstall_extension_repository = '{url}'")
        con.execute(f"SET custom_extension_repository = '{url}'")
        return con

    con = prepared()
    apply(con, open_pool(site.pool), who="filter 'typo'")
    for sql in ("SELECT uid FROM pool WHERE original_width >>= 3", f"SELECT * FROM sqlite_scan('{tmp_path}/x.db', 't')",
                "SELECT CAST('1.2.3.4' AS INET)"):
        with pytest.raises(duckdb.Error) as info:
            con.execute(sql)
        err = refusal(con, info.value)
        assert isinstance(err, SandboxError) and "may not install or load extensions" in err.message, info.value
    for sql in ("INSTALL inet", "LOAD inet", f"INSTALL inet FROM '{url}'"):
        with pytest.raises(duckdb.PermissionException):
            con.execute(sql)
    assert hits == []
    with pytest.raises(duckdb.Error, match="inet"):  # control: unsandboxed, DuckDB reaches for the extension
        prepared().execute("SELECT uid FROM pool WHERE original_width >>= 3")
    assert hits and all("inet" in h for h in hits)


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory):
    from dcdb.ingest.pool import ingest
    from dcdb.demo.synth import synth_pool

    root = tmp_path_factory.mktemp("sandbox_buckets")
    synth_pool(root / "src", rows=64, shards=2, seed=5, jobs=1)
    ingest(root / "src", root / "pool", jobs=1, buckets=4)
    (root / "side.csv").write_text("a\n1\n")
    return root


def test_ray_task_connection_is_sandboxed(bucketed, tmp_path):
    """The connection a --engine ray task opens (distributed._connect) and the tasks themselves:
    the pool and the filter's path parameters only; refusals come back as SandboxError data."""
    from dcdb.dist import execute as distributed
    from dcdb.ingest.buckets import pool_buckets
    from dcdb.query import parse_filter
    from dcdb.sandbox import refusal

    pool, side = bucketed / "pool", bucketed / "side.csv"
    view, con = distributed._connect(str(pool), [0, 2], [str(side)], "t")
    assert con.execute("SELECT count(*) FROM pool").fetchall()[0][0] == view.rows
    assert con.execute(f"SELECT a FROM read_csv('{side}')").fetchall() == [(1,)]
    with pytest.raises(duckdb.PermissionException) as info:
        con.execute("SELECT * FROM read_csv('/etc/passwd')")
    err = refusal(con, info.value)
    assert isinstance(err, SandboxError) and err.message.startswith("filter 't' tried to read '/etc/passwd'")
    with pytest.raises(duckdb.InvalidInputException, match="locked"):
        con.execute("SET enable_external_access = true")
    bits = int(pool_buckets(open_pool(pool))["bits"])
    out = distributed.query_task(str(pool), [1], "SELECT uid FROM pool WHERE original_width >>= 3", {},
                                 str(tmp_path), None, None, "t", bits, None, [])
    assert out["ok"] is False and out["error"] == "SandboxError" and "'inet'" in out["message"], out
    out = distributed.query_task(str(pool), [1], f"SELECT uid FROM pool WHERE (SELECT count(*) FROM "
                                 f"read_csv('{side}')) = 1", {}, str(tmp_path), None, None, "t", bits, None, [])
    assert out["ok"] is False and out["error"] == "SandboxError" and "side.csv" in out["message"], out
    # the whole run (serial engine: the same tasks in-process): driver and tasks allow the path parameter
    sql = "-- @param f path\nSELECT uid FROM pool WHERE (SELECT count(*) FROM read_csv($f)) = 1"
    res = distributed.run_distributed(open_pool(pool), parse_filter("q", sql, None), {"f": str(side)}, engine="serial",
                                      work_dir=tmp_path / "work")
    assert res.rows == 64
    with pytest.raises(SandboxError, match="filter 'q' tried to read '/etc/passwd'"):
        distributed.run_distributed(open_pool(pool), parse_filter("q", "SELECT uid FROM pool WHERE uid IN (SELECT "
                                    "column0 FROM read_csv('/etc/passwd', header = false))", None), {},
                                    engine="serial", work_dir=tmp_path / "work2")
