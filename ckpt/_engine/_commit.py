"""Commit strategies and reading committed checkpoints.

On storage with atomic directory rename (local disk), a checkpoint is written under
``.tmp-<name>-<id>/``, manifest.json last inside it, then renamed to ``<name>/``: the
rename is the commit. On object stores, data is written under ``<name>/`` and the single
PUT of ``<name>/manifest.json`` is the commit. Either way a checkpoint is committed iff
``<name>/manifest.json`` exists.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any

from ckpt._engine._globalplan import GlobalPlan
from ckpt._engine._layout import pickle_objects, stored_arrays
from ckpt._format import MANIFEST, TMP_PREFIX, Manifest, key_to_path, parse_step_dirname
from ckpt.errors import CheckpointExistsError, CheckpointNotFoundError, IncompleteCheckpointError
from ckpt.storage import Storage


def commit(storage: Storage, write_dir: str, name: str, manifest: bytes, *, overwrite: bool) -> None:
    if storage.capabilities.atomic_rename:
        storage.write_bytes(f"{write_dir}/{MANIFEST}", manifest)
        if storage.exists(name):
            if not storage.exists(f"{name}/{MANIFEST}"):
                storage.delete_dir(name)  # debris of an uncommitted save under the final name
            elif overwrite:
                trash = f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
                storage.rename_dir(name, trash)
                storage.rename_dir(write_dir, name)
                storage.delete_dir(trash)
                return
            else:
                raise CheckpointExistsError("a committed checkpoint appeared here during the save",
                                            path=storage.describe(name),
                                            hint="save under another step/name, or pass overwrite=True")
        try:
            storage.rename_dir(write_dir, name)
        except FileExistsError:  # another saver of the same name committed between the check and here
            raise CheckpointExistsError("a committed checkpoint appeared here during the save",
                                        path=storage.describe(name),
                                        hint="save under another step/name, or pass overwrite=True") from None
    else:
        if overwrite and storage.exists(f"{name}/{MANIFEST}"):
            # Object stores cannot swap atomically: the new manifest replaces the old one in
            # one PUT; objects whose paths changed are left for `ckpt gc`.
            pass
        storage.write_bytes(f"{name}/{MANIFEST}", manifest)


TRASH_PREFIX = f"{TMP_PREFIX}trash-"
RECYCLE_PREFIX = f"{TMP_PREFIX}recycle-"
log = logging.getLogger("ckpt")


# Recycling (local storage). Retention keeps the tree of one retired checkpoint (its
# manifest deleted first: it is no longer a checkpoint) as ``.tmp-recycle-<id>/``; the
# next save renames it to its write directory and overwrites its files in place, so a
# checkpoint of an unchanged state allocates no inode and no block: creating and deleting
# a few hundred files per checkpoint is most of what a save costs the loop on file systems
# where inode allocation is expensive (ext4 without a journal skips recently freed inodes).


def build_manifest(plan: GlobalPlan, *, step: int | None, world_size: int, rank_values: list[Any],
                   values: dict[str, Any], pickles: dict[str, bytes], user_metadata: dict[str, Any]) -> Manifest:
    """The manifest of a save every rank finished: the plan's tensor entries, the plain
    values (JSON, or a pickle object each), each rank's per-rank values."""
    manifest = Manifest(
        step=step, entries=dict(plan.entries), world_size=world_size,
        layout={"bytes_per_rank": [plan.bytes_per_rank.get(r, 0) for r in range(world_size)]},
        rank_state={str(r): v for r, v in enumerate(rank_values)}, user_metadata=user_metadata)
    for key, value in values.items():
        manifest.entries[key] = {"kind": "json", "value": value}
    for key in pickles:
        manifest.entries[key] = {"kind": "pickle", "path": f"objects/{key_to_path(key)}.pkl", "format": "pickle"}
    return manifest


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


def recover_overwrites(storage: Storage) -> list[str]:
    """Put back committed checkpoints that an overwrite moved aside and a crash left there.

    An overwrite renames ``<name>`` to ``.tmp-trash-<name>-<id>``, renames the new
    checkpoint into place, then deletes the trash. A crash between the two renames leaves
    ``<name>`` missing and the old, committed checkpoint in the trash: rename it back.
    Returns the names recovered. Only storage with atomic rename ever has trash."""
    if not storage.capabilities.atomic_rename:
        return []
    recovered = []
    for d in storage.list_dirs(""):
        if not d.startswith(TRASH_PREFIX):
            continue
        name = d[len(TRASH_PREFIX):].rsplit("-", 1)[0]
        if name and not storage.exists(name) and storage.exists(f"{d}/{MANIFEST}"):
            try:
                storage.rename_dir(d, name)
                recovered.append(name)
            except FileExistsError:
                pass
    return recovered


def read_manifest(storage: Storage, name: str) -> Manifest:
    where = storage.describe(name)
    try:
        data = storage.read_bytes(f"{name}/{MANIFEST}")
    except (FileNotFoundError, NotADirectoryError):
        if storage.exists(f"{name}/.metadata"):
            raise CheckpointNotFoundError(
                "this is a torch.distributed.checkpoint (DCP) checkpoint, not a ckpt one", path=where,
                hint=f"convert it once with `ckpt import {where} RUN/step-000000000` (add `--prefix` if the "
                     "state dict is one object's), then load that; or read it with dcp.load") from None
        if storage.exists(name) and not _holds_ckpt_data(storage, name):
            raise CheckpointNotFoundError(
                "this is not a ckpt checkpoint: no manifest.json and no checkpoint data", path=where,
                hint="point at one checkpoint of a run (RUN/step-000000100); `ckpt ls RUN` lists them") from None
        if storage.exists(name):
            raise IncompleteCheckpointError(
                "this checkpoint has data but no manifest: its save never committed", path=where,
                hint="load an earlier checkpoint; `ckpt gc` removes the debris") from None
        raise CheckpointNotFoundError("no checkpoint here", path=where,
                                      hint="check the URL; `ckpt ls RUN` lists committed checkpoints") from None
    return Manifest.from_json(data, where=where)


def _holds_ckpt_data(storage: Storage, name: str) -> bool:
    """Whether ``name`` holds data a ckpt save writes (arrays, packs, pickled objects)."""
    try:
        return any(d in ("arrays", "packs", "objects") for d in storage.list_dirs(name))
    except OSError:
        return False


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint directory of a run."""

    name: str
    url: str
    step: int | None
    committed: bool
    reason: str = ""  # why it is not committed

    def __lt__(self, other: Any) -> bool:
        return (self.step or -1, self.name) < (other.step or -1, other.name)


def list_run(storage: Storage, *, include_incomplete: bool = False) -> list[CheckpointInfo]:
    """Checkpoints of a run, newest first; only committed ones unless asked."""
    out = []
    for d in storage.list_dirs(""):
        tmp = d.startswith(TMP_PREFIX)
        step = parse_step_dirname(d[len(TMP_PREFIX):].rsplit("-", 1)[0] if tmp else d)
        if tmp:
            if include_incomplete:
                why = ("a retired checkpoint's tree, kept for the next save to overwrite"
                       if d.startswith(RECYCLE_PREFIX) else "temporary directory of an unfinished save")
                out.append(CheckpointInfo(d, storage.describe(d), step, False, why))
            continue
        committed = storage.exists(f"{d}/{MANIFEST}")
        if committed or include_incomplete:
            out.append(CheckpointInfo(d, storage.describe(d), step, committed,
                                      "" if committed else "no manifest.json: the save never committed"))
    return sorted(out, reverse=True)
