"""How a checkpoint commits: one strategy per kind of storage, chosen once from its
capabilities by :func:`commit_strategy`. Either way a checkpoint is committed iff
``<name>/manifest.json`` exists, and it is written last.

- :class:`RenameCommit` (storage with atomic directory rename: local disk): the ranks
  write under ``.tmp-<name>-<id>/``, rank 0 writes manifest.json inside it, then renames
  it to ``<name>/``; the rename is the commit.
- :class:`NodeCommit` (the memory tier's node directories): a save spread over nodes,
  each with a storage of its own. Rank 0 commits in its node's as :class:`RenameCommit`
  does; every other node's leader then commits the same manifest in its own, by the
  same rename (:meth:`NodeCommit.node_target` finds what that node's ranks wrote).
- :class:`ManifestPutCommit` (object stores): the ranks write under ``<name>/data-<id>/``,
  a prefix of this save's own, and the manifest's object paths start with it; the single
  PUT of ``<name>/manifest.json`` is the commit. The PUT is conditional (``If-None-Match:
  *``) unless the save overwrites, and is read back, so of two savers of one name exactly
  one commits and the other gets CheckpointExistsError; neither touches the other's data.

Call sequence (rank 0 for all but the writes): ``target(name)`` once, every rank writes
under ``target.dir``, then ``commit(...)``; a save that will not commit calls
``discard(target, name)`` instead, which never deletes a committed checkpoint.
"""

from __future__ import annotations

import abc
import os
import uuid
from dataclasses import dataclass

from ckpt._engine._manifest import object_paths
from ckpt._format import MANIFEST, TMP_PREFIX, Manifest
from ckpt.errors import CheckpointError, CheckpointExistsError
from ckpt.storage import Storage

__all__ = ["WriteTarget", "CommitStrategy", "RenameCommit", "NodeCommit", "ManifestPutCommit", "commit_strategy",
           "DATA_PREFIX", "TRASH_PREFIX"]

TRASH_PREFIX = f"{TMP_PREFIX}trash-"
DATA_PREFIX = "data-"
_EXISTS_HINT = "save under another step/name, or pass overwrite=True"


@dataclass(frozen=True)
class WriteTarget:
    """Where one save writes: ``dir`` (storage-relative) holds every object of the
    checkpoint; ``prefix`` is that directory relative to the checkpoint (the manifest's
    object paths start with it), empty where the commit moves ``dir`` into place."""

    dir: str
    prefix: str = ""


