"""A persistent checkpoint drained from a memory-tier step: the state is staged once.

A tier step is a whole checkpoint — same engine, same plan over the same ranks, same
format, crc32c per chunk — whose files are spread over the nodes' tiers. When a
persistent save is due on a step the tier takes, :class:`~ckpt.CheckpointManager` does
not snapshot the state a second time (a second device-to-host copy and a second
optimizer-hook wait): once the step is committed in every node's tier, each node's
leader copies the files its node wrote (not the replicas it holds) into the persistent
checkpoint's write directory, and rank 0 commits the tier's manifest there through the
storage's commit strategy, as a save does: every object durable first, the manifest
last. The manifest loses the tier's own metadata and, on object stores, its object paths
move under the save's prefix (docs/format.md, "Memory tier").

The copy runs on the tier's thread (at the background priority) after the step is
replicated, so the step is held whole in the tier while it is read; no file is copied
into memory (a tier file is mapped, and its pages are tmpfs's own).
"""

from __future__ import annotations

import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ckpt._engine._commit import WriteTarget, commit_strategy
from ckpt._engine._manifest import manifest_under_prefix
from ckpt._engine._snapstate import Completion, SaveStats
from ckpt._format import MANIFEST, Manifest
from ckpt.elastic._group import NodeGroup
from ckpt.errors import DistributedSaveError
from ckpt.storage import Storage, split_checkpoint_url

__all__ = ["DrainJob", "drain"]

_THREADS = 8


class DrainJob(Completion):
    """The persistent save of one drained tier step, as a :class:`~ckpt.SaveHandle` sees
    it: done once committed (or failed) on this rank. The training loop never waits for
    it (``stats.blocked_s`` is 0: the tier's snapshot is the only staging)."""

    def __init__(self, url: str, step: int, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.url = url
        self.step: int | None = step
        self.storage_options = dict(storage_options or {})
        self.stats = SaveStats()
        self.t_call = time.perf_counter()

    def wait_staged(self) -> float:
        return 0.0

    def finish(self, error: BaseException | None) -> None:
        """Done, with ``error`` or none (once: later calls change nothing)."""
        if not self.done():
            self.stats.total_s = time.perf_counter() - self.t_call
        self._complete(error)


def drain(nodes: NodeGroup, step_dir: Path, files: list[str], job: DrainJob, *, tier_key: str) -> None:
    """Make ``job``'s persistent checkpoint from the committed tier step ``step_dir``, of
    which this node wrote ``files`` (checkpoint-relative; only leaders copy). Every rank of
    ``nodes`` calls it on the tier's thread; ``job`` is finished on every rank, with the
    error of any (the persistent checkpoint is committed or not at all). ``tier_key``: the
    tier's entry of the manifest's metadata, which the persistent checkpoint drops."""
    error: BaseException | None = None
    job.begin()  # from here on, interpreter exit waits for it
    try:
        _drain(nodes, step_dir, files, job, tier_key)
    except BaseException as e:  # noqa: BLE001 - reported through the handle
        error = e
    job.finish(error)


def _drain(nodes: NodeGroup, step_dir: Path, files: list[str], job: DrainJob, tier_key: str) -> None:
    store: Storage | None = None
    name = ""
    where: dict[str, Any] = {}
    if nodes.rank == 0:
        try:
            store, name = split_checkpoint_url(job.url, **job.storage_options)
            target = commit_strategy(store).target(name)
            where = {"dir": target.dir, "prefix": target.prefix}
        except Exception as e:  # noqa: BLE001 - every rank learns it
            where = {"error": repr(e)}
    where = nodes.broadcast(where)
    if "error" in where:
        raise DistributedSaveError(f"drained checkpoint of step {job.step}: no place to write ({where['error']})",
                                   path=job.url, hint="check the run's storage (path, permissions, credentials)")
    target = WriteTarget(where["dir"], where["prefix"])
    t0 = time.perf_counter()
    failure: str | None = None
    if nodes.leader:
        try:
            if store is None:
                store, name = split_checkpoint_url(job.url, **job.storage_options)
            job.stats.bytes = _copy(step_dir, files, store, target.dir)
            job.stats.objects = len(files)
        except Exception as e:  # noqa: BLE001 - reported through the agreement
            failure = f"node {nodes.node}: {e!r}"
    job.stats.write_s = time.perf_counter() - t0
    failed, job.stats.total_bytes = nodes.sum_ints([failure is not None, job.stats.bytes])
    failures: list[str] = []
    if failed:  # the failing nodes' words travel only when there are some, and only theirs
        failures = nodes.decide(failure, lambda got: [f for _r, f in got])
    t1 = time.perf_counter()
    outcome: str | None = None
    if nodes.rank == 0:
        assert store is not None
        committer = commit_strategy(store)
        try:
            if failures:
                committer.discard(target, name)
            else:
                raw = (step_dir / MANIFEST).read_bytes()
                manifest = Manifest.from_json(raw, where=os.fspath(step_dir))
                manifest.user_metadata = {k: v for k, v in manifest.user_metadata.items() if k != tier_key}
                manifest = manifest_under_prefix(manifest, target.prefix)
                committer.commit(target, name, manifest.to_json(), overwrite=True)
        except Exception as e:  # noqa: BLE001 - every rank learns it
            outcome = repr(e)
            try:
                committer.discard(target, name)
            except Exception:  # noqa: BLE001 - gc removes it
                pass
    outcome = nodes.broadcast(outcome)
    job.stats.commit_s = time.perf_counter() - t1
    if failures or outcome is not None:
        raise DistributedSaveError(f"drained checkpoint of step {job.step} not committed: "
                                   f"{'; '.join(failures) or outcome}", path=job.url,
                                   hint="the persistent save of the next due step stages the state as usual")


def _copy(step_dir: Path, files: list[str], store: Storage, write_dir: str) -> int:
    """Copy tier files (checkpoint-relative ``files`` of ``step_dir``) to ``write_dir`` of
    ``store``, each durable when this returns; the bytes copied."""

    def one(rel: str) -> int:
        dst = f"{write_dir}/{rel}"
        with open(step_dir / rel, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                store.write_bytes(dst, b"")
                return 0
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, memoryview(m) as view:
                store.write_bytes(dst, view)
        return size

    with ThreadPoolExecutor(max_workers=max(1, min(_THREADS, len(files))), thread_name_prefix="ckpt-drain") as pool:
        return sum(pool.map(one, files))
