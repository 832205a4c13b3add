"""A toy world of coloured shapes: training shards and evaluation tasks in seconds.

For tests, benchmarks and smoke runs of ``dcdb train`` / ``dcdb eval`` (the demo world of ``dcdb
world`` is the full-size version with defects). Every image is one shape of one colour on a noisy
background, with a caption naming both, so a tiny CLIP learns it in a few hundred steps.

- :func:`write_toy_shards` writes shards in the resharder's layout (``%08d.tar`` with ``uid-j``
  keys holding ``.jpg`` + ``.txt`` + ``.json``, written by :mod:`dcdb.tario` as the resharder
  writes its tars, ``%08d_stats.json``, ``meta.json``).
- :func:`write_toy_tasks` writes a classification task (``shapes``: colour x shape), a coarser one
  (``forms``: shape only) and a retrieval task (``toy_retrieval``) in clip_benchmark's layout, with
  a ``tasklist.json``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dcdb.io import write_json
from dcdb.demo.world import encode_image
from dcdb.tario import write_sample_shards

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
CAPTIONS = (
    "a {color} {shape}",
    "a photo of a {color} {shape}",
    "{color} {shape} on a grey background",
    "a drawing of a {shape} in {color}",
)
TEMPLATES = ("a photo of a {c}.", "a drawing of a {c}.", "a {c}.")


def concepts() -> list[tuple[str, str]]:
    """All (colour, shape) pairs, in a fixed order."""
    return [(c, s) for s in SHAPES for c in COLORS]


def draw(color: str, shape: str, rng: np.random.Generator, size: int = 64):
    """One PIL image: ``shape`` in ``color`` at a random place and scale on a noisy grey background."""
    from PIL import Image, ImageDraw

    base = rng.integers(90, 170)
    noise = rng.normal(0, 12, (size, size, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.34) * size
    cx, cy = rng.uniform(r, size - r, 2)
    fill = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLORS[color])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        d.polygon(pts, fill=fill)
    else:  # cross
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return img


def toy_samples(n: int, seed: int, size: int = 64) -> Iterator[tuple[str, str, object, str]]:
    """``n`` samples ``(colour, shape, image, caption)`` drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    pairs = concepts()
    for _ in range(n):
        color, shape = pairs[rng.integers(len(pairs))]
        template = CAPTIONS[rng.integers(len(CAPTIONS))]
        yield color, shape, draw(color, shape, rng, size), template.format(color=color, shape=shape)


def write_toy_shards(folder: str | os.PathLike, n: int = 256, *, seed: int = 0, shard_size: int = 100,
                     size: int = 64) -> Path:
    """Write ``n`` toy samples as resharder output into a new ``folder``; return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=False)
    rng = np.random.default_rng(seed + 1)

    def samples() -> Iterator[dict]:
        for i, (color, shape, img, text) in enumerate(toy_samples(n, seed, size)):
            uid = f"{int(rng.integers(0, 2**63)):016x}{i:016x}"
            meta = {"uid": uid, "caption": text, "key": f"{i:09d}", "status": "success",
                    "width": size, "height": size, "original_width": size, "original_height": size}
            yield {"__key__": f"{uid}-0", "jpg": encode_image(img, "JPEG", 90), "txt": text, "json": json.dumps(meta)}

    counts = write_sample_shards(folder, "{:08d}.tar", samples(), shard_size)
    for k, c in enumerate(counts):
        write_json(folder / f"{k:08d}_stats.json", {"successes": c})
    write_json(folder / "meta.json", {"output_shard_count": len(counts), "output_shard_format": "{:08d}.tar",
                                      "samples": n, "generator": "dcdb.demo.toy", "seed": seed})
    return folder


def write_toy_tasks(folder: str | os.PathLike, n: int = 96, *, seed: int = 1, size: int = 64) -> Path:
    """Write three toy evaluation tasks and their ``tasklist.json`` into ``folder``; return it."""
    from dcdb.eval.tasks import write_task, write_tasklist

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = concepts()
    samples = list(toy_samples(n, seed, size))
    write_task(folder / "shapes",
               ((img, pairs.index((c, s))) for c, s, img, _ in samples),
               classnames=[f"{c} {s}" for c, s in pairs], templates=TEMPLATES, shard_size=max(1, n // 2))
    write_task(folder / "forms",
               ((img, SHAPES.index(s)) for _, s, img, _ in samples),
               classnames=list(SHAPES), templates=TEMPLATES)
    write_task(folder / "toy_retrieval",
               ((img, [text, f"a {c} {s}"]) for c, s, img, text in samples[: max(1, n // 2)]))
    write_tasklist(folder, {
        "shapes": {"name": "Toy shapes", "main_metric": "acc1", "type": "classification"},
        "forms": {"name": "Toy forms", "main_metric": "mean_per_class_recall", "type": "classification"},
        "toy_retrieval": {"name": "Toy retrieval", "main_metric": "mean_recall@1", "type": "retrieval"},
    })
    return folder
