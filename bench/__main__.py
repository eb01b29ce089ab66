"""``python -m bench``: ckpt against the alternatives and against the hardware, in one run.

Scenarios (``--only`` picks some): ``hardware`` (the storage's and memory's own limits),
``train`` (a training loop with a checkpoint every k steps; blocked time and end-to-end
time, over k and over state size), ``files`` (what writing the checkpoint's files costs
the loop: ckpt vs its files written raw vs the same bytes as one file), ``durable`` (time to durable and persisted GB/s over
state size), ``restore`` (restore time, same layout and resharded 4->2, 4->3 ranks),
``memory`` (peak host memory during a save), ``s3`` (save/load to a local S3 server),
``tier`` (the memory tier: per-step cost, replication against raw gloo, restore from it).

Writes ``results.json`` (every raw figure, the machine, the versions), ``summary.md``
(the tables and the goals) and PNG plots into ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench._common import Config, Progress, fmt, machine_info, md_table
from bench.train_loop import sweep_k

SCENARIOS = ("hardware", "train", "files", "durable", "restore", "memory", "s3", "tier")
MODULES = {"hardware": "bench.hardware", "train": "bench.train_loop", "files": "bench.files", "durable": "bench.durable",
           "restore": "bench.restore", "memory": "bench.memory", "s3": "bench.s3", "tier": "bench.tier"}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse(argv: list[str] | None) -> tuple[Config, list[str], str | None]:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: about a minute (smoke test)")
    p.add_argument("--out", default="bench/results", help="directory for results.json, summary.md and plots")
    p.add_argument("--only", default=None, help=f"comma-separated scenarios (default: all of {','.join(SCENARIOS)})")
    p.add_argument("--state-gib", type=float, default=None, help="state size of single-size scenarios (default 1)")
    p.add_argument("--sizes", type=_floats, default=None, help="state sizes in GiB for the sweeps (default 0.25,0.5,1,2)")
    p.add_argument("--every", type=_ints, default=None, help="checkpoint every k steps, values of k (default 1,5,10)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 12, at least 2k+1)")
    p.add_argument("--repeats", type=int, default=None, help="runs of each timed operation; the minimum is kept")
    p.add_argument("--tmp-dir", default=None, help="where checkpoints are written (default: the system temp dir)")
    a = p.parse_args(argv)
    out = Path(a.out)
    cfg = Config.quick_config(out) if a.quick else Config(out=out)
    if not a.quick and torch.cuda.is_available():  # GPU mode: larger states, up to what fits
        free, _total = torch.cuda.mem_get_info()
        cfg.sizes_gib = tuple(g for g in (1.0, 2.0, 4.0, 8.0, 16.0) if g * (1 << 30) * 2.5 < free) or (1.0,)
    for field, value in (("state_gib", a.state_gib), ("sizes_gib", a.sizes), ("every", a.every),
                         ("steps", a.steps), ("repeats", a.repeats)):
        if value is not None:
            setattr(cfg, field, value)
    if cfg.state_gib <= 0 or any(g <= 0 for g in cfg.sizes_gib):
        p.error("state sizes must be positive")
    if not cfg.every or min(cfg.every) < 1:
        p.error("--every takes positive integers")
    cfg.repeats = max(1, cfg.repeats)
    only = [s.strip() for s in a.only.split(",")] if a.only else list(SCENARIOS)
    bad = [s for s in only if s not in SCENARIOS]
    if bad:
        p.error(f"unknown scenario(s) {', '.join(bad)}; choose from {', '.join(SCENARIOS)}")
    return cfg, only, a.tmp_dir


# --------------------------------------------------------------------------- goals


def _train_at(results: dict[str, Any], cfg: Config) -> dict[str, Any] | None:
    """The training-loop configuration at the default size with the sweep's k (else the first)."""
    tr = results.get("train")
    if not tr:
        return None
    cs = tr["configs"]
    k = sweep_k(cfg)
    return next((c for c in cs if c["state_gib"] == cfg.state_gib and c["every"] == k), cs[0])


def _durable_at(results: dict[str, Any], cfg: Config) -> dict[str, Any] | None:
    du = results.get("durable")
    if not du or not du.get("sizes"):
        return None
    sizes = du["sizes"]
    return min(sizes, key=lambda s: abs(s["gib"] - cfg.state_gib))


