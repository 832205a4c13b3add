"""Checkpoint files of a training run, in open_clip_train's layout.

``OUTPUT/checkpoints/epoch_latest.pt`` after each of the recipe's checkpoints ('epochs') and
``epoch_<k>.pt`` for the last one (and every ``save_every``-th), all written atomically (a killed run never leaves a
half file under a final name). A checkpoint is open_clip_train's dict (``epoch``, ``name``,
``state_dict``, ``optimizer`` [, ``scaler``]) so that ``open_clip.create_model_and_transforms(model,
pretrained=path)`` and DataComp's ``evaluate.py`` load it, plus a ``dcdb`` entry of plain values
(scale, model, recipe, data fingerprint, seed, step, samples seen) used to refuse a mismatched
resume or evaluation. Everything in it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

from dcdb.errors import TrainError
from dcdb.io import atomic_path

CHECKPOINT_DIR = "checkpoints"
LATEST = "epoch_latest.pt"


def checkpoint_dir(output: str | os.PathLike) -> Path:
    return Path(output) / CHECKPOINT_DIR


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    """``OUTPUT/checkpoints/epoch_latest.pt`` if it exists."""
    path = checkpoint_dir(output) / LATEST
    return path if path.is_file() else None


def save_checkpoint(output: str | os.PathLike, epoch: int, checkpoint: dict[str, Any], *, keep: bool) -> Path:
    """Write ``epoch_latest.pt``, and ``epoch_<epoch>.pt`` too (a hard link, no copy) if ``keep``.

    As open_clip_train with DataComp's flags (``--save-most-recent``, ``--save-frequency``): the
    latest checkpoint is always replaced, numbered ones are kept for the final 'epoch' and every
    ``save_every``-th. Returns the path of ``epoch_latest.pt``.
    """
    import torch

    folder = checkpoint_dir(output)
    folder.mkdir(parents=True, exist_ok=True)
    latest = folder / LATEST
    with atomic_path(latest) as tmp:
        torch.save(checkpoint, tmp)
    if keep:
        numbered = folder / f"epoch_{epoch}.pt"
        with atomic_path(numbered) as tmp:
            try:
                os.link(latest, tmp)  # same bytes, no second write
            except OSError:
                shutil.copyfile(latest, tmp)
    return latest


def load_checkpoint(path: str | os.PathLike, *, device: str = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; ``TrainError`` if it is not one."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise TrainError(f"checkpoint {str(path)!r} does not exist", hint="check the path; `dcdb train` writes checkpoints/epoch_N.pt")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as exc:
        raise TrainError(f"cannot read checkpoint {str(path)!r}: {exc}", hint="the file is damaged or not a torch checkpoint") from None
    if not isinstance(ckpt, dict):
        raise TrainError(f"{str(path)!r} is not a training checkpoint (a {type(ckpt).__name__})",
                         hint="give a checkpoints/epoch_N.pt written by `dcdb train` or open_clip")
    return ckpt


def state_dict_of(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The model weights of a checkpoint dict, without DistributedDataParallel's ``module.`` prefix."""
    sd = ckpt.get("state_dict", ckpt)
    if sd and next(iter(sd)).startswith("module."):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd
