"""The job's nodes as the memory tier sees them, and the side gloo group they talk over.

A :class:`NodeGroup` is a value: this rank, its node's index and ranks, the number of
nodes, and the collectives of one side gloo group (the engine's :class:`DistCoordinator`
for the ``"tier"`` purpose, never the training group). The tier's thread, its saves, the
drain (:mod:`._drain`) and the restore (:mod:`._recover`) all take it, so none of them
needs the tier itself. Ranks are ranks of the side group; :meth:`NodeGroup.global_rank`
gives the global rank that point-to-point messages name.

No rank holds the whole topology (DESIGN.md, "Built for 16,384 ranks"): a rank knows its
own node's ranks, and the leader of another node only when it talks to it
(:meth:`NodeGroup.leader_of`, read from the side group's c10d store and kept). The nodes
are found through that store, not by an all-gather (:func:`node_group`).

The training thread's agreements (is a step taken, skipped) run on another group,
:func:`agreement` (the ``"agree"`` purpose, the manager's too): the tier's thread may be
in a collective of its own group at the same time.
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ckpt._engine._coord import DistCoordinator, LocalCoordinator, coordinator

__all__ = ["NodeGroup", "agreement", "any_flags", "node_group"]

Coordinator = LocalCoordinator | DistCoordinator


@dataclass(frozen=True)
class NodeGroup:
    """This rank's view of the job's nodes (ranks of ``coord``'s group): O(its own node)."""

    coord: Coordinator
    node: int  # this node's index: nodes are numbered in the order of their lowest rank
    nnodes: int
    members: tuple[int, ...]  # this node's ranks, its leader (the lowest) first
    process_group: Any = None  # the training group it was made for (a load takes it)
    store: Any = None  # the c10d store where every node's leader is registered (None: one process)
    prefix: str = ""  # this job generation's keys in ``store``
    _leaders: dict[int, int] = field(default_factory=dict, compare=False, repr=False)  # read so far

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
    def leader(self) -> bool:
        return self.members[0] == self.rank

    def leader_of(self, node: int) -> int:
        """The leader (side-group rank) of node index ``node``."""
        return self.leaders_of([node])[0]

    def leaders_of(self, nodes: Iterable[int]) -> list[int]:
        """The leaders of ``nodes``: one read of the store for those not read before, so a
        rank holds only the leaders of the nodes it talks to."""
        nodes = list(nodes)
        self._leaders.setdefault(self.node, self.members[0])
        new = sorted({n for n in nodes if n not in self._leaders})
        if new:
            got = _get_many(self.store, [f"{self.prefix}/leader/{n}" for n in new])
            self._leaders.update(zip(new, (int(v) for v in got)))
        return [self._leaders[n] for n in nodes]

    def global_rank(self, rank: int) -> int:
        return self.coord.global_rank(rank)

    # The collectives of the side group: none whose payload grows with the world.
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank."""
        return self.coord.broadcast(obj, src)

    def decide(self, obj: Any, rule: Callable[[list[tuple[int, Any]]], Any]) -> Any:
        """``rule`` of the ``(rank, obj)`` of every rank whose ``obj`` is not None, on every
        rank: the objects go to rank 0 alone (``gather_sparse``), which applies ``rule`` and
        broadcasts its result. Traffic in proportion to the ranks with something to say."""
        got = self.coord.gather_sparse(obj)
        return self.broadcast(None if got is None else rule(got))

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


def _get_many(store: Any, keys: list[str]) -> list[bytes]:
    if len(keys) > 1 and store.has_extended_api():
        return list(store.multi_get(keys))
    return [store.get(k) for k in keys]


def _set_many(store: Any, items: dict[str, str]) -> None:
    if len(items) > 1 and store.has_extended_api():
        store.multi_set(list(items), list(items.values()))
    else:
        for k, v in items.items():
            store.set(k, v)


def node_group(node_dir: str | os.PathLike[str], process_group: Any = None) -> NodeGroup:
    """The nodes of the job: the distinct (host, node directory) pairs, numbered in the
    order of their lowest rank; that rank is the node's leader. Every rank calls it, once
    per job.

    Through the side group's c10d store, under keys of this call alone (rank 0 draws them
    and broadcasts them: a restarted job that finds the same store, or a second tier in
    one process, never reads an earlier call's keys): every rank registers under its
    node's key and, after a barrier, reads its node's ranks (O(ranks per node)); every
    leader registers, and after a second barrier rank 0 numbers the leaders in rank order
    (O(nodes), on rank 0 only: the one coordinator) and stores each node's leader under
    its index and each leader's index; after a third barrier every rank reads its node's
    index. Three barriers and one broadcast of a short key: no collective whose payload
    grows with the world."""
    coord = coordinator(process_group, purpose="tier")
    store = coord.store() if coord.world_size > 1 else None
    if store is None:
        return NodeGroup(coord, 0, 1, (coord.rank,), process_group)
    here = hashlib.sha256(f"{socket.gethostname()}:{os.path.realpath(node_dir)}".encode()).hexdigest()[:20]
    p = f"ckpt/nodes/{coord.broadcast(uuid.uuid4().hex if coord.rank == 0 else None)}"
    k = store.add(f"{p}/host/{here}/n", 1)
    store.set(f"{p}/host/{here}/{k}", str(coord.rank))
    coord.barrier()  # every rank is registered under its node
    count = store.add(f"{p}/host/{here}/n", 0)
    members = tuple(sorted(int(r) for r in _get_many(store, [f"{p}/host/{here}/{i}" for i in range(1, count + 1)])))
    if members[0] == coord.rank:
        k = store.add(f"{p}/nodes", 1)
        store.set(f"{p}/arrived/{k}", str(coord.rank))
    coord.barrier()  # every leader is registered
    if coord.rank == 0:
        count = store.add(f"{p}/nodes", 0)
        leaders = sorted(int(r) for r in _get_many(store, [f"{p}/arrived/{i}" for i in range(1, count + 1)]))
        _set_many(store, {f"{p}/leader/{n}": str(r) for n, r in enumerate(leaders)}
                  | {f"{p}/node-of/{r}": str(n) for n, r in enumerate(leaders)})
    coord.barrier()  # the nodes are numbered
    node, nnodes = int(store.get(f"{p}/node-of/{members[0]}")), store.add(f"{p}/nodes", 0)
    return NodeGroup(coord, node, nnodes, members, process_group, store, p)
