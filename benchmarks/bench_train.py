"""Training throughput of the tiny CLIP: the real webdataset loader vs tensors already in memory.

    python benchmarks/bench_train.py [--samples 2048] [--steps 40] [--batch 64] [--workers N] [--repeats 3]

Writes toy shards in the resharder's layout (64-pixel JPEGs + captions) to a temporary folder, then
times the same training steps (``dcdb.train.TrainSession.step``: open_clip model, ClipLoss, AdamW,
cosine schedule) fed two ways:

- loader: ``dcdb.train.data.stream_batches`` reading, decoding, transforming and tokenizing from the
  shards in dataloader workers, as in training; its start-up (first batch: workers, shuffle buffer)
  is timed apart, since training pays it once per run;
- memory: the same number of batches taken from that loader beforehand and replayed from a list.

On a small CPU the result depends on how torch's OpenMP threads wait, which can only be chosen
before torch loads, so each policy runs in its own process: ``default`` (libgomp spins a while) and
``passive`` (threads sleep; what ``dcdb train`` sets). The verdict compares the best loader-fed
rate with the best in-memory rate over both. Runs alternate loader/memory to spread out noise from
other processes; the best of ``--repeats`` is reported for each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICIES = {"default": None, "passive": "PASSIVE"}  # None: OMP_WAIT_POLICY unset


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_loader(session, shards, *, batch: int, steps: int, workers: int, seed: int) -> tuple[float, float]:
    """``(start-up seconds, samples/s)`` of training fed by the webdataset loader.

    Start-up is the first batch (worker start, first shards read, shuffle buffer's initial fill);
    the rate is over the ``steps`` steps after it.
    """
    from dcdb.train.data import stream_batches

    t0 = time.perf_counter()
    stream = stream_batches(shards, preprocess=session.preprocess, tokenizer=session.tokenizer,
                            batch_size=batch, steps=steps + 1, seed=seed, workers=workers)
    first = next(stream)
    startup = time.perf_counter() - t0
    session.step(*first)
    _sync()
    t1 = time.perf_counter()
    for i, (images, texts) in enumerate(stream):
        session.schedule(i)
        session.step(images, texts)
    _sync()
    return startup, steps * batch / (time.perf_counter() - t1)


def time_memory(session, batches, *, batch: int) -> float:
    """Samples/s of the same number of steps on batches already in memory."""
    t0 = time.perf_counter()
    for i, (images, texts) in enumerate(batches):
        session.schedule(i)
        session.step(images, texts)
    _sync()
    return len(batches) * batch / (time.perf_counter() - t0)


def measure(args: argparse.Namespace) -> dict:
    """One process, the current OpenMP policy: best loader and memory rates over the repeats."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from dcdb.train import TrainSession, default_workers, find_shards, get_recipe
    from dcdb.train.data import stream_batches
    from dcdb.train.toy import write_toy_shards

    workers = default_workers() if args.workers is None else args.workers
    recipe = get_recipe("tiny", batch_size=args.batch, samples_seen=args.batch * args.steps * 5)
    session = TrainSession.create(recipe, seed=0, device="cuda" if _cuda() else "cpu", ckpt=None)
    with tempfile.TemporaryDirectory(prefix="dcdb-bench-train-") as tmp:
        shards = find_shards(write_toy_shards(Path(tmp) / "shards", args.samples, seed=0, shard_size=256))
        cached = list(stream_batches(shards, preprocess=session.preprocess, tokenizer=session.tokenizer,
                                     batch_size=args.batch, steps=args.steps, seed=1, workers=workers))
        time_memory(session, cached[:3], batch=args.batch)  # warm-up
        loader, memory, startups = [], [], []
        for r in range(args.repeats):
            startup, rate = time_loader(session, shards, batch=args.batch, steps=args.steps, workers=workers, seed=r)
            loader.append(rate)
            startups.append(startup)
            memory.append(time_memory(session, cached, batch=args.batch))
            print(f"  [{os.environ.get('OMP_WAIT_POLICY') or 'default'}] repeat {r + 1}: loader {rate:.1f} "
                  f"samples/s (start-up {startup:.2f}s), memory {memory[-1]:.1f} samples/s", file=sys.stderr)
    device = "cuda" if _cuda() else f"cpu, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return {"loader": max(loader), "memory": max(memory), "startup": min(startups), "workers": workers,
            "device": device, "run_steps": get_recipe("tiny", batch_size=args.batch).total_steps}


def _child(args: argparse.Namespace, policy: str) -> dict:
    """Run :func:`measure` in a fresh process with ``OMP_WAIT_POLICY`` set for ``policy``."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["HF_HUB_OFFLINE"] = "1"
    if POLICIES[policy] is not None:
        env["OMP_WAIT_POLICY"] = POLICIES[policy]
    cmd = [sys.executable, __file__, "--child", "--samples", str(args.samples), "--steps", str(args.steps),
           "--batch", str(args.batch), "--repeats", str(args.repeats)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048, help="toy samples in the shards")
    parser.add_argument("--steps", type=int, default=40, help="training steps per timed run")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="dataloader workers (default: dcdb's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return 0

    results = {policy: _child(args, policy) for policy in POLICIES}
    any_run = next(iter(results.values()))
    print(f"tiny model (dcdb-tiny), batch {args.batch}, {args.steps} steps, {any_run['workers']} loader "
          f"worker(s), {any_run['device']}; best of {args.repeats} per policy")
    print(f"{'OpenMP wait':12s} {'in-memory':>12s} {'loader':>12s} {'ratio':>7s} {'start-up':>9s}")
    for policy, r in results.items():
        print(f"{policy:12s} {r['memory']:8.1f} s/s {r['loader']:8.1f} s/s {r['loader'] / r['memory']:7.3f} "
              f"{r['startup']:8.2f}s")
    best_loader = max(r["loader"] for r in results.values())
    best_memory = max(r["memory"] for r in results.values())
    startup = min(r["startup"] for r in results.values())
    steps = any_run["run_steps"]
    whole = (steps * args.batch / best_memory) / (startup + steps * args.batch / best_loader)
    print(f"best loader / best in-memory: {best_loader / best_memory:.3f} (goal >= 0.9); "
          f"over a whole tiny run ({steps} steps, start-up included): {whole:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