class CommitStrategy(abc.ABC):
    """How checkpoints commit on one storage."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    @abc.abstractmethod
    def target(self, name: str) -> WriteTarget:
        """A fresh place for one save of checkpoint ``name`` to write into."""

    @abc.abstractmethod
    def commit(self, target: WriteTarget, name: str, manifest: bytes, *, overwrite: bool) -> None:
        """Make the save whose objects are all durable under ``target`` the checkpoint
        ``name``. CheckpointExistsError if another checkpoint of that name is committed
        (unless ``overwrite``)."""

    def discard(self, target: WriteTarget, name: str) -> None:
        """Delete what a save that does not commit wrote (only its own objects)."""
        self.storage.delete_dir(target.dir)

    def recover(self) -> list[str]:
        """Put back checkpoints an interrupted commit left aside; the names recovered."""
        return []

    def _exists(self, name: str) -> CheckpointExistsError:
        return CheckpointExistsError("a committed checkpoint appeared here during the save",
                                     path=self.storage.describe(name), hint=_EXISTS_HINT)


class RenameCommit(CommitStrategy):
    """Write under a temporary directory, rename it into place."""

    def target(self, name: str) -> WriteTarget:
        return WriteTarget(f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:12]}")

    def commit(self, target: WriteTarget, name: str, manifest: bytes, *, overwrite: bool) -> None:
        st = self.storage
        st.write_bytes(f"{target.dir}/{MANIFEST}", manifest)
        if st.exists(name):
            if not st.exists(f"{name}/{MANIFEST}"):
                st.delete_dir(name)  # debris of an uncommitted save under the final name
            elif not overwrite:
                raise self._exists(name)
            else:
                trash = f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
                st.rename_dir(name, trash)
                st.rename_dir(target.dir, name)
                st.delete_dir(trash)
                return
        try:
            st.rename_dir(target.dir, name)
        except FileExistsError:  # another saver of the same name committed between the check and here
            raise self._exists(name) from None

    def recover(self) -> list[str]:
        """An overwrite renames ``<name>`` to ``.tmp-trash-<name>-<id>``, renames the new
        checkpoint into place, then deletes the trash. A crash between the two renames
        leaves ``<name>`` missing and the old, committed checkpoint in the trash: rename
        it back."""
        st = self.storage
        recovered = []
        for d in st.list_dirs(""):
            if not d.startswith(TRASH_PREFIX):
                continue
            name = d[len(TRASH_PREFIX):].rsplit("-", 1)[0]
            if name and not st.exists(name) and st.exists(f"{d}/{MANIFEST}"):
                try:
                    st.rename_dir(d, name)
                    recovered.append(name)
                except FileExistsError:
                    pass
        return recovered


class NodeCommit(RenameCommit):
    """The commit of one node's share of a save whose ranks write into per-node storage
    (the memory tier's), on a node other than rank 0's. That node's ranks wrote under the
    save's temporary directory; the leader writes rank 0's manifest into it and renames it
    into place, always overwriting (the tier's step names repeat when a job goes back to
    an older checkpoint). An older copy of the step is swapped out through the trash, as
    :meth:`RenameCommit.commit` does: a crash at any point leaves the older copy or the new
    one whole, and :meth:`recover` (run before a restore reads the node) puts a swapped-out
    copy back where the new one never arrived.

    As the strategy of the tier's saves (every rank's, ``leader``: this rank is its
    node's lowest), each node's leader renames its node's recycle slot into the save's
    write directory, not rank 0 alone."""

    def __init__(self, storage: Storage, *, leader: bool = False) -> None:
        super().__init__(storage)
        self.leader = leader

    def node_target(self, name: str) -> WriteTarget:
        """This node's write directory of the newest save of ``name`` (a directory of its
        own where this node's ranks were given nothing to write); older unfinished ones
        are deleted."""
        st = self.storage
        prefix = f"{TMP_PREFIX}{name}-"
        tmps = [d for d in st.list_dirs("") if d.startswith(prefix)]
        if not tmps:
            d = f"{prefix}{uuid.uuid4().hex[:12]}"
            os.makedirs(st.local_path(d))
            return WriteTarget(d)
        tmps.sort(key=lambda d: os.stat(st.local_path(d)).st_mtime)
        for old in tmps[:-1]:
            st.delete_dir(old)
        return WriteTarget(tmps[-1])


class ManifestPutCommit(CommitStrategy):
    """Write under a prefix of the save's own inside the checkpoint, PUT the manifest."""

    def target(self, name: str) -> WriteTarget:
        prefix = f"{DATA_PREFIX}{uuid.uuid4().hex[:12]}"
        return WriteTarget(f"{name}/{prefix}", prefix)

    def commit(self, target: WriteTarget, name: str, manifest: bytes, *, overwrite: bool) -> None:
        st = self.storage
        path = f"{name}/{MANIFEST}"
        if overwrite:
            replaced = self._prefixes_of(name) - {target.prefix}
            st.write_bytes(path, manifest)
        else:
            replaced = set()
            try:
                st.create_bytes(path, manifest)
            except FileExistsError:
                raise self._exists(name) from None
        # A server that ignores conditional writes lets a later saver replace the
        # manifest: then that saver's checkpoint (whole, in its own prefix) is the one.
        if st.read_bytes(path) != manifest:
            raise self._exists(name)
        for d in sorted(replaced):  # the replaced checkpoint's objects; other saves' stay
            st.delete_dir(f"{name}/{d}")

    def _prefixes_of(self, name: str) -> set[str]:
        """The top directories of the objects the committed ``name`` refers to."""
        try:
            old = Manifest.from_json(self.storage.read_bytes(f"{name}/{MANIFEST}"), where=self.storage.describe(name))
        except (FileNotFoundError, CheckpointError):
            return set()  # nothing committed, or unreadable: `ckpt gc` judges what is left
        return {p.split("/", 1)[0] for p in object_paths(old.entries)}


def commit_strategy(storage: Storage) -> CommitStrategy:
    """The commit strategy for ``storage``: rename where it renames atomically, else the
    manifest PUT."""
    return RenameCommit(storage) if storage.capabilities.atomic_rename else ManifestPutCommit(storage)