def goals(results: dict[str, Any], cfg: Config) -> list[dict[str, Any]]:
    """The issue's goals, each with the measured ratio and whether it is met (None: not measured)."""
    out: list[dict[str, Any]] = []

    def goal(name: str, value: float | None, target: float, higher_is_better: bool, how: str) -> None:
        met = None if value is None else (value >= target if higher_is_better else value <= target)
        out.append({"goal": name, "value": value, "target": target, "op": ">=" if higher_is_better else "<=",
                    "met": met, "how": how})

    tr = _train_at(results, cfg)
    if tr is not None:
        s = tr["summary"]
        ts_time = s["torch.save"]["call_s_median"]
        goal("blocked / torch.save time (loop delta)", max(0.0, s["ckpt"]["blocked_per_ckpt_s"]) / ts_time, 0.05,
             False, f"train {tr['state_gib']:g} GiB, k={tr['every']}")
        inrun = s["ckpt"].get("blocked_in_run_s")
        goal("blocked / torch.save time (loop delta vs the run's clean steps)",
             None if inrun is None else max(0.0, inrun) / ts_time, 0.05, False,
             f"train {tr['state_gib']:g} GiB, k={tr['every']}; steps with no checkpoint work in flight")
        goal("blocked / torch.save time (ckpt's own wait)", s["ckpt"]["own_blocked_s_mean"] / ts_time, 0.05, False,
             "call + optimizer-hook waits, same run")
        dcp_b = s["dcp.async_save"]["blocked_per_ckpt_s"]
        goal("blocked / DCP async_save blocked", max(0.0, s["ckpt"]["blocked_per_ckpt_s"]) / dcp_b if dcp_b > 0
             else None, 0.20, False, "loop deltas, same run")
    du = _durable_at(results, cfg)
    hw = results.get("hardware")
    if du is not None:
        ck = du["ckpt"]["gbps"]
        if hw and hw.get("write_fsync_gbps"):
            goal("persisted GB/s / storage write bandwidth (buffered+fsync)", ck / hw["write_fsync_gbps"], 0.80, True,
                 f"durable {du['gib']:g} GiB vs hardware scenario")
        goal("persisted GB/s / DCP save GB/s", ck / du["dcp.save"]["gbps"], 1.5, True, f"durable {du['gib']:g} GiB")
    rs = results.get("restore")
    if rs:
        q = rs.get("ratios", {})
        goal("restore speed / DCP load (single process)", q.get("ckpt_restore_speedup_over_dcp_single"), 1.5, True,
             "same state, warm page cache")
        if q.get("ckpt_load_speedup_over_dcp") is not None:
            goal("restore speed / DCP load (distributed, same layout)", q.get("ckpt_load_speedup_over_dcp"), 1.5,
                 True, "max over ranks")
        for key, val in q.items():
            if key.startswith("ckpt_resharded_over_same_layout_"):  # per target world ("_4to2"), not the worst
                goal(f"resharded / same-layout restore time ({key.rsplit('_', 1)[-1]})", val, 1.25, False,
                     "ckpt, max over ranks")
    mem = results.get("memory")
    if mem and mem.get("goal_pool_met") is not None:
        row = next((r for r in mem["rows"] if r["variant"].startswith("ckpt")), None)
        val = None
        if row and row.get("pool_bytes"):
            peak = max(row.get("peak_extra_mib_hwm") or 0, row.get("peak_extra_mib_sampled") or 0)
            val = peak * (1 << 20) / row["pool_bytes"]
        out.append({"goal": "peak host memory during save / configured pool", "value": val, "target": None,
                    "op": "within", "met": bool(mem["goal_pool_met"]), "how": "RSS above the pre-save level"})
    ti = results.get("tier")
    if ti:
        sc, rp = ti["step_cost"], ti["replication"]
        goal("memory tier: blocked per step / step time", max(0.0, sc["blocked_over_step"]), 0.03, False,
             f"tier snapshot every step, {sc['state_bytes'] / (1 << 30):.2f} GiB, one process, one torch thread")
        goal("memory tier: replication GB/s / raw gloo GB/s", rp["over_raw"], 0.8, True,
             "2 ranks on loopback, same bytes")
    if tr is not None and hw is not None and hw.get("d2h_pinned_gbps"):
        s = tr["summary"]
        goal("GPU: blocked / iteration time", max(0.0, s["ckpt"]["blocked_per_ckpt_s"]) / s["baseline"]["iter_s"],
             0.01, False, f"train {tr['state_gib']:g} GiB on {tr['device']}, fwd+bwd {tr['fwd_bwd_s'] * 1e3:.0f} ms "
             f"vs D2H {tr['memcpy_s'] * 1e3:.0f} ms")
        goal("GPU: D2H GB/s / pinned bandwidth", s["ckpt"]["staging_gbps_mean"] / hw["d2h_pinned_gbps"], 0.80, True,
             "bytes / (call -> last copy waited for), vs the hardware scenario")
    if hw is not None and hw.get("d2h_pinned_gbps") is None:
        out.append({"goal": "GPU goals (blocked < 1% of iteration; D2H >= 80% of pinned bandwidth)", "value": None,
                    "target": None, "op": "", "met": None, "how": "no CUDA device on this machine"})
    return out


