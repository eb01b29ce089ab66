"""ZeRO-style flat fragments: a rank's contiguous 1-D range of several flattened tensors.

Optimizers that shard a flat buffer (ZeRO-1/2, DeepSpeed, Megatron's distributed
optimizer) give each rank the elements ``[start, start + len)`` of the concatenation of
the flattened parameters; a fragment may begin and end in the middle of a parameter and
span several. :class:`FlatShard` describes such a fragment in each parameter's own
N-d coordinates, so the checkpoint holds ordinary global tensors: it loads as DTensors,
plain tensors or other fragments, whatever the layout it was saved from.

Any contiguous range of a C-ordered tensor is a union of at most ``2 * ndim - 1`` boxes
(:func:`range_boxes`), each of which is itself a contiguous run of the flat range, so
every box is a *view* of the flat tensor: nothing is copied on save, and loading reads
straight into the fragment.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch

from ckpt._format import Box
from ckpt.providers._base import Finalizer, Item, LoadSource, TensorItem

__all__ = ["FlatShard", "range_boxes"]



def range_boxes(shape: Sequence[int], start: int, end: int) -> list[Box]:
    """Boxes ``(offsets, sizes)`` of a C-ordered tensor of ``shape`` that tile the flat
    elements ``[start, end)``, in flat order (each box is a contiguous flat run)."""
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape)
    if not 0 <= start <= end <= n:
        raise ValueError(f"range [{start}, {end}) lies outside a tensor of {n} elements {list(shape)}")
    if start == end:
        return []
    if not shape:
        return [((), ())]
    if len(shape) == 1:
        return [((start,), (end - start,))]
    inner = n // shape[0]  # > 0: the range is not empty
    rest = shape[1:]
    ra, ia = divmod(start, inner)
    rb, ib = divmod(end, inner)

    def row(r: int, a: int, b: int) -> list[Box]:
        return [((r, *o), (1, *s)) for o, s in range_boxes(rest, a, b)]

    if ra == rb:  # within one row
        return row(ra, ia, ib)
    out: list[Box] = []
    first = ra
    if ia:
        out += row(ra, ia, inner)
        first = ra + 1
    if rb > first:
        out.append(((first,) + (0,) * len(rest), (rb - first, *rest)))
    if ib:
        out += row(rb, 0, ib)
    return out


class FlatShard:
    """This rank's flat fragment of several parameters, as a provider for the state.

    ``flat`` holds elements ``[start, start + flat.numel())`` of the concatenation of the
    flattened tensors ``params`` (``(name, global_shape)`` pairs, in buffer order). Each
    is saved as the global tensor ``f"{key_prefix}/{name}"`` (``name`` alone when
    ``key_prefix`` is empty), so ``key_prefix="model"`` shares keys with the module
    ``state["model"]`` and loads into it directly (and back). Loading reads each box of
    the fragment in place.

        state = {"optim_flat": FlatShard(flat, start, [("w", (4, 3)), ("b", (4,))], "exp_avg")}
    """

    def __init__(self, flat: torch.Tensor, start: int,
                 params: Iterable[tuple[str, Sequence[int]]], key_prefix: str = "") -> None:
        if flat.dim() != 1:
            raise ValueError(f"a flat fragment must be 1-D, got shape {list(flat.shape)}")
        self.flat = flat
        self.start = int(start)
        self.params = [(str(name), tuple(int(d) for d in shape)) for name, shape in params]
        self.key_prefix = key_prefix.rstrip("/")
        total = sum(math.prod(s) for _, s in self.params)
        if self.start < 0 or self.start + flat.numel() > total:
            raise ValueError(f"fragment [{self.start}, {self.start + flat.numel()}) lies outside the "
                             f"{total} elements of the parameters")

    def key(self, name: str) -> str:
        return f"{self.key_prefix}/{name}" if self.key_prefix else name

    def pieces(self) -> Iterator[tuple[str, tuple[int, ...], Box, torch.Tensor]]:
        """``(key, global shape, box, view of flat)`` for every box this fragment holds."""
        flat = self.flat.detach()
        lo, hi = self.start, self.start + flat.numel()
        base = 0
        for name, shape in self.params:
            n = math.prod(shape)
            a, b = max(lo, base), min(hi, base + n)
            if a < b:
                pos = a - lo  # position in the fragment of the box's first element
                for offs, sizes in range_boxes(shape, a - base, b - base):
                    m = math.prod(sizes)
                    yield self.key(name), shape, (offs, sizes), flat[pos:pos + m].view(sizes)
                    pos += m
            base += n

    def items(self) -> Iterator[Item]:
        for key, shape, (offs, _sizes), view in self.pieces():
            yield TensorItem(key, view, shape, offs)

    def load(self, src: LoadSource) -> Finalizer | None:
        missing: set[str] = set()
        touched: set[str] = set()
        for key, shape, (offs, _sizes), view in self.pieces():
            touched.add(key)
            if not src.has(key):
                if key not in missing:
                    missing.add(key)
                    src.missing(key)
                continue
            src.read_into(key, view, offs, global_shape=shape)
        # A parameter outside this fragment is still part of the state on every rank: an
        # empty read checks its dtype and shape and claims the key (strict loads on ranks
        # whose fragment misses it), without reading anything.
        for name, shape in self.params:
            key = self.key(name)
            if key in touched:
                continue
            if not src.has(key):
                src.missing(key)
                continue
            empty = self.flat.detach().new_empty((0, *shape[1:]) if shape else ())
            src.read_into(key, empty, (0,) * len(shape), global_shape=shape)
        return None
