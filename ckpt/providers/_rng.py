"""Random number generator state: Python, NumPy, torch CPU and every CUDA device.

RNG state is per rank. After a change of world size, ranks that existed keep their
streams; a rank that did not exist gets a stream derived deterministically from rank
0's saved state and its own rank (so a resumed job is reproducible), documented in
docs/format.md ("Per-rank state").
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ckpt.providers._base import DescribeContext, Finalizer, Item, LoadSource, ValueItem


def capture() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate()}
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state["numpy"] = {"name": name, "keys": np.asarray(keys).tolist(), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state["torch"] = bytes(torch.get_rng_state().numpy())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [bytes(s.numpy()) for s in torch.cuda.get_rng_state_all()]
    return state


def restore(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.frombuffer(bytearray(s), dtype=torch.uint8), i)


def derive(base: dict[str, Any], rank: int) -> None:
    """Seed every generator from a hash of rank 0's saved state and ``rank``."""
    h = hashlib.sha256(repr((base["python"], base["torch"], rank)).encode()).digest()
    seed = int.from_bytes(h[:8], "little")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device


class RNGState:
    """Put ``ckpt.RNGState()`` in the state to checkpoint every RNG of this process."""

    def __init__(self) -> None:
        self.restored_from: str | None = None  # "saved" or "derived", after a load

    def state_dict(self) -> dict[str, Any]:
        return capture()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore(state)


class RNGProvider:
    def __init__(self, obj: RNGState, prefix: str, ctx: DescribeContext) -> None:
        self.obj = obj
        self.prefix = prefix
        self.rank = ctx.rank

    def items(self) -> Iterator[Item]:
        yield ValueItem(self.prefix, capture(), per_rank=True)

    def load(self, src: LoadSource) -> Finalizer | None:
        mine = src.value(self.prefix, per_rank=True, default=None)  # type: ignore[call-arg]
        obj = self.obj
        if mine is not None:
            def finish() -> None:
                restore(mine)
                obj.restored_from = "saved"
        else:
            base = src.value(self.prefix, per_rank=True, rank=0)  # type: ignore[call-arg]
            rank = self.rank

            def finish() -> None:
                derive(base, rank)
                obj.restored_from = "derived"
        return finish
