"""Recycling (local storage only, off by default).

Retention keeps the tree of one retired checkpoint (its manifest deleted first: it is no
longer a checkpoint) as ``.tmp-recycle-<id>/``; the next save renames it to its write
directory and overwrites its files in place, so a checkpoint of an unchanged state
allocates no inode and no block: creating and deleting a few hundred files per checkpoint
is most of what a save costs the loop on file systems where inode allocation is expensive
(on tmpfs, the memory tier's, a new page costs its first touch).

Taking a slot sets every file's modification time to the epoch: a file the save rewrites
gets a new one, so before the commit every file still at the epoch is another step's and
is deleted (:func:`prune_stale`), whether or not the new manifest names it. A checkpoint
committed in a recycled tree holds this save's bytes only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any

from ckpt._format import MANIFEST, TMP_PREFIX
from ckpt.errors import CheckpointNotFoundError
from ckpt.storage import Storage

try:
    import fcntl
except ImportError:  # not POSIX: no reader locks, and no recycling either
    fcntl = None  # type: ignore[assignment]

__all__ = ["RECYCLE_PREFIX", "reading", "retiring", "to_slot", "retire", "take_recycled", "prune_recycled", "prune_stale",
           "prune_unplanned", "purge_recycled"]

RECYCLE_PREFIX = f"{TMP_PREFIX}recycle-"
log = logging.getLogger("ckpt")


def _lockable(storage: Storage) -> bool:
    return storage.capabilities.atomic_rename and storage.capabilities.local and fcntl is not None


@contextlib.contextmanager
def reading(storage: Storage, name: str) -> Iterator[None]:
    """Hold checkpoint ``name`` against recycling while it is read: a shared ``flock`` on
    its manifest (local storage; elsewhere nothing). A retirement that finds it held
    deletes the tree instead of recycling it, so a reader never reads another step's
    bytes: its open files keep their data, a file it opens later is gone (a typed error).
    A manifest unlinked while this waited for the lock (retired meanwhile) is
    :class:`~ckpt.errors.CheckpointNotFoundError`; a missing one is left to the reader's
    own error."""
    if not _lockable(storage):
        yield
        return
    try:
        fd = os.open(storage.local_path(f"{name}/{MANIFEST}"), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        if os.fstat(fd).st_nlink == 0:
            raise CheckpointNotFoundError(
                "this checkpoint was retired as it was opened (retention removed it)", path=storage.describe(name),
                hint="load a newer checkpoint of the run (`ckpt ls RUN` lists them), or keep more of them")
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def retiring(storage: Storage, name: str) -> Iterator[bool]:
    """Take checkpoint ``name`` out of its run: its manifest is deleted at once (it is no
    longer a checkpoint); the block is told whether its files may be reused (local
    storage that renames, and no reader holds it: :func:`reading`), and until the block
    ends no reader can begin. Where False, the caller deletes the tree."""
    where = f"{name}/{MANIFEST}"
    if not _lockable(storage):
        storage.delete(where)
        yield False
        return
    try:
        fd: int | None = os.open(storage.local_path(where), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        fd = None
    try:
        free = True
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a reader holds it: its bytes must stay as they are
                free = False
        storage.delete(where)
        yield free
    finally:
        if fd is not None:
            os.close(fd)


def to_slot(storage: Storage, name: str) -> bool:
    """Rename ``name``'s tree (taken out by :func:`retiring`, which allowed reuse) to the
    one recycle slot; False (the caller deletes it) where it cannot or a slot exists."""
    if any(d.startswith(RECYCLE_PREFIX) for d in storage.list_dirs("")):
        return False
    try:
        storage.rename_dir(name, f"{RECYCLE_PREFIX}{uuid.uuid4().hex[:12]}")
    except OSError:
        return False
    return True


def retire(storage: Storage, name: str) -> bool:
    """Take ``name`` out of its run (its manifest deleted) and keep its tree as the recycle
    slot; False where the caller must delete the tree instead (see :func:`retiring`)."""
    with retiring(storage, name) as free:
        return free and to_slot(storage, name)


def take_recycled(storage: Storage, write_dir: str) -> set[str] | None:
    """Rename a recycle slot to ``write_dir``; the files it holds (checkpoint-relative
    paths), or None where there was none (the save writes a fresh tree)."""
    if not (storage.capabilities.atomic_rename and storage.capabilities.local):
        return None
    try:
        dirs = storage.list_dirs("")
    except OSError:  # the save itself reports what is wrong with the run directory
        return None
    for d in dirs:
        if not d.startswith(RECYCLE_PREFIX):
            continue
        try:
            storage.rename_dir(d, write_dir)
        except OSError:  # taken or deleted meanwhile
            continue
        return _mark_stale(os.fspath(storage.local_path(write_dir)))
    return None


def _walk_tree(root: str, dirs: list[str] | None = None) -> Iterator[tuple[str, str]]:
    """(path, root-relative path with ``/``) of every file under ``root``, in one
    ``scandir`` per directory (no ``stat``: the files of a checkpoint are hundreds, and
    every save into a recycled tree walks them twice). Directory links are not followed
    (nor listed); ``dirs`` receives each directory below ``root``, parents first."""
    stack = [(root, "")]
    while stack:
        d, rel = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:  # deleted meanwhile
            continue
        with it:
            for e in it:
                try:
                    is_dir = e.is_dir()
                    if is_dir and e.is_symlink():
                        continue
                except OSError:
                    continue
                if is_dir:
                    stack.append((e.path, f"{rel}{e.name}/"))
                    if dirs is not None:
                        dirs.append(e.path)
                else:
                    yield e.path, f"{rel}{e.name}"


def _mark_stale(root: str) -> set[str]:
    """Every file under ``root`` gets the epoch as its modification time (one that cannot
    be marked is deleted); the files (root-relative paths)."""
    out = set()
    for path, rel in _walk_tree(root):
        try:
            os.utime(path, ns=(0, 0), follow_symlinks=False)
        except OSError:
            try:
                os.unlink(path)
            except OSError:
                pass
            continue
        out.add(rel)
    return out


def prune_stale(root: str) -> int:
    """Delete every file under ``root`` still at the epoch (not rewritten since its tree
    was taken as a slot), then empty directories. Returns how many files went."""
    gone = 0
    dirs: list[str] = []
    for path, _rel in _walk_tree(root, dirs):
        try:
            if os.lstat(path).st_mtime_ns == 0:
                os.unlink(path)
                gone += 1
        except FileNotFoundError:
            pass
    for d in reversed(dirs):  # children before their parents
        try:
            os.rmdir(d)  # only an empty one goes
        except OSError:
            pass
    return gone


def prune_unplanned(storage: Storage, write_dir: str, files: set[str], entries: dict[str, Any]) -> int:
    """Once a save into a recycled tree knows its plan, and before it writes: delete the
    tree's ``files`` that no object of the plan (``entries``: its tensor entries) will
    overwrite, so a state whose tensors changed name never holds the old tree and the new
    one at once (the peak stays that of a save without recycling). Pickled values (a
    handful of small files) are left to :func:`prune_recycled`. Returns how many went."""
    from ckpt._engine._layout import expected_objects
    from ckpt._format import Manifest

    keep = set(expected_objects(Manifest(step=None, entries=entries)))
    root = storage.local_path(write_dir)
    gone = 0
    for rel in files - keep:
        if rel.startswith("objects/"):
            continue
        try:
            os.unlink(root / rel)
            gone += 1
        except OSError:  # already gone; prune_recycled gets what is left before the commit
            pass
    return gone


def prune_recycled(storage: Storage, write_dir: str) -> int:
    """Before the commit of a save into a recycled tree: delete the files the save did not
    rewrite (another step's bytes, valid checksums included), then empty directories."""
    return prune_stale(os.fspath(storage.local_path(write_dir)))


def purge_recycled(storage: Storage) -> None:
    """Delete the recycle slots (a run that ends keeps no retired trees)."""
    if not storage.capabilities.atomic_rename:
        return
    try:
        dirs = storage.list_dirs("")
    except OSError as e:  # never an error of its own: the run directory's trouble shows elsewhere
        log.warning("ckpt: could not list %s for recycle slots: %r", storage.describe(""), e)
        return
    for d in dirs:
        if d.startswith(RECYCLE_PREFIX):
            try:
                storage.delete_dir(d)
            except OSError as e:
                log.warning("ckpt: could not delete %s: %r", storage.describe(d), e)
