"""The memory tier's names on disk, and the one parser of its received-file lists
(docs/format.md, "Memory tier")::

    $CKPT_NODE_DIR/<job>/job.json                 the job's run and run id
    $CKPT_NODE_DIR/<job>/.tmp-spare/              a retired step's replica files, received into next
    $CKPT_NODE_DIR/<job>/step-<9 digits>/
        manifest.json                             the step's commit (as a checkpoint's)
        received-<node>.json                      files a replica of node <node> brought
        received-restore.json                     objects a restore brought
        complete.json                             held on 1 + replicas nodes
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ckpt._format import MANIFEST, TMP_PREFIX

__all__ = ["COMPLETE", "FETCHED", "JOB", "META_KEY", "RECEIVED", "SPARE", "add_received", "own_files", "received_files",
           "received_lists", "write_received"]

COMPLETE = "complete.json"
RECEIVED = "received-"  # received-<node index>.json: the files a replica brought
FETCHED = "restore"  # received-restore.json: objects a restore brought (never this node's own)
SPARE = f"{TMP_PREFIX}spare"  # a retired step's replica files, for the next one to receive into
JOB = "job.json"
META_KEY = "ckpt_tier"  # the tier's entry in a step's manifest metadata


def received_lists(step_dir: Path) -> list[tuple[Path, list[str]]]:
    """Every received-file list of a tier step: (the list's file, the checkpoint-relative
    paths it names)."""
    return [(p, list(json.loads(p.read_text()))) for p in sorted(step_dir.glob(f"{RECEIVED}*.json"))]


def received_files(step_dir: Path) -> set[str]:
    """Files of a tier step that another node's replica or a restore brought."""
    return {rel for _p, paths in received_lists(step_dir) for rel in paths}


def write_received(step_dir: Path, name: str, paths: list[str]) -> None:
    """Record ``paths`` as brought by ``name`` (a node index, or "restore")."""
    (step_dir / f"{RECEIVED}{name}.json").write_text(json.dumps(paths))


def add_received(step_dir: Path, name: str, paths: list[str]) -> None:
    """Add ``paths`` to what ``name`` brought (a restore fetches more than once)."""
    listing = step_dir / f"{RECEIVED}{name}.json"
    old = json.loads(listing.read_text()) if listing.exists() else []
    write_received(step_dir, name, sorted(set(old) | set(paths)))


def own_files(step_dir: Path) -> list[str]:
    """Files of a tier step this node wrote itself (checkpoint-relative), sorted."""
    received = received_files(step_dir)
    out = []
    for dirpath, _dirs, files in os.walk(step_dir):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), step_dir)
            if rel in (MANIFEST, COMPLETE) or rel.startswith(RECEIVED) or rel.endswith(".part"):
                continue
            if rel not in received:
                out.append(rel)
    return sorted(out)
