"""Seed vectors for kNN and decontamination, and the CLIP model that encodes prompts for a space.

Seeds come from (any mix of):

* a ``.npy`` file, ``(n, d)`` (or ``(d,)`` for one seed), any float dtype;
* a Parquet file, column ``--seed-column`` (default: the only list/array column, else one named
  ``emb``, ``embedding``, ``vector`` or after the space);
* a stored subset of the pool (its rows' vectors in the space);
* text prompts and image files, encoded by the space's model (:mod:`dcdb.encoders`: the
  checkpoint configured with ``dcdb encoder``, or a demo world's teacher).

Every seed is checked (dim equal to the space's, finite, non-zero) and L2-normalised; cosine is
the metric everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dcdb.encoders import encode_images, encode_texts
from dcdb.errors import PoolError, SourceError, UsageError

SEED_COLUMN_NAMES = ("emb", "embedding", "embeddings", "vector", "seed")


# ------------------------------------------------------------------------------ validation


def resolve_space(pool, space: str) -> str:
    """A pool space name, checked (``PoolError`` naming the pool's spaces)."""
    pool.lance_path(space)
    return space


def check_vectors(vec: np.ndarray, dim: int, source: str) -> np.ndarray:
    """(n, d) float32, finite, non-zero, L2-normalised; errors name the source and row."""
    arr = np.asarray(vec)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise SourceError(f"{source}: seeds must be an (n, d) matrix, got shape {arr.shape}",
                          hint="one row per seed vector")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise SourceError(f"{source}: seeds must be numbers, got dtype {arr.dtype}",
                          hint="save the seeds as a float (n, d) array: np.save(path, vectors.astype(np.float32))")
    if arr.shape[0] == 0:
        raise SourceError(f"{source}: no seed vectors", hint="give at least one seed")
    if arr.shape[1] != dim:
        raise SourceError(f"{source}: seeds have dim {arr.shape[1]}, the space has dim {dim}",
                          hint="use seeds embedded by the same model as the space (e.g. 768-d for l14_img)")
    arr = arr.astype(np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise SourceError(f"{source}: {int((~finite).sum())} seed(s) contain NaN or infinity, first row {i}",
                          hint="drop or fix those rows")
    norms = np.linalg.norm(arr, axis=1)
    zero = norms == 0
    if zero.any():
        i = int(np.flatnonzero(zero)[0])
        raise SourceError(f"{source}: {int(zero.sum())} seed(s) are zero vectors (no direction), first row {i}",
                          hint="drop those rows")
    return arr / norms[:, None]


# ---------------------------------------------------------------------------------- sources


def load_npy(path: str | os.PathLike) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"seed file {str(p)!r} does not exist", hint="check the path given to --seeds")
    try:
        return np.load(p, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SourceError(f"seed file {str(p)!r} is not a readable .npy matrix: {exc}",
                          hint="--seeds takes an np.save'd (n, d) float array or a Parquet file with a vector column") from None


def load_parquet(path: str | os.PathLike, column: str | None = None, space: str | None = None) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise SourceError(f"seed file {str(p)!r} does not exist", hint="check the path given to --seeds")
    try:
        schema = pq.read_schema(p)
    except Exception as exc:  # noqa: BLE001 - any pyarrow failure: not a parquet file
        raise SourceError(f"seed file {str(p)!r} is not a readable Parquet file: {exc}",
                          hint="--seeds takes a .npy (n, d) array or a Parquet file with a vector column") from None
    lists = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)
             or pa.types.is_large_list(f.type)]
    if column is None:
        named = [c for c in (*SEED_COLUMN_NAMES, space) if c and c in lists]
        if len(lists) == 1:
            column = lists[0]
        elif named:
            column = named[0]
        else:
            raise SourceError(f"{str(p)!r}: cannot tell which column holds the seed vectors "
                              f"(list columns: {', '.join(lists) or 'none'})", hint="name it with --seed-column")
    if column not in schema.names:
        raise SourceError(f"{str(p)!r} has no column {column!r} (it has {', '.join(schema.names)})",
                          hint="name the vector column with --seed-column")
    if column not in lists:
        raise SourceError(f"{str(p)!r} column {column!r} is {schema.field(column).type}, not a list of numbers",
                          hint=f"name a vector column with --seed-column (list columns: {', '.join(lists) or 'none'})")
    return list_column_to_matrix(pq.read_table(p, columns=[column]).column(0), f"{p}:{column}")


