"""``dcdb upgrade POOL``: rewrite a store-format-1 pool as format 2, in place.

Format 1 kept one pool shard per source shard with the rows in source order; format 2 lays the
rows out in uid buckets sorted by uid, with ``uid_hi``/``uid_lo`` and ``source_shard``/
``source_row`` (dcdb/store.py). The upgrade re-ingests the pool from itself, so the result is
what ``dcdb ingest`` of the original source would write:

1. **export** (``POOL/.upgrade/export/``): each format-1 shard as a DataComp source shard -- its
   metadata with every derived group's columns beside them (named ``__dcdb_derived__<group>__<col>``,
   so they travel with their rows) and an ``.npz`` of its embedding vectors read back from Lance;
   one shard in memory at a time. A format-1 shard *is* a source shard, in the same order, so
   ``source_shard``/``source_row`` come out right;
2. **ingest** it into ``POOL/.upgrade/new/`` (the bucket repartition streams through disk,
   resumable like any ingest), then split the derived columns back into ``derived/<group>/`` per
   bucket and give the manifest the original source's fields;
3. **swap**: ``POOL/.upgrade/commit`` is written, then ``metadata/``, ``embeddings/`` and
   ``derived/`` are exchanged for the new ones (the old ones go to ``.upgrade/old/``) and the new
   manifest is written last; ``.upgrade/`` is removed. While ``commit`` exists the pool opens as
   an unfinished upgrade; re-running the command finishes it, and a run killed before ``commit``
   left the pool as it was (re-running resumes the export and the ingest).

Stored subsets (uid lists) and the shard index (uid -> tar) do not depend on the layout: they
stay, and the subsets and derived groups record the new manifest. ANN indexes are dropped (the
Lance tables are rewritten): ``dcdb index`` builds them again. A format-1 pool ingested with
``--buckets`` no longer knows its rows' source positions and is refused: re-ingest it.
Disk: the export, the ingest's staging and the new pool exist beside the old pool for a while
(about 4x the pool at the peak).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcdb.errors import PoolError
from dcdb.store import (
    DERIVED_DIR,
    EMBEDDINGS_DIR,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    METADATA_DIR,
    SUBSETS_DIR,
    UPGRADE_COMMIT,
    UPGRADE_DIR,
    upgrade_unfinished,
)

DERIVED_PREFIX = "__dcdb_derived__"
SWAPPED = (METADATA_DIR, EMBEDDINGS_DIR, DERIVED_DIR, "indexes")  # indexes: ANN records (dcdb/vectors/ann.py)


@dataclass
class UpgradeReport:
    pool: str
    rows: int
    buckets: int
    groups: list[str]
    seconds: float
    already: bool = False

    def summary(self) -> str:
        if self.already:
            return f"pool {self.pool} is already store format v{FORMAT_VERSION}; nothing to do"
        groups = f", derived groups {', '.join(self.groups)} re-aligned" if self.groups else ""
        return (f"upgraded {self.pool} to store format v{FORMAT_VERSION}: {self.rows:,} rows in {self.buckets} uid "
                f"bucket(s){groups} in {self.seconds:.1f}s (ANN indexes, if any, need `dcdb index` again)")


def upgrade(pool: str | Path, *, jobs: int = 2, progress: bool = False) -> UpgradeReport:
    """Rewrite the format-1 pool at ``pool`` as format 2 in place (see the module docstring)."""
    from dcdb.io import write_lock, writing

    t0 = time.perf_counter()
    pool = Path(pool).expanduser().resolve()
    with write_lock(pool, "pool"), writing(pool, "pool", redo="then re-run `dcdb upgrade`: finished steps are kept"):
        work = pool / UPGRADE_DIR
        if upgrade_unfinished(pool):
            groups = _swap(pool, work)
            return _report(pool, t0, groups)
        manifest = _old_manifest(pool)
        if manifest.get("format_version") == FORMAT_VERSION:
            shutil.rmtree(work, ignore_errors=True)
            return UpgradeReport(str(pool), int(manifest["rows"]), len(manifest["shards"]), [], 0.0, already=True)
        groups = _groups(pool)
        new = work / "new"
        if not _finished(new):  # a run killed after this step goes straight to the swap
            _export(pool, manifest, groups, work / "export", progress)
            _ingest(work / "export", new, jobs, progress)
            _finish_new(pool, manifest, new, groups)
        shutil.rmtree(work / "export", ignore_errors=True)
        (work / UPGRADE_COMMIT).write_text(json.dumps({"swap": list(SWAPPED)}) + "\n")
        _swap(pool, work)
        return _report(pool, t0, groups)


def _finished(new: Path) -> bool:
    """Whether step 2 is done: the new pool's manifest is the upgraded one."""
    try:
        return "upgraded_from" in json.loads((new / MANIFEST).read_text())
    except (OSError, ValueError):
        return False


