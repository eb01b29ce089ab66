"""Loading: providers schedule reads on a :class:`Loader`; it reads only the saved ranges
that overlap what each destination needs, many at once, with a bounded number of bytes
in flight, and checks every chunk's crc32c on the way (tensorstore's codec).

On local disk most array reads take the fast path of :mod:`ckpt._engine._direct`."""

from __future__ import annotations

import collections
import concurrent.futures
import math
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ckpt._engine._arrays import translate
from ckpt._engine._confine import refuse_symlinks
from ckpt._engine._direct import DirectReader, chunk_elements, direct_target
from ckpt._engine._layout import PieceIndex, array_layout, pack_image, pack_length, piece_layout
from ckpt._engine._plan import ArrayLayout, pack_metadata, zarr_metadata
from ckpt._engine._undo import UndoLog
from ckpt._format import (
    Box,
    Manifest,
    check_relpath,
    chunk_separator,
    parse_rank_object,
    rank_object_path,
    storage_dtype,
    storage_torch_dtype,
    torch_dtype,
)
from ckpt._values import decode_value
from ckpt.errors import (
    CorruptCheckpointError,
    DtypeMismatchError,
    InsufficientMemoryError,
    MissingKeyError,
    PickleNotAllowedError,
    ReshardError,
    ShapeMismatchError,
    UnexpectedKeyError,
    UnsupportedStateError,
)
from ckpt.storage import Storage

_MISSING = object()


@dataclass
class _Read:
    key: str
    dest: torch.Tensor  # local destination (any device)
    box: Box  # global region the destination covers
    fresh: bool = False  # a tensor the loader made (read_new): nothing of the caller's to restore


@dataclass
class LoadStats:
    bytes_read: int = 0  # bytes of tensor data delivered to destinations
    bytes_fetched: int = 0  # bytes of the stored chunks read (>= bytes_read with partial chunks)
    reads: int = 0
    bytes_direct: int = 0  # of bytes_read: read straight into destinations (local fast path)
    read_s: float = 0.0
    total_s: float = 0.0
    skipped: list[str] = field(default_factory=list)  # top-level objects of the checkpoint not asked for
    unexpected: list[str] = field(default_factory=list)  # keys of asked-for objects the state lacks (allowed)
    missing: list[str] = field(default_factory=list)  # keys the state has and the checkpoint lacks (allowed)
    cast: list[str] = field(default_factory=list)  # keys read into another dtype than saved (cast=True)
    backup_bytes: int = 0  # host memory that held the caller's old values during the load (all or nothing)


