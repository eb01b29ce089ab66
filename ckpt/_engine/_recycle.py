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

import logging
import os
import uuid

from ckpt._format import TMP_PREFIX
from ckpt.storage import Storage

__all__ = ["RECYCLE_PREFIX", "retire", "take_recycled", "prune_recycled", "prune_stale",
           "purge_recycled"]

RECYCLE_PREFIX = f"{TMP_PREFIX}recycle-"
log = logging.getLogger("ckpt")


def retire(storage: Storage, name: str) -> bool:
    """Keep ``name``'s tree (its manifest already deleted) as the one recycle slot; False
    (the caller deletes it) where the storage cannot rename or a slot exists."""
    if not (storage.capabilities.atomic_rename and storage.capabilities.local):
        return False
    if any(d.startswith(RECYCLE_PREFIX) for d in storage.list_dirs("")):
        return False
    try:
        storage.rename_dir(name, f"{RECYCLE_PREFIX}{uuid.uuid4().hex[:12]}")
    except OSError:
        return False
    return True


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


def _mark_stale(root: str) -> set[str]:
    """Every file under ``root`` gets the epoch as its modification time (one that cannot
    be marked is deleted); the files (root-relative paths)."""
    out = set()
    for dp, _dn, fn in os.walk(root):
        for f in fn:
            path = os.path.join(dp, f)
            try:
                os.utime(path, ns=(0, 0), follow_symlinks=False)
            except OSError:
                try:
                    os.unlink(path)
                except OSError:
                    pass
                continue
            out.add(os.path.relpath(path, root).replace(os.sep, "/"))
    return out


def prune_stale(root: str) -> int:
    """Delete every file under ``root`` still at the epoch (not rewritten since its tree
    was taken as a slot), then empty directories. Returns how many files went."""
    gone = 0
    for dp, _dn, fn in os.walk(root):
        for f in fn:
            path = os.path.join(dp, f)
            try:
                if os.lstat(path).st_mtime_ns == 0:
                    os.unlink(path)
                    gone += 1
            except FileNotFoundError:
                pass
    for dp, _dn, _fn in sorted(os.walk(root), key=lambda w: -len(w[0])):
        if dp != root:
            try:
                os.rmdir(dp)  # only an empty one goes
            except OSError:
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
