"""Training data: find the shards, check they hold samples, and stream them with webdataset 1.x.

Input is a resharder output folder (``meta.json`` with ``output_shard_count`` and
``output_shard_format``, as DataComp's ``train.py`` reads it), any folder of ``*.tar`` shards, or
one ``.tar`` file. A sample is a tar key with an image (``.jpg``/``.jpeg``/``.png``/``.webp``) and a
caption (``.txt``); other members (``.json``...) are ignored.

The stream is the one ``open_clip_train`` builds for DataComp (``--dataset-resampled``), made of
webdataset 1.x's own stages: shards drawn with replacement, samples shuffled through a buffer,
images decoded to RGB and transformed by open_clip's train transform, captions tokenized by the
model's open_clip tokenizer, full batches only. ``open_clip_train.data`` itself cannot be used:
its tar grouping breaks on webdataset 1.x's end-of-shard marker (``KeyError: 'fname'``).
One pipeline serves a whole training call; its shard draws and shuffle are seeded by the run's seed,
the 'epoch' it starts at (so a resumed run does not replay the data it already saw) and the
dataloader worker index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcdb.errors import TrainError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_BUFSIZE = 5000  # open_clip_train's _SAMPLE_SHUFFLE_SIZE
SHUFFLE_INITIAL = 1000  # open_clip_train's _SAMPLE_SHUFFLE_INITIAL


@dataclass(frozen=True)
class ShardSet:
    """The training shards of one data folder and what is known about them."""

    root: str
    shards: tuple[str, ...]
    num_samples: int  # image+caption samples (from _stats.json files, else counted in the tars)
    fingerprint: str  # changes when a shard is added, removed, renamed or resized
    source: str  # "meta.json", "folder" or "file"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.root,
            "source": self.source,
            "shards": len(self.shards),
            "samples": self.num_samples,
            "fingerprint": self.fingerprint,
        }


# --------------------------------------------------------------------------------- discovery


def find_shards(data: str | os.PathLike) -> ShardSet:
    """Resolve ``data`` (folder or ``.tar``) to its shards; raise ``TrainError`` if it has no samples."""
    root = Path(data)
    if not root.exists():
        raise TrainError(f"training data {str(root)!r} does not exist", hint="give a resharder output folder")
    if root.is_file():
        if root.suffix != ".tar":
            raise TrainError(f"training data {str(root)!r} is not a .tar shard or a folder of them")
        shards, source = [root], "file"
    elif (root / "meta.json").is_file():
        shards, source = _shards_from_meta(root), "meta.json"
    else:
        shards, source = sorted(root.glob("*.tar")) or sorted(root.rglob("*.tar")), "folder"
    if not shards:
        raise TrainError(
            f"no training data: {str(root)!r} holds no .tar shards",
            hint="point --data at the output folder of `dcdb reshard` (or any folder of webdataset .tar shards)",
        )
    num_samples = count_samples(shards)
    if num_samples == 0:
        raise TrainError(
            f"no training data: the {len(shards)} shard(s) in {str(root)!r} hold no sample with both an "
            f"image ({'/'.join('.' + e for e in IMAGE_EXTS)}) and a caption (.txt)",
            hint="check the filter kept rows and the resharder found their images",
        )
    return ShardSet(
        root=str(root.resolve()),
        shards=tuple(str(s) for s in shards),
        num_samples=num_samples,
        fingerprint=fingerprint(shards, num_samples),
        source=source,
    )


def _shards_from_meta(root: Path) -> list[Path]:
    """The shard list a resharder's ``meta.json`` names (DataComp's ``train.py`` does the same)."""
    try:
        meta = json.loads((root / "meta.json").read_text())
        count = int(meta["output_shard_count"])
        fmt = str(meta.get("output_shard_format", "{:08d}.tar"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainError(
            f"cannot read the shard list from {str(root / 'meta.json')!r}: {exc}",
            hint="meta.json needs output_shard_count and output_shard_format",
        ) from None
    shards = [root / fmt.format(i) for i in range(count)]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise TrainError(
            f"{str(root / 'meta.json')!r} lists {count} shards but {len(missing)} are missing "
            f"(first: {missing[0]})",
            hint="re-run the resharder, or copy the whole folder",
        )
    return shards


def count_samples(shards: list[Path]) -> int:
    """Image+caption samples in ``shards``: a shard's ``_stats.json`` count when it has one, else
    counted from the tar's member names (headers only, no image is read)."""
    total = 0
    for shard in shards:
        stats = shard.with_name(f"{shard.stem}_stats.json")
        n = _successes(stats) if stats.is_file() else None
        total += _count_tar_samples(shard) if n is None else n
    return total


