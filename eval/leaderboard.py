"""Leaderboard over training runs: each run's main metric per task and their average.

A runs folder holds one run folder per subset/seed (``dcdb train --output RUNS/<name>``), each
evaluated (``eval_results.jsonl``). :func:`collect` reads them, :func:`to_markdown` prints the
table (best average first), :func:`plot` draws a PNG bar chart with Pillow (no matplotlib needed).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcdb.errors import EvalError

from .metrics import average_main_metric
from .runner import RESULTS, read_results


@dataclass
class Row:
    """One run of the leaderboard."""

    run: str
    path: Path
    scores: dict[str, float | None]  # task display name -> main metric
    average: float | None
    samples: int | None  # training samples in the run's data
    scale: str | None
    seed: int | None


def collect(runs_dir: str | os.PathLike) -> tuple[list[Row], list[str]]:
    """Rows of every evaluated run under ``runs_dir`` (best average first) and the task names."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise EvalError(f"runs folder {str(runs_dir)!r} does not exist", hint="give the folder holding the runs' eval_results.jsonl files")
    candidates = [runs_dir] if (runs_dir / RESULTS).is_file() else sorted(p for p in runs_dir.iterdir() if p.is_dir())
    rows, tasks = [], []
    for run in candidates:
        if not (run / RESULTS).is_file():
            continue
        results = list(read_results(run / RESULTS).values())
        for r in results:
            if r["dataset"] not in tasks:
                tasks.append(r["dataset"])
        info = _info(run)
        rows.append(Row(
            run=run.name,
            path=run,
            scores={r["dataset"]: r["metrics"].get("main_metric") for r in results},
            average=average_main_metric(results),
            samples=(info.get("data") or {}).get("samples"),
            scale=info.get("scale"),
            seed=info.get("seed"),
        ))
    if not rows:
        raise EvalError(f"no evaluated run in {str(runs_dir)!r}",
                        hint=f"run `dcdb eval RUN --tasks DIR` on each run first (it writes {RESULTS})")
    rows.sort(key=lambda r: (r.average is None, -(r.average or 0.0), r.run))
    return rows, tasks


def _info(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / "info.json").read_text())
    except (OSError, ValueError):
        return {}


def _cell(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def to_markdown(rows: list[Row], tasks: list[str]) -> str:
    """The leaderboard as a markdown table."""
    head = ["run", "scale", "seed", "samples", *tasks, "average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 4 + "---:|" * (len(tasks) + 1)]
    for r in rows:
        cells = [r.run, r.scale or "–", "–" if r.seed is None else str(r.seed),
                 "–" if r.samples is None else f"{r.samples:,}",
                 *(_cell(r.scores.get(t)) for t in tasks), f"**{_cell(r.average)}**"]
        lines.append("| " + " | ".join(cells) + " |")
    incomplete = [r.run for r in rows if any(t not in r.scores for t in tasks)]
    if incomplete:
        lines.append("")
        lines.append(f"Not evaluated on every task (averages not comparable): {', '.join(incomplete)}")
    return "\n".join(lines)


PALETTE = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188), (0, 172, 193),
           (255, 112, 67), (158, 157, 36), (92, 107, 192), (240, 98, 146)]


def plot(rows: list[Row], tasks: list[str], path: str | os.PathLike, *, title: str = "Zero-shot main metric by run") -> Path:
    """A horizontal grouped bar chart (one group per run: its tasks, then its average) as PNG."""
    from PIL import Image, ImageDraw, ImageFont

    from dcdb.io import atomic_path

    series = [*tasks, "average"]
    bar, gap, label_w, chart_w, top = 14, 14, 220, 560, 70
    height = top + len(rows) * (bar * len(series) + gap) + 30
    img = Image.new("RGB", (label_w + chart_w + 80, height), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)
    d.text((10, 8), title, fill="black", font=font)
    x = 10
    for i, name in enumerate(series):  # legend
        color = (40, 40, 40) if name == "average" else PALETTE[i % len(PALETTE)]
        d.rectangle([x, 34, x + 12, 46], fill=color)
        d.text((x + 16, 32), name, fill="black", font=font)
        x += 16 + int(d.textlength(name, font=font)) + 18
    y = top
    for row in rows:
        d.text((10, y + (bar * len(series)) // 2 - 7), row.run[:30], fill="black", font=font)
        for i, name in enumerate(series):
            v = row.average if name == "average" else row.scores.get(name)
            color = (40, 40, 40) if name == "average" else PALETTE[i % len(PALETTE)]
            if v is not None:
                w = int(chart_w * max(0.0, min(1.0, v)))
                d.rectangle([label_w, y, label_w + max(w, 1), y + bar - 2], fill=color)
                d.text((label_w + w + 4, y - 1), f"{v:.3f}", fill="black", font=font)
            y += bar
        y += gap
    d.line([label_w, top - 4, label_w, y], fill="black")
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path
