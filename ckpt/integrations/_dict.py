"""A framework's checkpoint *dict* (nested tensors and values) as a ckpt state, and back.

Lightning and the Hugging Face Trainer hand over, or want back, one dict whose
top-level keys are the framework's (``state_dict``, ``optimizer_states``, ``loops``...).
Each top-level key becomes a top-level object of the checkpoint (so ``ckpt export
--only state_dict`` and ``ckpt.load({"state_dict": module}, url)`` work on the result),
described by :class:`DictSlot`; the list of keys goes in the manifest's
``user_metadata`` so :func:`load_dict` can rebuild the dict without a live object.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ckpt.errors import CheckpointNotFoundError, UnsafePathError
from ckpt.providers import LoadSource, TensorItem, component
from ckpt.providers._base import Finalizer, Item
from ckpt.providers._tree import TreeProvider

Lazy = Callable[[torch.Tensor], bool]


class DictSlot(TreeProvider):
    """One top-level value of a framework's dict: a tree (see ``TreeProvider``) or a
    single tensor. ``lazy(t)`` says whether tensor ``t`` may be copied in the background
    (it changes only in an optimizer step, which waits for the copy); others are copied
    at snapshot time. On load the value is rebuilt from the checkpoint alone."""

    def __init__(self, name: str, value: Any, store: dict[str, Any], *, lazy: Lazy | None = None) -> None:
        super().__init__(component(name), lambda: value, lambda v: store.__setitem__(name, v))
        self._value = value
        self._lazy = lazy

    def items(self) -> Iterator[Item]:
        if isinstance(self._value, torch.Tensor):  # a tree would give the key twice (structure + tensor)
            items: Iterator[Item] = iter([TensorItem(self.prefix, self._value.detach())])
        else:
            items = super().items()
        for it in items:
            if self._lazy is not None and isinstance(it, TensorItem) and not self._lazy(it.tensor):
                it = dataclasses.replace(it, eager=True)
            yield it

    def load(self, src: LoadSource) -> Finalizer | None:
        if src.entry(self.prefix).get("kind") != "tensor":
            return super().load(src)
        tensor = src.read_new(self.prefix)
        setter = self._set
        assert setter is not None
        return lambda: setter(tensor)


def dict_state(checkpoint: dict[str, Any], store: dict[str, Any], *, lazy: Lazy | None = None,
               where: str = "") -> dict[str, DictSlot]:
    """The ckpt state that saves ``checkpoint``; loading it fills ``store``."""
    for k in checkpoint:
        if not isinstance(k, str) or not k:
            raise UnsafePathError(f"the checkpoint dict's top-level keys must be non-empty strings, got {k!r}",
                                  key=str(k), path=where, hint="name every top-level entry with a string")
    return {k: DictSlot(k, v, store, lazy=lazy) for k, v in checkpoint.items()}


def load_dict(url: str | os.PathLike[str], meta_key: str, *, allow_pickle: bool = False,
              storage_options: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dict saved under ``url`` by an integration (its ``user_metadata[meta_key]``
    names the top-level keys), and that metadata. Tensors come back on the CPU."""
    import ckpt

    manifest = ckpt.read_manifest(url, storage_options=storage_options)
    meta = manifest.user_metadata.get(meta_key)
    if not isinstance(meta, dict) or not isinstance(meta.get("keys"), list):
        raise CheckpointNotFoundError(
            f"this ckpt checkpoint was not written through the {meta_key} integration", path=os.fspath(url),
            hint="load it with ckpt.load({...your objects...}, url); `ckpt info` lists its keys")
    out: dict[str, Any] = {}
    state = dict_state({k: None for k in meta["keys"]}, out, where=os.fspath(url))
    ckpt.load(state, url, allow_pickle=allow_pickle, storage_options=storage_options, process_group=False)
    return {k: out[k] for k in meta["keys"]}, meta


def optimizer_storages(optimizers: Any) -> set[int]:
    """Storage addresses of the parameters and state tensors of ``optimizers``: what only
    changes inside their ``step``."""
    ptrs: set[int] = set()

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            try:
                ptrs.add(t.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
                pass

    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                add(p)
        for st in opt.state.values():
            for v in st.values() if isinstance(st, dict) else ():
                add(v)
    ptrs.discard(0)
    return ptrs


def delete_checkpoint(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
    """Delete the checkpoint at ``url``: its manifest first (from then on it is not a
    checkpoint, so a half-deleted one is never taken for one), then its data."""
    from ckpt._format import MANIFEST
    from ckpt.storage import split_checkpoint_url

    storage, name = split_checkpoint_url(url, **(storage_options or {}))
    storage.delete(f"{name}/{MANIFEST}")
    storage.delete_dir(name)
