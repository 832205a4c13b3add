"""The encoder interface: which CLIP model encodes a text prompt or an image for a pool's space, and how.

Every prompt or query image dcdb embeds goes through here: ``dcdb knn --text/--image`` and seeds
(:mod:`dcdb.vectors.seeds`), ``clip_text()``/``clip_image()``/``contaminated()`` in SQL
(:mod:`dcdb.filters.vectors`), and the demo world's teachers when they encode the pool
(:mod:`dcdb.demo.teacher`). The core depends on this module only, never on the demo; the demo
teacher uses :class:`ClipEncoder` like everyone else.

**An encoder** (:class:`Encoder`) is one CLIP model's two towers: ``texts(list[str])`` and
``images(list[PIL.Image])`` each return an ``(n, d)`` float32 array, one row per input: the model's
embeddings as it outputs them. L2-normalising is the caller's single step, done once where the
vectors are checked (:func:`dcdb.vectors.seeds.check_vectors`, the SQL functions, the demo pool
writer): normalising is not idempotent in float32 (a second pass moves about a third of the rows by
an ulp), so the encoder does not do it for them and every output stays byte-for-byte what it was.

**Which model encodes a prompt** (:func:`checkpoint_for`): a space ``l14_img``/``l14_txt`` (or
``l14``) belongs to model ``l14``. Its checkpoint is, in order: the one set with ``dcdb encoder
--pool P --space l14 --checkpoint CKPT`` (stored in ``POOL/encoders.json``, so the pool's manifest
and hash are untouched), or, for a pool ingested from a demo world's ``metadata/`` folder, the
teacher checkpoint named in that world's ``world.json``. Otherwise a ``UsageError`` says how to
configure one.

**Loading** (:class:`ClipEncoder`): an open_clip model from a checkpoint file or a ``dcdb train``
run folder, through :func:`dcdb.eval.model.resolve_target` and :func:`dcdb.eval.model.load_model`
(the loader evaluation uses: architecture from the checkpoint, tensors checked against it). The
last encoder loaded is cached, keyed by the checkpoint's path, size and mtime. torch and open_clip
are imported only when a prompt or image is encoded: ``dcdb query`` never imports them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dcdb.errors import PoolError, UsageError

ENCODERS_FILE = "encoders.json"


class Encoder(Protocol):
    """One CLIP model's text and image towers: ``(n, d)`` float32 embeddings, one row per input."""

    def texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def images(self, images: Sequence[Any]) -> np.ndarray: ...


class ClipEncoder:
    """An :class:`Encoder` of one open_clip checkpoint (a .pt file or a run folder), in eval mode, no grad."""

    def __init__(self, checkpoint: str | os.PathLike, device: str = "cpu"):
        from dcdb.eval.model import load_model, resolve_target

        self.target = resolve_target(checkpoint)
        self.model, self.preprocess, self.tokenizer = load_model(self.target, device)
        self.device = device

    def images(self, images: list) -> np.ndarray:
        import torch

        with torch.no_grad():
            x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
            return self.model.encode_image(x).float().cpu().numpy()

    def texts(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu().numpy()


# ------------------------------------------------------------------------ configured checkpoints


def model_key(space: str) -> str:
    """``l14_img`` -> ``l14`` (the model shared by a pool's image and text spaces)."""
    return space.split("_", 1)[0]


def _read_encoders(pool) -> dict[str, Any]:
    import json

    p = pool.path / ENCODERS_FILE
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise PoolError(f"{str(p)!r} is unreadable: {exc}", hint="set it again with `dcdb encoder`") from None


def set_checkpoint(pool, space: str, checkpoint: str | os.PathLike) -> Path:
    """Record the checkpoint whose model encodes prompts for ``space``'s model (``POOL/encoders.json``)."""
    from dcdb.io import write_json

    key = model_key(space)
    if not any(model_key(s) == key for s in pool.spaces):
        raise PoolError(f"pool {str(pool.path)!r} has no embedding space of model {key!r}; it has "
                        f"{', '.join(pool.spaces) or 'none'}", hint="name one of its spaces, e.g. --space l14")
    ckpt = Path(checkpoint).expanduser().resolve()
    if not ckpt.exists():
        raise UsageError(f"checkpoint {str(ckpt)!r} does not exist", hint="give a .pt file or a training run folder")
    enc = _read_encoders(pool)
    enc[key] = {"checkpoint": str(ckpt)}
    return write_json(pool.path / ENCODERS_FILE, enc)


def _world_checkpoint(pool, key: str) -> Path | None:
    """The teacher checkpoint of a demo world the pool was ingested from (``WORLD/metadata``)."""
    import json

    src = pool.manifest.get("source")
    if not src:
        return None
    world = Path(src).parent
    wj = world / "world.json"
    if not wj.is_file():
        return None
    try:
        rel = ((json.loads(wj.read_text()).get("embeddings") or {}).get(key) or {}).get("checkpoint")
    except (OSError, ValueError):
        return None
    return (world / rel) if rel and (world / rel).is_file() else None


def checkpoint_for(pool, space: str) -> Path:
    """The checkpoint that encodes prompts/images for ``space``'s model, or a UsageError saying
    how to configure one."""
    key = model_key(space)
    entry = _read_encoders(pool).get(key)
    if entry:
        p = Path(entry["checkpoint"])
        if not p.exists():
            raise UsageError(f"the checkpoint configured for model {key!r} ({str(p)!r}) no longer exists",
                             hint=f"set it again: dcdb encoder --pool {pool.path} --space {key} --checkpoint CKPT")
        return p
    p = _world_checkpoint(pool, key)
    if p is not None:
        return p
    raise UsageError(
        f"no checkpoint is configured to encode prompts for model {key!r} of pool {str(pool.path)!r}",
        hint=f"set one: dcdb encoder --pool {pool.path} --space {key} --checkpoint CKPT.pt "
             "(the CLIP model that made the pool's embeddings)",
    )


# ------------------------------------------------------------------------------------ encoding


_encoders: dict[tuple, Encoder] = {}


def encoder_for(pool, space: str) -> Encoder:
    """A cached :class:`ClipEncoder` of ``space``'s configured checkpoint (imports torch)."""
    ckpt = checkpoint_for(pool, space)
    st = ckpt.stat()
    key = (str(ckpt.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _encoders:
        _encoders.clear()
        _encoders[key] = ClipEncoder(ckpt)
    return _encoders[key]


def encode_texts(pool, space: str, texts: list[str]) -> np.ndarray:
    """``(n, d)`` embeddings of text prompts by ``space``'s model (not normalised)."""
    return encoder_for(pool, space).texts(list(texts))


def encode_images(pool, space: str, images: list, batch: int = 64) -> np.ndarray:
    """``(n, d)`` embeddings of PIL images by ``space``'s model, ``batch`` at a time (not normalised)."""
    enc = encoder_for(pool, space)
    out = [enc.images(images[i : i + batch]) for i in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.empty((0, 0), np.float32)
