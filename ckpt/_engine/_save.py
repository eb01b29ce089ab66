"""One snapshot: stage, write, commit — in the background.

Per rank, a save is (see DESIGN.md, "The flow of a save"):

1. in the caller's thread: describe the state, encode plain values, copy *eager*
   tensors, record a CUDA event on each producing stream; return a handle;
2. a stager thread: gather piece lists, plan, then copy every write unit (one shard of
   an array, or one pack) into a block of the host pool — on dedicated CUDA streams for
   device tensors, with a GIL-free numpy copy for CPU tensors (:mod:`._staging`) —
   waiting when the pool is full. A CPU state staged *inline*
   (``SaveOptions.cpu_staging``) is copied and checksummed on one thread per core while
   the caller waits, instead of alongside the training;
3. a writer thread (:mod:`ckpt._engine._writer`): as each unit's copy completes,
   write it — on local disk directly (:mod:`._direct_write`: the block already holds
   the object's bytes; pwrite, O_DIRECT where possible, fsync), elsewhere through
   tensorstore (asynchronous, outside the GIL); a block returns to the pool when its
   write is durable;
4. the stager thread again: once every write is durable, report to rank 0 over the
   side group; rank 0 writes manifest.json last (the commit) and tells every rank.
"""

from __future__ import annotations

import math
import os
import pickle
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt._engine._arrays import open_for_write
from ckpt._engine._commit import CommitStrategy, NodeCommit, WriteTarget, commit_strategy
from ckpt._engine._coord import DistCoordinator, LocalCoordinator
from ckpt._engine._direct_write import DirectWriter, encode_json
from ckpt._engine._globalplan import Assignment, PieceMeta
from ckpt._engine._layout import pack_image, shard_image
from ckpt._engine._manifest import build_manifest
from ckpt._engine._mapped import MappedFiles
from ckpt._engine._options import SaveOptions
from ckpt._engine._plan import pack_metadata, zarr_metadata
from ckpt._engine._pool import HostPool
from ckpt._engine._recycle import prune_recycled, prune_unplanned, take_recycled
from ckpt._engine._saveplan import LocalPieces, RankPlan, plan_save
from ckpt._engine._snapstate import Completion, SnapshotState
from ckpt._engine._staging import direct_ok, inline_staging, stage, tensor_digest
from ckpt._engine._writer import Writer, WriteUnit
from ckpt._format import (
    MANIFEST,
    dtype_name,
    key_to_path,
    rank_object,
    rank_object_path,
    storage_dtype,
    storage_torch_dtype,
)
from ckpt._values import NotJSONable, encode_value
from ckpt.errors import (
    CheckpointError,
    CheckpointExistsError,
    DistributedSaveError,
    PickleNotAllowedError,
    UnsafePathError,
    UnsupportedStateError,
)
from ckpt.providers._base import TensorItem, ValueItem
from ckpt.storage import Storage


@dataclass
class Prepared:
    """What the caller's thread captured."""

    tensors: list[TensorItem]
    values: dict[str, Any]  # encoded JSON values (rank 0 writes)
    rank_values: dict[str, Any]  # encoded per-rank values
    pickles: dict[str, bytes]
    ready_events: dict[Any, Any] = field(default_factory=dict)  # device -> cuda event
    versions: dict[tuple[str, Any], int] = field(default_factory=dict)  # (key, box) -> _version at snapshot


