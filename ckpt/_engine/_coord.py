"""Coordination between ranks for a save or load.

A distributed job coordinates over a *side* gloo process group, created once per
training group: never the training (NCCL) group, so a background commit never
interleaves with the training's collectives, and gloo is safe to drive from the
background thread that commits. A single process uses :class:`LocalCoordinator`.
"""

from __future__ import annotations

import datetime
import threading
from typing import Any

_side_groups: dict[Any, Any] = {}
_lock = threading.Lock()


class LocalCoordinator:
    rank = 0
    world_size = 1

    def broadcast(self, obj: Any) -> Any:
        return obj

    def gather(self, obj: Any) -> list[Any] | None:
        return [obj]

    def all_gather(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass


class DistCoordinator:
    """Object collectives over the side gloo group of ``group`` (default: WORLD)."""

    def __init__(self, group: Any = None, timeout_s: float = 1800.0) -> None:
        import torch.distributed as dist

        self._dist = dist
        base = group if group is not None else dist.group.WORLD
        with _lock:
            side = _side_groups.get(base)
            if side is None:
                ranks = None if group is None else dist.get_process_group_ranks(group)
                # Never the caller's group itself, even when it is gloo: the training thread
                # may run collectives on it while a background commit runs, and two threads
                # issuing collectives on one group mismatch and hang. Only the members of a
                # given group take part in creating its side group (local synchronization).
                side = dist.new_group(ranks=ranks, backend="gloo",
                                      timeout=datetime.timedelta(seconds=timeout_s),
                                      use_local_synchronization=group is not None)
                _side_groups[base] = side
        self.group = side
        self.rank = dist.get_rank(side)
        self.world_size = dist.get_world_size(side)
        self._global_root = dist.get_global_rank(side, 0) if group is not None else 0  # type: ignore[arg-type]

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=self._global_root, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        self._dist.gather_object(obj, out, dst=self._global_root, group=self.group)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)


def coordinator(process_group: Any = None) -> LocalCoordinator | DistCoordinator:
    """The coordinator for this call: distributed when a process group is initialised
    with more than one rank (or one is given), local otherwise."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return LocalCoordinator()
    if process_group is False or not dist.is_available() or not dist.is_initialized():
        return LocalCoordinator()
    if process_group is None and dist.get_world_size() == 1:
        return LocalCoordinator()
    return DistCoordinator(process_group)


def rank_and_world(process_group: Any = None) -> tuple[int, int]:
    """This process's rank and the world size of ``process_group`` (default: WORLD),
    without creating the side group: for work that needs no collective (a load)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return 0, 1
    if process_group is False or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    group = process_group if process_group is not None else dist.group.WORLD
    return dist.get_rank(group), dist.get_world_size(group)
