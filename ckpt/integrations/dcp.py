"""ckpt as a storage layer of ``torch.distributed.checkpoint`` (DCP).

``dcp.save(state, storage_writer=CkptWriter(url))``, ``dcp.async_save(...)`` and
``dcp.load(state, storage_reader=CkptReader(url))`` write and read ckpt's format: zarr v3
arrays with a crc32c per chunk, committed atomically (the manifest last), on local disk
or S3. So every DCP-based framework (torchtitan, accelerate's FSDP path, Lightning's FSDP
strategy) gets ckpt by passing a writer and a reader.

What DCP plans is what ckpt saves: each rank hands the pieces of its own state (DTensor
and FSDP2 shards in global coordinates, plain tensors, values) to ``ckpt.save`` on DCP's
ranks; ckpt writes each replicated piece once and commits. The layout is the one
``ckpt import`` gives a DCP checkpoint, so ``ckpt.load({"model": m, "optim": opt}, url)``
loads a DCP-written checkpoint into a live model and optimizer (name-keyed optimizer
state, as ``get_state_dict`` returns it), and the CLI reads it. The reader serves any
ckpt checkpoint to ``dcp.load`` (one written by ``ckpt.save`` too): each rank reads only
the boxes its new layout needs, every chunk checked, on any world size.

Non-tensor values are stored as JSON values; one that is not JSON-able needs
``allow_pickle=True`` on both sides (DCP pickles every value). Per-rank values of a
ckpt-native checkpoint (ckpt's RNG states) have no DCP equivalent and are not offered.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ckpt._api import open_loader
from ckpt._format import Manifest, parse_step_dirname, torch_dtype
from ckpt.errors import CheckpointError, UnsupportedStateError
from ckpt.providers import Leaves, LoadSource, component, place

__all__ = ["CkptWriter", "CkptReader"]


class _Reader(LoadSource, Protocol):
    """What :class:`CkptReader` uses of the engine's reader (:func:`ckpt._api.open_loader`)."""

    manifest: Manifest

    def execute(self) -> Any: ...


def _checkpoint_url(url: str | None, who: str) -> str:
    if not url:
        raise CheckpointError(f"{who} has no checkpoint URL", hint=f"pass {who}(url) or checkpoint_id=url to DCP")
    return url


class _Located:
    """Where a writer or reader points: its URL, which DCP's ``checkpoint_id`` replaces."""

    url: str | None

    @property
    def checkpoint_id(self) -> str | None:
        return self.url

    def _point(self, checkpoint_id: str | os.PathLike[str] | None) -> None:
        if checkpoint_id is not None:
            self.url = os.fspath(checkpoint_id)


