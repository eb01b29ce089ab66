"""The memory tier's restore at scale, simulated through the real planning code.

``run_tier([4, 8, ..., 2048])``: for each N, a job of N nodes (``ranks_per_node`` each)
holds one tier step of a model's training state (``bench._shapes``: Llama-3-70B's
bfloat16 parameters, AdamW's float32 ``exp_avg`` and ``exp_avg_sq``) under FSDP dim-0 (every tensor split over all ranks by
torch.chunk's rule); one node is lost and the job restarts on N - 1 nodes. Nothing is
moved; what is planned is exactly what a restore would plan:

* the step's arrays are laid out by the save planner (``plan_array`` over the writers'
  boxes) and catalogued as a restore does (:class:`ckpt._engine._needs.Catalog`);
* node ``j`` holds the shards its ranks wrote and, by the ring rule, those of the
  ``replicas`` nodes before it;
* each new node's need is what its ranks' boxes touch (``Catalog.objects_of``, the
  function a restore applies to the reads the providers schedule), its lack what it
  does not hold (``runs_minus``), and the moves come from
  :func:`ckpt.elastic._moves.plan_moves`, one call per directory node as in a restore.

Tensors of one shape share one layout, so each shape is planned once and its bytes
weighted by how many tensors have it (a restore's directories, each planning its own
arrays from zero, make the same choices for each of them). The *old* rule (every node
given every object) is computed alongside. ``lost``: which node goes ("first",
"middle", "last" or an index): with the ring running forward, the nodes before the
lost one see their boxes shift past what they hold, so the last is the worst case.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from ckpt._engine._globalplan import array_path, piece_path
from ckpt._engine._needs import Catalog, runs_minus, runs_of
from ckpt._engine._plan import PlanConfig, plan_array
from ckpt._format import Manifest
from ckpt.elastic._moves import directory, plan_moves

__all__ = ["run_tier", "model_shapes"]

RUN_BYTES = 24  # a run (unit, lo, hi) as three int64
MOVE_BYTES = 32  # a planned move sent back: (peer, unit, lo, hi)
STEP_AGREE_BYTES = 3 * 2 * 8  # choosing the step: three all-reduces of one int64 (sent and received)


Shapes = dict[str, tuple[tuple[int, ...], str, int]]  # class name -> (shape, dtype, how many tensors)


def model_shapes(model: str) -> Shapes:
    """The distinct (shape, dtype) of a model's training state (``bench._shapes``:
    parameters, AdamW's ``exp_avg`` and ``exp_avg_sq``) -> how many tensors have it."""
    from bench._shapes import model_tensors

    groups: dict[tuple[tuple[int, ...], str], int] = {}
    for _key, shape, dtype, _role in model_tensors(model):
        groups[(tuple(shape), dtype)] = groups.get((tuple(shape), dtype), 0) + 1
    return {f"{dtype}-{'x'.join(map(str, shape))}": (shape, dtype, n) for (shape, dtype), n in sorted(groups.items())}


