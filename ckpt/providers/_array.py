"""Arrays of other libraries (cupy, numpy, anything with DLPack) as tensor entries.

An array is saved through the tensor ``torch.from_dlpack`` makes of it: a view of the
same memory on the same device, so a cupy array on a GPU goes through the same staging
(copy streams, pinned pool) as a CUDA tensor, and the checkpoint holds an ordinary
tensor entry any zarr reader can open. DLPack orders the view after the array's
producer: torch passes its current stream, and cupy makes that stream wait on its own.

Arrays are captured *eagerly* (copied at snapshot time): another library's writes do
not bump torch's version counter, so the engine could not tell that an array changed
while its background copy ran.

Loading reads in place into the live array when it has the saved shape and is
writable; otherwise a new array of the saved library is made (numpy on the host, cupy
on the current cupy device). Arrays DLPack cannot export (object or string dtypes,
byte-swapped data) keep the pickle path of any other value.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ckpt.errors import UnsupportedStateError
from ckpt.providers._base import DescribeContext, Finalizer, Item, LoadSource, TensorItem

__all__ = ["ArrayProvider", "is_array", "array_library", "as_tensor", "array_item", "read_array"]


def is_array(obj: Any) -> bool:
    """A DLPack-capable array that is not a torch tensor (numpy, cupy, jax, ...)."""
    return (not isinstance(obj, torch.Tensor) and not isinstance(obj, type)
            and hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"))


def array_library(obj: Any) -> str:
    """The top-level module of the array's type: ``numpy``, ``cupy``..."""
    return type(obj).__module__.split(".", 1)[0]


def as_tensor(arr: Any, *, writable: bool = False) -> torch.Tensor | None:
    """A torch view of ``arr``'s memory, or None when DLPack cannot export it.

    ``writable``: for loading in place; None for a read-only array (numpy >= 2.1
    exports read-only arrays through DLPack, and torch would write into them)."""
    flags = getattr(arr, "flags", None)
    read_only = flags is not None and not getattr(flags, "writeable", True)
    if writable and read_only:
        return None
    if any(s < 0 for s in getattr(arr, "strides", None) or ()):
        # torch aborts the process on a DLPack tensor with negative strides (a reversed
        # view): save a contiguous copy (the array is copied at snapshot time anyway);
        # such a view cannot be loaded in place.
        if writable:
            return None
        contiguous = getattr(sys.modules.get(array_library(arr)), "ascontiguousarray", None)
        if contiguous is None:
            return None
        arr = contiguous(arr)
    try:
        return torch.from_dlpack(arr)
    except (BufferError, RuntimeError, TypeError, ValueError):
        pass
    if writable or array_library(arr) != "numpy":
        return None
    import numpy as np

    try:  # an older numpy that refuses read-only arrays: a copy
        return torch.from_numpy(np.array(arr))
    except (TypeError, ValueError, RuntimeError):
        return None


def array_item(key: str, arr: Any) -> TensorItem | None:
    """The tensor entry for ``arr`` (captured eagerly), or None when it has no tensor view."""
    t = as_tensor(arr)
    return None if t is None else TensorItem(key, t, eager=True)


def read_array(src: LoadSource, key: str, library: str) -> Any:
    """Schedule the read of ``key`` into a new array of ``library``: a view of the new
    tensor the read fills (numpy on the host, cupy on the current cupy device), so it
    is complete once the load's reads are."""
    if library == "numpy":
        return src.read_new(key, device="cpu").numpy()
    if library == "cupy":
        try:
            import cupy
        except ImportError as e:
            raise UnsupportedStateError(
                "the checkpoint holds a cupy array here and cupy is not installed", key=key, path=src.where,
                hint="install cupy (on a CUDA machine), or put a live array of the saved shape in the state") from e
        t = src.read_new(key, device=torch.device("cuda", cupy.cuda.Device().id))
        return cupy.from_dlpack(t)
    raise UnsupportedStateError(
        f"the checkpoint holds a {library} array here and ckpt cannot make one", key=key, path=src.where,
        hint="put a live array of the saved shape in the state to load into it")


class ArrayProvider:
    """One top-level array. Loaded in place (shape must match), or replaced in the state
    dict by a new array when the live one is read-only."""

    def __init__(self, arr: Any, prefix: str, ctx: DescribeContext | None = None,
                 set: Callable[[Any], None] | None = None, item: TensorItem | None = None) -> None:
        self.arr = arr
        self.prefix = prefix
        self._set = set
        self._item = item

    def items(self) -> Iterator[Item]:
        item, self._item = self._item or array_item(self.prefix, self.arr), None
        if item is None:
            raise UnsupportedStateError(
                f"a {type(self.arr).__name__} with dtype {getattr(self.arr, 'dtype', '?')} has no DLPack "
                "tensor view", key=self.prefix,
                hint="convert it to a numeric array (or a torch tensor) before saving")
        yield item

    def load(self, src: LoadSource) -> Finalizer | None:
        if not src.has(self.prefix):
            src.missing(self.prefix)
            return None
        dest = as_tensor(self.arr, writable=True)
        if dest is not None:
            src.read_into(self.prefix, dest)
            return None
        setter = self._set
        if setter is None:
            raise UnsupportedStateError(
                "the live array is read-only and cannot be loaded in place", key=self.prefix, path=src.where,
                hint="make it writable (arr.flags.writeable = True) or pass a copy")
        new = read_array(src, self.prefix, array_library(self.arr))

        def finish() -> None:
            setter(new)

        return finish
