"""The save plan, per rank: what this rank writes and where, at a cost that grows with its
own pieces, not with the world (DESIGN.md, "Built for 16,384 ranks").

A rank's tensor pieces come in three kinds:

* **by rule** — the piece carries a :class:`~ckpt._sharding.Sharding` (DTensor
  placements): every rank derives the tensor's whole layout and whether it writes its
  own box, locally. Only the rank at mesh coordinate zero (the tensor's *lead*) tells the
  coordinator about it.
* **uniform** — a plain tensor held whole; when every rank holds the same list of them
  (a digest says so) each is written by one rank chosen by a greedy rule every rank
  computes alike (largest first, to the least-loaded rank).
* **explicit** — anything else (hand-made boxes, flat fragments, plain tensors that not
  every rank holds): sent to the coordinator (rank 0 alone), which validates their tiling
  in O(n log n) and sends each rank back its assignments.

Agreement costs a constant number of collectives: one all-reduce of a fixed-size vector
of digests and flags; on a first save (or when the structure changed) a sparse gather to
rank 0 and a broadcast of the plan's id and outcome, plus the explicit assignments to the
ranks that sent explicit pieces. A later save with the same structure on every rank
reuses its plan after the all-reduce alone.

The planner is a set of phases (:meth:`LocalPieces.contribution`, :meth:`LocalPieces.payload`,
:func:`coordinate`, :meth:`LocalPieces.finish`) so ``bench.scale`` drives the same code for
simulated ranks; :func:`plan_save` runs them over a coordinator's collectives.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from ckpt._engine._globalplan import Assignment, PieceMeta, array_path, build_plan, piece_path
from ckpt._engine._plan import (
    SMALL_SHARD_BY_RULE,
    ArrayLayout,
    PackPlan,
    PlanConfig,
    layout_for,
    plan_array,
)
from ckpt._format import itemsize
from ckpt._sharding import Sharding
from ckpt.errors import DistributedSaveError, ReshardError, ShapeMismatchError

__all__ = ["RankPlan", "LocalPieces", "coordinate", "plan_save", "LANES"]

LANES = 4  # 30-bit lanes per digest: sums of up to 2**33 terms stay exact in int64
_FLAGS = 4  # failed, changed, ranks with explicit pieces, ranks with per-rank values
_DIGESTS = 4  # by-rule pieces, uniform list, per-rank keys, cached plan id
VECTOR = _FLAGS + _DIGESTS * LANES


def lanes(obj: Any) -> list[int]:
    """A digest of ``obj`` (its repr: ints, strings and tuples only) as 30-bit ints."""
    h = hashlib.sha256(repr(obj).encode()).digest()
    return [int.from_bytes(h[4 * i:4 * i + 4], "little") & ((1 << 30) - 1) for i in range(LANES)]


@dataclass
class RankPlan:
    """One rank's share of a save's plan. ``entries`` (rank 0 only): every tensor entry
    of the manifest."""

    assignments: list[Assignment] = field(default_factory=list)
    packs: list[tuple[str, int, list[str]]] = field(default_factory=list)  # (path, nbytes, member keys)
    dtypes: dict[str, str] = field(default_factory=dict)  # key -> dtype, of this rank's assignments
    entries: dict[str, dict[str, Any]] | None = None
    rank_keys: list[str] = field(default_factory=list)  # rank 0: per-rank value keys of every rank
    rank_files: bool = False  # every rank writes its per-rank values object
    plan_id: str = ""
    nbytes: int = 0  # bytes this rank writes
    contribution: list[int] = field(default_factory=list)  # this rank's all-reduce vector, as reused


@dataclass(frozen=True)
class _Rule:
    key: str
    dtype: str
    shape: tuple[int, ...]
    sharding: Sharding

    def desc(self) -> tuple[Any, ...]:
        return (self.key, self.dtype, self.shape, self.sharding.mesh, self.sharding.dims)


def rule_layout(key: str, dtype: str, shape: tuple[int, ...], sh: Sharding, cfg: PlanConfig) -> ArrayLayout | None:
    """The array layout of a tensor placed by rule (None: each box is its own array, the
    ``pieces`` layout). The same on every rank; O(ndim) for one split per dim."""
    return _rule_layout(key, dtype, shape, sh.mesh, sh.dims, cfg)


@functools.lru_cache(maxsize=1 << 16)
def _rule_layout(key: str, dtype: str, shape: tuple[int, ...], mesh: tuple[int, ...],
                 dims: tuple[tuple[int, ...], ...], cfg: PlanConfig) -> ArrayLayout | None:
    align, n_boxes = Sharding(mesh, dims, (0,) * len(mesh)).alignment(shape)
    # smaller shards before the pieces layout: a tensor placed by rule as pieces lists
    # every box in the manifest (O(boxes)), as one array it is described by its rule
    return layout_for(array_path(key), shape, itemsize(dtype), align, n_boxes, cfg, SMALL_SHARD_BY_RULE)


def rule_storage(key: str, dtype: str, shape: tuple[int, ...], sh: Sharding,
                 cfg: PlanConfig) -> tuple[dict[str, Any], ArrayLayout | None]:
    """The manifest storage of a tensor placed by rule, and its array layout (rank 0; the
    ``pieces`` layout lists every box: O(boxes), for the rare poorly aligned tensor)."""
    lay = rule_layout(key, dtype, shape, sh, cfg)
    if lay is not None:
        return ({"layout": "array", "path": lay.path, "shard_shape": list(lay.shard_shape),
                 "chunk_shape": list(lay.chunk_shape)}, lay)
    pieces = []
    for g, (o, s) in sh.boxes(shape):
        p = plan_array(piece_path(key, g), s, itemsize(dtype), [((0,) * len(s), s)], cfg)
        assert p is not None
        pieces.append({"offsets": list(o), "sizes": list(s), "path": p.path,
                       "shard_shape": list(p.shard_shape), "chunk_shape": list(p.chunk_shape)})
    return {"layout": "pieces", "pieces": pieces}, None


def uniform_writers(descs: list[tuple[str, str, tuple[int, ...]]], world: int) -> dict[str, int]:
    """Writer of each uniform tensor: largest first, to the least-loaded rank (ties: the
    lowest rank); every rank computes the same. O(n log W)."""
    order = sorted(descs, key=lambda d: (-math.prod(d[2]) * itemsize(d[1]), d[0]))
    heap = [(0, r) for r in range(min(world, len(order)))]
    out: dict[str, int] = {}
    for key, dt, shape in order:
        load, r = heapq.heappop(heap)
        out[key] = r
        heapq.heappush(heap, (load + math.prod(shape) * itemsize(dt), r))
    return out


class LocalPieces:
    """What one rank holds, classified; the phases of planning on that rank."""

    def __init__(self, pieces: list[tuple[PieceMeta, Sharding | None, bool]], rank_keys: list[str], *,
                 rank: int, world: int, cfg: PlanConfig, failed: bool = False,
                 cached: tuple[tuple[Any, ...], RankPlan] | None = None) -> None:
        """``pieces``: (meta, sharding, whole) per tensor piece — ``whole``: a plain tensor
        with no placement of its own. ``cached``: (structure, plan) of the last save: when
        this rank's structure is the same, nothing is classified again (a cached save
        costs one pass over the pieces and one all-reduce)."""
        self.rank, self.world, self.cfg, self.failed = rank, world, cfg, failed
        self.rank_keys = sorted(rank_keys)
        self.structure: tuple[Any, ...] = (world, tuple(
            (m.key, m.dtype, m.shape, m.offsets, m.sizes, *((sh.mesh, sh.dims, sh.coord) if sh is not None else (whole,)))
            for m, sh, whole in pieces), tuple(self.rank_keys))
        self.reuse = cached[1] if cached is not None and cached[0] == self.structure else None
        self.rules: list[_Rule] = []
        self.uniform: list[tuple[str, str, tuple[int, ...]]] = []
        self.explicit: list[PieceMeta] = []
        self._pieces = pieces
        if self.reuse is None:
            self._classify()

    def _classify(self) -> None:
        for meta, sh, whole in self._pieces:
            if sh is not None and math.prod(meta.shape) > 0 and len(sh.dims) == len(meta.shape):
                self.rules.append(_Rule(meta.key, meta.dtype, meta.shape, sh))
            elif whole and math.prod(meta.shape) > 0:
                self.uniform.append((meta.key, meta.dtype, meta.shape))
            else:
                self.explicit.append(meta)
        self.uniform.sort()

    # -- phase 1: the all-reduce ------------------------------------------------
    def contribution(self) -> list[int]:
        """This rank's part of the one fixed-size all-reduce (sum)."""
        if self.reuse is not None:  # the digests of the same structure, from the last save
            return [int(self.failed), 0, *self.reuse.contribution[2:]]
        rule_sum = [0] * LANES
        for r in self.rules:
            for i, v in enumerate(lanes(r.desc())):
                rule_sum[i] += v
        self.digests = [int(bool(self.explicit)), int(bool(self.rank_keys)),
                        *rule_sum, *lanes(self.uniform), *lanes(self.rank_keys)]
        return [int(self.failed), 1, *self.digests, *([0] * LANES)]

    def _same_everywhere(self, total: list[int], digest: int, mine: list[int]) -> bool:
        at = _FLAGS + digest * LANES
        return all(t == self.world * m for t, m in zip(total[at:at + LANES], mine))

    def reusable(self, total: list[int]) -> RankPlan | None:
        """The cached plan, when no rank's structure changed and all cached the same plan."""
        if total[1] == 0 and self.reuse is not None and self._same_everywhere(total, 3, lanes(self.reuse.plan_id)):
            return self.reuse
        return None

    # -- phase 2: the sparse gather to rank 0 -------------------------------------
    def payload(self, total: list[int]) -> dict[str, Any] | None:
        """What this rank tells the coordinator (None: nothing; most ranks)."""
        if self.reuse is not None:  # unchanged here, but another rank changed: plan again
            self.digests = self.reuse.contribution[2:_FLAGS + 3 * LANES]
            self.reuse = None
            self._classify()
        self.uniform_ok = self._same_everywhere(total, 1, lanes(self.uniform))
        self.keys_ok = self._same_everywhere(total, 2, lanes(self.rank_keys))
        if not self.uniform_ok:  # not every rank holds the same plain tensors: the coordinator places them
            self.explicit += [PieceMeta(k, dt, s, (0,) * len(s), s) for k, dt, s in self.uniform]
            self.uniform = []
        out: dict[str, Any] = {}
        lead = [r.desc() for r in self.rules if r.sharding.is_lead()]
        if lead:
            out["rules"] = lead
        if self.explicit:
            out["explicit"] = self.explicit
        if not self.keys_ok and self.rank_keys:
            out["keys"] = self.rank_keys
        return out or None

    # -- phase 4: this rank's plan --------------------------------------------------
    def finish(self, total: list[int], outcome: dict[str, Any], mine: dict[str, Any] | None,
               entries: dict[str, dict[str, Any]] | None = None) -> RankPlan:
        """This rank's plan from the coordinator's ``outcome`` (broadcast) and ``mine``
        (its explicit assignments, for ranks that sent explicit pieces)."""
        if outcome.get("error") is not None:
            raise outcome["error"]
        plan = RankPlan(entries=entries, plan_id=outcome["plan_id"], rank_files=total[3] > 0,
                        rank_keys=outcome.get("rank_keys", []) if self.rank == 0 else [],
                        contribution=[0, 0, *self.digests, *lanes(outcome["plan_id"])])
        cfg = self.cfg
        for r in self.rules:
            sh = r.sharding
            box = sh.box(r.shape)
            if not math.prod(box[1]) or not sh.writes(r.key):
                continue
            lay = rule_layout(r.key, r.dtype, r.shape, sh, cfg)
            if lay is not None:
                a = Assignment(r.key, box, "array", lay.path, lay, create=sh.flat_box_index() == 0)
            else:
                path = piece_path(r.key, sh.flat_box_index())
                p = plan_array(path, box[1], itemsize(r.dtype), [((0,) * len(box[1]), box[1])], cfg)
                assert p is not None
                a = Assignment(r.key, box, "piece", path, p, create=True)
            plan.assignments.append(a)
            plan.dtypes[r.key] = r.dtype
            plan.nbytes += math.prod(box[1]) * itemsize(r.dtype)
        if self.uniform:
            writers = uniform_writers(self.uniform, self.world)
            _uniform_plan(self.uniform, writers, self.rank, cfg, plan)
        for a in (mine or {}).get("assignments", []):
            plan.assignments.append(a)
        plan.packs += (mine or {}).get("packs", [])
        plan.dtypes.update((mine or {}).get("dtypes", {}))
        plan.nbytes += (mine or {}).get("nbytes", 0)
        return plan


