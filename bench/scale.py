"""``python -m bench.scale``: what a save's planning, the manifest, a load's planning and a
memory-tier restore cost one rank, from 8 to 16,384 ranks, simulated in one process
through the real code (DESIGN.md, "Built for 16,384 ranks").

Each simulated rank runs ckpt's real planner phases (``ckpt._engine._saveplan``:
``LocalPieces`` → ``contribution`` → ``payload`` → rank 0's ``coordinate`` → ``finish``);
only the transport is simulated: a :class:`SimNet` sums the all-reduce, hands payloads to
rank 0 and counts every byte each rank sends and receives as gloo would move it (a ring
all-reduce moves about twice the vector per rank; a gather's sizes, the payloads, a
broadcast's size and body). W ranks are not all run: rank 0 and sampled ranks (1, W/2,
W-1) are, and the run checks that the sampled non-zero ranks contribute the same vector
and no payload — in these layouts every non-lead rank is alike, so the all-reduce's sum is
W times one contribution.

Reported per (model, layout, W): plan time per rank on the first and on a cached save
(rank 0, which also coordinates, and the slowest sampled rank), per piece, bytes
received per rank (rank 0 and the others), the manifest's bytes and its parse time, and
— beside it in the same run — DCP's ``DefaultSavePlanner.create_global_plan`` on the same
boxes (``bench._scale_dcp``, W up to ``--dcp-max``) and the old planner (every rank's piece
list, ``build_plan``) up to ``--old-max``. Then load planning for reshards (16,384 → 12,288
FSDP, 16,384 → 8,192 on a 2-D FSDP×TP mesh): manifest parse + the loader's schedule and
object plan for one destination rank. Then the memory tier's restore (``bench._scale_tier``,
where present): bytes moved per node for N → N−1.

Writes ``scale.json``, ``scale.md`` and ``scale.png`` (cost against W, log-log) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import time
from pathlib import Path
from typing import Any

import torch

from bench._common import md_table
from bench._shapes import mesh_coordinate, mesh_shape, model_tensors, placements
from ckpt._engine._globalplan import PieceMeta, build_plan
from ckpt._engine._load import Loader
from ckpt._engine._manifest import build_manifest
from ckpt._engine._needs import Catalog
from ckpt._engine._options import SaveOptions
from ckpt._engine._saveplan import VECTOR, LocalPieces, coordinate
from ckpt._format import Manifest
from ckpt._sharding import Sharding
from ckpt.storage import open_storage

MIB = 1 << 20
CASES = [("llama3-70b", "fsdp"), ("llama3-70b", "fsdp_tp"), ("llama3-70b", "hsdp"),
         ("llama3-405b", "fsdp_tp"), ("moe", "moe")]
WORLDS = (8, 64, 256, 1024, 4096, 16384)
RANK_KEYS = ["rng"]  # per-rank values (an RNG state): one object per rank, not in the manifest
GOALS = {"plan_first_s": 1.0, "plan_cached_s": 0.05, "recv_cached": 1 * MIB, "recv_first": 16 * MIB,
         "manifest_70b": 8 * MIB, "manifest_405b": 32 * MIB}


def rank_pieces(model: str, layout: str, world: int, rank: int) -> list[tuple[PieceMeta, Sharding, bool]]:
    """What rank ``rank`` holds: one piece per tensor, with the sharding rule a DTensor's
    placements give (``ckpt.providers._dtensor.mesh_sharding`` derives the same)."""
    mesh, coord = mesh_shape(layout, world), mesh_coordinate(layout, world, rank)
    out = []
    for key, shape, dtype, role in model_tensors(model):
        dims: list[list[int]] = [[] for _ in shape]
        for m, d in enumerate(placements(shape, role, layout, world)):
            if d is not None:
                dims[d].append(m)
        sh = Sharding(mesh, tuple(tuple(d) for d in dims), coord)
        o, s = sh.box(shape)
        out.append((PieceMeta(key, dtype, shape, o, s), sh, False))
    return out


class SimNet:
    """Bytes each simulated rank sends and receives, as gloo would move them."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.recv: dict[int, int] = {}
        self.sent: dict[int, int] = {}

    def _add(self, d: dict[int, int], r: int, n: int) -> None:
        d[r] = d.get(r, 0) + n

    def all_reduce(self, nbytes: int, ranks: list[int]) -> None:
        per = 2 * nbytes * (self.world - 1) // max(1, self.world)  # ring: reduce-scatter + all-gather
        for r in ranks:
            self._add(self.recv, r, per)
            self._add(self.sent, r, per)

    def gather_sparse(self, payloads: dict[int, Any], ranks: list[int]) -> None:
        for r in ranks:
            if r:
                self._add(self.sent, r, 8 + (len(pickle.dumps(payloads[r])) if payloads.get(r) is not None else 0))
        self._add(self.recv, 0, 8 * (self.world - 1)
                  + sum(len(pickle.dumps(p)) for r, p in payloads.items() if r and p is not None))

    def broadcast(self, obj: Any, ranks: list[int]) -> None:
        n = 8 + len(pickle.dumps(obj))
        for r in ranks:
            if r:
                self._add(self.recv, r, n)
        self._add(self.sent, 0, n)  # a tree: rank 0 sends it to a few, who forward it


