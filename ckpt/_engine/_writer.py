"""The writer thread of a snapshot: as each staged unit's copy completes, it hands the
pool block to tensorstore (asynchronous, outside the GIL); a block returns to the pool
when its write is durable. See :mod:`ckpt._engine._save` for the whole flow."""

from __future__ import annotations

import functools
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckpt._config import lower_this_thread
from ckpt._engine._arrays import translate
from ckpt._engine._globalplan import Assignment
from ckpt._engine._layout import ObjectImage
from ckpt._engine._mapped import MappedBlock, MappedFiles
from ckpt._engine._pool import Block
from ckpt._engine._snapstate import SnapshotState


@dataclass
class WriteUnit:
    """One storage object's worth of data to stage and write."""

    assignment: Assignment | None
    region: tuple[tuple[int, ...], tuple[int, ...]]  # region within the target array
    members: list[tuple[torch.Tensor, int, tuple[str, Any]]]  # (source view, offset in block, (key, box))
    nbytes: int
    shape: tuple[int, ...]
    np_dtype: str
    path: str
    key: str
    block: Block | None = None
    event: Any = None
    image: ObjectImage | None = None  # written directly: the block holds this object's bytes
    storage_dtype: torch.dtype | None = None  # the elements' stored bits (direct array shards)
    sealed: bool = False  # the image's crc32c's and index are filled in already



class Writer(threading.Thread):
    """Waits for each unit's copy, then writes it with tensorstore; blocks go back to the
    pool when their write is durable."""

    def __init__(self, shared: SnapshotState, opening: dict[str, Any], q: queue.Queue[WriteUnit | None],
                 write_dir: str) -> None:
        super().__init__(name="ckpt-writer", daemon=True)
        self.shared = shared
        self.opening = opening  # path -> tensorstore open future
        self.arrays: dict[str, Any] = {}
        self.q = q
        self.write_dir = write_dir
        self.direct = shared.direct
        self.nice = shared.nice
        # tensorstore may keep referencing a written array; pool blocks are reused, so only
        # let it where the kvstore copies the bytes out.
        self.zero_copy = not shared.storage.capabilities.retains_written_buffers
        self.error: BaseException | None = None
        self.staged_at: float | None = None
        self._lock = threading.Lock()
        self._outstanding = 0
        self._all_done = threading.Condition(self._lock)

    def run(self) -> None:
        lower_this_thread(self.nice)
        u: WriteUnit | None = None
        ended = False  # the stager's None was taken
        try:
            while True:
                u = self.q.get()
                if u is None:
                    ended = True
                    break
                if self.error is not None or self.shared.cancel.is_set():
                    self._release(u)
                    continue
                if u.event is not None:  # sources were checked when the copy was issued (_stage):
                    u.event.synchronize()  # the optimizer step may have changed them since
                if u.image is not None:
                    self._write_direct(u)
                else:
                    self._write(u)
            for path in list(self.opening):  # zarr.json writes; arrays whose zarr.json this rank writes but no chunk
                self._array(path)
            self.staged_at = time.perf_counter()
            with self._all_done:
                while self._outstanding:
                    self._all_done.wait()
            if self.direct is not None and self.error is None:
                self.direct.finish()
        except BaseException as e:  # noqa: BLE001
            self.error = self.error or e
            self.shared.cancel.set()
            # every block goes back to the pool, or the Snapshotter's next saves would find
            # it shrunk: this unit's (if its write never started) and the queued ones
            # (the stager stops at its next unit and always ends the queue with None)
            # (u, if set, is a unit whose write was never submitted)
            try:
                if u is not None:
                    self._release(u)
            finally:
                while not ended:
                    left = self.q.get()
                    if left is None:
                        break
                    try:
                        self._release(left)
                    except BaseException:  # noqa: BLE001 - a failed device sync: keep draining
                        pass

    def _array(self, path: str) -> Any:
        arr = self.arrays.get(path)
        if arr is None:
            fut = self.opening.pop(path)
            try:
                arr = self.arrays[path] = fut.result()
            except Exception as e:
                raise translate(e, key=None, where=self.shared.storage.describe(f"{self.write_dir}/{path}"),
                                reading=False) from e
        return arr

    def _write(self, u: WriteUnit) -> None:
        assert u.block is not None
        arr = self._array(u.path)
        data = u.block.array[: u.nbytes].view(np.dtype(u.np_dtype)).reshape(u.shape)
        offs, sizes = u.region
        target = arr[tuple(slice(o, o + s) for o, s in zip(offs, sizes))]
        with self._lock:
            self._outstanding += 1
        try:
            fut = target.write(data, can_reference_source_data_indefinitely=self.zero_copy)
        except BaseException:
            self._finish(u, None)
            raise
        fut.commit.add_done_callback(lambda f, u=u: self._finish(u, f))

    def _write_direct(self, u: WriteUnit) -> None:
        assert u.block is not None and u.image is not None and self.direct is not None
        if isinstance(u.block, MappedBlock):  # the file's own pages: at most a seal left, done here
            try:  # (a pool task per object would cost a future and a thread's wake-up each)
                self.direct.write_object(u.image, u.block.array, u.key, sealed=u.sealed, in_place=True)
            except Exception as e:  # noqa: BLE001 - reported as the save's error, as a pool task's
                self._fail(u, e)
            self._release(u)
            return
        with self._lock:
            self._outstanding += 1
        try:
            fut = self.direct.submit(functools.partial(self.direct.write_object, u.image, u.block.array, u.key,
                                                       sealed=u.sealed))
        except BaseException:
            self._finish(u, None)
            raise
        fut.add_done_callback(functools.partial(self._finish, u))

    def _finish(self, u: WriteUnit, fut: Any) -> None:
        if fut is not None:
            try:
                fut.result()
            except BaseException as e:  # noqa: BLE001
                self._fail(u, e)
        self._release(u)
        with self._all_done:
            self._outstanding -= 1
            self._all_done.notify_all()

    def _fail(self, u: WriteUnit, e: BaseException) -> None:
        if self.error is None:
            where = self.shared.storage.describe(f"{self.write_dir}/{u.path}")
            self.error = translate(e, key=u.key, where=where, reading=False)
        self.shared.cancel.set()

    def _release(self, u: WriteUnit) -> None:
        if u.event is not None:  # a cancelled unit's copy may still be landing in the block
            u.event.synchronize()
        release_block(self.shared, u)
        u.members = []


def release_block(st: SnapshotState, u: WriteUnit) -> None:
    """Give ``u.block`` back: to the pool, or (a file's own pages) drop its mapping."""
    if isinstance(u.block, MappedBlock):
        MappedFiles.release(u.block)
    elif u.block is not None:
        st.pool.release(u.block)
    u.block = None
