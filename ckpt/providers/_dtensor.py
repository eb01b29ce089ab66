"""DTensor (and therefore FSDP2 / tensor-parallel) pieces in global coordinates.

A DTensor's local shard is described by its global shape and the offsets of this rank's
box, computed by torch's own placement rules (uneven Shard splits included). Replicated
placements give several ranks the same box; the save plan writes it once.
"""

from __future__ import annotations

from typing import Any

import torch

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


def dtensor_item(key: str, dt: Any, *, eager: bool = False) -> TensorItem:
    local, shape, offsets = local_box(dt, key)
    return TensorItem(key, local.detach(), shape, offsets, eager=eager)


def read_dtensor(src: LoadSource, key: str, dt: Any) -> None:
    local, shape, offsets = local_box(dt, key)
    src.read_into(key, local.detach(), offsets, global_shape=shape)


def is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"
