"""DTensor (and therefore FSDP2 / tensor-parallel) pieces in global coordinates.

A DTensor's local shard is described by its global shape and the offsets of this rank's
box, computed by torch's own placement rules (uneven Shard splits included). Replicated
placements give several ranks the same box; the save plan writes it once.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ckpt._sharding import Sharding
from ckpt.errors import UnsupportedStateError
from ckpt.providers._base import LoadSource, TensorItem


def local_box(dt: Any, key: str) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(local tensor, global shape, global offsets of the local tensor)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for p in dt.placements:
        if p.is_partial():
            raise UnsupportedStateError(
                "a DTensor with a Partial placement has no values until reduced", key=key,
                hint="redistribute it to Shard/Replicate (dt.redistribute(...)) before saving")
    local = dt.to_local()
    shape, offsets = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
    if tuple(shape) != tuple(local.shape):
        raise UnsupportedStateError(
            f"DTensor local shape {tuple(local.shape)} disagrees with its placements ({tuple(shape)})",
            key=key, hint="this placement layout is not supported yet; please report it")
    return local, tuple(dt.shape), tuple(int(o) for o in offsets)


def mesh_sharding(dt: Any, shape: tuple[int, ...], box: tuple[tuple[int, ...], tuple[int, ...]]) -> Sharding | None:
    """The rule of ``dt``'s placements (plain ``Shard``/``Replicate`` only), checked to
    give exactly this rank's box; None where the rule cannot be derived (strided shards,
    a rank outside the mesh): the save plan then learns the box from the coordinator."""
    coord = dt.device_mesh.get_coordinate()
    if coord is None:
        return None
    dims: list[list[int]] = [[] for _ in shape]
    for m, p in enumerate(dt.placements):
        if p.is_replicate():
            continue
        if type(p).__name__ != "Shard" or not p.is_shard():
            return None  # _StridedShard and newer kinds: derived by the coordinator instead
        dims[p.dim % max(1, len(shape))].append(m)
    sh = Sharding(tuple(int(n) for n in dt.device_mesh.shape), tuple(tuple(d) for d in dims),
                  tuple(int(c) for c in coord))
    offs, sizes = sh.box(shape)
    if sizes != box[1] or (math.prod(sizes) > 0 and offs != box[0]):
        return None
    return sh


def dtensor_item(key: str, dt: Any, *, eager: bool = False) -> TensorItem:
    local, shape, offsets = local_box(dt, key)
    sharding = mesh_sharding(dt, shape, (offsets, tuple(local.shape)))
    return TensorItem(key, local.detach(), shape, offsets, eager=eager, sharding=sharding)


def read_dtensor(src: LoadSource, key: str, dt: Any) -> None:
    local, shape, offsets = local_box(dt, key)
    src.read_into(key, local.detach(), offsets, global_shape=shape)


def is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"
