"""Recycling (local storage only, off by default).

Retention keeps the tree of one retired checkpoint (its manifest deleted first: it is no
longer a checkpoint) as ``.tmp-recycle-<id>/``; the next save renames it to its write
directory and overwrites its files in place, so a checkpoint of an unchanged state
allocates no inode and no block: creating and deleting a few hundred files per checkpoint
is most of what a save costs the loop on file systems where inode allocation is expensive.
"""

from __future__ import annotations

import logging
import os
import uuid

from ckpt._engine._layout import pickle_objects, stored_arrays
from ckpt._format import MANIFEST, TMP_PREFIX, Manifest
from ckpt.storage import Storage

__all__ = ["RECYCLE_PREFIX", "retire", "take_recycled", "prune_recycled", "purge_recycled"]

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
        root = storage.local_path(write_dir)
        return {os.path.relpath(os.path.join(dp, f), root).replace(os.sep, "/")
                for dp, _dn, fn in os.walk(root) for f in fn}
    return None


def prune_recycled(storage: Storage, write_dir: str, manifest: Manifest, old_files: set[str]) -> int:
    """Before the commit of a save into a recycled tree: delete the old files the new
    manifest does not refer to (the state's structure changed), then empty directories.
    Only files the tree held before the save are candidates. Returns how many went."""
    keep = {MANIFEST}
    for a in stored_arrays(manifest):
        keep.add(f"{a.path}/zarr.json")
        keep.update(path for _, path, _ in a.shards())
    keep.update(path for _, path in pickle_objects(manifest))
    root = storage.local_path(write_dir)
    gone = sorted(old_files - keep)
    for rel in gone:
        try:
            os.unlink(os.path.join(root, rel))
        except FileNotFoundError:
            pass
    for dp, _dn, _fn in sorted(os.walk(root), key=lambda w: -len(w[0])):
        if dp != str(root):
            try:
                os.rmdir(dp)  # only an empty one goes
            except OSError:
                pass
    return len(gone)


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
