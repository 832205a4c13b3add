"""One executor: ``fn`` over tasks on N worker processes, in this process, or on a Ray cluster.

Every process pool of dcdb goes through here (ingest and its bucket pre-pass, annotate, the shard
index, reshard, the demo's synth and world), and so does every use of Ray (``--engine ray``: the
bucket tasks of dcdb/dist/execute.py, reshard's per-tar tasks); ``engine`` picks where the tasks
run, the rest of the call is the same:

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

``engine="ray"`` (its section below the local executor) runs each task as a Ray task of one CPU
on the cluster ``RAY_ADDRESS`` names, or a local one (found, or started in this process); ``jobs``
is not used there: the cluster places the tasks (``workers`` says how many CPUs it has). Ray is
imported only then. The same rules hold, with Ray's words: results in task order or as they
finish, ``window``, ``progress``, ``fn``'s exception back as itself, and a worker that died (Ray
retries such a task ``RAY_MAX_RETRIES`` times first) as ``on_death(task)``. A task handed to the
cluster counts as started (Ray cannot take a queued task back without losing a running one's
result): ``cancel()`` stops handing tasks over; leaving early cancels the tasks in flight (queued
ones never run, a running one may be interrupted; outputs are atomic) and waits until they have
stopped. There is no ``initializer`` on Ray.

The last section is the one completion-marker scheme of every resumable job (``Ledger``,
``LedgerFile``, ``file_signature``): how a re-run knows which jobs it need not redo.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcdb.errors import DcdbError, UsageError, WorkerError
from dcdb.io import atomic_path, json_text

ENGINES = ("local", "ray")  # where the tasks run: processes on this machine, or a Ray cluster
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
        initargs: tuple = (), on_death: Callable[[Any], DcdbError] = died, engine: str = "local") -> Results:
    """``fn(task)`` for each of ``tasks``, results in task order (see the module docstring)."""
    return Results(fn, tasks, jobs, ordered=True, window=window, progress=progress, initializer=initializer,
                   initargs=initargs, on_death=on_death, engine=engine)


def as_completed(fn: Callable[[Any], Any], tasks: Iterable[Any], jobs: int, *,
                 progress: Callable[[Any, Any], None] | None = None,
                 initializer: Callable[..., None] | None = None, initargs: tuple = (),
                 on_death: Callable[[Any], DcdbError] = died, engine: str = "local") -> Results:
    """``(task, fn(task))`` for each of ``tasks`` as they finish (see the module docstring)."""
    return Results(fn, tasks, jobs, ordered=False, window=None, progress=progress, initializer=initializer,
                   initargs=initargs, on_death=on_death, engine=engine)


def workers(jobs: int, engine: str = "local") -> int:
    """How many tasks run at once: the worker processes ``jobs`` gives here, the CPUs of the Ray
    cluster on ``engine="ray"`` (connecting to it)."""
    if engine == "ray":
        return ray_workers()
    return processes(jobs)


class Results:
    """The iterator ``map`` and ``as_completed`` return; also a context manager that closes it.

    Dropping it (the last reference) closes it too, at once: the generator that runs the pool
    refers to a separate state object, never back to this one, so no reference cycle delays it."""

    def __init__(self, fn, tasks, jobs: int, *, ordered: bool, window: int | None, progress, initializer,
                 initargs: tuple, on_death, engine: str = "local") -> None:
        if engine not in ENGINES:
            raise UsageError(f"unknown engine {engine!r}", hint=f"use one of {', '.join(ENGINES)}")
        kind = _RayRun if engine == "ray" else _Run
        run = kind(fn, tasks, jobs, ordered, window, progress, initializer, initargs, on_death)
        self.processes = run.processes
        self._run = run
        self._gen = run.results()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return next(self._gen)

    def cancel(self) -> None:
        """Start no more tasks; the running ones still finish and are yielded."""
        self._run.cancel()

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

    def results(self) -> Iterator[Any]:
        if self.processes == 1:
            return self.inline()
        return self.in_order() if self.ordered else self.completed()

    def cancel(self) -> None:
        self.cancelled = True
        for fut in list(self.futures):
            fut.cancel()

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


# ---------------------------------------------------------------------------------------- Ray
#
# engine="ray": the same calls on a Ray cluster. Ray is imported here only, only for that engine.

RAY_CONNECT_TIMEOUT = 5.0  # seconds to wait for a TCP answer from RAY_ADDRESS
RAY_MAX_RETRIES = 3  # Ray runs a task again this often when its worker dies (a task writes atomically)

_remotes: dict[Callable, Any] = {}  # fn -> its Ray remote function (made once: Ray exports it once per job)


def ray_connect():
    """The ``ray`` module, connected to the cluster ``RAY_ADDRESS`` names or a local one (found, or
    started in this process) unless this process is connected already."""
    try:
        import ray
    except ImportError as exc:
        raise UsageError("--engine ray needs Ray", hint="pip install 'dcdb[ray]'") from exc
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = os.environ.get("RAY_ADDRESS") or None
        check_ray_address(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, TimeoutError) as exc:
            raise UsageError(
                f"cannot start or reach a Ray cluster{f' at {address}' if address else ''}: {exc}",
                hint="start one with `ray start --head`, point RAY_ADDRESS at it, or use --engine local",
            ) from None
    return ray


def ray_workers() -> int:
    """The CPUs of the Ray cluster (connecting to it): the tasks that run at once."""
    return int(ray_connect().cluster_resources().get("CPU", 1))


def check_ray_address(address: str | None, timeout: float = RAY_CONNECT_TIMEOUT) -> None:
    """Fail fast on a RAY_ADDRESS nothing answers at: ``ray.init`` would retry it for minutes.
    ``None``, ``auto`` and ``local`` (a local cluster, found or started) are left to Ray; anything
    else must be ``[ray://]HOST:PORT`` with something listening there."""
    import socket

    if address is None or address.strip().lower() in ("", "auto", "local"):
        return
    hint = "start a cluster with `ray start --head` and use the address it prints, unset RAY_ADDRESS " \
           "for a local one, or use --engine local"
    rest = address.strip().split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"RAY_ADDRESS {address!r} is not HOST:PORT (or ray://HOST:PORT)", hint=hint)
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UsageError(f"no Ray cluster answers at RAY_ADDRESS {address!r}: {exc.strerror or exc}",
                         hint=hint) from None


