"""Restoring from the memory tier onto the current (possibly changed) world size.

1. Every node's leader reports the tier steps its node holds: the manifest's checksum,
   step and time — a few values per step, all-gathered. The ranks try the newest step of
   one timeline first (the manifest's checksum names the save).
2. Every rank finds what its load of the *new* layout will read, without reading
   (:func:`ckpt._engine._needs.load_reads`: the providers schedule their boxes), as
   runs of the step's objects; a node's leader gathers its ranks' and lists what its
   node holds (present, at the exact size the layout implies). Node ``n`` is the
   *directory* of every array ``unit % nodes``: each leader sends each directory its
   holdings and its lack (needed, not held) of that directory's arrays, the directories
   plan the moves (:func:`ckpt.elastic._moves.plan_moves`) and send each node what to
   fetch and what to send. A lacked object that no node holds makes the step unusable.
3. The moves run in rounds by ring distance (round ``d``: every node sends to node
   ``+d`` and receives from node ``-d``, where the plan has anything), so every pair
   meets and no node waits on one that waits on it. Each node then holds what its
   ranks read, and every rank loads from its node's directory (``ckpt.load``: resharding,
   crc32c of every chunk, per-rank values). An object that fails its checksum counts as
   not held by the node that read it and by the node it came from, and the step is
   planned again from the other holders; a step that cannot be loaded gives way to the
   next older one, and the caller falls back to persistent storage.

A node therefore receives only what its new ranks need and lack, and holds at most its
tier's steps plus that: the retired step's pages (the recycle slot and spare files) are
freed first.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckpt._api import load
from ckpt._engine._needs import Catalog, load_reads, runs_minus, runs_of
from ckpt._format import MANIFEST, TMP_PREFIX, Manifest, parse_step_dirname
from ckpt.elastic._agree import all_to_all, from_leader, to_leader
from ckpt.elastic._group import NodeGroup
from ckpt.elastic._moves import plan_moves, split_by_directory
from ckpt.elastic._names import FETCHED, add_received, received_files
from ckpt.elastic._transfer import bundle_of, swap
from ckpt.errors import CheckpointError, CorruptCheckpointError
from ckpt.storage import open_storage

__all__ = ["TierRestore", "restore_from_tier"]

_NONE3 = np.zeros((0, 3), dtype=np.int64)


@dataclass
class TierRestore:
    """A restore from the tier: the step, and where this node's bytes came from."""

    step: int
    name: str
    own_bytes: int = 0  # files this node wrote at that step
    replica_bytes: int = 0  # files this node held as another node's replica
    peer_bytes: int = 0  # files fetched from another node over gloo
    need_bytes: int = 0  # objects this node's new ranks read
    lacked_bytes: int = 0  # of those, what the node did not hold (first attempt)
    sent_bytes: int = 0  # files sent to other nodes
    agree_bytes: int = 0  # this node's leader's planning messages, sent and received
    seconds: float = 0.0
    plan_s: float = 0.0
    assemble_s: float = 0.0
    load_s: float = 0.0
    skipped: list[str] = field(default_factory=list)  # newer steps that could not be used, and why

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _step_info(root: Path, name: str, tier_job: str) -> dict[str, Any] | None:
    try:
        raw = (root / name / MANIFEST).read_bytes()
        m = Manifest.from_json(raw, where=str(root / name))
    except (OSError, CheckpointError):
        return None
    if (m.user_metadata.get("ckpt_tier") or {}).get("job") != tier_job:
        return None  # another job's (never read)
    return {"name": name, "step": m.step, "sha": hashlib.sha256(raw).hexdigest(), "created": m.created}


def _candidates(reports: list[list[dict[str, Any]] | None]) -> list[tuple[int, str, str, list[int]]]:
    """(step, name, checksum, nodes holding part of it), newest first."""
    seen: dict[str, tuple[int, str, float, list[int]]] = {}
    for node, rep in enumerate(reports):
        for h in rep or []:
            s = seen.setdefault(h["sha"], (h["step"], h["name"], h["created"], []))
            s[3].append(node)
    order = sorted(seen.items(), key=lambda kv: (kv[1][0], kv[1][2]), reverse=True)
    return [(step, name, sha, nodes) for sha, (step, name, _c, nodes) in order]


