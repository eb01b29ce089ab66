"""``python -m bench.durable``: time to durable and persisted throughput over a sweep of
state sizes — ckpt vs torch.save vs torch.distributed.checkpoint (DCP) vs torchsnapshot.

Each variant is timed from the call until the data is on disk: ``ckpt.save`` returns
durable (every object fsync'd, the manifest committed); torch.save and DCP's save are
followed by an fsync of every file and directory they wrote, inside the clock. Before each
run the previous output is removed and ``os.sync()`` flushes what is pending; the page
cache is not otherwise controlled. The state is float32 tensors of 64 MiB in CPU memory.
Persisted GB/s = state bytes / time to durable (1e9). CPU s: the process's CPU time
(user + system, every thread) over the same interval, the least of the timed runs — what
a save costs a host whose cores are busy training, and far less noisy than wall time on
a shared machine.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ckpt
from bench._common import (
    GIB,
    Config,
    Progress,
    best_of,
    fmt,
    fsync_tree,
    make_state,
    md_table,
    ratio,
    run_alone,
    standalone_parser,
    state_bytes,
)

VARIANTS = ("ckpt", "torch.save", "dcp.save", "torchsnapshot")


def _has_torchsnapshot() -> bool:
    return importlib.util.find_spec("torchsnapshot") is not None


def steps(cfg: Config) -> int:
    return len(cfg.sizes_gib) * (4 if _has_torchsnapshot() else 3)


def _fresh(path: Path) -> Callable[[], None]:
    def before() -> None:
        shutil.rmtree(path, ignore_errors=True)
        os.sync()
    return before


def _measure(cfg: Config, root: Path, once: Callable[[], Any]) -> tuple[float, float, float]:
    """(cold, best, cpu): one untimed-for-the-best first run, then best of ``cfg.repeats``
    and the least CPU time of those; each starts from an empty ``root`` after ``os.sync()``."""
    before = _fresh(root)
    cpu: list[float] = []

    def counted() -> None:
        c0 = time.process_time()
        once()
        cpu.append(time.process_time() - c0)

    try:
        cold = best_of(1, counted, before=before)
        return cold, best_of(cfg.repeats, counted, before=before), min(cpu[1:])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _entry(nbytes: int, measured: tuple[float, float, float], **extra: Any) -> dict[str, Any]:
    cold, seconds, cpu = measured
    return {"s": seconds, "gbps": nbytes / seconds / 1e9 if seconds > 0 else None, "cold_s": cold,
            "cpu_s": cpu, **extra}


def _ckpt(cfg: Config, snap: ckpt.Snapshotter, state: dict[str, torch.Tensor], root: Path,
          nbytes: int) -> dict[str, Any]:
    url = root / "step-000000000"
    runs: list[tuple[float, ckpt.SaveStats]] = []

    def once() -> None:
        t0 = time.perf_counter()
        st = snap.save(state, str(url), overwrite=True)  # what ckpt.save does
        runs.append((time.perf_counter() - t0, st))

    measured = _measure(cfg, root, once)
    st = min(runs[1:], key=lambda r: r[0])[1]
    return _entry(nbytes, measured, staging_s=st.staging_s, write_s=st.write_s, commit_s=st.commit_s,
                  stats_total_s=st.total_s, pool_peak_bytes=st.pool_peak_bytes, objects=st.objects)


def _save_and_fsync(cfg: Config, root: Path, nbytes: int, save: Callable[[], Any], synced: Path) -> dict[str, Any]:
    """Time ``save`` followed by an fsync of everything under ``synced`` (baselines that do
    not fsync themselves); also reports the call alone."""
    calls: list[tuple[float, float]] = []

    def once() -> None:
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        save()
        t1 = time.perf_counter()
        fsync_tree(synced)
        calls.append((time.perf_counter() - t0, t1 - t0))

    measured = _measure(cfg, root, once)
    return _entry(nbytes, measured, call_no_fsync_s=min(calls[1:])[1])


def _torch_save(cfg: Config, state: dict[str, torch.Tensor], root: Path, nbytes: int) -> dict[str, Any]:
    path = root / "state.pt"  # alone in its directory: fsync_tree syncs the file and that directory
    return _save_and_fsync(cfg, root, nbytes, lambda: torch.save(state, path), path)


def _dcp_save(cfg: Config, state: dict[str, torch.Tensor], root: Path, nbytes: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    def save() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=str(root), no_dist=True)

    return _save_and_fsync(cfg, root, nbytes, save, root)


def _torchsnapshot(cfg: Config, state: dict[str, torch.Tensor], root: Path, nbytes: int) -> dict[str, Any]:
    import torchsnapshot

    def once() -> None:
        torchsnapshot.Snapshot.take(path=str(root), app_state={"state": torchsnapshot.StateDict(**state)})
        fsync_tree(root)

    try:
        measured = _measure(cfg, root, once)
    except Exception as e:  # an optional baseline: report why, do not fail the harness
        return {"s": None, "gbps": None, "cold_s": None, "cpu_s": None, "error": f"{type(e).__name__}: {e}"}
    return _entry(nbytes, measured)


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.3g} GiB" if nbytes >= GIB // 4 else f"{nbytes / (1 << 20):.0f} MiB"


def _pick(cfg: Config, sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """The row at ``cfg.state_gib`` when the sweep has it, else the largest."""
    exact = [s for s in sizes if abs(s["gib"] - cfg.state_gib) < 1e-9]
    return exact[0] if exact else max(sizes, key=lambda s: s["bytes"])


def _markdown(r: dict[str, Any]) -> str:
    have_ts = r["torchsnapshot"] == "ran"
    header = ["state", "ckpt s", "ckpt GB/s", "(stage / write / commit s)", "(ckpt cold s)", "ckpt CPU s",
              "torch.save s", "torch.save GB/s", "(no-fsync call s)", "torch.save CPU s",
              "DCP s", "DCP GB/s", "DCP CPU s"]
    header += ["torchsnapshot s", "torchsnapshot GB/s", "torchsnapshot CPU s"] if have_ts else []
    rows = []
    for s in r["sizes"]:
        c, t, d = s["ckpt"], s["torch.save"], s["dcp.save"]
        row = [_size(s["bytes"]), fmt(c["s"], 3), fmt(c["gbps"]),
               f"{c['staging_s']:.3f} / {c['write_s']:.3f} / {c['commit_s']:.3f}", fmt(c["cold_s"], 3),
               fmt(c["cpu_s"], 3), fmt(t["s"], 3), fmt(t["gbps"]), fmt(t["call_no_fsync_s"], 3), fmt(t["cpu_s"], 3),
               fmt(d["s"], 3), fmt(d["gbps"]), fmt(d["cpu_s"], 3)]
        if have_ts:
            ts = s["torchsnapshot"]
            row += [fmt(ts["s"], 3), fmt(ts["gbps"]), fmt(ts["cpu_s"], 3)]
        rows.append(row)
    q = r["ratios"]
    ts_note = ("torchsnapshot ran too." if have_ts else
               f"torchsnapshot: not run ({r['torchsnapshot']}).")
    return "\n".join([
        "### Time to durable and persisted throughput",
        "",
        "Wall time from the call until the state is durable on local disk (best of "
        f"{r['repeats']}): ckpt's save (`Snapshotter().save(...)`, i.e. `ckpt.save`) "
        "returns once every object is fsync'd and the manifest committed "
        f"(default pool, {r['ckpt_pool_bytes'] / GIB:.3g} GiB); `torch.save` and DCP `save(no_dist=True)` "
        "are followed by an fsync of every file and directory they wrote, inside the clock. Before each run "
        "the previous output is removed and `os.sync()` runs; the page cache is not otherwise controlled. "
        "At each size each variant first saves once more, as its cold run (first-touch of ckpt's pool, "
        "first use of imports and threads; its time is in the JSON as `cold_s`, and ckpt's in the table). "
        f"GB/s = state bytes / time (1e9). CPU s = the process's CPU time (user + system, every thread) "
        "over the same interval, the least of the timed runs: what a save takes from cores that train. "
        f"{ts_note}",
        "",
        md_table(header, rows),
        "",
        f"At {_size(q['at_bytes'])}: ckpt GB/s / DCP GB/s = {fmt(q['ckpt_gbps_over_dcp_gbps'], 2, 'x')}, "
        f"ckpt GB/s / torch.save GB/s = {fmt(q['ckpt_gbps_over_torch_save_gbps'], 2, 'x')}; "
        f"ckpt CPU / DCP CPU = {fmt(q['ckpt_cpu_over_dcp_cpu'], 2)}, "
        f"ckpt CPU / torch.save CPU = {fmt(q['ckpt_cpu_over_torch_save_cpu'], 2)}.",
    ])


def run(cfg: Config, tmp: Path, progress: Progress) -> dict[str, Any]:
    has_ts = _has_torchsnapshot()
    sizes: list[dict[str, Any]] = []
    snap = ckpt.Snapshotter()  # ckpt.save's defaults; its own, so the pool is freed at the end
    try:
        for gib in cfg.sizes_gib:
            state = make_state(int(gib * GIB))
            nbytes = state_bytes(state)
            row: dict[str, Any] = {"gib": gib, "bytes": nbytes}
            progress.step(f"durable {gib:g} GiB: ckpt.save")
            row["ckpt"] = _ckpt(cfg, snap, state, tmp / "durable-ckpt", nbytes)
            progress.step(f"durable {gib:g} GiB: torch.save + fsync")
            row["torch.save"] = _torch_save(cfg, state, tmp / "durable-torch", nbytes)
            progress.step(f"durable {gib:g} GiB: dcp.save + fsync")
            row["dcp.save"] = _dcp_save(cfg, state, tmp / "durable-dcp", nbytes)
            if has_ts:
                progress.step(f"durable {gib:g} GiB: torchsnapshot + fsync")
                row["torchsnapshot"] = _torchsnapshot(cfg, state, tmp / "durable-torchsnapshot", nbytes)
            sizes.append(row)
            del state
        pool_bytes = snap.options.pool_bytes
    finally:
        snap.close()
    at = _pick(cfg, sizes)
    r: dict[str, Any] = {
        "scenario": "durable", "repeats": max(1, cfg.repeats),
        "ckpt_pool_bytes": pool_bytes,
        "torchsnapshot": "ran" if has_ts else "not installed",
        "sizes": sizes,
        "ratios": {
            "at_gib": at["gib"], "at_bytes": at["bytes"],
            "ckpt_gbps_over_dcp_gbps": ratio(at["ckpt"]["gbps"], at["dcp.save"]["gbps"]),
            "ckpt_gbps_over_torch_save_gbps": ratio(at["ckpt"]["gbps"], at["torch.save"]["gbps"]),
            "ckpt_cpu_over_dcp_cpu": ratio(at["ckpt"]["cpu_s"], at["dcp.save"]["cpu_s"]),
            "ckpt_cpu_over_torch_save_cpu": ratio(at["ckpt"]["cpu_s"], at["torch.save"]["cpu_s"]),
            "ckpt_gbps_over_torchsnapshot_gbps": ratio(at["ckpt"]["gbps"], at["torchsnapshot"]["gbps"])
            if has_ts else None,
        },
    }
    r["markdown"] = _markdown(r)
    return r


def main(argv: list[str] | None = None) -> int:
    p = standalone_parser("python -m bench.durable", "time to durable: ckpt vs torch.save vs DCP, over state sizes",
                          "tiny sizes, one run each")
    p.add_argument("--sizes-gib", type=float, nargs="+", default=None, help="state sizes (default 0.25 0.5 1 2)")
    p.add_argument("--repeats", type=int, default=None)
    return run_alone(run, steps, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
