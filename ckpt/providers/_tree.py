"""Nested containers of tensors and values, and the objects whose state_dict is one.

A tree is flattened into a *structure* (JSON, saved as one value) with placeholders for
its tensors and for values that need pickle; tensors become :class:`TensorItem` under
the tree's key. Loading rebuilds the structure, reading each tensor into the tensor
that sits at the same place in the live object when there is one (in place, same
device), or into a new tensor otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ckpt._values import TAG, NotJSONable, encode_value
from ckpt.providers._array import array_item, array_library, as_tensor, is_array, read_array
from ckpt.providers._base import (
    DescribeContext,
    Finalizer,
    Item,
    LoadSource,
    TensorItem,
    ValueItem,
    component,
)

_TENSOR = "tensor"
_OBJECT = "object"
_ARRAY = "array"


def flatten(obj: Any, prefix: str, out: list[Item], *, eager: bool = False) -> Any:
    """``obj`` -> JSON structure; appends its tensors (and non-JSON values) to ``out``."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and type(obj).__name__ == "DTensor":
            from ckpt.providers._dtensor import dtensor_item

            out.append(dtensor_item(prefix, obj, eager=eager))
        else:
            out.append(TensorItem(prefix, obj.detach(), eager=eager))
        return {TAG: _TENSOR, "key": prefix}
    if is_array(obj):  # numpy, cupy...: a tensor entry through DLPack, loaded back as the same library's array
        item = array_item(prefix, obj)
        if item is not None:
            out.append(item)
            return {TAG: _ARRAY, "key": prefix, "lib": array_library(obj)}
        return _leaf(obj, prefix, out)
    if isinstance(obj, dict) and type(obj).__module__ in ("builtins", "collections"):
        if all(isinstance(k, str) for k in obj) and TAG not in obj:
            return {k: flatten(v, f"{prefix}/{component(k)}", out, eager=eager) for k, v in obj.items()}
        return {TAG: "dict", "v": [[_leaf(k, f"{prefix}/%key{i}", out),
                                    flatten(v, f"{prefix}/{component(k)}", out, eager=eager)]
                                   for i, (k, v) in enumerate(obj.items())]}
    if type(obj) is list:
        return [flatten(v, f"{prefix}/{i}", out, eager=eager) for i, v in enumerate(obj)]
    if type(obj) is tuple:
        return {TAG: "tuple", "v": [flatten(v, f"{prefix}/{i}", out, eager=eager) for i, v in enumerate(obj)]}
    return _leaf(obj, prefix, out)


def _leaf(obj: Any, key: str, out: list[Item]) -> Any:
    try:
        return encode_value(obj)
    except NotJSONable:
        out.append(ValueItem(key, obj))
        return {TAG: _OBJECT, "key": key}


def _find(live: Any, path: list[Any]) -> Any:
    for p in path:
        try:
            live = live[p]
        except (KeyError, IndexError, TypeError):
            return None
    return live


def unflatten(structure: Any, src: LoadSource, live: Any, pending: list[Callable[[], None]],
              path: list[Any] | None = None) -> Any:
    """Rebuild a structure, scheduling tensor reads on ``src``.

    Tensor placeholders resolve to the live tensor at the same path (read in place) or
    to a new tensor; the reads complete before the finalisers run, so the returned
    object is complete by then."""
    path = path or []
    if isinstance(structure, list):
        return [unflatten(v, src, live, pending, path + [i]) for i, v in enumerate(structure)]
    if isinstance(structure, dict):
        tag = structure.get(TAG)
        if tag is None:
            return {k: unflatten(v, src, live, pending, path + [k]) for k, v in structure.items()}
        if tag == _TENSOR:
            key = structure["key"]
            target = _find(live, path)
            if isinstance(target, torch.Tensor) and type(target).__name__ == "DTensor" and tuple(
                target.shape
            ) == tuple(src.entry(key).get("shape", ())):
                from ckpt.providers._dtensor import read_dtensor

                read_dtensor(src, key, target)
                return target
            if isinstance(target, torch.Tensor) and _plain(target) and tuple(target.shape) == tuple(
                src.entry(key).get("shape", ())
            ):
                src.read_into(key, target.detach())
                return target
            return src.read_new(key)
        if tag == _ARRAY:
            key = structure["key"]
            target = _find(live, path)
            if is_array(target) and tuple(target.shape) == tuple(src.entry(key).get("shape", ())):
                dest = as_tensor(target, writable=True)
                if dest is not None:
                    src.read_into(key, dest)
                    return target
            return read_array(src, key, str(structure.get("lib", "numpy")))
        if tag == _OBJECT:
            return src.value(structure["key"])
        if tag == "tuple":
            return tuple(unflatten(v, src, live, pending, path + [i]) for i, v in enumerate(structure["v"]))
        if tag == "dict":
            out = {}
            for k, v in structure["v"]:
                kk = unflatten(k, src, None, pending)
                out[kk] = unflatten(v, src, live, pending, path + [kk])
            return out
        from ckpt._values import decode_value

        return decode_value(structure)
    return structure


def _plain(t: torch.Tensor) -> bool:
    return type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter)


class TreeProvider:
    """A value, tensor or nested container under ``prefix``.

    ``get`` returns the live object; ``set`` stores the loaded object (the parent dict's
    slot, or an object's load_state_dict). Tensors are loaded in place when the live
    tree has a tensor of the same shape at the same place.
    """

    def __init__(self, prefix: str, get: Callable[[], Any], set: Callable[[Any], None] | None,
                 *, eager: bool = False) -> None:
        self.prefix = prefix
        self._get = get
        self._set = set
        self.eager = eager

    def items(self) -> Iterator[Item]:
        out: list[Item] = []
        structure = flatten(self._get(), self.prefix, out, eager=self.eager)
        if out and isinstance(out[0], ValueItem) and out[0].key == self.prefix:
            yield from out  # the whole object is one pickled value; load's raw() gives its placeholder
            return
        yield ValueItem(self.prefix, structure, encoded=True)
        yield from out

    def load(self, src: LoadSource) -> Finalizer | None:
        if not src.has(self.prefix):
            live = self._get()
            if isinstance(live, dict) and live and src.keys(self.prefix):
                return self._load_flat(src, live)  # e.g. a module's state_dict, the module saved
        structure = src.raw(self.prefix)
        live = self._get()
        pending: list[Callable[[], None]] = []
        obj = unflatten(structure, src, live, pending)
        setter = self._set
        if setter is None:
            return None

        def finish() -> None:
            setter(obj)

        return finish


    def _load_flat(self, src: LoadSource, live: dict[Any, Any]) -> Finalizer | None:
        """Tensors of a flat dict (``model.state_dict()``) loaded in place from a checkpoint
        that stored them without a structure (a module saved as ``{"model": model}``): the
        keys underneath are the same, ``<prefix>/<name>``."""
        for k, v in live.items():
            key = f"{self.prefix}/{component(k)}"
            if not src.has(key):
                src.missing(key)
            elif isinstance(v, torch.Tensor) and _plain(v):
                src.read_into(key, v.detach())
            else:
                src.unexpected(key, "the state holds a value here that the checkpoint saved as a tensor",
                               "pass the module itself, or a state dict of tensors")
        return None


class StatefulProvider(TreeProvider):
    """Any object with ``state_dict()`` / ``load_state_dict()`` (schedulers, samplers,
    grad scalers...). State is captured eagerly: such state is small and often changes
    outside the optimizer step."""

    def __init__(self, obj: Any, prefix: str, ctx: DescribeContext | None = None) -> None:
        super().__init__(prefix, obj.state_dict, obj.load_state_dict, eager=True)
