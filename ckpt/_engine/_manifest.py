"""The manifest of a save every rank finished."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from ckpt._engine._globalplan import GlobalPlan
from ckpt._format import Manifest, key_to_path

__all__ = ["build_manifest", "under_prefix", "object_paths"]


def build_manifest(plan: GlobalPlan, *, step: int | None, world_size: int, rank_values: list[Any],
                   values: dict[str, Any], pickles: dict[str, bytes], user_metadata: dict[str, Any],
                   prefix: str = "") -> Manifest:
    """The manifest of a save every rank finished: the plan's tensor entries, the plain
    values (JSON, or a pickle object each), each rank's per-rank values. ``prefix``: the
    directory (relative to the checkpoint) that the ranks wrote the objects under."""
    manifest = Manifest(
        step=step, entries=dict(plan.entries), world_size=world_size,
        layout={"bytes_per_rank": [plan.bytes_per_rank.get(r, 0) for r in range(world_size)]},
        rank_state={str(r): v for r, v in enumerate(rank_values)}, user_metadata=user_metadata)
    for key, value in values.items():
        manifest.entries[key] = {"kind": "json", "value": value}
    for key in pickles:
        manifest.entries[key] = {"kind": "pickle", "path": f"objects/{key_to_path(key)}.pkl", "format": "pickle"}
    manifest.entries = under_prefix(manifest.entries, prefix)
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
