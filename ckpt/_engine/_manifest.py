"""The manifest of a save every rank finished."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from ckpt._format import RANKS_DIR, Manifest, key_to_path

__all__ = ["build_manifest", "manifest_under_prefix", "under_prefix", "object_paths"]


def build_manifest(entries: dict[str, dict[str, Any]], *, step: int | None, world_size: int, total_bytes: int,
                   values: dict[str, Any], pickles: dict[str, bytes], user_metadata: dict[str, Any],
                   prefix: str = "", rank_objects: tuple[str, list[str]] | None = None) -> Manifest:
    """The manifest of a save every rank finished: the plan's tensor entries, the plain
    values (JSON, or a pickle object each), and where each rank's per-rank values are
    (``rank_objects``: the save's id and the per-rank keys; one object per rank).
    ``prefix``: the directory (relative to the checkpoint) that the ranks wrote the
    objects under."""
    manifest = Manifest(step=step, entries=dict(entries), world_size=world_size,
                        layout={"bytes": total_bytes}, user_metadata=user_metadata)
    for key, value in values.items():
        manifest.entries[key] = {"kind": "json", "value": value}
    for key in pickles:
        manifest.entries[key] = {"kind": "pickle", "path": f"objects/{key_to_path(key)}.pkl", "format": "pickle"}
    if rank_objects is not None:
        manifest.rank_objects = {"path": RANKS_DIR, "id": rank_objects[0], "keys": sorted(rank_objects[1])}
    return manifest_under_prefix(manifest, prefix)


def manifest_under_prefix(manifest: Manifest, prefix: str) -> Manifest:
    """``manifest`` with every object path (entries and per-rank objects) under ``prefix``."""
    manifest.entries = under_prefix(manifest.entries, prefix)
    if prefix and manifest.rank_objects is not None:
        manifest.rank_objects = {**manifest.rank_objects, "path": f"{prefix}/{manifest.rank_objects['path']}"}
    return manifest


def under_prefix(entries: dict[str, dict[str, Any]], prefix: str) -> dict[str, dict[str, Any]]:
    """``entries`` with every object path (arrays, pieces, packs, pickles) under
    ``prefix``; the entries themselves are not changed (a cached plan shares them)."""
    if not prefix:
        return entries
    out = copy.deepcopy(entries)
    for holder in _path_holders(out):
        holder["path"] = f"{prefix}/{holder['path']}"
    return out


def object_paths(entries: dict[str, dict[str, Any]]) -> set[str]:
    """Every object path (checkpoint-relative) that ``entries`` refer to."""
    return {h["path"] for h in _path_holders(entries)}


def _path_holders(entries: dict[str, dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for e in entries.values():
        if e.get("kind") == "json":
            continue
        st = e.get("storage") or {}
        for holder in [e, st, *st.get("pieces", [])]:
            if isinstance(holder.get("path"), str):
                yield holder
