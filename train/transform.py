"""open_clip's train transform, split so that a dataloader worker does the least work per sample.

open_clip's train ``preprocess`` is, per image, ``RandomResizedCrop`` (PIL crop + resize) →
``MaybeConvertMode`` (RGB) → ``MaybeToTensor`` (``/255`` in float32) → ``Normalize``. Applied one
sample at a time it costs far more than the resize itself: the crop's ``get_params`` runs a dozen
tiny torch operations per image, and ``ToTensor``/``Normalize`` allocate three float tensors each.

:class:`BatchTransform` does the same arithmetic in two halves:

- per sample, in the worker (:meth:`BatchTransform.crop`): decode to RGB with PIL (as webdataset's
  ``pilrgb`` decoder), draw the crop with the same algorithm as ``RandomResizedCrop.get_params`` from
  a seeded Python RNG, and crop + resize with the same PIL calls, giving a ``uint8`` HWC array;
- per batch (:meth:`BatchTransform.normalize`): ``uint8`` NCHW → float32 ``/255`` → ``(x - mean) / std``
  as three whole-batch tensor operations (on the training device when there is one), with the same
  float32 operations in the same order as ``ToTensor`` + ``Normalize``.

Given the same crop, the result equals ``preprocess(image)`` bit for bit (tests check it against
open_clip). Only the source of randomness differs: a ``random.Random`` seeded per run and worker
instead of torch's global generator. :func:`BatchTransform.from_preprocess` recognises open_clip's
plain train transform; anything else (colour jitter, grayscale, timm augmentations, eval
transforms) gets ``None`` and the caller applies ``preprocess`` per sample.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Any

#: Names of the transform classes of open_clip's plain train transform, in order.
_CROP, _CONVERT, _TO_TENSOR, _NORMALIZE = "RandomResizedCrop", "MaybeConvertMode", "MaybeToTensor", "Normalize"
_PLAIN_TRAIN = ((_CROP,), (_CONVERT, "_convert_to_rgb"), (_TO_TENSOR, "ToTensor"), (_NORMALIZE,))


@dataclass(frozen=True)
class BatchTransform:
    """open_clip's plain train transform as a per-sample crop and a per-batch normalisation."""

    size: tuple[int, int]  # output (height, width)
    scale: tuple[float, float]  # RandomResizedCrop's area range
    ratio: tuple[float, float]  # RandomResizedCrop's aspect-ratio range
    resample: int  # the PIL filter torchvision uses for the crop's interpolation mode
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_preprocess(cls, preprocess: Any) -> BatchTransform | None:
        """The batch form of ``preprocess`` if it is open_clip's plain train transform, else None."""
        from torchvision.transforms import InterpolationMode

        steps = getattr(preprocess, "transforms", None)
        if not isinstance(steps, (list, tuple)) or len(steps) != len(_PLAIN_TRAIN):
            return None
        for step, names in zip(steps, _PLAIN_TRAIN):
            name = getattr(step, "__name__", None) or type(step).__name__
            if name not in names:
                return None
        crop, convert, _, norm = steps
        if getattr(convert, "mode", "RGB") != "RGB" or getattr(norm, "inplace", False):
            return None
        pil_filter = {InterpolationMode.BICUBIC: 3, InterpolationMode.BILINEAR: 2, InterpolationMode.NEAREST: 0}
        if crop.interpolation not in pil_filter or not crop.antialias:
            return None
        mean, std = _floats(norm.mean), _floats(norm.std)
        if len(mean) != 3 or len(std) != 3:
            return None
        size = tuple(int(s) for s in crop.size)
        return cls(size=(size[0], size[-1]), scale=tuple(map(float, crop.scale)),
                   ratio=tuple(map(float, crop.ratio)), resample=pil_filter[crop.interpolation],
                   mean=mean, std=std)

    # ---------------------------------------------------------------- per sample (workers)

    def crop_params(self, height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of a random crop: torchvision ``RandomResizedCrop.get_params``'s
        algorithm (10 tries of a random area and log-uniform aspect ratio, then a centre crop)
        drawn from ``rng``."""
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            h, w = height, round(height * max(self.ratio))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def crop_image(self, image, params: tuple[int, int, int, int]):
        """``image`` (PIL, RGB) cropped at ``params`` and resized: torchvision's PIL ``resized_crop``."""
        import numpy as np

        top, left, h, w = params
        out = image.crop((left, top, left + w, top + h)).resize((self.size[1], self.size[0]), self.resample)
        return np.asarray(out)

    def crop(self, data: bytes, rng: random.Random):
        """Encoded image bytes → the ``uint8`` (height, width, 3) array of a random crop."""
        image = decode_rgb(data)
        return self.crop_image(image, self.crop_params(image.height, image.width, rng))

    # ------------------------------------------------------------------ per batch (main)

    def normalize(self, images, device: Any = None):
        """A ``uint8`` (N, 3, H, W) batch → float32 ``(x / 255 - mean) / std`` (on ``device`` if given),
        the operations of ``ToTensor`` + ``Normalize``."""
        import torch

        if device is not None:
            images = images.to(device, non_blocking=True)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
        return images.to(torch.float32).div_(255).sub_(mean).div_(std)


def decode_rgb(data: bytes):
    """An encoded image as an RGB PIL image (webdataset's ``pilrgb`` decoder)."""
    from PIL import Image

    with io.BytesIO(data) as stream:  # a JPEG (most are) skips the other formats' probes
        image = Image.open(stream, formats=("JPEG",) if data[:3] == b"\xff\xd8\xff" else None)
        image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def _floats(values: Any) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    return tuple(float(v) for v in values)
