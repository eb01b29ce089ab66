"""Point-to-point exchanges of a memory-tier restore over the tier's side gloo group.

Two shapes, both of O(nodes) messages per node and bytes in proportion to what a node
holds or needs (never an all-gather of file lists):

* :func:`to_leader` / :func:`from_leader`: every rank of a node sends an int64 array to
  its node's leader / the leader sends one to every rank of its node.
* :func:`all_to_all`: every leader sends one int64 array to every other leader (empty
  ones included: a length of 0 and no payload).

The facts about nodes come as a :class:`~ckpt.elastic._group.NodeGroup` value, so this
module knows nothing of the tier itself: its own node's ranks, and the leaders of the
nodes it talks to (read from the store the first time).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ckpt.elastic._group import NodeGroup

__all__ = ["all_to_all", "from_leader", "to_leader"]


def _wait(works: list[Any]) -> None:
    for w in works:
        if w is not None:
            w.wait()


def _send_recv(group: Any, out: dict[int, np.ndarray], peers: list[int]) -> dict[int, np.ndarray]:
    """Send ``out[p]`` to every ``p`` in ``out`` and receive one array from every peer
    in ``peers``: lengths first, then the payloads that are not empty."""
    import torch.distributed as dist

    lens_in = {p: torch.zeros(1, dtype=torch.int64) for p in peers}
    payload = {p: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64).reshape(-1)) for p, a in out.items()}
    lens_out = {p: torch.tensor([t.numel()], dtype=torch.int64) for p, t in payload.items()}
    works = [dist.irecv(t, p, group=group) for p, t in lens_in.items()]
    works += [dist.isend(t, p, group=group) for p, t in lens_out.items()]
    _wait(works)
    got = {p: torch.empty(int(t[0]), dtype=torch.int64) for p, t in lens_in.items()}
    works = [dist.irecv(t, p, group=group) for p, t in got.items() if t.numel()]
    works += [dist.isend(t, p, group=group) for p, t in payload.items() if t.numel()]
    _wait(works)
    return {p: t.numpy() for p, t in got.items()}


def _members(nodes: NodeGroup) -> tuple[int, list[int]]:
    """This node's leader and its other ranks, as global ranks."""
    ranks = nodes.members
    return nodes.global_rank(ranks[0]), [nodes.global_rank(r) for r in ranks[1:]]


def to_leader(nodes: NodeGroup, data: np.ndarray) -> list[np.ndarray] | None:
    """On a leader, every member's ``data`` (its own first); None elsewhere."""
    if nodes.group is None or len(nodes.members) == 1:
        return [data] if nodes.leader else None
    lead, others = _members(nodes)
    if nodes.leader:
        got = _send_recv(nodes.group, {}, others)
        return [data, *(got[r] for r in others)]
    _send_recv(nodes.group, {lead: data}, [])
    return None


def from_leader(nodes: NodeGroup, data: np.ndarray) -> np.ndarray:
    """The leader's ``data`` on every rank of its node (an int64 array)."""
    if nodes.group is None or len(nodes.members) == 1:
        return data
    lead, others = _members(nodes)
    if nodes.leader:
        _send_recv(nodes.group, {r: data for r in others}, [])
        return data
    return _send_recv(nodes.group, {}, [lead])[lead]


def all_to_all(nodes: NodeGroup, out: list[np.ndarray]) -> list[np.ndarray]:
    """Leaders only: send ``out[n]`` to node ``n``'s leader; returns what each node's
    leader sent this one (``out[self]`` for this node)."""
    me = nodes.node
    if nodes.group is None or nodes.nnodes == 1:
        return [out[me]]
    others = [n for n in range(nodes.nnodes) if n != me]  # every node: the leaders read once
    peers = {n: nodes.global_rank(r) for n, r in zip(others, nodes.leaders_of(others))}
    got = _send_recv(nodes.group, {r: out[n] for n, r in peers.items()}, list(peers.values()))
    return [out[me] if n == me else got[peers[n]] for n in range(nodes.nnodes)]
