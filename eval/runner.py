"""``evaluate``: score a checkpoint on every task of a tasks folder into ``eval_results.jsonl``.

As DataComp's ``evaluate.py``: one JSON line per task ``{"key", "dataset", "metrics"}`` with
``metrics["main_metric"]`` set from the task list, appended as each task finishes, so a re-run skips
finished tasks; the average is the plain mean of ``main_metric`` over the scored tasks. Beside the
results, ``eval_info.json`` records which checkpoint they belong to: results of another checkpoint
(the run was trained further, say) are refused unless ``overwrite=True`` starts them afresh.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcdb.errors import EvalError
from dcdb.io import atomic_path, prepare_folder, write_json

from .metrics import average_main_metric
from .model import Target, load_model, resolve_target
from .tasks import Task, load_tasks
from .zeroshot import EVALUATORS

RESULTS = "eval_results.jsonl"
EVAL_INFO = "eval_info.json"


@dataclass
class EvalResult:
    """What :func:`evaluate` found and did."""

    output: Path  # the eval_results.jsonl
    model: str
    checkpoint: Path
    results: list[dict[str, Any]]  # one per task of the task list, in its order
    evaluated: list[str] = field(default_factory=list)  # task keys scored by this call
    skipped: list[str] = field(default_factory=list)  # task keys already in the results
    seconds: float = 0.0

    @property
    def average(self) -> float | None:
        return average_main_metric(self.results)

    def table(self) -> str:
        """A small markdown table: task, main metric name, value; then the average."""
        rows = ["| task | metric | value |", "|---|---|---|"]
        for r in self.results:
            main = r["metrics"].get("main_metric")
            rows.append(f"| {r['dataset']} | {r.get('main_metric_name', '')} | {_fmt(main)} |")
        rows.append(f"| **average** | | {_fmt(self.average)} |")
        return "\n".join(rows)

    def summary(self) -> str:
        return (f"evaluated {len(self.evaluated)} task(s), skipped {len(self.skipped)} already done; "
                f"average {_fmt(self.average)} over {len(self.results)} task(s) -> {self.output}")


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def evaluate(
    target: str | os.PathLike,
    tasks_dir: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    model: str | None = None,
    tasks: Sequence[str] | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Zero-shot evaluate a run folder or checkpoint on the tasks in ``tasks_dir``.

    Results go to ``OUTPUT/eval_results.jsonl`` (``output`` defaults to the run folder). ``model``
    names the architecture of a checkpoint that does not record it; ``tasks`` restricts to some task
    keys or names. Finished tasks are skipped; ``overwrite`` discards earlier results.
    """
    from dcdb.openmp import prefer_short_openmp_spin

    prefer_short_openmp_spin()
    say = log or (lambda msg: None)
    if output is not None:
        prepare_folder(output, create=False, what="results folder")
    resolved = resolve_target(target, model)
    task_list = load_tasks(tasks_dir, tasks)
    out_dir = _output_dir(output, resolved)
    results_path = out_dir / RESULTS
    done = _prepare_output(out_dir, resolved, overwrite)
    todo = [t for t in task_list if t.key not in done]
    t0 = time.perf_counter()
    evaluated = []
    if todo:
        import torch

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        net, transform, tokenizer = load_model(resolved, dev)
        for task in todo:
            say(f"evaluating {task.name} ({task.type}, {task.main_metric})")
            line = _run_task(net, transform, tokenizer, task, say, device=dev, batch_size=batch_size, workers=workers)
            _append(results_path, line)
            done[task.key] = line
            evaluated.append(task.key)
            say(f"  {task.name}: {task.main_metric} = {_fmt(line['metrics']['main_metric'])}")
    results = [dict(done[t.key], main_metric_name=t.main_metric) for t in task_list]
    return EvalResult(
        output=results_path,
        model=resolved.model,
        checkpoint=resolved.checkpoint,
        results=results,
        evaluated=evaluated,
        skipped=[t.key for t in task_list if t.key not in evaluated],
        seconds=time.perf_counter() - t0,
    )


def _run_task(model, transform, tokenizer, task: Task, say: Callable[[str], None], **kw: Any) -> dict[str, Any]:
    """One result line. A main metric dcdb does not compute (DataComp's WILDS F1, say) is None, as in
    DataComp's evaluate.py, and the task then does not count in the average."""
    metrics = EVALUATORS[task.type](model, transform, tokenizer, task, **kw)
    if task.main_metric not in metrics:
        say(f"  note: {task.name}: no metric {task.main_metric!r} (computed: "
            f"{', '.join(k for k in metrics if not k.startswith('num_'))}); main_metric is null")
    metrics["main_metric"] = metrics.get(task.main_metric)
    return {"key": task.key, "dataset": task.name, "metrics": metrics}


def _output_dir(output: str | os.PathLike | None, target: Target) -> Path:
    if output is not None:
        return Path(output)
    if target.run_dir is not None:
        return target.run_dir
    raise EvalError(f"where should the results of {str(target.checkpoint)!r} go?", hint="pass an output folder")


def read_results(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{key: line}`` of an ``eval_results.jsonl``; a torn last line (a killed run) is ignored."""
    path = Path(path)
    if not path.is_file():
        return {}
    out: dict[str, dict[str, Any]] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out[rec["key"]] = rec
        except (ValueError, KeyError, TypeError):
            if i == len(lines) - 1:
                continue
            raise EvalError(f"{str(path)!r} line {i + 1} is not a result line",
                            hint="remove the line, or pass --overwrite to evaluate afresh") from None
    return out


def _same_weights(previous: Any, identity: dict[str, Any]) -> bool:
    """Whether recorded results belong to these weights: the identities equal but for the
    checkpoint's path, so a run folder moved or copied elsewhere resumes its evaluation (the
    model, the file's size and the training metadata -- or the mtime of a bare .pt -- pin the
    weights; the path recorded stays for the message)."""
    if not isinstance(previous, dict):
        return False
    return {k: v for k, v in previous.items() if k != "checkpoint"} == {
        k: v for k, v in identity.items() if k != "checkpoint"}


def _prepare_output(out_dir: Path, target: Target, overwrite: bool) -> dict[str, dict[str, Any]]:
    """Check (or start) the results of ``target`` in ``out_dir``; return the finished ones."""
    prepare_folder(out_dir, what="results folder")
    results, info = out_dir / RESULTS, out_dir / EVAL_INFO
    previous = json.loads(info.read_text()) if info.is_file() else None
    if overwrite or previous is None:
        if results.exists() and not overwrite:
            raise EvalError(f"{str(results)!r} exists but has no {EVAL_INFO} saying which checkpoint it scores",
                            hint="pass --overwrite to evaluate afresh, or choose another output")
        results.unlink(missing_ok=True)
        write_json(info, {"identity": target.identity})
        return {}
    if not _same_weights(previous.get("identity"), target.identity):
        raise EvalError(
            f"{str(results)!r} holds results of another checkpoint "
            f"({previous.get('identity', {}).get('checkpoint')}, now {target.identity['checkpoint']}; "
            "the weights changed)",
            hint="pass --overwrite to evaluate the new checkpoint afresh, or choose another output",
        )
    done = read_results(results)
    _rewrite_clean(results, done)
    return done


def _rewrite_clean(path: Path, done: dict[str, dict[str, Any]]) -> None:
    """Drop a torn last line so that appends start on a fresh line."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    if text and (not text.endswith("\n") or len([l for l in text.splitlines() if l.strip()]) != len(done)):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in done.values()), encoding="utf-8")


def _append(path: Path, line: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())
