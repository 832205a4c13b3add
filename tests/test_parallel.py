"""dcdb.parallel, the one executor: results in task order or as they finish, a worker's
DcdbError back as itself, a killed worker as one WorkerError, in-process for one job; the same
calls on a Ray cluster (engine="ray"), and Ray imported only for that engine.

The Ray test runs a real 2-CPU local Ray cluster in a subprocess inside a loopback-only network
namespace (the ``loopback_netns`` fixture; Ray never runs outside one), with this folder as its
working directory, so Ray's workers import this module's task functions by name."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dcdb import parallel
from dcdb.errors import ShardIndexError, WorkerError

# Workers are spawned: they import this module by name (the parent's sys.path travels with them).


def square(task: int) -> tuple[int, int]:
    return task * task, os.getpid()


def fail_on_3(task: int) -> int:
    if task == 3:
        raise ShardIndexError(f"task {task} is bad", hint="fix task 3")
    return task


def die_on_2(task: int) -> int:
    if task == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return task


def env_value(task: int) -> str | None:
    return os.environ.get("DCDB_TEST_PARALLEL")


def set_env(value: str) -> None:
    os.environ["DCDB_TEST_PARALLEL"] = value


def die_once_on_2(task: tuple[int, str]) -> int:
    """Task 2 kills its worker the first time (it leaves the file ``task[1]``), then returns."""
    i, marker = task
    if i == 2 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return i


def wait_for(task: tuple[int, str]) -> int:
    """Task 0 returns at once; the others wait until the file ``task[1]`` exists."""
    i, gate = task
    while i and not os.path.exists(gate):
        time.sleep(0.01)
    return i


def test_map_keeps_task_order_and_as_completed_gives_every_pair():
    res = parallel.map(square, range(12), 2, window=3)
    assert res.processes == 2
    got = list(res)
    assert [r for r, _ in got] == [i * i for i in range(12)]
    assert {pid for _, pid in got} - {os.getpid()}  # really ran in worker processes
    pairs = list(parallel.as_completed(square, range(12), 2))
    assert sorted((t, r) for t, (r, _) in pairs) == [(i, i * i) for i in range(12)]
    assert not mp.active_children()  # the workers are gone once the results are


def test_one_job_one_task_or_no_spawn_run_in_process(monkeypatch):
    calls = []
    got = list(parallel.map(square, range(5), 1, progress=lambda t, r: calls.append((t, r[0]))))
    assert got == [(i * i, os.getpid()) for i in range(5)] and calls == [(i, i * i) for i in range(5)]
    assert parallel.map(square, [7], 4).processes == 1
    assert list(parallel.as_completed(square, [7], 4)) == [(7, (49, os.getpid()))]
    # the initializer is for workers: not run in this process
    assert list(parallel.map(env_value, range(3), 1, initializer=set_env, initargs=("x",))) == [None] * 3
    # a script fed on stdin: workers could not re-import __main__
    monkeypatch.setattr(sys.modules["__main__"], "__file__", "/nonexistent/<stdin>", raising=False)
    assert not parallel.can_spawn()
    assert parallel.processes(4, 10) == 1
    assert [pid for _, pid in parallel.map(square, range(4), 4)] == [os.getpid()] * 4


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_dcdb_error_raised_in_a_worker_comes_back_as_itself(jobs):
    for results in (parallel.map(fail_on_3, range(6), jobs), parallel.as_completed(fail_on_3, range(6), jobs)):
        with pytest.raises(ShardIndexError) as exc:
            list(results)
        assert exc.value.message == "task 3 is bad" and exc.value.hint == "fix task 3"
    assert not mp.active_children()


def test_a_worker_killed_by_sigkill_is_one_worker_error():
    with pytest.raises(WorkerError) as exc:
        list(parallel.map(die_on_2, range(6), 2))
    assert exc.value.message == parallel.DIED and exc.value.hint
    # as_completed: what finished comes first, then one error built by on_death from the task
    seen = []
    with pytest.raises(WorkerError) as exc:
        for task, result in parallel.as_completed(
            die_on_2, range(6), 2, on_death=lambda t: WorkerError(f"died around task {t}", hint="re-run")
        ):
            seen.append(result)
    # task 2 (or the one the other worker held when 2 died: 0 or 1)
    assert exc.value.message in ("died around task 0", "died around task 1", "died around task 2")
    assert set(seen) <= {0, 1, 3, 4, 5}
    assert not mp.active_children()


def test_cancel_drops_tasks_not_started_and_lazy_tasks_are_built_as_needed(tmp_path):
    gate = str(tmp_path / "go")
    res = parallel.as_completed(wait_for, [(i, gate) for i in range(40)], 2)
    first = next(res)
    assert first == ((0, gate), 0)
    res.cancel()
    open(gate, "w").close()
    rest = list(res)  # only the tasks a worker already held
    assert len(rest) < 39 and all(r for _, r in rest)
    # a window: tasks are taken from a generator only as the window needs them
    taken = []

    def tasks():
        for i in range(10):
            taken.append(i)
            yield i

    with parallel.map(square, tasks(), 2, window=2) as res:
        assert next(res)[0] == 0
        assert len(taken) <= 3
    assert not mp.active_children()  # leaving the block stopped the workers
    res = parallel.map(square, range(10), 2, window=2)
    next(res)
    del res  # dropped: closed at once (no reference cycle to wait for the garbage collector)
    assert not mp.active_children()


def test_the_initializer_runs_in_each_worker():
    assert list(parallel.map(env_value, range(4), 2, initializer=set_env, initargs=("set",))) == ["set"] * 4


def test_no_ray_unless_the_ray_engine_runs():
    """``import dcdb`` and the modules that can run on Ray, and a local map, import no Ray."""
    code = ("import sys, dcdb, dcdb.parallel as p, dcdb.dist.execute, dcdb.shards.reshard, dcdb.cli\n"
            "assert list(p.map(abs, [-1, 2], 1)) == [1, 2]\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_unknown_engine_is_a_usage_error():
    from dcdb.errors import UsageError

    with pytest.raises(UsageError, match="unknown engine 'spark'") as exc:
        parallel.map(square, range(3), 1, engine="spark")
    assert "local, ray" in exc.value.hint


def ray_checks(folder: str) -> None:
    """The Ray engine through the same calls, on a 2-CPU local cluster: run by
    test_the_ray_engine_behind_the_same_calls in its namespace; writes FOLDER/report.json."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    report: dict = {}
    seen: list = []
    res = parallel.map(square, range(12), 1, engine="ray", window=3, progress=lambda t, r: seen.append(t))
    got = list(res)
    report["processes"] = res.processes
    report["map"] = [r for r, _ in got]
    report["in_workers"] = bool({pid for _, pid in got} - {os.getpid()})
    report["progress"] = seen
    pairs = parallel.as_completed(square, range(12), 1, engine="ray")
    report["as_completed"] = sorted([t, r] for t, (r, _) in pairs)
    report["workers"] = parallel.workers(1, "ray")
    for name, call in (("map", parallel.map), ("as_completed", parallel.as_completed)):
        try:
            list(call(fail_on_3, range(6), 1, engine="ray"))
        except ShardIndexError as exc:
            report[f"raised_{name}"] = [type(exc).__name__, exc.message, exc.hint]
    # a worker that dies once: Ray runs the task again; one that dies every time: on_death(task)
    report["retried"] = list(parallel.map(die_once_on_2, [(i, f"{folder}/died") for i in range(4)], 1,
                                          engine="ray"))
    on_death = lambda t: WorkerError(f"died on task {t}", hint="re-run")  # noqa: E731
    try:
        list(parallel.map(die_on_2, range(4), 1, engine="ray", on_death=on_death))
    except WorkerError as exc:
        report["died_map"] = [exc.message, exc.hint]
    finished = []
    try:
        for task, result in parallel.as_completed(die_on_2, range(4), 1, engine="ray", on_death=on_death):
            finished.append(result)
    except WorkerError as exc:
        report["died_as_completed"] = [sorted(finished), exc.message]
    # a window takes tasks from a generator only as it needs them; leaving early stops
    taken: list = []

    def tasks():
        for i in range(10):
            taken.append(i)
            yield i

    with parallel.map(square, tasks(), 1, engine="ray", window=2) as res:
        report["first"] = next(res)[0]
        report["taken"] = len(taken)
    ray.shutdown()
    Path(folder, "report.json").write_text(json.dumps(report))


