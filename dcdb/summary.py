"""What `dcdb info` reports about a pool."""

from __future__ import annotations

from typing import Any

from dcdb.io import dir_size
from dcdb.store import Pool


def pool_info(pool: Pool) -> dict[str, Any]:
    from dcdb.subsets import list_subsets

    meta_bytes = sum(f.stat().st_size for f in pool.metadata_files() if f.is_file())
    spaces = {}
    for name, spec in pool.spaces.items():
        spaces[name] = {
            "model": spec.get("model"),
            "dim": spec.get("dim"),
            "dtype": spec.get("dtype"),
            "bytes": dir_size(pool.lance_path(name)),
        }
    subsets = list_subsets(pool)
    return {
        "path": str(pool.path.resolve()),
        "rows": pool.rows,
        "shards": len(pool.shards),
        "buckets": pool.manifest.get("buckets"),
        "source_shards": len(pool.manifest.get("source_shards") or []),
        "duplicate_uids": pool.manifest.get("duplicate_uids", 0),
        "columns": pool.columns,
        "spaces": spaces,
        "subsets": [{"name": s["name"], "rows": s["rows"]} for s in subsets],
        "bytes": {
            "metadata": meta_bytes,
            "embeddings": sum(s["bytes"] for s in spaces.values()),
            "total": dir_size(pool.path),
        },
        "created": pool.manifest.get("created"),
        "source": pool.manifest.get("source"),
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def format_pool_info(info: dict[str, Any]) -> str:
    lines = [
        f"pool      {info['path']}",
        f"rows      {info['rows']:,} in "
        + (f"{info['shards']} uid bucket(s), each sorted by uid" if info.get("buckets") else f"{info['shards']} shard(s)")
        + (f", from {info['source_shards']} source shard(s)" if info.get("source_shards") else "")
        + (f", {info['duplicate_uids']:,} duplicate uid(s)" if info["duplicate_uids"] else ""),
        (
            f"size      {human_bytes(info['bytes']['total'])} (metadata "
            f"{human_bytes(info['bytes']['metadata'])}, embeddings {human_bytes(info['bytes']['embeddings'])})"
        ),
        "columns   " + ", ".join(f"{c['name']} {c['type']}" for c in info["columns"]),
    ]
    if info["spaces"]:
        lines.append("spaces")
        for name, s in info["spaces"].items():
            lines.append(f"  {name:<10} {s['dtype']}[{s['dim']}]  {s['model']}  {human_bytes(s['bytes'])}")
    else:
        lines.append("spaces    none (metadata-only pool)")
    if info["subsets"]:
        lines.append("subsets")
        for s in info["subsets"]:
            lines.append(f"  {s['name']:<20} {s['rows']:,} rows")
    return "\n".join(lines)