class Loader:
    """The LoadSource of ckpt.providers, over one committed checkpoint.

    ``strict=False`` allows both directions of mismatch; ``allow_missing`` (keys the state
    has and the checkpoint lacks: left as they are) and ``allow_unexpected`` (keys of an
    asked-for object the state lacks: not loaded) allow one. ``cast``: read a tensor saved
    in another dtype than its destination's, converting (else DtypeMismatchError).

    ``rollback`` (``ckpt.load``'s): before the first byte of a read lands, each of the
    caller's destinations is copied to host memory; :meth:`rollback` puts those copies
    back (and runs the providers' :meth:`on_rollback` undos), so a load that fails part
    way leaves the caller's objects as they were."""

    def __init__(self, storage: Storage, name: str, manifest: Manifest, *, strict: bool = True,
                 allow_missing: bool | None = None, allow_unexpected: bool | None = None, cast: bool = False,
                 allow_pickle: bool = False, rank: int = 0, world_size: int = 1,
                 inflight_bytes: int = 1 << 30, rollback: bool = False) -> None:
        self.storage = storage
        self.name = name
        self.manifest = manifest
        self._separator = chunk_separator(manifest.format_version)
        self.allow_missing = not strict if allow_missing is None else allow_missing
        self.allow_unexpected = not strict if allow_unexpected is None else allow_unexpected
        self.strict = not (self.allow_missing or self.allow_unexpected)
        self.cast = cast
        self.allow_pickle = allow_pickle
        self.rank = rank
        self.world_size = world_size
        self.where = storage.describe(name)
        self.inflight_bytes = inflight_bytes
        self._reads: list[_Read] = []
        self._used: set[str] = set()
        self.stats = LoadStats()
        self._arrays: dict[str, Any] = {}
        self._packs: dict[str, np.ndarray] = {}
        self._rank_cache: dict[int, dict[str, Any]] = {}
        self._piece_index: dict[str, PieceIndex] = {}
        self._undo = UndoLog(rollback)

    # -- all or nothing (ckpt._engine._undo) ---------------------------------
    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Register what undoes a change a provider made to the caller's objects before
        the reads (run, newest first, by :meth:`rollback`)."""
        self._undo.on_rollback(undo)

    def rollback(self) -> None:
        """Put the caller's objects back as they were before this load (after a failure)."""
        self._undo.rollback()

    # -- LoadSource ---------------------------------------------------------
    def has(self, key: str) -> bool:
        ro = self.manifest.rank_objects
        if ro is not None:
            return key in self.manifest.entries or key in ro["keys"]
        return key in self.manifest.entries or any(key in rs for rs in self.manifest.rank_state.values())

    def rank_values(self, rank: int) -> dict[str, Any]:
        """Rank ``rank``'s per-rank values of the save (format 3: its own object, read once
        and checked; before: the manifest's ``rank_state``)."""
        ro = self.manifest.rank_objects
        if ro is None:
            return self.manifest.rank_state.get(str(rank), {})
        if rank in self._rank_cache:
            return self._rank_cache[rank]
        if not 0 <= rank < self.manifest.world_size:
            return {}
        path = check_relpath(rank_object_path(rank, ro["path"]), what="per-rank object")
        refuse_symlinks(self.storage, self.name, path, None)
        where = self.storage.describe(f"{self.name}/{path}")
        try:
            data = self.storage.read_bytes(f"{self.name}/{path}")
        except FileNotFoundError:
            raise CorruptCheckpointError(f"rank {rank}'s per-rank values object is missing", path=where,
                                         hint="load an earlier checkpoint") from None
        values = parse_rank_object(data, rank, ro["id"], where=where)
        self._rank_cache[rank] = values
        return values

    def keys(self, prefix: str = "") -> list[str]:
        p = prefix.rstrip("/") + "/" if prefix else ""
        return sorted(k for k in self.manifest.entries if k.startswith(p) or k == prefix)

    def entry(self, key: str) -> dict[str, Any]:
        try:
            return self.manifest.entries[key]
        except KeyError:
            raise MissingKeyError("the checkpoint has no entry for this key", key=key, path=self.where,
                                  hint="check the state's keys against `ckpt info`, or load with strict=False") from None

    def top_level(self) -> list[str]:
        """The checkpoint's top-level objects (the keys its state dict had)."""
        return sorted({k.split("/", 1)[0] for k in self.manifest.entries})

    def _keys_hint(self) -> str:
        return (f"the checkpoint holds {', '.join(repr(k) for k in self.top_level()[:12])}; an imported "
                "state dict is under the --prefix it was imported with (`ckpt info` lists the keys)")

    def missing(self, key: str) -> None:
        if not self.allow_missing:
            raise MissingKeyError("the state has a key that the checkpoint lacks", key=key, path=self.where,
                                  hint=f"{self._keys_hint()}; or load with allow_missing=True to leave it as it is")
        self.stats.missing.append(key)

    def unexpected(self, key: str, message: str, hint: str) -> None:
        """An asked-for object's saved key the state has no place for: an error unless allowed."""
        if not self.allow_unexpected:
            raise UnexpectedKeyError(message, key=key, path=self.where, hint=hint)
        self.stats.unexpected.append(key)

    def raw(self, key: str, *, per_rank: bool = False, rank: int | None = None, default: Any = _MISSING) -> Any:
        if per_rank:
            r = self.rank if rank is None else rank
            if self.world_size != self.manifest.world_size and rank is None and default is _MISSING:
                raise ReshardError(
                    f"per-rank value saved on {self.manifest.world_size} ranks, loading on {self.world_size}",
                    key=key, path=self.where,
                    hint="give this state a resharding policy (see docs/format.md, 'Per-rank state') "
                         "or drop it from the state before loading")
            ranks = self.rank_values(r)
            if key not in ranks:
                if default is not _MISSING:
                    self._used.add(key)
                    return default
                raise MissingKeyError(f"rank {r} has no saved value for this key", key=key, path=self.where)
            self._used.add(key)
            return ranks[key]
        e = self.entry(key)
        self._used.add(key)
        if e["kind"] == "json":
            return e["value"]
        if e["kind"] == "pickle":
            return {"__ckpt__": "object", "key": key}
        raise ShapeMismatchError("this key holds a tensor, not a value", key=key, path=self.where)

    def value(self, key: str, *, per_rank: bool = False, rank: int | None = None, default: Any = _MISSING) -> Any:
        if not per_rank and self.entry(key)["kind"] == "pickle":
            return self._unpickle(key)
        v = self.raw(key, per_rank=per_rank, rank=rank, default=default)
        return v if v is default else decode_value(v)

    def _unpickle(self, key: str) -> Any:
        e = self.entry(key)
        self._used.add(key)
        if not self.allow_pickle:
            raise PickleNotAllowedError("this value was saved with pickle, which runs code when loaded",
                                        key=key, path=self.where,
                                        hint="pass allow_pickle=True to load only if you trust this checkpoint")
        path = check_relpath(e["path"], key=key)
        refuse_symlinks(self.storage, self.name, path, key)
        try:
            data = self.storage.read_bytes(f"{self.name}/{path}")
        except FileNotFoundError:
            raise CorruptCheckpointError("a pickled value's object is missing", key=key,
                                         path=self.storage.describe(f"{self.name}/{path}")) from None
        return pickle.loads(data)

    def _tensor_entry(self, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> dict[str, Any]:
        e = self.entry(key)
        if e["kind"] != "tensor":
            raise ShapeMismatchError("this key holds a value, not a tensor", key=key, path=self.where)
        saved_dtype = torch_dtype(e["dtype"], key)
        if saved_dtype != dtype:
            if not self.cast:
                raise DtypeMismatchError(f"saved as {saved_dtype}, loading into {dtype}", key=key, path=self.where,
                                         hint="build the model with the saved dtype, or load with cast=True "
                                              "to convert on the way")
            if key not in self.stats.cast:
                self.stats.cast.append(key)
        if tuple(e["shape"]) != tuple(shape):
            raise ShapeMismatchError(f"saved shape {list(e['shape'])}, loading into {list(shape)}",
                                     key=key, path=self.where,
                                     hint="build the model with the same configuration as the saved one")
        return e

    def read_into(self, key: str, dest: torch.Tensor, offsets: tuple[int, ...] | None = None,
                  global_shape: tuple[int, ...] | None = None) -> None:
        shape = tuple(global_shape if global_shape is not None else dest.shape)
        self._tensor_entry(key, dest.dtype, shape)
        if dest.device.type == "meta":
            raise UnsupportedStateError("cannot load into a meta tensor: it has no storage", key=key, path=self.where,
                                        hint="materialise the module first (module.to_empty(device=...)), then load")
        if dest.numel() > 1 and any(st == 0 and n > 1 for st, n in zip(dest.stride(), dest.shape)):
            raise UnsupportedStateError(
                f"cannot load into a tensor whose elements share memory (stride {list(dest.stride())} of shape "
                f"{list(dest.shape)}, e.g. made by expand()): one saved value would overwrite another",
                key=key, path=self.where, hint="pass a real tensor of that shape (tensor.clone() or torch.empty)")
        offs = tuple(offsets) if offsets is not None else (0,) * dest.dim()
        if len(offs) != len(shape) or any(o + s > d for o, s, d in zip(offs, dest.shape, shape)):
            raise ShapeMismatchError(f"box {list(offs)}+{list(dest.shape)} lies outside {list(shape)}",
                                     key=key, path=self.where)
        self._used.add(key)
        self._reads.append(_Read(key, dest, (offs, tuple(dest.shape))))

    def read_new(self, key: str, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
        e = self.entry(key)
        if e["kind"] != "tensor":
            raise ShapeMismatchError("this key holds a value, not a tensor", key=key, path=self.where)
        t = _allocate(key, tuple(e["shape"]), torch_dtype(e["dtype"], key), device or "cpu", self.where)
        self.read_into(key, t)
        self._reads[-1].fresh = True
        return t if dtype is None else t  # conversion is the caller's business

    def unused_keys(self) -> list[str]:
        return sorted(set(self.manifest.entries) - self._used)

    def check_unexpected(self, asked: set[str] | None = None) -> None:
        """After every provider scheduled its reads. Top-level objects of the checkpoint
        that the state does not ask for (``asked``: the state's top-level keys) are skipped
        and reported in ``stats.skipped`` (a model loaded alone from a training checkpoint);
        leftovers of an object the state does ask for are unexpected: an error unless
        allowed, then reported. A load that matched nothing is always an error."""
        extra = self.unused_keys()
        if asked is not None and self.manifest.entries and not self._used:
            raise MissingKeyError(f"the state ({', '.join(repr(k) for k in sorted(asked)[:8])}) matches "
                                  "nothing in the checkpoint", key=next(iter(sorted(asked)), None),
                                  path=self.where, hint=self._keys_hint())
        if asked is not None:
            self.stats.skipped = sorted({k.split("/", 1)[0] for k in extra} - asked)
            extra = [k for k in extra if k.split("/", 1)[0] in asked]
        if extra and not self.allow_unexpected:
            raise UnexpectedKeyError(
                f"the checkpoint holds {len(extra)} entries the state does not ask for: {extra[:5]}",
                key=extra[0], path=self.where,
                hint="add the missing objects to the state, or load with allow_unexpected=True")
        self.stats.unexpected.extend(extra)

    # -- execution -------------------------------------------------------------
    def execute(self) -> LoadStats:
        """Run every read scheduled since the last call; returns when all their
        destinations are filled (the loader may then schedule and execute more)."""
        t0 = time.perf_counter()
        reads, self._reads = self._reads, []
        jobs = self._jobs(reads)
        self._open([(p, lay, self.manifest.entries[r.key]) for r, p, _, _, lay in jobs])
        self._undo.keep(r.dest for r in reads if not r.fresh)  # before the first byte lands
        self.stats.backup_bytes = self._undo.nbytes
        direct = DirectReader.for_storage(self.storage, self.name)  # None: tensorstore reads only
        window: collections.deque[tuple[Any, _Read, str, Box, Box, int]] = collections.deque()
        inflight = 0
        try:
            for r, path, src, sub, layout in jobs:
                target = None if layout is None else direct_target(r.dest, sub, self.manifest.entries[r.key]["dtype"])
                runs = direct.plan(r.key, path, src, layout, target) if direct and layout and target is not None \
                    else None
                for run in runs or ():  # direct reads: preadv into the destination, crc32c checked
                    while window and inflight + run.dest_bytes > self.inflight_bytes:
                        inflight -= self._complete(window.popleft())
                    assert direct is not None
                    self.stats.bytes_fetched += run.nbytes
                    window.append((direct.submit(run), r, path, src, sub, run.dest_bytes))
                    inflight += run.dest_bytes
                    self.stats.reads += 1
                if runs:
                    continue
                nbytes = math.prod(src[1]) * r.dest.element_size()
                while window and inflight + nbytes > self.inflight_bytes:
                    inflight -= self._complete(window.popleft())
                if layout is None:
                    window.append((None, r, path, src, sub, nbytes))
                else:
                    region = self._arrays[path][tuple(slice(o, o + s) for o, s in zip(src[0], src[1]))]
                    fut: Any
                    if target is not None:  # tensorstore decodes straight into the destination
                        import tensorstore as ts

                        fut = _Direct(ts.array(target, copy=False, write=True).write(region), target)
                    else:
                        fut = region.read()
                    self.stats.bytes_fetched += chunk_elements(layout, src) * r.dest.element_size()
                    window.append((fut, r, path, src, sub, nbytes))
                inflight += nbytes
                self.stats.reads += 1
            while window:
                self._complete(window.popleft())
        finally:
            if direct is not None:
                direct.close()
            for item in window:  # a read failed: nothing may still write into a destination
                _settle(item[0])
        self.stats.read_s = time.perf_counter() - t0
        if any(r.dest.device.type == "cuda" for r in reads):
            torch.cuda.synchronize()
        return self.stats

    def _jobs(self, reads: list[_Read]) -> list[tuple[_Read, str, Box, Box, ArrayLayout | None]]:
        """(read, array or pack path, source region in it, destination sub-box) per stored
        array a read touches: O(the reads x the pieces each overlaps)."""
        jobs: list[tuple[_Read, str, Box, Box, ArrayLayout | None]] = []
        for r in reads:
            e = self.manifest.entries[r.key]
            st = e["storage"]
            if math.prod(r.box[1]) == 0:
                continue
            if st["layout"] == "array":
                lay = array_layout(r.key, tuple(e["shape"]), st, self._separator)
                jobs.append((r, lay.path, r.box, ((0,) * len(r.box[0]), r.box[1]), lay))
            elif st["layout"] == "packed":
                jobs.append((r, check_relpath(st["path"], key=r.key), r.box, ((0,) * len(r.box[0]), r.box[1]), None))
            else:
                jobs.extend(self._piece_jobs(r, e))
        return jobs

    def _piece_jobs(self, r: _Read, e: dict[str, Any]) -> list[tuple[_Read, str, Box, Box, ArrayLayout | None]]:
        out: list[tuple[_Read, str, Box, Box, ArrayLayout | None]] = []
        need_o, need_s = r.box
        covered = 0
        for p in self._pieces_overlapping(r.key, e, r.box):
            po, ps = tuple(p["offsets"]), tuple(p["sizes"])
            lo = tuple(max(a, b) for a, b in zip(need_o, po))
            hi = tuple(min(a + s, b + t) for a, s, b, t in zip(need_o, need_s, po, ps))
            if any(h <= lo_ for lo_, h in zip(lo, hi)):
                continue
            size = tuple(h - lo_ for lo_, h in zip(lo, hi))
            covered += math.prod(size)
            lay = piece_layout(r.key, p, self._separator)
            src = (tuple(a - b for a, b in zip(lo, po)), size)
            sub = (tuple(a - b for a, b in zip(lo, need_o)), size)
            out.append((r, lay.path, src, sub, lay))
        if covered < math.prod(need_s):
            raise ReshardError("the saved pieces do not cover the requested region", key=r.key, path=self.where,
                               hint="the checkpoint is incomplete or damaged")
        return out

    def _pieces_overlapping(self, key: str, e: dict[str, Any], box: Box) -> list[dict[str, Any]]:
        index = self._piece_index.get(key)
        if index is None:
            index = self._piece_index[key] = PieceIndex(e["storage"]["pieces"])
        return index.meeting(box)

    def _open(self, wanted: list[tuple[str, ArrayLayout | None, dict[str, Any]]]) -> None:
        """Open every array once, from the manifest's metadata (no zarr.json reads)."""
        import tensorstore as ts

        futs = {}
        ctx = self.storage.ts_context()
        for path, lay, e in wanted:
            if path in self._arrays or path in futs:
                continue
            refuse_symlinks(self.storage, self.name, path, None)
            if lay is None:
                continue  # packs are read whole below
            meta = zarr_metadata(lay, storage_dtype(e["dtype"]), {})
            spec = {"driver": "zarr3", "kvstore": self.storage.kvstore_spec(f"{self.name}/{path}"), "metadata": meta,
                    "fill_missing_data_reads": False}  # a deleted object is an error, not zeros
            futs[path] = ts.open(spec, open=True, assume_metadata=True, context=ctx)
        packs = {path for path, lay, _ in wanted if lay is None and path not in self._packs}
        pack_futs = {}
        for path in packs:
            nbytes = pack_length(self.manifest.entries, path)
            self._check_pack_size(path, nbytes)  # before tensorstore allocates what the manifest says
            spec = {"driver": "zarr3", "kvstore": self.storage.kvstore_spec(f"{self.name}/{path}"),
                    "metadata": pack_metadata(nbytes, {}, self._separator), "fill_missing_data_reads": False}
            pack_futs[path] = ts.open(spec, open=True, assume_metadata=True, context=ctx)
        for path, f in futs.items():
            self._arrays[path] = self._result(f, path, None)
        reads = {p: self._result(f, p, None).read() for p, f in pack_futs.items()}
        for path, f in reads.items():
            self._packs[path] = self._result(f, path, self._pack_members(path))  # name the keys a bad pack holds
            self.stats.bytes_fetched += self._packs[path].nbytes

    def _pack_members(self, path: str) -> str | None:
        return ", ".join(k for k, e in self.manifest.entries.items()
                         if (e.get("storage") or {}).get("path") == path) or None

    def _check_pack_size(self, path: str, nbytes: int) -> None:
        """A pack is read whole: its object must hold exactly the bytes the manifest implies."""
        obj = pack_image(f"{self.name}/{path}", nbytes, self._separator)
        where = self.storage.describe(obj.file)
        try:
            size = self.storage.size(obj.file)
        except (FileNotFoundError, NotADirectoryError):
            raise CorruptCheckpointError("stored data is missing (the pack's object is not there)",
                                         key=self._pack_members(path), path=where,
                                         hint="an object of the checkpoint was deleted; load an earlier checkpoint") \
                from None
        except OSError as e:
            raise translate(e, key=self._pack_members(path), where=where, reading=True) from e
        if size != obj.nbytes:
            raise CorruptCheckpointError(f"the pack's object holds {size} bytes, its manifest entries imply "
                                         f"{obj.nbytes} (truncated, overwritten, or a damaged manifest)",
                                         key=self._pack_members(path), path=where,
                                         hint="the checkpoint is damaged; load an earlier checkpoint")

    def _result(self, fut: Any, path: str, key: str | None) -> Any:
        try:
            return fut.result()
        except Exception as e:
            raise translate(e, key=key, where=self.storage.describe(f"{self.name}/{path}"), reading=True) from e

    def _complete(self, item: tuple[Any, _Read, str, Box, Box, int]) -> int:
        fut, r, path, src, sub, nbytes = item
        e = self.manifest.entries[r.key]
        if fut is None:
            st = e["storage"]
            raw = self._packs[path][st["offset"]:st["offset"] + st["nbytes"]]
            full = torch.from_numpy(raw.copy() if not raw.flags.writeable else raw).view(torch_dtype(e["dtype"]))
            full = full.reshape(tuple(e["shape"]))
            data = full[tuple(slice(o, o + s) for o, s in zip(src[0], src[1]))] if full.dim() else full
        elif isinstance(fut, concurrent.futures.Future):  # a direct read
            fut.result()  # raises the worker's CorruptCheckpointError as it is
            self.stats.bytes_read += nbytes
            self.stats.bytes_direct += nbytes
            return nbytes
        elif isinstance(fut, _Direct):
            self._result(fut.write, path, r.key)
            self.stats.bytes_read += nbytes
            return nbytes
        else:
            arr = self._result(fut, path, r.key)
            t = torch.from_numpy(np.ascontiguousarray(arr))
            sdt = storage_torch_dtype(e["dtype"])
            if t.dtype != sdt:
                t = t.view(sdt)
            data = t.view(torch_dtype(e["dtype"]))
        dest = r.dest[tuple(slice(o, o + s) for o, s in zip(sub[0], sub[1]))] if r.dest.dim() else r.dest
        with torch.no_grad():
            dest.copy_(data.reshape(dest.shape), non_blocking=dest.device.type == "cuda")
        self.stats.bytes_read += nbytes
        return nbytes


@dataclass
class _Direct:
    """A read that tensorstore writes straight into (a view of) the destination."""

    write: Any  # tensorstore WriteFutures
    target: np.ndarray  # keeps the destination's numpy view alive until the write is done


def _settle(fut: Any) -> None:
    """Wait for a read of an abandoned load to finish, whatever its outcome."""
    try:
        if isinstance(fut, _Direct):
            fut.write.result()
        elif fut is not None and hasattr(fut, "result"):
            fut.result()
    except Exception:  # noqa: BLE001 - the load's first error is the one raised
        pass


def _allocate(key: str, shape: tuple[int, ...], dtype: torch.dtype, device: Any, where: str) -> torch.Tensor:
    """A new tensor of a saved entry's shape; a shape this host cannot hold is a typed error."""
    try:
        return torch.empty(shape, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as e:  # torch's allocators raise RuntimeError (OutOfMemoryError)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        raise InsufficientMemoryError(f"cannot allocate {nbytes} bytes for a saved tensor of shape "
                                      f"{list(shape)} ({e.__class__.__name__})", key=key, path=where,
                                      hint="read it on a host with more memory, or leave this key out "
                                           "(--only / a state without it); if the size is absurd, the "
                                           "checkpoint is damaged or hostile") from None
