"""Evaluation tasks stored locally in clip_benchmark's webdataset layout, and the task list.

A task folder (what DataComp's ``download_evalsets.py`` fetches, ``wds_<key with / -> ->_test``)::

    TASK/classnames.txt                          one class name per line (classification)
    TASK/zeroshot_classification_templates.txt   one prompt per line, ``{c}`` = the class name
    TASK/dataset_type.txt                        optional: "retrieval" (else classification)
    TASK/test/nshards.txt                        number of shards n
    TASK/test/0.tar ... TASK/test/{n-1}.tar      samples: an image (.webp/.png/.jpg/.jpeg) and
                                                 .cls (class index) or .txt (captions, one a line)

A tasks folder holds one subfolder per task and optionally a task list, ``tasklist.yml`` in
DataComp's format (``key: {name, main_metric, ...}``; needs PyYAML) or ``tasklist.json`` (the same
mapping as JSON). An entry may add ``type: classification|retrieval`` (clip_benchmark's
``zeroshot_...`` names work too); otherwise the type comes from ``dataset_type.txt``, else from the
key (``retrieval/...``, as in DataComp). Without a task list every subfolder with
``test/nshards.txt`` is a task. Main metric defaults: ``acc1`` for
classification, ``mean_recall@1`` for retrieval.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcdb.errors import OutputError, TaskError
from dcdb.io import atomic_path
from dcdb.tario import write_sample_shards

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"
SPLIT = "test"
NSHARDS = "nshards.txt"
TASKLISTS = ("tasklist.yml", "tasklist.yaml", "tasklist.json")
IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
TYPES = ("classification", "retrieval")
DEFAULT_MAIN_METRIC = {"classification": "acc1", "retrieval": "mean_recall@1"}


@dataclass(frozen=True)
class Task:
    """One evaluation task: where it lives and how it is scored."""

    key: str  # the task list key (``eval_results.jsonl``'s "key")
    name: str  # display name (``eval_results.jsonl``'s "dataset")
    type: str  # "classification" or "retrieval"
    main_metric: str
    path: Path
    size: int | None = None

    @property
    def shards(self) -> list[str]:
        return shard_paths(self.path)

    def classnames(self) -> list[str]:
        return read_lines(self.path / CLASSNAMES)

    def templates(self) -> list[str]:
        templates = read_lines(self.path / TEMPLATES)
        for i, t in enumerate(templates, 1):
            if "{c}" not in t:
                raise TaskError(f"{str(self.path / TEMPLATES)!r} line {i} has no {{c}} placeholder: {t!r}",
                                hint="write each template with {c} where the class name goes")
        return templates


# ------------------------------------------------------------------------------- reading


def read_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines of a required text file (``TaskError`` naming it if missing/empty)."""
    if not path.is_file():
        raise TaskError(f"task file missing: {str(path)!r}", hint=_layout_hint())
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise TaskError(f"task file {str(path)!r} is empty", hint="rewrite the task folder")
    return lines


def shard_paths(folder: Path) -> list[str]:
    """``test/0.tar .. test/{n-1}.tar`` of a task folder, checked to exist."""
    nshards_file = folder / SPLIT / NSHARDS
    if not nshards_file.is_file():
        raise TaskError(f"task file missing: {str(nshards_file)!r}", hint=_layout_hint())
    try:
        n = int(nshards_file.read_text().strip())
    except ValueError:
        raise TaskError(f"{str(nshards_file)!r} must hold the number of shards, an integer", hint="e.g. 1") from None
    if n < 1:
        raise TaskError(f"{str(nshards_file)!r} says {n} shards; a task needs at least one", hint="rewrite the task folder")
    paths = [folder / SPLIT / f"{i}.tar" for i in range(n)]
    for p in paths:
        if not p.is_file():
            raise TaskError(f"task file missing: {str(p)!r} ({NSHARDS} says {n} shards)", hint=_layout_hint())
    return [str(p) for p in paths]


