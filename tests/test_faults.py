"""Real faults (issue 12, items 5 and 8): a full disk (a small tmpfs), a read-only pool (a read-only
bind mount: root ignores chmod), damaged Lance files, processes killed by SIGKILL at a chosen point,
and a second process writing the same pool or output folder. Each must end in one ``error:`` line
with a hint and a non-zero exit, leave nothing half-written and the pool as it was, and a re-run
must finish the job.

Mounting needs root (or CAP_SYS_ADMIN); where it is refused those tests are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dcdb.cli import cli
from dcdb.io import KILL_ENV, LOCK_NAME, TMP_MARK

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------- helpers


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, ["-q", *args], input=input)


def run_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m dcdb ARGS`` in a real process (its stderr as the user sees it)."""
    return subprocess.run([sys.executable, "-m", "dcdb", "-q", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT, timeout=120, check=False)


def assert_one_error(code: int, stderr: str, *needles: str) -> str:
    """Exit non-zero, exactly one ``error:`` line followed by a hint, no traceback, no panic."""
    assert code not in (0, None), stderr
    lines = stderr.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert lines[errors[0] + 1].startswith("  hint: "), stderr
    for bad in ("Traceback", "panicked", "stack backtrace", "RUST_BACKTRACE"):
        assert bad not in stderr, stderr
    for needle in needles:
        assert needle in stderr, stderr
    return lines[errors[0]]


def files_of(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def temps_in(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if TMP_MARK in p.name or ".tmp-" in p.name]


def _mount(*args: str) -> None:
    res = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount here ({(res.stderr or res.stdout).strip()}): needs root or CAP_SYS_ADMIN")


@pytest.fixture
def tmpfs(tmp_path):
    """Factory: ``tmpfs(size) -> Path`` of a fresh tmpfs of that size (``"512k"``); unmounted after."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d))
        mounted.append(d)
        return d

    yield make
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=False)


def grow(fs: Path, size: str) -> None:
    """Free space: make the tmpfs larger."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(fs)], check=True)


def fill(fs: Path) -> None:
    """Fill the file system until it is full."""
    with open(fs / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while f.write(b"\0" * 4096):
            pass


@pytest.fixture
def read_only():
    """Factory: ``read_only(folder)`` bind-mounts ``folder`` read-only onto itself (root cannot write
    it either); unmounted after."""
    mounted: list[Path] = []

    def make(folder: Path) -> Path:
        _mount("--bind", str(folder), str(folder))
        mounted.append(folder)
        _mount("-o", "remount,bind,ro", str(folder))
        return folder

    yield make
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=False)


def pool_rows(pool: Path) -> list[tuple]:
    """uid and one embedding of every row, through the pool view (a real read of the pool)."""
    from dcdb.engine import connect

    return connect(pool).execute("SELECT uid, b32_img[1], l14_txt[7] FROM pool").fetchall()


def uids_file(pool: Path, path: Path) -> Path:
    """A Parquet keyed by the pool's uids with one extra column (for ``annotate --from``)."""
    uids = pa.concat_tables([pq.read_table(p, columns=["uid"]) for p in sorted((pool / "metadata").glob("*.parquet"))])
    pq.write_table(uids.append_column("score_x", pa.array(np.arange(uids.num_rows, dtype=np.float64))), path)
    return path


@contextlib.contextmanager
def lock_held_elsewhere(folder: Path):
    """Another real process holds the write lock of ``folder`` until the block ends (SIGKILL)."""
    code = ("import sys, time\nfrom dcdb.io import write_lock\n"
            "with write_lock(sys.argv[1], create=True):\n    print('locked', flush=True)\n    time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


# ------------------------------------------------------------------------- item 5: disk full


def test_ingest_disk_full_is_one_error_and_the_rerun_finishes(small_src, small_pool, tmpfs):
    fs = tmpfs("512k")  # the pool needs ~1.2 MB
    pool = fs / "pool"
    res = run("ingest", str(small_src), str(pool), "-j", "1")
    line = assert_one_error(res.exit_code, res.stderr, "no space left", str(pool), "re-run the same command")
    assert line.startswith("error: no space left on the device while writing pool")
    assert temps_in(pool) == [] and not (pool / LOCK_NAME).exists()
    lance_files = {p.name for p in pool.glob("embeddings/*.lance/data/*")}
    journaled = "".join(p.read_text() for p in pool.glob(".ingest/shards/*.json"))
    assert all(name in journaled for name in lance_files)  # no half Lance file of the failed shard
    before = files_of(pool)
    res = run("ingest", str(small_src), str(pool), "-j", "1")  # the disk is still full
    assert_one_error(res.exit_code, res.stderr, "no space left")
    assert files_of(pool) == before  # the unfinished pool is as the first run left it
    grow(fs, "8m")
    res = run("ingest", str(small_src), str(pool), "-j", "1")
    assert res.exit_code == 0, res.output
    assert pool_rows(pool) == pool_rows(small_pool)


def test_query_and_sql_output_on_a_full_disk_keep_the_earlier_output(small_pool, tmpfs):
    fs = tmpfs("64k")
    out = fs / "all.txt"
    assert run("query", "no_filter", "--pool", str(small_pool), "-o", str(out)).exit_code == 0
    before = files_of(fs)
    fill(fs)
    before["filler"] = files_of(fs)["filler"]
    res = run("query", "no_filter", "--pool", str(small_pool), "-o", str(out), "--force")
    assert_one_error(res.exit_code, res.stderr, "no space left", str(out), "free space")
    assert files_of(fs) == before  # the earlier output and its manifest, byte for byte; no temp
    res = run("sql", "SELECT uid, text FROM pool", "--pool", str(small_pool), "--format", "csv", "-o", str(fs / "t.csv"))
    assert_one_error(res.exit_code, res.stderr, "no space left", "t.csv")
    assert files_of(fs) == before


def test_save_on_a_full_disk_leaves_the_pool_unchanged(small_pool, tmp_path, tmpfs):
    fs = tmpfs("4m")
    pool = fs / "pool"
    shutil.copytree(small_pool, pool)
    extra = uids_file(pool, tmp_path / "extra.parquet")
    np.save(tmp_path / "seeds.npy", np.ones((2, 512), np.float32))
    fill(fs)
    before = files_of(pool)
    for args in (["query", "no_filter", "--save", "everything"],
                 ["knn", "--space", "b32_img", "--seeds", str(tmp_path / "seeds.npy"), "-k", "50", "--save", "near"],
                 ["annotate", "--from", str(extra)]):
        res = run(*args, "--pool", str(pool))
        assert_one_error(res.exit_code, res.stderr, "no space left", str(pool), "unchanged")
        assert files_of(pool) == before, args
    (fs / "filler").unlink()
    assert run("query", "no_filter", "--pool", str(pool), "--save", "everything").exit_code == 0
    assert (pool / "subsets" / "everything.npy").is_file()


@pytest.fixture(scope="module")
def shard_world(tmp_path_factory) -> Path:
    """A tiny img2dataset world (60 samples in 2 tars) ingested with its shards indexed."""
    from dcdb.ingest.pool import ingest
    from dcdb.shards.index import index_shards
    from dcdb.demo.world import build_world

    root = tmp_path_factory.mktemp("fault_world")
    build_world(root / "w", workers=1, samples=60, concepts=4, seed=5, shard_size=30, teacher_samples=10,
                eval_per_class=1, retrieval_samples=1)
    ingest(root / "w" / "metadata", root / "pool", jobs=1)
    index_shards(root / "pool", root / "w" / "shards", jobs=1, log=lambda m: None)
    return root


def test_reshard_on_a_full_disk_is_one_error_and_the_rerun_finishes(shard_world, tmp_path, tmpfs):
    pool = shard_world / "pool"
    uids = tmp_path / "all.npy"
    assert run("query", "no_filter", "--pool", str(pool), "-o", str(uids)).exit_code == 0
    ref = tmp_path / "ref"
    assert run("reshard", "--pool", str(pool), "--uids", str(uids), "-o", str(ref), "--shard-size", "10",
               "-j", "1").exit_code == 0
    fs = tmpfs("64k")  # the shards need ~300 kB
    out = fs / "out"
    args = ["reshard", "--pool", str(pool), "--uids", str(uids), "-o", str(out), "--shard-size", "10", "-j", "1"]
    res = run(*args)
    assert_one_error(res.exit_code, res.stderr, "no space left", str(out), "re-run the same command")
    assert temps_in(out) == [] and not (out / LOCK_NAME).exists()
    grow(fs, "4m")
    res = run(*args)
    assert res.exit_code == 0, res.output
    want = {k: v for k, v in files_of(ref).items() if k not in ("meta.json", ".dcdb-reshard.json")}
    got = {k: v for k, v in files_of(out).items() if k not in ("meta.json", ".dcdb-reshard.json")}
    assert got == want


# ------------------------------------------------------------------------ item 5: read-only


@pytest.mark.parametrize("args", [
    ["query", "no_filter", "--save", "s"],
    ["subsets", "union", "{pool}/../a.npy", "{pool}/../a.npy", "--save", "u"],
    ["knn", "--space", "b32_img", "--seeds", "{pool}/../seeds.npy", "-k", "2", "--save", "near"],
    ["annotate", "--from", "{pool}/../extra.parquet"],
    ["annotate", "--drop", "nothing"],
    ["dedup", "--space", "b32_img", "--clusters", "2"],
    ["index", "--space", "b32_img", "--kind", "ivf_pq", "--partitions", "2"],
], ids=lambda a: " ".join(a[:2]))
def test_read_only_pool_refuses_writes_with_one_line_and_still_answers_reads(small_pool, tmp_path, read_only, args):
    assert run("query", "no_filter", "--pool", str(small_pool), "-o", str(tmp_path / "a.npy")).exit_code == 0
    np.save(tmp_path / "seeds.npy", np.ones((1, 512), np.float32))
    uids_file(small_pool, tmp_path / "extra.parquet")
    read_only(small_pool)
    before = files_of(small_pool)
    res = run(*[a.format(pool=small_pool) for a in args], "--pool", str(small_pool))
    assert_one_error(res.exit_code, res.stderr, f"cannot write pool {str(small_pool)!r}", "read-only")
    assert files_of(small_pool) == before
    res = run("query", "no_filter", "--pool", str(small_pool), "-o", str(tmp_path / "b.npy"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b.npy").read_bytes() == (tmp_path / "a.npy").read_bytes()


def test_read_only_output_folders_are_one_error_before_any_work(tmp_path, read_only):
    """dcdb.io.prepare_folder creates the folder and writes a probe into it before the work starts."""
    ro = tmp_path / "ro"
    (ro / "empty").mkdir(parents=True)
    read_only(ro)
    res = run("world", str(ro / "w"), "--samples", "20")
    assert_one_error(res.exit_code, res.stderr, f"cannot create world output {str(ro / 'w')!r}", "Read-only")
    res = run("synth", "pool", str(ro / "empty"), "--rows", "10", "--shards", "1")
    assert_one_error(res.exit_code, res.stderr, f"cannot write into synth output folder {str(ro / 'empty')!r}",
                     "Read-only")
    assert sorted(p.name for p in ro.rglob("*")) == ["empty"]


# ------------------------------------------------------------------- item 5: damaged Lance


def _data_file(pool: Path, space: str = "l14_img") -> Path:
    return max((pool / "embeddings" / f"{space}.lance" / "data").glob("*.lance"))


DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "last_byte_cut": lambda b: b[:-1],
    "appended": lambda b: b + b"\0" * 100,
    "footer_overwritten": lambda b: b[:-16] + bytes(range(16)),
    "emptied": lambda b: b"",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_lance_file_is_one_pool_error_before_lance_reads_it(small_pool, tmp_path, capfd, damage):
    f = _data_file(small_pool)
    f.write_bytes(DAMAGE[damage](f.read_bytes()))
    np.save(tmp_path / "seeds.npy", np.ones((1, 768), np.float32))
    for args in (["sql", "SELECT uid, l14_img FROM pool WHERE l14_img[1] > 0"],
                 ["query", "-", "-o", str(tmp_path / "o.npy")],
                 ["knn", "--space", "l14_img", "--seeds", str(tmp_path / "seeds.npy"), "-k", "3"]):
        res = run(*args, "--pool", str(small_pool), input="SELECT uid FROM pool WHERE l14_img[1] > 0")
        assert_one_error(res.exit_code, res.stderr, "embedding table", "l14_img.lance", "is damaged", f.name,
                         "re-ingest")
    assert "panicked" not in capfd.readouterr().err  # found before Lance read the file: no panic at all
    assert not (tmp_path / "o.npy").exists()
    # a query that does not read the damaged space still runs
    assert run("sql", "SELECT count(*) FROM pool WHERE b32_img[1] > 0", "--pool", str(small_pool)).exit_code == 0


def test_corrupt_lance_metadata_panics_inside_lance_but_the_user_sees_one_line(small_pool, tmp_path):
    """Bytes overwritten before an intact footer: Lance only finds out while reading, by a panic
    in a background thread. Its report (with RUST_BACKTRACE=1) must not reach the terminal."""
    f = _data_file(small_pool)
    data = bytearray(f.read_bytes())
    data[-2000:-16] = bytes((i * 37 + 11) % 256 for i in range(1984))
    f.write_bytes(bytes(data))
    np.save(tmp_path / "seeds.npy", np.ones((1, 768), np.float32))
    env = {"RUST_BACKTRACE": "1"}
    for args in (["sql", "SELECT sum(l14_img[1]) FROM pool"],
                 ["knn", "--space", "l14_img", "--seeds", str(tmp_path / "seeds.npy"), "-k", "3"]):
        res = run_process(*args, "--pool", str(small_pool), env=env)
        assert_one_error(res.returncode, res.stderr, "l14_img.lance", "is damaged", "re-ingest")


def test_native_stderr_filter_passes_everything_but_panic_reports():
    from dcdb.cli.base import _pump_stderr

    panic = (b"\nthread 'lance_background_thread' (77) panicked at src/x.rs:1:2:\nrange end index 9 out of range\n"
             b"stack backtrace:\n   0: f\n             at x.rs:1\nnote: Some details are omitted.\n")
    text = b"warning: kept\n" + panic + b"after\n\nthread 'main' panicked at a.rs:1:1:\nboom\nnote: run with x\nlast"
    read, write = os.pipe()
    out_r, out_w = os.pipe()
    os.write(write, text)
    os.close(write)
    _pump_stderr(read, out_w)
    os.close(out_w)
    with os.fdopen(out_r, "rb") as f:
        assert f.read() == b"warning: kept\nafter\nlast"


# ------------------------------------------------------- item 8: killed runs leave no debris


@pytest.mark.parametrize("command", ["query", "knn", "union"])
def test_output_killed_before_its_manifest_is_redone_without_force(small_pool, tmp_path, command):
    np.save(tmp_path / "seeds.npy", np.ones((2, 512), np.float32))
    assert run("query", "no_filter", "--pool", str(small_pool), "-o", str(tmp_path / "a.npy")).exit_code == 0
    args = {
        "query": ["query", "no_filter", "--pool", str(small_pool)],
        "knn": ["knn", "--space", "b32_img", "--seeds", str(tmp_path / "seeds.npy"), "-k", "5", "--pool",
                str(small_pool)],
        "union": ["subsets", "union", str(tmp_path / "a.npy"), str(tmp_path / "a.npy")],
    }[command]
    out = tmp_path / "o.npy"
    ref = tmp_path / "ref.npy"
    assert run(*args, "-o", str(ref)).exit_code == 0
    res = run_process(*args, "-o", str(out), env={KILL_ENV: "rename:o.npy.json"})
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert out.is_file() and not (tmp_path / "o.npy.json").exists()
    assert len(temps_in(tmp_path)) == 1  # the manifest's temp file
    res = run(*args, "-o", str(out))  # no --force: an output without its manifest is unfinished
    assert res.exit_code == 0, res.output
    assert temps_in(tmp_path) == []
    assert out.read_bytes() == ref.read_bytes() and (tmp_path / "o.npy.json").is_file()
    res = run(*args, "-o", str(out))  # a finished output is still protected
    assert_one_error(res.exit_code, res.stderr, "already exists", "--force")


def test_a_file_that_is_no_uid_list_is_not_taken_for_an_unfinished_output(small_pool, tmp_path):
    out = tmp_path / "o.npy"
    np.save(out, np.zeros((3, 4)))
    res = run("query", "no_filter", "--pool", str(small_pool), "-o", str(out))
    assert_one_error(res.exit_code, res.stderr, "already exists")
    assert np.load(out).shape == (3, 4)


def test_temp_files_of_dead_runs_are_removed_and_a_live_runs_kept(small_pool, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead_tmp = tmp_path / f"o.npy{TMP_MARK}{int(dead.stdout)}-0123abcd"
        live_tmp = tmp_path / f"o.npy{TMP_MARK}{live.pid}-4567cdef"
        dead_tmp.write_bytes(b"half")
        live_tmp.write_bytes(b"being written")
        assert run("query", "no_filter", "--pool", str(small_pool), "-o", str(tmp_path / "o.npy")).exit_code == 0
        assert not dead_tmp.exists() and live_tmp.exists()
    finally:
        live.kill()
        live.wait()


def test_killed_annotate_leaves_its_group_copy_to_the_next_run(small_pool, tmp_path):
    extra = uids_file(small_pool, tmp_path / "extra.parquet")
    args = ["annotate", "--from", str(extra), "--group", "extra", "--pool", str(small_pool)]
    res = run_process(*args, env={KILL_ENV: "group:extra"})
    assert res.returncode == -signal.SIGKILL, res.stderr
    [left] = (small_pool / "derived").iterdir()  # the full copy of the group, under its temp name
    assert re.fullmatch(r"\.extra\.tmp-\d+", left.name) and (left / "_group.json").is_file()
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (small_pool / "derived").iterdir()) == ["extra"]
    res = run("sql", "SELECT sum(score_x) AS s FROM pool", "--pool", str(small_pool), "--format", "csv")
    assert res.stdout.split() == ["s", str(float(sum(range(200))))]


def test_killed_ingest_worker_is_one_error_and_the_rerun_resumes(small_src, small_pool, tmp_path, monkeypatch):
    pool = tmp_path / "pool"
    first = sorted(p.stem for p in small_src.glob("*.parquet"))[1]
    monkeypatch.setenv(KILL_ENV, f"ingest-split:{first}")  # the spawned worker inherits it and dies
    res = run("ingest", str(small_src), str(pool), "-j", "2")
    assert_one_error(res.exit_code, res.stderr, "worker process died", "re-run the same command")
    assert not (pool / "dcdb.json").exists() and temps_in(pool) == []
    monkeypatch.delenv(KILL_ENV)
    res = run("ingest", str(small_src), str(pool), "-j", "2")
    assert res.exit_code == 0, res.output
    assert pool_rows(pool) == pool_rows(small_pool)


def test_killed_reshard_worker_is_one_error_and_the_rerun_finishes(shard_world, tmp_path, monkeypatch):
    pool = shard_world / "pool"
    uids = tmp_path / "all.npy"
    assert run("query", "no_filter", "--pool", str(pool), "-o", str(uids)).exit_code == 0
    args = ["reshard", "--pool", str(pool), "--uids", str(uids), "--shard-size", "10", "-j", "2"]
    assert run(*args, "-o", str(tmp_path / "ref")).exit_code == 0
    out = tmp_path / "out"
    monkeypatch.setenv(KILL_ENV, "reshard-shard:1")
    res = run(*args, "-o", str(out))
    assert_one_error(res.exit_code, res.stderr, "worker process died", "re-run the same command")
    assert temps_in(out) == [] and not (out / "meta.json").exists()
    monkeypatch.delenv(KILL_ENV)
    assert run(*args, "-o", str(out)).exit_code == 0
    skip = ("meta.json", ".dcdb-reshard.json")
    assert ({k: v for k, v in files_of(out).items() if k not in skip}
            == {k: v for k, v in files_of(tmp_path / "ref").items() if k not in skip})


# ------------------------------------------------------------- item 8: one writer at a time


def test_second_ingest_fails_at_once_and_a_killed_holder_frees_the_pool(small_src, small_pool, tmp_path):
    pool = tmp_path / "pool"
    with lock_held_elsewhere(pool) as holder:
        res = run("ingest", str(small_src), str(pool), "-j", "1")
        assert_one_error(res.exit_code, res.stderr, f"pool {str(pool.resolve())!r} is being written by another dcdb "
                         f"process (pid {holder.pid})", "wait for it")
        assert res.exit_code == 75
        assert sorted(p.name for p in pool.iterdir()) == [LOCK_NAME]  # nothing was written
    # the holder was killed (SIGKILL): the kernel released its lock; its lock file is reused
    res = run("ingest", str(small_src), str(pool), "-j", "1")
    assert res.exit_code == 0, res.output
    assert not (pool / LOCK_NAME).exists()
    assert pool_rows(pool) == pool_rows(small_pool)


@pytest.mark.parametrize("args", [
    ["query", "no_filter", "--save", "s"],
    ["annotate", "--from", "{tmp}/extra.parquet"],
    ["dedup", "--space", "b32_img", "--clusters", "2"],
], ids=lambda a: a[0])
def test_pool_writers_fail_at_once_while_another_process_writes(small_pool, tmp_path, args):
    uids_file(small_pool, tmp_path / "extra.parquet")
    before = files_of(small_pool)
    with lock_held_elsewhere(small_pool) as holder:
        res = run(*[a.format(tmp=tmp_path) for a in args], "--pool", str(small_pool))
        assert_one_error(res.exit_code, res.stderr, "is being written by another dcdb process", str(holder.pid))
        # a read-only query needs no lock
        assert run("query", "no_filter", "--pool", str(small_pool), "-o", str(tmp_path / "a.npy")).exit_code == 0
    before[LOCK_NAME] = hashlib.sha256(f"{holder.pid}\n".encode()).hexdigest()  # left by the killed holder
    assert files_of(small_pool) == before


def test_second_reshard_into_one_folder_fails_at_once(shard_world, tmp_path):
    pool = shard_world / "pool"
    uids = tmp_path / "all.npy"
    assert run("query", "no_filter", "--pool", str(pool), "-o", str(uids)).exit_code == 0
    out = tmp_path / "out"
    args = ["reshard", "--pool", str(pool), "--uids", str(uids), "-o", str(out), "-j", "1"]
    with lock_held_elsewhere(out) as holder:
        res = run(*args)
        assert_one_error(res.exit_code, res.stderr, f"output folder {str(out)!r} is being written by another",
                         str(holder.pid))
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert (out / "meta.json").is_file() and not (out / LOCK_NAME).exists()


def test_faults_no_layer_named_still_become_one_line():
    """The CLI's last resort: what the OS said, for errors raised where dcdb did not expect them."""
    import errno
    from concurrent.futures.process import BrokenProcessPool

    from dcdb.cli.base import _fault_error
    from dcdb.errors import DiskFullError, NotWritableError, PoolError, WorkerError

    def fault(exc):
        err = _fault_error(exc)
        assert err is not None and err.hint
        return err

    assert isinstance(fault(OSError(errno.ENOSPC, "No space left on device", "/d/x")), DiskFullError)
    assert isinstance(fault(OSError("LanceError(IO): No space left on device (os error 28)")), DiskFullError)
    assert isinstance(fault(OSError(errno.EROFS, "Read-only file system", "/d/x")), NotWritableError)
    assert fault(PermissionError(errno.EACCES, "Permission denied", "/d/f.sql")).message == "permission denied: '/d/f.sql'"
    assert isinstance(fault(BrokenProcessPool("boom")), WorkerError)
    lance = fault(ValueError('External error: task 9 panicked with message "range end index 9 out of range"'))
    assert isinstance(lance, PoolError) and "panicked" not in lance.message
    assert _fault_error(ValueError("a bug")) is None and _fault_error(KeyError("x")) is None
