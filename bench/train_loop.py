"""Scenario "training loop with a checkpoint every k steps" (CPU).

A stack of ``nn.Linear(d, d)`` layers plus AdamW, sized so that parameters + AdamW state
(exp_avg, exp_avg_sq) come to about ``state_gib``. The batch is chosen so that one
forward+backward takes about 1.5x the time of a memcpy of the whole state. The same
number of steps is run

1. without checkpoints (baseline),
2. with ``ckpt.Snapshotter().save_async(state, url)`` (the optimizer pre-step hook waits),
3. with ``torch.save(state_dict, path)`` (blocking),
4. with ``torch.distributed.checkpoint.async_save`` (single process, ``no_dist=True``;
   its future is awaited only before the next checkpoint),

each ``repeats`` times, keeping the minimum loop time. A checkpoint is taken after step
``i`` when ``(i + 1) % every == 0`` and ``i`` is not the last step, so every checkpoint
is followed by at least one timed step (where its background work and hook waits land).
Blocked time per checkpoint = (loop time - baseline loop time) / checkpoints.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import ckpt

GIB = 1 << 30


# --------------------------------------------------------------------------- model


def build(state_gib: float, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """Linear stack whose params + AdamW state (3x the params) is ~state_gib."""
    param_bytes = state_gib * GIB / 3
    n_params = param_bytes / 4
    d = 2048 if n_params >= 16 * (2048 * 2048 + 2048) else 1024 if n_params >= 8 * (1024 * 1024 + 1024) else 512
    layers = max(2, round(n_params / (d * d + d)))
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(d, d) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # One step so the AdamW state exists (and is part of every checkpoint).
    model(torch.randn(2, d)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # gradients stay allocated: no page faults in every step
    return model, opt, {"d": d, "layers": layers}


def state_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    ts = [p.detach() for p in model.parameters()]
    for st in opt.state.values():
        ts.extend(v for v in st.values() if isinstance(v, torch.Tensor))
    return ts


def memcpy_seconds(tensors: list[torch.Tensor]) -> float:
    """Time of copying every state tensor into a preallocated buffer (best of 3)."""
    dst = [torch.empty_like(t) for t in tensors]
    for a, b in zip(dst, tensors, strict=True):
        a.copy_(b)  # fault the pages in
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for a, b in zip(dst, tensors, strict=True):
            a.copy_(b)
        best = min(best, time.perf_counter() - t0)
    del dst
    return best


def fwd_bwd_seconds(model: nn.Module, d: int, batch: int, reps: int = 2) -> float:
    x = torch.randn(batch, d)
    best = math.inf
    for _ in range(reps + 1):  # the first one is a warm-up
        t0 = time.perf_counter()
        model(x).pow(2).mean().backward()
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=False)
        best = min(best, dt)
    return best


def pick_batch(model: nn.Module, d: int, target_s: float) -> tuple[int, float]:
    b = 8
    for _ in range(3):
        t = fwd_bwd_seconds(model, d, b)
        nb = max(1, min(8192, round(b * target_s / max(t, 1e-6))))
        if abs(nb - b) <= max(1, b // 10):
            break
        b = nb
    return b, fwd_bwd_seconds(model, d, b)


# --------------------------------------------------------------------------- variants


class Variant:
    """One way of checkpointing; ``save`` runs in the loop, ``finish`` after it."""

    name = "baseline"

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, root: Path) -> None:
        self.model, self.opt, self.root = model, opt, root
        self.calls: list[float] = []

    def save(self, step: int) -> None:
        pass

    def finish(self) -> dict[str, Any]:
        return {}


class CkptVariant(Variant):
    name = "ckpt"

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, root: Path) -> None:
        super().__init__(model, opt, root)
        self.snap = ckpt.Snapshotter()
        self.state = {"model": model, "optim": opt}
        self.handles: list[ckpt.SaveHandle] = []

    def save(self, step: int) -> None:
        t0 = time.perf_counter()
        self.handles.append(self.snap.save_async(self.state, self.root / f"step-{step:09d}", step=step))
        self.calls.append(time.perf_counter() - t0)

    def finish(self) -> dict[str, Any]:
        stats = [h.result() for h in self.handles]
        self.snap.close()
        return {"stats": [s.as_dict() for s in stats]}


class TorchSaveVariant(Variant):
    name = "torch.save"

    def save(self, step: int) -> None:
        path = self.root / f"step-{step:09d}.pt"
        t0 = time.perf_counter()
        torch.save({"model": self.model.state_dict(), "optim": self.opt.state_dict()}, path)
        self.calls.append(time.perf_counter() - t0)
        self.sizes = [*getattr(self, "sizes", []), path.stat().st_size]

    def finish(self) -> dict[str, Any]:
        sizes = getattr(self, "sizes", [])
        return {"bytes": sizes, "gbps": [b / c / 1e9 for b, c in zip(sizes, self.calls, strict=True)]}


class DCPVariant(Variant):
    name = "dcp.async_save"

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, root: Path) -> None:
        super().__init__(model, opt, root)
        self.future: Any = None
        self.waits: list[float] = []
        self.starts: list[float] = []
        self.durable: list[float] = []

    def _wait(self) -> None:
        if self.future is not None:
            t0 = time.perf_counter()
            self.future.result()
            self.waits.append(time.perf_counter() - t0)
            self.future = None

    def save(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        t0 = time.perf_counter()
        self._wait()  # the previous one, only now
        msd, osd = get_state_dict(self.model, self.opt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(self.root / f"step-{step:09d}"),
                                 no_dist=True)
        start = time.perf_counter()
        fut.add_done_callback(lambda _f: self.durable.append(time.perf_counter() - start))  # type: ignore[union-attr]
        self.future = fut
        self.calls.append(time.perf_counter() - t0)

    def finish(self) -> dict[str, Any]:
        self._wait()
        return {"wait_before_next_s": self.waits[:-1] if self.waits else [],
                "call_to_durable_after_call_s": self.durable}


VARIANTS: dict[str, Callable[..., Variant]] = {
    "baseline": Variant, "ckpt": CkptVariant, "torch.save": TorchSaveVariant, "dcp.async_save": DCPVariant,
}


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int, every: int,
          variant: Variant) -> tuple[float, list[float], int]:
    n_ckpt = 0
    step_times = []
    t_start = time.perf_counter()
    for i in range(steps):
        t0 = time.perf_counter()
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if (i + 1) % every == 0 and i < steps - 1:
            variant.save(i)
            n_ckpt += 1
        step_times.append(time.perf_counter() - t0)
    return time.perf_counter() - t_start, step_times, n_ckpt


# --------------------------------------------------------------------------- report


def machine_info(tmp: str) -> dict[str, Any]:
    def ver(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    du = shutil.disk_usage(tmp)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "ram_gib": round(ram / GIB, 2), "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "tensorstore": ver("tensorstore"), "ckpt": ckpt.__version__,
        "tmp_dir": tmp, "tmp_disk_free_gib": round(du.free / GIB, 1),
    }


def _fmt(v: float | None, unit: str = "", nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}{unit}"


def run(*, state_gib: float, steps: int, every: int, repeats: int, out: str, tmp_dir: str | None,
        quick: bool) -> dict[str, Any]:
    torch.set_flush_denormal(True)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=tmp_dir))
    try:
        model, opt, shape = build(state_gib)
        tensors = state_tensors(model, opt)
        state_bytes = sum(t.numel() * t.element_size() for t in tensors)
        memcpy_s = memcpy_seconds(tensors)
        batch, fb_s = pick_batch(model, shape["d"], 1.5 * memcpy_s)
        x = torch.randn(batch, shape["d"])
        print(f"state {state_bytes / GIB:.3f} GiB ({shape['layers']} x Linear({shape['d']}, {shape['d']}) + AdamW), "
              f"memcpy {memcpy_s * 1e3:.1f} ms, batch {batch}: fwd+bwd {fb_s * 1e3:.1f} ms; "
              f"{steps} steps, checkpoint every {every}", flush=True)
        train(model, opt, x, 3, every + 3, Variant(model, opt, tmp))  # warm-up steps

        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in VARIANTS}
        for rep in range(repeats):
            for name, cls in VARIANTS.items():
                root = tmp / f"{name}-{rep}"
                root.mkdir()
                gc.collect()
                os.sync()  # flush the previous run's writes before timing this one
                train(model, opt, x, 2, 3, Variant(model, opt, tmp))  # untimed warm-up steps
                v = cls(model, opt, root)
                loop_s, step_times, n_ckpt = train(model, opt, x, steps, every, v)
                extra = v.finish()  # waits for durability; outside the timed loop
                runs[name].append({"loop_s": loop_s, "step_s": step_times, "checkpoints": n_ckpt,
                                   "call_s": v.calls, **extra})
                print(f"  rep {rep} {name:15s} loop {loop_s:7.3f} s", flush=True)
                shutil.rmtree(root, ignore_errors=True)
                del v
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base = min(r["loop_s"] for r in runs["baseline"])
    summary: dict[str, dict[str, Any]] = {}
    for name in VARIANTS:
        best = min(runs[name], key=lambda r: r["loop_s"])
        n = best["checkpoints"]
        s: dict[str, Any] = {"loop_s": best["loop_s"], "checkpoints": n}
        if name != "baseline":
            s["blocked_per_ckpt_s"] = (best["loop_s"] - base) / n
            s["call_s_median"] = sorted(best["call_s"])[len(best["call_s"]) // 2]
        if name == "ckpt":
            st = best["stats"]
            s["own_blocked_s_mean"] = sum(x["blocked_s"] for x in st) / n
            s["total_s_mean"] = sum(x["total_s"] for x in st) / n
            s["persisted_gbps_mean"] = sum(x["throughput_gbps"] for x in st) / n
            s["bytes"] = st[0]["bytes"]
        if name == "torch.save":
            s["gbps_mean"] = sum(best["gbps"]) / n
            s["bytes"] = best["bytes"][0]
        if name == "dcp.async_save":
            s["call_to_durable_s_mean"] = (sum(best["call_to_durable_after_call_s"]) / n
                                           + sum(best["call_s"]) / n)
        summary[name] = s

    ck, ts, dc = summary["ckpt"], summary["torch.save"], summary["dcp.async_save"]

    def ratio(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    ratios = {
        "ckpt_blocked_over_torch_save_blocked": ratio(ck["blocked_per_ckpt_s"], ts["blocked_per_ckpt_s"]),
        "ckpt_blocked_over_dcp_blocked": ratio(ck["blocked_per_ckpt_s"], dc["blocked_per_ckpt_s"]),
        "ckpt_own_blocked_over_torch_save_call": ratio(ck["own_blocked_s_mean"], ts["call_s_median"]),
        "ckpt_own_blocked_over_dcp_call": ratio(ck["own_blocked_s_mean"], dc["call_s_median"]),
    }
    result = {
        "scenario": "train_loop_ckpt_every_k",
        "config": {"state_gib": state_gib, "steps": steps, "every": every, "repeats": repeats, "quick": quick,
                   "batch": batch, **shape, "state_bytes": state_bytes, "memcpy_s": memcpy_s, "fwd_bwd_s": fb_s},
        "machine": machine_info(str(tmp.parent)),
        "baseline_loop_s": base,
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    table = render(result)
    (out_dir / "summary.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'summary.md'}")
    return result


def render(r: dict[str, Any]) -> str:
    c, s, m, q = r["config"], r["summary"], r["machine"], r["ratios"]
    ms = 1e3
    lines = [
        f"### Training loop, checkpoint every {c['every']} steps ({r['machine']['date']})",
        "",
        f"State {c['state_bytes'] / GIB:.3f} GiB ({c['layers']} x Linear({c['d']}, {c['d']}) + AdamW), "
        f"batch {c['batch']} (fwd+bwd {c['fwd_bwd_s'] * ms:.0f} ms, state memcpy {c['memcpy_s'] * ms:.0f} ms), "
        f"{c['steps']} steps, {s['ckpt']['checkpoints']} checkpoints per run, min of {c['repeats']} runs. "
        f"{m['cpu_count']} CPUs, {m['ram_gib']} GiB RAM, torch {m['torch']}, tensorstore {m['tensorstore']}.",
        "",
        "| variant | loop s | blocked / ckpt ms | call ms (median) | to durable s | GB/s |",
        "|---|---:|---:|---:|---:|---:|",
        f"| baseline (no ckpt) | {s['baseline']['loop_s']:.3f} | - | - | - | - |",
        f"| ckpt save_async | {s['ckpt']['loop_s']:.3f} | {s['ckpt']['blocked_per_ckpt_s'] * ms:.1f} "
        f"(own: {s['ckpt']['own_blocked_s_mean'] * ms:.1f}) | {s['ckpt']['call_s_median'] * ms:.1f} | "
        f"{s['ckpt']['total_s_mean']:.3f} | {s['ckpt']['persisted_gbps_mean']:.2f} |",
        f"| torch.save | {s['torch.save']['loop_s']:.3f} | {s['torch.save']['blocked_per_ckpt_s'] * ms:.1f} | "
        f"{s['torch.save']['call_s_median'] * ms:.1f} | {s['torch.save']['call_s_median']:.3f} (no fsync) | "
        f"{s['torch.save']['gbps_mean']:.2f} |",
        f"| dcp.async_save | {s['dcp.async_save']['loop_s']:.3f} | "
        f"{s['dcp.async_save']['blocked_per_ckpt_s'] * ms:.1f} | {s['dcp.async_save']['call_s_median'] * ms:.1f} | "
        f"{s['dcp.async_save']['call_to_durable_s_mean']:.3f} | - |",
        "",
        f"ckpt blocked / torch.save blocked: {_fmt(q['ckpt_blocked_over_torch_save_blocked'], 'x', 3)}; "
        f"ckpt blocked / DCP async_save blocked: {_fmt(q['ckpt_blocked_over_dcp_blocked'], 'x', 3)} "
        f"(loop-time deltas; negative = within noise). "
        f"ckpt own blocked / torch.save call: {_fmt(q['ckpt_own_blocked_over_torch_save_call'], 'x', 3)}; "
        f"/ DCP call: {_fmt(q['ckpt_own_blocked_over_dcp_call'], 'x', 3)}.",
    ]
    return "\n".join(lines)
