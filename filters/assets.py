"""Loading the external files DataComp's baselines need, with errors that name the parameter.

* centroids (``-p centroids``): DataComp's ``{small,medium,large,xlarge}_centroids_l14.pt`` hold a
  pickled numpy array (K x 768, float32) written by ``torch.save``; a plain ``.npy`` works too.
* ImageNet embeddings (``-p imagenet_embeddings``): a glob of DataComp's ``in1k_clip_vit_l14_*.pt``
  files, each ``{"image_features": tensor}``; ``.npy`` arrays (or ``.npz`` with ``image_features``)
  work too. All matches are stacked (order does not matter: only their set of nearest centroids is
  used).
* WordNet ids (``-p wordnet_ids``): DataComp's ``imagenet21k_wordnet_ids.txt``, one WNID such as
  ``n01440764`` per line; the POS letter is dropped and the number kept (``int(x[1:])``), exactly as
  DataComp does. A ``.npy`` of integer offsets works too.

``.pt`` files (``torch.save`` archives, any pickle protocol) are read by an unpickler that knows only
numpy arrays, tensors (returned as numpy arrays) and dicts/lists of them, so a hostile pickle cannot
run code; set ``DCDB_TRUST_ASSETS=1`` to load other pickles with ``torch.load`` (trusted files
only). torch is imported only for those and for pre-1.6 (non-zip) torch files.

Loaded arrays are cached per process, keyed by (path, size, mtime): a filter that calls a loader
once per DuckDB vector reads each file once.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from dcdb.errors import AssetError

TRUST_ENV = "DCDB_TRUST_ASSETS"
_WNID_RE = re.compile(r"^[a-z](\d+)$")
_CACHE_SIZE = 4
_cache: OrderedDict[tuple, Any] = OrderedDict()
_lock = threading.Lock()


# ---------------------------------------------------------------------------------- helpers


def stat_key(path: Path) -> tuple:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def _cached(kind: str, paths: list[Path], load):
    """Return ``load()`` cached under the files' identities (path, size, mtime)."""
    key = (kind, tuple(stat_key(p) for p in paths))
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    value = load()
    with _lock:
        _cache[key] = value
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return value


def clear_cache() -> None:
    """Forget every loaded asset (tests; or after rewriting a file in place within one second)."""
    with _lock:
        _cache.clear()


def existing_file(path: str | os.PathLike | None, param: str) -> Path:
    """``path`` as a resolved Path, or an AssetError naming ``param`` when it is not a file."""
    if path is None or str(path) == "":
        raise AssetError(f"-p {param} is required", hint=f"pass -p {param} FILE")
    p = Path(path).expanduser()
    if not p.exists():
        raise AssetError(f"-p {param}: file {str(p)!r} does not exist", hint="check the path")
    if not p.is_file():
        raise AssetError(f"-p {param}: {str(p)!r} is not a file", hint="give the file itself")
    return p.resolve()


def expand_glob(pattern: str | None, param: str) -> list[Path]:
    """The files a glob pattern (or a plain path) matches, sorted; an error if none."""
    if pattern is None or str(pattern) == "":
        raise AssetError(f"-p {param} is required", hint=f"pass -p {param} 'GLOB'")
    pat = os.path.expanduser(str(pattern))
    matches = sorted(Path(m).resolve() for m in globlib.glob(pat) if Path(m).is_file())
    if not matches:
        raise AssetError(
            f"-p {param}: no file matches {pat!r}",
            hint="quote the glob so the shell does not expand it, and check the folder",
        )
    return matches


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: Path, *, digest: bool = True) -> dict[str, Any]:
    """What identifies an asset file: path, size, mtime and (optionally) sha256."""
    st = path.stat()
    out: dict[str, Any] = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if digest:
        out["sha256"] = sha256_file(path)
    return out


def same_file(recorded: dict[str, Any], path: Path) -> bool:
    """Is ``path`` the file ``recorded`` describes? Cheap when path, size and mtime match; else
    compares sha256 (a copy of the same file elsewhere still matches)."""
    st = path.stat()
    if recorded.get("size") != st.st_size:
        return False
    if recorded.get("path") == str(path) and recorded.get("mtime_ns") == st.st_mtime_ns:
        return True
    return recorded.get("sha256") == sha256_file(path)


