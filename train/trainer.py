"""The training loop: open_clip's model, loss, optimizer grouping and schedule, DataComp's recipe.

What comes from open_clip: the model and its image transforms (``create_model_and_transforms``),
the tokenizer (``get_tokenizer``), the contrastive loss (``ClipLoss``), the cosine schedule with
warmup (``open_clip_train.scheduler.cosine_lr``); the parameter grouping (no weight decay on gains,
biases and the logit scale), the logit-scale clamp and the checkpoint layout follow
``open_clip_train`` line for line. dcdb adds the data stream (webdataset 1.x, see
:mod:`dcdb.train.data`), seeding, atomic checkpoints and resume checks.

Output folder::

    OUTPUT/info.json                     scale, recipe, data, seed, progress (dcdb's run record)
    OUTPUT/info.pkl                      DataComp's record (scale, checkpoint, scale_config, data_dir)
    OUTPUT/checkpoints/epoch_<k>.pt      after each of the recipe's checkpoints
    OUTPUT/checkpoints/epoch_latest.pt   the newest of them
"""

from __future__ import annotations

import math
import os
import pickle
import random
import sys
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from dcdb.errors import OutputError, ResumeError
from dcdb.io import atomic_path, prepare_folder, write_json
from dcdb.openmp import prefer_short_openmp_spin

from .checkpoint import LATEST, latest_checkpoint, load_checkpoint, save_checkpoint
from .data import ShardSet, find_shards, stream_batches
from .models import quiet_random_init, register_models
from .recipe import Recipe, get_recipe

INFO = "info.json"
RUN_FORMAT = "dcdb-train-run"
#: Fields of a run that must match for ``resume`` to continue it.
RESUME_KEYS = ("scale", "recipe", "data_fingerprint", "seed")


@dataclass
class TrainResult:
    """What :func:`train` did."""

    output: Path
    checkpoint: Path  # OUTPUT/checkpoints/epoch_latest.pt
    scale: str
    recipe: Recipe
    seed: int
    data: dict[str, Any]
    epochs: int  # checkpoints of the run (recipe.num_checkpoints: train() returns complete runs)
    steps: int
    samples_seen: int
    seconds: float  # this call's training time
    samples_per_second: float  # this call's training throughput
    final_loss: float | None
    resumed_from_epoch: int | None = None
    device: str = "cpu"
    losses: list[float] = field(default_factory=list)  # one mean loss per epoch trained in this call

    def summary(self) -> str:
        loss = "" if self.final_loss is None else f", final loss {self.final_loss:.3f}"
        head = (f"{self.scale} ({self.recipe.model}) on {self.data['samples']:,} samples: "
                f"{self.samples_seen:,} samples seen in {self.steps:,} steps{loss}")
        if not self.losses:
            return f"already trained: {head}; checkpoint {self.checkpoint}"
        resumed = "" if self.resumed_from_epoch is None else f" (resumed at checkpoint {self.resumed_from_epoch})"
        return (f"trained {head}{resumed}; {self.seconds:.0f}s, {self.samples_per_second:,.0f} samples/s "
                f"on {self.device}; checkpoint {self.checkpoint}")


#: Cores at or below which dataloader workers and torch's threads share the CPU (see :func:`loader_policy`).
SMALL_CPU = 4


def cpu_cores() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers() -> int:
    """Dataloader processes: one per spare core, at most 4 (decoding 64-pixel images is cheap)."""
    return max(1, min(4, cpu_cores() - 1))


@dataclass(frozen=True)
class LoaderPolicy:
    """How the training process and its dataloader workers share the CPU."""

    workers: int
    threads: int | None  # torch's thread count for training; None: torch's default (every core)
    worker_nice: int  # added to the workers' nice value (lower CPU priority than training)

    def to_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "threads": self.threads, "worker_nice": self.worker_nice}