def prepare(items: list[Any], *, allow_pickle: bool, rank: int) -> Prepared:
    """Validate keys, encode values, copy eager tensors, record CUDA events."""
    tensors: list[TensorItem] = []
    values: dict[str, Any] = {}
    rank_values: dict[str, Any] = {}
    pickles: dict[str, bytes] = {}
    seen: dict[str, Any] = {}  # key -> None, or (global shape, boxes) for explicitly placed pieces
    for it in items:
        multi = isinstance(it, TensorItem) and it.offsets is not None
        prev = seen.get(it.key, ())
        if prev != () and not (multi and prev is not None and prev[0] == it.shape and it.box not in prev[1]):
            raise UnsafePathError("two entries of the state have the same key", key=it.key,
                                  hint="rename one of them")
        seen.setdefault(it.key, (it.shape, set()) if multi else None)
        if multi:
            seen[it.key][1].add(it.box)
        key_to_path(it.key)  # validates
        if isinstance(it, TensorItem):
            t = it.tensor
            dtype_name(t.dtype, it.key)
            if t.device.type == "meta":
                raise UnsupportedStateError("a meta tensor has no data to save", key=it.key,
                                      hint="materialise the module (to_empty + init) before saving")
            if t.is_conj() or t.is_neg():
                # a lazy view (x.conj(), torch._neg_view): save the values the user sees, resolved now
                it = TensorItem(it.key, t.resolve_conj().resolve_neg(), it.global_shape, it.offsets, it.replica,
                                sharding=it.sharding)
            elif it.eager:
                it = TensorItem(it.key, _eager_copy(t), it.global_shape, it.offsets, it.replica, sharding=it.sharding)
            tensors.append(it)
            continue
        assert isinstance(it, ValueItem)
        target = rank_values if it.per_rank else values
        if it.encoded:
            target[it.key] = it.value
            continue
        try:
            target[it.key] = encode_value(it.value)
        except NotJSONable as e:
            if not allow_pickle:
                raise PickleNotAllowedError(
                    f"a value of type {type(e.obj).__name__} is not JSON and would need pickle", key=it.key,
                    hint="pass allow_pickle=True to save (and to load), or store it as JSON-able data") from None
            if it.per_rank:
                raise PickleNotAllowedError("per-rank values must be JSON-able", key=it.key) from None
            pickles[it.key] = pickle.dumps(it.value, protocol=pickle.HIGHEST_PROTOCOL)
    prep = Prepared(tensors, values, rank_values, pickles)
    prep.versions = {(t.key, t.box): t.tensor._version for t in tensors}
    for item in tensors:
        dev = item.tensor.device
        if dev.type == "cuda" and dev not in prep.ready_events:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dev))
            prep.ready_events[dev] = ev
    return prep


def _eager_copy(t: torch.Tensor) -> torch.Tensor:
    """A private copy of state that may change before its turn to be staged. A device
    tensor is cloned on its device, ordered on the current stream (device bandwidth, and
    the caller does not wait: the clone then goes to the host like any other tensor);
    one the device has no room for is copied to host memory now, synchronously."""
    try:
        return t.detach().clone()
    except torch.OutOfMemoryError:  # a device's allocator (the host's raises RuntimeError)
        return t.detach().to("cpu", copy=True)