# ------------------------------------------------------------------------------ torch files
#
# A ``torch.save`` file is a zip archive: ``<name>/data.pkl`` (a pickle) plus one record per tensor
# storage (``<name>/data/<key>``). DataComp's centroid files are ``torch.save(numpy_array, path,
# pickle_protocol=4)``; torch's own weights-only unpickler refuses protocol 4 (it knows no FRAME
# opcode) and prints a warning first. dcdb reads these archives itself with Python's unpickler
# restricted to an allow-list of globals (the standard way to unpickle untrusted data, see the
# ``pickle`` docs, "Restricting Globals"): numpy's array and dtype reconstruction, ``_codecs.encode``
# (protocol 2 writes bytes with it), ``OrderedDict`` and torch's tensor rebuild, which is answered
# with numpy (bounds-checked views of the storage bytes). Nothing else can be named, so nothing else
# can be called: a hostile pickle fails before any of its code runs. torch is not imported.


class _Storage:
    """What ``torch.FloatStorage`` & co. stand for in a pickle: the numpy dtype of its elements."""

    def __init__(self, name: str, dtype: str):
        self.name, self.dtype = name, np.dtype(dtype)


_STORAGES = {
    f"{n}Storage": _Storage(f"{n}Storage", d)
    for n, d in (("Float", "<f4"), ("Half", "<f2"), ("Double", "<f8"), ("Long", "<i8"), ("Int", "<i4"),
                 ("Short", "<i2"), ("Char", "i1"), ("Byte", "u1"), ("Bool", "?"))
}


class _Refused(Exception):
    """A pickle names something outside the allow-list (message: what it named)."""


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, *_meta):
    """torch._utils._rebuild_tensor_v2, answered with a numpy copy of the strided view."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise _Refused("a tensor whose storage is not a plain storage record")
    try:
        offset, size, stride = int(offset), tuple(int(x) for x in size), tuple(int(x) for x in stride)
    except (TypeError, ValueError):
        raise _Refused("a tensor with a malformed shape") from None
    if len(size) != len(stride) or offset < 0 or any(x < 0 for x in size + stride):
        raise _Refused("a tensor with a malformed shape")
    last = offset + sum((n - 1) * st for n, st in zip(size, stride)) if all(size) else offset - 1
    if last >= len(storage):  # as_strided would read past the storage
        raise _Refused(f"a tensor of shape {size} that reaches past its storage ({len(storage)} elements)")
    if not all(size):
        return np.empty(size, storage.dtype)
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], size, [st * item for st in stride], writeable=False)
    return np.array(view)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import codecs
    from collections import OrderedDict

    rec = np._core.multiarray._reconstruct
    out: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): rec,  # numpy 1.x (DataComp's files)
        ("numpy._core.multiarray", "_reconstruct"): rec,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    }
    for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.bool_):
        cls = type(np.dtype(t))
        out[("numpy.dtypes", cls.__name__)] = cls
    for name, st in _STORAGES.items():
        out[("torch", name)] = st
    return out


def _restricted_unpickler(data: bytes, storage_bytes):
    import io
    import pickle

    allowed = _allowed_globals()

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            obj = allowed.get((module, name))
            if obj is None:
                raise _Refused(f"{module}.{name}")
            return obj

        def persistent_load(self, pid):
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
                raise _Refused(f"persistent object {str(pid)[:60]}")
            _, kind, key, _location, numel = pid
            if not isinstance(kind, _Storage):
                raise _Refused(f"storage type {kind!r}")
            raw = storage_bytes(str(key, "ascii") if isinstance(key, bytes) else str(key))
            arr = np.frombuffer(raw, dtype=kind.dtype)
            if not isinstance(numel, int) or len(arr) < numel:
                raise _Refused(f"storage {key!r} shorter than its {numel} elements")
            return arr

    return Unpickler(io.BytesIO(data))


def _check_plain(obj: Any, depth: int = 0) -> Any:
    """Arrays (not of object dtype), numbers, strings, and dicts/lists/tuples of them."""
    if depth > 8:
        raise _Refused("nesting deeper than 8 levels")
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise _Refused("an array of Python objects")
        return obj
    if isinstance(obj, dict):
        return {k: _check_plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_check_plain(v, depth + 1) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    raise _Refused(f"a {type(obj).__name__}")


def read_torch_zip(path: Path) -> Any:
    """The object in a ``torch.save`` zip archive with numpy arrays in place of tensors, read with
    the allow-listed unpickler. Raises ``_Refused`` (outside the allow-list), ``ValueError``
    (not such an archive) or the unpickler's errors."""
    import pickle
    import zipfile

    with zipfile.ZipFile(path) as z:
        pkls = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise ValueError("not a torch.save archive (no single data.pkl)")
        prefix = pkls[0][: -len("data.pkl")]
        order = z.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in z.namelist() else "little"
        if order != "little":
            raise ValueError(f"tensors stored {order}-endian")

        def storage_bytes(key: str) -> bytes:
            return z.read(f"{prefix}data/{key}")

        try:
            obj = _restricted_unpickler(z.read(pkls[0]), storage_bytes).load()
        except (KeyError, pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, _Refused):
                raise
            raise ValueError(f"damaged pickle ({type(exc).__name__}: {exc})") from None
    return _check_plain(obj)