def samples(world: int) -> list[int]:
    return sorted({0, 1, world // 2, world - 1} & set(range(world)))


def simulate_save(model: str, layout: str, world: int, cfg: Any) -> dict[str, Any]:
    ranks = samples(world)
    net = SimNet(world)
    held = {r: rank_pieces(model, layout, world, r) for r in ranks}
    t: dict[int, float] = {}
    local: dict[int, LocalPieces] = {}
    contrib: dict[int, list[int]] = {}
    for r in ranks:
        t0 = time.perf_counter()
        local[r] = LocalPieces(held[r], RANK_KEYS, rank=r, world=world, cfg=cfg)
        contrib[r] = local[r].contribution()
        t[r] = time.perf_counter() - t0
    others = [contrib[r] for r in ranks if r]
    assert all(c == contrib[ranks[0]] for c in others), "sampled ranks contribute different vectors"
    total = [v * world for v in contrib[0]]  # every rank alike (checked on the samples)
    net.all_reduce(8 * VECTOR, ranks)
    payloads = {}
    for r in ranks:
        t0 = time.perf_counter()
        payloads[r] = local[r].payload(total)
        t[r] += time.perf_counter() - t0
    assert all(payloads[r] is None for r in ranks if r), "a sampled non-zero rank has something for rank 0"
    net.gather_sparse(payloads, ranks)
    t0 = time.perf_counter()
    outcome, per_rank, entries = coordinate(local[0], total, [(0, payloads[0])] if payloads[0] else [])
    t[0] += time.perf_counter() - t0
    assert outcome.get("error") is None, outcome
    net.broadcast(outcome, ranks)
    plans = {}
    for r in ranks:
        t0 = time.perf_counter()
        plans[r] = local[r].finish(total, outcome, per_rank.get(r), entries if r == 0 else None)
        t[r] += time.perf_counter() - t0
    # the commit: a sum of (failed, bytes) and the outcome's broadcast
    net.all_reduce(16, ranks)
    net.broadcast({"ok": True}, ranks)
    first_recv = dict(net.recv)
    # a cached save: the same structure, the plan reused after the one all-reduce
    tc: dict[int, float] = {}
    cnet = SimNet(world)
    for r in ranks:
        t0 = time.perf_counter()
        lp = LocalPieces(held[r], RANK_KEYS, rank=r, world=world, cfg=cfg, cached=(local[r].structure, plans[r]))
        c = lp.contribution()
        reused = lp.reusable([v * world for v in c])
        tc[r] = time.perf_counter() - t0
        assert reused is plans[r]
    cnet.all_reduce(8 * VECTOR, ranks)
    cnet.all_reduce(16, ranks)
    cnet.broadcast({"ok": True}, ranks)
    # the manifest rank 0 commits, and what a restore pays to read it
    manifest = build_manifest(entries, step=1000, world_size=world, total_bytes=0, values={}, pickles={},
                              user_metadata={}, rank_objects=("0" * 16, RANK_KEYS))
    raw = manifest.to_json()
    t0 = time.perf_counter()
    Manifest.from_json(raw, where="sim")
    parse_s = time.perf_counter() - t0
    pieces = len(held[0])
    slow = max((r for r in ranks if r), key=lambda r: t[r], default=0)
    return {"model": model, "layout": layout, "W": world, "tensors": pieces, "pieces_total": pieces * world,
            "plan_first_s_rank0": t[0], "plan_first_s_other": t[slow] if slow else None,
            "plan_cached_s": max(tc.values()), "per_piece_us": 1e6 * max(t.values()) / pieces,
            "recv_first_rank0": first_recv.get(0, 0), "recv_first_other": max(first_recv.get(r, 0) for r in ranks if r)
            if world > 1 else 0, "recv_cached_max": max(cnet.recv.values()) if cnet.recv else 0,
            "manifest_bytes": len(raw), "manifest_parse_s": parse_s,
            "assignments_rank0": len(plans[0].assignments), "_raw": raw}


def old_planner(model: str, layout: str, world: int, cfg: Any) -> dict[str, Any]:
    """The planner before: every rank all-gathers every rank's piece list and plans it all."""
    metas = [[m for m, _s, _w in rank_pieces(model, layout, world, r)] for r in range(world)]
    gathered = sum(len(pickle.dumps(m)) for m in metas)
    t0 = time.perf_counter()
    plan = build_plan(metas, cfg)
    s = time.perf_counter() - t0
    return {"old_plan_s": s, "old_recv_per_rank": gathered, "old_entries_bytes": len(json.dumps(plan.entries))}


def load_plan(saved: dict[str, Any], model: str, layout: str, world: int) -> dict[str, Any]:
    """One destination rank's load planning on a changed world: parse the manifest, check
    its boxes on the real Loader, and find the objects its reads touch (the memory tier's
    ``ckpt._engine._needs.Catalog``; nothing is read)."""
    storage = open_storage("memory://scale-bench")
    rank = world // 2 + 1
    t0 = time.perf_counter()
    m = Manifest.from_json(saved["_raw"], where="sim")
    t_parse = time.perf_counter() - t0
    loader = Loader(storage, "ckpt", m, rank=rank, world_size=world)
    need, reads = 0, []
    for meta, _sh, _w in rank_pieces(model, layout, world, rank):
        if not math.prod(meta.sizes):
            continue
        dt = getattr(torch, meta.dtype)
        loader.read_into(meta.key, torch.empty((), dtype=dt).expand(meta.sizes), meta.offsets, global_shape=meta.shape)
        reads.append((meta.key, (meta.offsets, meta.sizes)))
        need += math.prod(meta.sizes) * torch.empty((), dtype=dt).element_size()
    runs = Catalog(m).objects_of(reads)
    t_plan = time.perf_counter() - t0 - t_parse
    return {"from_W": saved["W"], "to_W": world, "to_layout": layout, "parse_s": t_parse, "plan_s": t_plan,
            "objects": int((runs[:, 2] - runs[:, 1]).sum()) if len(runs) else 0, "need_bytes": need}


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = SaveOptions(pool_bytes=4 << 30).plan_config()
    rows, loads, dcp_rows = [], [], []
    saved70 = None
    for model, layout in args.cases:
        for w in args.worlds:
            if w % 16 and layout != "fsdp":
                continue
            r = simulate_save(model, layout, w, cfg)
            if w <= args.old_max:
                r.update(old_planner(model, layout, w, cfg))
            if w <= args.dcp_max:
                from bench._scale_dcp import dcp_global_plan

                d = dcp_global_plan(model, layout, w)
                r.update(dcp_s=d["seconds"], dcp_metadata_bytes=d["metadata_bytes"],
                         dcp_gathered_rank0=d["bytes_gathered_rank0"])
            if (model, layout, w) == ("llama3-70b", "fsdp", max(args.worlds)):
                saved70 = r
            print(f"{model:12s} {layout:8s} W={w:6d}  plan {r['plan_first_s_rank0']:.3f} s (rank 0), "
                  f"cached {1e3 * r['plan_cached_s']:.1f} ms, manifest {r['manifest_bytes'] / MIB:.2f} MiB"
                  + (f", DCP {r['dcp_s']:.2f} s" if "dcp_s" in r else "")
                  + (f", old {r['old_plan_s']:.2f} s" if "old_plan_s" in r else ""), flush=True)
            rows.append({k: v for k, v in r.items() if k != "_raw"})
    if saved70 is not None:
        top = saved70["W"]
        for to_w, to_layout in ((top * 3 // 4, "fsdp"), (top // 2, "fsdp_tp")):
            lp = load_plan(saved70, "llama3-70b", to_layout, to_w)
            loads.append(lp)
            print(f"load plan {top} -> {to_w} ({to_layout}): parse {lp['parse_s']:.3f} s, "
                  f"plan {lp['plan_s']:.3f} s, {lp['objects']} objects", flush=True)
    tier: list[dict[str, Any]] = []
    if args.tier_nodes:
        try:
            from bench._scale_tier import run_tier
        except ImportError:
            print("bench._scale_tier is absent: no tier restore figures", flush=True)
        else:
            tier = run_tier(list(args.tier_nodes))
            for t in tier:
                print(f"tier restore N={t['N']} -> {t['N'] - 1}: moved/node {t['moved_per_node_max'] / 2**30:.2f} "
                      f"GiB, total/lost share {t['total_over_lost_share']:.1f}", flush=True)
    return {"rows": rows, "loads": loads, "dcp": dcp_rows, "tier": tier, "goals": GOALS}


def markdown(res: dict[str, Any]) -> str:
    out = ["# Scale: per-rank cost of a save's plan, the manifest and a load's plan (simulated ranks)", "",
           "`python -m bench.scale`. Each row: rank 0 (which also coordinates) and the slowest sampled rank; "
           "bytes as gloo moves them. DCP: `DefaultSavePlanner.create_global_plan` on the same boxes (rank 0 "
           "alone), same run. Old: the planner before (all-gathered piece lists, `build_plan` on every rank).", ""]
    hdr = ["model", "layout", "W", "plan first (rank 0 / other)", "cached", "µs/piece", "recv first (r0 / other)",
           "recv cached", "manifest", "parse", "DCP plan", "DCP metadata", "old plan", "old recv/rank"]
    rows = []
    for r in res["rows"]:
        other = r["plan_first_s_other"]
        rows.append([r["model"], r["layout"], r["W"],
                     f"{r['plan_first_s_rank0']:.3f} / {other:.3f} s" if other is not None else f"{r['plan_first_s_rank0']:.3f} s",
                     f"{1e3 * r['plan_cached_s']:.1f} ms", f"{r['per_piece_us']:.1f}",
                     f"{r['recv_first_rank0'] / 1024:.1f} / {r['recv_first_other'] / 1024:.2f} KiB",
                     f"{r['recv_cached_max']} B", f"{r['manifest_bytes'] / MIB:.2f} MiB",
                     f"{1e3 * r['manifest_parse_s']:.0f} ms",
                     f"{r['dcp_s']:.2f} s" if "dcp_s" in r else "-",
                     f"{r['dcp_metadata_bytes'] / MIB:.1f} MiB" if "dcp_metadata_bytes" in r else "-",
                     f"{r['old_plan_s']:.2f} s" if "old_plan_s" in r else "-",
                     f"{r['old_recv_per_rank'] / MIB:.1f} MiB" if "old_recv_per_rank" in r else "-"])
    out.append(md_table(hdr, rows))
    if res["loads"]:
        out += ["", "## Load planning on a changed world (one destination rank)", ""]
        out.append(md_table(["from W", "to W", "layout", "manifest parse", "schedule + object plan", "objects",
                             "bytes needed"],
                            [[lp["from_W"], lp["to_W"], lp["to_layout"], f"{lp['parse_s']:.3f} s",
                              f"{lp['plan_s']:.3f} s", lp["objects"], f"{lp['need_bytes'] / MIB:.0f} MiB"]
                             for lp in res["loads"]]))
    if res["tier"]:
        out += ["", "## Memory-tier restore, N → N−1 nodes (`bench._scale_tier`, FSDP dim-0, 8 ranks per node, "
                    "1 replica)", "",
                "need & lack: the bytes a node's new ranks read and it does not hold (exact rows); moved: what "
                "the restore moves (whole shards). Old: every node given every file.", ""]
        g = 1 << 30
        out.append(md_table(
            ["N", "share/node", "moved/node max", "worst need & lack", "moved/need", "total/need & lack",
             "total/lost share", "old total/lost share", "peak/bound", "plan/node", "agreement/node"],
            [[t["N"], f"{t['share_bytes'] / g:.1f} GiB", f"{t['moved_per_node_max'] / g:.2f} GiB",
              f"{t['need_and_lack_worst_node'] / g:.2f} GiB", f"{t['moved_over_need_and_lack']:.2f}"
              if t["need_and_lack_worst_node"] else "-", f"{t['total_over_need_and_lack']:.2f}"
              if t["total_need_and_lack"] else "-", f"{t['total_over_lost_share']:.1f}",
              f"{t['old_total_over_lost_share']:.0f}", f"{t['peak_node_bytes'] / max(1, t['memory_bound_bytes']):.2f}",
              f"{1e3 * t['plan_s_node_max']:.0f} ms", f"{t['agree_bytes_per_node_max'] / 1024:.0f} KiB"]
             for t in res["tier"]]))
    out += ["", "Goals: plan ≤ 1 s first / ≤ 50 ms cached at W = 16,384; received ≤ 16 MiB first / ≤ 1 MiB "
                "cached; manifest ≤ 8 MiB (70B), ≤ 32 MiB (405B FSDP×TP)."]
    return "\n".join(out) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for (model, layout) in sorted({(r["model"], r["layout"]) for r in res["rows"]}):
        rs = [r for r in res["rows"] if (r["model"], r["layout"]) == (model, layout)]
        ws = [r["W"] for r in rs]
        a.plot(ws, [r["plan_first_s_rank0"] for r in rs], "o-", label=f"ckpt first {model} {layout}")
        a.plot(ws, [r["plan_cached_s"] for r in rs], "x--", label=f"ckpt cached {model} {layout}")
        d = [r for r in rs if "dcp_s" in r]
        if d:
            a.plot([r["W"] for r in d], [r["dcp_s"] for r in d], "s:", label=f"DCP {model} {layout}")
        b.plot(ws, [r["manifest_bytes"] for r in rs], "o-", label=f"{model} {layout}")
    for ax, title in ((a, "plan seconds per rank"), (b, "manifest bytes")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("W (ranks)")
        ax.set_title(title)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default=",".join(map(str, WORLDS)), help="simulated world sizes")
    p.add_argument("--cases", default=",".join(f"{m}:{lay}" for m, lay in CASES), help="model:layout pairs")
    p.add_argument("--dcp-max", type=int, default=64, help="largest W at which DCP's planner runs (256: ~2 min)")
    p.add_argument("--old-max", type=int, default=64, help="largest W at which the old planner runs")
    p.add_argument("--tier-nodes", default="4,8,32,128,512,2048", help="N of the tier restore simulation ('' = none)")
    p.add_argument("--quick", action="store_true", help="W = 8, 64, 1024 and one case: a smoke test")
    p.add_argument("--out", default="bench/results/scale")
    args = p.parse_args(argv)
    args.worlds = [int(x) for x in args.worlds.split(",") if x]
    args.cases = [tuple(c.split(":")) for c in args.cases.split(",") if c]
    args.tier_nodes = [int(x) for x in args.tier_nodes.split(",") if x]
    if args.quick:
        args.worlds, args.cases, args.dcp_max, args.old_max = [8, 64, 1024], [("llama3-70b", "fsdp")], 8, 8
        args.tier_nodes = [4, 8]
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "scale.md").write_text(markdown(res))
    plot(res, out / "scale.png")
    print(markdown(res))
    print(f"wrote {out}/scale.json, scale.md, scale.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
