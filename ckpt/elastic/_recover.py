"""Restoring from the memory tier onto the current (possibly changed) world size.

1. Every node's leader lists the tier steps its node holds and checks each file it holds
   (present, of the size the manifest implies, crc32c of every chunk): a damaged file
   counts as not held, so another holder's copy is used.
2. The ranks agree on the newest step whose every file is held by some surviving node
   (steps of one timeline only: the manifest's checksum names the save).
3. Each node fetches the files it lacks from a node that holds them, over gloo: its own
   memory first, then a peer. Then every rank loads its boxes of the *new* layout from its
   node's now whole copy (``ckpt.load``: resharding, checksums, per-rank values) and the
   ranks agree that every load succeeded; otherwise the next older step is tried, and the
   caller falls back to persistent storage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt._api import load
from ckpt._engine._layout import expected_objects, stored_arrays
from ckpt._format import MANIFEST, Manifest, parse_step_dirname
from ckpt._tools._common import object_sizes
from ckpt.elastic._transfer import bundle_of, swap
from ckpt.errors import CheckpointError, CorruptCheckpointError
from ckpt.storage import open_storage

if TYPE_CHECKING:
    from ckpt.elastic._tier import MemoryTier

__all__ = ["TierRestore", "restore_from_tier"]


@dataclass
class TierRestore:
    """A restore from the tier: the step, and where this node's bytes came from."""

    step: int
    name: str
    own_bytes: int = 0  # files this node wrote at that step
    replica_bytes: int = 0  # files this node held as another node's replica
    peer_bytes: int = 0  # files fetched from another node over gloo
    seconds: float = 0.0
    assemble_s: float = 0.0
    load_s: float = 0.0
    skipped: list[str] = field(default_factory=list)  # newer steps that could not be used, and why

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _held(root: Path, name: str, tier_job: str) -> dict[str, Any] | None:
    """What a node holds of one tier step: manifest checksum and the files present with
    the size the manifest implies (their chunks' crc32c is checked as they load)."""
    d = root / name
    try:
        raw = (d / MANIFEST).read_bytes()
        m = Manifest.from_json(raw, where=str(d))
    except (OSError, CheckpointError):
        return None
    if (m.user_metadata.get("ckpt_tier") or {}).get("job") != tier_job:
        return None  # another job's (never read)
    expected = expected_objects(m)
    sizes = object_sizes(open_storage(str(root)), name)
    received: set[str] = set()
    for f in d.glob("received-*.json"):
        received.update(json.loads(f.read_text()))
    good = {p: s for p, s in sizes.items() if p in expected and (expected[p] is None or expected[p] == s)}
    return {"name": name, "step": m.step, "sha": hashlib.sha256(raw).hexdigest(), "created": m.created,
            "files": good, "received": sorted(received & set(good))}


def _bad_objects(err: CheckpointError, name: str, m: Manifest) -> list[str]:
    """The checkpoint-relative objects a load error blames: its path, else every object
    holding the key's data."""
    path = (err.path or "").replace("file://", "")
    cut = path.find(f"/{name}/")
    if cut >= 0:
        rel = path[cut + len(name) + 2:]
        return [p for p in expected_objects(m) if p == rel or p.startswith(rel.rstrip("/") + "/")] or [rel]
    return [f"{a.path}/{k}" for a in stored_arrays(m) if err.key in a.keys
            for k in ["zarr.json", *(p.rsplit("/", 1)[1] for _i, p, _r in a.shards())]]


def _candidates(reports: list[list[dict[str, Any]] | None]) -> list[tuple[int, str, str, list[int]]]:
    """(step, name, checksum, nodes holding part of it), newest first."""
    seen: dict[str, tuple[int, str, float, list[int]]] = {}
    for node, rep in enumerate(reports):
        for h in rep or []:
            s = seen.setdefault(h["sha"], (h["step"], h["name"], h["created"], []))
            s[3].append(node)
    order = sorted(seen.items(), key=lambda kv: (kv[1][0], kv[1][2]), reverse=True)
    return [(step, name, sha, nodes) for sha, (step, name, _c, nodes) in order]


def _plan(expected: dict[str, int | None], held: list[dict[str, int]]) -> list[tuple[int, int, list[str]]] | str:
    """Moves (source node, destination node, paths) that give every node every file, or
    why that is impossible. A file comes from the node that holds it with the fewest
    bytes to send so far (spreads the load)."""
    sent = [0] * len(held)
    moves: dict[tuple[int, int], list[str]] = {}
    for path in sorted(expected):
        holders = [n for n, files in enumerate(held) if path in files]
        if not holders:
            return f"{path} is held by no surviving node"
        size = held[holders[0]][path]
        for dst in range(len(held)):
            if path in held[dst]:
                continue
            src = min(holders, key=lambda n: (sent[n], n))
            sent[src] += size
            moves.setdefault((src, dst), []).append(path)
    return [(s, d, paths) for (s, d), paths in sorted(moves.items())]


