"""Restoring from the memory tier onto the current (possibly changed) world size.

1. Every node's leader lists the tier steps its node holds (the manifest's step, time
   and checksum), and the ranks agree on the newest one by fixed-size all-reduces: the
   newest step, then the newest save time of that step, then the lowest rank holding that
   (step, time), which broadcasts its manifest; a leader whose copy has that manifest's
   checksum holds the step (the checksum names the save: another timeline's copy of the
   same step is not held). No node needs the list of every node's holdings — only whether
   its own node holds the candidate, and one holder to read the manifest from — so none is
   exchanged: three all-reduces of one integer per step tried, whatever the number of
   nodes, where an all-gather of every leader's holdings grew with the world. A step that
   cannot be assembled gives way to the next older (step, time) over all the nodes.
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
   next older one, and the caller falls back to persistent storage. Only the ranks whose
   load failed report (their node and the objects they blame) to rank 0, which decides —
   the step is hopeless, or these nodes' copies of these objects are damaged — and
   broadcasts the decision (:meth:`~ckpt.elastic._group.NodeGroup.decide`, as a drain's
   failures): traffic in proportion to the failures, not to the world.

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
    if (m.user_metadata.get("ckpt_tier") or {}).get("job") != tier_job or not isinstance(m.step, int):
        return None  # another job's (never read)
    return {"name": name, "step": m.step, "sha": hashlib.sha256(raw).hexdigest(), "key": (m.step, _micros(m.created))}


_LOWEST = -(2**63)


def _micros(t: float) -> int:
    """A save time as an int64 (microseconds), for an all-reduce."""
    return max(_LOWEST + 1, min(2**63 - 1, int(t * 1e6))) if t == t else _LOWEST + 1


def _newest(nodes: NodeGroup, mine: list[dict[str, Any]], below: tuple[int, int] | None) -> tuple[int, int, int] | None:
    """The newest (step, save time) any node holds below ``below`` (all when None), and
    the lowest rank holding it; None where there is none. Three all-reduces of one
    integer (``mine``: this leader's steps; a non-leader's is empty)."""
    cands = [h["key"] for h in mine if below is None or h["key"] < below]
    step = nodes.sum_ints([max((k[0] for k in cands), default=_LOWEST)], op="max")[0]
    if step == _LOWEST:
        return None
    t = nodes.sum_ints([max((k[1] for k in cands if k[0] == step), default=_LOWEST)], op="max")[0]
    src = -nodes.sum_ints([-nodes.rank if (step, t) in cands else -nodes.world_size], op="max")[0]
    return step, t, src


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
    skipped: list[str] = []
    below: tuple[int, int] | None = None
    while (newest := _newest(nodes, mine, below)) is not None:
        step, t, src = newest
        below = (step, t)
        if min_step is not None and step < min_step:
            break
        offer = None
        if nodes.rank == src:  # a leader of a node that holds it
            h = next(h for h in mine if h["key"] == below)
            try:
                raw = (root / h["name"] / MANIFEST).read_bytes()
            except OSError:
                raw = b""
            if hashlib.sha256(raw).hexdigest() == h["sha"]:  # not changed since it was listed
                offer = (h["name"], raw)
        offer = nodes.broadcast(offer, src=src)
        if offer is None:
            continue
        name, manifest = offer
        sha = hashlib.sha256(manifest).hexdigest()
        held_here = any(h["sha"] == sha for h in mine)  # a leader's: its node holds this save
        res = _restore_step(nodes, root / name, state, step, Manifest.from_json(manifest, where=name), manifest,
                            held_here, skipped, allow_pickle)
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
                  held_here: bool, skipped: list[str], allow_pickle: bool, attempts: int = 3) -> TierRestore | None:
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
            if not held_here:  # nothing of it here (a new node, or another timeline's copy)
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
        verdict = nodes.decide(None if err is None else (nodes.node, bad.tolist(), str(err)), _verdict)
        if isinstance(verdict, str):
            skipped.append(f"step {step}: {verdict}")
            return None
        if len(bad):
            paths = sorted({cat.object_path(u, s) for u, lo, hi in bad.tolist() for s in range(lo, hi)})
            warnings.warn(f"ckpt memory tier: node {nodes.node}'s copy of {name}/{', '.join(paths[:8])} is "
                          f"damaged ({err}): using another node's copy", RuntimeWarning, stacklevel=4)
        for node, runs in verdict:
            runs = np.array(runs, dtype=np.int64).reshape(-1, 3)
            if node == nodes.node:
                held = runs_minus(held, runs)
            elif nodes.leader:  # a fetched copy is only as good as its source
                mine = send[send[:, 0] == node][:, 1:] if len(send) else _NONE3
                held = runs_minus(held, _intersect(runs, mine))
    skipped.append(f"step {step}: still damaged after {attempts} attempts")
    return None


def _verdict(reports: list[tuple[int, tuple[int, list[list[int]], str]]]) -> str | list[tuple[int, list[list[int]]]]:
    """Rank 0's decision on the failed loads (``(rank, (node, damaged runs, error))``): the
    error of one that blames no object (the step cannot be used), else every failed load's
    node and damaged runs (dropped from that node's and from their sources' holdings)."""
    hopeless = [text for _r, (_node, runs, text) in reports if not runs]
    return hopeless[0] if hopeless else [(node, runs) for _r, (node, runs, _text) in reports if runs]


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
        dst = nodes.global_rank(nodes.leader_of(to)) if bundle else None  # the leaders it talks to alone
        src = nodes.global_rank(nodes.leader_of(frm)) if len(in_rows) else None
        received = swap(nodes.group, bundle, dst, d if len(in_rows) else None, src)
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
