"""One rule for every reader of a checkpoint on local storage: no symlink inside it.

A checkpoint may come from someone you do not trust; a symlink inside it (an array
directory, a shard, a pack, a pickle, ``manifest.json`` itself) could make a reader read,
copy or export any file of the machine. ``ckpt.load``, ``verify``, ``info``, ``cp``,
``export``, ``reshard`` and ``import`` (of a DCP directory) all refuse one with
:class:`~ckpt.errors.UnsafePathError`; ``gc`` never follows one (it removes the link,
not what it points to). The checkpoint directory itself, and the directories above it,
may be links (a run on another disk). Object stores have no symlinks.
"""

from __future__ import annotations

import os
from pathlib import Path

from ckpt.errors import UnsafePathError
from ckpt.storage import Storage

__all__ = ["refuse_symlinks", "refuse_symlinks_under"]

_HINT = "copy the real files into the checkpoint; ckpt does not follow symlinks inside checkpoints"


def refuse_symlinks(storage: Storage, name: str, path: str | None = None, key: str | None = None) -> None:
    """Raise UnsafePathError where checkpoint ``name`` reaches an object through a symlink:
    any component of ``path`` (checkpoint-relative) or anything under it; with ``path``
    None, anything in the whole checkpoint (for readers that read all of it)."""
    if not storage.capabilities.local:
        return
    root = storage.local_path(name)
    p = root
    for comp in (path.split("/") if path else ()):
        p = p / comp
        if p.is_symlink():
            _refuse(p, key)
    refuse_symlinks_under(p, key)


def refuse_symlinks_under(top: str | os.PathLike[str], key: str | None = None) -> None:
    """Raise UnsafePathError for any symlink below the directory ``top`` (nothing when
    ``top`` is not a directory)."""
    if not os.path.isdir(top):
        return
    for dirpath, dirs, files in os.walk(top):  # does not follow links to directories
        for n in dirs + files:
            full = os.path.join(dirpath, n)
            if os.path.islink(full):
                _refuse(Path(full), key)


def _refuse(p: Path, key: str | None) -> None:
    raise UnsafePathError("the checkpoint holds a symlink, which could lead outside it", key=key, path=str(p),
                          hint=_HINT)
