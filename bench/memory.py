"""``python -m bench.memory``: peak host memory during a save — ckpt ``save_async`` with an
explicit staging pool vs torch.save vs DCP ``save`` vs DCP ``async_save``.

Each save runs in a fresh child process (``python -m bench.memory --child VARIANT ...``)
that imports what it needs, builds the state, and then measures the save to completion
(durable: torch.save and DCP are followed by an fsync of what they wrote) two ways:

* VmHWM: the kernel's resident high-water mark, reset just before the save by writing
  ``5`` to ``/proc/self/clear_refs``. The child checks the reset works (it first raises
  VmHWM with a throw-away 64 MiB buffer and sees it drop back to VmRSS); where it does
  not, this figure is None;
* sampling: a thread reads the resident size from ``/proc/self/statm`` every 5 ms.

Both are reported as peak RSS above the RSS just before the save, in MiB. ckpt's goal:
peak host memory within the configured pool, read here as peak extra RSS <= pool +
64 MiB + 10 % of the pool (slack for tensorstore's buffers, thread stacks and metadata).
It is reported as met or not, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from bench._common import (
    GIB,
    MIB,
    Config,
    Progress,
    fmt,
    fsync_tree,
    make_state,
    md_table,
    run_alone,
    standalone_parser,
    state_bytes,
)

VARIANTS = ("ckpt.save_async", "torch.save", "dcp.save", "dcp.async_save")
POOL_FULL, POOL_QUICK = 256 * MIB, 16 * MIB
STATE_QUICK = 64 * MIB
SLACK_BYTES, SLACK_FRAC = 64 * MIB, 0.10
SAMPLE_S = 0.005
REPO = Path(__file__).resolve().parents[1]


def steps(cfg: Config) -> int:
    return len(VARIANTS)


def sizes(cfg: Config) -> tuple[int, int]:
    """(state bytes, pool bytes)."""
    return (STATE_QUICK, POOL_QUICK) if cfg.quick else (int(cfg.state_gib * GIB), POOL_FULL)


def pool_limit(pool: int) -> int:
    return pool + SLACK_BYTES + int(SLACK_FRAC * pool)


# --- the child ---------------------------------------------------------------------

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS; True when it demonstrably worked."""
    junk = torch.empty(64 * MIB, dtype=torch.uint8).fill_(1)  # raise the high-water mark...
    del junk  # ...and give the pages back (a buffer this large is its own mmap)
    gc.collect()
    hwm_before = _status_kib("VmHWM")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm < hwm_before and hwm <= rss + 1024


