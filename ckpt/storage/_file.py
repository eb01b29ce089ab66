"""Local file-system storage: atomic object writes (temp file, fsync, rename) and atomic
directory rename for commits."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from ckpt.errors import (
    NotADirectoryPathError,
    StorageError,
    StorageFullError,
    StoragePermissionError,
)
from ckpt.storage._base import Capabilities, ObjectInfo, Storage


def _translate(exc: OSError, what: str, where: str) -> Exception:
    if isinstance(exc, FileNotFoundError | FileExistsError | IsADirectoryError | NotADirectoryError):
        return exc
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return StorageFullError(f"no space left while {what}", path=where,
                                hint="free space on the device or point the run at a larger one; "
                                     "committed checkpoints are untouched")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoragePermissionError(f"permission denied while {what}", path=where,
                                      hint="check the directory's owner and mode, or choose a writable location")
    return StorageError(f"I/O error while {what}: {exc}", path=where)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class FileStorage(Storage):
    """Storage rooted at a local directory (which need not exist yet)."""

    capabilities = Capabilities(atomic_rename=True, local=True)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.abspath(os.fspath(root)))
        self.url = str(self.root)

    def local_path(self, path: str = "") -> Path:
        return self.root / path if path else self.root

    def read_bytes(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        p = self.local_path(path)
        try:
            with open(p, "rb") as f:
                if start:
                    f.seek(start)
                if end is None:
                    return f.read()
                return f.read(end - (start or 0))
        except OSError as e:
            raise _translate(e, "reading", str(p)) from e

    def write_bytes(self, path: str, data: bytes | memoryview) -> None:
        self._put(path, data, exclusive=False)

    def create_bytes(self, path: str, data: bytes | memoryview) -> None:
        """Atomic: the bytes go to a temporary file that is then hard-linked into place,
        which fails where ``path`` exists (FileExistsError)."""
        self._put(path, data, exclusive=True)

    def _put(self, path: str, data: bytes | memoryview, *, exclusive: bool) -> None:
        p = self.local_path(path)
        tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            for attempt in range(3):
                p.parent.mkdir(parents=True, exist_ok=True)
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    break
                except FileNotFoundError:  # a delete emptied and removed the parent meanwhile
                    if attempt == 2:
                        raise
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            if exclusive:
                os.link(tmp, p)  # FileExistsError where another writer was first
                tmp.unlink()
            else:
                os.replace(tmp, p)
            fsync_dir(p.parent)
        except OSError as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            if exclusive and isinstance(e, FileExistsError):
                raise FileExistsError(f"{self.describe(path)} exists") from None
            raise _translate(e, "writing", str(p)) from e

    def exists(self, path: str) -> bool:
        return self.local_path(path).exists()

    def size(self, path: str) -> int:
        p = self.local_path(path)
        try:
            return p.stat().st_size
        except OSError as e:
            raise _translate(e, "reading the size of", str(p)) from e

    def list_dirs(self, prefix: str = "") -> list[str]:
        p = self.local_path(prefix)
        try:
            return sorted(e.name for e in os.scandir(p) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise NotADirectoryPathError("this location is a file, not a directory of checkpoints", path=str(p),
                                         hint="point the run at a directory (or a path that does not exist yet)") \
                from None
        except OSError as e:
            raise _translate(e, "listing", str(p)) from e

    def list_files(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.local_path(prefix)
        out: list[ObjectInfo] = []
        if base.is_file():
            return [ObjectInfo(prefix, base.stat().st_size)]
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                full = Path(dirpath) / name
                try:
                    size = full.lstat().st_size
                except FileNotFoundError:
                    continue
                out.append(ObjectInfo(full.relative_to(self.root).as_posix(), size))
        return sorted(out, key=lambda o: o.path)

    def delete(self, path: str) -> None:
        p = self.local_path(path)
        try:
            p.unlink()
        except FileNotFoundError:
            return
        except OSError as e:
            raise _translate(e, "deleting", str(p)) from e
        self._remove_empty_parents(p.parent)

    def _remove_empty_parents(self, d: Path) -> None:
        """A directory goes with its last object, as a prefix of an object store does, so
        ``exists`` and ``list_dirs`` agree on both. Up to the root, never the root; a
        directory that holds anything stays (rmdir refuses it), so a writer filling it
        meanwhile keeps it (``write_bytes`` recreates one removed under it)."""
        while d != self.root and self.root in d.parents:
            try:
                os.rmdir(d)
            except OSError:
                return
            d = d.parent

    def delete_dir(self, prefix: str) -> None:
        p = self.local_path(prefix)
        if p == self.root and not prefix:
            raise StorageError("refusing to delete the storage root", path=str(p))
        try:
            shutil.rmtree(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _translate(e, "deleting", str(p)) from e

    def rename_dir(self, src: str, dst: str) -> None:
        s, d = self.local_path(src), self.local_path(dst)
        if d.exists():
            raise FileExistsError(errno.EEXIST, "destination exists", str(d))
        try:
            d.parent.mkdir(parents=True, exist_ok=True)
            os.rename(s, d)
            fsync_dir(d.parent)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another writer renamed first
                raise FileExistsError(errno.EEXIST, "destination exists", str(d)) from e
            raise _translate(e, "renaming", f"{s} -> {d}") from e

    def kvstore_spec(self, path: str) -> dict[str, Any]:
        return {"driver": "file", "path": str(self.local_path(path)) + "/"}
