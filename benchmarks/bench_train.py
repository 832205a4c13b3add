"""Training throughput of the tiny CLIP: the real webdataset loader vs tensors already in memory.

    python benchmarks/bench_train.py [--samples 2048] [--steps 30] [--batch 64] [--repeats 3]
                                     [--policies default,passive,short]

Writes toy shards in the resharder's layout (64-pixel JPEGs + captions) to a temporary folder, then
times the same training steps (``dcdb.train.TrainSession.step``: open_clip model, ClipLoss, AdamW,
cosine schedule) fed two ways:

- loader: ``dcdb.train.data.stream_batches`` reading, decoding, cropping and tokenizing from the
  shards in dataloader workers, as in training; its start-up (first batch: workers, shuffle buffer)
  is timed apart, since training pays it once per run;
- memory: the same number of batches taken from that loader beforehand and replayed from a list.

Configurations: the CPU split ``dcdb train`` uses by default (:func:`dcdb.train.loader_policy`:
workers, torch threads, worker priority), and the plain one (workers at normal priority); in-memory
with every core as a torch thread and with one fewer. How torch's OpenMP threads wait can only be
chosen before torch loads, so each policy runs in its own process: ``default`` (libgomp spins
~300000 iterations), ``passive`` (threads sleep at once) and ``short`` (``GOMP_SPINCOUNT=10000``,
what every ``dcdb`` command sets).

The verdict compares ``dcdb train``'s default (short spin, its CPU split) with the best in-memory
rate over every policy and thread count (best against best). Runs alternate between
configurations to spread out noise from other processes; the best of ``--repeats`` is reported for
each (the least disturbed run), with the median beside it. The machine load is printed: on a small
shared CPU, other programs move these figures a lot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dcdb.openmp import OPENMP_SPINCOUNT

#: OpenMP wait settings per policy (each runs in a fresh process; neither variable set otherwise).
POLICIES = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
            "short": {"GOMP_SPINCOUNT": str(OPENMP_SPINCOUNT)}}
OPENMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_loader(session, shards, *, batch: int, steps: int, policy, seed: int) -> tuple[float, float]:
    """``(start-up seconds, samples/s)`` of training fed by the webdataset loader under ``policy``.

    Start-up is the first batch (worker start, first shards read, shuffle buffer's initial fill);
    the rate is over the ``steps`` steps after it.
    """
    import torch

    from dcdb.train.data import stream_batches

    threads = torch.get_num_threads()
    if policy.threads:
        torch.set_num_threads(policy.threads)
    try:
        t0 = time.perf_counter()
        stream = stream_batches(shards, preprocess=session.preprocess, tokenizer=session.tokenizer,
                                batch_size=batch, steps=steps + 1, seed=seed, workers=policy.workers,
                                device=session.device, worker_nice=policy.worker_nice)
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
    finally:
        torch.set_num_threads(threads)


def time_memory(session, batches, *, batch: int, threads: int) -> float:
    """Samples/s of the same number of steps on batches already in memory, with ``threads``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        for i, (images, texts) in enumerate(batches):
            session.schedule(i)
            session.step(images, texts)
        _sync()
        return len(batches) * batch / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def measure(args: argparse.Namespace) -> dict:
    """One process, the current OpenMP policy: loader and memory rates over the repeats."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from dcdb.train import LoaderPolicy, TrainSession, cpu_cores, find_shards, get_recipe, loader_policy
    from dcdb.train.data import stream_batches
    from dcdb.demo.toy import write_toy_shards

    device = "cuda" if _cuda() else "cpu"
    train_default = loader_policy(args.workers, device)
    plain = LoaderPolicy(workers=train_default.workers, threads=None, worker_nice=0)
    loaders = {"dcdb train": train_default}
    if plain != train_default:
        loaders["plain"] = plain
    cores = torch.get_num_threads()
    threads = sorted({cores, max(1, cores - 1)}, reverse=True) if device == "cpu" else [cores]
    recipe = get_recipe("tiny", batch_size=args.batch, samples_seen=args.batch * args.steps * 5)
    session = TrainSession.create(recipe, seed=0, device=device, ckpt=None)
    rates: dict[str, list[float]] = {}
    startups: list[float] = []
    with tempfile.TemporaryDirectory(prefix="dcdb-bench-train-") as tmp:
        shards = find_shards(write_toy_shards(Path(tmp) / "shards", args.samples, seed=0, shard_size=256))
        cached = list(stream_batches(shards, preprocess=session.preprocess, tokenizer=session.tokenizer,
                                     batch_size=args.batch, steps=args.steps, seed=1, workers=1))
        time_memory(session, cached[:3], batch=args.batch, threads=cores)  # warm-up
        for r in range(args.repeats):
            line = []
            for t in threads:
                rate = time_memory(session, cached, batch=args.batch, threads=t)
                rates.setdefault(f"memory, {t} thread(s)", []).append(rate)
                line.append(f"memory/{t}t {rate:.1f}")
            for name, policy in loaders.items():
                startup, rate = time_loader(session, shards, batch=args.batch, steps=args.steps, policy=policy,
                                            seed=r)
                rates.setdefault(f"loader, {name}", []).append(rate)
                startups.append(startup)
                line.append(f"{name} {rate:.1f}")
            print(f"  [{_policy_name()}] repeat {r + 1}: " + ", ".join(line)
                  + f" samples/s (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    return {
        "rates": {k: {"best": max(v), "median": statistics.median(v)} for k, v in rates.items()},
        "policies": {k: v.to_dict() for k, v in loaders.items()},
        "startup": min(startups),
        "device": "cuda" if device == "cuda" else f"cpu, {cpu_cores()} cores",
        "run_steps": get_recipe("tiny", batch_size=args.batch).total_steps,
    }


def _policy_name() -> str:
    return next((k for k, v in POLICIES.items() if v and all(os.environ.get(a) == b for a, b in v.items())), "default")


def _child(args: argparse.Namespace, policy: str) -> dict:
    """Run :func:`measure` in a fresh process with the OpenMP settings of ``policy``."""
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARS}
    env["HF_HUB_OFFLINE"] = "1"
    env.update(POLICIES[policy])
    cmd = [sys.executable, __file__, "--child", "--samples", str(args.samples), "--steps", str(args.steps),
           "--batch", str(args.batch), "--repeats", str(args.repeats)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048, help="toy samples in the shards")
    parser.add_argument("--steps", type=int, default=30, help="training steps per timed run")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="dataloader workers (default: dcdb's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help="OpenMP wait policies to run, comma-separated (default, passive, short)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return 0

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown or not policies:
        parser.error(f"unknown policy {unknown}: choose from {', '.join(POLICIES)}")
    load0 = os.getloadavg()
    results = {policy: _child(args, policy) for policy in policies}
    load1 = os.getloadavg()
    any_run = next(iter(results.values()))
    split = any_run["policies"]["dcdb train"]
    print(f"tiny model (dcdb-tiny), batch {args.batch}, {args.steps} steps per run, {any_run['device']}; "
          f"best (median) of {args.repeats}; load average {load0[0]:.1f} before, {load1[0]:.1f} after")
    print(f"dcdb train's CPU split: {split['workers']} worker(s) at nice +{split['worker_nice']}, torch threads "
          f"{split['threads'] or 'default'}")
    print(f"{'OpenMP wait':12s} {'configuration':28s} {'samples/s':>10s} {'(median)':>9s}")
    for policy, r in results.items():
        for name, v in r["rates"].items():
            print(f"{policy:12s} {name:28s} {v['best']:10.1f} {v['median']:9.1f}")
    memory = {(p, k): v["best"] for p, r in results.items() for k, v in r["rates"].items() if k.startswith("memory")}
    (best_policy, best_memory_name), best_memory = max(memory.items(), key=lambda kv: kv[1])
    train_policy = "short" if "short" in results else policies[0]
    loader = results[train_policy]["rates"]["loader, dcdb train"]["best"]
    startup = results[train_policy]["startup"]
    steps = any_run["run_steps"]
    whole = (steps * args.batch / best_memory) / (startup + steps * args.batch / loader)
    same = results[train_policy]["rates"]
    mem_same = max((v for k, v in same.items() if k.startswith("memory")), key=lambda v: v["best"])
    print(f"same process ({train_policy}): dcdb train's loader / its fastest in-memory configuration: best "
          f"{loader / mem_same['best']:.3f}, median {same['loader, dcdb train']['median'] / mem_same['median']:.3f}")
    print(f"dcdb train's default ({train_policy}, loader) / best in-memory ({best_policy}, {best_memory_name}): "
          f"{loader:.1f} / {best_memory:.1f} = {loader / best_memory:.3f} (goal >= 0.9); over a whole tiny run "
          f"({steps} steps, start-up {startup:.2f}s included): {whole:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