def _groups(pool: Path) -> dict[str, list[str]]:
    """The pool's complete derived groups: name -> its columns."""
    from dcdb.derived import GROUP_FILE, GROUP_RE

    groups: dict[str, list[str]] = {}
    root = pool / DERIVED_DIR
    for d in sorted(root.iterdir()) if root.is_dir() else ():
        if d.is_dir() and GROUP_RE.match(d.name) and (d / GROUP_FILE).is_file():
            groups[d.name] = [c["name"] for c in json.loads((d / GROUP_FILE).read_text()).get("columns", [])]
    return groups


def _report(pool: Path, t0: float, groups=None) -> UpgradeReport:
    m = json.loads((pool / MANIFEST).read_text())
    return UpgradeReport(str(pool), int(m["rows"]), len(m["shards"]), sorted(groups or ()), time.perf_counter() - t0)


def _old_manifest(pool: Path) -> dict[str, Any]:
    path = pool / MANIFEST
    if not path.is_file():
        raise PoolError(f"{str(pool)!r} is not a dcdb pool (no {MANIFEST})", hint="give the folder `dcdb ingest` wrote")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PoolError(f"pool manifest {str(path)!r} is unreadable: {exc}", hint="re-ingest the pool") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise PoolError(f"{str(path)!r} is not a dcdb pool manifest", hint="give the folder `dcdb ingest` wrote")
    if m.get("format_version") not in (1, FORMAT_VERSION):
        raise PoolError(f"pool {str(pool)!r} has store format v{m.get('format_version')}; `dcdb upgrade` upgrades v1",
                        hint="use the dcdb version that wrote it, or re-ingest the pool")
    if m.get("format_version") == 1 and m.get("buckets"):
        raise PoolError(
            f"pool {str(pool)!r} is a v1 pool ingested with --buckets: its rows no longer say which source "
            "shard and row they came from, which store format v2 records",
            hint=f"re-ingest it from its source: dcdb ingest {m.get('source', 'SRC')} NEW_POOL",
        )
    return m


# ---------------------------------------------------------------------------------- export


def _export(pool: Path, manifest: dict[str, Any], groups: dict[str, list[str]], out: Path, progress: bool) -> None:
    """Step 1: each v1 shard as a source shard (parquet + npz, derived columns beside)."""
    import sys

    from tqdm import tqdm

    done = out / "_DONE"
    if done.is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    spaces = manifest.get("spaces") or {}
    readers = {space: _VectorReader(pool / info["path"], space) for space, info in spaces.items()}
    with tqdm(total=int(manifest["rows"]), desc="export", unit="rows", unit_scale=True, file=sys.stderr,
              disable=not progress) as bar:
        for shard in manifest["shards"]:
            vectors = {space: r.take(int(shard["rows"])) for space, r in readers.items()}
            if not (out / f"{shard['name']}.parquet").is_file():
                _export_shard(pool, shard, groups, vectors, out)
            bar.update(int(shard["rows"]))
    done.write_text("")


def _export_shard(pool: Path, shard: dict[str, Any], groups: dict[str, list[str]], vectors, out: Path) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    from dcdb.io import atomic_path

    table = pq.read_table(pool / shard["metadata"])
    if table.num_rows != int(shard["rows"]):
        raise PoolError(f"metadata file {shard['metadata']!r} has {table.num_rows:,} rows, the manifest says "
                        f"{int(shard['rows']):,}", hint="the pool is damaged: re-ingest it from its source")
    for group, cols in groups.items():
        path = pool / DERIVED_DIR / group / f"{shard['name']}.parquet"
        try:
            dtab = pq.read_table(path, columns=cols)
        except (OSError, ValueError) as exc:
            raise PoolError(f"derived group {group!r} is damaged: {exc}",
                            hint=f"drop it (dcdb annotate --pool {pool} --drop {group}) and re-run") from None
        if dtab.num_rows != table.num_rows:
            raise PoolError(f"derived group {group!r}: {path.name} has {dtab.num_rows:,} rows, the shard "
                            f"{table.num_rows:,}", hint=f"drop it (dcdb annotate --pool {pool} --drop {group}) and re-run")
        for c in cols:
            table = table.append_column(f"{DERIVED_PREFIX}{group}__{c}", dtab.column(c))
    if vectors:
        with atomic_path(out / f"{shard['name']}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **vectors)
    with atomic_path(out / f"{shard['name']}.parquet") as tmp:  # last: the shard's mark of completion
        pq.write_table(table, tmp, compression="zstd", compression_level=1)


class _VectorReader:
    """A Lance embedding table read in row order, handed out in pieces of given lengths."""

    def __init__(self, path: Path, space: str):
        from dcdb.store import lance_batches, open_lance

        ds = open_lance(path)
        self.dim = ds.schema.field(space).type.list_size
        self.dtype = ds.schema.field(space).type.value_type.to_pandas_dtype()
        scanner = ds.scanner(columns=[space], batch_size=1 << 16, scan_in_order=True)
        self._batches = lance_batches(scanner.to_batches(), path)
        self._buf: list[Any] = []
        self._have = 0

    def take(self, n: int):
        import numpy as np

        if n == 0:
            return np.empty((0, self.dim), dtype=self.dtype)
        while self._have < n:
            b = next(self._batches, None)
            if b is None:
                raise PoolError(f"an embedding table ended {n - self._have:,} rows before the metadata",
                                hint="the pool is damaged: re-ingest it from its source")
            col = b.column(0)
            self._buf.append(col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), self.dim))
            self._have += len(col)
        whole = np.concatenate(self._buf) if len(self._buf) != 1 else self._buf[0]
        head, rest = whole[:n], whole[n:]
        self._buf, self._have = ([rest] if len(rest) else []), len(rest)
        return np.ascontiguousarray(head, dtype=self.dtype)


