"""All or nothing for a load: what the caller's objects were before it wrote to them.

Before the first byte of a load lands, every destination tensor of the caller is copied
to host memory, once each; :meth:`UndoLog.rollback` copies them back and runs the undos
providers registered for what they changed before the reads (a fresh optimizer's state
created to load into). Cost: host memory equal to the caller's bytes written, one copy
before the reads (device-to-host for CUDA state), another only after a failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class UndoLog:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._backups: list[tuple[torch.Tensor, torch.Tensor]] = []  # (caller's destination, its old values)
        self._seen: set[tuple[Any, ...]] = set()
        self._undo: list[Callable[[], None]] = []

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for _, b in self._backups)

    def on_rollback(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def keep(self, dests: Iterable[torch.Tensor]) -> None:
        """Copy each destination (not yet copied: tied tensors once) to host memory."""
        if not self.enabled:
            return
        for d in dests:
            if d.numel() == 0:
                continue
            ident = (d.device, d.data_ptr(), tuple(d.shape), d.stride(), d.dtype)
            if ident in self._seen:
                continue
            self._seen.add(ident)
            self._backups.append((d, d.detach().to("cpu", copy=True)))

    def rollback(self) -> None:
        """Put every kept destination back, then run the undos (newest first)."""
        with torch.no_grad():
            for dest, saved in reversed(self._backups):
                dest.copy_(saved)
        if any(d.device.type == "cuda" for d, _ in self._backups):
            torch.cuda.synchronize()
        for undo in reversed(self._undo):
            undo()
        self._backups, self._seen, self._undo = [], set(), []
