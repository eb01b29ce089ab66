"""Ready-made leaves: a nested state tree (dicts and lists of tensors and values, as
``torch.save`` files, safetensors and DCP hold it) saved under ``/``-joined keys, with no
structure entry of its own. ``ckpt import`` and the DCP writer
(:class:`ckpt.integrations.dcp.CkptWriter`) save through it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ckpt.errors import UnsupportedStateError
from ckpt.providers._base import Item, TensorItem, ValueItem, component
from ckpt.providers._torch import optimizer_items

__all__ = ["Leaves", "flatten", "place"]


class Leaves:
    """A provider over ready-made (key, tensor or value) pairs: saves them under exactly
    those keys, with no structure entry of its own. ``boxes`` places a tensor that is a
    piece of a larger one: key -> (global shape, offsets of the piece)."""

    def __init__(self, leaves: list[tuple[str, Any]], optimizers: Iterable[tuple[str, dict[str, Any]]] = (),
                 boxes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None) -> None:
        self.leaves = leaves
        self.optimizers = list(optimizers)
        self.boxes = boxes or {}

    @classmethod
    def of_tree(cls, tree: dict[str, Any],
                boxes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None) -> Leaves:
        """The leaves of a nested ``tree``: each tensor and each tensor-free sub-tree at
        its ``/``-joined key (components as :func:`component` writes them); optimizer
        state dicts saved as ckpt saves an optimizer, so they load into a live one."""
        optimizers: list[tuple[str, dict[str, Any]]] = []
        return cls(flatten(tree, "", optimizers), optimizers, boxes)

    def items(self) -> Iterator[Item]:
        for item in self._items():
            box = self.boxes.get(item.key)
            if box is not None and isinstance(item, TensorItem):
                item = dataclasses.replace(item, global_shape=box[0], offsets=box[1])
            yield item

    def _items(self) -> Iterator[Item]:
        for key, v in self.leaves:
            yield TensorItem(key, v.detach()) if isinstance(v, torch.Tensor) else ValueItem(key, v)
        for key, sd in self.optimizers:  # saved as an optimizer is: it loads into a live one
            yield from optimizer_items(key, sd)

    def load(self, src: Any) -> None:
        raise UnsupportedStateError("ready-made leaves are only saved (by `ckpt import`), never loaded into",
                                    hint="load the imported checkpoint into the model's own state instead")


def _has_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, dict):
        return any(_has_tensor(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(_has_tensor(v) for v in obj)
    return False


def _is_optimizer_state(obj: Any) -> bool:
    """An optimizer state dict: keyed by parameter name, as DCP saves one
    (``get_state_dict`` / ``get_optimizer_state_dict``: torchtitan, accelerate), or by
    index (``optimizer.state_dict()`` itself; loaded by position, as torch does)."""
    if not (isinstance(obj, dict) and set(obj) == {"state", "param_groups"} and isinstance(obj["state"], dict)
            and isinstance(obj["param_groups"], list)):
        return False
    groups = obj["param_groups"]
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        return False
    params = [p for g in groups for p in g["params"]]
    if all(isinstance(p, str) for p in params):
        return all(isinstance(k, str) for k in obj["state"])
    return all(isinstance(p, int) and not isinstance(p, bool) for p in params) and all(
        isinstance(k, int) or isinstance(k, str) and k.isdigit() for k in obj["state"])


def flatten(obj: Any, prefix: str = "", optimizers: list[tuple[str, dict[str, Any]]] | None = None
            ) -> list[tuple[str, Any]]:
    """Nested dicts/lists -> (``/``-joined key, leaf) pairs; tensor-free sub-trees stay whole.
    With ``optimizers``, optimizer state dicts go there as (key, state dict) instead."""
    if optimizers is not None and prefix and _is_optimizer_state(obj):
        optimizers.append((prefix, obj))
        return []
    if isinstance(obj, torch.Tensor) or not _has_tensor(obj) and prefix:
        if not prefix:
            raise UnsupportedStateError("a lone tensor needs a name", hint="pass --prefix NAME")
        return [(prefix, obj)]
    if isinstance(obj, dict):
        pairs = obj.items()
    elif isinstance(obj, list | tuple):
        pairs = enumerate(obj)  # type: ignore[assignment]
    elif not prefix:
        raise UnsupportedStateError(f"nothing to import from a {type(obj).__name__}",
                                    hint="the source must hold a dict of tensors (a state dict)")
    else:
        return [(prefix, obj)]
    out = []
    for k, v in pairs:
        out.extend(flatten(v, f"{prefix}/{component(k)}" if prefix else component(k), optimizers))
    return out


def place(root: dict[str, Any], path: Any, value: Any) -> None:
    """Place ``value`` at a DCP object path (dict keys and list indices) in ``root``."""
    cur: Any = root
    path = tuple(path)
    for i, k in enumerate(path[:-1]):
        nxt = path[i + 1]
        empty: Any = [] if isinstance(nxt, int) else {}
        if isinstance(cur, list):
            cur.extend([None] * (k + 1 - len(cur)))
            if cur[k] is None:
                cur[k] = empty
        else:
            cur.setdefault(k, empty)
        cur = cur[k]
    last = path[-1]
    if isinstance(cur, list):
        cur.extend([None] * (last + 1 - len(cur)))
    cur[last] = value