@pytest.mark.slow
def test_the_ray_engine_behind_the_same_calls(loopback_netns, tmp_path):
    """engine="ray": results in task order (window, progress) or as they finish, a DcdbError raised
    in a task back as itself with its message and hint, a worker that dies once retried by Ray, one
    that dies every time as on_death(task): the same contract as the worker processes."""
    here = Path(__file__).parent
    code = f"import test_parallel; test_parallel.ray_checks({str(tmp_path)!r})"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    r = loopback_netns([sys.executable, "-c", code], cwd=here, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["processes"] == report["workers"] == 2
    assert report["map"] == [i * i for i in range(12)] and report["in_workers"]
    assert report["progress"] == list(range(12))  # called here, as each result is yielded
    assert report["as_completed"] == [[i, i * i] for i in range(12)]
    for name in ("map", "as_completed"):
        assert report[f"raised_{name}"] == ["ShardIndexError", "task 3 is bad", "fix task 3"]
    assert report["retried"] == [0, 1, 2, 3] and (tmp_path / "died").exists()
    assert report["died_map"] == ["died on task 2", "re-run"]
    assert report["died_as_completed"] == [[0, 1, 3], "died on task 2"]  # what finished, then the error
    assert report["first"] == 0 and report["taken"] <= 3


# ------------------------------------------------------------------------- completion markers


def _job(tmp_path, ledger_cls=parallel.Ledger):
    """An input file, an output file, and a ledger in tmp_path/marks with the output recorded."""
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(b"input")
    out.write_bytes(b"output bytes")
    ledger = parallel.Ledger(tmp_path / "marks", root=tmp_path)
    ledger.record("job", inputs=[src], params={"k": 1}, outputs=[out], info={"rows": 7})
    return src, out, ledger


def test_a_marker_holds_only_for_the_same_inputs_and_params_and_intact_outputs(tmp_path):
    src, out, ledger = _job(tmp_path)
    marker = ledger.done("job", inputs=[src], params={"k": 1})
    assert marker is not None and marker.info == {"rows": 7} and marker.outputs == {"out.bin": 12}
    assert not list((tmp_path / "marks").glob("*dcdb-tmp*"))  # written under a temp name, renamed
    assert ledger.done("job", inputs=[src], params={"k": 2}) is None  # another parameter
    assert ledger.done("other", inputs=[src], params={"k": 1}) is None  # never recorded
    stat = src.stat()
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # the input touched: same size
    assert ledger.done("job", inputs=[src], params={"k": 1}) is None
    ledger.record("job", inputs=[src], params={"k": 1}, outputs=[out])
    src.write_bytes(b"input, longer")  # the input changed size
    assert ledger.done("job", inputs=[src], params={"k": 1}) is None
    # inputs named by a label: a moved input folder still matches
    moved = tmp_path / "moved.bin"
    ledger.record("named", inputs={"a": src}, outputs=[out])
    os.replace(src, moved)
    assert ledger.done("named", inputs={"a": moved}) is not None
    assert ledger.done("named", inputs={"a": src}) is None  # gone: no signature


@pytest.mark.parametrize("damage", ["missing", "truncated", "grown"])
def test_a_marker_whose_output_is_missing_or_of_another_size_is_not_done(tmp_path, damage):
    src, out, ledger = _job(tmp_path)
    if damage == "missing":
        out.unlink()
    elif damage == "truncated":
        os.truncate(out, 5)
    else:
        out.write_bytes(b"output bytes and more")
    assert ledger.done("job", inputs=[src], params={"k": 1}) is None
    assert ledger.markers() == {}


def test_at_least_outputs_may_grow_but_not_shrink(tmp_path):
    shared = tmp_path / "shared.bin"
    shared.write_bytes(b"x" * 100)
    ledger = parallel.Ledger(tmp_path, suffix=".done.json", fsync=False)
    ledger.record("g1", at_least={shared: 60}, info={"buckets": [1]})
    shared.write_bytes(b"x" * 200)  # another job wrote past it
    assert ledger.done("g1").info == {"buckets": [1]}
    os.truncate(shared, 59)
    assert ledger.done("g1") is None


_MARKER = {"format": "dcdb-marker", "version": 1, "key": "job", "fingerprint": "x", "outputs": {},
           "at_least": {}, "info": {}}


@pytest.mark.parametrize("body", [
    "",  # empty (never written whole: cannot happen with atomic writes, but a disk may lose it)
    '{"format": "dcdb-marker", "version": 1, "key": "job", "finger',  # torn
    "[1, 2, 3]",  # JSON, not a marker
    json.dumps({**_MARKER, "version": 99}),  # a newer or older layout
    '{"name": "job", "signature": [1, 2], "bytes": 12}',  # a journal entry of an older dcdb
    json.dumps({**_MARKER, "outputs": {"out.bin": "many"}}),  # a size that is not a number
    json.dumps({**_MARKER, "outputs": [], "info": None}),
])
def test_a_corrupt_or_foreign_marker_is_not_done_and_no_error(tmp_path, body):
    src, out, ledger = _job(tmp_path)
    (tmp_path / "marks" / "job.json").write_text(body)
    assert ledger.done("job", inputs=[src], params={"k": 1}) is None
    assert ledger.markers() == {}
    ledger.record("job", inputs=[src], params={"k": 1}, outputs=[out])  # redone: recorded again
    assert ledger.done("job", inputs=[src], params={"k": 1}) is not None


def test_forget_clear_and_markers_in_key_order(tmp_path):
    out = tmp_path / "o"
    out.write_bytes(b"1")
    ledger = parallel.Ledger(tmp_path / "m", root=tmp_path)
    for key in ("b-2", "a-1", "b-1"):
        ledger.record(key, outputs=[out], info={"key": key})
    assert list(ledger.markers()) == ["a-1", "b-1", "b-2"]
    assert list(ledger.markers("b-*")) == ["b-1", "b-2"]
    ledger.forget("b-1", "nothing")
    assert list(ledger.markers()) == ["a-1", "b-2"]
    ledger.clear()
    assert ledger.markers() == {} and not list((tmp_path / "m").iterdir())


def test_a_ledger_file_holds_the_markers_of_one_run(tmp_path):
    out = tmp_path / "00.tar"
    out.write_bytes(b"tar")
    path = tmp_path / ".state.json"
    ledger = parallel.LedgerFile(path, kind="dcdb-test-state", scope="plan-1")
    assert parallel.LedgerFile.scope_of(path, "dcdb-test-state") is None  # nothing written yet
    ledger.clear()
    assert parallel.LedgerFile.scope_of(path, "dcdb-test-state") == "plan-1"
    for key in ("b", "a"):
        ledger.record(key, outputs=[out], info={"n": key})
    again = parallel.LedgerFile(path, kind="dcdb-test-state", scope="plan-1")
    assert list(again.markers()) == ["b", "a"]  # in the order the jobs finished
    assert again.done("a").info == {"n": "a"}
    again.record("b", outputs=[out], info={"n": "b2"})  # redone: last
    assert list(parallel.LedgerFile(path, kind="dcdb-test-state", scope="plan-1").markers()) == ["a", "b"]
    # another run (scope) or kind: no markers; the first write replaces them
    other = parallel.LedgerFile(path, kind="dcdb-test-state", scope="plan-2")
    assert other.done("a") is None and other.markers() == {}
    assert parallel.LedgerFile(path, kind="other-kind", scope="plan-1").markers() == {}
    assert parallel.LedgerFile.scope_of(path, "other-kind") is None
    other.forget("a")
    assert parallel.LedgerFile.scope_of(path, "dcdb-test-state") == "plan-2"
    assert parallel.LedgerFile(path, kind="dcdb-test-state", scope="plan-1").markers() == {}


@pytest.mark.parametrize("body", [
    "{",
    '{"format": "dcdb-test-state", "fingerprint": "plan-1", "done": {"0": {"bytes_written": 3}}}',  # older
    '{"format": "dcdb-test-state", "fingerprint": "plan-1", "ledger": 1, "markers": {"a": 5, "b": {}}}',
])
def test_a_ledger_file_of_a_foreign_or_older_layout_holds_no_markers(tmp_path, body):
    path = tmp_path / ".state.json"
    path.write_text(body)
    ledger = parallel.LedgerFile(path, kind="dcdb-test-state", scope="plan-1")
    assert ledger.markers() == {} and ledger.done("a") is None and ledger.done("0") is None
    # an older layout of the same kind still names its run: the caller can tell it is its own
    assert parallel.LedgerFile.scope_of(path, "dcdb-test-state") == (None if body == "{" else "plan-1")


def test_a_ledger_file_that_is_a_fifo_is_never_read(tmp_path):
    path = tmp_path / ".state.json"
    os.mkfifo(path)
    assert parallel.LedgerFile.scope_of(path, "dcdb-test-state") is None  # would block if opened
    assert parallel.LedgerFile(path, kind="dcdb-test-state", scope="s").markers() == {}
