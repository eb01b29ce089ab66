"""What the tools share: opening a checkpoint, the sizes of its entries and of what storage
holds. The storage objects a manifest implies (arrays, shards, packs, pickles, their exact
sizes) are ``ckpt._engine._layout``'s: the tools compare those with what storage holds.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from ckpt._engine._catalog import read_manifest
from ckpt._format import Manifest
from ckpt.storage import Storage, split_checkpoint_url


@dataclass
class Checkpoint:
    """One committed checkpoint: its storage (rooted at the run), name and manifest."""

    storage: Storage
    name: str
    manifest: Manifest

    @property
    def url(self) -> str:
        return self.storage.describe(self.name)

    def obj(self, path: str) -> str:
        """A checkpoint-relative path -> the storage-relative path."""
        return f"{self.name}/{path}"


def open_checkpoint(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Checkpoint:
    """Open the committed checkpoint at ``url`` (validating its manifest)."""
    storage, name = split_checkpoint_url(url, **(storage_options or {}))
    return Checkpoint(storage, name, read_manifest(storage, name))


def tensor_nbytes(entry: dict[str, Any]) -> int:
    from ckpt._format import itemsize

    return math.prod(entry["shape"]) * itemsize(entry["dtype"])


def layout_summary(manifest: Manifest) -> dict[str, int]:
    """How many tensors are stored as whole arrays, packed, or as pieces; plus values."""
    out = {"array": 0, "packed": 0, "pieces": 0, "json": 0, "pickle": 0}
    for e in manifest.entries.values():
        if e.get("kind") == "tensor":
            out[e["storage"]["layout"]] += 1
        else:
            out[e["kind"]] += 1
    return out


def object_sizes(storage: Storage, prefix: str) -> dict[str, int]:
    """Every object under ``prefix`` -> its size, keyed by path relative to ``prefix``."""
    cut = len(prefix.rstrip("/")) + 1
    return {o.path[cut:]: o.size for o in storage.list_files(prefix)}
