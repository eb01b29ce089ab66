"""ckpt: nearly free, elastic checkpoints for PyTorch training jobs.

    import ckpt
    ckpt.save({"model": model, "optim": optim}, "runs/a/step-000000100")
    ckpt.load({"model": model, "optim": optim}, "runs/a/step-000000100")

Asynchronous snapshots (``save_async``), training-loop hooks (``CheckpointManager``) and
resharding onto any world size are built on the same format (docs/format.md).
"""

from __future__ import annotations

from ckpt import errors
from ckpt._api import SaveHandle, Snapshotter, load, save, save_async
from ckpt._engine._catalog import CheckpointInfo
from ckpt._engine._load import LoadStats
from ckpt._engine._options import SaveOptions
from ckpt._engine._snapstate import SaveStats
from ckpt._manager import CheckpointManager
from ckpt._policies import (
    EverySeconds,
    EverySteps,
    KeepEvery,
    KeepLast,
    MemoryTierOptions,
    PreemptionOptions,
    RetentionPolicy,
    SavePolicy,
)
from ckpt._run import latest, list_checkpoints, read_manifest
from ckpt._version import __version__ as __version__
from ckpt.errors import CheckpointError
from ckpt.providers import RNGState, Stateful, register_provider

__all__ = [
    "save",
    "save_async",
    "CheckpointManager",
    "SavePolicy",
    "EverySteps",
    "EverySeconds",
    "RetentionPolicy",
    "KeepLast",
    "KeepEvery",
    "MemoryTierOptions",
    "PreemptionOptions",
    "load",
    "SaveHandle",
    "SaveStats",
    "LoadStats",
    "SaveOptions",
    "Snapshotter",
    "list_checkpoints",
    "latest",
    "read_manifest",
    "CheckpointInfo",
    "RNGState",
    "Stateful",
    "register_provider",
    "CheckpointError",
    "errors",
]