def load_torch_file(path: Path, param: str) -> Any:
    """A DataComp ``.pt`` asset: a ``torch.save`` archive read by the allow-listed unpickler
    (numpy arrays, tensors as arrays, dicts/lists of them). ``DCDB_TRUST_ASSETS=1`` loads any
    pickle with ``torch.load`` (trusted files only); a pre-1.6 (non-zip) torch file goes through
    ``torch.load(weights_only=True)``."""
    import zipfile

    trust_hint = f"if the file comes from a source you trust, set {TRUST_ENV}=1 to load any pickle"
    if os.environ.get(TRUST_ENV, "") == "1":
        return _torch_load(path, param, weights_only=False)
    if not zipfile.is_zipfile(path):
        return _torch_load(path, param, weights_only=True)
    try:
        return read_torch_zip(path)
    except _Refused as exc:
        raise AssetError(
            f"-p {param}: {str(path)!r} is not a plain array/tensor file: its pickle names {exc}, which dcdb "
            "does not load from files it cannot trust (nothing in it was run)",
            hint=trust_hint,
        ) from None
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise AssetError(f"-p {param}: cannot read {str(path)!r}: {exc}",
                         hint="is the file complete? DataComp's assets are torch.save files; or give a .npy") from None


def _torch_load(path: Path, param: str, *, weights_only: bool) -> Any:
    import warnings

    try:
        import torch
    except ImportError as exc:  # pragma: no cover -- torch is a dependency of dcdb[clip]
        raise AssetError(
            f"-p {param}: reading {path.name!r} needs torch",
            hint="pip install 'dcdb[clip]', or convert the file to .npy",
        ) from exc
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return _to_numpy_tree(torch.load(path, map_location="cpu", weights_only=weights_only))
    except Exception as exc:  # noqa: BLE001 -- torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            f"if the file comes from a source you trust, set {TRUST_ENV}=1 to load any pickle"
            if "weights_only" in str(exc) or "Unsupported global" in str(exc)
            else "is it a torch.save file? DataComp's assets are; or give a .npy"
        )
        raise AssetError(f"-p {param}: cannot read {str(path)!r}: {first[:300]}", hint=hint) from None


def _to_numpy_tree(obj: Any) -> Any:
    """What ``torch.load`` gave, with every tensor as numpy (float16/32/64 kept), like
    :func:`read_torch_zip`'s results."""
    if isinstance(obj, dict):
        return {k: _to_numpy_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy_tree(v) for v in obj)
    if type(obj).__module__.startswith("torch") and hasattr(obj, "detach"):
        return obj.detach().cpu().numpy()
    return obj


