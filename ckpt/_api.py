"""The public save/load functions and the handle of an asynchronous save."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from ckpt import _config as config
from ckpt._engine._catalog import read_manifest
from ckpt._engine._commit import CommitStrategy, commit_strategy
from ckpt._engine._coord import coordinator, rank_and_world
from ckpt._engine._load import Loader, LoadStats
from ckpt._engine._mapped import MappedFiles
from ckpt._engine._options import SaveOptions
from ckpt._engine._pool import HostPool
from ckpt._engine._recycle import reading
from ckpt._engine._save import Prepared, SnapshotJob, prepare
from ckpt._engine._snapstate import SaveStats
from ckpt.errors import SaveInProgressError
from ckpt.providers import DescribeContext, describe
from ckpt.providers._base import iter_items
from ckpt.storage import Storage, split_checkpoint_url

__all__ = ["save", "save_async", "load", "open_loader", "SaveHandle", "Snapshotter", "default_snapshotter"]


class SaveJob(Protocol):
    """What a :class:`SaveHandle` follows: a snapshot's background part (the engine's
    ``SnapshotJob``), or a persistent checkpoint drained from the memory tier."""

    url: str
    step: int | None
    stats: SaveStats
    error_retrieved: bool

    @property
    def error(self) -> BaseException | None: ...

    def done(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...

    def add_done_callback(self, fn: Callable[[Any], None]) -> None: ...

    def wait_staged(self) -> float: ...


class SaveHandle:
    """The result of :func:`save_async`: a tiny future.

    ``result(timeout)`` returns :class:`SaveStats` once the checkpoint is durable and
    committed, or raises the original exception of the failure (on any rank: the
    others' errors are attached as ``DistributedSaveError`` in ``__cause__``).
    """

    def __init__(self, job: SaveJob | None, *, skipped: bool = False, url: str = "") -> None:
        self._job = job
        self.skipped = skipped
        self.url = job.url if job is not None else url

    @property
    def stats(self) -> SaveStats:
        return self._job.stats if self._job is not None else SaveStats()

    @property
    def step(self) -> int | None:
        return self._job.step if self._job is not None else None

    def done(self) -> bool:
        return self._job is None or self._job.done()

    def result(self, timeout: float | None = None) -> SaveStats:
        if self._job is None:
            return SaveStats()
        if not self._job.wait(timeout):
            raise TimeoutError(f"checkpoint {self.url} not committed within {timeout} s")
        self._job.error_retrieved = True
        if self._job.error is not None:
            raise self._job.error
        return self._job.stats

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._job is None:
            return None
        if not self._job.wait(timeout):
            raise TimeoutError(f"checkpoint {self.url} not committed within {timeout} s")
        self._job.error_retrieved = True
        return self._job.error

    def add_done_callback(self, fn: Callable[[SaveHandle], None]) -> None:
        if self._job is None:
            fn(self)
            return
        self._job.add_done_callback(lambda _job: fn(self))

    def wait_staged(self) -> float:
        """Block until the state may be mutated again; the optimizer hook does this for you."""
        return self._job.wait_staged() if self._job is not None else 0.0

    def __repr__(self) -> str:
        state = "skipped" if self.skipped else "done" if self.done() else "running"
        return f"SaveHandle({self.url!r}, {state})"


class Snapshotter:
    """Owns what outlives one snapshot: the host pool, copy streams, the plan cache, the
    optimizer hooks, and the snapshot in flight (at most one)."""

    def __init__(self, options: SaveOptions | None = None, *, background_nice: int = 0,
                 stage_in_files: bool = False, commit: Callable[[Storage], CommitStrategy] = commit_strategy) -> None:
        """``background_nice``: how much lower the threads that finish a snapshot in the
        background (writes, crc32c) run than the training loop (the memory tier's: see
        ``CKPT_BACKGROUND_NICE``); the copies the optimizer hook waits for never are.
        ``stage_in_files``: on local storage written directly, copy into the objects'
        files' own pages, no second write (the memory tier's tmpfs; ``_engine._mapped``).
        ``commit``: the commit strategy of a save's storage (default: chosen from its
        capabilities; the memory tier's is :class:`~ckpt._engine._commit.NodeCommit`)."""
        self.options = SaveOptions.resolve(options)
        self._commit = commit
        self.background_nice = background_nice
        self._mapped = MappedFiles() if stage_in_files else None
        self._pool: HostPool | None = None
        self._streams: dict[torch.device, list[Any]] = {}
        self._plan_cache: dict[str, Any] = {}  # the last save's (structure signature, RankPlan)
        self._job: SnapshotJob | None = None
        self._hooked: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
        self._lock = threading.Lock()

    @property
    def pool(self) -> HostPool:
        if self._pool is None:
            self._pool = HostPool(self.options.pool_bytes, pinned=False, huge_pages=self.options.huge_pages)
        return self._pool

    def _pool_for(self, cuda: bool) -> HostPool:
        """The staging pool, page-locked once a state has CUDA tensors (device-to-host
        copies need it to be asynchronous); a CPU-only job on a GPU host neither pins host
        memory nor starts CUDA. Called with no snapshot in flight."""
        if cuda and (self._pool is None or not self._pool.pinned):
            if self._pool is not None:
                self._pool.close()
            self._pool = HostPool(self.options.pool_bytes, pinned=True, huge_pages=self.options.huge_pages)
        return self.pool

    def _copy_streams(self, devices: set[torch.device]) -> dict[torch.device, list[Any]]:
        """``copy_streams`` dedicated streams on each CUDA device of the state (a copy runs
        on its source's device: a stream of another device would not order it)."""
        for dev in devices:
            if dev not in self._streams:
                self._streams[dev] = [torch.cuda.Stream(device=dev) for _ in range(self.options.copy_streams)]
        return {dev: self._streams[dev] for dev in devices}

    def _hook(self, state: dict[str, Any]) -> None:
        ref = weakref.ref(self)

        def pre_step(_opt: Any, _args: Any, _kwargs: Any) -> None:
            me = ref()
            if me is not None:
                me.wait_staged()

        for obj in state.values():
            if isinstance(obj, torch.optim.Optimizer) and obj not in self._hooked:
                obj.register_step_pre_hook(pre_step)
                self._hooked.add(obj)

    def wait_staged(self) -> float:
        job = self._job
        return job.wait_staged() if job is not None else 0.0

    def save_async(self, state: dict[str, Any], url: str | os.PathLike[str], *, step: int | None = None,
                   overwrite: bool = False, allow_pickle: bool = False,
                   storage_options: dict[str, Any] | None = None, process_group: Any = None,
                   metadata: dict[str, Any] | None = None, if_busy: str | None = None) -> SaveHandle:
        """As :func:`ckpt.save_async`."""
        return self._submit(state, url, step=step, overwrite=overwrite, allow_pickle=allow_pickle,
                            storage_options=storage_options, process_group=process_group, metadata=metadata,
                            if_busy=if_busy)

    def save(self, state: dict[str, Any], url: str | os.PathLike[str], **kwargs: Any) -> SaveStats:
        """Save and return once durable and committed (``ckpt.save``; keyword arguments as
        :meth:`save_async`)."""
        return self.save_async(state, url, **kwargs).result()

    def _submit(self, state: dict[str, Any], url: str | os.PathLike[str], *, step: int | None = None,
                overwrite: bool = False, allow_pickle: bool = False,
                storage_options: dict[str, Any] | None = None, process_group: Any = None,
                metadata: dict[str, Any] | None = None, if_busy: str | None = None) -> SaveHandle:
        t0 = time.perf_counter()
        policy = if_busy or self.options.if_busy
        prev = self._job
        if prev is not None and not prev.done():
            if policy == "skip":
                warnings.warn(f"checkpoint {os.fspath(url)} skipped: {prev.url} is still being written",
                              RuntimeWarning, stacklevel=3)
                return SaveHandle(None, skipped=True, url=os.fspath(url))
            if policy == "error":
                raise SaveInProgressError("the previous snapshot is still being written", path=prev.url,
                                          hint="wait for its handle, or use if_busy='wait' or 'skip'")
            prev.wait()
        if prev is not None and prev.error is not None and not prev.error_retrieved:
            prev.error_retrieved = True
            raise prev.error  # a failure nobody looked at surfaces from the next save
        storage, name = split_checkpoint_url(url, **(storage_options or {}))
        coord = coordinator(process_group)
        ctx = DescribeContext(allow_pickle=allow_pickle, rank=coord.rank, world_size=coord.world_size)
        early: Exception | None = None
        try:
            providers = describe(state, ctx)
            prep = prepare(list(iter_items(providers)), allow_pickle=allow_pickle, rank=coord.rank)
        except Exception as e:
            if coord.world_size == 1:
                raise
            # The peers are entering the save's collectives: take part, failing, so every
            # rank's handle raises (this one its own error) instead of the peers hanging.
            prep, early = Prepared([], {}, {}, {}), e
        self._hook(state)
        devices = {it.tensor.device for it in prep.tensors if it.tensor.device.type == "cuda"}
        job = SnapshotJob(prep=prep, storage=storage, name=name, step=step, coord=coord,
                          pool=self._pool_for(bool(devices)), options=self.options, plan_cache=self._plan_cache,
                          overwrite=overwrite, user_metadata=dict(metadata or {}),
                          streams=self._copy_streams(devices), t_call=t0,
                          early_error=early, committer=self._commit(storage), nice=self.background_nice,
                          mapped=self._mapped)
        self._job = job
        job.start()  # with inline staging (SaveOptions.cpu_staging), the copy happens now
        call = time.perf_counter() - t0
        job.stats.call_s = call
        job.stats.blocked_s += call
        return SaveHandle(job)

    def close(self) -> None:
        job = self._job
        if job is not None:
            job.wait()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._mapped is not None:
            self._mapped.close()


