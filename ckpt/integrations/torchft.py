"""Heal a torchft replica group from its live peers through ckpt, resharded.

torchft keeps a job running when a replica group fails: the survivors reconfigure their
process groups and train on, and a group that comes back heals from a live peer through a
``CheckpointTransport``. torchft's own transports send a ``state_dict`` as is, so the
healing group must have the sharding of its source. :class:`CkptTransport` pulls, for
each rank of the healing group, exactly the boxes of its own layout from the ranks of the
source group — resharded when the shard count differs (an HSDP group that lost a node
comes back with 3 FSDP ranks instead of 4) — each sub-box checked against its crc32c and
fetched again when damaged, in requests of at most ``chunk_bytes``::

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
``metadata()`` names that store, so a healing rank reads the addresses of all ranks of its
source group from it. A source rank that stops answering mid-heal is given up: what it
held comes from another rank of its group that holds the same data (replicated state),
and ``last_heal.failed_over`` and a warning say so; where no other rank holds it, the heal
fails with a :class:`~ckpt.errors.StorageError` naming the dead ranks, torchft reports the
error (no step commits) and the next quorum heals again, from a live peer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from ckpt.errors import CorruptCheckpointError, MissingDependencyError, ReshardError, StorageError
from ckpt.integrations._ftwire import (
    Box,
    Client,
    Piece,
    Served,
    Server,
    as_bytes,
    crc,
    dumps_skeleton,
    fill,
    leaves,
    loads_skeleton,
    local_piece,
    skeleton_paths,
    sub_box,
    user_prefix,
)

try:
    from torch.distributed import TCPStore
    from torchft.checkpointing.transport import CheckpointTransport
except ImportError as e:  # pragma: no cover - the extra is absent
    raise MissingDependencyError("ckpt.integrations.torchft needs torchft, which is not installed",
                                 hint="pip install 'ckpt-torch[ft]'") from e

__all__ = ["CkptTransport", "CommittedCheckpoints", "HealStats"]

_RETRIES = 3
log = logging.getLogger(__name__)


class HealStats:
    """What the last heal moved: bytes received, the requests, the crc failures refetched,
    the seconds spent fetching and writing into the template, and the source ranks that
    died mid-heal (their replicated parts came from the other ranks of their group)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.requests = 0
        self.refetched = 0
        self.fetch_s = 0.0
        self.share_bytes = 0  # the bytes of this rank's own layout (what it needed)
        self.failed_over: dict[str, str] = {}  # source URL -> why it was given up mid-heal

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


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
        self._client = Client(timeout.total_seconds())
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
        meta = json.loads(metadata)
        urls = self._source_urls(meta, timeout)
        stats = self.last_heal = HealStats()
        t0 = time.perf_counter()
        self._client = Client(timeout.total_seconds())
        try:
            return self._recv(urls, step, timeout, stats, t0)
        finally:
            for u in (u for u in urls if u not in stats.failed_over):  # they may change their state now
                with contextlib.suppress(StorageError):
                    self._get(u, f"/{step}/done", timeout)
            self._client.close()

    def _recv(self, urls: list[str], step: int, timeout: timedelta, stats: HealStats,
              t0: float) -> dict[str, Any]:
        template = self._template()
        indices = [self._index(u, step, timeout, stats) for u in urls]
        tensors: dict[str, torch.Tensor] = {}
        for path, t in leaves(template):
            mine, local = local_piece(self._user + path, t)
            stats.share_bytes += local.numel() * local.element_size()
            self._pull(mine, local, urls, indices, step, timeout, stats)
            tensors[self._user + path] = t
        # plain values: the source rank of the same group rank (rank 0 where we are more,
        # the next live rank where that one died: the rule for a larger healer)
        first = self._rank if self._rank < len(urls) else 0
        skel = loads_skeleton(self._from_live(urls, first, f"/{step}/skeleton", timeout, stats))
        have = set(skeleton_paths(skel))
        missing = sorted(have - set(tensors))
        if missing:
            raise ReshardError(f"the source state has {len(missing)} tensors this rank's template lacks",
                               key=missing[0], hint="build that state before healing (step a new "
                               "optimizer once), or return it from the transport's template")
        stats.fetch_s = time.perf_counter() - t0
        return fill(skel, tensors)

    def shutdown(self, wait: bool = True) -> None:
        self.server.close()

    # --- the receiving side ---------------------------------------------------------

    def _source_urls(self, meta: dict[str, Any], timeout: timedelta) -> list[str]:
        host, port = meta["store"]
        store = TCPStore(host, int(port), is_master=False, timeout=timeout, wait_for_workers=False)
        return [store.get(f"{meta['prefix']}/addr/{r}").decode() for r in range(int(meta["ranks"]))]

    def _from_live(self, urls: list[str], first: int, path: str, timeout: timedelta, stats: HealStats) -> bytes:
        for k in range(len(urls)):
            url = urls[(first + k) % len(urls)]
            if url in stats.failed_over:
                continue
            try:
                return self._get(url, path, timeout)[0]
            except StorageError as e:
                self._dead(url, e, stats)
        raise StorageError(f"no rank of the source group served {path}: {', '.join(stats.failed_over)} died",
                           path=path, hint="torchft heals again at the next quorum, from a live peer")

    def _dead(self, url: str, e: StorageError, stats: HealStats) -> None:
        stats.failed_over[url] = str(e)
        log.warning("ckpt torchft heal: source rank at %s stopped answering (%s); going on with the "
                    "other ranks of its group", url, e)

    def _index(self, url: str, step: int, timeout: timedelta, stats: HealStats) -> list[Piece]:
        try:
            body, _ = self._get(url, f"/{step}/index", timeout)
        except StorageError as e:
            self._dead(url, e, stats)
            return []
        return [Piece.from_json(v) for v in json.loads(body)]

    def _get(self, url: str, path: str, timeout: timedelta,
             into: np.ndarray | None = None) -> tuple[bytes, int | None]:
        """The body and its crc32c header; with ``into``, the body lands there instead."""
        try:
            if into is not None:
                return b"", self._client.get_into(url, path, into)
            return self._client.get(url, path)
        except OSError as e:
            self._client.drop(url)
            raise StorageError(f"source rank at {url} did not serve {path}: {e}", path=url + path,
                               hint="the peer died or moved on; torchft heals again at the next "
                               "quorum, from a live peer") from e

    def _pull(self, mine: Piece, local: torch.Tensor, urls: list[str], indices: list[list[Piece]],
              step: int, timeout: timedelta, stats: HealStats) -> None:
        covered = 0
        need = local.numel()
        # spread plain (replicated) tensors over the sources: start at our own rank
        order = [(self._rank + k) % len(urls) for k in range(len(urls))]
        done_full = False
        for src in order:
            if urls[src] in stats.failed_over:
                continue
            for i, p in enumerate(indices[src]):
                if p.path != mine.path or done_full:
                    continue
                if p.shape != mine.shape or p.dtype != mine.dtype:
                    raise ReshardError(f"source has {p.dtype}{list(p.shape)}, this rank "
                                       f"{mine.dtype}{list(mine.shape)}", key=mine.path,
                                       hint="heal only between replica groups of the same model")
                box = _intersect((p.offsets, p.sizes), (mine.offsets, mine.sizes))
                if box is None:
                    continue
                try:
                    for part in _split(box, local.element_size(), self._chunk):
                        self._fetch(urls[src], step, i, p, mine, part, local, timeout, stats)
                except StorageError as e:  # the box counts only whole: another holder refetches it
                    self._dead(urls[src], e, stats)
                    break
                covered += _numel(box)
                if box == (mine.offsets, mine.sizes):
                    done_full = True  # a replicated piece: one holder is enough
        if covered < need and stats.failed_over:
            raise StorageError(f"source ranks {', '.join(stats.failed_over)} died mid-heal and no other rank "
                               f"of their group holds their part of {mine.path}", key=mine.path,
                               hint="torchft heals again at the next quorum, from a live peer")
        if covered < need:
            raise ReshardError(f"the source group holds {covered} of the {need} elements this rank "
                               "needs", key=mine.path, hint="the source's pieces do not tile the tensor")

    def _fetch(self, url: str, step: int, i: int, p: Piece, mine: Piece, part: Box,
               local: torch.Tensor, timeout: timedelta, stats: HealStats) -> None:
        q = f"/{step}/box/{i}?o={','.join(map(str, part[0]))}&s={','.join(map(str, part[1]))}"
        dest = sub_box(local, mine, part)
        # a CPU destination that is one run of memory takes the body as it arrives (the
        # socket's one copy); otherwise a buffer of the part's size, copied in once checked
        direct = dest.device.type == "cpu" and dest.is_contiguous()
        landing = dest if direct else torch.empty(part[1], dtype=local.dtype)
        into = as_bytes(landing)
        for _attempt in range(_RETRIES):
            _, value = self._get(url, q, timeout, into=into)
            stats.requests += 1
            stats.bytes += into.nbytes
            if value is not None and crc(into) == value:
                if not direct:
                    dest.copy_(landing)
                return
            stats.refetched += 1  # a damaged part is fetched again over what landed
        raise CorruptCheckpointError(f"{_RETRIES} fetches of box {part} from {url} failed their crc32c",
                                     key=mine.path, path=url + q,
                                     hint="the peer's memory or the network corrupts data; heal "
                                     "from another replica group or from persistent storage")


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


