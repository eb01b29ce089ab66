"""One heal of one rank of a torchft replica group: which ranks of the source group send
which boxes of this rank's own layout, and fetching them.

A rank asks its own group rank's source first: where the groups have the same layout (the
common case) that one index covers everything, and the heal never touches the other
source ranks, so a rank's requests do not grow with the group. Only where that source
lacks some of the boxes (the groups' shard counts differ) or dies does the rank read the
other sources' addresses and indices. Boxes come from each needed source at once, one
thread and one kept-alive connection per source, several parts to a request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
from torch.distributed import TCPStore

from ckpt.errors import CorruptCheckpointError, ReshardError, StorageError
from ckpt.integrations._ftwire import (
    Box,
    Client,
    Piece,
    as_bytes,
    box_query,
    fill,
    leaves,
    loads_skeleton,
    local_piece,
    skeleton_paths,
    sub_box,
)

log = logging.getLogger("ckpt.integrations.torchft")

_RETRIES = 3  # fetches of a part that fails its crc32c
_BATCH = 16  # parts per request (each part at most the transport's ``chunk_bytes``)
_THREADS = 8  # sources fetched from at once: a rank's sources are the few that hold its boxes


class HealStats:
    """What the last heal moved: bytes received, the requests, the crc failures refetched,
    the seconds spent (in all, and from the start until each phase ended), the source
    ranks asked, and those that died mid-heal (their replicated parts came from the other
    ranks of their group)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.requests = 0
        self.refetched = 0
        self.fetch_s = 0.0
        self.template_s = 0.0  # from the start: this rank's template built,
        self.index_s = 0.0  # the indices this rank needs in,
        self.boxes_s = 0.0  # every box landed and checked,
        self.skeleton_s = 0.0  # the plain values in (they may wait for torchft's send)
        self.share_bytes = 0  # the bytes of this rank's own layout (what it needed)
        self.sources = 0  # source ranks whose index this rank read
        self.failed_over: dict[str, str] = {}  # source URL -> why it was given up mid-heal
        self._lock = threading.Lock()  # the fetching threads add to the counters

    def add(self, *, requests: int = 0, nbytes: int = 0, refetched: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += nbytes
            self.refetched += refetched

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


@dataclass(frozen=True)
class _Want:
    """A region (global coordinates) of one of the healing rank's tensors still to fill."""

    mine: Piece
    local: torch.Tensor
    box: Box


@dataclass(frozen=True)
class _Task:
    """A region of ``want`` that a source sends from its piece ``i``."""

    want: _Want
    i: int
    box: Box


class Heal:
    """``run(meta, step)``: the state dict torchft applies, this rank's template filled in
    place with its boxes from the source group that ``meta`` (a source's ``metadata()``)
    names."""

    def __init__(self, *, template: Callable[[], dict[str, Any]], user: str, rank: int, chunk: int,
                 timeout: timedelta) -> None:
        self._template, self._user, self._rank, self._chunk = template, user, rank, chunk
        self._timeout = timeout
        self._client = Client(timeout.total_seconds())
        self.stats = HealStats()
        self._urls: list[str | None] = []
        self._indices: list[dict[str, list[tuple[int, Piece]]] | None] = []  # by path
        self._store: TCPStore | None = None
        self._prefix = ""

    def run(self, meta: dict[str, Any], step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        host, port = meta["store"]
        self._store = TCPStore(host, int(port), is_master=False, timeout=self._timeout, wait_for_workers=False)
        self._prefix, n = meta["prefix"], int(meta["ranks"])
        self._urls, self._indices = [None] * n, [None] * n
        try:
            return self._run(step, t0)
        finally:
            for url in self._asked():  # they may change their state now
                with contextlib.suppress(StorageError):
                    self._get(url, f"/{step}/done")
            self._client.close()

    def _run(self, step: int, t0: float) -> dict[str, Any]:
        stats, n = self.stats, len(self._urls)
        own = self._rank % n
        with ThreadPoolExecutor(1, thread_name_prefix="ckpt-ft-heal") as side:
            # the own source's index arrives while this rank builds its template; the plain
            # values (the one request that may wait for torchft's send) while boxes arrive
            asked = side.submit(self._ask, [own], step)
            template = self._template()
            stats.template_s = time.perf_counter() - t0
            tensors: dict[str, torch.Tensor] = {}
            wants: list[_Want] = []
            for path, t in leaves(template):
                mine, local = local_piece(self._user + path, t)
                stats.share_bytes += local.numel() * local.element_size()
                wants.append(_Want(mine, local, (mine.offsets, mine.sizes)))
                tensors[self._user + path] = t
            asked.result()
            try:
                tasks = self._plan(wants)
            except (ReshardError, StorageError):  # the own source lacks some (or died): all of them
                self._ask(range(n), step)
                tasks = self._plan(wants)
            stats.index_s = time.perf_counter() - t0
            # plain values: the source rank of the same group rank (rank 0 where we are
            # more, the next live rank where that one died: the rule for a larger healer)
            skeleton = side.submit(self._from_live, self._rank if self._rank < n else 0, f"/{step}/skeleton")
            while True:  # a source that dies mid-heal: what it had not sent whole comes from others
                wants = self._pull(tasks, step)
                if not wants:
                    break
                self._ask(range(n), step)
                tasks = self._plan(wants)
            stats.boxes_s = time.perf_counter() - t0
            skel = loads_skeleton(skeleton.result())
            stats.skeleton_s = time.perf_counter() - t0
        missing = sorted(set(skeleton_paths(skel)) - set(tensors))
        if missing:
            raise ReshardError(f"the source state has {len(missing)} tensors this rank's template lacks",
                               key=missing[0], hint="build that state before healing (step a new "
                               "optimizer once), or return it from the transport's template")
        stats.fetch_s = time.perf_counter() - t0
        return fill(skel, tensors)

    # --- the sources ----------------------------------------------------------------

    def _url(self, r: int) -> str:
        url = self._urls[r]
        if url is None:
            assert self._store is not None
            url = self._urls[r] = self._store.get(f"{self._prefix}/addr/{r}").decode()
        return url

    def _ask(self, ranks: Sequence[int], step: int) -> None:
        """Reads the indices of the source ranks ``ranks`` not read yet (at once)."""
        todo = [r for r in ranks if self._indices[r] is None]
        if len(todo) > 1:
            assert self._store is not None
            unknown = [r for r in todo if self._urls[r] is None]
            got = self._store.multi_get([f"{self._prefix}/addr/{r}" for r in unknown]) if unknown else []
            for r, v in zip(unknown, got):
                self._urls[r] = v.decode()
        for r, index in zip(todo, _each(todo, lambda r: self._index(self._url(r), step))):
            by_path: dict[str, list[tuple[int, Piece]]] = {}
            for i, p in enumerate(index):
                by_path.setdefault(p.path, []).append((i, p))
            self._indices[r] = by_path
        self.stats.sources = sum(ix is not None for ix in self._indices)

    def _asked(self) -> list[str]:
        return [u for u, ix in zip(self._urls, self._indices)
                if u is not None and ix is not None and u not in self.stats.failed_over]

    def _index(self, url: str, step: int) -> list[Piece]:
        try:
            body, _ = self._get(url, f"/{step}/index")
        except StorageError as e:
            self._dead(url, e)
            return []
        return [Piece.from_json(v) for v in json.loads(body)]

    def _from_live(self, first: int, path: str) -> bytes:
        n = len(self._urls)
        for k in range(n):
            url = self._url((first + k) % n)
            if url in self.stats.failed_over:
                continue
            try:
                return self._get(url, path)[0]
            except StorageError as e:
                self._dead(url, e)
        raise StorageError(f"no rank of the source group served {path}: {', '.join(self.stats.failed_over)} "
                           "died", path=path, hint="torchft heals again at the next quorum, from a live peer")

    def _dead(self, url: str, e: StorageError) -> None:
        self.stats.failed_over[url] = str(e)
        log.warning("ckpt torchft heal: source rank at %s stopped answering (%s); going on with the "
                    "other ranks of its group", url, e)

    # --- planning and fetching --------------------------------------------------------

    def _plan(self, wants: list[_Want]) -> dict[int, list[_Task]]:
        """Which live source (of those whose index is read) sends which region of each want,
        by source: the pieces that cover it, one holder for a region several hold
        (replicated state is spread: each rank starts at its own group rank)."""
        n, dead = len(self._urls), self.stats.failed_over
        order = [(self._rank + k) % n for k in range(n)]
        tasks: dict[int, list[_Task]] = {}
        for want in wants:
            mine, planned, covered, need = want.mine, set(), 0, _numel(want.box)
            for src in order:
                index = self._indices[src]
                if index is None or self._urls[src] in dead:
                    continue
                for i, p in index.get(mine.path, []):
                    if covered >= need:
                        break
                    if p.shape != mine.shape or p.dtype != mine.dtype:
                        raise ReshardError(f"source has {p.dtype}{list(p.shape)}, this rank "
                                           f"{mine.dtype}{list(mine.shape)}", key=mine.path,
                                           hint="heal only between replica groups of the same model")
                    box = _intersect((p.offsets, p.sizes), want.box)
                    if box is None or box in planned:
                        continue  # a region another source already sends
                    planned.add(box)
                    tasks.setdefault(src, []).append(_Task(want, i, box))
                    covered += _numel(box)
            if covered < need and dead:
                raise StorageError(f"source ranks {', '.join(dead)} died mid-heal and no other rank of "
                                   f"their group holds their part of {mine.path}", key=mine.path,
                                   hint="torchft heals again at the next quorum, from a live peer")
            if covered < need:
                raise ReshardError(f"the source group holds {covered} of the {need} elements this rank "
                                   "needs", key=mine.path, hint="the source's pieces do not tile the tensor")
        return tasks

    def _pull(self, tasks: dict[int, list[_Task]], step: int) -> list[_Want]:
        """Runs the plan, one thread per source (each on its own connection), in requests
        of up to ``_BATCH`` parts; returns the regions a source that died did not send
        whole, to be planned again without it."""
        def run(src: int) -> list[_Want]:
            url = self._url(src)
            parts = [(k, part) for k, task in enumerate(tasks[src])
                     for part in _split(task.box, task.want.local.element_size(), self._chunk)]
            left = [0] * len(tasks[src])  # a task's parts still to land
            for k, _ in parts:
                left[k] += 1
            try:
                for at in range(0, len(parts), _BATCH):
                    batch = parts[at:at + _BATCH]
                    self._fetch(url, step, [(tasks[src][k], part) for k, part in batch])
                    for k, _ in batch:
                        left[k] -= 1
            except StorageError as e:  # a region counts only whole: others send it again
                self._dead(url, e)
                return [_Want(t.want.mine, t.want.local, t.box) for k, t in enumerate(tasks[src]) if left[k]]
            return []

        return [w for again in _each(sorted(tasks), run) for w in again]

    def _fetch(self, url: str, step: int, parts: list[tuple[_Task, Box]]) -> None:
        """One request for ``parts``; a part that fails its crc32c is fetched again."""
        landings = []
        for task, part in parts:
            dest = sub_box(task.want.local, task.want.mine, part)
            # a CPU destination that is one run of memory takes the body as it arrives (the
            # socket's one copy); otherwise a buffer of the part's size, copied in once checked
            direct = dest.device.type == "cpu" and dest.is_contiguous()
            landings.append((dest, dest if direct else torch.empty(part[1], dtype=dest.dtype)))
        todo = list(range(len(parts)))
        for _attempt in range(_RETRIES):
            q = f"/{step}/boxes?" + box_query([(parts[k][0].i, parts[k][1]) for k in todo])
            into = [as_bytes(landings[k][1]) for k in todo]
            checked = self._get_boxes(url, q, into)
            self.stats.add(requests=1, nbytes=sum(a.nbytes for a in into))
            bad = [k for k, (got, sent) in zip(todo, checked) if got != sent]
            for k in todo:
                dest, landing = landings[k]
                if k not in bad and landing is not dest:
                    dest.copy_(landing)
            if not bad:
                return
            self.stats.add(refetched=len(bad))  # a damaged part is fetched again over what landed
            todo = bad
        task, part = parts[todo[0]]
        raise CorruptCheckpointError(f"{_RETRIES} fetches of box {part} from {url} failed their crc32c",
                                     key=task.want.mine.path, path=f"{url}/{step}/boxes",
                                     hint="the peer's memory or the network corrupts data; heal "
                                     "from another replica group or from persistent storage")

    def _get(self, url: str, path: str) -> tuple[bytes, int | None]:
        """The body and its crc32c header."""
        try:
            return self._client.get(url, path)
        except OSError as e:
            raise self._unserved(url, path, e) from e

    def _get_boxes(self, url: str, path: str, into: list[np.ndarray]) -> list[tuple[int, int]]:
        """The bodies of a boxes request land in ``into``: (the crc32c of what landed, the
        sender's) each."""
        try:
            return self._client.get_boxes(url, path, into)
        except OSError as e:
            raise self._unserved(url, path, e) from e

    def _unserved(self, url: str, path: str, e: OSError) -> StorageError:
        self._client.drop(url)
        return StorageError(f"source rank at {url} did not serve {path}: {e}", path=url + path,
                            hint="the peer died or moved on; torchft heals again at the next "
                            "quorum, from a live peer")


_T = TypeVar("_T")
_R = TypeVar("_R")


def _each(items: Sequence[_T], fn: Callable[[_T], _R]) -> list[_R]:
    """``fn`` of each item, the items at once (threads: the work is sockets and crc32c,
    which release the GIL), in order; the first exception is raised."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(_THREADS, len(items)), thread_name_prefix="ckpt-ft-heal") as pool:
        return list(pool.map(fn, items))


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