def restore_from_tier(nodes: NodeGroup, root: Path, state: dict[str, Any], *, job: str, allow_pickle: bool = False,
                      min_step: int | None = None) -> TierRestore | None:
    """Load the newest step of job ``job``'s tier (``root`` on every node) that the nodes
    can assemble, not older than ``min_step``, into ``state``; None where there is none.
    Every rank of ``nodes`` calls it; the caller then drops the other steps."""
    t0 = time.perf_counter()
    mine: list[dict[str, Any]] = []
    if nodes.leader:
        for p in sorted(root.iterdir()):
            if p.name.startswith(TMP_PREFIX):  # unfinished writes, the retired step's pages: room
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            elif p.is_dir() and parse_step_dirname(p.name) is not None:
                h = _step_info(root, p.name, job)
                if h is not None:
                    mine.append(h)
    everyone = nodes.all_gather(mine if nodes.leader else None)
    reports = [everyone[r] for r in nodes.leaders]  # per node of the current job
    skipped: list[str] = []
    for step, name, sha, holders in _candidates(reports):
        if min_step is not None and step < min_step:
            break
        src_node = holders[0]
        manifest = (root / name / MANIFEST).read_bytes() if nodes.node == src_node and nodes.leader else None
        manifest = nodes.broadcast(manifest, src=nodes.leaders[src_node])
        if hashlib.sha256(manifest).hexdigest() != sha:
            continue
        holds = [any(h["sha"] == sha for h in rep or []) for rep in reports]
        res = _restore_step(nodes, root / name, state, step, Manifest.from_json(manifest, where=name), manifest,
                            holds, skipped, allow_pickle)
        if res is not None:
            res.seconds = time.perf_counter() - t0
            return res
    if skipped:
        warnings.warn("ckpt memory tier: no tier step could be restored (" + "; ".join(skipped) + ")",
                      RuntimeWarning, stacklevel=3)
    return None


def _holdings(d: Path, cat: Catalog, res: TierRestore) -> np.ndarray:
    """Runs of the objects of step directory ``d`` present at their exact size (their
    chunks' crc32c is checked as they load); counts own and replica bytes into ``res``."""
    received = received_files(d)
    per: dict[int, list[int]] = {}
    for dirpath, _dirs, files in os.walk(d):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), d)
            at = cat.parse(rel)
            if at is None:
                continue
            size = os.path.getsize(os.path.join(dirpath, f))
            want = cat.sizes(at[0])
            if want is not None and int(want[at[1]]) != size:
                continue  # cut short or the wrong object: not held
            per.setdefault(at[0], []).append(at[1])
            if rel in received:
                res.replica_bytes += size
            else:
                res.own_bytes += size
    parts = [runs_of(u, np.array(s)) for u, s in sorted(per.items())]
    return np.concatenate(parts) if parts else _NONE3


def _nbytes(cat: Catalog, runs: np.ndarray, d: Path | None = None) -> int:
    total = 0
    for u, lo, hi in runs.tolist():
        sizes = cat.sizes(u)
        if sizes is not None:
            total += int(sizes[lo:hi].sum())
        elif d is not None and (d / cat.object_path(u, 0)).exists():
            total += (d / cat.object_path(u, 0)).stat().st_size
    return total