_DIED = object()  # a result: the task's worker died (on each of Ray's tries)


class _RayRun:
    """What one ``map``/``as_completed`` call with ``engine="ray"`` runs: one Ray task per task."""

    def __init__(self, fn, tasks, jobs: int, ordered: bool, window: int | None, progress, initializer,
                 initargs: tuple, on_death) -> None:
        if initializer is not None:
            raise ValueError("engine='ray' has no initializer: do that set-up in fn")
        self.ray = ray_connect()
        self.processes = ray_workers()
        remote = _remotes.get(fn)
        if remote is None:
            remote = _remotes[fn] = self.ray.remote(num_cpus=1, max_retries=RAY_MAX_RETRIES)(fn)
        self.remote = remote
        self.tasks, self.ordered, self.window = tasks, ordered, window
        self.progress, self.on_death = progress, on_death
        self.refs: dict[Any, Any] = {}  # submitted, not yet yielded: ObjectRef -> task
        self.cancelled = False

    def results(self) -> Iterator[Any]:
        return self.in_order() if self.ordered else self.completed()

    def cancel(self) -> None:
        self.cancelled = True  # the tasks on the cluster run on: Ray cannot tell queued from running

    def out(self, task, result):
        if self.progress is not None:
            self.progress(task, result)
        return result if self.ordered else (task, result)

    def submit(self, task) -> Any:
        ref = self.remote.remote(task)
        self.refs[ref] = task
        return ref

    def get(self, ref) -> tuple[Any, Any]:
        """``(task, result)`` of ``ref``: ``fn``'s exception raised as itself; ``_DIED`` for a task
        whose worker died on every try, ``_NONE`` for one cancelled."""
        exceptions = self.ray.exceptions
        task = self.refs.pop(ref)
        try:
            return task, self.ray.get(ref)
        except exceptions.TaskCancelledError:
            return task, _NONE
        except exceptions.RayTaskError as exc:  # fn raised: its exception (a DcdbError keeps its hint)
            raise exc.cause from exc
        except exceptions.RayError:  # the worker died (killed, out of memory), node lost, ...
            return task, _DIED

    def stop(self) -> None:
        """Drop the tasks in flight and wait until none runs any more."""
        refs = list(self.refs)
        self.refs.clear()
        for ref in refs:
            self.ray.cancel(ref)
        if refs:
            self.ray.wait(refs, num_returns=len(refs), fetch_local=False)

    def in_order(self) -> Iterator[Any]:
        pending: deque = deque()  # ObjectRefs, oldest first
        tasks = iter(self.tasks)
        window = self.window or float("inf")

        def fill() -> None:
            while not self.cancelled and len(pending) < window:
                task = next(tasks, _NONE)
                if task is _NONE:
                    return
                pending.append(self.submit(task))

        try:
            fill()
            while pending:
                ref = pending.popleft()
                fill()  # keep the window full while this one is awaited and consumed
                task, result = self.get(ref)
                if result is _DIED:
                    raise self.on_death(task)
                if result is not _NONE:
                    yield self.out(task, result)
        finally:
            self.stop()

    def completed(self) -> Iterator[Any]:
        dead = _NONE  # of the tasks whose workers died, the first submitted
        try:
            for task in self.tasks:
                if self.cancelled:
                    break
                self.submit(task)
            order = {ref: i for i, ref in enumerate(self.refs)}
            pending, first = list(self.refs), None
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                for ref in done:
                    task, result = self.get(ref)
                    if result is _DIED:  # keep what the other workers finish
                        if first is None or order[ref] < first:
                            dead, first = task, order[ref]
                    elif result is not _NONE:
                        yield self.out(task, result)
            if dead is not _NONE:
                raise self.on_death(dead)
        finally:
            self.stop()