def _layout_hint() -> str:
    return (f"a task folder needs {SPLIT}/{NSHARDS} and {SPLIT}/0.tar..; classification tasks also "
            f"{CLASSNAMES} and {TEMPLATES}")


def task_type(folder: Path, key: str, declared: str | None = None) -> str:
    """Declared type, else ``dataset_type.txt``, else DataComp's key convention.

    clip_benchmark's names (``zeroshot_classification``, ``zeroshot_retrieval``) are accepted too.
    """
    if declared is None and (folder / DATASET_TYPE).is_file():
        declared = (folder / DATASET_TYPE).read_text().strip().lower() or None
    if declared:
        declared = str(declared).lower().removeprefix("zeroshot_")
    kind = declared or ("retrieval" if key.startswith("retrieval/") else "classification")
    if kind not in TYPES:
        raise TaskError(f"task {key!r} has type {kind!r}", hint=f"use one of: {', '.join(TYPES)}")
    return kind


def validate_task(task: Task) -> None:
    """Raise ``TaskError`` naming the first missing or malformed file of ``task``."""
    if not task.path.is_dir():
        raise TaskError(f"task folder {str(task.path)!r} does not exist", hint="check --tasks, or write the tasks with `dcdb world`")
    shard_paths(task.path)
    if task.type == "classification":
        task.classnames()
        task.templates()


def load_tasklist(tasks_dir: Path) -> dict[str, dict[str, Any]] | None:
    """The task list of ``tasks_dir`` as ``{key: entry}``, or None if it has none."""
    for name in TASKLISTS:
        path = tasks_dir / name
        if path.is_file():
            return _parse_tasklist(path)
    return None