def _read_array(path: Path, param: str, key: str | None = None) -> np.ndarray:
    """Read one array from ``.npy``, ``.npz`` (``key`` or the only member) or ``.pt``/``.pth``
    (an array/tensor, or a dict holding ``key``)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                name = key if key in names else (names[0] if len(names) == 1 else None)
                if name is None:
                    raise AssetError(
                        f"-p {param}: {path.name!r} has arrays {names}, none named {key!r}",
                        hint=f"store the array as {key!r}",
                    )
                return z[name]
    except AssetError:
        raise
    except Exception as exc:  # noqa: BLE001 -- numpy raises ValueError, OSError, zipfile errors ...
        raise AssetError(f"-p {param}: cannot read {str(path)!r}: {exc}", hint="is the file complete?") from None
    obj = load_torch_file(path, param)
    if isinstance(obj, dict):
        if key is None or key not in obj:
            raise AssetError(
                f"-p {param}: {path.name!r} holds a dict with keys {sorted(map(str, obj))[:8]}, "
                f"not {key!r}" if key else f"-p {param}: {path.name!r} holds a dict, not an array",
                hint="DataComp's ImageNet files hold {'image_features': tensor}; centroids a plain array",
            )
        obj = obj[key]
    if not isinstance(obj, np.ndarray):  # (load_torch_file gives tensors as numpy already)
        raise AssetError(
            f"-p {param}: {path.name!r} holds a {type(obj).__name__}, not an array or tensor",
            hint="give the file DataComp published, or a .npy array",
        )
    return obj


def _check_matrix(arr: np.ndarray, path: Path, param: str, dim: int | None, what: str) -> np.ndarray:
    """A 2-D finite float matrix (as C-contiguous float32) with ``dim`` columns, or AssetError."""
    if arr.dtype.kind != "f":
        raise AssetError(
            f"-p {param}: {path.name!r} has dtype {arr.dtype}, {what} must be floating point",
            hint="DataComp's files hold float32/float16 arrays",
        )
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise AssetError(
            f"-p {param}: {path.name!r} has shape {tuple(arr.shape)}, {what} must be a non-empty "
            "2-D array (rows x dim)",
            hint="one row per vector",
        )
    if dim is not None and arr.shape[1] != dim:
        raise AssetError(
            f"-p {param}: {path.name!r} has {arr.shape[1]}-d vectors, the pool's l14_img is {dim}-d",
            hint="use the ViT-L/14 assets that go with DataComp's l14 embeddings",
        )
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise AssetError(f"-p {param}: {path.name!r} contains NaN or infinite values", hint="regenerate the file")
    return arr


# ------------------------------------------------------------------------------------ loaders


def load_centroids(path: str | os.PathLike | None, *, dim: int | None = None, param: str = "centroids") -> np.ndarray:
    """Centroids as a (K, dim) float32 matrix (DataComp ``*_centroids_l14.pt`` or ``.npy``)."""
    p = existing_file(path, param)

    def load():
        return _check_matrix(_read_array(p, param), p, param, dim, "centroids")

    arr = _cached("centroids", [p], load)
    if dim is not None and arr.shape[1] != dim:  # cached under another dim check
        _check_matrix(arr, p, param, dim, "centroids")
    return arr


def load_embeddings(
    pattern: str | None, *, dim: int | None = None, param: str = "imagenet_embeddings", key: str = "image_features"
) -> np.ndarray:
    """All files matching ``pattern`` stacked into one (M, dim) float32 matrix."""
    files = expand_glob(pattern, param)

    def load():
        parts = [_check_matrix(_read_array(f, param, key), f, param, dim, "embeddings") for f in files]
        widths = {a.shape[1] for a in parts}
        if len(widths) > 1:
            raise AssetError(f"-p {param}: the files have different widths {sorted(widths)}", hint="mix no models")
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    arr = _cached("embeddings", files, load)
    if dim is not None and arr.shape[1] != dim:
        _check_matrix(arr, files[0], param, dim, "embeddings")
    return arr


def parse_wnids(lines: list[str], source: str, param: str = "wordnet_ids") -> np.ndarray:
    """WordNet offsets from WNID lines (``n01440764`` -> 1440764): DataComp keeps ``int(x[1:])``,
    so the POS letter is dropped and an offset matches synsets of any part of speech."""
    out = []
    for i, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        m = _WNID_RE.match(line)
        if not m:
            raise AssetError(
                f"-p {param}: line {i} of {source!r} is {line[:40]!r}, not a WordNet id like n01440764",
                hint="one WNID per line, as in DataComp's imagenet21k_wordnet_ids.txt",
            )
        out.append(int(m.group(1)))
    if not out:
        raise AssetError(f"-p {param}: {source!r} holds no WordNet ids", hint="one WNID per line")
    return np.unique(np.asarray(out, dtype=np.int64))


def load_wordnet_ids(path: str | os.PathLike | None, *, param: str = "wordnet_ids") -> np.ndarray:
    """Sorted unique WordNet synset offsets (int64) from a WNID text file or an integer ``.npy``."""
    p = existing_file(path, param)

    def load():
        if p.suffix.lower() == ".npy":
            arr = _read_array(p, param)
            if arr.dtype.kind not in "iu" or arr.ndim != 1 or (arr < 0).any():
                raise AssetError(
                    f"-p {param}: {p.name!r} has dtype {arr.dtype} and shape {tuple(arr.shape)}; "
                    "a .npy of WordNet ids must be a 1-D array of non-negative integers",
                    hint="or give DataComp's text file of WNIDs",
                )
            return np.unique(arr.astype(np.int64))
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise AssetError(f"-p {param}: {p.name!r} is not UTF-8 text", hint="one WNID per line") from None
        return parse_wnids(text.splitlines(), str(p), param)

    return _cached("wordnet_ids", [p], load)