def loader_policy(workers: int | None = None, device: str = "cpu", threads: int | None = None) -> LoaderPolicy:
    """The CPU split :func:`train` uses: ``workers`` (default :func:`default_workers`) decoding
    processes, torch on every core (``threads`` > 0 sets the count; 0 or None: torch's default),
    and on a small CPU (at most :data:`SMALL_CPU` cores) the workers at a lower priority.

    A worker needs ~30 ms of CPU per 64-sample batch of 64-pixel images, ~0.1 core at the tiny
    model's speed, so training keeps every core: on 2 cores with a short OpenMP spin
    (:func:`prefer_short_openmp_spin`) 2 threads beat 1 both idle (226-230 vs 156-157 samples/s,
    loader-fed) and beside two busy processes (97-104 vs 93-94).
    """
    cores = cpu_cores()
    workers = default_workers() if workers is None else max(0, int(workers))
    small = str(device).startswith("cpu") and cores <= SMALL_CPU and workers > 0
    return LoaderPolicy(workers=workers, threads=int(threads) if threads else None,
                        worker_nice=WORKER_NICE if small else 0)


#: Niceness the dataloader workers add on a small CPU (see :func:`loader_policy`).
WORKER_NICE = 10


def train(
    data: str | os.PathLike,
    output: str | os.PathLike,
    scale: str = "tiny",
    *,
    seed: int = 0,
    resume: str | os.PathLike | None = None,
    samples_seen: int | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    threads: int | None = None,
    device: str | None = None,
    save_every: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a CLIP on the shards in ``data`` with DataComp's recipe for ``scale``, into ``output``.

    ``resume="latest"`` continues ``OUTPUT/checkpoints/epoch_latest.pt`` (or starts afresh if there is
    none); a checkpoint path continues that file. A run is only continued with the same scale,
    recipe (including ``samples_seen``/``batch_size`` overrides), data and seed. Without ``resume``
    an output folder that already holds checkpoints is refused. Uses CUDA when available.

    Checkpoints: ``epoch_latest.pt`` after every 'epoch', ``epoch_<k>.pt`` kept for the last one
    and, with ``save_every=n``, for every n-th (DataComp's ``--save_frequency``; 0 = last only).
    ``workers`` dataloader processes decode the shards (default :func:`default_workers`); on a
    small CPU at a lower priority (:func:`loader_policy`); ``threads`` sets torch's thread count
    (0 or None: torch's default), restored when the call returns. If torch is not imported yet,
    shortens OpenMP's spin-wait (:func:`prefer_short_openmp_spin`).
    """
    prefer_short_openmp_spin()
    say = log or (lambda msg: None)
    prepare_folder(output, create=False, what="run folder")
    recipe = get_recipe(scale, batch_size=batch_size, samples_seen=samples_seen)
    shards = find_shards(data)
    output = Path(output)
    identity = _run_identity(recipe, shards, seed)
    ckpt_path = _resume_checkpoint(output, resume)
    ckpt = _checked_resume(ckpt_path, identity) if ckpt_path else None
    start_epoch = int(ckpt["epoch"]) if ckpt else 0
    if ckpt:
        say(f"resuming {ckpt_path} at checkpoint {start_epoch}/{recipe.num_checkpoints}")
    if start_epoch >= recipe.num_checkpoints:
        say(f"{output} is already trained to the end")
        return _result(output, recipe, shards, seed, start_epoch, [], 0.0, "none", _last_loss(ckpt))

    import torch

    prepare_folder(output, what="run folder")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy = loader_policy(workers, dev, threads)
    session = TrainSession.create(recipe, seed=seed, device=dev, ckpt=ckpt)
    info = _initial_info(recipe, shards, seed, policy, dev, session.precision)
    write_json(output / INFO, {**info, **_progress(recipe, start_epoch, "running")})

    torch_threads = torch.get_num_threads()
    if policy.threads:
        torch.set_num_threads(policy.threads)
    try:
        losses, seconds = _train_epochs(output, session, recipe, shards, seed, start_epoch, identity, info,
                                        policy, dev, save_every, progress, say)
    finally:
        torch.set_num_threads(torch_threads)
    result = _result(output, recipe, shards, seed, start_epoch, losses, seconds, dev, None)
    write_json(output / INFO, {**info, **_progress(recipe, recipe.num_checkpoints, "complete"),
                               "seconds": round(result.seconds, 3),
                               "samples_per_second": round(result.samples_per_second, 1)})
    _write_datacomp_info(output, recipe, result.checkpoint, shards)
    return result


def _train_epochs(output: Path, session: TrainSession, recipe: Recipe, shards: ShardSet, seed: int,
                  start_epoch: int, identity: dict[str, Any], info: dict[str, Any], policy: LoaderPolicy,
                  dev: str, save_every: int, progress: bool, say: Callable[[str], None]) -> tuple[list[float], float]:
    """The training loop of :func:`train`: ``(mean loss per epoch trained, seconds)``."""
    t0 = time.perf_counter()
    losses: list[float] = []
    _seed_everything(_epoch_seed(seed, start_epoch))
    stream = closing(stream_batches(
        shards,
        preprocess=session.preprocess,
        tokenizer=session.tokenizer,
        batch_size=recipe.batch_size,
        steps=(recipe.num_checkpoints - start_epoch) * recipe.steps_per_checkpoint,
        seed=_epoch_seed(seed, start_epoch),
        workers=policy.workers,
        pin_memory=dev.startswith("cuda"),
        device=dev,
        worker_nice=policy.worker_nice,
    ))
    with stream as batches, _progress_bar(recipe, start_epoch, progress) as bar:
        for epoch in range(start_epoch, recipe.num_checkpoints):
            losses.append(session.train_epoch(islice(batches, recipe.steps_per_checkpoint), epoch, bar))
            done = epoch + 1
            keep = done == recipe.num_checkpoints or (save_every > 0 and done % save_every == 0)
            latest = save_checkpoint(output, done, session.checkpoint(done, identity, output.name), keep=keep)
            write_json(output / INFO, {**info, **_progress(recipe, done, "running")})
            say(f"checkpoint {done}/{recipe.num_checkpoints}: mean loss {losses[-1]:.4f} -> {latest}")
    return losses, time.perf_counter() - t0


def _result(output: Path, recipe: Recipe, shards: ShardSet, seed: int, start_epoch: int, losses: list[float],
            seconds: float, device: str, final_loss: float | None) -> TrainResult:
    """The :class:`TrainResult` of a complete run of which this call trained ``losses``' epochs."""
    trained = len(losses) * recipe.steps_per_checkpoint * recipe.batch_size
    return TrainResult(
        output=output,
        checkpoint=output / "checkpoints" / LATEST,
        scale=recipe.scale,
        recipe=recipe,
        seed=seed,
        data=shards.to_dict(),
        epochs=recipe.num_checkpoints,
        steps=recipe.total_steps,
        samples_seen=recipe.total_steps * recipe.batch_size,
        seconds=seconds,
        samples_per_second=trained / seconds if seconds > 0 and trained else 0.0,
        final_loss=losses[-1] if losses else final_loss,
        resumed_from_epoch=start_epoch if start_epoch else None,
        device=device,
        losses=losses,
    )


# ------------------------------------------------------------------------------ the session


class TrainSession:
    """Model, transforms, tokenizer, loss, optimizer, scaler and schedule of one run.

    :func:`train` drives it; benchmarks use it to time the same steps fed from memory.
    """

    def __init__(self, **parts: Any):
        self.__dict__.update(parts)

    @classmethod
    def create(cls, recipe: Recipe, *, seed: int, device: str, ckpt: dict | None) -> TrainSession:
        import open_clip
        import torch
        from open_clip_train.scheduler import cosine_lr

        register_models()
        _seed_everything(seed)  # model initialisation, as open_clip_train's random_seed(args.seed)
        with quiet_random_init():
            model, preprocess_train, _ = open_clip.create_model_and_transforms(
                recipe.model, device=device, output_dict=True
            )
        if recipe.grad_checkpointing:
            model.set_grad_checkpointing(True)
        optimizer = _adamw(model, recipe)
        amp = recipe.precision == "amp" and device.startswith("cuda")
        scaler = torch.amp.GradScaler("cuda") if amp else None
        if ckpt is not None:
            model.load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if scaler is not None and "scaler" in ckpt:
                scaler.load_state_dict(ckpt["scaler"])
        return cls(
            recipe=recipe,
            device=device,
            model=model,
            preprocess=preprocess_train,
            tokenizer=open_clip.get_tokenizer(recipe.model),
            loss=open_clip.ClipLoss(),
            optimizer=optimizer,
            scaler=scaler,
            precision="amp" if amp else "fp32",
            last_loss=None,
            schedule=cosine_lr(optimizer, recipe.learning_rate, recipe.warmup, recipe.total_steps),
        )

    def train_epoch(self, batches, epoch: int, bar) -> float:
        """Train on ``batches`` (one 'epoch'); return the mean loss."""
        import torch

        self.model.train()
        total = torch.zeros((), device=self.device)
        n = 0
        first_step = epoch * self.recipe.steps_per_checkpoint
        t_last, n_last = time.perf_counter(), 0
        for i, (images, texts) in enumerate(batches):
            lr = self.schedule(first_step + i)
            loss = self.step(images, texts)
            total += loss
            n += 1
            if bar is not None:
                bar.update(1)
                if n - n_last >= 10 or n == self.recipe.steps_per_checkpoint:
                    now = time.perf_counter()
                    speed = (n - n_last) * self.recipe.batch_size / max(now - t_last, 1e-9)
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}", samples_s=f"{speed:.0f}",
                                    ckpt=f"{epoch + 1}/{self.recipe.num_checkpoints}", refresh=False)
                    t_last, n_last = now, n
        self.last_loss = float(total.item() / max(1, n))
        return self.last_loss

    def step(self, images, texts):
        """One optimizer step on a batch; returns the loss (a detached tensor)."""
        import torch

        images = images.to(self.device, non_blocking=True)
        texts = texts.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.scaler is not None):
            out = self.model(images, texts)
            loss = sum(self.loss(**out, output_dict=True).values())
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self._clip_grads(unscale=True)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self._clip_grads(unscale=False)
            self.optimizer.step()
        with torch.no_grad():  # open_clip_train: clamp to ln(100), as in the CLIP paper
            self.model.logit_scale.clamp_(0, math.log(100))
        return loss.detach()

    def _clip_grads(self, *, unscale: bool) -> None:
        import torch

        if self.recipe.grad_clip_norm is None:
            return
        if unscale:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip_norm, norm_type=2.0)

    def checkpoint(self, epoch: int, identity: dict[str, Any], name: str) -> dict[str, Any]:
        """open_clip_train's checkpoint dict plus dcdb's run identity."""
        steps = epoch * self.recipe.steps_per_checkpoint
        ckpt = {
            "epoch": epoch,
            "name": name,
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "dcdb": {**identity, "model": self.recipe.model, "step": steps,
                     "samples_seen": steps * self.recipe.batch_size, "loss": self.last_loss},
        }
        if self.scaler is not None:
            ckpt["scaler"] = self.scaler.state_dict()
        return ckpt


