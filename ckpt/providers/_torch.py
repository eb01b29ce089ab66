"""Providers for torch objects: modules, optimizers, plain tensors.

Modules are saved as their ``state_dict`` (parameters and persistent buffers, keyed
``<prefix>/<fqn>``) and loaded in place. Buffers are captured eagerly: BatchNorm
statistics and EMA buffers change during forward, which overlaps the background copy.

Optimizers are keyed by parameter *names*, not indices: ``<prefix>/state/<fqn>/<name>``
and ``param_groups`` with names in ``params``. Names come from the modules in the same
state; a parameter no module owns keeps its index (``param.<i>``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from ckpt._values import TAG
from ckpt.errors import MissingKeyError, ShapeMismatchError, UnexpectedKeyError
from ckpt.providers._base import DescribeContext, Finalizer, Item, LoadSource, TensorItem, ValueItem
from ckpt.providers._tree import TreeProvider, flatten, unflatten


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


class TensorProvider:
    """One top-level tensor, loaded in place."""

    def __init__(self, tensor: torch.Tensor, prefix: str, ctx: DescribeContext | None = None) -> None:
        self.tensor = tensor
        self.prefix = prefix

    def items(self) -> Iterator[Item]:
        if _is_dtensor(self.tensor):
            from ckpt.providers._dtensor import dtensor_item

            yield dtensor_item(self.prefix, self.tensor)
        else:
            yield TensorItem(self.prefix, self.tensor.detach())

    def load(self, src: LoadSource) -> Finalizer | None:
        if _is_dtensor(self.tensor):
            from ckpt.providers._dtensor import read_dtensor

            read_dtensor(src, self.prefix, self.tensor)
        else:
            src.read_into(self.prefix, self.tensor.detach())
        return None


class ModuleProvider:
    def __init__(self, module: torch.nn.Module, prefix: str, ctx: DescribeContext) -> None:
        self.module = module
        self.prefix = prefix
        ctx.add_module(prefix, module)

    def _state(self) -> dict[str, Any]:
        return self.module.state_dict(keep_vars=True)

    def _buffers(self) -> set[int]:
        return {id(b) for b in self.module.buffers()}

    def items(self) -> Iterator[Item]:
        buffers = self._buffers()
        extra: dict[str, Any] = {}
        for name, value in self._state().items():
            key = f"{self.prefix}/{name}"
            if isinstance(value, torch.Tensor):
                eager = id(value) in buffers
                if _is_dtensor(value):
                    from ckpt.providers._dtensor import dtensor_item

                    yield dtensor_item(key, value, eager=eager)
                else:
                    yield TensorItem(key, value.detach(), eager=eager)
            else:
                extra[name] = value
        if extra:
            out: list[Item] = []
            structure = flatten(extra, f"{self.prefix}/.extra", out, eager=True)
            yield ValueItem(f"{self.prefix}/.extra", structure, encoded=True)
            yield from out

    def load(self, src: LoadSource) -> Finalizer | None:
        if src.has(self.prefix) and src.entry(self.prefix).get("kind") == "json":
            src.raw(self.prefix)  # saved as a state dict ({"model": model.state_dict()}): same tensor keys
        state = self._state()
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        for name, t in tensors.items():
            key = f"{self.prefix}/{name}"
            if not src.has(key):
                src.missing(key)
                continue
            if _is_dtensor(t):
                from ckpt.providers._dtensor import read_dtensor

                read_dtensor(src, key, t)
            else:
                src.read_into(key, t.detach())
        extra_names = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        extra_key = f"{self.prefix}/.extra"
        if not extra_names and not src.has(extra_key):
            return None
        if not src.has(extra_key):
            for n in extra_names:
                src.missing(f"{self.prefix}/{n}")
            return None
        pending: list[Any] = []
        loaded = unflatten(src.raw(extra_key), src, {k: state[k] for k in extra_names}, pending)
        module = self.module

        def finish() -> None:
            for name, value in loaded.items():
                owner, _, attr = name.rpartition(".")
                sub = module.get_submodule(owner) if owner else module
                if attr == "_extra_state" and hasattr(sub, "set_extra_state"):
                    sub.set_extra_state(value)

        return finish


def optimizer_items(prefix: str, sd: dict[str, Any]) -> Iterator[Item]:
    """The items of an optimizer state dict keyed by parameter name (``state`` maps names,
    each group's ``params`` lists names): one structure value at ``prefix``, the tensors
    under ``prefix/state/<name>/...``. ``OptimizerProvider`` and ``ckpt import`` (DCP's
    name-keyed optimizer state) save optimizers this way, so both load the same."""
    out: list[Item] = []
    # param_groups (lr, betas...) change outside step (schedulers): capture eagerly.
    groups = flatten(sd["param_groups"], f"{prefix}/param_groups", out, eager=True)
    state = flatten(sd["state"], f"{prefix}/state", out)
    yield ValueItem(prefix, {"state": state, "param_groups": groups}, encoded=True)
    yield from out


def _by_position(structure: dict[str, Any], names: list[str], key: str, where: str) -> dict[str, Any]:
    """A saved optimizer state keyed by index (``optimizer.state_dict()`` as it is, e.g.
    imported from DCP) -> keyed by this optimizer's parameter names, as torch's own
    ``load_state_dict`` matches them: by position."""
    groups = structure["param_groups"]
    if not all(isinstance(p, int) and not isinstance(p, bool) for g in groups for p in g["params"]):
        return structure
    state = structure["state"]
    if state.get(TAG) == "dict":  # int keys (a torch.save'd state dict)
        state = {str(k): v for k, v in state["v"]}
    count = sum(len(g["params"]) for g in groups)
    if count != len(names) or any(not (0 <= int(k) < count) for k in state):
        raise ShapeMismatchError(f"the checkpoint's optimizer has {count} parameters by position, this one "
                                 f"{len(names)}", key=key, path=where,
                                 hint="build the optimizer over the same parameters in the same order")
    return {"state": {names[int(k)]: v for k, v in state.items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in groups]}


class OptimizerProvider:
    def __init__(self, optim: torch.optim.Optimizer, prefix: str, ctx: DescribeContext) -> None:
        self.optim = optim
        self.prefix = prefix
        self.ctx = ctx

    def _names(self) -> list[str]:
        """Names of the optimizer's parameters in state_dict index order."""
        names = []
        i = 0
        for group in self.optim.param_groups:
            for p in group["params"]:
                names.append(self.ctx.param_names.get(id(p), f"param.{i}"))
                i += 1
        return names

    def _by_name(self, sd: dict[str, Any]) -> dict[str, Any]:
        names = self._names()
        if len(set(names)) != len(names):  # two modules with the same parameter names: state would be lost
            from ckpt.errors import UnsupportedStateError

            dup = sorted({n for n in names if names.count(n) > 1})[:5]
            raise UnsupportedStateError(
                f"the optimizer's parameters have ambiguous names {dup} (modules in the state share them)",
                key=self.prefix, hint="wrap the modules in one nn.ModuleDict/nn.Module in the state")
        state = {names[i]: s for i, s in sd["state"].items()}
        groups = []
        for g in sd["param_groups"]:
            g = dict(g)
            g["params"] = [names[i] for i in g["params"]]
            groups.append(g)
        return {"state": state, "param_groups": groups}

    def items(self) -> Iterator[Item]:
        return optimizer_items(self.prefix, self._by_name(self.optim.state_dict()))

    def load(self, src: LoadSource) -> Finalizer | None:
        if not src.has(self.prefix):
            src.missing(self.prefix)
            return None
        names = self._names()
        structure = _by_position(src.raw(self.prefix), names, self.prefix, src.where)
        index = {n: i for i, n in enumerate(names)}
        saved_names = list(structure["state"].keys())
        unknown = [n for n in saved_names if n not in index]
        if unknown:
            unnamed = not any(id(p) in self.ctx.param_names for g in self.optim.param_groups for p in g["params"])
            if len(unknown) == len(saved_names):  # nothing would load: an error even when strict=False
                raise UnexpectedKeyError(
                    f"none of the checkpoint's optimizer state matches this optimizer's parameters "
                    f"(saved for {unknown[:5]}, this optimizer has {names[:5]})", key=f"{self.prefix}/state/{unknown[0]}",
                    path=src.where,
                    hint="an optimizer's state is keyed by its module's parameter names: put the module in the "
                         "same state, e.g. ckpt.load({'model': model, 'optim': optim}, url)" if unnamed else
                         "build the optimizer over the same named parameters")
            src.unexpected(
                f"{self.prefix}/state/{unknown[0]}",
                f"the checkpoint has optimizer state for parameters this optimizer does not have: {unknown[:5]}",
                "an optimizer's state is keyed by its module's parameter names: put the module in the "
                "same state, e.g. {'model': model, 'optim': optim}" if unnamed else
                "build the optimizer over the same parameters, or load with allow_unexpected=True")
        pending: list[Any] = []
        # Validate the groups before anything touches the optimizer.
        groups = unflatten(structure["param_groups"], src, None, pending)
        if len(groups) != len(self.optim.param_groups):
            raise ShapeMismatchError(
                f"the checkpoint has {len(groups)} parameter groups, this optimizer {len(self.optim.param_groups)}",
                key=self.prefix, path=src.where, hint="build the optimizer with the same parameter groups")
        for g, mine in zip(groups, self.optim.param_groups):
            missing = [n for n in g["params"] if n not in index]
            if len(g["params"]) != len(mine["params"]) or (missing and not src.allow_unexpected):
                raise ShapeMismatchError(
                    "a parameter group of the checkpoint holds other parameters than this optimizer's",
                    key=self.prefix, path=src.where,
                    hint="build the optimizer over the same named parameters in the same groups")
        # Load into the live state tensors (no extra copy, right device and placement):
        # a fresh optimizer gets its state created first, as DCP does.
        if saved_names and not self.optim.state:
            from torch.distributed.checkpoint.state_dict import _init_optim_state

            optim = self.optim
            grads = [(p, p.grad) for g in optim.param_groups for p in g["params"]]
            _init_optim_state(optim)
            on_rollback = getattr(src, "on_rollback", None)
            if on_rollback is not None:  # a failed load leaves the optimizer as fresh as it was
                on_rollback(lambda: _forget_state(optim, grads))
        live = self._by_name(self.optim.state_dict())["state"]
        params = [p for g in self.optim.param_groups for p in g["params"]]
        state: dict[str, Any] = {}
        for name in saved_names:
            if name not in index:
                continue
            st = unflatten(structure["state"][name], src, live.get(name, {}), pending, [])
            state[name] = _to_device(st, params[index[name]])
        # param index order must follow this optimizer's groups, not the saved order
        pos = 0
        for g, mine in zip(groups, self.optim.param_groups):
            g["params"] = list(range(pos, pos + len(mine["params"])))
            pos += len(mine["params"])
        for n in names:
            if n not in state and n in live and live[n]:
                if not src.allow_missing:
                    raise MissingKeyError("the checkpoint has no optimizer state for a parameter that has some",
                                          key=f"{self.prefix}/state/{n}", path=src.where,
                                          hint="load with allow_missing=True to keep the current state")
                src.missing(f"{self.prefix}/state/{n}")
        optim = self.optim

        def finish() -> None:
            optim.load_state_dict({"state": {index[n]: s for n, s in state.items()}, "param_groups": groups})

        return finish


def _forget_state(optim: torch.optim.Optimizer, grads: list[tuple[torch.Tensor, Any]]) -> None:
    """Undo ``_init_optim_state``: no optimizer state, every gradient as it was."""
    optim.state.clear()
    for p, g in grads:
        p.grad = g


def _to_device(state: Any, param: torch.Tensor) -> Any:
    """Optimizer.load_state_dict casts state to the parameter's device; nothing to do,
    but new tensors read on CPU are left for it to move."""
    return state


def default_provider(obj: Any, prefix: str, ctx: DescribeContext, parent: dict[str, Any] | None,
                     name: str | None = None) -> Any:
    """The built-in choice of provider for one top-level object of the state."""
    from ckpt.providers._base import registered_factory
    from ckpt.providers._tree import StatefulProvider

    factory = registered_factory(obj)
    if factory is not None:
        return factory(obj, prefix, ctx)
    if isinstance(obj, torch.nn.Module):
        return ModuleProvider(obj, prefix, ctx)
    if isinstance(obj, torch.optim.Optimizer):
        return OptimizerProvider(obj, prefix, ctx)
    if isinstance(obj, torch.Tensor):
        return TensorProvider(obj, prefix, ctx)
    from ckpt.providers._array import ArrayProvider, array_item, is_array

    item = array_item(prefix, obj) if is_array(obj) else None
    if item is not None:  # else (object dtypes...) the tree's pickle path
        return ArrayProvider(obj, prefix, ctx, set=_slot_setter(parent, name if name is not None else prefix),
                             item=item)
    if hasattr(obj, "items") and hasattr(obj, "load") and callable(obj.items) and callable(obj.load) \
            and not isinstance(obj, dict):
        return obj  # already a provider
    if hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
        return StatefulProvider(obj, prefix, ctx)
    return TreeProvider(prefix, lambda: obj, _slot_setter(parent, name if name is not None else prefix))


def _slot_setter(parent: dict[str, Any] | None, name: str) -> Any:
    """Stores a loaded object in the state dict's slot (None without a state dict)."""
    if parent is None:
        return None

    def setter(v: Any) -> None:
        parent[name] = v

    return setter
