"""One process executor: ``fn`` over tasks on N worker processes, or in this process.

Every process pool of dcdb goes through here (ingest and its bucket pre-pass, annotate, the shard
index, reshard, the demo's synth and world):

- ``map(fn, tasks, jobs)``: the results in task order. ``window`` bounds the tasks in flight (each
  result waits for its turn in memory) and lets ``tasks`` be a lazy iterable, built as workers
  take them; without it every task is submitted at once.
- ``as_completed(fn, tasks, jobs)``: ``(task, result)`` pairs as tasks finish.

Both run the tasks in this process, one after another, when ``jobs`` is 1, when there are fewer
than two tasks, or when worker processes cannot start (``can_spawn``); the results are the same
either way. Workers are *spawned* (fresh interpreters that import dcdb), never forked: the parent
holds DuckDB, Lance and Arrow thread pools that a fork would copy mid-flight. So ``fn`` must be a
module-level function and the tasks and results must pickle. ``initializer(*initargs)`` runs
once in each worker as it starts (not in this process); ``progress(task, result)`` is called here,
in the parent, as each result comes (to move a progress bar).

When something fails:

- an exception raised by ``fn`` in a worker comes back as itself (a ``DcdbError`` keeps its
  class, message and hint) where its result would have been;
- a worker that dies (SIGKILL, the OOM killer) breaks the whole pool: ``map`` raises one
  ``WorkerError`` at once, ``as_completed`` first yields every task that had finished, then raises
  it. ``on_death(task)`` builds that error from the first task (in task order) the pool could not
  finish: the dead worker's, or one close after it; the caller says how to resume;
- ``cancel()`` on the results drops the tasks not started yet; the running ones still finish and
  are yielded (ingest records them before it reports the failure that made it stop);
- leaving the results early (``close()``, the ``with`` block, an exception in the loop that
  consumes them) drops the tasks not started and waits for the running ones: when the caller's
  clean-up runs, no worker writes any more.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from dcdb.errors import DcdbError, WorkerError

START_METHOD = "spawn"  # never fork: the parent's DuckDB/Lance/Arrow threads would be copied mid-flight
# what the CLI said when a pool broke under a caller that did not name its work (cli._fault_error)
DIED = "a worker process died before finishing (killed, or out of memory)"
DIED_HINT = "re-run the same command (with fewer -j if memory is short): finished work is kept"

_NONE = object()  # no task (None is a task like any other)


def can_spawn() -> bool:
    """Whether spawned worker processes can start: they re-import ``__main__`` from its file,
    which fails for a script fed on stdin (``python - <<EOF``). The executor then runs in-process."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or os.path.isfile(main_file)


def processes(jobs: int, tasks: int | None = None) -> int:
    """Worker processes ``jobs`` gives on ``tasks`` tasks (unknown: None); 1 means this process."""
    n = max(1, jobs) if tasks is None else min(max(1, jobs), tasks)
    return n if n > 1 and can_spawn() else 1


def died(task: Any = None) -> DcdbError:
    """The default ``on_death``: one ``WorkerError`` that says what to do."""
    return WorkerError(DIED, hint=DIED_HINT)


def map(fn: Callable[[Any], Any], tasks: Iterable[Any], jobs: int, *, window: int | None = None,
        progress: Callable[[Any, Any], None] | None = None, initializer: Callable[..., None] | None = None,
        initargs: tuple = (), on_death: Callable[[Any], DcdbError] = died) -> Results:
    """``fn(task)`` for each of ``tasks``, results in task order (see the module docstring)."""
    return Results(fn, tasks, jobs, ordered=True, window=window, progress=progress, initializer=initializer,
                   initargs=initargs, on_death=on_death)


def as_completed(fn: Callable[[Any], Any], tasks: Iterable[Any], jobs: int, *,
                 progress: Callable[[Any, Any], None] | None = None,
                 initializer: Callable[..., None] | None = None, initargs: tuple = (),
                 on_death: Callable[[Any], DcdbError] = died) -> Results:
    """``(task, fn(task))`` for each of ``tasks`` as they finish (see the module docstring)."""
    return Results(fn, tasks, jobs, ordered=False, window=None, progress=progress, initializer=initializer,
                   initargs=initargs, on_death=on_death)


