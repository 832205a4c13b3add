"""DataComp's fixed training recipes, one dataclass per scale, plus a CPU-sized ``tiny`` scale.

The numbers are DataComp's (``scale_configs.py`` and the arguments its ``train.py`` passes to
``open_clip_train``): the scale fixes the model, the global batch size, the learning rate, the
warmup, beta2 and the number of samples seen; everything else is open_clip's default for a ViT
(AdamW with beta1 0.9, beta2 0.98, eps 1e-6, weight decay 0.2 except on gains and biases, cosine
schedule with linear warmup, logit scale clamped to ln 100), shards are sampled with replacement,
and the run is cut into ``num_checkpoints`` (5) 'epochs' of ``samples_seen // num_checkpoints``
samples, each ending with a checkpoint. DataComp trains with ``--precision amp``; on a CPU dcdb
trains in float32.

``tiny`` is dcdb's own: the same recipe shape with a ~7.6M-parameter open_clip model
(``dcdb-tiny``, 64-pixel images, see :mod:`dcdb.train.models`) and samples seen small enough for a
laptop demo.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dcdb.errors import UsageError

#: Keys of :class:`Recipe` that the scale's numbers fix; ``train(..., batch_size=..,
#: samples_seen=..)`` may override the two named here, and the run records the override.
OVERRIDABLE = ("batch_size", "samples_seen")


@dataclass(frozen=True)
class Recipe:
    """One scale's training recipe. Frozen: derive a changed copy with :meth:`replace`."""

    scale: str
    model: str
    batch_size: int  # global batch size (DataComp splits it over GPUs; dcdb uses one device)
    learning_rate: float
    warmup: int  # optimizer steps of linear warmup
    samples_seen: int  # DataComp's train_num_samples
    image_size: int  # the model's input resolution (from its open_clip config)
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.2
    schedule: str = "cosine"
    num_checkpoints: int = 5
    precision: str = "amp"  # DataComp's default; used on CUDA, float32 on CPU
    grad_checkpointing: bool = True  # memory only, the arithmetic is the same
    grad_clip_norm: float | None = None
    dataset_resampled: bool = True  # shards sampled with replacement

    @property
    def samples_per_checkpoint(self) -> int:
        """Samples in one 'epoch' (DataComp: ``train_num_samples // num_checkpoints``)."""
        return self.samples_seen // self.num_checkpoints

    @property
    def steps_per_checkpoint(self) -> int:
        """Optimizer steps in one 'epoch': open_clip rounds the batch count up."""
        return max(1, -(-self.samples_per_checkpoint // self.batch_size))

    @property
    def total_steps(self) -> int:
        return self.steps_per_checkpoint * self.num_checkpoints

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes`` applied, validated."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def validate(self) -> None:
        """Raise ``UsageError`` when a value cannot be trained with."""
        if self.batch_size < 1:
            raise UsageError(f"batch size must be at least 1, not {self.batch_size}", hint="pass e.g. --batch-size 64")
        if self.samples_seen < self.num_checkpoints:
            raise UsageError(
                f"samples seen ({self.samples_seen}) must be at least the number of checkpoints "
                f"({self.num_checkpoints})",
                hint="raise --samples-seen (each checkpoint needs at least one sample)",
            )
        if self.schedule != "cosine":
            raise UsageError(f"unknown schedule {self.schedule!r}", hint="DataComp uses 'cosine'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _datacomp(scale: str, model: str, batch: int, lr: float, samples: int, warmup: int = 500,
              beta2: float | None = None, image_size: int = 224) -> Recipe:
    """A DataComp scale: ``beta2=None`` means open_clip's ViT default (0.98), as in DataComp."""
    extra = {} if beta2 is None else {"beta2": beta2}
    return Recipe(scale=scale, model=model, batch_size=batch, learning_rate=lr, warmup=warmup,
                  samples_seen=samples, image_size=image_size, **extra)


RECIPES: dict[str, Recipe] = {
    "tiny": Recipe(
        scale="tiny",
        model="dcdb-tiny",
        batch_size=64,
        learning_rate=1e-3,
        warmup=50,
        samples_seen=32_000,
        image_size=64,
        grad_checkpointing=False,
    ),
    "debug": _datacomp("debug", "ViT-B-32", 1024, 1e-4, 128_000),
    "small": _datacomp("small", "ViT-B-32", 4096, 5e-4, 12_800_000),
    "medium": _datacomp("medium", "ViT-B-32", 4096, 5e-4, 128_000_000),
    "large": _datacomp("large", "ViT-B-16", 8192, 5e-4, 1_280_000_000),
    "xlarge": _datacomp("xlarge", "ViT-L-14", 90112, 1e-3, 12_800_000_000, warmup=10_000, beta2=0.95),
    # The demo world's teachers (dcdb.demo.teacher): tiny's recipe with the teacher models.
    "teacher-b32": Recipe(scale="teacher-b32", model="dcdb-teacher-b32", batch_size=64, learning_rate=1e-3,
                          warmup=50, samples_seen=32_000, image_size=64, grad_checkpointing=False),
    "teacher-l14": Recipe(scale="teacher-l14", model="dcdb-teacher-l14", batch_size=64, learning_rate=1e-3,
                          warmup=50, samples_seen=32_000, image_size=64, grad_checkpointing=False),
}


def available_scales() -> list[str]:
    """Scale names, smallest first."""
    return list(RECIPES)


def get_recipe(scale: str, *, batch_size: int | None = None, samples_seen: int | None = None) -> Recipe:
    """The recipe of ``scale``, with the optional overrides applied and validated."""
    try:
        recipe = RECIPES[scale]
    except KeyError:
        raise UsageError(
            f"unknown scale {scale!r}", hint=f"choose one of: {', '.join(available_scales())}"
        ) from None
    changes = {k: v for k, v in (("batch_size", batch_size), ("samples_seen", samples_seen)) if v is not None}
    return recipe.replace(**changes) if changes else recipe
