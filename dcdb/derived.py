"""Derived columns: values computed once per pool (language id, token counts, centroid ids ...)
or imported from elsewhere, stored beside the metadata and seen as columns of the ``pool`` view.

Layout: ``POOL/derived/<group>/<shard>.parquet``, one file per metadata shard, row-aligned with it
(row i of ``metadata/<shard>.parquet`` is row i of ``derived/<group>/<shard>.parquet``), plus
``POOL/derived/<group>/_group.json`` (columns, how they were made, when). A group is written into a
temporary folder and renamed into place when complete, so a killed run leaves no half group; a
group without ``_group.json`` is ignored. A derived column named like a metadata column replaces it
in ``pool`` (``pool_metadata`` keeps the original); ``dcdb annotate`` never writes one (an import of
a metadata, embedding or other group's column name is refused), but a group written here may.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dcdb.errors import PoolError, UsageError
from dcdb.store import DERIVED_DIR, Pool, nan_to_null

GROUP_FILE = "_group.json"
GROUP_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def groups(pool: Pool) -> dict[str, dict[str, Any]]:
    """Complete derived groups of a pool: name -> their ``_group.json`` (with ``path``)."""
    root = pool.path / DERIVED_DIR
    out: dict[str, dict[str, Any]] = {}
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        meta = d / GROUP_FILE
        if d.is_dir() and GROUP_RE.match(d.name) and meta.is_file():
            info = json.loads(meta.read_text())
            info["path"] = d
            out[d.name] = info
    return out


def group_files(pool: Pool, group: str) -> list[Path]:
    d = pool.path / DERIVED_DIR / group
    files = [d / f"{s['name']}.parquet" for s in pool.shards]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise PoolError(
            f"derived group {group!r} is damaged: {len(missing)} shard file(s) missing, first {str(missing[0])!r}",
            hint=f"recompute it (dcdb annotate) or delete {str(d)!r}",
        )
    return files


def write_group(
    pool: Pool,
    group: str,
    compute: Callable[[dict[str, Any]], Any],
    *,
    info: dict[str, Any] | None = None,
    replace: bool = False,
    shards: Iterable[dict[str, Any]] | None = None,
) -> Path:
    """Write a derived group: ``compute(shard)`` returns a pyarrow Table with exactly the shard's
    row count (shard = an entry of the manifest's ``shards``). Atomic: temp folder, then rename.
    Holds the pool's write lock; removes the temp folders of killed runs first."""
    from dcdb.io import write_lock, writing

    if not GROUP_RE.match(group):
        raise UsageError(f"invalid derived group name {group!r}", hint="lowercase letters, digits, underscores")
    with write_lock(pool.path, "pool"), writing(pool.path, f"derived group {group!r} into pool",
                                                redo="the pool is unchanged; then re-run the command"):
        return _write_group(pool, group, compute, info=info, replace=replace, shards=shards)


def _write_group(pool: Pool, group: str, compute, *, info, replace: bool, shards) -> Path:
    from dcdb.io import kill_point, sweep_pid_dirs

    root = pool.path / DERIVED_DIR
    made = not root.is_dir()
    root.mkdir(exist_ok=True)
    final = root / group
    if not final.exists() and (old := _newest_old(root, group)) is not None:
        os.replace(old, final)  # a run killed between moving the group aside and moving the new one in
    for kind in ("tmp", "old"):  # full copies of the group that killed runs left
        sweep_pid_dirs(root, f".{group}.{kind}-*")
    if final.exists() and not replace:
        raise UsageError(f"derived group {group!r} already exists", hint="pass --force to recompute it")
    tmp = root / f".{group}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    columns = None
    try:
        for shard in shards if shards is not None else pool.shards:
            tbl = compute(shard)
            if tbl.num_rows != shard["rows"]:
                raise PoolError(
                    f"derived group {group!r}: shard {shard['name']} got {tbl.num_rows} rows, expected {shard['rows']}",
                    hint="a derived column needs exactly one value per pool row, in the pool's order",
                )
            tbl = tbl.from_arrays([nan_to_null(c) for c in tbl.columns], schema=tbl.schema)
            if columns is None:
                columns = [{"name": f.name, "type": str(f.type)} for f in tbl.schema]
            write_group_file(tbl, tmp / f"{shard['name']}.parquet", atomic=False)
        meta = {
            "group": group,
            "columns": columns or [],
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "pool_manifest_sha256": pool.manifest_hash,
            **(info or {}),
        }
        (tmp / GROUP_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        kill_point(f"group:{group}")
        if final.exists():
            old = root / f".{group}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made:
            shutil.rmtree(root, ignore_errors=True)  # it held only our temp folder
        raise
    return final


def write_group_file(tbl, path: Path, *, atomic: bool = True) -> None:
    """One shard's file of a derived group (``tbl``: its columns, the shard's rows in order)."""
    import pyarrow.parquet as pq

    from dcdb.io import atomic_path

    def write(to):
        pq.write_table(tbl, to, row_group_size=122_880,
                       write_statistics=[f.name for f in tbl.schema if not _is_float(f.type)])

    if not atomic:  # inside a temporary group folder already
        write(path)
        return
    with atomic_path(path) as tmp:
        write(tmp)


def _newest_old(root: Path, group: str) -> Path | None:
    """A complete group a killed ``--force`` run moved aside (``.<group>.old-PID``), if any."""
    olds = [d for d in root.glob(f".{group}.old-*") if (d / GROUP_FILE).is_file()]
    return max(olds, key=lambda d: d.stat().st_mtime) if olds else None


def _is_float(t) -> bool:
    import pyarrow as pa

    # No min/max statistics for float columns: DuckDB prunes row groups with them as if NaN could
    # not occur (pyarrow leaves NaN out of min/max), which makes `isnan(x)` filters miss rows.
    return pa.types.is_floating(t)


def drop_group(pool: Pool, group: str) -> None:
    from dcdb.io import write_lock

    d = pool.path / DERIVED_DIR / group
    with write_lock(pool.path, "pool"):
        if not (d / GROUP_FILE).is_file():
            raise UsageError(f"pool has no derived group {group!r}",
                             hint="`dcdb annotate --pool POOL --list` lists its groups")
        shutil.rmtree(d)
