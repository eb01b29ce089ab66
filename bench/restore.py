"""Scenario "restore": save and restore, single process and distributed, ckpt vs DCP.

1. **Single process, same layout.** The state of ``make_state(state_gib)`` (float32
   tensors of 64 MiB) is written once by ``ckpt.save``, ``torch.save`` (+ an fsync of the
   file, as ckpt and DCP make theirs durable) and ``dcp.save(no_dist=True)``, then
   restored by ``ckpt.load`` and ``dcp.load`` into preallocated (already touched) tensors
   and by ``torch.load(mmap=False)``: once cold (the files evicted from the page cache
   first) and ``repeats`` times warm (the minimum kept). Every restore is checked bit for
   bit after its clock stops.
2. **Distributed** (real gloo process groups on CPU, spawned ranks, one torch thread per
   rank). Every tensor of the same shapes is a DTensor sharded by rows (``Shard(0)``) on a
   1-D mesh of the W saving ranks; its rows are cheap functions of the row's global index
   (see :func:`pattern`), so every rank builds and checks its own rows without the global
   tensor. ckpt (``ckpt.save`` / ``ckpt.load``) and DCP (``dcp.save`` / ``dcp.load``)
   save on W ranks, load on W ranks, then new groups of fewer ranks load the W-rank
   checkpoints into DTensors sharded over their own size (resharding). Each timed operation starts
   after a barrier; its time is the maximum over ranks, the minimum over ``repeats``.
   Loads read warm files (just written). Every local shard is checked bit for bit after
   the clock stops.

``python -m bench.restore [--quick]`` runs it alone and prints its Markdown section.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bench._common import (
    GIB,
    Config,
    Progress,
    best_of,
    drop_page_cache,
    fmt,
    fsync_tree,
    make_state,
    md_table,
    ratio,
    state_bytes,
    timed,
)

SCENARIO = "restore"
SINGLE_VARIANTS = ("ckpt", "torch", "dcp")
SINGLE_NAMES = {"ckpt": "ckpt", "torch": "torch.save/load", "dcp": "DCP"}
DIST_VARIANTS = ("ckpt", "dcp")
RESHARD_GOAL = 1.25  # ckpt resharded restore within 1.25x of the same-layout restore
SINGLE_SPEEDUP_GOAL = 1.5  # ckpt single-process restore >= 1.5x faster than DCP

PATTERN_ROWS = 251  # rows of the random block the distributed state's tensors repeat (a prime)

Shapes = list[tuple[str, tuple[int, int]]]


# --------------------------------------------------------------------------- plan


def save_world(cfg: Config) -> int:
    """Ranks that save the distributed checkpoint: the largest of ``cfg.ranks`` (>= 2)."""
    return max(2, *cfg.ranks)


def reshard_worlds(cfg: Config) -> list[int]:
    """Smaller worlds that load the W-rank checkpoint: W // 2 and W - 1 (4 -> 2, 3; 2 -> 1)."""
    w = save_world(cfg)
    return sorted({w // 2, w - 1} - {0, w})


def steps(cfg: Config) -> int:
    """Number of ``progress.step`` calls :func:`run` makes."""
    single = len(SINGLE_VARIANTS) * 3  # save, cold load, warm loads
    dist_save = 1 + 2 * len(DIST_VARIANTS)  # start ranks; save and load per variant
    dist_reshard = len(reshard_worlds(cfg)) * (1 + len(DIST_VARIANTS))  # start ranks; load per variant
    return single + dist_save + dist_reshard


# --------------------------------------------------------------------------- helpers


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def gbps(nbytes: int, seconds: float | None) -> float | None:
    return None if seconds is None or seconds <= 0 else nbytes / seconds / 1e9


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rows_of(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [lo, hi) of ``rank`` under DTensor's ``Shard(0)`` rule (torch.chunk: ceil(n / W)
    rows per rank, the last ranks get fewer or none)."""
    c = -(-n // world)
    return min(rank * c, n), min((rank + 1) * c, n)


def pattern(index: int, row0: int, rows: int, cols: int) -> torch.Tensor:
    """Rows [row0, row0 + rows) of global tensor ``index``, cheap to rebuild for any slice:
    row i is row i mod 251 of a seeded randn block, its first element replaced by the bits
    of int32 i (so a row read from the wrong place never matches)."""
    base = torch.randn(PATTERN_ROWS, cols, generator=torch.Generator().manual_seed(1000 + index))
    ridx = torch.arange(row0, row0 + rows, dtype=torch.int64)
    out = base.index_select(0, ridx % PATTERN_ROWS)
    if cols and rows:
        out.view(torch.int32)[:, 0] = ridx.to(torch.int32)
    return out


# --------------------------------------------------------------------------- single process


def _single(cfg: Config, tmp: Path, progress: Progress) -> tuple[dict[str, Any], Shapes]:
    import torch.distributed.checkpoint as dcp

    import ckpt

    state = make_state(int(cfg.state_gib * GIB))
    nbytes = state_bytes(state)
    shapes: Shapes = [(k, (int(v.shape[0]), int(v.shape[1]))) for k, v in state.items()]
    root = tmp / "restore-single"
    root.mkdir(parents=True, exist_ok=True)
    paths = {"ckpt": root / "ckpt", "torch": root / "state.pt", "dcp": root / "dcp"}

    def save_torch() -> None:
        torch.save(state, paths["torch"])
        fsync_tree(paths["torch"])

    savers: dict[str, Callable[[], Any]] = {
        "ckpt": lambda: ckpt.save(state, str(paths["ckpt"])),
        "torch": save_torch,
        "dcp": lambda: dcp.save(state, checkpoint_id=str(paths["dcp"]), no_dist=True),
    }
    save_s: dict[str, float] = {}
    for name in SINGLE_VARIANTS:
        progress.step(f"single process: {SINGLE_NAMES[name]} save")
        save_s[name] = timed(savers[name])

    target = {k: torch.zeros_like(v) for k, v in state.items()}  # preallocated, pages touched
    loaded: dict[str, dict[str, torch.Tensor]] = {}

    def load_torch() -> None:
        loaded["torch"] = torch.load(paths["torch"], mmap=False, weights_only=True)

    loaders: dict[str, Callable[[], Any]] = {
        "ckpt": lambda: ckpt.load(target, str(paths["ckpt"])),
        "torch": load_torch,
        "dcp": lambda: dcp.load(target, checkpoint_id=str(paths["dcp"]), no_dist=True),
    }
    cold_s: dict[str, float | None] = {}
    warm_s: dict[str, float] = {}
    exact: dict[str, bool] = {}
    for name in SINGLE_VARIANTS:
        for t in target.values():
            t.zero_()
        loaded.clear()
        progress.step(f"single process: {SINGLE_NAMES[name]} load, cold")
        dropped = drop_page_cache(paths[name])
        t_cold = timed(loaders[name])
        cold_s[name] = t_cold if dropped else None
        progress.step(f"single process: {SINGLE_NAMES[name]} load, warm (best of {cfg.repeats})")
        warm_s[name] = best_of(cfg.repeats, loaders[name], before=loaded.clear)
        got = loaded["torch"] if name == "torch" else target
        exact[name] = set(got) == set(state) and all(same_bits(got[k], v) for k, v in state.items())
        loaded.clear()
    files = {name: (p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file()))
             for name, p in paths.items()}
    shutil.rmtree(root, ignore_errors=True)
    return {"bytes": nbytes, "tensors": len(state), "files_bytes": files, "save_s": save_s, "load_warm_s": warm_s,
            "load_cold_s": cold_s, "exact": exact}, shapes


# --------------------------------------------------------------------------- distributed: ranks


def _local_state(shapes: Shapes, mesh: Any, *, fill: bool) -> dict[str, Any]:
    """This rank's DTensors (Shard(0) over ``mesh``): its rows of the pattern, or zeros."""
    from torch.distributed.tensor import DTensor, Shard

    world, rank = mesh.size(), mesh.get_local_rank()
    state: dict[str, Any] = {}
    for i, (key, (n, cols)) in enumerate(shapes):
        lo, hi = rows_of(n, world, rank)
        local = pattern(i, lo, hi - lo, cols) if fill else torch.zeros(hi - lo, cols)
        state[key] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size((n, cols)),
                                        stride=(cols, 1))
    return state


def _check_state(state: dict[str, Any], shapes: Shapes, mesh: Any) -> list[str]:
    world, rank = mesh.size(), mesh.get_local_rank()
    bad = []
    for i, (key, (n, cols)) in enumerate(shapes):
        lo, hi = rows_of(n, world, rank)
        if not same_bits(state[key].to_local(), pattern(i, lo, hi - lo, cols)):
            bad.append(f"{key}: rows [{lo}, {hi}) on rank {rank}/{world} differ")
    return bad


def _rank_job(job: dict[str, Any], note: Callable[[str], None]) -> dict[str, Any]:
    """Runs on every rank of a group: the timed saves and/or loads of one launch."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    import ckpt

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    shapes: Shapes = [(k, (int(s[0]), int(s[1]))) for k, s in job["shapes"]]
    root = Path(job["root"])
    repeats = int(job["repeats"])
    times: dict[str, list[float]] = {}
    bad: list[str] = []

    def clock(fn: Callable[[], Any]) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    if job["save"]:
        state = _local_state(shapes, mesh, fill=True)
        for v in DIST_VARIANTS:
            note(f"distributed: {v} save on {world} ranks")
            ts = []
            for r in range(repeats):
                url = str(root / f"{v}-w{world}-r{r}")
                save: Callable[[], Any] = (functools.partial(ckpt.save, state, url) if v == "ckpt" else
                                           functools.partial(dcp.save, state, checkpoint_id=url))
                ts.append(clock(save))
            times[f"{v}.save"] = ts
            dist.barrier()
            if dist.get_rank() == 0:  # keep the last copy only (the one the loads read)
                for r in range(repeats - 1):
                    shutil.rmtree(root / f"{v}-w{world}-r{r}", ignore_errors=True)
        del state
    for v in DIST_VARIANTS:
        url = job["sources"][v]
        target = _local_state(shapes, mesh, fill=False)
        note(f"distributed: {v} load {job['save_world']} -> {world} ranks")
        load: Callable[[], Any] = (functools.partial(ckpt.load, target, url) if v == "ckpt" else
                                   functools.partial(dcp.load, target, checkpoint_id=url))
        times[f"{v}.load"] = [clock(load) for _ in range(repeats)]
        bad += [f"{v}: {b}" for b in _check_state(target, shapes, mesh)]
        del target
    return {"times": times, "bad": bad}


def _rank_main(rank: int, world: int, port: int, job: dict[str, Any], queue: Any, out_dir: str,
               timeout: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    code = 0

    def note(what: str) -> None:
        if queue is not None:
            queue.put(what)

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
        result = _rank_job(job, note)
        with open(os.path.join(out_dir, f"{rank}.tmp"), "wb") as f:
            pickle.dump(result, f)
        os.replace(os.path.join(out_dir, f"{rank}.tmp"), os.path.join(out_dir, f"{rank}.pkl"))
        dist.barrier()  # nobody leaves while a peer may still talk to it
    except BaseException:
        code = 1
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as ef:
            ef.write(traceback.format_exc())
    if queue is not None:
        queue.close()
        queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without interpreter finalisation (a gloo thread dropping its last tensor
    # reference during finalisation can abort the process after all work was done).
    os._exit(code)


# --------------------------------------------------------------------------- distributed: parent


@contextlib.contextmanager
def _child_env() -> Iterator[None]:
    values = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
              "TORCH_CPP_LOG_LEVEL": "ERROR"}
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _launch(world: int, job: dict[str, Any], tmp: Path, progress: Progress, timeout: float) -> list[dict[str, Any]]:
    """Run :func:`_rank_job` on ``world`` spawned ranks of a fresh gloo group; rank 0's
    notes become progress steps. Returns each rank's result."""
    import queue as queue_mod

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    out_dir = Path(tempfile.mkdtemp(prefix=f"restore-ranks-w{world}-", dir=tmp))
    port = free_port()
    with _child_env():
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, job, q if r == 0 else None, str(out_dir),
                                                      timeout), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
    deadline = time.monotonic() + timeout

    def drain(block: bool) -> None:
        while True:
            try:
                progress.step(q.get(timeout=0.2) if block else q.get_nowait())
            except queue_mod.Empty:
                return
            block = False

    try:
        while any(p.is_alive() for p in procs):
            drain(block=True)
            if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
        drain(block=False)
    finally:
        end = time.monotonic() + 5
        if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                if p.is_alive():
                    p.terminate()
        for p in procs:
            p.join(max(0.1, end - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1)
        q.close()
    errs = {r: (out_dir / f"{r}.err").read_text() for r in range(world) if (out_dir / f"{r}.err").exists()}
    codes = [p.exitcode for p in procs]
    if errs or any(c != 0 for c in codes):
        detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errs.items()))
        raise RuntimeError(f"restore benchmark on {world} ranks failed (exit codes {codes}){detail}")
    results = [pickle.loads((out_dir / f"{r}.pkl").read_bytes()) for r in range(world)]
    shutil.rmtree(out_dir, ignore_errors=True)
    return results


