"""dcdb's own small open_clip architectures, registered with open_clip's model-config registry.

``dcdb-tiny`` is a CLIP that trains on two CPU cores: a 3-layer ViT (width 128, 8-pixel patches on
64-pixel images, 65 tokens) and a 3-layer text transformer (width 128, context 32) with open_clip's
standard BPE vocabulary, 128-d joint embedding, ~7.6M parameters (6.3M of them the token
embedding). Once registered, ``open_clip.create_model("dcdb-tiny")``, ``get_tokenizer`` and the
image transforms work as for any built-in model, and checkpoints load with
``open_clip.create_model_and_transforms("dcdb-tiny", pretrained=path)``.

``dcdb-teacher-b32`` (dcdb-tiny with a 512-d joint embedding) and ``dcdb-teacher-l14`` (wider and
deeper: 4 layers, width 160, 768-d embedding) are the demo world's two teachers (:mod:`dcdb.demo.teacher`),
standing in for OpenAI's ViT-B/32 and ViT-L/14 with DataComp's embedding dims.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: open_clip model configs (same schema as open_clip's ``model_configs/*.json``).
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "dcdb-tiny": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
    },
    # The demo world's teachers (dcdb.demo.teacher), stand-ins for OpenAI's ViT-B/32 and ViT-L/14: their
    # joint embeddings have DataComp's dims (512, 768) so the pool's .npz look like DataComp's.
    "dcdb-teacher-b32": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
    },
    "dcdb-teacher-l14": {
        "embed_dim": 768,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 160, "patch_size": 8, "head_width": 40},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 160, "heads": 4, "layers": 4},
    },
}


def register_models() -> list[str]:
    """Add :data:`MODEL_CONFIGS` to open_clip's registry (idempotent); return their names.

    open_clip only takes configs as JSON files (``add_model_config(path)``), which it reads at
    once; dcdb writes them to a temporary folder, registers them and removes the folder, so nothing
    depends on package data or on a cache folder.
    """
    import open_clip

    missing = [name for name in MODEL_CONFIGS if name not in open_clip.list_models()]
    if missing:
        with tempfile.TemporaryDirectory(prefix="dcdb-open-clip-") as tmp:
            for name in missing:
                path = Path(tmp) / f"{name}.json"
                path.write_text(json.dumps(MODEL_CONFIGS[name]))
                open_clip.add_model_config(path)
    return list(MODEL_CONFIGS)


def model_config(name: str) -> dict[str, Any] | None:
    """The open_clip config of ``name`` (built-in or dcdb's), or None if open_clip does not know it."""
    import open_clip

    register_models()
    return open_clip.get_model_config(name)


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


@contextmanager
def quiet_random_init() -> Iterator[None]:
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" root-logger
    warning while a model is created (training from scratch is the point, not an accident)."""
    root = logging.getLogger()
    notice = _DropRandomInitNotice()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)
