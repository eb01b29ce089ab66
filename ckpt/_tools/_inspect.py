"""``ls`` and ``info``: what a run and a checkpoint hold, as plain dicts (JSON-ready)."""

from __future__ import annotations

import math
import os
from typing import Any

from ckpt._engine._catalog import list_run, read_manifest
from ckpt._engine._layout import stored_arrays
from ckpt._tools._common import layout_summary, open_checkpoint, tensor_nbytes
from ckpt.errors import CheckpointError, CheckpointNotFoundError
from ckpt.storage import open_storage


def ls(run: str | os.PathLike[str], include_incomplete: bool = False, *,
       storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The checkpoints of a run, newest first.

    Each is a dict: ``step``, ``name``, ``url``, ``time`` (creation, seconds since the
    epoch; None when there is no manifest), ``size`` (bytes of every object under it),
    ``objects``, ``world_size``, ``layout`` (entries per storage layout), ``committed``
    and ``reason`` (why it is not committed, or why its manifest is unreadable).
    Incomplete ones (no manifest, temporary directories) only with ``include_incomplete``.
    """
    storage = open_storage(run, **(storage_options or {}))
    found = list_run(storage, include_incomplete=include_incomplete)
    if not found and not storage.exists(""):
        raise CheckpointNotFoundError("no run here: nothing exists at this location", path=storage.describe(),
                                      hint="check the path; a run is the directory that holds step-* checkpoints")
    out = []
    for info in found:
        files = storage.list_files(info.name)
        row: dict[str, Any] = {
            "step": info.step, "name": info.name, "url": info.url, "time": None,
            "size": sum(f.size for f in files), "objects": len(files), "world_size": None,
            "layout": None, "committed": info.committed, "reason": info.reason,
        }
        if info.committed:
            try:
                m = read_manifest(storage, info.name)
            except CheckpointError as e:  # listed, but say why it will not load
                row["reason"] = f"unreadable manifest: {e.message}"
            else:
                row.update(time=m.created, world_size=m.world_size, layout=layout_summary(m))
                if row["step"] is None:
                    row["step"] = m.step
        out.append(row)
    return out


def _entry_info(key: str, e: dict[str, Any]) -> dict[str, Any]:
    kind = e["kind"]
    if kind != "tensor":
        out: dict[str, Any] = {"key": key, "kind": kind, "shape": None, "dtype": None, "nbytes": None,
                               "layout": {"type": "value" if kind == "json" else "object"}}
        if kind == "pickle":
            out["layout"]["path"] = e["path"]
        return out
    st = e["storage"]
    boxes = e.get("boxes") or []
    lay: dict[str, Any] = {"type": st["layout"], "boxes": len(boxes),
                           "ranks": len({b.get("rank") for b in boxes}) if boxes else 1}
    sh = e.get("sharding")
    if isinstance(sh, dict):  # format 3, placed by rule: the boxes follow from the mesh and placements
        lay.update(mesh=sh.get("mesh"), placements=sh.get("dims"))
        try:
            grid = [math.prod(sh["mesh"][m] for m in ms) for ms in sh["dims"]]
            lay["boxes"] = math.prod(min(g, n) for g, n in zip(grid, e["shape"]))
            lay["ranks"] = math.prod(sh["mesh"])
        except (TypeError, IndexError, KeyError):
            pass
    if st["layout"] == "array":
        shards = math.prod(-(-n // s) for n, s in zip(e["shape"], st["shard_shape"])) if math.prod(e["shape"]) else 0
        lay.update(path=st["path"], shards=shards, shard_shape=st["shard_shape"], chunk_shape=st["chunk_shape"])
    elif st["layout"] == "packed":
        lay.update(path=st["path"], offset=st["offset"])
    else:
        lay.update(pieces=len(st["pieces"]))
    return {"key": key, "kind": "tensor", "shape": list(e["shape"]), "dtype": e["dtype"],
            "nbytes": tensor_nbytes(e), "layout": lay}


def info(ckpt_url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the manifest of one checkpoint says, summarised.

    Keys: ``url``, ``step``, ``created``, ``world_size``, ``format_version``,
    ``versions``, ``user_metadata``, ``bytes_per_rank``, ``totals`` (tensors, their
    bytes, values, pickled objects, zarr arrays, packs, per-layout counts) and
    ``entries`` (sorted by key: ``key``, ``kind``, ``shape``, ``dtype``, ``nbytes``,
    ``layout`` — its type, path, shard count, boxes and writing ranks).
    """
    ck = open_checkpoint(ckpt_url, storage_options)
    m = ck.manifest
    entries = [_entry_info(k, m.entries[k]) for k in sorted(m.entries)]
    arrays = stored_arrays(m)
    totals = {
        "entries": len(entries),
        "tensors": sum(1 for e in entries if e["kind"] == "tensor"),
        "tensor_bytes": sum(e["nbytes"] or 0 for e in entries),
        "values": sum(1 for e in entries if e["kind"] == "json"),
        "pickled": sum(1 for e in entries if e["kind"] == "pickle"),
        "arrays": sum(1 for a in arrays if a.kind != "pack"),
        "packs": sum(1 for a in arrays if a.kind == "pack"),
        "layouts": layout_summary(m),
    }
    return {
        "url": ck.url, "step": m.step, "created": m.created, "world_size": m.world_size,
        "format_version": m.format_version, "versions": dict(m.versions),
        "user_metadata": dict(m.user_metadata),
        "bytes_per_rank": list((m.layout or {}).get("bytes_per_rank") or []),
        "bytes": (m.layout or {}).get("bytes"),
        "totals": totals, "entries": entries,
    }