# -------------------------------------------------------------------------- completion markers
#
# One resume scheme for every job that a killed run should not redo (ingest's shards and bucket
# stages, reshard's output tars, the Ray engine's bucket groups). A job, once its outputs are in
# place, is recorded under a key: a fingerprint of what it was made from (input files' sizes and
# mtimes, parameters), its outputs with their sizes, and what the caller wants back (``info``).
# A re-run asks ``done(key, inputs=..., params=...)``: the marker, only if it is there, of this
# layout, of the same fingerprint, and every output it lists still has its recorded size;
# otherwise None, and the job is redone. A marker that cannot be read (torn, foreign, of an older
# dcdb) is no marker: redo, never an error. Markers are written atomically (dcdb.io) and only
# after the outputs, so a marker never vouches for a half file.
#
# ``Ledger(folder)`` keeps one marker file per key, ``<key><suffix>``: jobs on other processes or
# machines record their own. ``LedgerFile(path, kind=, scope=)`` keeps them all in one JSON file
# written by one process, with the run's ``scope`` (a fingerprint of the whole run): a file of
# another kind or scope holds no markers. The shard index's per-tar footers are a file format of
# their own (dcdb/shards/index.py) and share only ``file_signature``.

MARKER_FORMAT = "dcdb-marker"
MARKER_VERSION = 1
Inputs = Iterable[str | os.PathLike] | dict[str, str | os.PathLike]  # paths, or name -> path


