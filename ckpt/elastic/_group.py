"""The job's nodes as the memory tier sees them, and the side gloo group they talk over.

A :class:`NodeGroup` is a value: this rank, its node, every node's leader and ranks, and
the collectives of one side gloo group (the engine's :class:`DistCoordinator` for the
``"tier"`` purpose, never the training group). The tier's thread, its saves, the drain
(:mod:`._drain`) and the restore (:mod:`._recover`) all take it, so none of them needs the
tier itself. Ranks are ranks of the side group; :meth:`NodeGroup.global_rank` gives the
global rank that point-to-point messages name.

The training thread's agreements (is a step taken, skipped) run on another group,
:func:`agreement` (the ``"agree"`` purpose, the manager's too): the tier's thread may be
in a collective of its own group at the same time.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

from ckpt._engine._coord import DistCoordinator, LocalCoordinator, coordinator

__all__ = ["NodeGroup", "agreement", "any_flags", "node_group"]

Coordinator = LocalCoordinator | DistCoordinator


@dataclass(frozen=True)
class NodeGroup:
    """This rank's view of the job's nodes (ranks of ``coord``'s group)."""

    coord: Coordinator
    node: int
    leaders: tuple[int, ...]  # each node's lowest rank
    node_ranks: tuple[tuple[int, ...], ...]  # each node's ranks, its leader first
    process_group: Any = None  # the training group it was made for (a load takes it)

    @property
    def group(self) -> Any:
        """The side gloo group (None in one process without torch.distributed)."""
        return self.coord.group

    @property
    def rank(self) -> int:
        return self.coord.rank

    @property
    def world_size(self) -> int:
        return self.coord.world_size

    @property
    def nnodes(self) -> int:
        return len(self.leaders)

    @property
    def leader(self) -> bool:
        return self.leaders[self.node] == self.rank

    def node_of(self, rank: int) -> int:
        return next(n for n, ranks in enumerate(self.node_ranks) if rank in ranks)

    def global_rank(self, rank: int) -> int:
        return self.coord.global_rank(rank)

    # The collectives of the side group.
    def all_gather(self, obj: Any) -> list[Any]:
        return self.coord.all_gather(obj)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank."""
        return self.coord.broadcast(obj, src)

    def any_flags(self, flags: list[bool]) -> list[bool]:
        return any_flags(self.coord, flags)

    def all_ok(self, ok: bool) -> bool:
        return not self.any_flags([not ok])[0]

    def sum_ints(self, values: list[int], *, op: str = "sum") -> list[int]:
        """A fixed-size all-reduce (``op``: "sum" or "max"): agreement whose traffic does
        not grow with the world."""
        return self.coord.all_reduce_max(values) if op == "max" else self.coord.all_reduce_sum(values)


def any_flags(coord: Coordinator, flags: list[bool]) -> list[bool]:
    """Element-wise OR of ``flags`` over the ranks of ``coord`` (one small all-reduce)."""
    if coord.world_size == 1:
        return list(flags)
    return [bool(x) for x in coord.all_reduce_max([1 if f else 0 for f in flags])]


def agreement(process_group: Any = None) -> Coordinator:
    """The training thread's coordinator for small agreements (one group per job)."""
    return coordinator(process_group, purpose="agree")


def node_group(node_dir: str | os.PathLike[str], process_group: Any = None) -> NodeGroup:
    """The nodes of the job: the distinct (host, node directory) pairs, in order of their
    lowest rank; that rank is the node's leader. Every rank calls it (one all-gather of a
    short string per rank, once per job)."""
    coord = coordinator(process_group, purpose="tier")
    key = f"{socket.gethostname()}:{os.path.realpath(node_dir)}"
    keys = coord.all_gather(key)
    order = list(dict.fromkeys(keys))
    return NodeGroup(coord, order.index(key), tuple(keys.index(k) for k in order),
                     tuple(tuple(r for r, k in enumerate(keys) if k == n) for n in order), process_group)
