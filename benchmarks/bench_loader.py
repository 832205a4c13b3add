"""CPU cost of the training loader alone: dcdb's stream vs open_clip_train's per-sample pipeline.

    python benchmarks/bench_loader.py [--samples 2048] [--batches 60] [--batch 64] [--repeats 3]

Both read the same toy shards (resharder layout, 64-pixel JPEGs) in this process (no workers, one
torch thread), seeded, shards with replacement, through a 5000-sample shuffle buffer, into full
batches of float32 images and caption tokens:

- baseline: the pipeline ``open_clip_train`` builds for DataComp, made of webdataset 1.x stages:
  ``tarfile`` reading, ``decode("pilrgb")``, open_clip's train ``preprocess`` and the tokenizer per
  sample, then collation;
- dcdb: :func:`dcdb.train.data.sample_pipeline` (pread tar walker, PIL crop with a Python RNG,
  ``uint8`` batches tokenized per batch) plus the main process's per-batch normalisation.

Reports the best (and median) milliseconds of CPU per batch over ``--repeats`` and the ratio. The
first batches fill the shuffle buffer (two samples read per sample yielded until it holds 5000),
as at the start of every training run. Other programs on a shared machine slow both alike; CPU time
(not wall time) is measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def baseline_pipeline(shards, preprocess, tokenizer, batch: int, seed: int, batches: int):
    import webdataset as wds

    from dcdb.train.data import (
        IMAGE_EXTS,
        has_image_and_text,
        image_and_text_only,
        log_and_continue,
        seeded_shuffle,
        Tokenize,
        tar_samples,
    )

    return wds.DataPipeline(
        wds.ResampledShards(list(shards.shards), seed=seed, deterministic=True),
        tar_samples(log_and_continue),
        wds.select(has_image_and_text),
        wds.map(image_and_text_only),
        seeded_shuffle(seed),
        wds.decode("pilrgb", handler=log_and_continue),
        wds.rename(image=";".join(IMAGE_EXTS), text="txt"),
        wds.map_dict(image=preprocess, text=Tokenize(tokenizer)),
        wds.to_tuple("image", "text"),
        wds.batched(batch, partial=False),
    ).with_epoch(nbatches=batches)


def cpu_ms_per_batch(make, batches: int) -> float:
    t0 = time.process_time()
    n = sum(1 for _ in make())
    assert n == batches, n
    return (time.process_time() - t0) / n * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip
    import torch

    from dcdb.train import find_shards
    from dcdb.train.data import BatchTransform, sample_pipeline
    from dcdb.train.models import quiet_random_init, register_models
    from dcdb.demo.toy import write_toy_shards

    torch.set_num_threads(1)
    register_models()
    with quiet_random_init():
        _, preprocess, _ = open_clip.create_model_and_transforms("dcdb-tiny")
    tokenizer = open_clip.get_tokenizer("dcdb-tiny")
    transform = BatchTransform.from_preprocess(preprocess)

    def dcdb_stream(seed):
        for images, texts in sample_pipeline(shards, preprocess=preprocess, tokenizer=tokenizer,
                                             batch_size=args.batch, seed=seed, batches_per_worker=args.batches):
            yield transform.normalize(images), texts

    times: dict[str, list[float]] = {"baseline": [], "dcdb": []}
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dcdb-bench-loader-") as tmp:
        shards = find_shards(write_toy_shards(Path(tmp) / "shards", args.samples, seed=0, shard_size=256))
        for r in range(args.repeats):
            times["baseline"].append(cpu_ms_per_batch(
                lambda r=r: baseline_pipeline(shards, preprocess, tokenizer, args.batch, r, args.batches), args.batches))
            times["dcdb"].append(cpu_ms_per_batch(lambda r=r: dcdb_stream(r), args.batches))
            print(f"  repeat {r + 1}: baseline {times['baseline'][-1]:.1f} ms/batch, dcdb {times['dcdb'][-1]:.1f} "
                  f"ms/batch (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    best = {k: min(v) for k, v in times.items()}
    print(f"loader CPU per batch of {args.batch} (64-pixel JPEGs), {args.batches} batches from a fresh stream, "
          f"1 thread, best (median) of {args.repeats}; load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after")
    for k, v in times.items():
        print(f"{k:10s} {best[k]:8.1f} ms ({statistics.median(v):.1f})  {best[k] / args.batch * 1e3:7.0f} us/sample")
    print(f"baseline / dcdb: {best['baseline'] / best['dcdb']:.2f}x less CPU per batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