class SnapshotJob(Completion):
    """The background part of one save on one rank."""

    def __init__(self, *, prep: Prepared, storage: Storage, name: str, step: int | None,
                 coord: LocalCoordinator | DistCoordinator, pool: HostPool, options: SaveOptions,
                 plan_cache: dict[str, Any], overwrite: bool, user_metadata: dict[str, Any],
                 streams: dict[Any, list[Any]], t_call: float, early_error: Exception | None = None,
                 committer: CommitStrategy | None = None, nice: int = 0, mapped: MappedFiles | None = None) -> None:
        self.prep = prep
        self.mapped = mapped  # stage direct units into their files' pages (_mapped)
        self._early_error = early_error  # describing the state failed on this rank
        self.storage = storage
        self.name = name
        self.step = step
        self.coord = coord
        self.options = options
        self.plan_cache = plan_cache
        self.overwrite = overwrite
        self.user_metadata = user_metadata
        self.t_call = t_call
        self.url = storage.describe(name)
        self.committer = committer or commit_strategy(storage)
        self.shared = SnapshotState(storage, self.url, pool, t_call, streams, prep.ready_events, prep.versions,
                                    inline=inline_staging(options.cpu_staging, prep.tensors), nice=nice)
        if options.check_snapshot:  # debug: every tensor's checksum at the call (compared once staged)
            self.shared.digests = {(t.key, t.box): (t.tensor, tensor_digest(t.tensor)) for t in prep.tensors}
        self.stats = self.shared.stats
        self.stats.inline = self.shared.inline
        Completion.__init__(self)
        self._plan_obj: RankPlan | None = None
        self._recycled: set[str] | None = None  # writing into a recycled tree it took: the files it held
        self.in_recycled = False  # every rank: the write directory is a recycled tree
        self.save_id = ""  # rank 0's random id of this save: per-rank objects carry it
        self._thread = threading.Thread(target=self._run, name=f"ckpt-save-{name}", daemon=True)

    # -- public-ish --------------------------------------------------------
    def start(self) -> None:
        """Start the background work; with inline staging, return once every copy is done
        (``SaveOptions.cpu_staging``: the copy happens in the call)."""
        self.begin()  # interpreter exit waits for it
        self._thread.start()
        if self.shared.inline:
            self.shared.staged.wait()

    def wait_staged(self) -> float:
        """Block until no source tensor will be read again; returns seconds waited.

        On CUDA the wait ends once every copy is *issued*; the current stream then waits
        on the copies' events, so the host does not block on the copies themselves.
        Returns at once when the snapshot is done, or staged with no device copies."""
        shared = self.shared
        if self._done.is_set() or shared.staged.is_set() and not shared.copy_events:
            return 0.0
        t0 = time.perf_counter()
        shared.staged.wait()
        for dev, ev in shared.copy_events:  # the training stream of the copy's device
            torch.cuda.current_stream(dev).wait_event(ev)
        waited = time.perf_counter() - t0
        self.stats.hook_wait_s += waited
        self.stats.blocked_s += waited
        return waited

    # -- the background thread ------------------------------------------------
    def _run(self) -> None:
        local_error: BaseException | None = None
        target: WriteTarget | None = None
        pool = self.shared.pool
        pool.peak = pool.used
        wait0 = pool.wait_s
        try:
            target = self._agree_on_dir()
            plan = self._plan()
            self._plan_obj = plan
            if self._recycled is not None and plan.entries is not None:
                # files of the slot this plan will not overwrite go first (rank 0 knows every
                # entry; a tier node's leader prunes what is left before its commit)
                prune_unplanned(self.storage, target.dir, self._recycled, plan.entries)
            self._stage_and_write(plan, target.dir)
        except BaseException as e:  # noqa: BLE001 - reported through the handle
            local_error = e
            self.shared.cancel.set()
        finally:
            self.shared.staged.set()
            # sources may be released now: nothing reads them any more
            self.prep.tensors = []
        error: BaseException | None = None
        try:
            self._commit(local_error, target)
        except BaseException as e:  # noqa: BLE001
            error = e
        finally:
            self.stats.total_s = time.perf_counter() - self.t_call
            self.stats.pool_peak_bytes = pool.peak
            self.stats.pool_wait_s = pool.wait_s - wait0
            self._complete(error)

    def _agree_on_dir(self) -> WriteTarget:
        """Rank 0 checks the target and picks the write directory; everyone learns it."""
        decision: dict[str, Any] = {}
        if self.coord.rank == 0:
            try:
                if self.storage.exists(f"{self.name}/{MANIFEST}") and not self.overwrite:
                    raise CheckpointExistsError(
                        "a committed checkpoint already exists here", path=self.url,
                        hint="save under another step/name, or pass overwrite=True")
                decision["target"] = self.committer.target(self.name)
                decision["save_id"] = os.urandom(8).hex()
                if self.storage.capabilities.atomic_rename:
                    # a tree retention retired becomes the write directory (files overwritten in place)
                    self._recycled = take_recycled(self.storage, decision["target"].dir)
                    decision["recycled"] = self._recycled is not None
            except BaseException as e:  # noqa: BLE001
                decision["error"] = e
        decision = self.coord.broadcast(decision)
        if "error" in decision:
            err = decision["error"]
            raise err if isinstance(err, BaseException) else CheckpointError(str(err), path=self.url)
        self.in_recycled = bool(decision.get("recycled"))
        self.save_id = decision["save_id"]
        if isinstance(self.committer, NodeCommit):  # a storage per node: each node's leader takes its slot
            if self.committer.leader and self.coord.rank != 0:
                self._recycled = take_recycled(self.storage, decision["target"].dir)
            self.coord.barrier()  # nobody writes before its node's slot became the write directory
            self.in_recycled = True  # may be, on this node: a write must expect an older tree
        return decision["target"]

    def _plan(self) -> RankPlan:
        pieces = []
        for it in self.prep.tensors:
            offs, sizes = it.box
            meta = PieceMeta(it.key, dtype_name(it.tensor.dtype, it.key), it.shape, offs, sizes)
            pieces.append((meta, it.sharding, it.offsets is None and it.global_shape is None))
        cache = self.plan_cache.get("last")
        local = LocalPieces(pieces, list(self.prep.rank_values), rank=self.coord.rank,
                            world=self.coord.world_size, cfg=self.options.plan_config(),
                            failed=self._early_error is not None, cached=cache)
        try:
            t0 = time.perf_counter()
            plan, reused = plan_save(local, self.coord, where=self.url)
            self.stats.plan_s = time.perf_counter() - t0
        except DistributedSaveError:
            if self._early_error is not None:
                raise self._early_error from None
            raise
        self.stats.plan_reused = reused
        if not reused:
            self.plan_cache.clear()
            self.plan_cache["last"] = (local.structure, plan)
        return plan

    def _units(self, plan: RankPlan, write_dir: str, direct: DirectWriter | None) -> list[WriteUnit]:
        local = {(it.key, it.box): it for it in self.prep.tensors}
        units: list[WriteUnit] = []
        pack_members: dict[str, list[tuple[torch.Tensor, int, tuple[str, Any]]]] = {}
        for a in plan.assignments:
            it = local[(a.key, a.box)]
            t = it.tensor
            if a.kind == "pack":
                pack_members.setdefault(a.path, []).append((t, a.pack_offset, (a.key, a.box)))
                continue
            assert a.layout is not None
            sd = storage_dtype(dtype_name(t.dtype))
            for offs, sizes in a.layout.shards_in(*self._region_box(a)):
                if math.prod(sizes) == 0:
                    continue
                base = self._region_box(a)[0]
                sl = tuple(slice(o - b, o - b + s) for o, b, s in zip(offs, base, sizes))
                view = t[sl] if t.dim() else t
                u = WriteUnit(a, (offs, sizes), [(view, 0, (a.key, a.box))],
                              view.numel() * view.element_size(), tuple(sizes), sd, a.path, a.key)
                if direct is not None and direct_ok(a):
                    u.image = shard_image(f"{write_dir}/{a.path}", a.layout, (offs, sizes), view.element_size())
                    u.storage_dtype = storage_torch_dtype(dtype_name(t.dtype))
                units.append(u)
        for path, nbytes, _keys in plan.packs:
            u = WriteUnit(None, ((0,), (nbytes,)), pack_members.get(path, []), nbytes, (nbytes,),
                          "uint8", path, f"pack {path}")
            if direct is not None:
                u.image = pack_image(f"{write_dir}/{path}", nbytes)
            units.append(u)
        return units

    @staticmethod
    def _region_box(a: Assignment) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if a.kind == "piece":
            return (0,) * len(a.box[0]), a.box[1]
        return a.box

    def _stage_and_write(self, plan: RankPlan, write_dir: str) -> None:
        # staged into its files' pages (the memory tier): the node's memory is its durability
        direct = DirectWriter.for_storage(self.storage, nice=self.shared.nice, durable=self.mapped is None)
        self.shared.direct = direct
        if direct is not None and self.mapped is not None:
            self.mapped.begin()
            self.shared.mapped = self.mapped
        try:
            units = self._units(plan, write_dir, direct)
            arrays = self._open_arrays(plan, write_dir, direct)
            writer_q: queue.Queue[WriteUnit | None] = queue.Queue()
            writer = Writer(self.shared, arrays, writer_q, write_dir)
            writer.start()
            try:
                stage(self.shared, units, writer_q)
            finally:
                writer_q.put(None)
                writer.join()
        finally:
            if direct is not None:
                direct.close()
                self.stats.rewritten_bytes = direct.rewritten_bytes
                self.stats.crc_reread_bytes = direct.crc_reread_bytes
        self.stats.staging_s = writer.staged_at - self.t_call if writer.staged_at else 0.0
        if writer.error is not None:
            raise writer.error
        # pickled values (rank 0): small objects, written whole
        if self.coord.rank == 0:
            for key, data in self.prep.pickles.items():
                self.storage.write_bytes(f"{write_dir}/objects/{key_to_path(key)}.pkl", data)
        if plan.rank_files:  # per-rank values: one object per rank, never in the manifest (O(W))
            self.storage.write_bytes(f"{write_dir}/{rank_object_path(self.coord.rank)}",
                                     rank_object(self.coord.rank, self.save_id, self.prep.rank_values))
        self.stats.write_s = time.perf_counter() - self.t_call - self.stats.staging_s
        self.stats.objects = len(units)

    def _open_arrays(self, plan: RankPlan, write_dir: str, direct: DirectWriter | None) -> dict[str, Any]:
        """Start opening every array/pack this rank writes (zarr.json by its owner only);
        returns futures, so staging does not wait for the metadata writes (the writer
        resolves each future before its first write). With direct writes the future is
        the write of zarr.json itself (nothing to write for arrays another rank creates):
        the files' bytes are encoded once per plan, and written in one task per writer
        thread."""
        futures: dict[str, Any] = {}
        cached = self.plan_cache.get("zarr_json")
        encoded: dict[str, bytes] = cached[1] if cached is not None and cached[0] is plan else {}
        jsons: dict[str, bytes] = {}  # direct writes: array path -> its zarr.json bytes
        for a in plan.assignments:
            if a.kind == "pack" or a.path in futures or a.path in jsons:
                continue
            assert a.layout is not None
            direct_here = direct is not None and direct_ok(a)
            if direct_here and not a.create:
                continue  # another rank writes its zarr.json
            if direct_here and a.path in encoded:
                jsons[a.path] = encoded[a.path]
                continue
            dt = plan.dtypes[a.key]
            meta = zarr_metadata(a.layout, storage_dtype(dt), {"ckpt": {"key": a.key, "dtype": dt}})
            if direct_here:
                jsons[a.path] = encoded[a.path] = encode_json(meta)
                continue
            futures[a.path] = open_for_write(self.storage, f"{write_dir}/{a.path}", meta, create=a.create,
                                             reused=self.in_recycled)
        for path, nbytes, members in plan.packs:
            if direct is not None and path in encoded:
                jsons[path] = encoded[path]
                continue
            meta = pack_metadata(nbytes, {"ckpt": {"pack": True, "keys": members}})
            if direct is not None:
                jsons[path] = encoded[path] = encode_json(meta)
                continue
            futures[path] = open_for_write(self.storage, f"{write_dir}/{path}", meta, create=True,
                                           reused=self.in_recycled)
        if direct is not None:
            self.plan_cache["zarr_json"] = (plan, encoded)
            items = list(jsons.items())
            n = min(direct.threads, len(items))
            for i in range(n):
                batch = items[i::n]
                fut = direct.submit(direct.write_jsons, [(f"{write_dir}/{p}/zarr.json", b) for p, b in batch])
                futures.update((p, fut) for p, _ in batch)
        return futures

    def _commit(self, local_error: BaseException | None, target: WriteTarget | None) -> None:
        """One fixed-size sum tells every rank whether all succeeded (and the bytes
        written); only on a failure do the failing ranks send their errors to rank 0.
        Rank 0 writes manifest.json last (the commit) and tells every rank."""
        t0 = time.perf_counter()
        try:
            total = self.coord.all_reduce_sum([int(local_error is not None), self.stats.bytes])
            got = (self.coord.gather_sparse(None if local_error is None else _portable(local_error))
                   if total[0] else [])
        except BaseException as e:  # a collective failed: a peer is gone
            raise DistributedSaveError("the commit could not hear from every rank", path=self.url,
                                       failures={self.coord.rank: e}) from (local_error or e)
        self.stats.total_bytes = total[1]
        outcome: dict[str, Any] = {"ok": True}
        if self.coord.rank == 0:
            assert got is not None
            if total[0]:
                outcome = {"ok": False, "failures": dict(got) or {-1: "a rank failed"}}
                self._cleanup(target)
            else:
                try:
                    plan = self._plan_obj
                    assert plan is not None and target is not None and plan.entries is not None
                    manifest = build_manifest(plan.entries, step=self.step, world_size=self.coord.world_size,
                                              total_bytes=total[1], values=self.prep.values,
                                              pickles=self.prep.pickles, user_metadata=self.user_metadata,
                                              prefix=target.prefix,
                                              rank_objects=(self.save_id, plan.rank_keys) if plan.rank_files
                                              else None)
                    if self._recycled is not None:
                        prune_recycled(self.storage, target.dir)
                    self.committer.commit(target, self.name, manifest.to_json(), overwrite=self.overwrite)
                except BaseException as e:  # noqa: BLE001
                    outcome = {"ok": False, "failures": {0: _portable(e)}}
                    self._cleanup(target)
        outcome = self.coord.broadcast(outcome)
        self.stats.commit_s = time.perf_counter() - t0
        if not outcome["ok"]:
            failures = outcome["failures"]
            mine = local_error
            if mine is None and self.coord.world_size == 1:
                mine = next(iter(failures.values()))
            if self.coord.world_size == 1 and isinstance(mine, BaseException):
                raise mine
            err = DistributedSaveError("the checkpoint was not committed: a rank failed", path=self.url,
                                       failures=failures)
            if isinstance(mine, BaseException):
                raise mine from err  # the original exception, with every rank's error attached
            raise err

    def _cleanup(self, target: WriteTarget | None) -> None:
        if target is None:  # the save stopped before it had a place to write
            return
        try:  # a failing cleanup must not replace the save's own error (nor skip the broadcast)
            self.committer.discard(target, self.name)
        except Exception:  # noqa: BLE001 - gc removes it later
            pass


def _portable(e: BaseException) -> BaseException | str:
    """The exception if it pickles (it travels to rank 0), else its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return "".join(traceback.format_exception_only(type(e), e)).strip()