_default: Snapshotter | None = None
_default_lock = threading.Lock()


def default_snapshotter() -> Snapshotter:
    global _default
    with _default_lock:
        if _default is None:
            _default = Snapshotter()
        return _default


def save_async(state: dict[str, Any], url: str | os.PathLike[str], **kwargs: Any) -> SaveHandle:
    """Snapshot ``state`` to ``url`` in the background; returns once staging is scheduled.

    Until the next optimizer step (which waits for it through a hook) or
    ``handle.wait_staged()``, do not modify tensors of the state in place other than
    through that optimizer step. Keyword arguments: ``step``, ``overwrite``,
    ``allow_pickle``, ``storage_options``, ``process_group``, ``metadata``, ``if_busy``.
    """
    return default_snapshotter().save_async(state, url, **kwargs)


def save(state: dict[str, Any], url: str | os.PathLike[str], **kwargs: Any) -> SaveStats:
    """Save ``state`` to ``url``; returns once it is durable and committed."""
    return default_snapshotter().save(state, url, **kwargs)


def load(state: dict[str, Any], url: str | os.PathLike[str], *, strict: bool = True,
         allow_missing: bool | None = None, allow_unexpected: bool | None = None, cast: bool = False,
         allow_pickle: bool = False, storage_options: dict[str, Any] | None = None,
         process_group: Any = None) -> LoadStats:
    """Load the checkpoint at ``url`` into ``state`` in place (modules, optimizers and
    tensors keep their identity; plain values are replaced in the dict), resharded onto
    the current layout. Top-level objects of the checkpoint that ``state`` does not name
    are skipped (listed in the returned ``LoadStats.skipped``): ``{"model": m}`` loads
    the model alone from a training checkpoint. Inside the objects it names, keys the
    state has and the checkpoint lacks are errors unless ``allow_missing`` (then left as
    they are, listed in ``LoadStats.missing``), and saved keys the state has no place for
    are errors unless ``allow_unexpected`` (listed in ``LoadStats.unexpected``);
    ``strict=False`` allows both. All or nothing: a load that fails part way (a corrupt
    chunk, a missing object, a storage error) puts the caller's tensors back as they were
    (their old values are held in host memory during the load: ``LoadStats.backup_bytes``)
    before it raises. A tensor saved in another dtype than its destination's
    is an error unless ``cast`` (converted, listed in ``LoadStats.cast``). A load that
    matches nothing is an error."""
    t0 = time.perf_counter()
    storage, name = split_checkpoint_url(url, **(storage_options or {}))
    rank, world_size = rank_and_world(process_group)  # a load needs no collective
    with reading(storage, name):  # retention cannot recycle it under this load
        manifest = read_manifest(storage, name)
        ctx = DescribeContext(allow_pickle=allow_pickle, rank=rank, world_size=world_size)
        providers = describe(state, ctx)
        loader = Loader(storage, name, manifest, strict=strict, allow_missing=allow_missing,
                        allow_unexpected=allow_unexpected, cast=cast, allow_pickle=allow_pickle,
                        rank=rank, world_size=world_size, rollback=config.load_rollback())
        try:
            finalizers = []
            for p in providers:
                fin = p.load(loader)
                if fin is not None:
                    finalizers.append(fin)
            loader.check_unexpected(asked={str(k) for k in state})
            stats = loader.execute()
            for fin in finalizers:
                fin()
        except BaseException:
            # all or nothing: the caller's tensors get their old values back (and what the
            # providers changed before the reads is undone)
            loader.rollback()
            raise
    stats.total_s = time.perf_counter() - t0
    return stats


@contextlib.contextmanager
def open_loader(url: str | os.PathLike[str], *, allow_pickle: bool = False,
                storage_options: dict[str, Any] | None = None, process_group: Any = None) -> Iterator[Loader]:
    """The engine's reader of the checkpoint at ``url`` for this rank, not strict: for
    integrations that read a checkpoint key by key (DCP's ``StorageReader``) rather than
    into a state (:func:`load`). The manifest is read and validated first; while the
    context lasts the checkpoint is held as :func:`load` holds it (a recycling retention
    deletes it instead of overwriting its files). Reads are queued with
    ``read_into(key, dest, offsets, global_shape=...)`` and run by ``execute()``;
    ``entry(key)``, ``value(key)`` and ``raw(key)`` answer at once."""
    storage, name = split_checkpoint_url(url, **(storage_options or {}))
    rank, world_size = rank_and_world(process_group)
    with reading(storage, name):
        yield Loader(storage, name, read_manifest(storage, name), strict=False, allow_pickle=allow_pickle,
                     rank=rank, world_size=world_size)