def _adamw(model, recipe: Recipe):
    """AdamW with open_clip_train's two groups: no weight decay on gains, biases, logit scale."""
    import torch

    def exclude(name: str, p) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": recipe.weight_decay},
    ]
    # The fused kernel does the same arithmetic ~20x faster on a CPU than the default loop.
    return torch.optim.AdamW(groups, lr=recipe.learning_rate, betas=(recipe.beta1, recipe.beta2),
                             eps=recipe.eps, fused=True)


# --------------------------------------------------------------------------------- resuming


def _run_identity(recipe: Recipe, shards: ShardSet, seed: int) -> dict[str, Any]:
    return {"scale": recipe.scale, "recipe": recipe.to_dict(), "data_fingerprint": shards.fingerprint, "seed": seed}


def _resume_checkpoint(output: Path, resume: str | os.PathLike | None) -> Path | None:
    """The checkpoint to continue from, or None to start afresh."""
    existing = latest_checkpoint(output)
    if resume is None:
        if existing is not None:
            raise OutputError(
                f"{str(output)!r} already holds a training run ({existing.name})",
                hint="pass --resume latest to continue it, or choose another --output",
            )
        return None
    if str(resume) == "latest":
        return existing
    return Path(resume)


def _checked_resume(path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """Load ``path``; ``ResumeError`` naming every difference if it belongs to another run."""
    ckpt = load_checkpoint(path)
    found = ckpt.get("dcdb")
    if not isinstance(found, dict) or "epoch" not in ckpt:
        raise ResumeError(
            f"cannot resume from {str(path)!r}: it was not written by dcdb train",
            hint="start a new run in another --output folder",
        )
    diffs = _differences(found, expected)
    if diffs:
        raise ResumeError(
            f"cannot resume from {str(path)!r}: " + "; ".join(diffs),
            hint="resume with the run's original scale, overrides, data and seed, or train into a new --output",
        )
    return ckpt


def _differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Human-readable differences between a checkpoint's run identity and this call's."""
    out = []
    if found.get("scale") != expected["scale"]:
        out.append(f"the scale changed ({found.get('scale')} -> {expected['scale']})")
    old, new = found.get("recipe") or {}, expected["recipe"]
    changed = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
    if changed and found.get("scale") == expected["scale"]:
        out.append("the recipe changed (" + ", ".join(changed) + ")")
    if found.get("data_fingerprint") != expected["data_fingerprint"]:
        out.append("the training data changed (different shards, sizes or sample count)")
    if found.get("seed") != expected["seed"]:
        out.append(f"the seed changed ({found.get('seed')} -> {expected['seed']})")
    return out


def _last_loss(ckpt: dict | None) -> float | None:
    """The mean loss of the last 'epoch' a checkpoint recorded (for a run resumed when complete)."""
    loss = ((ckpt or {}).get("dcdb") or {}).get("loss")
    return None if loss is None else float(loss)


# ------------------------------------------------------------------------------ run records


def _initial_info(recipe: Recipe, shards: ShardSet, seed: int, policy: LoaderPolicy, device: str,
                  precision: str) -> dict[str, Any]:
    import open_clip
    import torch
    import webdataset

    from dcdb.version import __version__

    base = get_recipe(recipe.scale)
    overrides = {k: getattr(recipe, k) for k in ("batch_size", "samples_seen") if getattr(recipe, k) != getattr(base, k)}
    return {
        "format": RUN_FORMAT,
        "version": 1,
        "scale": recipe.scale,
        "model": recipe.model,
        "recipe": recipe.to_dict(),
        "overrides": overrides,
        "data": shards.to_dict(),
        "seed": seed,
        "workers": policy.workers,
        "worker_nice": policy.worker_nice,
        "threads": policy.threads or torch.get_num_threads(),
        "device": device,
        "precision": precision,
        "versions": {"dcdb": __version__, "torch": torch.__version__,
                     "open_clip": open_clip.__version__, "webdataset": getattr(webdataset, "__version__", "?")},
    }


def _progress(recipe: Recipe, epochs: int, status: str) -> dict[str, Any]:
    steps = epochs * recipe.steps_per_checkpoint
    return {
        "status": status,
        "epochs_completed": epochs,
        "num_checkpoints": recipe.num_checkpoints,
        "steps": steps,
        "samples_seen": steps * recipe.batch_size,
        "checkpoint": f"checkpoints/{LATEST}" if epochs else None,
    }


def _write_datacomp_info(output: Path, recipe: Recipe, latest: Path, shards: ShardSet) -> None:
    """DataComp's ``info.pkl`` (what its ``evaluate.py`` reads), with plain ``str`` paths."""
    info = {
        "scale": recipe.scale,
        "checkpoint": str(latest.resolve()),
        "scale_config": {
            "batch_size": recipe.batch_size,
            "learning_rate": recipe.learning_rate,
            "train_num_samples": recipe.samples_seen,
            "warmup": recipe.warmup,
            "model": recipe.model,
            "beta2": None if recipe.beta2 == 0.98 else recipe.beta2,
        },
        "data_dir": shards.root,
    }
    with atomic_path(output / "info.pkl") as tmp:
        tmp.write_bytes(pickle.dumps(info))


# ---------------------------------------------------------------------------------- helpers


def _epoch_seed(seed: int, epoch: int) -> int:
    from webdataset.utils import make_seed

    return make_seed(seed, epoch, "epoch")


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _progress_bar:
    """A tqdm bar over the run's steps on stderr, or nothing when ``progress`` is off."""

    def __init__(self, recipe: Recipe, start_epoch: int, progress: bool):
        self.args = (recipe, start_epoch, progress)
        self.bar = None

    def __enter__(self):
        recipe, start_epoch, progress = self.args
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=recipe.total_steps, initial=start_epoch * recipe.steps_per_checkpoint,
                            unit="step", desc=f"train {recipe.scale}", file=sys.stderr, dynamic_ncols=True)
        return self.bar

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
