"""Heal a torchft replica group from its live peers through ckpt, resharded.

torchft keeps a job running when a replica group fails: the survivors reconfigure their
process groups and train on, and a group that comes back heals from a live peer through a
``CheckpointTransport``. torchft's own transports send a ``state_dict`` as is, so the
healing group must have the sharding of its source. :class:`CkptTransport` pulls, for
each rank of the healing group, exactly the boxes of its own layout from the ranks of the
source group — resharded when the shard count differs (an HSDP group that lost a node
comes back with 3 FSDP ranks instead of 4) — each sub-box checked against its crc32c and
fetched again when damaged, in parts of at most ``chunk_bytes`` (several to a request)::

    from ckpt.integrations.torchft import CkptTransport
    transport = CkptTransport(template=lambda: {"model": model.state_dict(),
                                                "optim": optimizer.state_dict()},
                              group_rank=rank, group_world_size=world,
                              store_addr=os.environ["MASTER_ADDR"], store_port=port)
    manager = torchft.Manager(pg=..., load_state_dict=..., state_dict=...,
                              checkpoint_transport=transport, ...)

``template`` returns this rank's own state dict under the manager's key (``"default"``
when ``Manager(load_state_dict=, state_dict=)`` registers it): its DTensors say which boxes
the rank needs, and they are filled in place. Tensors in the source state that the template
lacks (an optimizer that has not stepped yet) cannot be placed: step it once first.
Plain values (optimizer hyper-parameters, counters) come from the source rank of the same
group rank, or from source rank 0 where the healing group is larger.

How ranks find each other: each rank's transport writes its server's address into its
replica group's TCPStore (the one torchft's manager uses, ``MASTER_ADDR``/``MASTER_PORT``);
``metadata()`` names that store, so a healing rank reads from it the address of its own
group rank's source, and those of the other source ranks only where that one lacks some of
its boxes or dies (``ckpt.integrations._ftheal``). A source rank that stops answering mid-heal is given up: what it
held comes from another rank of its group that holds the same data (replicated state),
and ``last_heal.failed_over`` and a warning say so; where no other rank holds it, the heal
fails with a :class:`~ckpt.errors.StorageError` naming the dead ranks, torchft reports the
error (no step commits) and the next quorum heals again, from a live peer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from ckpt.elastic import ElasticSampler
from ckpt.errors import MissingDependencyError
from ckpt.integrations._ftheal import Heal, HealStats
from ckpt.integrations._ftwire import (
    Served,
    Server,
    dumps_skeleton,
    leaves,
    local_piece,
    user_prefix,
)

try:
    from torch.distributed import TCPStore
    from torchft.checkpointing.transport import CheckpointTransport
except ImportError as e:  # pragma: no cover - the extra is absent
    raise MissingDependencyError("ckpt.integrations.torchft needs torchft, which is not installed",
                                 hint="pip install 'ckpt-torch[ft]'") from e

__all__ = ["CkptTransport", "CommittedCheckpoints", "HealStats", "group_batch"]


class CkptTransport(CheckpointTransport[dict[str, Any]]):
    """A torchft ``CheckpointTransport`` that reshards (see the module docstring)."""

    def __init__(self, *, template: Callable[[], dict[str, Any]], group_rank: int, group_world_size: int,
                 store_addr: str, store_port: int, host: str = "127.0.0.1",
                 timeout: timedelta = timedelta(seconds=60), chunk_bytes: int = 4 << 20,
                 prefix: str = "ckpt_ft", key: str = "default") -> None:
        self._template = template
        self._key = key
        self._user = user_prefix(key)  # where torchft puts the template's state in what it sends
        self._rank = group_rank
        self._world = group_world_size
        self._timeout = timeout
        self._chunk = max(1, chunk_bytes)
        self._store_addr, self._store_port, self._prefix = store_addr, store_port, prefix
        self.server = Server(host)
        self.server.skeleton_wait = min(10.0, timeout.total_seconds())
        self.last_heal = HealStats()
        store = TCPStore(store_addr, store_port, is_master=False, timeout=timeout, wait_for_workers=False)
        store.set(f"{prefix}/addr/{group_rank}", self.server.url)

    def metadata(self) -> str:
        # torchft asks at the start of every quorum, on every rank, before the step changes
        # the state: from now until ``disallow_checkpoint`` this rank serves its live state,
        # since torchft calls ``send_checkpoint`` only on the source ranks whose group rank
        # the healing group has (a 2-rank source healing a 1-rank group: rank 0 alone).
        self.server.allow(self._live)
        return json.dumps({"store": [self._store_addr, self._store_port], "prefix": self._prefix,
                           "ranks": self._world, "url": self.server.url})

    def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict: dict[str, Any],
                        timeout: timedelta) -> None:
        self.server.allow(_served(step, state_dict))

    def disallow_checkpoint(self) -> None:
        self.server.disallow(self._timeout.total_seconds())

    def _live(self) -> Served:
        return _served(None, {"user": {self._key: self._template()}})

    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> dict[str, Any]:
        heal = Heal(template=self._template, user=self._user, rank=self._rank, chunk=self._chunk,
                    timeout=timeout)
        self.last_heal = heal.stats
        return heal.run(json.loads(metadata), step)

    def shutdown(self, wait: bool = True) -> None:
        self.server.close()


class CommittedCheckpoints:
    """A :class:`~ckpt.CheckpointManager` that follows torchft's committed steps.

    ``step(committed, state)`` after ``manager.should_commit()`` and the optimizer step:
    a step torchft did not commit is never saved (its update was not applied), and of the
    replica groups that committed it only the lowest participating one (replica rank 0)
    saves it — persistent checkpoints and memory-tier steps alike — while the others skip
    it. The step saved is torchft's (``current_step() - 1`` once committed), with
    torchft's own counters beside the state, so a whole-job restart resumes both:
    ``restore(state)`` loads the newest checkpoint (on any world size, as
    ``CheckpointManager.restore``) and sets torchft's step from it::

        saves = CommittedCheckpoints(manager, ckpt.CheckpointManager("runs/a", save=500))
        start = saves.restore({"model": model, "optim": opt})
        ...
        committed = manager.should_commit()
        if committed:
            opt.step()
        saves.step(committed, {"model": model, "optim": opt})
    """

    KEY = "torchft"

    def __init__(self, manager: Any, checkpoints: Any) -> None:
        self.manager = manager
        self.checkpoints = checkpoints

    def writes(self) -> bool:
        """Whether this replica group saves the step just committed (the lowest
        participating group; every rank of a group gives the same answer)."""
        return self.manager.participating_rank() == 0

    def step(self, committed: bool, state: dict[str, Any]) -> Any:
        if self.KEY in state:
            raise ValueError(f"the state has a key {self.KEY!r}: CommittedCheckpoints keeps torchft's "
                             "counters under it; rename that entry")
        if not committed or not self.writes():
            return None
        return self.checkpoints.step(self.manager.current_step() - 1,
                                     {**state, self.KEY: self.manager.state_dict()})

    def restore(self, state: dict[str, Any]) -> int:
        """The step to run next (0: nothing to restore, torchft untouched)."""
        full = {**state, self.KEY: {"step": 0, "batches_committed": 0}}
        start = self.checkpoints.restore(full)
        if start:
            self.manager.load_state_dict(full[self.KEY])
        return int(start)


def group_batch(sampler: ElasticSampler, manager: Any) -> list[int]:
    """This replica group's samples for the step torchft's quorum just started, with an
    :class:`~ckpt.elastic.ElasticSampler` whose world is the participating replica groups (one
    sampler rank per group, ``batch_size`` samples per group; the group's ranks split the
    list among themselves, so groups of different sizes take equal parts). After
    ``should_commit()``, every group whose step committed calls ``sampler.advance()``; a
    rolled-back step is served again, split over the groups of the retry, so each sample
    is consumed once however the quorum changes. Keep the sampler's ``state_dict()`` in
    the state torchft heals (a joining group takes the position from its peers) and in
    the checkpoints. A group that does not take part in the step gets ``[]``::

        sampler = ckpt.elastic.ElasticSampler(len(dataset), batch_size=group_batch_size)
        manager.start_quorum()
        samples = group_batch(sampler, manager)[group_rank::group_world]
        ...
        if manager.should_commit():
            opt.step()
            sampler.advance()
    """
    r = manager.participating_rank()
    sampler.set_world(0 if r is None else int(r), max(1, int(manager.num_participants())))
    return [] if r is None else sampler.batch()


def _served(step: int | None, state_dict: dict[str, Any]) -> Served:
    pieces, tensors = [], []
    for path, t in leaves(state_dict):
        piece, local = local_piece(path, t)
        pieces.append(piece)
        tensors.append(local)
    return Served(step, pieces, tensors, dumps_skeleton(state_dict))