def list_column_to_matrix(col, source: str) -> np.ndarray:
    """An Arrow (chunked) list/fixed-size-list column of numbers -> (n, d) float32 matrix."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks else pa.array([], col.type)
    if col.null_count:
        i = int(np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))[0])
        raise SourceError(f"{source}: {col.null_count} seed(s) are NULL, first row {i}", hint="drop those rows")
    n = len(col)
    if n == 0:
        raise SourceError(f"{source}: no seed vectors", hint="give at least one seed")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if (lengths != lengths[0]).any():
        raise SourceError(f"{source}: seed vectors have different lengths ({lengths.min()}..{lengths.max()})",
                          hint="every seed must have the space's dimension")
    flat = pc.list_flatten(col)
    if flat.null_count:
        raise SourceError(f"{source}: seed vectors contain NULL numbers", hint="drop or fix those rows")
    if not (pa.types.is_floating(flat.type) or pa.types.is_integer(flat.type)):
        raise SourceError(f"{source}: seed vectors hold {flat.type}, not numbers", hint="store float vectors")
    return flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(n, int(lengths[0]))


def subset_rows(pool, name: str) -> np.ndarray:
    """Pool row indices of the uids of stored subset ``name`` (every row holding one of them)."""
    import pyarrow.compute as pc

    from dcdb import uids as U
    from dcdb.engine import check_subset_name
    from dcdb.vectors.scan import open_space
    from dcdb.subsets import read_manifest

    check_subset_name(name)
    read_manifest(pool, name)  # SubsetError with the known names when missing
    wanted = U.to_arrow(U.load(pool.subsets_dir / f"{name}.npy"))
    space = next(iter(pool.spaces), None)
    if space is None:
        raise PoolError("the pool has no embedding space", hint="ingest the .npz files with the metadata")
    ds, _ = open_space(pool, space)
    rows, start = [], 0
    for batch in ds.to_batches(columns=["uid"], batch_size=1 << 16, scan_in_order=True):
        hit = pc.is_in(batch.column(0), value_set=wanted).to_numpy(zero_copy_only=False)
        rows.append(np.flatnonzero(hit) + start)
        start += batch.num_rows
    return np.concatenate(rows).astype(np.int64) if rows else np.empty(0, np.int64)


def vectors_of_rows(pool, space: str, rows: np.ndarray) -> np.ndarray:
    """Raw float32 vectors of pool rows ``rows`` in ``space``."""
    from dcdb.vectors.scan import open_space

    ds, dim = open_space(pool, space)
    parts = []
    for i in range(0, len(rows), 1 << 15):
        tbl = ds.take(rows[i : i + (1 << 15)].tolist(), columns=[space])
        parts.append(list_column_to_matrix(tbl.column(0), f"pool space {space}"))
    return np.concatenate(parts) if parts else np.empty((0, dim), np.float32)


# ---------------------------------------------------------------------------------- images


def open_image(path: str | os.PathLike):
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise SourceError(f"image {str(p)!r} does not exist", hint="check the path")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise SourceError(f"image {str(p)!r} cannot be read: {exc}", hint="give a JPEG/PNG/WebP image file") from None


# ------------------------------------------------------------------------------------- seeds


@dataclass
class Seeds:
    vectors: np.ndarray  # (n, d) float32, L2-normalised
    sources: list[str] = field(default_factory=list)  # one description per source, in order

    def __len__(self) -> int:
        return len(self.vectors)


def load_seeds(pool, space: str, *, npy: str | None = None, parquet: str | None = None,
               column: str | None = None, subset: str | None = None, texts: tuple[str, ...] = (),
               images: tuple[str, ...] = ()) -> Seeds:
    """Seeds from any mix of sources, in the order npy, parquet, subset, texts, images."""
    resolve_space(pool, space)
    dim = int(pool.spaces[space]["dim"])
    parts, sources = [], []
    if npy:
        parts.append(check_vectors(load_npy(npy), dim, str(npy)))
        sources.append(f"{npy} ({len(parts[-1])})")
    if parquet:
        parts.append(check_vectors(load_parquet(parquet, column, space), dim, str(parquet)))
        sources.append(f"{parquet} ({len(parts[-1])})")
    if subset:
        rows = subset_rows(pool, subset)
        if len(rows) == 0:
            raise SourceError(f"subset {subset!r} has no rows in the pool", hint="choose another subset")
        parts.append(check_vectors(vectors_of_rows(pool, space, rows), dim, f"subset {subset}"))
        sources.append(f"subset {subset} ({len(rows)})")
    if texts:
        parts.append(check_vectors(encode_texts(pool, space, list(texts)), dim, "text prompts"))
        sources.append(f"{len(texts)} text prompt(s)")
    if images:
        ims = [open_image(p) for p in images]
        parts.append(check_vectors(encode_images(pool, space, ims), dim, "images"))
        sources.append(f"{len(images)} image(s)")
    if not parts:
        raise UsageError("no seeds given", hint="give --seeds FILE.npy|.parquet, --subset NAME, --text or --image")
    return Seeds(vectors=np.concatenate(parts), sources=sources)


def load_seed_file(path: str, column: str | None = None, space: str | None = None) -> np.ndarray:
    """A seed file by suffix: .npy or .parquet (raw, unchecked)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        return load_npy(path)
    if suffix in (".parquet", ".pq"):
        return load_parquet(path, column, space)
    raise SourceError(f"seed file {path!r} is neither .npy nor .parquet", hint="save the seeds with np.save")