def file_signature(path: str | os.PathLike) -> list[int] | None:
    """``[size, mtime_ns]`` of a file (through symlinks), or None if it does not exist: what every
    "is this input unchanged" check of dcdb compares."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def fingerprint(inputs: Inputs = (), params: Any = None) -> str:
    """sha256 of the inputs' signatures (``file_signature``, taken now) and of ``params`` (JSON):
    changes when an input file changes size or mtime, or a parameter changes. ``inputs`` is a list
    of paths (named by their path) or a mapping name -> path (so a moved input folder still matches).
    Signatures taken before a job ran belong in ``params``: an input that changes while the job
    runs must not be signed afterwards."""
    named = inputs if isinstance(inputs, dict) else {os.fspath(p): p for p in inputs}
    sigs = {str(name): file_signature(p) for name, p in named.items()}
    text = json.dumps({"inputs": sigs, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Marker:
    """A recorded job: its key, outputs (path relative to the ledger's root -> size; ``at_least``:
    files that must be at least that long, such as a file other jobs write into too) and ``info``."""

    key: str
    fingerprint: str
    outputs: dict[str, int]
    at_least: dict[str, int]
    info: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "outputs": self.outputs, "at_least": self.at_least,
                "info": self.info}

    @classmethod
    def from_json(cls, key: str, raw: Any) -> Marker | None:
        """The marker ``raw`` holds, or None if it is not one (torn, foreign, another layout)."""
        try:
            outputs = {str(p): int(n) for p, n in raw["outputs"].items()}
            at_least = {str(p): int(n) for p, n in raw["at_least"].items()}
            info, fp = raw["info"], raw["fingerprint"]
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if not isinstance(info, dict) or not isinstance(fp, str):
            return None
        return cls(key, fp, outputs, at_least, info)

    def intact(self, root: Path) -> bool:
        """Every output is still there with its recorded size (at least it, for ``at_least``)."""
        for rel, size in self.outputs.items():
            sig = file_signature(root / rel)
            if sig is None or sig[0] != size:
                return False
        for rel, size in self.at_least.items():
            sig = file_signature(root / rel)
            if sig is None or sig[0] < size:
                return False
        return True


def _read_json(path: Path) -> Any:
    """A JSON file's value; None when missing, not a regular file (never block on a FIFO), torn."""
    try:
        if not path.is_file():
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Ledger:
    """Completion markers in ``folder``, one file ``<key><suffix>`` per job; outputs are paths
    relative to ``root`` (default: the folder) or absolute. ``fsync=False`` skips flushing each
    marker (a killed process still leaves none half written; after a machine crash a marker may
    outlive its data, which the recorded sizes catch)."""

    def __init__(self, folder: str | os.PathLike, *, root: str | os.PathLike | None = None,
                 suffix: str = ".json", fsync: bool = True) -> None:
        self.folder = Path(folder)
        self.root = Path(root) if root is not None else self.folder
        self.suffix, self.fsync = suffix, fsync

    # the store: one file per key (LedgerFile overrides these four)
    def _load(self, key: str) -> Marker | None:
        raw = _read_json(self.folder / f"{key}{self.suffix}")
        if not isinstance(raw, dict) or raw.get("format") != MARKER_FORMAT:
            return None
        if raw.get("version") != MARKER_VERSION:
            return None
        return Marker.from_json(key, raw)

    def _save(self, marker: Marker) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        body = {"format": MARKER_FORMAT, "version": MARKER_VERSION, "key": marker.key, **marker.to_json()}
        with atomic_path(self.folder / f"{marker.key}{self.suffix}", fsync=self.fsync) as tmp:
            tmp.write_text(json_text(body))

    def _drop(self, keys: tuple[str, ...]) -> None:
        for key in keys:
            (self.folder / f"{key}{self.suffix}").unlink(missing_ok=True)

    def _keys(self, pattern: str) -> list[str]:
        n = len(self.suffix)
        return [p.name[:-n] for p in sorted(self.folder.glob(f"{pattern}{self.suffix}")) if p.is_file()]

    # the API
    def done(self, key: str, *, inputs: Inputs = (), params: Any = None) -> Marker | None:
        """The marker of job ``key`` if the job needs no redo: recorded with this fingerprint of
        ``inputs`` and ``params``, every output intact. None otherwise."""
        marker = self._load(key)
        if marker is None or marker.fingerprint != fingerprint(inputs, params):
            return None
        return marker if marker.intact(self.root) else None

    def record(self, key: str, *, inputs: Inputs = (), params: Any = None,
               outputs: Iterable[str | os.PathLike] = (), at_least: dict[Any, int] | None = None,
               info: dict[str, Any] | None = None) -> Marker:
        """Record job ``key`` as done, once its ``outputs`` are in place (their sizes are taken now)."""
        sizes = {}
        for p in outputs:
            rel = self._rel(p)
            sizes[rel] = (self.root / rel).stat().st_size
        marker = Marker(key, fingerprint(inputs, params), sizes,
                        {self._rel(p): int(n) for p, n in (at_least or {}).items()}, dict(info or {}))
        self._save(marker)
        return marker

    def forget(self, *keys: str) -> None:
        """Drop these jobs' markers: they will be redone."""
        self._drop(keys)

    def clear(self) -> None:
        """Drop every marker (a run starting afresh, or one that is over)."""
        self._drop(tuple(self._keys("*")))

    def markers(self, pattern: str = "*") -> dict[str, Marker]:
        """Key -> marker of every recorded job (keys matching ``pattern``) whose outputs are intact,
        whatever its fingerprint: for jobs identified by where the ledger is."""
        out = {}
        for key in self._keys(pattern):
            marker = self._load(key)
            if marker is not None and marker.intact(self.root):
                out[key] = marker
        return out

    def _rel(self, path: str | os.PathLike) -> str:
        p = Path(path)
        if p.is_absolute():
            try:
                return p.relative_to(self.root).as_posix()
            except ValueError:
                return str(p)
        return p.as_posix()