def _successes(stats: Path) -> int | None:
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _count_tar_samples(shard: Path) -> int:
    """Keys that have an image and a ``.txt`` member, grouped like webdataset (stem up to the first dot)."""
    from webdataset.tariterators import base_plus_ext

    exts: dict[str, set[str]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = base_plus_ext(member.name)
                if key is not None:
                    exts.setdefault(key, set()).add(ext.lower())
    except (OSError, tarfile.TarError) as exc:
        raise TrainError(f"cannot read shard {str(shard)!r}: {exc}", hint="the file is not a tar") from None
    return sum(1 for e in exts.values() if "txt" in e and not e.isdisjoint(IMAGE_EXTS))


def fingerprint(shards: list[Path], num_samples: int) -> str:
    """A short hash of the shard names and sizes and the sample count (not of their paths)."""
    h = hashlib.sha256(str(num_samples).encode())
    for shard in shards:
        h.update(f"\0{shard.name}\0{shard.stat().st_size}".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------- stream


def _log_and_continue(exn: Exception) -> bool:
    """webdataset handler: skip a bad sample or shard with a log line (open_clip does the same)."""
    log.warning("skipping a training sample: %r", exn)
    return True


def _open_local(src: Iterator[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """Open each local shard ``{"url": path}``; the file is closed even when the consumer stops
    mid-shard (webdataset's ``url_opener`` leaves that to the garbage collector)."""
    for source in src:
        try:
            with open(source["url"], "rb") as stream:
                yield {**source, "stream": stream}
        except OSError as exn:  # opening failed (reading happens downstream, outside this frame)
            if not handler(exn):
                raise


def tar_samples(handler: Callable[[Exception], bool]):
    """``wds.tarfile_to_samples`` for local shards: webdataset's own tar expansion and key grouping
    over :func:`_open_local`."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def stage(src: Iterator[dict]) -> Iterator[dict]:
        return group_by_keys(tar_file_expander(_open_local(src, handler), handler=handler), handler=handler)

    return stage


def _has_image_and_text(sample: dict[str, Any]) -> bool:
    return "txt" in sample and any(ext in sample for ext in IMAGE_EXTS)


def _image_and_text_only(sample: dict[str, Any]) -> dict[str, Any]:
    """Drop every member but the first image and the caption, so nothing else gets decoded."""
    ext = next(e for e in IMAGE_EXTS if e in sample)
    return {"__key__": sample["__key__"], ext: sample[ext], "txt": sample["txt"]}


class _Tokenize:
    """Picklable ``caption -> token tensor`` for dataloader workers."""

    def __init__(self, tokenizer: Callable):
        self.tokenizer = tokenizer

    def __call__(self, text: str):
        return self.tokenizer(text)[0]


def _seeded_shuffle(seed: int, bufsize: int = SHUFFLE_BUFSIZE, initial: int = SHUFFLE_INITIAL):
    """A shuffle stage whose RNG depends on ``seed`` and the dataloader worker index."""
    import webdataset as wds
    from webdataset.utils import make_seed, pytorch_worker_seed

    def stage(src: Iterator[dict]) -> Iterator[dict]:
        rng = random.Random(make_seed(seed, pytorch_worker_seed()))
        yield from wds.shuffle(bufsize, initial, rng=rng)(src)

    return stage


def sample_pipeline(shards: ShardSet, *, preprocess: Callable, tokenizer: Callable, batch_size: int,
                    seed: int, batches_per_worker: int):
    """The webdataset pipeline of a training stream: ``(images, tokens)`` batches, full ones only,
    ``batches_per_worker`` from each dataloader worker."""
    import webdataset as wds

    return wds.DataPipeline(
        wds.ResampledShards(list(shards.shards), seed=seed, deterministic=True),
        tar_samples(_log_and_continue),
        wds.select(_has_image_and_text),
        wds.map(_image_and_text_only),  # before the shuffle buffer: it holds no .json
        _seeded_shuffle(seed),
        wds.decode("pilrgb", handler=_log_and_continue),
        wds.rename(image=";".join(IMAGE_EXTS), text="txt"),
        wds.map_dict(image=preprocess, text=_Tokenize(tokenizer)),
        wds.to_tuple("image", "text"),
        wds.batched(batch_size, partial=False),
    ).with_epoch(nbatches=batches_per_worker)


def stream_batches(shards: ShardSet, *, preprocess: Callable, tokenizer: Callable, batch_size: int,
                   steps: int, seed: int, workers: int, pin_memory: bool = False) -> Iterator:
    """Exactly ``steps`` batches read by ``workers`` dataloader processes (0: in this process).

    One pipeline serves the whole call (workers start once, the shuffle buffer fills once); the
    shard draws, the shuffle and the random crops all follow from ``seed``.
    """
    import webdataset as wds

    pipeline = sample_pipeline(
        shards,
        preprocess=preprocess,
        tokenizer=tokenizer,
        batch_size=batch_size,
        seed=seed,
        batches_per_worker=-(-steps // max(1, workers)),
    )
    loader = wds.WebLoader(
        pipeline,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=pin_memory,
    )
    batches = iter(loader)
    try:
        for step in range(steps):
            try:
                if step == 0:
                    with warnings.catch_warnings():
                        # The first batch starts the worker processes. Lance (imported when this
                        # process ingested or read vectors) warns at every fork; the workers only
                        # read tar shards and never call Lance, so this fork is safe.
                        warnings.filterwarnings("ignore", message="lance is not fork-safe")
                        batch = next(batches)
                else:
                    batch = next(batches)
            except StopIteration:
                raise TrainError(f"the training stream ended after {step} of {steps} batches") from None
            yield batch
    finally:
        del batches  # shuts the dataloader workers down