def _chunk_rows(n: int, world: int) -> tuple[int, int]:
    """torch.chunk's rows per rank and the number of non-empty ranks."""
    c = -(-n // world)
    return c, -(-n // c)


def _step(shapes: Shapes, world: int) -> tuple[Catalog, list[int], list[int]]:
    """The catalog of one tier step saved on ``world`` ranks, laid out as the save planner
    does (one array per distinct shape, or one per writer's box where the boxes align
    too poorly: the "pieces" layout), each unit's multiplicity (tensors of that shape and
    dtype) and the first row each unit holds."""
    entries: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    origin: dict[str, int] = {}
    cfg = PlanConfig()
    for name, (shape, dtype, count) in shapes.items():
        itemsize = np.dtype("uint16" if dtype == "bfloat16" else dtype).itemsize
        c, used = _chunk_rows(shape[0], world)
        tail = (0,) * (len(shape) - 1)
        boxes = [((r * c, *tail), (min(c, shape[0] - r * c), *shape[1:])) for r in range(used)]
        path = array_path(name)
        lay = plan_array(path, shape, itemsize, boxes, cfg)
        entry: dict[str, Any] = {"kind": "tensor", "dtype": dtype, "shape": list(shape)}
        if lay is not None:
            entry["storage"] = {"layout": "array", "path": path, "shard_shape": list(lay.shard_shape),
                                "chunk_shape": list(lay.chunk_shape)}
            counts[path], origin[path] = count, 0
        else:
            pieces = []
            for i, (offs, sizes) in enumerate(boxes):
                pp = piece_path(name, i)
                pl = plan_array(pp, sizes, itemsize, [((0, *tail), sizes)], cfg)
                assert pl is not None
                pieces.append({"offsets": list(offs), "sizes": list(sizes), "path": pp,
                               "shard_shape": list(pl.shard_shape), "chunk_shape": list(pl.chunk_shape)})
                counts[pp], origin[pp] = count, offs[0]
            entry["storage"] = {"layout": "pieces", "pieces": pieces}
        entries[name] = entry
    cat = Catalog(Manifest(step=0, entries=entries, world_size=world))
    return cat, [counts[p] for p in cat.paths], [origin[p] for p in cat.paths]


def _writer_nodes(cat: Catalog, unit: int, first_row: int, world: int, rpn: int) -> np.ndarray:
    """The node that wrote each shard of ``unit`` (a shard lies inside one writer's box)."""
    u = cat.units[unit]
    assert u.layout is not None
    c, _ = _chunk_rows(cat.entries[next(k for k in u.stored.keys)]["shape"][0] if u.stored else 1, world)
    grid = u.grid
    rows0 = first_row + np.arange(grid[0], dtype=np.int64) * u.layout.shard_shape[0]
    return np.repeat((rows0 // c) // rpn, math.prod(grid[1:]))


def _exact_lack(shapes: Shapes, n: int, survivors: list[int], rpn: int, replicas: int) -> np.ndarray:
    """Bytes each new node's ranks read and its node does not hold, row by row (no
    object granularity): the least any restore from memory must move to it."""
    old_w, new_w = n * rpn, len(survivors) * rpn
    out = np.zeros(len(survivors))
    for shape, dtype, count in shapes.values():
        rows = shape[0]
        c, c2 = _chunk_rows(rows, old_w)[0], _chunk_rows(rows, new_w)[0]
        row_bytes = math.prod(shape[1:]) * np.dtype("uint16" if dtype == "bfloat16" else dtype).itemsize * count
        for k, j in enumerate(survivors):
            a, b = min(rows, k * rpn * c2), min(rows, (k + 1) * rpn * c2)
            have = 0
            for h in {(j - d) % n for d in range(min(replicas, n - 1) + 1)}:
                lo, hi = min(rows, h * rpn * c), min(rows, (h + 1) * rpn * c)
                have += max(0, min(b, hi) - max(a, lo))
            out[k] += (b - a - have) * row_bytes
    return out


def _lost_index(lost: str | int, n: int) -> int:
    if isinstance(lost, int):
        return lost % n
    return {"first": 0, "middle": n // 2, "last": n - 1}[lost]


def run_one(n: int, *, ranks_per_node: int = 8, replicas: int = 1, model: str = "llama3-70b",
            lost: str | int = "middle", memory_keep: int = 2) -> dict[str, Any]:
    shapes = model_shapes(model)
    rpn, old_world, new_world = ranks_per_node, n * ranks_per_node, (n - 1) * ranks_per_node
    cat, weight, first = _step(shapes, old_world)
    sizes = [np.asarray(cat.sizes(u)) * w for u, w in enumerate(weight)]
    gone = _lost_index(lost, n)
    survivors = [j for j in range(n) if j != gone]  # new node k is old node survivors[k]
    m = len(survivors)
    t0 = time.perf_counter()
    # holdings by the ring rule
    writers = [_writer_nodes(cat, u, first[u], old_world, rpn) for u in range(len(cat))]
    held: list[np.ndarray] = []
    for j in survivors:
        parts = [runs_of(u, np.flatnonzero((j - w) % n <= min(replicas, n - 1))) for u, w in enumerate(writers)]
        held.append(np.concatenate(parts))
    t_hold = time.perf_counter() - t0
    # needs of the new layout, per node (its ranks' boxes), and lacks
    node_s = np.zeros(m)
    needs, lacks = [], []
    for k in range(m):
        t1 = time.perf_counter()
        reads = []
        for key, e in cat.entries.items():
            shape = e["shape"]
            c, _ = _chunk_rows(shape[0], new_world)
            for r in range(k * rpn, (k + 1) * rpn):
                lo, hi = r * c, min(shape[0], (r + 1) * c)
                if hi > lo:
                    reads.append((key, ((lo, *(0,) * (len(shape) - 1)), (hi - lo, *shape[1:]))))
        need = cat.objects_of(reads)
        needs.append(need)
        lacks.append(runs_minus(need, held[k]))
        node_s[k] += time.perf_counter() - t1
    # the directories' plans
    moves_all = []
    units = np.arange(len(cat))
    for d in sorted(set(directory(units, m).tolist())):
        t1 = time.perf_counter()
        mine = units[directory(units, m) == d]
        pick = [r[np.isin(r[:, 0], mine)] for r in held], [r[np.isin(r[:, 0], mine)] for r in lacks]
        moves_all.append(plan_moves(pick[0], pick[1], lambda u: sizes[u]))
        node_s[d] += time.perf_counter() - t1
    plan_s = time.perf_counter() - t0
    recv = sum(mv.received(m) for mv in moves_all)
    sent = sum(mv.sent(m) for mv in moves_all)
    missing = sum(len(mv.missing) for mv in moves_all)

    def nbytes(runs: np.ndarray) -> int:
        return int(sum(sizes[u][lo:hi].sum() for u, lo, hi in runs.tolist()))

    need_b = np.array([nbytes(x) for x in needs])
    lack_b = np.array([nbytes(x) for x in lacks])
    held_b = np.array([nbytes(x) for x in held])
    job = int(sum(s.sum() for s in sizes))
    own = np.zeros(n, dtype=np.int64)
    for u, w in enumerate(writers):
        own += np.bincount(w, weights=sizes[u], minlength=n).astype(np.int64)
    lost_share = int(own[gone])
    worst = int(np.argmax(recv))
    exact = _exact_lack(shapes, n, survivors, rpn, replicas)
    # agreement bytes of a node, sent and received: choosing the step (fixed-size
    # all-reduces), the runs to the directories, the moves back (all-to-all; lengths and
    # headers per peer)
    wt = np.asarray(weight, dtype=np.float64)
    runs_sent = np.array([wt[held[k][:, 0]].sum() + wt[lacks[k][:, 0]].sum() for k in range(m)]) * RUN_BYTES
    rows = np.zeros(m)
    for mv in moves_all:
        w = wt[mv.moves[:, 2]]
        rows += np.bincount(mv.moves[:, 0], weights=w, minlength=m) + np.bincount(mv.moves[:, 1], weights=w, minlength=m)
    per_peer = 2 * 2 * 24 * (m - 1)  # two all-to-alls, a length and a header to and from every peer
    agree = STEP_AGREE_BYTES + per_peer + runs_sent + runs_sent.mean() + 2 * rows * MOVE_BYTES
    old_moved = job - held_b  # the old rule: every node gets every object it does not hold
    share = job / n
    return {
        "N": n, "to": m, "ranks": old_world, "lost_node": gone, "job_bytes": job, "share_bytes": int(share),
        "moved_per_node_max": int(recv.max()), "moved_per_node_mean": float(recv.mean()),
        "sent_per_node_max": int(sent.max()),
        "need_per_node_max": int(need_b.max()),
        "need_and_lack_worst_node": int(lack_b[worst]), "need_and_lack_max": int(lack_b.max()),
        "need_and_lack_exact_worst_node": int(exact[worst]), "total_need_and_lack_exact": int(exact.sum()),
        "moved_over_need_and_lack": float(recv[worst] / max(1, exact[worst])),
        "total_moved": int(recv.sum()), "total_need_and_lack": int(lack_b.sum()), "lost_share": lost_share,
        "total_over_lost_share": float(recv.sum() / max(1, lost_share)),
        "total_over_need_and_lack": float(recv.sum() / max(1, exact.sum())),
        "missing": int(missing),
        "peak_node_bytes": int((held_b + recv).max()),
        "memory_bound_bytes": int((1 + replicas) * memory_keep * own.max()),
        "old_total_moved": int(old_moved.sum()), "old_moved_per_node_max": int(old_moved.max()),
        "old_total_over_lost_share": float(old_moved.sum() / max(1, lost_share)),
        "plan_s": plan_s, "plan_s_node_max": float(node_s.max() + t_hold / m),
        "agree_bytes_per_node_max": int(agree.max()),
    }


def run_tier(nodes: list[int], *, ranks_per_node: int = 8, replicas: int = 1, model: str = "llama3-70b",
             lost: str | int = "middle") -> list[dict]:
    """One row per N in ``nodes``: N -> N - 1 nodes, one lost (see the module docstring)."""
    return [run_one(n, ranks_per_node=ranks_per_node, replicas=replicas, model=model, lost=lost) for n in nodes]


if __name__ == "__main__":  # pragma: no cover - a manual run
    import sys

    which = sys.argv[1] if len(sys.argv) > 1 else "middle"
    for row in run_tier([4, 8, 32, 128, 512, 2048], lost=int(which) if which.isdigit() else which):
        gib = 2**30
        print(f"N={row['N']:5d} lost={row['lost_node']:5d} share={row['share_bytes'] / gib:8.2f}G "
              f"moved/node max={row['moved_per_node_max'] / gib:7.2f}G mean={row['moved_per_node_mean'] / gib:7.2f}G "
              f"worst need&lack={row['need_and_lack_exact_worst_node'] / gib:7.2f}G "
              f"ratio={row['moved_over_need_and_lack']:.3f} total={row['total_moved'] / gib:9.1f}G "
              f"(x{row['total_over_need_and_lack']:.3f} of need&lack) "
              f"/lost={row['total_over_lost_share']:8.2f} old/lost={row['old_total_over_lost_share']:9.1f} "
              f"peak={row['peak_node_bytes'] / gib:7.2f}G bound={row['memory_bound_bytes'] / gib:7.2f}G "
              f"plan={row['plan_s']:.2f}s node={row['plan_s_node_max'] * 1e3:.1f}ms "
              f"agree={row['agree_bytes_per_node_max'] / 1024:.0f}KiB missing={row['missing']}")