def restore_from_tier(tier: MemoryTier, state: dict[str, Any], *, min_step: int | None = None) -> TierRestore | None:
    t0 = time.perf_counter()
    mine: list[dict[str, Any]] = []
    if tier.leader:
        tier.clean_tmp()
        for p in sorted(tier.root.iterdir()):
            if p.is_dir() and parse_step_dirname(p.name) is not None:
                h = _held(tier.root, p.name, tier.job)
                if h is not None:
                    mine.append(h)
    everyone = tier.all_gather(mine if tier.leader else None)
    reports = [everyone[r] for r in tier.leaders]  # per node of the current job
    skipped: list[str] = []
    for step, name, sha, holders in _candidates(reports):
        if min_step is not None and step < min_step:
            break
        src_node = holders[0]
        manifest = (tier.root / name / MANIFEST).read_bytes() if tier.node == src_node and tier.leader else None
        manifest = tier.broadcast(manifest, src=tier.leaders[src_node])
        if hashlib.sha256(manifest).hexdigest() != sha:
            continue
        res = _restore_step(tier, state, step, name, Manifest.from_json(manifest, where=name), manifest,
                            [next((h for h in rep or [] if h["sha"] == sha), None) for rep in reports], skipped)
        if res is not None:
            res.seconds = time.perf_counter() - t0
            tier.drop_steps(keep=name)
            return res
    tier.drop_steps()
    if skipped:
        warnings.warn("ckpt memory tier: no tier step could be restored (" + "; ".join(skipped) + ")",
                      RuntimeWarning, stacklevel=3)
    return None


def _restore_step(tier: MemoryTier, state: dict[str, Any], step: int, name: str, m: Manifest, manifest: bytes,
                  holds: list[dict[str, Any] | None], skipped: list[str], attempts: int = 3) -> TierRestore | None:
    """Assemble step ``name`` on every node and load it; a file that fails its checksum
    is dropped on the node that read it and on the node it came from, then the step is
    assembled again from the other holders (``attempts`` times at most)."""
    held: list[dict[str, int]] = [dict(h["files"]) if h else {} for h in holds]
    res = TierRestore(step=step, name=name, skipped=list(skipped))
    if tier.leader and holds[tier.node] is not None:
        h = holds[tier.node]
        assert h is not None
        received = set(h["received"])
        res.replica_bytes = sum(sz for p, sz in h["files"].items() if p in received)
        res.own_bytes = sum(sz for p, sz in h["files"].items() if p not in received)
    for _attempt in range(attempts):
        plan = _plan(expected_objects(m), held)
        if isinstance(plan, str):
            skipped.append(f"step {step}: {plan}")
            return None
        ok = True
        t_asm = time.perf_counter()
        if tier.leader:
            try:
                _assemble(tier, name, manifest, plan, res, holds[tier.node] is not None, held[tier.node])
            except Exception as e:  # noqa: BLE001 - agreed below
                ok = False
                skipped.append(f"step {step}: assembling failed on node {tier.node}: {e!r}")
        if not tier.all_ok(ok):
            skipped.append(f"step {step}: could not be assembled on every node")
            return None
        res.assemble_s += time.perf_counter() - t_asm
        t_load = time.perf_counter()
        err: CheckpointError | None = None
        try:
            load(state, os.fspath(tier.root / name), allow_pickle=tier.allow_pickle,
                 process_group=tier.process_group)
        except CheckpointError as e:
            err = e
        res.load_s += time.perf_counter() - t_load
        bad = _bad_objects(err, name, m) if isinstance(err, CorruptCheckpointError) else []
        outcomes = tier.all_gather((err is None, bad, str(err) if err is not None else None))
        if all(o[0] for o in outcomes):
            acct = tier.all_gather((res.own_bytes, res.replica_bytes, res.peer_bytes) if tier.leader else None)
            res.own_bytes, res.replica_bytes, res.peer_bytes = acct[tier.leaders[tier.node]]
            return res
        hopeless = [o[2] for o in outcomes if not o[0] and not o[1]]
        if hopeless:
            skipped.append(f"step {step}: {hopeless[0]}")
            return None
        for rank, (_ok, paths, text) in enumerate(outcomes):
            node = next(n for n, ranks in enumerate(tier.node_ranks) if rank in ranks)
            for p in paths:
                for src, dst, moved in plan:  # a fetched copy is only as good as its source
                    if dst == node and p in moved:
                        held[src].pop(p, None)
                held[node].pop(p, None)
            warnings.warn(f"ckpt memory tier: node {node}'s copy of {name}/{', '.join(paths)} is damaged "
                          f"({text}): using another node's copy", RuntimeWarning, stacklevel=4)
    skipped.append(f"step {step}: still damaged after {attempts} attempts")
    return None


def _assemble(tier: MemoryTier, name: str, manifest: bytes, plan: list[tuple[int, int, list[str]]],
              res: TierRestore, holds_step: bool, have: dict[str, int]) -> None:
    """Leaders only: give this node a whole copy of the step (the moves run in one global
    order, each between two leaders, so every pair meets). Files of the step this node
    has but does not count as held (damaged) are replaced."""
    d = tier.root / name
    if not holds_step:  # nothing of it here (a new node, or its copy was another timeline's)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        (d / MANIFEST).write_bytes(manifest)
    for src, dst, paths in plan:
        if tier.node == src:
            swap(tier.group, bundle_of(d, paths), tier.global_rank(tier.leaders[dst]), None, None)
        elif tier.node == dst:
            got = swap(tier.group, None, None, d, tier.global_rank(tier.leaders[src]))
            res.peer_bytes += sum(s for _, s in got)
            have.update(got)