class _Sampler(threading.Thread):
    """Resident bytes from /proc/self/statm every ``SAMPLE_S``; the maximum is kept."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.fd = os.open("/proc/self/statm", os.O_RDONLY)
        self.peak = self.read()
        self.samples = 0
        self.stop = threading.Event()

    def read(self) -> int:
        return int(os.pread(self.fd, 256, 0).split()[1]) * self.page

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.read())
            self.samples += 1
            self.stop.wait(SAMPLE_S)

    def finish(self) -> int:
        self.stop.set()
        self.join()
        self.peak = max(self.peak, self.read())
        os.close(self.fd)
        return self.peak


def child(variant: str, nbytes: int, pool: int, out: Path) -> dict[str, Any]:
    if variant == "ckpt.save_async":
        import ckpt
    elif variant.startswith("dcp."):
        import torch.distributed.checkpoint as dcp
    import warnings
    warnings.simplefilter("ignore")

    state = make_state(nbytes)
    snap = ckpt.Snapshotter(options=ckpt.SaveOptions(pool_bytes=pool)) if variant == "ckpt.save_async" else None
    gc.collect()
    reset_ok = _reset_hwm()
    rss0 = _status_kib("VmRSS") * 1024
    sampler = _Sampler()
    sampler.start()
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    if snap is not None:
        st = snap.save_async(state, str(out / "step-000000000"), step=0, overwrite=True).result()
        extra = {"pool_bytes": pool, "pool_peak_bytes": st.pool_peak_bytes, "pinned": torch.cuda.is_available()}
    elif variant == "torch.save":
        out.mkdir(parents=True, exist_ok=True)
        torch.save(state, out / "state.pt")
        fsync_tree(out / "state.pt")
    elif variant == "dcp.save":
        dcp.save(state, checkpoint_id=str(out), no_dist=True)
        fsync_tree(out)
    elif variant == "dcp.async_save":
        res = dcp.async_save(state, checkpoint_id=str(out), no_dist=True)
        (res if isinstance(res, Future) else res.upload_completion).result()
        fsync_tree(out)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    save_s = time.perf_counter() - t0
    hwm = _status_kib("VmHWM") * 1024
    peak = sampler.finish()
    if snap is not None:
        snap.close()
    return {"variant": variant, "state_bytes": state_bytes(state), "rss_before_mib": rss0 / MIB,
            "peak_extra_mib_hwm": (hwm - rss0) / MIB if reset_ok else None,
            "peak_extra_mib_sampled": (peak - rss0) / MIB, "hwm_reset_ok": reset_ok,
            "samples": sampler.samples, "save_s": save_s,
            "pool_bytes": None, "pool_peak_bytes": None, "pinned": None, **extra}


# --- the parent --------------------------------------------------------------------

def _start_child(variant: str, nbytes: int, pool: int, out: Path) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "bench.memory", "--child", variant, "--bytes", str(nbytes), "--pool", str(pool),
           "--dir", str(out)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish_child(variant: str, proc: subprocess.Popen[str], out: Path) -> dict[str, Any]:
    try:
        stdout, stderr = proc.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    lines = stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"variant": variant, "error": f"child exited {proc.returncode}: {stderr.strip()[-2000:]}"}
    row: dict[str, Any] = json.loads(lines[-1])
    return row


def _peak(row: dict[str, Any]) -> float | None:
    """The figure the goal is judged on: VmHWM where its reset worked (it sees every page),
    else the 5 ms samples."""
    v = row.get("peak_extra_mib_hwm")
    return v if v is not None else row.get("peak_extra_mib_sampled")


def _markdown(r: dict[str, Any]) -> str:
    rows = []
    for row in r["rows"]:
        if "error" in row:
            rows.append([row["variant"], "-", "-", "-", "-", "-", "-", "failed: " + row["error"][:80]])
            continue
        pool = "-" if row["pool_bytes"] is None else f"{row['pool_bytes'] / MIB:.0f}"
        ppeak = "-" if row["pool_peak_bytes"] is None else f"{row['pool_peak_bytes'] / MIB:.0f}"
        rows.append([row["variant"], f"{row['state_bytes'] / MIB:.0f}", fmt(row["rss_before_mib"], 0),
                     fmt(row["peak_extra_mib_hwm"], 1), fmt(row["peak_extra_mib_sampled"], 1), pool, ppeak,
                     fmt(row["save_s"], 3)])
    g = r["goal"]
    verdict = "met" if r["goal_pool_met"] else "NOT met"
    caveat = ("" if g["discriminating"] else
              " (at this size the state itself fits within that limit, so the check cannot fail: "
              "run without --quick for a meaningful verdict)")
    pinned = ("pinned: the pool is page-locked; it held at most "
              f"{g['pool_peak_bytes'] / MIB:.0f} MiB" if r["pinned"] else "pinned memory: n/a (no CUDA)")
    return "\n".join([
        "### Peak host memory during a save",
        "",
        f"Each save runs to durable in a fresh child process{' (the four at once)' if r['concurrent'] else ''} "
        "after the state is built; peak resident memory above the RSS just before the call, from VmHWM "
        f"(reset through /proc/self/clear_refs{'' if r['hwm_reset_ok'] else ': the reset did not work here'}) "
        f"and from sampling RSS every {SAMPLE_S * 1000:.0f} ms. ckpt uses `save_async` with "
        f"`SaveOptions(pool_bytes={r['pool_bytes'] // MIB} MiB)`; {pinned}.",
        "",
        md_table(["variant", "state MiB", "RSS before MiB", "peak extra MiB (VmHWM)", "peak extra MiB (sampled)",
                  "pool MiB", "pool peak MiB", "save s"], rows),
        "",
        f"Goal \"peak host memory within the configured pool\" (peak extra RSS <= pool + "
        f"{SLACK_BYTES // MIB} MiB + {SLACK_FRAC:.0%} of the pool = {g['limit_bytes'] / MIB:.0f} MiB): "
        f"**{verdict}**, ckpt peaked at {fmt(g['ckpt_peak_extra_mib'], 1)} MiB{caveat}.",
    ])


def run(cfg: Config, tmp: Path, progress: Progress) -> dict[str, Any]:
    nbytes, pool = sizes(cfg)
    rows = []
    if cfg.quick:  # the children at once: resident memory is per process, and most of their time is imports
        outs = [tmp / f"memory-{v}" for v in VARIANTS]
        procs = [_start_child(v, nbytes, pool, o) for v, o in zip(VARIANTS, outs)]
        for v, proc, o in zip(VARIANTS, procs, outs):
            progress.step(f"memory: {v} ({nbytes / MIB:.0f} MiB) in a child process")
            rows.append(_finish_child(v, proc, o))
    else:
        for v in VARIANTS:
            progress.step(f"memory: {v} ({nbytes / MIB:.0f} MiB) in a child process")
            o = tmp / f"memory-{v}"
            rows.append(_finish_child(v, _start_child(v, nbytes, pool, o), o))
    ck = rows[0]
    ck_peak = None if "error" in ck else _peak(ck)
    limit = pool_limit(pool)
    r: dict[str, Any] = {
        "scenario": "memory", "concurrent": cfg.quick, "state_bytes": nbytes, "pool_bytes": pool, "rows": rows,
        "hwm_reset_ok": all(row.get("hwm_reset_ok", False) for row in rows),
        "pinned": bool(ck.get("pinned")),
        "goal": {"limit_bytes": limit, "slack_bytes": SLACK_BYTES, "slack_frac": SLACK_FRAC,
                 "ckpt_peak_extra_mib": ck_peak, "pool_peak_bytes": ck.get("pool_peak_bytes"),
                 "discriminating": nbytes > limit},
        "goal_pool_met": ck_peak is not None and ck_peak * MIB <= limit,
    }
    r["markdown"] = _markdown(r)
    return r


def main(argv: list[str] | None = None) -> int:
    p = standalone_parser("python -m bench.memory", "peak host memory during a save",
                          f"{STATE_QUICK // MIB} MiB state, {POOL_QUICK // MIB} MiB pool")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--pool", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.bytes, a.pool, Path(a.dir))))
        return 0
    return run_alone(run, steps, a)


if __name__ == "__main__":
    sys.exit(main())