def _restore_step(nodes: NodeGroup, d: Path, state: dict[str, Any], step: int, m: Manifest, manifest: bytes,
                  holds: list[bool], skipped: list[str], allow_pickle: bool, attempts: int = 3) -> TierRestore | None:
    """Give every node what its ranks read of step directory ``d`` and load it; an object
    that fails its checksum is dropped on the node that read it and on the node it came
    from, then the step is planned again from the other holders (``attempts`` times at
    most)."""
    name = d.name
    res = TierRestore(step=step, name=name, skipped=list(skipped))
    cat = Catalog(m)
    t_plan = time.perf_counter()
    held = _NONE3
    ok, why = True, ""
    need: np.ndarray = _NONE3
    try:
        if nodes.leader:
            if not holds[nodes.node]:  # nothing of it here (a new node, or another timeline's copy)
                if d.exists():
                    shutil.rmtree(d)
                d.mkdir(parents=True)
                (d / MANIFEST).write_bytes(manifest)
            held = _holdings(d, cat, res)
        reads = load_reads(state, open_storage(os.fspath(d.parent)), name, m, allow_pickle=allow_pickle,
                           rank=nodes.rank, world_size=nodes.world_size)
        need = cat.objects_of(reads.reads, reads.pickles, reads.ranks)
    except Exception as e:  # noqa: BLE001 - agreed below; the load itself reports it again
        ok, why = False, f"planning failed on rank {nodes.rank}: {e!r}"
    gathered = to_leader(nodes, need)
    if gathered is not None:
        need = np.concatenate([g.reshape(-1, 3) for g in gathered])
        need = runs_minus(need, _NONE3)  # merged and sorted
        res.need_bytes = _nbytes(cat, need, d)
    if not nodes.all_ok(ok):
        skipped.append(f"step {step}: {why or 'planning failed on another rank'}")
        return None
    res.plan_s += time.perf_counter() - t_plan
    for attempt in range(attempts):
        t_plan = time.perf_counter()
        fetch = send = _NONE3
        ok, why = True, ""
        if nodes.leader:
            lack = runs_minus(need, held)
            if attempt == 0:
                res.lacked_bytes = _nbytes(cat, lack)
            try:
                fetch, send, missing = _plan(nodes, cat, held, lack, res)
            except Exception as e:  # noqa: BLE001 - agreed below
                ok, why = False, f"planning failed on node {nodes.node}: {e!r}"
            else:
                if len(missing):
                    u, lo, _hi = missing[0].tolist()
                    ok, why = False, f"{cat.object_path(u, lo)} is held by no surviving node"
        flags = nodes.any_flags([not ok])
        res.plan_s += time.perf_counter() - t_plan
        if flags[0]:
            skipped.append(f"step {step}: {why or 'an object is held by no surviving node'}")
            return None
        t_asm = time.perf_counter()
        if nodes.leader:
            try:
                got = _move(nodes, cat, d, fetch, send, res)
                held = np.concatenate([held, got]) if len(got) else held
            except Exception as e:  # noqa: BLE001 - agreed below
                ok = False
                skipped.append(f"step {step}: assembling failed on node {nodes.node}: {e!r}")
        if not nodes.all_ok(ok):
            skipped.append(f"step {step}: could not be assembled on every node")
            return None
        res.assemble_s += time.perf_counter() - t_asm
        t_load = time.perf_counter()
        err: CheckpointError | None = None
        try:
            load(state, os.fspath(d), allow_pickle=allow_pickle, process_group=nodes.process_group)
        except CheckpointError as e:
            err = e
        res.load_s += time.perf_counter() - t_load
        if nodes.all_ok(err is None):  # the damaged objects are gathered only where a load failed
            fields = ("own_bytes", "replica_bytes", "peer_bytes", "need_bytes", "lacked_bytes", "sent_bytes",
                      "agree_bytes")
            acct = from_leader(nodes, np.array([getattr(res, f) for f in fields], dtype=np.int64))
            for f, v in zip(fields, acct.tolist()):
                setattr(res, f, v)
            return res
        bad = _bad_runs(err, name, cat, need) if isinstance(err, CorruptCheckpointError) else _NONE3
        outcomes = nodes.all_gather((err is None, bad.tolist(), str(err) if err is not None else None))
        hopeless = [o[2] for o in outcomes if not o[0] and not o[1]]
        if hopeless:
            skipped.append(f"step {step}: {hopeless[0]}")
            return None
        for rank, (_ok, runs, text) in enumerate(outcomes):
            node = nodes.node_of(rank)
            runs = np.array(runs, dtype=np.int64).reshape(-1, 3)
            if not len(runs):
                continue
            if node == nodes.node:
                held = runs_minus(held, runs)
            elif nodes.leader:  # a fetched copy is only as good as its source
                mine = send[send[:, 0] == node][:, 1:] if len(send) else _NONE3
                held = runs_minus(held, _intersect(runs, mine))
            if rank == nodes.rank or (nodes.leader and node == nodes.node):
                paths = sorted({cat.object_path(u, s) for u, lo, hi in runs.tolist() for s in range(lo, hi)})
                if rank == nodes.rank:
                    warnings.warn(f"ckpt memory tier: node {node}'s copy of {name}/{', '.join(paths[:8])} is "
                                  f"damaged ({text}): using another node's copy", RuntimeWarning, stacklevel=4)
    skipped.append(f"step {step}: still damaged after {attempts} attempts")
    return None


def _intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return runs_minus(a, runs_minus(a, b))


