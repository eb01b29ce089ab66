"""State providers: describe every piece of training state without moving data.

``describe(state)`` turns a user's state dict into providers. Built in: ``nn.Module``,
optimizers (keyed by parameter name), tensors and DTensors, cupy / numpy (any DLPack)
arrays, LR schedulers and any object with ``state_dict``/``load_state_dict``,
:class:`RNGState`, nested containers of tensors, arrays and plain values. ``register_provider(MyType, factory)`` adds your own (a factory returns a
:class:`Provider`); the built-in providers themselves are private.
:class:`Leaves` saves a ready-made nested tree (``ckpt import``, the DCP writer); :func:`place`
builds one from object paths.
"""

from __future__ import annotations

from typing import Any

from ckpt.errors import UnsafePathError, UnsupportedStateError
from ckpt.providers._base import (
    DescribeContext,
    LoadSource,
    Provider,
    Stateful,
    TensorItem,
    ValueItem,
    component,
    register_provider,
)
from ckpt.providers._flat import FlatShard
from ckpt.providers._leaves import Leaves, place
from ckpt.providers._rng import RNGProvider, RNGState
from ckpt.providers._torch import default_provider

register_provider(RNGState, RNGProvider)

__all__ = [
    "Provider",
    "LoadSource",
    "Stateful",
    "TensorItem",
    "ValueItem",
    "DescribeContext",
    "register_provider",
    "describe",
    "RNGState",
    "FlatShard",
    "Leaves",
    "place",
]


def describe(state: Any, ctx: DescribeContext) -> list[Provider]:
    """One provider per top-level entry of ``state`` (a dict with string keys).

    Modules are described first so that optimizers can name their parameters."""
    if not isinstance(state, dict):
        raise UnsupportedStateError(
            f"state must be a dict of named objects, got {type(state).__name__}",
            hint='wrap it: ckpt.save({"model": model, "optim": optim}, url)')
    for k in state:
        if not isinstance(k, str) or not k:
            raise UnsafePathError(f"top-level state keys must be non-empty strings, got {k!r}", key=str(k),
                                  hint="name each entry of the state dict with a string")
    order = sorted(state, key=lambda k: 0 if _is_module(state[k]) else 1)
    out = [default_provider(state[k], component(k), ctx, state, k) for k in order]
    return out


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)