class LedgerFile(Ledger):
    """The same markers kept in one JSON file ``path`` that one process writes (rewritten whole at
    each ``record``): ``{"format": kind, "fingerprint": scope, "ledger": version, "markers": {...}}``.
    ``scope`` identifies the run: markers of another kind, scope or layout are not loaded, and the
    first ``record``/``forget``/``clear`` replaces them."""

    def __init__(self, path: str | os.PathLike, *, kind: str, scope: str,
                 root: str | os.PathLike | None = None, fsync: bool = True) -> None:
        path = Path(path)
        super().__init__(path.parent, root=root, fsync=fsync)
        self.path, self.kind, self.scope = path, kind, scope
        raw = _read_json(path)
        self._markers: dict[str, Marker] = {}
        if (isinstance(raw, dict) and raw.get("format") == kind and raw.get("fingerprint") == scope
                and raw.get("ledger") == MARKER_VERSION and isinstance(raw.get("markers"), dict)):
            for key, body in raw["markers"].items():
                marker = Marker.from_json(str(key), body)
                if marker is not None:
                    self._markers[marker.key] = marker

    @staticmethod
    def scope_of(path: str | os.PathLike, kind: str) -> str | None:
        """The scope of the ledger file ``path`` if it is one of ``kind`` (of any layout), else None."""
        raw = _read_json(Path(path))
        if isinstance(raw, dict) and raw.get("format") == kind and isinstance(raw.get("fingerprint"), str):
            return raw["fingerprint"]
        return None

    def _write(self) -> None:
        body = {"format": self.kind, "fingerprint": self.scope, "ledger": MARKER_VERSION,
                "markers": {key: m.to_json() for key, m in self._markers.items()}}
        with atomic_path(self.path, fsync=self.fsync) as tmp:
            tmp.write_text(json_text(body))

    def _load(self, key: str) -> Marker | None:
        return self._markers.get(key)

    def _save(self, marker: Marker) -> None:
        self._markers.pop(marker.key, None)  # a redone job goes last, as it finished
        self._markers[marker.key] = marker
        self._write()

    def _drop(self, keys: tuple[str, ...]) -> None:
        for key in keys:
            self._markers.pop(key, None)
        self._write()

    def _keys(self, pattern: str) -> list[str]:
        from fnmatch import fnmatchcase

        return [key for key in self._markers if fnmatchcase(key, pattern)]