class Results:
    """The iterator ``map`` and ``as_completed`` return; also a context manager that closes it.

    Dropping it (the last reference) closes it too, at once: the generator that runs the pool
    refers to a separate state object, never back to this one, so no reference cycle delays it."""

    def __init__(self, fn, tasks, jobs: int, *, ordered: bool, window: int | None, progress, initializer,
                 initargs: tuple, on_death) -> None:
        run = _Run(fn, tasks, jobs, ordered, window, progress, initializer, initargs, on_death)
        self.processes = run.processes
        self._run = run
        if run.processes == 1:
            self._gen = run.inline()
        else:
            self._gen = run.in_order() if ordered else run.completed()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return next(self._gen)

    def cancel(self) -> None:
        """Start no more tasks; the running ones still finish and are yielded."""
        self._run.cancelled = True
        for fut in list(self._run.futures):
            fut.cancel()

    def close(self) -> None:
        """Drop the tasks not started, wait for the running ones, stop the workers."""
        self._gen.close()

    def __enter__(self) -> Results:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Run:
    """What one ``map``/``as_completed`` call runs, and its generators."""

    def __init__(self, fn, tasks, jobs: int, ordered: bool, window: int | None, progress, initializer,
                 initargs: tuple, on_death) -> None:
        self.processes = processes(jobs, len(tasks) if hasattr(tasks, "__len__") else None)
        self.fn, self.tasks, self.ordered, self.window = fn, tasks, ordered, window
        self.progress, self.initializer, self.initargs, self.on_death = progress, initializer, initargs, on_death
        self.futures: dict[Any, Any] = {}  # submitted, not yet yielded: future -> task
        self.cancelled = False

    def out(self, task, result):
        if self.progress is not None:
            self.progress(task, result)
        return result if self.ordered else (task, result)

    def inline(self) -> Iterator[Any]:
        for task in self.tasks:
            if self.cancelled:
                return
            result = self.fn(task)
            yield self.out(task, result)

    def executor(self):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(self.processes, mp_context=mp.get_context(START_METHOD),
                                   initializer=self.initializer, initargs=self.initargs)

    def in_order(self) -> Iterator[Any]:
        from concurrent.futures.process import BrokenProcessPool

        ex = self.executor()
        pending: deque = deque()  # (future, task), oldest first
        tasks = iter(self.tasks)
        window = self.window or float("inf")

        def fill() -> None:
            while not self.cancelled and len(pending) < window:
                task = next(tasks, _NONE)
                if task is _NONE:
                    return
                try:
                    fut = ex.submit(self.fn, task)
                except BrokenProcessPool:
                    raise self.on_death(pending[0][1] if pending else task) from None
                self.futures[fut] = task
                pending.append((fut, task))

        try:
            fill()
            while pending:
                fut, task = pending.popleft()
                fill()  # keep the window full while this one is awaited and consumed
                del self.futures[fut]
                if fut.cancelled():
                    continue
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    raise self.on_death(task) from None
                yield self.out(task, result)
        finally:
            self.futures.clear()
            ex.shutdown(wait=True, cancel_futures=True)

    def completed(self) -> Iterator[Any]:
        from concurrent.futures import as_completed as futures_completed
        from concurrent.futures.process import BrokenProcessPool

        ex = self.executor()
        dead, first = _NONE, None  # of the futures the broken pool failed, the first submitted
        try:
            for task in self.tasks:
                if self.cancelled:
                    break
                try:
                    self.futures[ex.submit(self.fn, task)] = task
                except BrokenProcessPool:
                    dead = task
                    break
            order = {fut: i for i, fut in enumerate(self.futures)}
            for fut in futures_completed(list(self.futures)):
                task = self.futures.pop(fut)
                if fut.cancelled():
                    continue
                try:
                    result = fut.result()
                except BrokenProcessPool:  # keep what the other workers finished
                    if first is None or order[fut] < first:
                        dead, first = task, order[fut]
                    continue
                yield self.out(task, result)
            if dead is not _NONE:
                raise self.on_death(dead)
        finally:
            self.futures.clear()
            ex.shutdown(wait=True, cancel_futures=True)
