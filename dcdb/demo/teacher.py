"""The demo world's teachers: real tiny open_clip models whose embeddings make the pool's CLIP scores.

DataComp's pool ships ``clip_b32_similarity_score`` / ``clip_l14_similarity_score`` and the B/32 and
L/14 embeddings of every image and caption, computed by OpenAI's CLIP models. The demo world stands
them in with two small CLIPs trained by :func:`dcdb.train.train` on the world's separate clean split
(``OUT/teacher/shards``, no defects):

    ``b32`` <- ``dcdb-teacher-b32`` (scale ``teacher-b32``: dcdb-tiny's towers, 512-d like B/32)
    ``l14`` <- ``dcdb-teacher-l14`` (scale ``teacher-l14``: wider and deeper, 768-d like L/14)

then encodes the pool with them (:func:`dcdb.demo.world.write_pool_embeddings`, batched, on the CPU), so
a CLIP score means what it means in DataComp: a model that has learnt which captions go with which
images finds mismatched, junk and foreign-language captions less similar to their images.

Layout (kept with the world, the embedding space's model)::

    OUT/teacher/b32/checkpoints/epoch_latest.pt   (+ info.json: a dcdb.train run folder)
    OUT/teacher/l14/checkpoints/epoch_latest.pt
    OUT/world.json  embeddings.<space>.model = "dcdb-teacher-b32 (teacher/b32/checkpoints/epoch_latest.pt)"

Every step is resumable: a finished teacher is not retrained, a world whose embeddings were written
by the current checkpoints is not re-encoded.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dcdb.encoders import ClipEncoder

#: space -> training scale (whose recipe names the open_clip model)
TEACHERS: dict[str, str] = {"b32": "teacher-b32", "l14": "teacher-l14"}
#: Samples seen by each teacher unless told otherwise (the clean split is seen a few times over).
TEACHER_SAMPLES_SEEN = 16_000


def teacher_dir(world_dir: str | os.PathLike, space: str) -> Path:
    return Path(world_dir) / "teacher" / space


def train_teachers(
    world_dir: str | os.PathLike,
    *,
    spaces: Mapping[str, str] | None = None,
    samples_seen: int | None = TEACHER_SAMPLES_SEEN,
    batch_size: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train (or finish, or reuse) one teacher per space on ``OUT/teacher/shards``; space -> TrainResult."""
    from dcdb.train import train
    from dcdb.demo.world import load_world

    say = log or (lambda msg: None)
    load_world(world_dir)  # a clear error when the folder is not a world
    data = Path(world_dir) / "teacher" / "shards"
    results = {}
    for space, scale in (spaces or TEACHERS).items():
        out = teacher_dir(world_dir, space)
        res = train(data, out, scale, seed=seed, resume="latest", samples_seen=samples_seen,
                    batch_size=batch_size, workers=workers, progress=progress, log=log)
        say(f"teacher {space}: {res.summary()}")
        results[space] = res
    return results


#: The teachers' encoders are the core's (:class:`dcdb.encoders.ClipEncoder`): image and text towers of one
#: checkpoint, raw embeddings, as write_pool_embeddings wants them (it normalises; CPU, no grad).
Encoder = ClipEncoder


def _model_note(world_dir: Path, space: str, ckpt: Path, model: str) -> str:
    return f"{model} ({ckpt.relative_to(world_dir).as_posix()})"


def _checkpoint_stamp(ckpt: Path) -> str:
    st = ckpt.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def encode_pool(
    world_dir: str | os.PathLike,
    *,
    spaces: Mapping[str, str] | None = None,
    batch_size: int = 512,
    progress: bool = False,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the pool's embeddings and CLIP scores with the trained teachers; return world.json.

    Skipped when world.json already records embeddings from the same checkpoints (unless ``force``).
    """
    import torch

    from dcdb.train.checkpoint import LATEST
    from dcdb.demo.world import load_world, write_pool_embeddings

    world_dir = Path(world_dir)
    say = log or (lambda msg: None)
    manifest = load_world(world_dir)
    spaces = dict(spaces or TEACHERS)
    ckpts = {s: teacher_dir(world_dir, s) / "checkpoints" / LATEST for s in spaces}
    missing = [s for s, p in ckpts.items() if not p.is_file()]
    if missing:
        from dcdb.errors import UsageError

        raise UsageError(f"no trained teacher for space(s) {', '.join(missing)}",
                         hint="run train_teachers(world_dir) first")
    stamps = {s: _checkpoint_stamp(p) for s, p in ckpts.items()}
    done = manifest.get("embeddings") or {}
    if not force and all((done.get(s) or {}).get("checkpoint_stamp") == stamps[s] for s in spaces):
        say("pool embeddings are up to date with the teachers")
        return manifest
    encoders = {s: Encoder(p) for s, p in ckpts.items()}
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    manifest = write_pool_embeddings(
        world_dir,
        {s: e.images for s, e in encoders.items()},
        {s: e.texts for s, e in encoders.items()},
        spaces=tuple(spaces),
        batch_size=batch_size,
        models={s: _model_note(world_dir, s, ckpts[s], encoders[s].target.model) for s in spaces},
        progress=progress,
    )
    for s in spaces:
        manifest["embeddings"][s].update(
            checkpoint=ckpts[s].relative_to(world_dir).as_posix(),
            architecture=encoders[s].target.model,
            checkpoint_stamp=stamps[s],
        )
    from dcdb.io import write_json
    from dcdb.demo.world import MANIFEST

    write_json(world_dir / MANIFEST, manifest)
    say(f"encoded the pool with {len(spaces)} teachers in {time.perf_counter() - t0:.0f}s ({threads} threads)")
    return manifest


def build_teachers(world_dir: str | os.PathLike, *, samples_seen: int | None = TEACHER_SAMPLES_SEEN,
                   seed: int = 0, workers: int | None = None, progress: bool = False,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the teachers (resumable) and encode the pool with them; return world.json."""
    train_teachers(world_dir, samples_seen=samples_seen, seed=seed, workers=workers, progress=progress, log=log)
    return encode_pool(world_dir, progress=progress, log=log)


def scores_by_defect(world_dir: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Mean CLIP score per ground-truth defect and space: {defect: {"rows": n, "b32": m, "l14": m}}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dcdb.demo.world import load_world, read_truth

    world_dir = Path(world_dir)
    manifest = load_world(world_dir)
    meta = pa.concat_tables([pq.read_table(world_dir / p) for p in manifest["pool"]["metadata"]])
    defect = np.asarray(read_truth(world_dir).column("defect").to_pylist(), dtype=object)
    out: dict[str, dict[str, float]] = {}
    for d in sorted(set(defect), key=lambda x: (x != "none", x)):
        mask = defect == d
        row: dict[str, float] = {"rows": int(mask.sum())}
        for space in ("b32", "l14"):
            col = meta.column(f"clip_{space}_similarity_score").to_numpy(zero_copy_only=False)
            row[space] = float(np.nanmean(col[mask]))
        out[str(d)] = row
    return out


def format_scores(table: Mapping[str, Mapping[str, float]]) -> str:
    lines = ["| defect | rows | mean b32 score | mean l14 score |", "|---|---:|---:|---:|"]
    for d, r in table.items():
        lines.append(f"| {d} | {r['rows']:,} | {r['b32']:.3f} | {r['l14']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m dcdb.demo.teacher WORLD: scores per defect
    import sys

    print(format_scores(scores_by_defect(sys.argv[1])))
    print(json.dumps(json.loads((Path(sys.argv[1]) / "world.json").read_text())["embeddings"], indent=1))
