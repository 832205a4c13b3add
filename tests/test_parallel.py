"""dcdb.parallel, the one process executor: results in task order or as they finish, a worker's
DcdbError back as itself, a killed worker as one WorkerError, in-process for one job."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time

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
