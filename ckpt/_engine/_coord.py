"""Coordination between ranks for a save or load.

A distributed job coordinates over a *side* gloo process group, created once per
training group: never the training (NCCL) group, so a background commit never
interleaves with the training's collectives, and gloo is safe to drive from the
background thread that commits. A single process uses :class:`LocalCoordinator`.

A side group serves one *purpose*, so that two threads never issue collectives on one
group: ``""`` the engine's saves and loads (their background commit), ``"agree"`` the
training thread's small agreements (the manager's and the memory tier's), ``"tier"`` the
memory tier's thread. A group made for a purpose other than the engine's is its own side
group: the tier's saves run over it, taking turns with the tier's thread (which waits for
each save's handle before its next collective). That is three gloo groups per job with a
memory tier, two without.
"""

from __future__ import annotations

import datetime
import pickle
import threading
from typing import Any

_side_groups: dict[Any, Any] = {}
_TAG_GATHER, _TAG_SEND = 7301, 7302
_lock = threading.Lock()


class LocalCoordinator:
    rank = 0
    world_size = 1
    group: Any = None

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def global_rank(self, rank: int) -> int:
        return rank

    def barrier(self) -> None:
        pass

    def store(self) -> Any:
        return None

    def all_reduce_sum(self, values: list[int]) -> list[int]:
        return list(values)

    def all_reduce_max(self, values: list[int]) -> list[int]:
        return list(values)

    def gather_sparse(self, obj: Any) -> list[tuple[int, Any]] | None:
        return [] if obj is None else [(0, obj)]

    def send_sparse(self, objs: dict[int, Any] | None, expect: bool) -> Any:
        return None


class DistCoordinator:
    """Object collectives over the side gloo group of ``group`` (default: WORLD) for
    ``purpose`` (see the module docstring)."""

    def __init__(self, group: Any = None, timeout_s: float = 1800.0, *, purpose: str = "") -> None:
        import torch.distributed as dist

        self._dist = dist
        base = group if group is not None else dist.group.WORLD
        with _lock:
            side = _side_groups.get((base, purpose))
            if side is None:
                ranks = None if group is None else dist.get_process_group_ranks(group)
                # Never the caller's group itself, even when it is gloo: the training thread
                # may run collectives on it while a background commit runs, and two threads
                # issuing collectives on one group mismatch and hang. Only the members of a
                # given group take part in creating its side group (local synchronization).
                side = dist.new_group(ranks=ranks, backend="gloo",
                                      timeout=datetime.timedelta(seconds=timeout_s),
                                      use_local_synchronization=group is not None)
                _side_groups[(base, purpose)] = side
                if purpose:
                    _side_groups[(side, "")] = side  # its own: saves over it need no other
        self.group = side
        self.rank = dist.get_rank(side)
        self.world_size = dist.get_world_size(side)
        self._global_root = dist.get_global_rank(side, 0) if group is not None else 0  # type: ignore[arg-type]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of side-group rank ``src`` on every rank."""
        box = [obj]
        root = self._global_root if src == 0 else self.global_rank(src)
        self._dist.broadcast_object_list(box, src=root, group=self.group)
        return box[0]

    def global_rank(self, rank: int) -> int:
        """The global rank of side-group rank ``rank`` (point-to-point messages name it)."""
        return int(self._dist.get_global_rank(self.group, rank))

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)

    def store(self) -> Any:
        """The c10d store of the side group (its keys under the group's own prefix): for
        exchanges by key, where each rank reads only what concerns it."""
        from torch.distributed import distributed_c10d

        try:
            return distributed_c10d._get_process_group_store(self.group)
        except AttributeError:  # an older torch: the default group's store (callers' keys are their own)
            return distributed_c10d._get_default_store()

    # Collectives whose size does not grow with the world (DESIGN.md, "Built for 16,384
    # ranks"): a fixed-size sum, and point-to-point messages between rank 0 and only the
    # ranks that have something to say or to hear.
    def all_reduce_sum(self, values: list[int]) -> list[int]:
        import torch

        t = torch.tensor(values, dtype=torch.int64)
        self._dist.all_reduce(t, group=self.group)
        return [int(v) for v in t.tolist()]

    def all_reduce_max(self, values: list[int]) -> list[int]:
        """The element-wise maximum (of flags: any rank's True)."""
        import torch

        t = torch.tensor(values, dtype=torch.int64)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX, group=self.group)
        return [int(v) for v in t.tolist()]

    def gather_sparse(self, obj: Any) -> list[tuple[int, Any]] | None:
        """Rank 0 gets ``(rank, obj)`` for every rank whose ``obj`` is not None (its own
        included); the others send 8 bytes, plus their object if they have one."""
        import torch

        data = pickle.dumps(obj) if obj is not None and self.rank != 0 else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)] if self.rank == 0 else None
        self._dist.gather(size, sizes, dst=self._global_root, group=self.group)
        if self.rank != 0:
            if data:
                self._dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=self._global_root,
                                group=self.group, tag=_TAG_GATHER)
            return None
        assert sizes is not None
        out: list[tuple[int, Any]] = [] if obj is None else [(0, obj)]
        bufs = [(r, torch.empty(int(n.item()), dtype=torch.uint8)) for r, n in enumerate(sizes) if r and n.item()]
        works = [self._dist.irecv(b, src=self._dist.get_global_rank(self.group, r), group=self.group,
                                  tag=_TAG_GATHER) for r, b in bufs]
        for w in works:
            if w is not None:
                w.wait()
        out += [(r, pickle.loads(b.numpy().tobytes())) for r, b in bufs]
        return out

    def send_sparse(self, objs: dict[int, Any] | None, expect: bool) -> Any:
        """Rank 0 sends ``objs[r]`` to each rank r in it (not itself); a rank with
        ``expect`` receives its object (None otherwise). Every rank in ``objs`` must
        expect, and only those."""
        import torch

        if self.rank == 0:
            works = []
            for r, obj in sorted((objs or {}).items()):
                if r == 0:
                    continue
                data = pickle.dumps(obj)
                dst = self._dist.get_global_rank(self.group, r)
                works.append(self._dist.isend(torch.tensor([len(data)], dtype=torch.int64), dst=dst,
                                              group=self.group, tag=_TAG_SEND))
                works.append(self._dist.isend(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=dst,
                                              group=self.group, tag=_TAG_SEND + 1))
            for w in works:
                if w is not None:
                    w.wait()
            return None
        if not expect:
            return None
        size = torch.zeros(1, dtype=torch.int64)
        self._dist.recv(size, src=self._global_root, group=self.group, tag=_TAG_SEND)
        buf = torch.empty(int(size.item()), dtype=torch.uint8)
        self._dist.recv(buf, src=self._global_root, group=self.group, tag=_TAG_SEND + 1)
        return pickle.loads(buf.numpy().tobytes())


def coordinator(process_group: Any = None, *, purpose: str = "") -> LocalCoordinator | DistCoordinator:
    """The coordinator for this call (``purpose``: see the module docstring): distributed
    when a process group is initialised with more than one rank (or one is given), local
    otherwise."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return LocalCoordinator()
    if process_group is False or not dist.is_available() or not dist.is_initialized():
        return LocalCoordinator()
    if process_group is None and dist.get_world_size() == 1:
        return LocalCoordinator()
    return DistCoordinator(process_group, purpose=purpose)


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
