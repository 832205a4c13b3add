"""Outputs are regular files only, and say what they are (issue 12, items 4 and 6).

A path that exists and is not a regular file (device, FIFO, socket, folder, a symlink to any of
those, a dangling symlink) is refused by every command with ``-o``, whatever ``--force`` says, and
is left as it was; a symlink to a regular file is written through. The suffix of an output names
its format. Special files are real ones (``os.mkfifo``, a bound unix socket, ``os.mknod`` of a
character device in tmp_path: tests run as root, and root could replace ``/dev/null`` itself).
"""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dcdb import uids as U
from dcdb.cli import cli
from dcdb.errors import OutputError
from dcdb.io import TMP_MARK, atomic_path

KINDS = ["fifo", "socket", "dir", "chardev", "link_chardev", "link_fifo", "link_dir", "link_dangling"]


def run(args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


def make_special(kind: str, path: Path) -> None:
    """Create ``path`` as a non-regular file of ``kind`` (a ``link_*`` points to ``path.target``)."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "chardev":  # what /dev/null is: major 1, minor 3
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("creating a character device needs root (CAP_MKNOD)")
    elif kind == "socket":
        cwd = os.getcwd()
        os.chdir(path.parent)  # a unix socket path must be short: bind the bare name
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.bind(path.name)  # the socket file stays after close
        finally:
            os.chdir(cwd)
    elif kind.startswith("link_"):
        target = path.with_name(path.name + ".target")
        if kind != "link_dangling":
            make_special(kind[len("link_"):], target)
        os.symlink(target.name, path)
    else:  # pragma: no cover
        raise ValueError(kind)


def state(path: Path) -> tuple:
    """What ``path`` is: its type and inode, a symlink's text, its target's type and inode."""
    st = os.lstat(path)
    link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    try:
        t = os.stat(path)
        target = (stat.S_IFMT(t.st_mode), t.st_ino, t.st_rdev)
    except OSError:
        target = None
    return stat.S_IFMT(st.st_mode), st.st_ino, link, target


def assert_one_error(res, *words: str) -> None:
    """A refusal: non-zero exit, ``error:`` and ``hint:`` lines on stderr, no traceback."""
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.splitlines()
    assert lines and lines[0].startswith("error: ") and any(ln.startswith("  hint: ") for ln in lines), res.stderr
    assert "Traceback" not in res.output
    for w in words:
        assert w in res.stderr, res.stderr


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if TMP_MARK in p.name]


@pytest.fixture(scope="module")
def pool(_small_pool_template) -> Path:
    """The shared 200-row pool, read only (tests that --save use ``small_pool``)."""
    return _small_pool_template


@pytest.fixture
def uid_file(pool, tmp_path) -> Path:
    out = tmp_path / "u.npy"
    assert run(["-q", "query", "-", "--pool", pool, "-o", out], input="SELECT uid FROM pool LIMIT 20").exit_code == 0
    return out


# ----------------------------------------------------------------- item 4: regular files only


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("kind", KINDS)
def test_query_never_replaces_what_is_not_a_regular_file(pool, tmp_path, kind, force):
    out = tmp_path / "out.npy"
    make_special(kind, out)
    before = state(out)
    res = run(["query", "no_filter", "--pool", pool, "-o", out] + (["--force"] if force else []))
    word = "does not exist" if kind == "link_dangling" else "directory" if kind.endswith("dir") else "not a regular"
    if kind.startswith("link_") and kind != "link_dangling":
        word = "symlink"
    assert_one_error(res, word)
    assert state(out) == before
    assert not (tmp_path / "out.npy.json").exists() and no_temp_files(tmp_path)


def test_refusal_names_the_kind(pool, tmp_path):
    for kind, words in [("fifo", "FIFO"), ("socket", "socket"), ("chardev", "character device"),
                        ("link_chardev", "which is a character device")]:
        out = tmp_path / f"{kind}.npy"
        make_special(kind, out)
        assert_one_error(run(["query", "no_filter", "--pool", pool, "-o", out, "--force"]), words, "--force")


def test_sidecar_manifest_follows_the_rule(pool, tmp_path):
    for kind in ("fifo", "chardev", "link_dangling", "dir"):
        out = tmp_path / f"{kind}.npy"
        side = tmp_path / f"{kind}.npy.json"
        make_special(kind, side)
        before = state(side)
        assert_one_error(run(["query", "no_filter", "--pool", pool, "-o", out, "--force"]), "manifest")
        assert state(side) == before and not out.exists()
    assert no_temp_files(tmp_path)


def test_symlink_to_a_regular_file_is_written_through(pool, tmp_path):
    real, link = tmp_path / "real.npy", tmp_path / "link.npy"
    real.write_bytes(b"old")
    os.symlink("real.npy", link)
    res = run(["query", "no_filter", "--pool", pool, "-o", link])
    assert_one_error(res, "already exists", "--force")
    assert real.read_bytes() == b"old"
    # the sidecar may be a link too: both targets are replaced, both links kept
    (tmp_path / "real.json").write_text("{}")
    os.symlink("real.json", tmp_path / "link.npy.json")
    res = run(["-q", "query", "no_filter", "--pool", pool, "-o", link, "--force"])
    assert res.exit_code == 0, res.output
    assert os.readlink(link) == "real.npy" and os.readlink(tmp_path / "link.npy.json") == "real.json"
    arr = np.load(real)
    assert arr.dtype == U.UID_DTYPE and len(arr) == 200
    assert json.loads((tmp_path / "real.json").read_text())["rows"] == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.npy", "link.npy.json", "real.json", "real.npy"]


def test_atomic_path_checks_again_before_the_rename(tmp_path):
    p = tmp_path / "x.bin"
    with pytest.raises(OutputError, match="FIFO"):
        with atomic_path(p) as tmp:
            tmp.write_bytes(b"data")
            os.mkfifo(p)  # appeared while the file was written
    assert stat.S_ISFIFO(os.lstat(p).st_mode) and no_temp_files(tmp_path)
    a, b, link = tmp_path / "a", tmp_path / "b", tmp_path / "link"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    os.symlink("a", link)
    with pytest.raises(OutputError, match="changed while it was written"):
        with atomic_path(link) as tmp:
            tmp.write_bytes(b"new")
            link.unlink()
            os.symlink("b", link)
    assert a.read_bytes() == b"a" and b.read_bytes() == b"b" and no_temp_files(tmp_path)


def _every_output(tmp_path: Path, pool: Path, uid_file: Path) -> dict[str, tuple[list, Path]]:
    """Command line and the path it must refuse, for each command and flag that writes a path."""
    f = tmp_path / "special"
    seeds = tmp_path / "seeds.npy"
    np.save(seeds, np.random.default_rng(0).standard_normal((2, 768)).astype(np.float32))
    knn = ["knn", "--pool", pool, "--space", "l14_img", "--seeds", seeds, "-k", "2", "--force"]
    sub = pool / "subsets"
    return {
        "query -o": (["query", "no_filter", "--pool", pool, "-o", f, "--force"], f),
        "query --reshard": (["query", "no_filter", "--pool", pool, "--reshard", f, "--force"], f),
        "query --save npy": (["query", "no_filter", "--pool", pool, "--save", "s", "--force"], sub / "s.npy"),
        "query --save parquet": (["query", "no_filter", "--pool", pool, "--save", "s", "--force"], sub / "s.parquet"),
        "query --save json": (["query", "no_filter", "--pool", pool, "--save", "s", "--force"], sub / "s.json"),
        "sql -o": (["sql", "SELECT 1 AS a", "--pool", pool, "-o", f, "--format", "csv", "--force"], f),
        "union -o": (["subsets", "union", uid_file, uid_file, "-o", f, "--force"], f),
        "intersect -o": (["subsets", "intersect", uid_file, uid_file, "-o", f, "--force"], f),
        "minus -o": (["subsets", "minus", uid_file, uid_file, "-o", f, "--force"], f),
        "union --save": (["subsets", "union", uid_file, uid_file, "--pool", pool, "--save", "s", "--force"],
                         sub / "s.npy"),
        "knn -o": ([*knn, "-o", f], f),
        "knn -o sidecar": ([*knn, "-o", tmp_path / "k.npy"], tmp_path / "k.npy.json"),
        "knn --pairs": ([*knn, "--pairs", f], f),
        "knn --save": ([*knn, "--save", "s"], sub / "s.npy"),
        "reshard -o": (["reshard", "--pool", pool, "--uids", uid_file, "-o", f, "--overwrite"], f),
        "train -o": (["train", "--data", tmp_path, "-o", f], f),
        "eval -o": (["eval", uid_file, "--tasks", tmp_path, "-o", f], f),
        "leaderboard -o": (["leaderboard", tmp_path, "-o", f], f),
        "leaderboard --plot": (["leaderboard", tmp_path, "--plot", f], f),
        "demo": (["demo", f, "--force"], f),
    }


OUTPUT_FLAGS = ["query -o", "query --reshard", "query --save npy", "query --save parquet", "query --save json",
                "sql -o", "union -o", "intersect -o", "minus -o", "union --save", "knn -o", "knn -o sidecar",
                "knn --pairs", "knn --save", "reshard -o", "train -o", "eval -o", "leaderboard -o",
                "leaderboard --plot", "demo"]


@pytest.mark.parametrize("case", OUTPUT_FLAGS)
def test_every_output_flag_refuses_a_fifo(small_pool, uid_file, tmp_path, case):
    cases = _every_output(tmp_path, small_pool, uid_file)
    assert sorted(cases) == sorted(OUTPUT_FLAGS)
    args, path = cases[case]
    path.parent.mkdir(exist_ok=True)
    os.mkfifo(path)
    res = run(args)
    assert_one_error(res, "FIFO")
    assert stat.S_ISFIFO(os.lstat(path).st_mode)
    assert not (small_pool / "subsets" / "s.npy").is_file() and no_temp_files(tmp_path)


def test_reshard_output_folder_must_be_a_folder(pool, uid_file, tmp_path):
    reg = tmp_path / "reg"
    reg.write_bytes(b"keep")
    assert_one_error(run(["reshard", "--pool", pool, "--uids", uid_file, "-o", reg, "--overwrite"]), "is a file")
    assert reg.read_bytes() == b"keep"
    for kind in ("link_dangling", "chardev"):
        out = tmp_path / kind
        make_special(kind, out)
        before = state(out)
        assert_one_error(run(["reshard", "--pool", pool, "--uids", uid_file, "-o", out, "--overwrite"]))
        assert state(out) == before


FOLDER_OUTPUTS = ["world", "synth pool", "ingest", "reshard -o", "train -o", "eval -o", "demo"]


def _folder_outputs(tmp_path: Path, pool: Path, uid_file: Path, src: Path, f: Path) -> dict[str, list]:
    """Command line writing into the folder ``f``, each with its --force/--overwrite where it has one."""
    return {
        "world": ["world", f, "--samples", "20", "--force"],
        "synth pool": ["synth", "pool", f, "--rows", "10", "--shards", "1", "--force"],
        "ingest": ["ingest", src, f],
        "reshard -o": ["reshard", "--pool", pool, "--uids", uid_file, "-o", f, "--overwrite"],
        "train -o": ["train", "--data", tmp_path, "-o", f],
        "eval -o": ["eval", uid_file, "--tasks", tmp_path, "-o", f, "--overwrite"],
        "demo": ["demo", f, "--force"],
    }


@pytest.mark.parametrize("kind, word", [("file", "is a file"), ("fifo", "FIFO"),
                                        ("link_dangling", "does not exist"), ("link_fifo", "FIFO")])
def test_every_output_folder_is_checked_by_one_rule(pool, uid_file, tiny_src, tmp_path, kind, word):
    """dcdb.io.prepare_folder: whatever the command and its --force, a path that is not a folder
    (or a symlink to one) is refused with one error naming what it is, and left as it was."""
    for case in FOLDER_OUTPUTS:
        f = tmp_path / f"out-{case.replace(' ', '_')}"
        if kind == "file":
            f.write_bytes(b"keep")
        else:
            make_special(kind, f)
        before = state(f)
        args = _folder_outputs(tmp_path, pool, uid_file, tiny_src, f)[case]
        res = run(args)
        assert_one_error(res, word, str(f))
        assert state(f) == before, case
    assert sorted(_folder_outputs(tmp_path, pool, uid_file, tiny_src, tmp_path)) == sorted(FOLDER_OUTPUTS)


def test_prepare_folder_refuses_clears_and_creates(tmp_path):
    from dcdb.io import LOCK_NAME, prepare_folder

    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_bytes(b"")
    (out / f"x{TMP_MARK}1-0000abcd").write_bytes(b"")
    assert prepare_folder(out, not_empty="pass --force") == out  # a lock and temps are not contents
    (out / "mine.txt").write_text("keep")
    (out / "old").mkdir()
    (out / "old" / "a.tar").write_bytes(b"x")
    with pytest.raises(OutputError, match="is not empty") as exc:
        prepare_folder(out, what="world output", not_empty="choose an empty folder or pass --force to replace it")
    assert "--force" in exc.value.hint
    link = tmp_path / "link"
    os.symlink("out", link)  # --force through a symlink to a folder: its contents go, the link stays
    prepare_folder(link, force=True, not_empty="pass --force", clear=lambda p: p.name == "old")
    assert sorted(p.name for p in out.iterdir() if TMP_MARK not in p.name) == [LOCK_NAME, "mine.txt"]
    assert link.is_symlink()
    new = tmp_path / "a" / "b"
    assert prepare_folder(new, create=False) == new and not (tmp_path / "a").exists()  # checks only
    prepare_folder(new, subfolders=("x/y",))
    assert (new / "x" / "y").is_dir() and no_temp_files(tmp_path / "a")
    with pytest.raises(OutputError, match="cannot create run folder"):
        prepare_folder(out / "mine.txt" / "run", create=False, what="run folder")


# ------------------------------------------------------------------ item 6: formats by suffix


@pytest.mark.parametrize(
    "args, error",
    [
        (["-o", "out.csv"], "cannot tell the format of output"),
        (["-o", "x.npy", "--format", "parquet"], "ends in .npy but --format is parquet"),
        (["-o", "x.parquet", "--format", "npy"], "ends in .parquet but --format is npy"),
        (["-o", "x.txt", "--format", "npy"], "ends in .txt but --format is npy"),
        (["--format", "parquet"], "--format parquet needs -o FILE"),
        (["--format", "npy"], "--format npy needs -o FILE"),
    ],
)
def test_query_refuses_a_suffix_that_is_not_the_format(pool, tmp_path, args, error):
    args = [str(tmp_path / a) if "." in a else a for a in args]
    res = run(["query", "no_filter", "--pool", pool, *args])
    assert_one_error(res, error)
    assert res.stdout == "" and list(tmp_path.iterdir()) == []


def test_query_formats_from_suffix_or_flag(pool, tmp_path):
    want = U.to_hex(U.load(_query(pool, tmp_path / "ref.npy")))
    assert np.load(_query(pool, tmp_path / "plain")).dtype == U.UID_DTYPE  # no suffix: npy, as before
    assert pq.read_table(_query(pool, tmp_path / "a.parquet")).column("uid").to_pylist() == want
    assert pq.read_table(_query(pool, tmp_path / "a.PARQUET")).column("uid").to_pylist() == want
    assert _query(pool, tmp_path / "a.txt").read_text().split() == want
    # an explicit --format with a suffix of no format of ours is what the user asked for
    assert _query(pool, tmp_path / "uids.lst", "--format", "txt").read_text().split() == want
    assert _query(pool, tmp_path / "b.txt", "--format", "txt").read_text().split() == want


def _query(pool, out, *extra):
    res = run(["-q", "query", "no_filter", "--pool", pool, "-o", out, *extra])
    assert res.exit_code == 0, res.output
    return out


def test_knn_and_subsets_take_the_format_from_the_suffix(pool, uid_file, tmp_path):
    want = U.to_hex(U.load(uid_file))
    assert_one_error(run(["subsets", "union", uid_file, uid_file, "-o", tmp_path / "u.csv"]), ".csv")
    res = run(["-q", "subsets", "union", uid_file, uid_file, "-o", tmp_path / "u.txt"])
    assert res.exit_code == 0 and (tmp_path / "u.txt").read_text().split() == want
    seeds = tmp_path / "seeds.npy"
    np.save(seeds, np.random.default_rng(0).standard_normal((2, 768)).astype(np.float32))
    knn = ["-q", "knn", "--pool", pool, "--space", "l14_img", "--seeds", seeds, "-k", "3"]
    assert_one_error(run([*knn, "-o", tmp_path / "near.csv"]), "cannot tell the format")
    assert not (tmp_path / "near.csv").exists()
    assert run([*knn, "-o", tmp_path / "near.npy"]).exit_code == 0
    assert run([*knn, "-o", tmp_path / "near.parquet"]).exit_code == 0
    got = pq.read_table(tmp_path / "near.parquet").column("uid").to_pylist()
    assert got == U.to_hex(np.load(tmp_path / "near.npy")) and len(got) >= 3


SQL = "SELECT uid, original_width AS w FROM pool ORDER BY uid LIMIT 5"


def test_sql_writes_the_format_its_suffix_names(pool, tmp_path):
    csv = run(["sql", SQL, "--pool", pool, "--format", "csv"]).stdout
    ndjson = run(["sql", SQL, "--pool", pool, "--format", "json"]).stdout
    table = run(["sql", SQL, "--pool", pool]).stdout
    for name, want in [("r.csv", csv), ("r.json", ndjson), ("r.jsonl", ndjson), ("r.ndjson", ndjson),
                       ("r.txt", table)]:
        res = run(["sql", SQL, "--pool", pool, "-o", tmp_path / name])
        assert res.exit_code == 0 and res.stdout == "", res.output
        assert (tmp_path / name).read_text() == want, name
    assert csv.splitlines()[0] == "uid,w" and len(csv.splitlines()) == 6
    assert [json.loads(x)["w"] for x in ndjson.splitlines()] == [int(x.split(",")[1]) for x in csv.splitlines()[1:]]
    assert "┌" in table and "uid" in table
    assert run(["sql", SQL, "--pool", pool, "-o", tmp_path / "r.parquet"]).exit_code == 0
    assert pq.read_table(tmp_path / "r.parquet").column("w").to_pylist() == [
        int(x.split(",")[1]) for x in csv.splitlines()[1:]]
    # an explicit --format names a file of no known suffix
    assert run(["sql", SQL, "--pool", pool, "-o", tmp_path / "r.dat", "--format", "csv"]).exit_code == 0
    assert (tmp_path / "r.dat").read_text() == csv
    # EXPLAIN goes to a file too
    assert run(["sql", f"EXPLAIN {SQL}", "--pool", pool, "-o", tmp_path / "plan.txt"]).exit_code == 0
    assert (tmp_path / "plan.txt").read_text().strip()


@pytest.mark.parametrize(
    "out, args, error",
    [
        ("r.dat", [], "cannot tell the format of output"),
        ("noext", [], "cannot tell the format of output"),
        ("r.csv", ["--format", "json"], "ends in .csv (format csv) but --format is json"),
        ("r.parquet", ["--format", "csv"], "but --format is csv"),
        ("r.txt", ["--format", "csv"], "but --format is csv"),
        (None, ["--format", "parquet"], "--format parquet needs -o FILE"),
        ("plan.csv", [], "EXPLAIN gives a plan"),
    ],
)
def test_sql_refuses_an_unknown_or_contradicting_suffix(pool, tmp_path, out, args, error):
    sql = f"EXPLAIN {SQL}" if out == "plan.csv" else SQL
    existing = tmp_path / (out or "none")
    existing.write_bytes(b"keep")
    res = run(["sql", sql, "--pool", pool, *(["-o", existing] if out else []), *args, "--force"])
    assert_one_error(res, error)
    assert existing.read_bytes() == b"keep" and res.stdout == ""


def test_sql_text_on_stdout_ends_with_one_newline(pool):
    res = run(["sql", "SELECT 1 AS a", "--pool", pool, "--format", "csv"])
    assert res.exit_code == 0 and res.stdout == "a\n1\n"
    res = run(["sql", "SELECT 1 AS a UNION ALL SELECT 2", "--pool", pool, "--format", "json"])
    assert res.exit_code == 0 and res.stdout == '{"a":1}\n{"a":2}\n'
    res = run(["sql", "SELECT 1 AS a WHERE false", "--pool", pool, "--format", "json"])
    assert res.exit_code == 0 and res.stdout == ""
    res = run(["sql", "SELECT 1 AS a", "--pool", pool])
    assert res.exit_code == 0 and res.stdout.endswith("┘\n")