def _reduce(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per operation: each repeat's max over ranks, and the min of those."""
    out: dict[str, dict[str, Any]] = {}
    for key in results[0]["times"]:
        per_rank = [res["times"][key] for res in results]
        per_repeat = [max(ts) for ts in zip(*per_rank, strict=True)]
        out[key] = {"seconds": min(per_repeat), "per_repeat_max_s": per_repeat, "per_rank_s": per_rank}
    return out


def _distributed(cfg: Config, tmp: Path, progress: Progress, shapes: Shapes) -> dict[str, Any]:
    w = save_world(cfg)
    root = tmp / "restore-dist"
    root.mkdir(parents=True, exist_ok=True)
    nbytes = sum(n * c * 4 for _k, (n, c) in shapes)
    timeout = 300.0 + 120.0 * cfg.state_gib * cfg.repeats
    sources = {v: str(root / f"{v}-w{w}-r{cfg.repeats - 1}") for v in DIST_VARIANTS}
    job = {"root": str(root), "shapes": shapes, "repeats": cfg.repeats, "save_world": w, "save": True,
           "sources": sources}
    ops: list[dict[str, Any]] = []
    bad: list[str] = []
    for world in [w, *reshard_worlds(cfg)]:
        progress.step(f"distributed: starting {world} ranks")
        results = _launch(world, {**job, "save": world == w}, tmp, progress, timeout)
        for res in results:
            bad += res["bad"]
        for key, fig in _reduce(results).items():
            variant, op = key.split(".")
            ops.append({"variant": variant, "op": op, "from_ranks": w, "to_ranks": world, **fig,
                        "gbps": gbps(nbytes, fig["seconds"])})
    shutil.rmtree(root, ignore_errors=True)
    return {"save_ranks": w, "reshard_ranks": reshard_worlds(cfg), "bytes": nbytes, "tensors": len(shapes),
            "ops": ops, "exact": not bad, "mismatches": bad[:20]}


# --------------------------------------------------------------------------- report


def _op_seconds(dist: dict[str, Any], variant: str, op: str, to_ranks: int) -> float | None:
    for o in dist["ops"]:
        if o["variant"] == variant and o["op"] == op and o["to_ranks"] == to_ranks:
            return float(o["seconds"])
    return None


def _ratios(single: dict[str, Any], dist: dict[str, Any]) -> dict[str, float | None]:
    w = dist["save_ranks"]
    r: dict[str, float | None] = {
        "ckpt_restore_speedup_over_dcp_single": ratio(single["load_warm_s"]["dcp"], single["load_warm_s"]["ckpt"]),
        "ckpt_restore_speedup_over_dcp_single_cold": ratio(single["load_cold_s"]["dcp"],
                                                           single["load_cold_s"]["ckpt"]),
        "ckpt_restore_speedup_over_torch_load_single": ratio(single["load_warm_s"]["torch"],
                                                             single["load_warm_s"]["ckpt"]),
        "ckpt_load_speedup_over_dcp": ratio(_op_seconds(dist, "dcp", "load", w), _op_seconds(dist, "ckpt", "load", w)),
        "ckpt_save_speedup_over_dcp": ratio(_op_seconds(dist, "dcp", "save", w), _op_seconds(dist, "ckpt", "save", w)),
    }
    for v in DIST_VARIANTS:
        same = _op_seconds(dist, v, "load", w)
        per = {m: ratio(_op_seconds(dist, v, "load", m), same) for m in dist["reshard_ranks"]}
        for m, x in per.items():
            r[f"{v}_resharded_over_same_layout_{w}to{m}"] = x
        vals = [x for x in per.values() if x is not None]
        r[f"{v}_resharded_over_same_layout"] = max(vals) if vals else None  # the worst case
    return r


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _markdown(cfg: Config, single: dict[str, Any], dist: dict[str, Any], ratios: dict[str, float | None],
              loadavg: dict[str, float | None]) -> str:
    gib = single["bytes"] / GIB
    cores = os.cpu_count() or 1
    w = dist["save_ranks"]
    cold_note = ("cold = the files evicted from the page cache (fsync + POSIX_FADV_DONTNEED) before one load"
                 if all(v is not None for v in single["load_cold_s"].values()) else
                 "cold loads unavailable on this platform (no posix_fadvise)")
    head = (f"### Restore: single process and distributed, ckpt vs DCP\n\n"
            f"{gib:.2f} GiB of float32 tensors ({single['tensors']} of up to 64 MiB). Single process: written "
            f"once by each library (torch.save followed by an fsync), restored into preallocated tensors "
            f"(torch.load(mmap=False) allocates its own); warm = best of {cfg.repeats} with the files in the page "
            f"cache, {cold_note}. Distributed: real gloo process groups on CPU, each tensor a DTensor sharded by "
            f"rows (Shard(0)) over a 1-D mesh; saved on {w} ranks, loaded on {w} ranks (same layout) and on "
            f"{', '.join(str(m) for m in dist['reshard_ranks'])} (resharded); each time is the maximum over ranks "
            f"after a barrier, best of {cfg.repeats}, files warm. This machine has {cores} cores: {w} ranks "
            f"{'oversubscribe it' if w > cores else 'share them'} (torch.set_num_threads(1) in each rank; "
            f"ckpt's and DCP's I/O threads compete too; 1-minute load average {fmt(loadavg['before'])} before the run, "
            f"{fmt(loadavg['after'])} after). Every restored tensor was checked bit for bit after the clock stopped: "
            f"single {'exact' if all(single['exact'].values()) else 'MISMATCH ' + str(single['exact'])}, "
            f"distributed {'exact' if dist['exact'] else 'MISMATCH'}.")
    nb = single["bytes"]
    rows: list[list[Any]] = []
    for v in SINGLE_VARIANTS:
        rows.append([SINGLE_NAMES[v], "save (once)", fmt(single["save_s"][v], 3), fmt(gbps(nb, single["save_s"][v]))])
    for v in SINGLE_VARIANTS:
        rows.append([SINGLE_NAMES[v], "load, warm", fmt(single["load_warm_s"][v], 3),
                     fmt(gbps(nb, single["load_warm_s"][v]))])
        rows.append([SINGLE_NAMES[v], "load, cold", fmt(single["load_cold_s"][v], 3),
                     fmt(gbps(nb, single["load_cold_s"][v]))])
    t1 = md_table(["variant", "operation (1 process)", "seconds", "GB/s"], rows)
    drows: list[list[Any]] = []
    for o in sorted(dist["ops"], key=lambda o: (o["op"] != "save", -o["to_ranks"], o["variant"])):
        what = (f"save on {o['to_ranks']} ranks" if o["op"] == "save" else
                f"load {o['from_ranks']} -> {o['to_ranks']} rank{'s' if o['to_ranks'] > 1 else ''}"
                + (" (same layout)" if o["to_ranks"] == o["from_ranks"] else " (resharded)"))
        drows.append(["ckpt" if o["variant"] == "ckpt" else "DCP", what, fmt(o["seconds"], 3), fmt(o["gbps"])])
    t2 = md_table(["variant", "operation (distributed)", "seconds", "GB/s"], drows)
    goals = {"ckpt_restore_speedup_over_dcp_single": f">= {SINGLE_SPEEDUP_GOAL}",
             "ckpt_resharded_over_same_layout": f"<= {RESHARD_GOAL}"}
    goals.update({f"ckpt_resharded_over_same_layout_{w}to{m}": f"<= {RESHARD_GOAL}" for m in dist["reshard_ranks"]})
    rrows = [[k, fmt(v), goals.get(k, "")] for k, v in ratios.items()]
    t3 = md_table(["ratio", "value", "goal"], rrows, align="lrl")
    return f"{head}\n\n{t1}\n\n{t2}\n\n{t3}\n"


# --------------------------------------------------------------------------- entry points


def run(cfg: Config, tmp: Path, progress: Progress) -> dict[str, Any]:
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    load_before = _loadavg()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single, shapes = _single(cfg, tmp, progress)
    dist = _distributed(cfg, tmp, progress, shapes)
    ratios = _ratios(single, dist)
    loadavg = {"before": load_before, "after": _loadavg()}
    return {"scenario": SCENARIO, "markdown": _markdown(cfg, single, dist, ratios, loadavg),
            "config": {"quick": cfg.quick, "state_gib": cfg.state_gib, "repeats": cfg.repeats,
                       "save_ranks": dist["save_ranks"], "reshard_ranks": dist["reshard_ranks"],
                       "cpu_count": os.cpu_count()},
            "loadavg_1min": loadavg,
            "single": single, "distributed": dist, "ratios": ratios,
            "goals": {"ckpt_restore_speedup_over_dcp_single": SINGLE_SPEEDUP_GOAL,
                      "ckpt_resharded_over_same_layout": RESHARD_GOAL}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.restore", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small, fast run (smoke test)")
    p.add_argument("--state-gib", type=float, default=None, help="total state in GiB (default 1.0; --quick: 0.03)")
    p.add_argument("--repeats", type=int, default=None, help="runs of each timed operation; the minimum is kept")
    p.add_argument("--tmp-dir", default=None, help="where checkpoints are written (default: system temp dir)")
    p.add_argument("--json", default=None, help="also write the result dict to this file")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-restore-", dir=a.tmp_dir) as d:
        tmp = Path(d)
        cfg = Config.quick_config(tmp / "out") if a.quick else Config()
        if a.state_gib is not None:
            cfg.state_gib = a.state_gib
        if a.repeats is not None:
            cfg.repeats = max(1, a.repeats)
        progress = Progress(steps(cfg))
        try:
            result = run(cfg, tmp / "work", progress)
        finally:
            progress.close()
        if progress.done != steps(cfg):
            progress.log(f"(progress: {progress.done} steps made, {steps(cfg)} announced)")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    from bench import restore  # the spawned ranks import this module by name, not __main__

    sys.exit(restore.main())
