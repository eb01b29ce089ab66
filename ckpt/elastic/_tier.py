"""The memory tier: per-step snapshots in node-local shared memory, replicated to peers.

On the steps its schedule takes (``MemoryTierOptions.every``), the state is saved
through the same engine (async staging, the same format, crc32c per chunk) as one *global* checkpoint whose files are spread
over the nodes: every rank writes the pieces the plan gives it into its own node's
directory (``CKPT_NODE_DIR``, tmpfs), rank 0 commits in its directory and every other
node's lowest rank (its *leader*) commits the same manifest in its own. A background
thread then sends each node's files to the leaders of the next ``replicas`` nodes (a
ring over a side gloo group, never the training group); once every node holds its own
files and has received its predecessors', every leader writes ``complete.json``. The
step is then held on ``1 + replicas`` nodes and the older steps are deleted.

A tier step is taken or skipped by all ranks together: skipped while the previous one is
still being replicated, or when the node has no room (a :class:`MemoryTierWarning`);
training never waits for the tier beyond the optimizer hook of a snapshot in flight, and
the tier never touches persistent checkpoints. :mod:`._recover` reads it back.

Layout of a node directory (docs/format.md, "Memory tier")::

    $CKPT_NODE_DIR/<job>/step-<9 digits>/  manifest.json, the files this node wrote,
                                           replicas received (received-<node>.json lists
                                           them), complete.json once held on 1+replicas nodes
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import queue
import shutil
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt import _config as config
from ckpt._api import SaveHandle, Snapshotter
from ckpt._engine._commit import NodeCommit
from ckpt._engine._options import SaveOptions
from ckpt._engine._recycle import RECYCLE_PREFIX, prune_stale, retiring, to_slot
from ckpt._format import MANIFEST, TMP_PREFIX, parse_step_dirname, step_dirname
from ckpt._policies import KeepLast, MemoryTierOptions, dropped_steps
from ckpt.elastic._drain import DrainJob, drain
from ckpt.elastic._group import agreement, any_flags, node_group
from ckpt.elastic._names import (
    COMPLETE,
    JOB,
    META_KEY,
    SPARE,
    own_files,
    received_lists,
    write_received,
)
from ckpt.elastic._recover import TierRestore, restore_from_tier
from ckpt.elastic._transfer import bundle_of, swap

__all__ = ["META_KEY", "MemoryTier", "MemoryTierWarning", "TierStats", "job_id", "own_files"]



class MemoryTierWarning(RuntimeWarning):
    """The memory tier skipped a step or could not be used; training goes on."""


@dataclass
class TierStats:
    """What the tier did on this rank (bytes held and moved are this node's)."""

    taken: int = 0
    completed: int = 0
    skipped_busy: int = 0
    skipped_full: int = 0
    failed: int = 0
    last_complete: int | None = None
    held_bytes: int = 0  # this node's tier now
    peak_held_bytes: int = 0
    replicated_bytes: int = 0  # sent to peers
    replicate_s: float = 0.0
    call_s: list[float] = field(default_factory=list)  # the save_async calls
    blocked_s: list[float] = field(default_factory=list)  # per step taken: the call + optimizer-hook waits
    finish_s: list[float] = field(default_factory=list)  # the background part after staging
    drained: int = 0  # persistent checkpoints made from a tier step (no second staging)
    drain_s: list[float] = field(default_factory=list)
    # host passes (this rank, steps staged): bytes copied in, written again, checksummed apart
    staged_bytes: int = 0
    rewritten_bytes: int = 0
    crc_reread_bytes: int = 0


def job_id(run: str) -> str:
    """The tier directory of one job: its run URL and torchrun's run id. Another job
    (another run, or another ``--rdzv-id``) never reads it."""
    run = run if "://" in run else os.path.abspath(run)
    key = f"{run}\0{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def tree_bytes(path: Path) -> int:
    return sum(tree_sizes(path).values())


def tree_sizes(root: Path) -> dict[str, int]:
    """Bytes of the files under each entry of ``root`` (a file directly in it: its own
    size), by name, in one walk (the tier's bookkeeping after every step: one walk, not
    one per figure). Links are not followed."""
    sizes: dict[str, int] = {}
    try:
        top = list(os.scandir(root))
    except OSError:
        return sizes
    for entry in top:
        stack, total = [entry], 0
        while stack:
            e = stack.pop()
            try:
                if e.is_dir(follow_symlinks=False):
                    with os.scandir(e.path) as it:
                        stack.extend(it)
                else:
                    total += e.stat(follow_symlinks=False).st_size
            except OSError:  # deleted meanwhile
                pass
        sizes[entry.name] = total
    return sizes


class MemoryTier:
    """Per-step snapshots of one job in node-local memory (see the module docstring).

    ``memory``: the :class:`~ckpt.MemoryTierOptions` (when a step is taken, how many a
    node keeps, replicas, budget, node directory).
    """

    def __init__(self, run: str, memory: MemoryTierOptions | None = None, *, options: SaveOptions | None = None,
                 allow_pickle: bool = False, process_group: Any = None) -> None:
        memory = memory or MemoryTierOptions()
        self.memory = memory
        self.schedule = memory.schedule
        self.keep, self.replicas, self.max_bytes = memory.keep, memory.replicas, memory.max_bytes
        node_dir = memory.node_dir
        self.allow_pickle = allow_pickle
        self.node_dir = Path(config.node_dir(node_dir))
        self.job = job_id(run)
        self.root = self.node_dir / self.job
        self.root.mkdir(parents=True, exist_ok=True)
        self.stats = TierStats()
        self.process_group = process_group
        self.nodes = node_group(self.node_dir, process_group)  # the tier thread's collectives and transfers
        if self.nodes.leader:  # the replication ring's peers, read now: the tier's thread never reads the store
            r = min(self.replicas, self.nnodes - 1)
            self.nodes.leaders_of([(self.node + d) % self.nnodes for d in range(-r, r + 1) if d])
        self.snapshotter = Snapshotter(options, background_nice=config.background_nice(), stage_in_files=True,
                                       commit=functools.partial(NodeCommit, leader=self.nodes.leader))
        self._agreement = agreement(process_group)  # the training thread's (the manager's group)
        (self.root / JOB).write_text(json.dumps({"run": run, "job": self.job,
                                                        "run_id": os.environ.get("TORCHELASTIC_RUN_ID")}))
        # one thread finishes the steps taken, one at a time (a step in flight: not idle); it
        # lives as long as the tier: a thread started in every call would make the call wait
        # for the new thread's first turn on the GIL, behind the save's own background work
        self._worker: threading.Thread | None = None
        self._steps: queue.Queue[tuple[int, SaveHandle, DrainJob | None] | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()
        self._footprint = 0  # bytes this node's tier grew by in the last complete step
        self._warned_single = False
        self._storage: Any = None  # this node's tier as a Storage (recycling)
        self._last_time = time.monotonic()  # when the last step was taken (time-based schedules)
        self._reusable = 0  # bytes of the recycle slot and spare files (the next step's pages)

    # -- topology (the node group's) ---------------------------------------------
    @property
    def rank(self) -> int:
        return self.nodes.rank

    @property
    def world_size(self) -> int:
        return self.nodes.world_size

    @property
    def node(self) -> int:
        return self.nodes.node

    @property
    def nnodes(self) -> int:
        return self.nodes.nnodes

    @property
    def leader(self) -> bool:
        return self.nodes.leader

    # -- taking a step (training thread) -----------------------------------------
    def due(self, step: int, now: float | None = None) -> bool:
        """Whether the schedule takes ``step`` (a time-based schedule must be agreed over
        the ranks by the caller, as the manager does)."""
        now = time.monotonic() if now is None else now
        return any(p.should_save(step, now, self._last_time) for p in self.schedule)

    def busy(self) -> bool:
        return not self._idle.is_set()

    def _room(self) -> bool:
        """Room on this node for one more step like the last one."""
        need = max(0, self._footprint - self._reusable)  # a recycled step's pages are reused
        st = os.statvfs(self.root)
        if need and need > st.f_bavail * st.f_frsize:
            return False
        if self.max_bytes is not None and self._footprint and self.stats.held_bytes + need > self.max_bytes:
            return False
        return True

    def snapshot(self, step: int, state: dict[str, Any], *, persist: DrainJob | None = None) -> SaveHandle | None:
        """Take tier step ``step`` now (every rank calls this at the same steps); None
        when the ranks agree to skip it. ``persist`` (every rank passes one, or none):
        once the step is held, drain it into that persistent checkpoint
        (:mod:`._drain`); a skipped step leaves it untouched, for the caller to save."""
        busy, full = any_flags(self._agreement, [self.busy(), not self._room()])
        if busy:
            self.stats.skipped_busy += 1
            return None
        if full:
            self.stats.skipped_full += 1
            where = f"{self.root} (budget {self.max_bytes} bytes)" if self.max_bytes else str(self.root)
            warnings.warn(f"ckpt memory tier: no room for step {step} on a node ({where}; a step needs about "
                          f"{self._footprint} bytes): step skipped, training and persistent checkpoints go on",
                          MemoryTierWarning, stacklevel=3)
            return None
        t0 = time.perf_counter()
        handle = self.snapshotter.save_async(
            state, os.fspath(self.root / step_dirname(step)), step=step, overwrite=True,
            allow_pickle=self.allow_pickle, process_group=self.nodes.group,
            metadata={META_KEY: {"job": self.job, "nodes": self.nnodes, "replicas": self.replicas}})
        self.stats.call_s.append(time.perf_counter() - t0)
        self.stats.taken += 1
        self._last_time = time.monotonic()
        self._idle.clear()
        self._steps.put((step, handle, persist))
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="ckpt-tier", daemon=True)
            self._worker.start()
        return handle

    # -- finishing a step (tier thread) ---------------------------------------------
    def _work(self) -> None:
        config.lower_this_thread()  # replication yields to the training loop where cores are short
        while True:
            job = self._steps.get()
            if job is None:
                return
            try:
                self._finish_logged(*job)
            finally:
                self._idle.set()

    def _finish_logged(self, step: int, handle: SaveHandle, persist: DrainJob | None) -> None:
        try:
            self._finish(step, handle, persist)
        except Exception as e:  # noqa: BLE001 - the tier never raises into training
            self.stats.failed += 1
            warnings.warn(f"ckpt memory tier: step {step} not held: {e!r}", MemoryTierWarning, stacklevel=1)
            if persist is not None:
                persist.finish(e)  # a no-op where the drain already finished it

    def _finish(self, step: int, handle: SaveHandle, persist: DrainJob | None = None) -> None:
        err = handle.exception()  # every rank learns a failure of any rank
        t0 = time.perf_counter()
        hs = handle.stats
        self.stats.blocked_s.append(hs.blocked_s)
        self.stats.staged_bytes += hs.bytes
        self.stats.rewritten_bytes += hs.rewritten_bytes
        self.stats.crc_reread_bytes += hs.crc_reread_bytes
        name = step_dirname(step)
        if err is not None:
            self.stats.failed += 1
            if self.leader:
                self.clean_tmp()
            warnings.warn(f"ckpt memory tier: step {step} skipped: {err}", MemoryTierWarning, stacklevel=1)
            if persist is not None:
                persist.finish(err)
            return
        manifest = (self.root / name / MANIFEST).read_bytes() if self.rank == 0 else None
        manifest = self.nodes.broadcast(manifest)
        ok = True
        if self.leader and self.rank != 0:
            try:
                self._commit_here(name, manifest)
            except Exception as e:  # noqa: BLE001 - reported through the agreement
                ok = False
                warnings.warn(f"ckpt memory tier: step {step} not committed here: {e!r}", MemoryTierWarning,
                              stacklevel=1)
        if not self.nodes.all_ok(ok):
            self.stats.failed += 1
            if persist is not None:
                persist.finish(RuntimeError(f"memory tier step {step} was not committed on every node"))
            return
        mine = own_files(self.root / name) if self.leader else []  # sent to peers, drained to storage
        if self.leader:
            try:
                self._replicate(name, mine)
            except Exception as e:  # noqa: BLE001 - reported through the agreement
                ok = False
                warnings.warn(f"ckpt memory tier: step {step} not replicated: {e!r}", MemoryTierWarning,
                              stacklevel=1)
        if self.nodes.all_ok(ok):
            self._held(step, name)
        else:
            self.stats.failed += 1
        if persist is not None:  # the step is whole in the nodes' tiers, replicated or not
            t1 = time.perf_counter()
            drain(self.nodes, self.root / name, mine, persist, tier_key=META_KEY)
            self.stats.drained += persist.error is None
            self.stats.drain_s.append(time.perf_counter() - t1)
        self.stats.finish_s.append(time.perf_counter() - t0)

    def _held(self, step: int, name: str) -> None:
        """Every node holds step ``name`` and its predecessors' replicas: complete."""
        if self.leader:
            held = min(1 + self.replicas, self.nnodes)
            (self.root / name / COMPLETE).write_text(json.dumps({"step": step, "nodes": self.nnodes,
                                                                  "held_on": held, "t": time.time()}))
            before = self.stats.held_bytes
            self._retain(name)
            sizes = tree_sizes(self.root)
            self.stats.held_bytes = sum(sizes.values())  # the recycle slot and spare files included
            self._reusable = sum(b for n, b in sizes.items() if n.startswith(TMP_PREFIX))
            self._footprint = max(sizes.get(name, 0), self.stats.held_bytes - before)
            self.stats.peak_held_bytes = max(self.stats.peak_held_bytes, self.stats.held_bytes)
        self._footprint = self.nodes.sum_ints([self._footprint], op="max")[0]
        self.stats.completed += 1
        self.stats.last_complete = step

    def _commit_here(self, name: str, manifest: bytes) -> None:
        """On a node other than rank 0's: the same commit in this node's directory."""
        committer = NodeCommit(self._node_storage())
        target = committer.node_target(name)
        prune_stale(os.fspath(self.root / target.dir))  # a recycled slot's files this save did not rewrite
        committer.commit(target, name, manifest, overwrite=True)

    def _node_storage(self) -> Any:
        """This node's tier as a Storage (commits and recycling)."""
        if self._storage is None:
            from ckpt.storage import open_storage

            self._storage = open_storage(os.fspath(self.root))
        return self._storage

    def _replicate(self, name: str, files: list[str]) -> None:
        """Send this node's ``files`` of step ``name`` to the next nodes, receive theirs."""
        r = min(self.replicas, self.nnodes - 1)
        if self.replicas and r < self.replicas and not self._warned_single:
            self._warned_single = True
            warnings.warn(f"ckpt memory tier: replicas={self.replicas} needs {self.replicas + 1} nodes, the job "
                          f"has {self.nnodes}: each node's files are held on {r + 1}", MemoryTierWarning,
                          stacklevel=1)
        if r <= 0:
            return
        t0 = time.perf_counter()
        step_dir = self.root / name
        mine = bundle_of(step_dir, files)
        g = self.nodes
        for d in range(1, r + 1):
            src_node = (g.node - d) % g.nnodes
            dst, src = (g.global_rank(x) for x in g.leaders_of([(g.node + d) % g.nnodes, src_node]))
            got = swap(g.group, mine, dst, step_dir, src, spare=self.root / SPARE)
            write_received(step_dir, str(src_node), [p for p, _ in got])
            self.stats.replicated_bytes += mine.nbytes
        self.stats.replicate_s += time.perf_counter() - t0

    def _retain(self, newest: str) -> None:
        """Keep the newest ``keep - 1`` complete steps (the next step takes the last place).
        A step numbered above ``newest`` is of a timeline the job left (it went back to an
        older checkpoint, or its step numbers started again): deleted, or a restore would
        prefer it to the job's real newest step."""
        n = parse_step_dirname(newest) or 0
        steps: dict[int, Path] = {}
        for p in self.root.iterdir():
            s = parse_step_dirname(p.name)
            if s is not None:
                steps[s] = p
        for s in sorted(s for s in steps if s > n):
            p = steps.pop(s)
            for f in (COMPLETE, MANIFEST):
                (p / f).unlink(missing_ok=True)
            shutil.rmtree(p, ignore_errors=True)
        complete = [s for s, p in steps.items() if (p / COMPLETE).exists()]
        dropped = set(dropped_steps(complete, [KeepLast(self.keep - 1)], pinned=[n]))
        gone = [p for s, p in sorted(steps.items()) if s in dropped or s not in complete and s != n]
        self.clean_tmp()
        for i, p in enumerate(gone):
            if i < len(gone) - 1 or not self._retire(p):  # the newest of them is recycled
                shutil.rmtree(p, ignore_errors=True)

    def _retire(self, step_dir: Path) -> bool:
        """Make a step that goes the node's recycle slot (its received replicas the spare
        files); False where it must be deleted instead (a reader holds it, or no slot)."""
        (step_dir / COMPLETE).unlink(missing_ok=True)  # no longer a step, first
        with retiring(self._node_storage(), step_dir.name) as free:
            if not free:
                return False
            spare = self.root / SPARE
            shutil.rmtree(spare, ignore_errors=True)
            for listing, paths in received_lists(step_dir):
                for rel in paths:
                    dst = spare / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.replace(step_dir / rel, dst)
                    except FileNotFoundError:
                        pass
                listing.unlink()
            return to_slot(self._node_storage(), step_dir.name)

    def clean_tmp(self) -> None:
        """Delete unfinished writes (the recycle slot and the spare files stay)."""
        for p in self.root.glob(f"{TMP_PREFIX}*"):
            if p.name != SPARE and not p.name.startswith(RECYCLE_PREFIX):
                shutil.rmtree(p, ignore_errors=True)

    # -- restore and the end ----------------------------------------------------
    def wait(self) -> None:
        self._idle.wait()

    def drop_steps(self, keep: str | None = None) -> None:
        """Leaders delete this job's tier steps (all but ``keep``): after a restore, what
        is left belongs to a timeline the job no longer follows."""
        if self.leader and self.root.exists():
            for p in self.root.iterdir():
                if p.is_dir() and p.name != keep:
                    shutil.rmtree(p, ignore_errors=True)
            self.stats.held_bytes = tree_bytes(self.root)

    def close(self, *, remove: bool = True) -> None:
        """Wait for the step in flight; with ``remove`` (a clean end of the job) every
        node's tier of this job is deleted once every rank is done with it."""
        self.wait()
        if self._worker is not None:
            self._steps.put(None)
            self._worker.join()
            self._worker = None
        self.snapshotter.close()
        if remove:
            self.nodes.all_ok(True)  # nobody deletes while a peer may still read from it
            if self.leader:
                shutil.rmtree(self.root, ignore_errors=True)

    def restore(self, state: dict[str, Any], *, min_step: int | None = None) -> TierRestore | None:
        """Load the newest tier step the surviving nodes can assemble (and not older than
        ``min_step``) into ``state``; a :class:`~ckpt.elastic._recover.TierRestore` or
        None. Every rank calls it."""
        if self.leader:  # a commit cut short between its renames put the older copy aside
            NodeCommit(self._node_storage()).recover()
        res = restore_from_tier(self.nodes, self.root, state, job=self.job, allow_pickle=self.allow_pickle,
                                min_step=min_step)
        self.drop_steps(keep=None if res is None else res.name)
        return res
