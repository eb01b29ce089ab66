"""State providers: what a piece of training state is and where it lives.

A provider *describes*; it never moves data. Saving asks every provider for its
:class:`TensorItem` and :class:`ValueItem`; loading hands every provider a
:class:`LoadSource` on which it schedules reads into its own tensors (or into new
ones) and returns a finaliser that runs once all reads are done.

Keys are ``/``-separated paths; the top-level state dict's keys are their first
component. Within an object, nested containers add components; a dict key that is not
a string, or contains ``/`` or ``%``, is encoded by :func:`component`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ckpt._sharding import Sharding

__all__ = [
    "TensorItem",
    "ValueItem",
    "Provider",
    "LoadSource",
    "Stateful",
    "register_provider",
    "component",
]


@dataclass(frozen=True)
class TensorItem:
    """A tensor (or this rank's piece of one) to save.

    ``tensor`` is the live local data (not copied). ``global_shape`` and ``offsets``
    place it in the global tensor; an unsharded tensor has offsets all zero and
    ``global_shape == tensor.shape``. ``replica`` > 0 marks a copy that another rank
    also holds (exactly one replica is written). ``eager`` asks for a copy at
    snapshot time, for state that changes during forward (BatchNorm statistics...).
    ``sharding``: the rule that places every rank's piece of this tensor (DTensor
    placements over a mesh), when the provider knows it: the save then derives the whole
    layout locally instead of asking the coordinator for every rank's box.
    """

    key: str
    tensor: torch.Tensor
    global_shape: tuple[int, ...] | None = None
    offsets: tuple[int, ...] | None = None
    replica: int = 0
    eager: bool = False
    sharding: Sharding | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.global_shape if self.global_shape is not None else self.tensor.shape)

    @property
    def box(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        offs = self.offsets if self.offsets is not None else (0,) * self.tensor.dim()
        return tuple(offs), tuple(self.tensor.shape)


@dataclass(frozen=True)
class ValueItem:
    """A plain value (JSON-able, or picklable with opt-in). ``per_rank`` values are kept
    for each rank separately; others are written once (by rank 0)."""

    key: str
    value: Any
    per_rank: bool = False
    encoded: bool = False  # already in the JSON structure form of ckpt._format


Item = TensorItem | ValueItem
Finalizer = Callable[[], None]


class LoadSource(Protocol):
    """What a provider can ask of the checkpoint being loaded (see ckpt._engine._load).

    ``allow_missing`` / ``allow_unexpected``: whether keys the state has and the checkpoint
    lacks, and saved keys of an object the state has no place for, are allowed (``strict``:
    neither is); ``where``: the checkpoint's URL for messages. ``missing(key)`` and
    ``unexpected(key, message, hint)`` report one (an error unless allowed)."""

    strict: bool
    allow_missing: bool
    allow_unexpected: bool
    where: str

    def missing(self, key: str) -> None: ...

    def unexpected(self, key: str, message: str, hint: str) -> None: ...

    def has(self, key: str) -> bool: ...

    def keys(self, prefix: str) -> list[str]: ...

    def entry(self, key: str) -> dict[str, Any]: ...

    def read_into(self, key: str, dest: torch.Tensor, offsets: tuple[int, ...] | None = None,
                  global_shape: tuple[int, ...] | None = None) -> None: ...

    def read_new(self, key: str, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def value(self, key: str, *, per_rank: bool = False) -> Any: ...

    def raw(self, key: str, *, per_rank: bool = False) -> Any: ...


@runtime_checkable
class Provider(Protocol):
    """Describes one object of the state under ``prefix``."""

    def items(self) -> Iterator[Item]: ...

    def load(self, src: LoadSource) -> Finalizer | None: ...


@runtime_checkable
class Stateful(Protocol):
    """PyTorch's two-method protocol (shared with torch.distributed.checkpoint)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


ProviderFactory = Callable[[Any, str, "DescribeContext"], Provider]
_REGISTRY: list[tuple[type, ProviderFactory]] = []


def register_provider(cls: type, factory: ProviderFactory) -> None:
    """Describe objects of type ``cls`` with ``factory(obj, prefix, ctx)``.

    Registered factories are tried before the built-in ones, newest first, so users can
    override how a library type is checkpointed."""
    _REGISTRY.insert(0, (cls, factory))


def registered_factory(obj: Any) -> ProviderFactory | None:
    for cls, factory in _REGISTRY:
        if isinstance(obj, cls):
            return factory
    return None


def component(k: Any) -> str:
    """One path component for a container key."""
    if isinstance(k, str):
        return k.replace("%", "%25").replace("/", "%2F") or "%00"
    if isinstance(k, bool) or k is None:
        return f"%{k!r}"
    if isinstance(k, int):
        return str(k)
    return "%" + repr(k).replace("%", "%25").replace("/", "%2F")


class DescribeContext:
    """Shared knowledge while describing one state: parameter names from every module in
    it (so optimizers are keyed by name), the process group, options."""

    def __init__(self, *, allow_pickle: bool = False, rank: int = 0, world_size: int = 1) -> None:
        self.allow_pickle = allow_pickle
        self.rank = rank
        self.world_size = world_size
        self.param_names: dict[int, str] = {}
        self.modules: list[tuple[str, torch.nn.Module]] = []

    def add_module(self, prefix: str, module: torch.nn.Module) -> None:
        self.modules.append((prefix, module))
        for name, p in module.named_parameters(remove_duplicate=False):
            self.param_names.setdefault(id(p), name)


def iter_items(providers: Iterable[Provider]) -> Iterator[Item]:
    for p in providers:
        yield from p.items()