def _uniform_plan(uniform: list[tuple[str, str, tuple[int, ...]]], writers: dict[str, int], rank: int,
                  cfg: PlanConfig, plan: RankPlan) -> dict[str, dict[str, Any]]:
    """Uniform tensors: ``rank``'s assignments into ``plan``; returns every uniform tensor's
    storage (rank 0 writes them to the manifest). Small ones go to the writer's packs
    (``packs/u<rank>-<i>``), the rest are one-box arrays."""
    storage: dict[str, dict[str, Any]] = {}
    small: dict[int, list[tuple[str, str, tuple[int, ...], int]]] = {}
    for key, dt, shape in uniform:
        nbytes = math.prod(shape) * itemsize(dt)
        w = writers[key]
        if nbytes <= cfg.pack_threshold:
            small.setdefault(w, []).append((key, dt, shape, nbytes))
            continue
        lay = plan_array(array_path(key), shape, itemsize(dt), [((0,) * len(shape), shape)], cfg)
        assert lay is not None
        storage[key] = {"layout": "array", "path": lay.path, "shard_shape": list(lay.shard_shape),
                        "chunk_shape": list(lay.chunk_shape)}
        if w == rank:
            plan.assignments.append(Assignment(key, ((0,) * len(shape), shape), "array", lay.path, lay, create=True))
            plan.dtypes[key] = dt
            plan.nbytes += nbytes
    for w, members in sorted(small.items()):
        if w != rank and rank != 0:
            continue
        packs = PackPlan.build([m[3] for m in members], cfg.pack_bytes)
        paths = [f"packs/u{w:05d}-{i:04d}" for i in range(len(packs.sizes))]
        keys: dict[str, list[str]] = {p: [] for p in paths}
        for (key, dt, shape, n), (pi, off) in zip(members, packs.placement):
            storage[key] = {"layout": "packed", "path": paths[pi], "offset": off, "nbytes": n}
            keys[paths[pi]].append(key)
            if w == rank:
                plan.assignments.append(Assignment(key, ((0,) * len(shape), shape), "pack", paths[pi],
                                                   pack_offset=off))
                plan.dtypes[key] = dt
                plan.nbytes += n
        if w == rank:
            plan.packs += [(p, n, keys[p]) for p, n in zip(paths, packs.sizes)]
    return storage


