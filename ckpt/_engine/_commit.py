"""Commit strategies and reading committed checkpoints.

On storage with atomic directory rename (local disk), a checkpoint is written under
``.tmp-<name>-<id>/``, manifest.json last inside it, then renamed to ``<name>/``: the
rename is the commit. On object stores, data is written under ``<name>/`` and the single
PUT of ``<name>/manifest.json`` is the commit. Either way a checkpoint is committed iff
``<name>/manifest.json`` exists.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from ckpt._format import MANIFEST, TMP_PREFIX, Manifest, parse_step_dirname
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
                out.append(CheckpointInfo(d, storage.describe(d), step, False, "temporary directory of an unfinished save"))
            continue
        committed = storage.exists(f"{d}/{MANIFEST}")
        if committed or include_incomplete:
            out.append(CheckpointInfo(d, storage.describe(d), step, committed,
                                      "" if committed else "no manifest.json: the save never committed"))
    return sorted(out, reverse=True)
