"""Stored subsets: store, list, show, and combine them (or plain .npy uid files) with set algebra.

Operands are subset names of a pool or paths to uid files (``.npy`` or raw 16-byte records).
Multiset semantics because duplicates mean upsampling (see ``dcdb.uids``): union keeps each uid
with its larger count, intersect with its smaller count, minus drops every copy of B's uids from A.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dcdb import uids as U
from dcdb.errors import OutputError, SubsetError, UsageError
from dcdb.store import Pool

OPS = {"union": U.union, "intersect": U.intersect, "minus": U.minus}


def list_subsets(pool: Pool) -> list[dict[str, Any]]:
    from dcdb.engine import stored_subsets

    out = []
    for name in stored_subsets(pool):
        m = read_manifest(pool, name)
        out.append(
            {
                "name": name,
                "rows": m.get("rows"),
                "unique_uids": m.get("unique_uids"),
                "filter": m.get("filter"),
                "params": m.get("params", {}),
                "created": m.get("created"),
                "stale": m.get("pool_manifest_sha256") not in (None, pool.manifest_hash),
            }
        )
    return out


def read_manifest(pool: Pool, name: str) -> dict[str, Any]:
    p = pool.subsets_dir / f"{name}.json"
    if not (pool.subsets_dir / f"{name}.npy").is_file():
        known = [s["name"] for s in list_subsets(pool)] if pool.subsets_dir.is_dir() else []
        raise SubsetError(
            f"pool has no subset {name!r}",
            hint=f"stored subsets: {', '.join(known)}" if known else "store one with `dcdb query ... --save NAME`",
        )
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def load_operand(ref: str, pool: Pool | None) -> tuple[np.ndarray, str]:
    """A subset name in ``pool`` or a path to a uid file -> (uids, description)."""
    p = Path(ref).expanduser()
    if p.is_file():
        return U.load(p), str(p)
    if pool is not None and (pool.subsets_dir / f"{ref}.npy").is_file():
        return U.load(pool.subsets_dir / f"{ref}.npy"), f"subset {ref}"
    if pool is None:
        raise SubsetError(f"{ref!r} is not a uid file", hint="give a path to a .npy, or --pool to use stored subsets")
    raise SubsetError(
        f"{ref!r} is neither a uid file nor a stored subset of the pool",
        hint="`dcdb subsets list` shows the stored subsets",
    )


def combine(op: str, refs: list[str], pool: Pool | None) -> tuple[np.ndarray, list[str]]:
    if op not in OPS:
        raise UsageError(f"unknown operation {op!r}", hint=f"use one of {', '.join(OPS)}")
    if len(refs) < 2:
        raise UsageError(f"{op} needs at least two operands", hint=f"dcdb subsets {op} A B [C ...] (stored subset names or .npy files)")
    if op == "minus" and len(refs) != 2:
        raise UsageError("minus takes exactly two operands: A B (the rows of A not in B)",
                         hint="chain it for more: minus A B --save ab, then minus ab C")
    arrays, names = zip(*(load_operand(r, pool) for r in refs))
    acc = arrays[0]
    for a in arrays[1:]:
        acc = OPS[op](acc, a)
    return U.sort(acc), list(names)


def combination_manifest(op: str, refs: list[str], arr: np.ndarray, pool: Pool | None, output: str) -> dict[str, Any]:
    from dcdb.version import __version__

    return {
        "kind": "dcdb-subset",
        "operation": op,
        "operands": refs,
        "pool": str(pool.path.resolve()) if pool else None,
        "pool_manifest_sha256": pool.manifest_hash if pool else None,
        "rows": len(arr),
        "unique_uids": U.count_unique(arr),
        "uids_sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
        "output": output,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dcdb_version": __version__,
    }


def check_save(pool: Pool, name: str, *, force: bool) -> Path:
    """Before ``--save NAME`` runs anything: the subset's files in the pool (``.npy``, ``.parquet``,
    ``.json``) are missing or regular files (see ``dcdb.io.write_target``), and an existing subset
    is replaced only with ``force``. Returns the ``.npy`` path."""
    from dcdb.io import write_target

    d = pool.subsets_dir
    npy = d / f"{name}.npy"
    for p in (d / f"{name}.parquet", d / f"{name}.json", npy):
        write_target(p, what="subset file")
    if npy.exists() and not force:
        raise OutputError(f"subset {name!r} already exists in the pool", hint="pass --force to replace it")
    return npy


def store_subset(pool: Pool, name: str, arr: np.ndarray, manifest: dict[str, Any], *, force: bool = False) -> Path:
    """Write ``subsets/<name>.npy`` + ``.json`` + ``.parquet`` (the uid table SQL sees)."""
    from dcdb.engine import check_subset_name
    from dcdb.io import atomic_path, json_text, sweep_temps, write_lock, writing

    check_subset_name(name)
    d = pool.subsets_dir
    with write_lock(pool.path, "pool"), writing(pool.path, f"subset {name!r} into pool",
                                                redo="the pool is unchanged; then re-run the command"):
        npy = check_save(pool, name, force=force)  # regular files only; an existing one needs force
        made = not d.is_dir()
        d.mkdir(exist_ok=True)
        for suffix in (".npy", ".json", ".parquet"):
            sweep_temps(d / f"{name}{suffix}")  # what a killed run left
        try:
            # Every file under a temp name first (a full disk fails here and changes nothing), then
            # renamed: parquet first, npy last -- a subset is visible only once its .npy exists.
            with (atomic_path(npy) as npy_tmp, atomic_path(d / f"{name}.json") as json_tmp,
                  atomic_path(d / f"{name}.parquet") as parquet_tmp):
                U.write_file(parquet_tmp, arr, "parquet")
                json_tmp.write_text(json_text(manifest))
                U.write_file(npy_tmp, arr, "npy")
        except BaseException:
            if made:
                try:
                    d.rmdir()  # the temps are gone already
                except OSError:
                    pass
            raise
    return npy