def _bad_runs(err: CheckpointError, name: str, cat: Catalog, need: np.ndarray) -> np.ndarray:
    """The objects a load error blames: its path's object, else the objects of the
    array it names that this node read (of the key's arrays where no path is named)."""
    path = (err.path or "").replace("file://", "")
    cut = path.find(f"/{name}/")
    units: list[int] = []
    if cut >= 0:
        rel = path[cut + len(name) + 2:].rstrip("/")
        at = cat.parse(rel)
        if at is not None:
            return runs_of(at[0], np.array([at[1]]))
        units = [u for u, p in enumerate(cat.paths) if p == rel or p.startswith(rel + "/")]
    if not units and err.key:
        units = cat.units_of(err.key)
    need = need.reshape(-1, 3)
    return need[np.isin(need[:, 0], units)] if len(need) else _NONE3


def _pack(*arrays: np.ndarray) -> np.ndarray:
    """Several int64 arrays as one: their lengths, then their elements."""
    flat = [np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays]
    return np.concatenate([np.array([len(a) for a in flat], dtype=np.int64), *flat])


def _unpack(data: np.ndarray, n: int, widths: tuple[int, ...]) -> list[np.ndarray]:
    lens = data[:n].tolist()
    out, at = [], n
    for k, w in zip(lens, widths):
        out.append(data[at:at + k].reshape(-1, w))
        at += k
    return out


def _plan(nodes: NodeGroup, cat: Catalog, held: np.ndarray, lack: np.ndarray,
          res: TierRestore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leaders: what this node fetches (src, unit, lo, hi), sends (dst, unit, lo, hi) and
    lacks that no node holds (unit, lo, hi), through the directories."""
    n = nodes.nnodes
    held_to, lack_to = split_by_directory(held, n), split_by_directory(lack, n)
    out = [_pack(held_to[k], lack_to[k]) for k in range(n)]
    inbox = all_to_all(nodes, out)
    res.agree_bytes += 8 * (sum(len(o) for o in out) + sum(len(i) for i in inbox))
    parts = [_unpack(i, 2, (3, 3)) for i in inbox]
    moves = plan_moves([p[0] for p in parts], [p[1] for p in parts], cat.sizes)
    mv, miss = moves.moves, moves.missing
    replies = [_pack(mv[mv[:, 1] == k][:, [0, 2, 3, 4]], mv[mv[:, 0] == k][:, [1, 2, 3, 4]],
                     miss[miss[:, 0] == k][:, 1:]) for k in range(n)]
    answers = all_to_all(nodes, replies)
    res.agree_bytes += 8 * (sum(len(o) for o in replies) + sum(len(i) for i in answers))
    got = [_unpack(a, 3, (4, 4, 3)) for a in answers]
    fetch = np.concatenate([g[0] for g in got])
    send = np.concatenate([g[1] for g in got])
    missing = np.concatenate([g[2] for g in got])
    return fetch, send, missing


def _paths(cat: Catalog, rows: np.ndarray) -> list[str]:
    return [cat.object_path(u, s) for u, lo, hi in rows.tolist() for s in range(lo, hi)]


def _move(nodes: NodeGroup, cat: Catalog, d: Path, fetch: np.ndarray, send: np.ndarray, res: TierRestore) -> np.ndarray:
    """Leaders: run this node's moves in rounds by ring distance; returns the runs
    received (each file checked to be one that was asked for)."""
    n, me = nodes.nnodes, nodes.node
    got: list[np.ndarray] = []
    fetched: list[str] = []
    for dist in range(1, n):
        to, frm = (me + dist) % n, (me - dist) % n
        out_rows = send[send[:, 0] == to][:, 1:] if len(send) else _NONE3
        in_rows = fetch[fetch[:, 0] == frm][:, 1:] if len(fetch) else _NONE3
        if not len(out_rows) and not len(in_rows):
            continue
        bundle = bundle_of(d, _paths(cat, out_rows)) if len(out_rows) else None
        received = swap(nodes.group, bundle, nodes.global_rank(nodes.leaders[to]) if bundle else None,
                        d if len(in_rows) else None, nodes.global_rank(nodes.leaders[frm]) if len(in_rows) else None)
        if bundle is not None:
            res.sent_bytes += bundle.nbytes
        if len(in_rows):
            asked = set(_paths(cat, in_rows))
            if {p for p, _ in received} != asked:
                raise RuntimeError(f"node {frm} sent other objects than planned")
            res.peer_bytes += sum(s for _, s in received)
            fetched += [p for p, _ in received]
            got.append(in_rows)
    if fetched:
        add_received(d, FETCHED, fetched)
    return np.concatenate(got) if got else _NONE3
