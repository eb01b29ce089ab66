"""Reading a run: its checkpoints (committed or not) and their manifests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ckpt._engine._commit import DATA_PREFIX
from ckpt._engine._confine import refuse_symlinks
from ckpt._engine._recycle import RECYCLE_PREFIX
from ckpt._format import MANIFEST, TMP_PREFIX, Manifest, parse_step_dirname
from ckpt.errors import CheckpointError, CheckpointNotFoundError, IncompleteCheckpointError
from ckpt.storage import Storage

__all__ = ["CheckpointInfo", "list_run", "read_manifest"]


def read_manifest(storage: Storage, name: str) -> Manifest:
    where = storage.describe(name)
    refuse_symlinks(storage, name, MANIFEST)  # a manifest.json that is a link: read from elsewhere
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
        return any(d in ("arrays", "packs", "objects") or d.startswith(DATA_PREFIX) for d in storage.list_dirs(name))
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
        def key(i: CheckpointInfo) -> tuple[int, str]:
            return (-1 if i.step is None else i.step, i.name)
        return key(self) < key(other)


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
        if committed and step is None:
            step = _manifest_step(storage, d)
        if committed or include_incomplete:
            out.append(CheckpointInfo(d, storage.describe(d), step, committed,
                                      "" if committed else "no manifest.json: the save never committed"))
    return sorted(out, reverse=True)


def _manifest_step(storage: Storage, name: str) -> int | None:
    """The step a checkpoint's manifest records, for a directory whose name has none."""
    try:
        return read_manifest(storage, name).step
    except (CheckpointError, OSError):
        return None  # listed without a step (ordered last); `ckpt info` reports what is wrong
