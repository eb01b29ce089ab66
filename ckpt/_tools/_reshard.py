"""Offline resharding: rewrite a checkpoint for another world size and layout.

The output's storage objects align with the target ranks' boxes, so each of the M ranks
later reads whole objects of its own. The rewrite streams one target shard at a time
(read the region from the source — only the overlapping chunks — then write it), so
memory stays near ``memory_bytes`` whatever the checkpoint's size. The output is
committed like any save (temporary directory + rename, or manifest last), so an
interrupted reshard never leaves a valid-looking partial checkpoint; rerunning it
starts over.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ckpt._engine._arrays import open_for_write, translate
from ckpt._engine._catalog import read_manifest
from ckpt._engine._commit import commit_strategy
from ckpt._engine._confine import refuse_symlinks
from ckpt._engine._globalplan import PieceMeta, build_plan
from ckpt._engine._load import Loader
from ckpt._engine._manifest import manifest_under_prefix
from ckpt._engine._plan import PlanConfig, pack_metadata, zarr_metadata
from ckpt._engine._recycle import reading
from ckpt._format import (
    MANIFEST,
    RANKS_DIR,
    Manifest,
    check_relpath,
    itemsize,
    rank_object,
    rank_object_path,
    storage_dtype,
    torch_dtype,
)
from ckpt.errors import CheckpointExistsError
from ckpt.storage import split_checkpoint_url

LAYOUTS = ("shard0", "replicate")


def target_boxes(shape: tuple[int, ...], world_size: int, layout: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each target rank's box of a tensor: ``shard0`` splits dim 0 the way
    ``torch.chunk``/DTensor ``Shard(0)`` do (ceil-sized pieces, the last ones smaller or
    empty); ``replicate`` gives every rank the whole tensor. 0-d tensors are replicated."""
    zeros = (0,) * len(shape)
    if layout == "replicate" or not shape or shape[0] == 0:
        return [(zeros, tuple(shape))] * world_size
    n = shape[0]
    step = -(-n // world_size)
    out = []
    for r in range(world_size):
        lo, hi = min(n, r * step), min(n, (r + 1) * step)
        out.append(((lo, *zeros[1:]), (hi - lo, *shape[1:])))
    return out


def reshard(src: str | os.PathLike[str], dst: str | os.PathLike[str], world_size: int, *,
            layout: str = "shard0", overwrite: bool = False, memory_bytes: int = 256 << 20,
            storage_options: dict[str, Any] | None = None, dst_storage_options: dict[str, Any] | None = None,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Rewrite the checkpoint ``src`` as ``dst`` for ``world_size`` ranks in ``layout``."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    t0 = time.perf_counter()
    s_storage, s_name = split_checkpoint_url(src, **(storage_options or {}))
    d_storage, d_name = split_checkpoint_url(dst, **(dst_storage_options if dst_storage_options is not None
                                                     else storage_options or {}))
    with reading(s_storage, s_name):  # retention cannot recycle the source under the copy
        manifest = read_manifest(s_storage, s_name)
        if d_storage.exists(f"{d_name}/{MANIFEST}") and not overwrite:
            raise CheckpointExistsError("a committed checkpoint already exists at the destination",
                                        path=d_storage.describe(d_name), hint="choose another name or pass overwrite")
        committer = commit_strategy(d_storage)
        target = committer.target(d_name)
        write_dir = target.dir

        tensors = {k: e for k, e in manifest.entries.items() if e["kind"] == "tensor"}
        shard = max(1 << 20, memory_bytes // 4)
        cfg = PlanConfig(max_shard_bytes=shard, chunk_bytes=min(4 << 20, shard), pack_threshold=min(256 << 10, shard),
                         pack_bytes=min(16 << 20, shard))
        metas: list[list[PieceMeta]] = [[] for _ in range(world_size)]
        for key, e in sorted(tensors.items()):
            shape = tuple(e["shape"])
            small = math.prod(shape) * itemsize(e["dtype"]) <= cfg.pack_threshold  # packed whole, read by all
            for r, (o, s) in enumerate(target_boxes(shape, world_size, "replicate" if small else layout)):
                metas[r].append(PieceMeta(key, e["dtype"], shape, o, s))
        plan = build_plan(metas, cfg)
        total = sum(math.prod(e["shape"]) * itemsize(e["dtype"]) for e in tensors.values())
        done = 0
        loader = Loader(s_storage, s_name, manifest, strict=False, allow_pickle=False)

        def read_region(key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
            e = tensors[key]
            buf = torch.empty(sizes, dtype=torch_dtype(e["dtype"], key))
            loader.read_into(key, buf, offsets, global_shape=tuple(e["shape"]))
            loader.execute()
            return buf

        try:
            for rank in range(world_size):
                for a in plan.per_rank.get(rank, []):
                    if a.kind == "pack":
                        continue
                    assert a.layout is not None
                    dt = plan.entries[a.key]["dtype"]
                    meta = zarr_metadata(a.layout, storage_dtype(dt), {"ckpt": {"key": a.key, "dtype": dt}})
                    arr = _result(open_for_write(d_storage, f"{write_dir}/{a.path}", meta, create=a.create),
                                  d_storage, write_dir, a.path, a.key)
                    base = a.box[0] if a.kind == "array" else (0,) * len(a.box[0])
                    for offs, sizes in a.layout.shards_in(base, a.box[1]):
                        if math.prod(sizes) == 0:
                            continue
                        glob = tuple(o + b for o, b in zip(offs, a.box[0])) if a.kind == "piece" else offs
                        data = read_region(a.key, glob, sizes)
                        view = data.contiguous().view(-1).view(torch.uint8).numpy().view(np.dtype(storage_dtype(dt)))
                        region = tuple(slice(o, o + s) for o, s in zip(offs, sizes))
                        _result(arr[region].write(view.reshape(sizes)), d_storage, write_dir, a.path, a.key)
                        done += data.numel() * data.element_size()
                        if progress:
                            progress(data.numel() * data.element_size(), total)
                for path, nbytes in plan.packs.get(rank, []):
                    buf = np.zeros(nbytes, dtype=np.uint8)
                    for key, e in plan.entries.items():
                        st = e.get("storage", {})
                        if st.get("layout") == "packed" and st.get("path") == path and st["nbytes"]:
                            t = read_region(key, (0,) * len(e["shape"]), tuple(e["shape"]))
                            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
                            buf[st["offset"]:st["offset"] + st["nbytes"]] = raw
                            done += st["nbytes"]
                    keys = [k for k, e in plan.entries.items() if e.get("storage", {}).get("path") == path]
                    arr = _result(open_for_write(d_storage, f"{write_dir}/{path}", pack_metadata(nbytes, {"ckpt": {
                        "pack": True, "keys": keys}}), create=True), d_storage, write_dir, path, None)
                    _result(arr.write(buf), d_storage, write_dir, path, None)
            entries: dict[str, dict[str, Any]] = dict(plan.entries)
            for key, e in manifest.entries.items():
                if e["kind"] == "json":
                    entries[key] = e
                elif e["kind"] == "pickle":
                    path = check_relpath(e["path"], key=key)
                    refuse_symlinks(s_storage, s_name, path, key)
                    d_storage.write_bytes(f"{write_dir}/{path}", s_storage.read_bytes(f"{s_name}/{path}"))
                    entries[key] = e
            save_id, rank_keys = os.urandom(8).hex(), set[str]()
            if manifest.rank_objects is not None or manifest.rank_state:
                for r in range(world_size):  # ranks beyond the source's get an empty object
                    vals = loader.rank_values(r) if r < manifest.world_size else {}
                    rank_keys.update(vals)
                    d_storage.write_bytes(f"{write_dir}/{rank_object_path(r)}", rank_object(r, save_id, vals))
            out = Manifest(step=manifest.step, entries=entries, world_size=world_size,
                           layout={"bytes": sum(plan.bytes_per_rank.values()),
                                   "resharded_from": {"world_size": manifest.world_size, "url": s_storage.describe(s_name)},
                                   "target_layout": layout},
                           user_metadata=manifest.user_metadata,
                           rank_objects={"path": RANKS_DIR, "id": save_id, "keys": sorted(rank_keys)}
                           if manifest.rank_objects is not None or manifest.rank_state else None)
            out = manifest_under_prefix(out, target.prefix)
            committer.commit(target, d_name, out.to_json(), overwrite=overwrite)
        except BaseException:
            try:
                committer.discard(target, d_name)
            except Exception:  # noqa: BLE001 - gc removes it later
                pass
            raise
        return {"src": s_storage.describe(s_name), "dst": d_storage.describe(d_name), "world_size": world_size,
                "layout": layout, "tensors": len(tensors), "bytes": done, "seconds": time.perf_counter() - t0,
                "bytes_per_rank": [plan.bytes_per_rank.get(r, 0) for r in range(world_size)]}


def _result(fut: Any, storage: Any, write_dir: str, path: str, key: str | None) -> Any:
    try:
        return fut.result()
    except Exception as e:
        raise translate(e, key=key, where=storage.describe(f"{write_dir}/{path}"), reading=False) from e
