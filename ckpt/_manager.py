"""Training-loop hooks: when to save, what to keep, where to resume.

    mgr = ckpt.CheckpointManager("s3://bucket/run", save=500, keep=3)
    start = mgr.restore(state)
    for step in range(start, total):
        ...; optimizer.step()
        mgr.step(step, state)
    mgr.close()

Save and retention rules are small policy objects; a failed background save is logged
and kept in ``failures`` — it never raises into the training loop. In a distributed job
every rank calls the same methods at the same steps; decisions that depend on one
rank's clock or signals are agreed over the side gloo group.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterable
from typing import Any

from ckpt import _config as config
from ckpt._api import SaveHandle, Snapshotter, load
from ckpt._engine._catalog import CheckpointInfo, list_run
from ckpt._engine._commit import commit_strategy
from ckpt._engine._coord import LocalCoordinator, coordinator
from ckpt._engine._options import SaveOptions
from ckpt._engine._recycle import purge_recycled, retire
from ckpt._format import MANIFEST, step_dirname
from ckpt._policies import (
    EverySteps,
    MemoryTierOptions,
    PreemptionOptions,
    RetentionPolicy,
    SavePolicy,
    dropped_steps,
    retention_policies,
    save_policies,
)
from ckpt.elastic._drain import DrainJob
from ckpt.elastic._group import agreement, any_flags
from ckpt.elastic._tier import MemoryTier
from ckpt.errors import CheckpointError
from ckpt.storage import open_storage

log = logging.getLogger("ckpt")

__all__ = ["CheckpointManager"]

# The keyword arguments of the first API and what replaced them (a clear error, not a bare TypeError).
_RENAMED = {"every_steps": "save=N", "every_seconds": "save=EverySeconds(s)", "policies": "save=[...]",
            "keep_last": "keep=K", "keep_every": "keep=KeepEvery(m)", "retention": "keep=[...]",
            "save_on_signals": "preemption=PreemptionOptions(signals=...)",
            "exit_on_preemption": "preemption=PreemptionOptions(exit=...)",
            "memory_every_steps": "memory=MemoryTierOptions(every=...)",
            "memory_keep": "memory=MemoryTierOptions(keep=...)", "replicas": "memory=MemoryTierOptions(replicas=...)",
            "memory_max_bytes": "memory=MemoryTierOptions(max_bytes=...)",
            "node_dir": "memory=MemoryTierOptions(node_dir=...)", "memory_drain": "memory=MemoryTierOptions(drain=...)"}


class CheckpointManager:
    """Checkpoints of one run directory (local path or URL).

    ``save``: when ``step()`` saves — a number of steps (``save=500``), a
    :class:`~ckpt.SavePolicy` (``EverySteps``, ``EverySeconds``) or a list of them (any
    fires); None saves only on ``save()`` / preemption / close. ``keep``: which committed
    checkpoints stay — a number (the last K), a :class:`~ckpt.RetentionPolicy`
    (``KeepLast``, ``KeepEvery``) or a list (a checkpoint kept by any rule stays; the
    newest always stays); None keeps all.

    ``memory``: a :class:`~ckpt.MemoryTierOptions` turns on the memory tier
    (:class:`ckpt.elastic.MemoryTier`, docs/memory-tier.md): snapshots into node-local
    shared memory (``CKPT_NODE_DIR``), replicated to other nodes. ``restore()`` then
    resumes from the newest tier step the surviving nodes can assemble, on any world
    size, before it looks at persistent checkpoints (``restored_from`` says which). A
    persistent save due on a tier step is *drained* from it (``drain``, default on).
    ``close()`` deletes the job's tier.

    ``preemption``: :class:`~ckpt.PreemptionOptions` — on SIGTERM/SIGUSR1 the next
    ``step()`` saves once, waits for the commit and exits with status 0.
    ``save_on_close``: ``close()`` saves the last step if it was not saved.
    ``options``: the engine's :class:`~ckpt.SaveOptions`. ``recycle`` (default off;
    ``CKPT_RECYCLE=1``): on local storage, retention keeps one retired checkpoint's tree
    (its manifest deleted first, so it is no longer a checkpoint) and the next save
    overwrites its files in place. Only for runs that nobody reads while they train: a
    reader that opened a checkpoint before retention retired it can get the next step's
    bytes, with valid checksums. Off, such a reader gets a typed error, never other bytes.
    """

    def __init__(self, run: str | os.PathLike[str], *,
                 save: int | SavePolicy | Iterable[SavePolicy] | None = None,
                 keep: int | RetentionPolicy | Iterable[RetentionPolicy] | None = None,
                 memory: MemoryTierOptions | None = None, preemption: PreemptionOptions | None = None,
                 save_on_close: bool = True, options: SaveOptions | None = None,
                 storage_options: dict[str, Any] | None = None, process_group: Any = None,
                 allow_pickle: bool = False, recycle: bool | None = None, **removed: Any) -> None:
        if removed:
            name = next(iter(removed))
            hint = _RENAMED.get(name)
            raise TypeError(f"CheckpointManager() got an unexpected keyword argument {name!r}"
                            + (f": it is now {hint} (see docs/api.md)" if hint else ""))
        self.run = os.fspath(run).rstrip("/")
        self.recycle = config.recycle(recycle)
        self.policies: list[SavePolicy] = save_policies(save)
        self.retention: list[RetentionPolicy] = retention_policies(keep)
        self.storage_options = dict(storage_options or {})
        self.storage = open_storage(self.run, **self.storage_options)
        self.process_group = process_group
        self.coord = coordinator(process_group)
        # The manager's agreement collectives run in the training thread while a
        # background commit may be using the engine's side group: the training thread's
        # agreement group, which the memory tier's step decisions share.
        self._agreement = agreement(process_group) if self.coord.world_size > 1 else LocalCoordinator()
        self.allow_pickle = allow_pickle
        self.snapshotter = Snapshotter(options)
        self.tier = MemoryTier(self.run, memory, options=options, allow_pickle=allow_pickle,
                               process_group=process_group) if memory is not None else None
        # A clock-based schedule is agreed over the ranks each step (one small all-reduce).
        self._timed = not all(isinstance(p, EverySteps)
                              for p in self.policies + (self.tier.schedule if self.tier else []))
        self.restored_from: str | None = None  # "memory" or "persistent" after restore()
        self.tier_restore: Any = None  # the TierRestore of a restore from memory
        preemption = preemption or PreemptionOptions()
        signals = preemption.signals
        if signals is None:
            # Under a torchrun elastic agent SIGTERM means "your group restarts" (a peer
            # died): a collective save would wait on the dead peer. SIGUSR1 stays a
            # preemption notice everywhere.
            elastic = "TORCHELASTIC_RUN_ID" in os.environ
            signals = (signal.SIGUSR1,) if elastic else (signal.SIGTERM, signal.SIGUSR1)
        self.exit_on_preemption = preemption.exit
        self.save_on_close = save_on_close
        self.preempted = False
        self.failures: list[tuple[int | None, BaseException]] = []
        self.handles: list[SaveHandle] = []
        self.restored_step: int | None = None
        self.blocked_s: list[float] = []  # per checkpoint that staged the state: call + hook waits
        self._signal = threading.Event()
        self._last_step: int | None = None
        self._last_saved: int | None = None
        self._last_time = time.monotonic()
        self._state: dict[str, Any] | None = None
        self._closed = False
        self._retention_lock = threading.Lock()
        self._old_handlers: dict[int, Any] = {}
        if signals and threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    # -- signals -------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        log.warning("ckpt: received signal %d: saving at the next step, then exiting", signum)
        self._signal.set()

    def _agree(self, flags: list[bool]) -> list[bool]:
        """Element-wise OR of flags over all ranks (one small collective)."""
        return any_flags(self._agreement, flags)

    # -- restore ---------------------------------------------------------------
    def checkpoints(self) -> list[CheckpointInfo]:
        return list_run(self.storage)

    def restore(self, state: dict[str, Any]) -> int:
        """Load the newest committed checkpoint that loads cleanly; returns the step to
        resume from (the saved step + 1), or 0 when there is none. A checkpoint that
        fails (corrupt chunk, bad manifest) is skipped with a warning naming it."""
        if self.coord.rank == 0:
            for name in commit_strategy(self.storage).recover():
                warnings.warn(f"ckpt: recovered {name}: an interrupted overwrite had moved it aside",
                              RuntimeWarning, stacklevel=2)
        candidates = self.checkpoints() if self.coord.rank == 0 else None
        candidates = self.coord.broadcast(candidates)
        if self.tier is not None:
            newest = max((c.step for c in candidates if c.step is not None), default=None)
            res = self.tier.restore(state, min_step=newest)
            if res is not None:
                self.restored_step, self.restored_from, self.tier_restore = res.step, "memory", res
                return res.step + 1
        for info in candidates:
            err: BaseException | None = None
            try:
                load(state, info.url, allow_pickle=self.allow_pickle, storage_options=self.storage_options,
                     process_group=self.process_group)
            except CheckpointError as e:
                err = e
            failed = self._agree([err is not None])[0]
            if failed:
                warnings.warn(f"ckpt: skipping checkpoint {info.url}: "
                              f"{err if err is not None else 'another rank failed to load it'}",
                              RuntimeWarning, stacklevel=2)
                continue
            self.restored_step = info.step
            self.restored_from = "persistent"
            self._last_saved = info.step
            return (info.step or 0) + 1 if info.step is not None else 0
        return 0

    # -- saving ------------------------------------------------------------------
    def step(self, step: int, state: dict[str, Any]) -> SaveHandle | None:
        """Call after the optimizer step of ``step``; saves when a policy says so. The
        wait for staging happens in the next optimizer step, not here."""
        self._state = state
        self._last_step = step
        now = time.monotonic()
        due = any(p.should_save(step, now, self._last_time) for p in self.policies)
        tier_due = self.tier is not None and self.tier.due(step, now)
        if self.coord.world_size > 1 and (self._timed or self._old_handlers):
            due, tier_due, preempt = self._agree([due, tier_due, self._signal.is_set()])
        else:
            preempt = self._signal.is_set()
        if preempt:
            self._preempt(step, state)
            return None
        handle: SaveHandle | None = None
        if self.tier is not None and tier_due:
            if due and self.tier.memory.drain:  # one staging for both: the tier step is drained to storage
                job = DrainJob(f"{self.run}/{step_dirname(step)}", step, self.storage_options)
                if self.tier.snapshot(step, state, persist=job) is not None:
                    handle = self._track(step, SaveHandle(job), staged=False)
            else:
                self.tier.snapshot(step, state)
        if due and handle is None:
            handle = self.save(step, state)  # no tier step now (or it was skipped): stage on its own
        return handle

    def save(self, step: int, state: dict[str, Any], *, block: bool = False) -> SaveHandle:
        """Snapshot now (asynchronously unless ``block``)."""
        url = f"{self.run}/{step_dirname(step)}"
        handle = self._track(step, self.snapshotter.save_async(
            state, url, step=step, allow_pickle=self.allow_pickle, storage_options=self.storage_options,
            process_group=self.process_group, overwrite=True))
        if block:
            handle.exception()
        return handle

    def _track(self, step: int, handle: SaveHandle, *, staged: bool = True) -> SaveHandle:
        """A persistent checkpoint of ``step`` under way: waited for, retention after it.
        ``staged``: it staged the state itself (a drained one is not in ``blocked_s``: its
        cost is the tier step's, ``tier.stats.blocked_s``)."""
        self._last_time = time.monotonic()
        self._last_saved = step
        self.handles = [h for h in self.handles if not h.done()] + [handle]
        handle.add_done_callback(lambda h: self._after_commit(h, step, staged))
        return handle

    def _after_commit(self, handle: SaveHandle, step: int, staged: bool = True) -> None:
        err = handle.exception()
        if err is not None:
            self.failures.append((step, err))
            log.warning("ckpt: checkpoint of step %s failed: %r", step, err)
            return
        if staged:
            self.blocked_s.append(handle.stats.blocked_s)
        if self.coord.rank == 0 and self.retention:
            try:
                self.apply_retention()
            except Exception as e:  # noqa: BLE001 - retention must not hurt training
                log.warning("ckpt: retention failed: %r", e)

    def apply_retention(self) -> list[str]:
        """Delete committed checkpoints no rule keeps: manifest first, then data."""
        with self._retention_lock:
            return self._apply_retention()

    def _apply_retention(self) -> list[str]:
        infos = {i.step: i for i in list_run(self.storage) if i.step is not None}
        pinned = [self.restored_step] if self.restored_step is not None and self._last_saved == self.restored_step \
            else []
        removed = []
        for step in reversed(dropped_steps(list(infos), self.retention, pinned=pinned)):  # newest first: recycled
            info = infos[step]
            if self.recycle:
                recycled = retire(self.storage, info.name)  # its manifest goes first
            else:
                self.storage.delete(f"{info.name}/{MANIFEST}")  # no longer a checkpoint
                recycled = False
            if not recycled:
                self.storage.delete_dir(info.name)
            removed.append(info.name)
        return removed

    def _preempt(self, step: int, state: dict[str, Any]) -> None:
        self.preempted = True
        if self._last_saved != step:
            handle = self.save(step, state, block=True)  # the grace period runs: durable soonest
            err = handle.exception()
            if err is not None:
                log.error("ckpt: the preemption checkpoint failed: %r", err)
        else:
            self.wait()
        if self.exit_on_preemption:
            self._restore_handlers()
            if self.tier is not None:
                self.tier.close(remove=False)  # the job is not over: it resumes from here
            self.snapshotter.close()
            raise SystemExit(0)

    def wait(self) -> None:
        """Block until every pending checkpoint is committed (or failed) and retention
        has run after it."""
        for h in list(self.handles):
            h.exception()
        if self.coord.rank == 0 and self.retention:
            try:
                self.apply_retention()  # the commit callback may still be on its way
            except Exception as e:  # noqa: BLE001
                log.warning("ckpt: retention failed: %r", e)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.save_on_close and self._state is not None and self._last_step is not None \
                and self._last_saved != self._last_step:
            self.save(self._last_step, self._state)
        self.wait()
        if self.coord.rank == 0 and self.recycle:
            purge_recycled(self.storage)
        if self.tier is not None:
            self.tier.close()
        self.snapshotter.close()
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)
        self._old_handlers = {}

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