def _served(step: int | None, state_dict: dict[str, Any]) -> Served:
    pieces, tensors = [], []
    for path, t in leaves(state_dict):
        piece, local = local_piece(path, t)
        pieces.append(piece)
        tensors.append(local)
    return Served(step, pieces, tensors, dumps_skeleton(state_dict))


def _intersect(a: Box, b: Box) -> Box | None:
    offs, sizes = [], []
    for ao, asz, bo, bsz in zip(a[0], a[1], b[0], b[1]):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if hi <= lo:
            return None
        offs.append(lo)
        sizes.append(hi - lo)
    return tuple(offs), tuple(sizes)


def _numel(box: Box) -> int:
    n = 1
    for s in box[1]:
        n *= s
    return n


def _split(box: Box, itemsize: int, chunk: int) -> list[Box]:
    """``box`` cut along its first dimension into parts of at most ``chunk`` bytes (a row
    larger than ``chunk`` is one part: rows are the unit)."""
    if not box[1]:
        return [box]
    row = itemsize * _numel(((), box[1][1:]))
    rows = max(1, chunk // max(1, row))
    out = []
    for start in range(0, box[1][0], rows):
        n = min(rows, box[1][0] - start)
        out.append(((box[0][0] + start, *box[0][1:]), (n, *box[1][1:])))
    return out