def render_goals(gs: list[dict[str, Any]]) -> str:
    rows = []
    for g in gs:
        target = "" if g["target"] is None else f"{g['op']} {g['target']:g}"
        status = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        rows.append([g["goal"], fmt(g["value"], 3), target, status, g["how"]])
    return "### Goals\n\n" + md_table(["goal", "measured", "target", "status", "how"], rows, "lrrll")


# --------------------------------------------------------------------------- plots


def _finish(plt: Any, fig: Any, ax: Any, path: Path, ylabel: str, title: str) -> str:
    """Label (x: state size), save and close one plot; its file name."""
    ax.set_xlabel("state GiB")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plots(results: dict[str, Any], cfg: Config, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    tr = results.get("train")
    if tr:
        k = sweep_k(cfg)
        cs = sorted((c for c in tr["configs"] if c["every"] == k), key=lambda c: c["state_bytes"])
        if cs:
            fig, ax = plt.subplots(figsize=(6, 4))
            for name, label in (("ckpt", "ckpt (loop delta)"), ("torch.save", "torch.save"),
                                ("dcp.async_save", "DCP async_save")):
                ax.plot([c["state_bytes"] / (1 << 30) for c in cs],
                        [max(1e-4, c["summary"][name]["blocked_per_ckpt_s"]) for c in cs], "o-", label=label)
            ax.plot([c["state_bytes"] / (1 << 30) for c in cs],
                    [max(1e-4, c["summary"]["ckpt"]["own_blocked_s_mean"]) for c in cs], "o--",
                    label="ckpt (own wait)")
            ax.set_yscale("log")
            written.append(_finish(plt, fig, ax, out / "blocked_vs_size.png", "blocked time per checkpoint, s",
                                   f"Training loop, checkpoint every {k} steps"))
    du = results.get("durable")
    if du and du.get("sizes"):
        sizes = sorted(du["sizes"], key=lambda s: s["bytes"])
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in ("ckpt", "torch.save", "dcp.save"):
            ax.plot([s["bytes"] / (1 << 30) for s in sizes], [s[name]["gbps"] for s in sizes], "o-", label=name)
        hw = results.get("hardware")
        if hw and hw.get("write_fsync_gbps"):
            ax.axhline(hw["write_fsync_gbps"], color="gray", ls=":", label="storage write + fsync")
        written.append(_finish(plt, fig, ax, out / "throughput_vs_size.png", "persisted GB/s (call to durable)",
                               "Time to durable"))
    return written


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    cfg, only, tmp_dir = parse(argv)
    cfg.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=tmp_dir))
    mods = {name: importlib.import_module(MODULES[name]) for name in only}
    progress = Progress(sum(m.steps(cfg) for m in mods.values()))
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    try:
        machine = machine_info(tmp)
        for name, mod in mods.items():
            t0 = time.perf_counter()
            work = tmp / name
            work.mkdir()
            results[name] = mod.run(cfg, work, progress)
            shutil.rmtree(work, ignore_errors=True)
            timings[name] = time.perf_counter() - t0
    finally:
        progress.close()
        shutil.rmtree(tmp, ignore_errors=True)

    gs = goals(results, cfg)
    pngs = plots(results, cfg, cfg.out)
    m = machine
    head = (f"## ckpt benchmark ({m['date']})\n\n"
            f"`python -m bench{' --quick' if cfg.quick else ''}` on {m['cpu_count']} CPUs, {m['ram_gib']} GiB RAM"
            f"{', GPU ' + m['gpu'] if m['gpu'] else ', no GPU'}; {m['platform']}; Python {m['python']}, "
            f"torch {m['torch']}, tensorstore {m['tensorstore']}, zarr {m['zarr']}, ckpt {m['ckpt']}. "
            "Figures are minima over the runs; every ratio compares figures of this same run.")
    sections = [head, render_goals(gs)] + [results[n]["markdown"] for n in only]
    sections += [f"![{p}]({p})" for p in pngs]
    summary = "\n\n".join(sections) + "\n"
    (cfg.out / "summary.md").write_text(summary)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()}
    (cfg.out / "results.json").write_text(json.dumps(
        {"machine": machine, "config": config, "scenarios": only, "seconds": timings, "goals": gs,
         "plots": pngs, "results": results}, indent=2, default=str))
    print(summary)
    print(f"wrote {cfg.out / 'results.json'}, {cfg.out / 'summary.md'}"
          + "".join(f", {cfg.out / p}" for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