class CkptWriter(_Located, StorageWriter):
    """A DCP ``StorageWriter`` that saves in ckpt's format.

    ``url``: the checkpoint (a directory or ``s3://bucket/...``; DCP's ``checkpoint_id``
    replaces it). A name ``step-<n>`` records step n. ``overwrite``: replace a committed
    checkpoint (else :class:`~ckpt.errors.CheckpointExistsError`). ``process_group``: the
    group given to ``dcp.save`` (default: the default group). ``allow_pickle``: store
    non-JSON values pickled. ``storage_options``: as for ``ckpt.save``."""

    def __init__(self, url: str | os.PathLike[str] | None = None, *, overwrite: bool = False,
                 process_group: Any = None, allow_pickle: bool = False,
                 storage_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.url = os.fspath(url) if url is not None else None
        self.overwrite = overwrite
        self.process_group = process_group
        self.allow_pickle = allow_pickle
        self.storage_options = storage_options
        self._local_plan: SavePlan | None = None
        self._collectives = True

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self._point(checkpoint_id)
        self._local_plan = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._collectives = bool(kwargs.get("use_collectives", True))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self._local_plan = plan  # every piece this rank has, before DCP's dedup of replicas
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        import ckpt

        url = _checkpoint_url(self.url, type(self).__name__)
        mine = self._local_plan if self._local_plan is not None else plan
        dist = self._collectives and torch.distributed.is_available() and torch.distributed.is_initialized()
        # The pieces are resolved inside the save (the provider's items), so that a rank
        # failing there still takes part in ckpt's collectives and every rank raises.
        ckpt.save({"dcp": _PlannedState(mine, planner, url, self.allow_pickle)}, url,
                  step=parse_step_dirname(url.rstrip("/").rsplit("/", 1)[-1]), overwrite=self.overwrite,
                  allow_pickle=self.allow_pickle, storage_options=self.storage_options,
                  process_group=self.process_group if dist else False,
                  metadata={"written_by": "torch.distributed.checkpoint"})
        results = [WriteResult(index=it.index, size_in_bytes=_nbytes(it), storage_data=None) for it in plan.items]
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Nothing left: ckpt committed the checkpoint (manifest last) once every rank's
        pieces were durable; its manifest is the metadata ``CkptReader`` serves."""

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.url) if self.url else None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, str | os.PathLike)


def _nbytes(item: Any) -> int:
    if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
        return 0
    n = 1
    for s in item.tensor_data.chunk.sizes:
        n *= int(s)
    return n * item.tensor_data.properties.dtype.itemsize


class _PlannedState:
    """The provider of one rank's DCP plan: its pieces at the keys ``ckpt import`` gives
    them (DCP's object paths joined by ``/``; name-keyed optimizer states as ckpt saves
    optimizers), each tensor piece placed in its global tensor."""

    def __init__(self, plan: SavePlan, planner: SavePlanner, url: str, allow_pickle: bool) -> None:
        self.plan = plan
        self.planner = planner
        self.url = url
        self.allow_pickle = allow_pickle

    def items(self) -> Iterator[Any]:
        mappings = getattr(self.planner, "mappings", None) or {}
        tree: dict[str, Any] = {}
        boxes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        seen: set[str] = set()
        for it in self.plan.items:
            fqn = it.index.fqn
            if fqn in seen:
                raise UnsupportedStateError("this rank holds several pieces of one tensor (a ShardedTensor "
                                            "with more than one local shard)", key=fqn, path=self.url,
                                            hint="use DTensor (FSDP2 / tensor parallel) state, one piece per rank")
            seen.add(fqn)
            path = tuple(mappings.get(fqn, (fqn,)))
            if it.type == WriteItemType.BYTE_IO:
                place(tree, path, self._value(it))
                continue
            data = self.planner.resolve_data(it)
            assert isinstance(data, torch.Tensor) and it.tensor_data is not None
            place(tree, path, data)
            td = it.tensor_data
            if tuple(td.size) != tuple(data.shape):
                boxes["/".join(component(p) for p in path)] = (tuple(int(s) for s in td.size),
                                                                tuple(int(o) for o in td.chunk.offsets))
        yield from Leaves.of_tree(tree, boxes).items()

    def _value(self, it: Any) -> Any:
        lookup = getattr(self.planner, "lookup_object", None)
        if lookup is not None:
            return lookup(it.index)
        data = self.planner.resolve_data(it)
        assert isinstance(data, io.BytesIO)
        data.seek(0)
        return torch.load(data, weights_only=not self.allow_pickle)

    def load(self, src: Any) -> None:
        raise UnsupportedStateError("a DCP plan is only saved through CkptWriter", hint="load with CkptReader")


def _decode(c: str) -> str:
    """A key component back to DCP's path element (``component``'s inverse for strings)."""
    return "" if c == "%00" else c.replace("%2F", "/").replace("%25", "%")


@dataclass(frozen=True)
class _Pickled:
    """A pickled value of the checkpoint: unpickled only if DCP asks for it."""

    key: str


class _Placeholders:
    """The ``LoadSource`` a structure is rebuilt against to find its tensors: each tensor
    becomes a meta tensor (no memory) whose checkpoint key is remembered."""

    def __init__(self, loader: _Reader) -> None:
        self.loader = loader
        self.strict = False
        self.where = loader.where
        self.keys_of: dict[int, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def read_new(self, key: str, device: Any = None, dtype: Any = None) -> torch.Tensor:
        e = self.loader.entry(key)
        t = torch.empty(tuple(e["shape"]), dtype=torch_dtype(e["dtype"], key), device="meta")
        self.keys_of[id(t)] = key
        return t

    def value(self, key: str, **kwargs: Any) -> Any:
        if self.loader.entry(key)["kind"] == "pickle":
            return _Pickled(key)
        return self.loader.value(key, **kwargs)


class CkptReader(_Located, StorageReader):
    """A DCP ``StorageReader`` over a ckpt checkpoint (written by :class:`CkptWriter` or
    ``ckpt.save``). ``url`` as for :class:`CkptWriter`; ``allow_pickle``: unpickle values
    saved with pickle when DCP asks for them. From the manifest's first read to the end
    of ``read_data`` it holds the checkpoint as ``ckpt.load`` does (the reader lock: a
    recycling retention deletes it instead of overwriting its files)."""

    def __init__(self, url: str | os.PathLike[str] | None = None, *, allow_pickle: bool = False,
                 storage_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.url = os.fspath(url) if url is not None else None
        self.allow_pickle = allow_pickle
        self.storage_options = storage_options
        self._loader: _Reader | None = None
        self._hold = contextlib.ExitStack()  # the reader lock while a load is under way
        self._keys: dict[str, str] = {}
        self._values: dict[str, Any] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self._release()
        self._point(checkpoint_id)

    def _open(self) -> _Reader:
        if self._loader is None:
            url = _checkpoint_url(self.url, type(self).__name__)
            hold = contextlib.ExitStack()  # open_loader lets go by itself where the manifest fails
            self._loader = hold.enter_context(open_loader(url, allow_pickle=self.allow_pickle,
                                                          storage_options=self.storage_options))
            self._hold = hold
        return self._loader

    def _release(self) -> None:
        """The load is over (or abandoned): let the checkpoint go."""
        self._loader = None
        self._hold.close()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict

        from ckpt.providers._tree import unflatten

        loader = self._open()
        src = _Placeholders(loader)
        tree: dict[str, Any] = {}
        entries = loader.manifest.entries
        values = [k for k, e in entries.items() if e["kind"] != "tensor"]
        for key in sorted(values):  # structures first: they claim the tensors they hold
            raw = loader.raw(key) if entries[key]["kind"] == "json" else {"__ckpt__": "object", "key": key}
            place(tree, [_decode(c) for c in key.split("/")], unflatten(raw, src, None, []))
        held = set(src.keys_of.values())
        for key in sorted(k for k, e in entries.items() if e["kind"] == "tensor" and k not in held):
            place(tree, [_decode(c) for c in key.split("/")], src.read_new(key))
        flat, mappings = flatten_state_dict(tree)
        md: dict[str, Any] = {}
        self._keys, self._values = {}, {}
        for fqn, leaf in flat.items():
            if isinstance(leaf, torch.Tensor) and id(leaf) in src.keys_of:
                self._keys[fqn] = src.keys_of[id(leaf)]
                zeros = torch.Size([0] * leaf.dim())
                md[fqn] = TensorStorageMetadata(TensorProperties(dtype=leaf.dtype), leaf.shape,
                                                [ChunkStorageMetadata(offsets=zeros, sizes=leaf.shape)])
            else:
                self._values[fqn] = leaf
                md[fqn] = BytesStorageMetadata()
        return Metadata(state_dict_metadata=md, planner_data=mappings,
                        storage_meta=StorageMeta(checkpoint_id=self.url))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if not self._keys and not self._values:
            self.read_metadata()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        try:
            self._read(self._open(), plan, planner)
        finally:
            self._release()
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read(self, loader: _Reader, plan: LoadPlan, planner: LoadPlanner) -> None:
        done: list[tuple[Any, torch.Tensor, torch.Tensor]] = []
        for req in plan.items:
            fqn = req.storage_index.fqn
            if req.type == LoadItemType.BYTE_IO:
                v = self._values[fqn]
                buf = io.BytesIO()
                torch.save(loader.value(v.key) if isinstance(v, _Pickled) else v, buf)
                buf.seek(0)
                planner.load_bytes(req, buf)
                continue
            key = self._keys[fqn]
            e = loader.entry(key)
            base = req.storage_index.offset or [0] * len(req.lengths)
            offsets = tuple(int(b) + int(o) for b, o in zip(base, req.storage_offsets))
            dest = planner.resolve_tensor(req).detach()
            saved = torch_dtype(e["dtype"], key)
            direct = dest.device.type == "cpu" and dest.dtype == saved and dest.is_contiguous()
            into = dest if direct else torch.empty(tuple(int(s) for s in req.lengths), dtype=saved)
            loader.read_into(key, into, offsets, global_shape=tuple(e["shape"]))
            done.append((req, dest, into))
        loader.execute()
        for req, dest, into in done:
            if into is not dest:
                dest.copy_(into)  # DCP casts to the destination's dtype and device too
            planner.commit_tensor(req, dest)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        path = os.fspath(checkpoint_id)
        return "://" in path or os.path.isfile(os.path.join(path, "manifest.json"))
