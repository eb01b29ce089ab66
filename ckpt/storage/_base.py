"""The one interface every storage backend implements.

A :class:`Storage` is rooted at a URL (a local directory, ``memory://name``,
``s3://bucket/prefix``). Every path it takes is *relative to that root*, ``/``-separated,
never absolute and never containing ``..`` (callers validate with
:func:`ckpt._format.check_relpath`; backends may assume it).

Call sequence during a save, per rank (the engine's side of the contract):

1. ``kvstore_spec(ckpt_dir)`` once, to open tensorstore arrays under the checkpoint's
   write directory; tensorstore then writes array data itself, outside the GIL.
2. ``write_bytes`` for small objects (rank 0 only: the manifest, last).
3. On backends with ``atomic_rename``: rank 0 calls ``rename_dir(tmp, final)`` as the
   commit. Elsewhere the manifest's ``create_bytes`` (``write_bytes`` to overwrite) is
   the commit, so backends without atomic rename must make a single ``write_bytes``
   atomic (S3's PUT is). See ckpt/_engine/_commit.py.

Backends do not assume that parent directories exist and create them as needed.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckpt.errors import UnsupportedOperationError

__all__ = ["Storage", "Capabilities", "ObjectInfo"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can promise.

    ``atomic_rename``: a directory can be renamed atomically (commit by rename).
    ``local``: paths are on this machine's file system: ``local_path`` gives the file, and
    the engine's local fast paths (direct reads and writes, recycling) may use it.
    ``retains_written_buffers``: tensorstore keeps a reference to the bytes written to this
    backend's kvstore (the in-memory one) instead of copying them out, so a writer must
    hand it bytes it will never reuse.
    """

    atomic_rename: bool
    local: bool = False
    retains_written_buffers: bool = False


@dataclass(frozen=True)
class ObjectInfo:
    path: str
    size: int


class Storage(abc.ABC):
    """Byte-level access to one root, plus how tensorstore reaches the same bytes."""

    #: The URL this storage is rooted at, without credentials.
    url: str
    capabilities: Capabilities

    # -- bytes --------------------------------------------------------------
    @abc.abstractmethod
    def read_bytes(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes (or ``[start, end)`` of them). FileNotFoundError if absent."""

    @abc.abstractmethod
    def write_bytes(self, path: str, data: bytes | memoryview) -> None:
        """Write an object whole and durably: readers see the old object or the new one,
        never a part. Returns once the bytes are durable (fsync'd / acknowledged)."""

    def create_bytes(self, path: str, data: bytes | memoryview) -> None:
        """Write an object only where none exists, else FileExistsError (the commit of a
        checkpoint on storage without atomic rename). Backends that can do it atomically
        override this (S3: a conditional PUT); this default checks, then writes."""
        if self.exists(path):
            raise FileExistsError(f"{self.describe(path)} exists")
        self.write_bytes(path, data)

    @abc.abstractmethod
    def exists(self, path: str) -> bool:
        """Whether an object exists at ``path`` (directories: whether anything lies under it)."""

    @abc.abstractmethod
    def size(self, path: str) -> int:
        """The object's size in bytes. FileNotFoundError if absent."""

    # -- listing and deletion -----------------------------------------------
    @abc.abstractmethod
    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the immediate sub-directories of ``prefix`` (sorted)."""

    @abc.abstractmethod
    def list_files(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under ``prefix`` at any depth, with root-relative paths (sorted)."""

    @abc.abstractmethod
    def delete(self, path: str) -> None:
        """Delete one object. Missing objects are not an error."""

    @abc.abstractmethod
    def delete_dir(self, prefix: str) -> None:
        """Delete everything under ``prefix``. A missing prefix is not an error."""

    def rename_dir(self, src: str, dst: str) -> None:
        """Atomically rename a directory (only where ``capabilities.atomic_rename``).

        Raises FileExistsError if ``dst`` exists."""
        raise UnsupportedOperationError(f"{type(self).__name__} cannot rename atomically", path=self.describe(src),
                                        hint="on storage without atomic rename a checkpoint commits by writing "
                                             "its manifest last; check `capabilities.atomic_rename` first")

    # -- tensorstore ---------------------------------------------------------
    @abc.abstractmethod
    def kvstore_spec(self, path: str) -> dict[str, Any]:
        """A tensorstore kvstore spec (JSON) for the directory ``path`` under the root."""

    def local_path(self, path: str = "") -> Path:
        """The file (or directory) of ``path`` on this machine. Only where
        ``capabilities.local``; other backends raise UnsupportedOperationError."""
        raise UnsupportedOperationError(f"{self.describe(path)} is not on a local file system",
                                        hint="check `capabilities.local` before asking for a local path")

    def ts_context(self) -> Any:
        """The tensorstore Context that arrays of this storage are opened with."""
        from ckpt.storage._tscontext import default_context

        return default_context()

    # -- helpers -------------------------------------------------------------
    def join(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in parts if p and p.strip("/"))

    def describe(self, path: str = "") -> str:
        """A human-readable location for messages: the URL of ``path``."""
        base = self.url.rstrip("/")
        return f"{base}/{path}" if path else base

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default does nothing."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