def coordinate(local0: LocalPieces, total: list[int], payloads: list[tuple[int, dict[str, Any]]]
               ) -> tuple[dict[str, Any], dict[int, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Rank 0: every entry of the manifest from the leads' rules, the uniform list and the
    explicit pieces; returns (the outcome every rank gets, the explicit assignments per
    rank, the tensor entries). Errors become the outcome's ``error``."""
    try:
        entries, per_rank, keys = _coordinate(local0, total, payloads)
    except (ReshardError, ShapeMismatchError, DistributedSaveError) as e:
        return {"error": e, "plan_id": ""}, {}, {}
    plan_id = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    return {"plan_id": plan_id, "rank_keys": keys}, per_rank, entries


def _coordinate(local0: LocalPieces, total: list[int], payloads: list[tuple[int, dict[str, Any]]]
                ) -> tuple[dict[str, dict[str, Any]], dict[int, dict[str, Any]], list[str]]:
    cfg, world = local0.cfg, local0.world
    rules: dict[str, tuple[Any, ...]] = {}
    explicit: dict[int, list[PieceMeta]] = {}
    keys: set[str] = set(local0.rank_keys)
    for rank, p in payloads:
        for desc in p.get("rules", []):
            prev = rules.setdefault(desc[0], desc)
            if prev != desc:
                raise ShapeMismatchError(f"two leads describe this tensor differently: {prev[1:]} vs {desc[1:]}",
                                         key=desc[0], hint="every rank must use the same mesh and placements")
        if p.get("explicit"):
            explicit[rank] = list(p["explicit"])
        keys.update(p.get("keys", []))
    expect = [0] * LANES
    for desc in rules.values():
        holders = math.prod(desc[3])
        for i, v in enumerate(lanes(desc)):
            expect[i] += v * holders
    if expect != total[_FLAGS:_FLAGS + LANES]:
        raise ReshardError("the ranks disagree about the sharding of some tensor (the digests of every "
                           "rank's placements do not add up)",
                           hint="every rank of a mesh must hold the tensor with the same global shape, dtype, "
                                "mesh shape and placements; a rank outside its mesh cannot describe it")
    entries: dict[str, dict[str, Any]] = {}
    for key in sorted(rules):
        _k, dt, shape, mesh, dims = rules[key]
        sh = Sharding(mesh, dims, (0,) * len(mesh))
        storage, _lay = rule_storage(key, dt, shape, sh, cfg)
        entries[key] = {"kind": "tensor", "dtype": dt, "shape": list(shape),
                        "sharding": {"mesh": list(mesh), "dims": [list(d) for d in dims]}, "storage": storage}
    if local0.uniform:
        writers = uniform_writers(local0.uniform, world)
        info = {k: (dt, shape) for k, dt, shape in local0.uniform}
        for key, st in _uniform_plan(local0.uniform, writers, 0, cfg, RankPlan()).items():
            dt, shape = info[key]
            entries[key] = {"kind": "tensor", "dtype": dt, "shape": list(shape), "storage": st}
    per_rank: dict[int, dict[str, Any]] = {}
    if explicit:
        gp = build_plan([explicit.get(r, []) for r in range(world)], cfg)
        for key, e in gp.entries.items():
            if key in entries:
                raise ShapeMismatchError("some ranks place this tensor by a sharding rule, others by explicit "
                                         "boxes", key=key, hint="describe it the same way on every rank")
            entries[key] = e
        for r in sorted(explicit):
            mine = gp.per_rank.get(r, [])
            dtypes = {a.key: gp.entries[a.key]["dtype"] for a in mine}
            packs = [(path, n, [k for k, e in gp.entries.items() if e["storage"].get("path") == path])
                     for path, n in gp.packs.get(r, [])]
            per_rank[r] = {"assignments": mine, "packs": packs, "dtypes": dtypes,
                           "nbytes": gp.bytes_per_rank.get(r, 0)}
    return entries, per_rank, sorted(keys)


class Collectives(Protocol):
    """What :func:`plan_save` needs of a coordinator (ckpt._engine._coord)."""

    rank: int
    world_size: int

    def all_reduce_sum(self, values: list[int]) -> list[int]: ...

    def gather_sparse(self, obj: Any) -> list[tuple[int, Any]] | None: ...

    def broadcast(self, obj: Any) -> Any: ...

    def send_sparse(self, objs: dict[int, Any] | None, expect: bool) -> Any: ...


def plan_save(local: LocalPieces, coord: Collectives, *, where: str = "") -> tuple[RankPlan, bool]:
    """Run the phases over ``coord``; returns (this rank's plan, whether it was reused).
    A rank that failed to describe its state takes part (``local.failed``) and every rank
    raises: that one its own error (the caller's), the others DistributedSaveError."""
    total = coord.all_reduce_sum(local.contribution())
    if total[0]:  # the failing ranks say so to rank 0, which tells everyone who they are
        got = coord.gather_sparse("failed before the save began" if local.failed else None)
        failures = coord.broadcast(dict(got) if got is not None else None)
        raise DistributedSaveError("another rank failed to describe its state", path=where, failures=failures)
    reused = local.reusable(total)
    if reused is not None:
        return reused, True
    payload = local.payload(total)
    gathered = coord.gather_sparse(payload)
    entries = None
    per_rank: dict[int, dict[str, Any]] = {}
    outcome: dict[str, Any] = {}
    if coord.rank == 0:
        assert gathered is not None
        outcome, per_rank, entries = coordinate(local, total, gathered)
    outcome = coord.broadcast(outcome)
    expect = payload is not None and "explicit" in payload and outcome.get("error") is None
    mine = coord.send_sparse(per_rank if coord.rank == 0 and outcome.get("error") is None else None, expect=expect)
    if coord.rank == 0:
        mine = per_rank.get(0)
    return local.finish(total, outcome, mine, entries if coord.rank == 0 else None), False
