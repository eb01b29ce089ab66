"""Runs: directories of step-numbered checkpoints."""

from __future__ import annotations

import os
from typing import Any

from ckpt._engine._catalog import CheckpointInfo, list_run
from ckpt._engine._catalog import read_manifest as _read_manifest
from ckpt._format import Manifest
from ckpt.storage import open_storage, split_checkpoint_url


def list_checkpoints(run: str | os.PathLike[str], *, include_incomplete: bool = False,
                     storage_options: dict[str, Any] | None = None) -> list[CheckpointInfo]:
    """The checkpoints of a run, newest first: committed ones only, unless
    ``include_incomplete`` (then each incomplete one says why)."""
    return list_run(open_storage(run, **(storage_options or {})), include_incomplete=include_incomplete)


def latest(run: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> CheckpointInfo | None:
    """The newest committed checkpoint of a run, or None."""
    found = list_checkpoints(run, storage_options=storage_options)
    return found[0] if found else None


def read_manifest(url: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None) -> Manifest:
    """The validated manifest of the checkpoint at ``url``."""
    storage, name = split_checkpoint_url(url, **(storage_options or {}))
    return _read_manifest(storage, name)