def _parse_tasklist(path: Path) -> dict[str, dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TaskError(f"cannot parse task list {str(path)!r}: {exc}", hint="fix the YAML (DataComp's tasklist.yml layout)") from None
    else:
        try:
            import yaml
        except ImportError:
            raise TaskError(f"reading {str(path)!r} needs PyYAML",
                            hint="pip install pyyaml, or write the same mapping as tasklist.json") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise TaskError(f"cannot parse task list {str(path)!r}: {exc}", hint="fix the YAML (DataComp's tasklist.yml layout)") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise TaskError(f"task list {str(path)!r} must map each task key to its settings",
                        hint="e.g. shapes: {name: Shapes, main_metric: acc1}")
    return {str(k): v for k, v in data.items()}


def task_folder(tasks_dir: Path, key: str) -> Path:
    """``TASKS/<key>``, or DataComp's download name ``TASKS/wds_<key, / -> ->_test``."""
    candidates = [tasks_dir / key, tasks_dir / f"wds_{key.replace('/', '-')}_test"]
    for c in candidates:
        if c.is_dir():
            return c
    raise TaskError(
        f"task {key!r} has no folder in {str(tasks_dir)!r}",
        hint="looked for " + " and ".join(repr(c.name if c.parent == tasks_dir else str(c)) for c in candidates),
    )


def load_tasks(tasks_dir: str | os.PathLike, only: Sequence[str] | None = None) -> list[Task]:
    """The tasks of ``tasks_dir`` in task-list order (or folder order), validated.

    ``only`` restricts to these keys or names.
    """
    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise TaskError(f"tasks folder {str(tasks_dir)!r} does not exist", hint="check --tasks, or write the tasks with `dcdb world`")
    listed = load_tasklist(tasks_dir)
    if listed is None:
        listed = {p.name: {} for p in sorted(tasks_dir.iterdir()) if (p / SPLIT / NSHARDS).is_file()}
        if not listed:
            raise TaskError(f"{str(tasks_dir)!r} holds no task", hint=f"add a task list ({TASKLISTS[0]}) or "
                            f"task folders with {SPLIT}/{NSHARDS}")
    if only:
        wanted = set(only)
        unknown = wanted - set(listed) - {e.get("name", k) for k, e in listed.items()}
        if unknown:
            raise TaskError(f"unknown task(s): {', '.join(sorted(unknown))}",
                            hint=f"tasks in {str(tasks_dir)!r}: {', '.join(listed)}")
        listed = {k: e for k, e in listed.items() if k in wanted or e.get("name", k) in wanted}
    tasks = [_make_task(tasks_dir, key, entry) for key, entry in listed.items()]
    for task in tasks:
        validate_task(task)
    return tasks


def _make_task(tasks_dir: Path, key: str, entry: dict[str, Any]) -> Task:
    folder = task_folder(tasks_dir, key)
    kind = task_type(folder, key, entry.get("type"))
    size = entry.get("size")
    return Task(
        key=key,
        name=str(entry.get("name", key)),
        type=kind,
        main_metric=str(entry.get("main_metric", DEFAULT_MAIN_METRIC[kind])),
        path=folder,
        size=int(size) if size is not None else None,
    )


# ------------------------------------------------------------------------------- writing


def encode_image(image, fmt: str = "webp") -> bytes:
    """Encode a PIL image (or pass bytes through) for a task shard."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    buf = io.BytesIO()
    image.save(buf, format={"jpg": "JPEG"}.get(fmt, fmt.upper()), **({"lossless": True} if fmt == "webp" else {}))
    return buf.getvalue()


def write_task(
    folder: str | os.PathLike,
    samples: Iterable[tuple[Any, int | str | Sequence[str]]],
    *,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    image_format: str = "webp",
    shard_size: int = 1000,
) -> Path:
    """Write a task folder in clip_benchmark's layout, atomically.

    ``samples`` yields ``(image, target)``: a class index with ``classnames`` and ``templates``
    (classification), or a caption / list of captions without them (retrieval). ``image`` is a
    PIL image or encoded bytes (then ``image_format`` must name their format).
    """
    if image_format not in IMAGE_EXTS:
        raise TaskError(f"image format {image_format!r} is not one of {', '.join(IMAGE_EXTS)}", hint="use one of those")
    retrieval = classnames is None
    if retrieval != (templates is None):
        raise TaskError("give both classnames and templates (classification) or neither (retrieval)",
                        hint="a classification task needs classnames.txt and zeroshot_classification_templates.txt")
    folder = Path(folder)
    if folder.exists():
        raise OutputError(f"task folder {str(folder)!r} already exists", hint="remove it or choose another name")
    if shard_size < 1:
        raise TaskError(f"shard_size must be at least 1, got {shard_size}", hint="give the samples per shard")

    def encoded() -> Iterator[dict[str, Any]]:
        for i, (image, target) in enumerate(samples):
            sample = {"__key__": f"s{i:08d}", image_format: encode_image(image, image_format)}
            if retrieval:
                captions = [target] if isinstance(target, str) else list(target)
                sample["txt"] = "\n".join(c.replace("\n", " ") for c in captions)
            else:
                sample["cls"] = int(target)
            yield sample

    with atomic_path(folder) as tmp:
        (tmp / SPLIT).mkdir(parents=True)
        counts = write_sample_shards(tmp / SPLIT, "{}.tar", encoded(), shard_size)
        n, nshards = sum(counts), len(counts)
        if n == 0:
            raise TaskError(f"no samples to write to task {str(folder)!r}", hint="give at least one sample")
        (tmp / SPLIT / NSHARDS).write_text(f"{nshards}\n")
        if retrieval:
            (tmp / DATASET_TYPE).write_text("retrieval\n")
        else:
            (tmp / CLASSNAMES).write_text("".join(f"{c}\n" for c in classnames), encoding="utf-8")
            (tmp / TEMPLATES).write_text("".join(f"{t}\n" for t in templates), encoding="utf-8")
    return folder


def write_tasklist(tasks_dir: str | os.PathLike, tasks: dict[str, dict[str, Any]]) -> Path:
    """Write ``tasklist.json`` (``{key: {name, main_metric, type, ...}}``) into ``tasks_dir``."""
    from dcdb.io import write_json

    return write_json(Path(tasks_dir) / "tasklist.json", tasks)
