"""CLIP training with DataComp's fixed recipes (installed as ``dcdb.train``).

    from dcdb.train import train
    result = train("subset_shards/", "runs/clip_score", scale="tiny", seed=0)
    result = train("subset_shards/", "runs/clip_score", scale="tiny", seed=0, resume="latest")

Scales: ``tiny`` (dcdb's CPU demo model) and DataComp's ``debug``, ``small``, ``medium``, ``large``,
``xlarge`` (:data:`RECIPES`). open_clip provides the model, loss, tokenizer, transforms and
schedule; webdataset 1.x streams the shards. torch and open_clip are imported only when training
starts, so importing this package is cheap.
"""

from .checkpoint import LATEST, latest_checkpoint, load_checkpoint, state_dict_of
from .data import ShardSet, find_shards
from .models import MODEL_CONFIGS, register_models
from .recipe import RECIPES, Recipe, available_scales, get_recipe
from .trainer import (
    INFO,
    LoaderPolicy,
    TrainResult,
    TrainSession,
    cpu_cores,
    default_workers,
    loader_policy,
    prefer_short_openmp_spin,
    train,
)

__all__ = [
    "INFO",
    "LATEST",
    "MODEL_CONFIGS",
    "RECIPES",
    "LoaderPolicy",
    "Recipe",
    "ShardSet",
    "TrainResult",
    "TrainSession",
    "available_scales",
    "cpu_cores",
    "default_workers",
    "find_shards",
    "get_recipe",
    "latest_checkpoint",
    "load_checkpoint",
    "loader_policy",
    "prefer_short_openmp_spin",
    "register_models",
    "state_dict_of",
    "train",
]
