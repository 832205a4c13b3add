"""Find and load the CLIP to evaluate: a training run folder or a checkpoint file.

A run folder written by ``dcdb train`` names its model in ``info.json`` and its checkpoint is
``checkpoints/epoch_latest.pt``; a dcdb checkpoint also names its model inside. Other open_clip
checkpoints (DataComp's, open_clip_train's) load too when the architecture is given. Loading goes
through ``open_clip.create_model_and_transforms(model, pretrained=checkpoint)``, as DataComp's
evaluation does, after checking the checkpoint was trained as that architecture.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcdb.errors import EvalError
from dcdb.parallel import file_signature


@dataclass(frozen=True)
class Target:
    """What to evaluate: the checkpoint, its architecture, its run folder (if any) and identity."""

    checkpoint: Path
    model: str
    run_dir: Path | None
    identity: dict[str, Any]  # changes when the checkpoint's weights do


def resolve_target(target: str | os.PathLike, model: str | None = None) -> Target:
    """Resolve a run folder or checkpoint file (and an optional architecture) to a :class:`Target`."""
    from dcdb.train.checkpoint import LATEST

    path = Path(target)
    if path.is_dir():
        run_dir, ckpt = path, path / "checkpoints" / LATEST
        if not ckpt.is_file():
            raise EvalError(f"{str(path)!r} holds no checkpoint ({ckpt.relative_to(path)})",
                            hint="give a training run folder (dcdb train --output) or a .pt file")
    elif path.is_file():
        ckpt = path
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    else:
        raise EvalError(f"{str(path)!r} does not exist", hint="give a training run folder or a checkpoint file")
    meta = _checkpoint_meta(ckpt)
    recorded = meta.get("model") or _run_model(run_dir)
    if model and recorded and model != recorded:
        raise EvalError(
            f"checkpoint {str(ckpt)!r} was trained as {recorded!r}, not {model!r}",
            hint=f"evaluate it as {recorded!r} (leave the model out)",
        )
    name = model or recorded
    if not name:
        raise EvalError(f"cannot tell the architecture of {str(ckpt)!r}", hint="name it, e.g. --model ViT-B-32")
    signature = file_signature(ckpt)  # [size, mtime_ns], as every resume check of dcdb compares
    if signature is None:
        raise EvalError(f"checkpoint {str(ckpt)!r} disappeared while it was read",
                        hint="check what else writes there, then run again")
    size, mtime_ns = signature
    identity = {"checkpoint": str(ckpt.resolve()), "model": name, "size": size}
    identity.update({k: meta[k] for k in ("scale", "seed", "data_fingerprint", "step", "samples_seen") if k in meta})
    if not meta:
        identity["mtime_ns"] = mtime_ns
    return Target(checkpoint=ckpt, model=name, run_dir=run_dir, identity=identity)


def _checkpoint_meta(ckpt: Path) -> dict[str, Any]:
    """The ``dcdb`` entry of a checkpoint (memory-mapped: the weights are not read), or {}."""
    from dcdb.errors import TrainError
    from dcdb.train.checkpoint import load_checkpoint

    try:
        data = load_checkpoint(ckpt, mmap=True)
    except TrainError as exc:
        raise EvalError(exc.message, hint=exc.hint) from None
    meta = data.get("dcdb")
    return dict(meta) if isinstance(meta, dict) else {}


def _run_model(run_dir: Path | None) -> str | None:
    if run_dir is None or not (run_dir / "info.json").is_file():
        return None
    try:
        return json.loads((run_dir / "info.json").read_text()).get("model")
    except ValueError:
        return None


def load_model(target: Target, device: str):
    """``(model, eval transform, tokenizer)`` of ``target``, in eval mode on ``device``.

    The architecture is built by open_clip, the checkpoint's tensors are checked against it (names
    and shapes) and then loaded by ``open_clip.load_checkpoint``.
    """
    import open_clip

    from dcdb.train.models import quiet_random_init, register_models

    register_models()
    if target.model not in open_clip.list_models():
        raise EvalError(f"open_clip does not know the architecture {target.model!r}",
                        hint="use a name from open_clip.list_models() or dcdb's (dcdb-tiny)")
    with quiet_random_init():
        model, _, preprocess = open_clip.create_model_and_transforms(target.model, device=device)
    _check_fits(target, model)
    try:
        open_clip.load_checkpoint(model, str(target.checkpoint), device=device)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise EvalError(f"cannot load {str(target.checkpoint)!r} into {target.model!r}: {str(exc)[:300]}",
                            hint="pass the --model the checkpoint was trained with") from None
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(target.model)


def _check_fits(target: Target, model) -> None:
    """``EvalError`` listing the first differences if the checkpoint's weights are another architecture's."""
    from dcdb.train.checkpoint import load_checkpoint, state_dict_of

    found = {k: tuple(v.shape) for k, v in state_dict_of(load_checkpoint(target.checkpoint, mmap=True)).items()
             if hasattr(v, "shape")}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"{k} missing" for k in expected if k not in found]
    problems += [f"{k} unexpected" for k in found if k not in expected]
    problems += [f"{k} is {found[k]}, model wants {shape}" for k, shape in expected.items()
                 if k in found and found[k] != shape]
    if problems:
        raise EvalError(
            f"checkpoint {str(target.checkpoint)!r} does not fit architecture {target.model!r}: "
            f"{len(problems)} tensor(s) differ ({'; '.join(problems[:3])})",
            hint="name the architecture it was trained as (--model)",
        )