# ---------------------------------------------------------------------------------- ingest


def _ingest(export: Path, new: Path, jobs: int, progress: bool) -> None:
    from dcdb.ingest.pool import ingest

    ingest(export, new, jobs=jobs, progress=progress)


def _finish_new(pool: Path, old: dict[str, Any], new: Path, groups: dict[str, list[str]]) -> None:
    """Step 2's end: derived columns out of the new metadata into derived groups, the manifest
    with the original source's fields. Idempotent (a killed run redoes it)."""
    import hashlib

    import pyarrow.parquet as pq

    from dcdb.derived import GROUP_FILE, write_group_file
    from dcdb.ingest.pool import write_metadata_file
    from dcdb.io import dir_size, json_text, write_json

    m = json.loads((new / MANIFEST).read_text())
    for shard in m["shards"] if groups else ():
        path = new / shard["metadata"]
        table = pq.read_table(path)
        moved = [c for c in table.column_names if c.startswith(DERIVED_PREFIX)]
        if not moved:
            continue  # done by an earlier run
        for group, cols in groups.items():
            d = new / DERIVED_DIR / group
            d.mkdir(parents=True, exist_ok=True)
            write_group_file(table.select([f"{DERIVED_PREFIX}{group}__{c}" for c in cols]).rename_columns(cols),
                             d / f"{shard['name']}.parquet")
        write_metadata_file(table.drop_columns(moved), path)
    m["columns"] = [c for c in m["columns"] if not c["name"].startswith(DERIVED_PREFIX)]
    for key in ("source", "source_fingerprint"):
        if key in old:
            m[key] = old[key]
    for space, info in (old.get("spaces") or {}).items():
        if space in m.get("spaces", {}) and "model" in info:
            m["spaces"][space]["model"] = info["model"]
    m["upgraded_from"] = {"format_version": 1, "created": old.get("created"), "dcdb_version": old.get("dcdb_version")}
    m["bytes"] = dir_size(new / METADATA_DIR) + dir_size(new / EMBEDDINGS_DIR)
    text = json_text(m)
    digest = hashlib.sha256(text.encode()).hexdigest()
    for group in groups:
        info = json.loads((pool / DERIVED_DIR / group / GROUP_FILE).read_text())
        info["pool_manifest_sha256"] = digest  # the same values, re-laid: current for the new pool
        write_json(new / DERIVED_DIR / group / GROUP_FILE, info)
    write_json(new / MANIFEST, m)


# ------------------------------------------------------------------------------------ swap


def _swap(pool: Path, work: Path) -> list[str]:
    """Step 3: exchange the folders (each move can be redone), then the manifest, last; the
    derived groups the pool has."""
    import hashlib
    import os

    from dcdb.io import write_json

    new, old = work / "new", work / "old"
    if not (new / MANIFEST).is_file():  # killed after the manifest was in place: only the clean-up is left
        shutil.rmtree(work, ignore_errors=True)
        return sorted(_groups(pool))
    old.mkdir(parents=True, exist_ok=True)
    for name in SWAPPED:
        if (pool / name).exists() and not (old / name).exists():
            os.replace(pool / name, old / name)
        if (new / name).exists():
            os.replace(new / name, pool / name)
    digest = hashlib.sha256((new / MANIFEST).read_bytes()).hexdigest()
    for f in sorted((pool / SUBSETS_DIR).glob("*.json")) if (pool / SUBSETS_DIR).is_dir() else ():
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and "pool_manifest_sha256" in info:
            info["pool_manifest_sha256"] = digest  # a uid list does not depend on the layout
            write_json(f, info)
    os.replace(new / MANIFEST, pool / MANIFEST)
    shutil.rmtree(work, ignore_errors=True)
    return sorted(_groups(pool))
