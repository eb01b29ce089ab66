"""Scenario "training loop with a checkpoint every k steps" (CPU).

A stack of ``nn.Linear(d, d)`` layers plus AdamW, sized so that parameters + AdamW state
(exp_avg, exp_avg_sq) come to about the configured size. The batch is chosen so that one
forward+backward takes about 1.5x the time of a memcpy of the whole state (a "realistic
step": longer than the copy). For each configuration (every k in ``--every`` at the
default size, then every size of ``--sizes`` at one k) the same number of steps is run

1. without checkpoints (baseline),
2. with ``ckpt.Snapshotter().save_async(state, url)`` (the optimizer pre-step hook waits),
3. with ``torch.save(state_dict, path)`` (blocking),
4. with ``torch.distributed.checkpoint.async_save`` (single process, ``no_dist=True``;
   its future is awaited only before the next checkpoint),

each ``repeats`` times, keeping the minimum loop time. A checkpoint is taken after step
``i`` when ``(i + 1) % every == 0`` and ``i`` is not the last step, so every checkpoint
is followed by at least one timed step (where its background work and hook waits land).
Blocked time per checkpoint = (loop time - baseline loop time) / checkpoints: the call,
hook waits and the slowdown of overlapped steps (DataStates-LLM's definition).
End-to-end time = loop time + the wait for pending flushes after the loop.

A second estimate of the same quantity uses no other run: each variant records when its
checkpoint work was in flight (ckpt: call to committed; torch.save: the call; DCP: call
to durable), steps that overlap none of it are the run's *clean* steps, and blocked per
checkpoint = (sum of the run's step times - steps x mean clean step time) / checkpoints.
On a shared VM whose step time drifts by tens of percent between runs (this benchmark's
machine: medians of 274-484 ms for the same step in consecutive 40-step runs), that
estimate is not moved by the drift between runs, only by the drift within one; it needs
at least ``MIN_CLEAN`` clean steps (none at k=1, where the writes never stop).
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import ckpt
from bench._common import GIB, Config, Progress, fmt, md_table, ratio

MIN_CLEAN = 3  # clean steps a run needs for the in-run estimate

# --------------------------------------------------------------------------- model


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # GPU mode wherever CUDA is


def sync() -> None:
    """Wait for the work queued on the current stream, so a clock that stops measures it
    (no-op on CPU). Not ``torch.cuda.synchronize()``: that would also wait for ckpt's copy
    streams and charge a snapshot's overlapped copies to the step that took it."""
    if DEVICE.type == "cuda":
        torch.cuda.current_stream().synchronize()


def build(state_gib: float, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """Linear stack whose params + AdamW state (3x the params) is ~state_gib, on DEVICE."""
    param_bytes = state_gib * GIB / 3
    n_params = param_bytes / 4
    d = 2048 if n_params >= 16 * (2048 * 2048 + 2048) else 1024 if n_params >= 8 * (1024 * 1024 + 1024) else 512
    layers = max(2, round(n_params / (d * d + d)))
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(d, d) for _ in range(layers)]).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # One step so the AdamW state exists (and is part of every checkpoint).
    model(torch.randn(2, d, device=DEVICE)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # gradients stay allocated: no page faults in every step
    return model, opt, {"d": d, "layers": layers}


def state_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    ts = [p.detach() for p in model.parameters()]
    for st in opt.state.values():
        ts.extend(v for v in st.values() if isinstance(v, torch.Tensor))
    return ts


def memcpy_seconds(tensors: list[torch.Tensor]) -> float:
    """Time of copying every state tensor into a preallocated host buffer (pinned on GPU:
    the device-to-host copy a snapshot makes), best of 3."""
    gpu = DEVICE.type == "cuda"
    dst = [torch.empty(t.shape, dtype=t.dtype, pin_memory=gpu) for t in tensors]
    for a, b in zip(dst, tensors, strict=True):
        a.copy_(b)  # fault the pages in
    best = math.inf
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for a, b in zip(dst, tensors, strict=True):
            a.copy_(b, non_blocking=gpu)
        sync()
        best = min(best, time.perf_counter() - t0)
    del dst
    return best


def fwd_bwd_seconds(model: nn.Module, d: int, batch: int, reps: int = 2) -> float:
    x = torch.randn(batch, d, device=DEVICE)
    best = math.inf
    for _ in range(reps + 1):  # the first one is a warm-up
        sync()
        t0 = time.perf_counter()
        model(x).pow(2).mean().backward()
        sync()
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=False)
        best = min(best, dt)
    return best


def pick_batch(model: nn.Module, d: int, target_s: float) -> tuple[int, float]:
    b = 8
    for _ in range(3):
        t = fwd_bwd_seconds(model, d, b)
        nb = max(1, min(8192 if DEVICE.type == "cpu" else 1 << 17, round(b * target_s / max(t, 1e-6))))
        if abs(nb - b) <= max(1, b // 10):
            break
        b = nb
    return b, fwd_bwd_seconds(model, d, b)


def bench_model(state_gib: float) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any], int, float, int, float]:
    """The bench model of ``state_gib`` and a batch whose fwd+bwd is about 1.5x a memcpy
    of the state: (model, optimizer, shape, state bytes, memcpy s, batch, fwd+bwd s)."""
    model, opt, shape = build(state_gib)
    tensors = state_tensors(model, opt)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    memcpy_s = memcpy_seconds(tensors)
    del tensors
    batch, fb_s = pick_batch(model, shape["d"], 1.5 * memcpy_s)
    return model, opt, shape, nbytes, memcpy_s, batch, fb_s


# --------------------------------------------------------------------------- variants


class Variant:
    """One way of checkpointing; ``save`` runs in the loop, ``finish`` after it."""

    name = "baseline"

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, root: Path) -> None:
        self.model, self.opt, self.root = model, opt, root
        self.calls: list[float] = []
        self.busy: list[tuple[float, float]] = []  # (start, end) perf_counter: checkpoint work in flight

    def save(self, step: int) -> None:
        pass

    def finish(self) -> dict[str, Any]:
        return {}


class CkptVariant(Variant):
    """ckpt's save_async. One Snapshotter serves every run of a configuration, as one
    serves a whole training job: its pool is allocated and first touched once (in the
    untimed warm-up save of :func:`run_one`), not in every timed run."""

    name = "ckpt"
    shared: ckpt.Snapshotter | None = None

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, root: Path) -> None:
        super().__init__(model, opt, root)
        if CkptVariant.shared is None:
            # the loop's torch threads fill every core here: a background copy would take
            # them from the steps it overlaps, so the bench copies in the call
            CkptVariant.shared = ckpt.Snapshotter(ckpt.SaveOptions.resolve(None, cpu_staging="inline"))
        self.snap = CkptVariant.shared
        self.state = {"model": model, "optim": opt}
        self.handles: list[ckpt.SaveHandle] = []
        self.starts: list[float] = []

    def save(self, step: int) -> None:
        t0 = time.perf_counter()
        self.handles.append(self.snap.save_async(self.state, self.root / f"step-{step:09d}", step=step))
        self.calls.append(time.perf_counter() - t0)
        self.starts.append(t0)

    def finish(self) -> dict[str, Any]:
        stats = [h.result() for h in self.handles]
        # in flight from the call until committed (SaveStats.total_s counts from the call)
        self.busy = [(t0, t0 + st.total_s) for t0, st in zip(self.starts, stats, strict=True)]
        return {"stats": [s.as_dict() for s in stats], "cpu_staging": "inline" if any(
            st.inline for st in stats) else "background"}

    @classmethod
    def close_shared(cls) -> None:
        if cls.shared is not None:
            cls.shared.close()
            cls.shared = None


class TorchSaveVariant(Variant):
    name = "torch.save"

    def save(self, step: int) -> None:
        path = self.root / f"step-{step:09d}.pt"
        t0 = time.perf_counter()
        torch.save({"model": self.model.state_dict(), "optim": self.opt.state_dict()}, path)
        t1 = time.perf_counter()
        self.calls.append(t1 - t0)
        self.busy.append((t0, t1))
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
        self.durable: list[float] = []
        self._started = (0.0, 0.0)  # the pending save's (call start, call end)
        self._done_at: list[float] = []  # set by the pending future's done callback

    def _wait(self) -> None:
        """Wait for the pending save; record when it became durable. The future's done
        callback may run after ``result()`` returns (concurrent.futures wakes waiters
        first), so its time is taken when there is one, else now (no earlier than it)."""
        if self.future is not None:
            t0 = time.perf_counter()
            self.future.result()
            self.waits.append(time.perf_counter() - t0)
            end = self._done_at[0] if self._done_at else time.perf_counter()
            call_start, call_end = self._started
            self.durable.append(end - call_end)
            self.busy.append((call_start, end))
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
        done_at: list[float] = []
        fut.add_done_callback(lambda _f: done_at.append(time.perf_counter()))  # type: ignore[union-attr]
        self.future, self._done_at, self._started = fut, done_at, (t0, time.perf_counter())
        self.calls.append(time.perf_counter() - t0)

    def finish(self) -> dict[str, Any]:
        self._wait()
        return {"wait_before_next_s": self.waits[:-1] if self.waits else [],
                "call_to_durable_after_call_s": self.durable}


VARIANTS: dict[str, Callable[..., Variant]] = {
    "baseline": Variant, "ckpt": CkptVariant, "torch.save": TorchSaveVariant, "dcp.async_save": DCPVariant,
}


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int, every: int,
          variant: Variant, spans: list[tuple[float, float]] | None = None) -> tuple[float, list[float], int]:
    """Run ``steps`` steps, checkpointing every ``every``; (loop s, step times, checkpoints).
    ``spans`` receives each step's (start, end) perf_counter."""
    n_ckpt = 0
    step_times = []
    sync()
    t_start = time.perf_counter()
    for i in range(steps):
        t0 = time.perf_counter()
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if (i + 1) % every == 0 and i < steps - 1:
            variant.save(i)
            n_ckpt += 1
        sync()  # a step ends when its GPU work does
        t1 = time.perf_counter()
        step_times.append(t1 - t0)
        if spans is not None:
            spans.append((t0, t1))
    return time.perf_counter() - t_start, step_times, n_ckpt


def in_run_blocked(spans: list[tuple[float, float]], busy: list[tuple[float, float]],
                   n_ckpt: int) -> tuple[float | None, int]:
    """(blocked seconds per checkpoint against the run's clean steps, clean steps): clean
    steps overlap no interval of ``busy``; None with fewer than MIN_CLEAN of them."""
    clean = [b - a for a, b in spans if not any(a < end and start < b for start, end in busy)]
    if n_ckpt == 0 or len(clean) < MIN_CLEAN:
        return None, len(clean)
    mean_clean = sum(clean) / len(clean)
    return (sum(b - a for a, b in spans) - len(spans) * mean_clean) / n_ckpt, len(clean)

# --------------------------------------------------------------------------- scenario


def sweep_k(cfg: Config) -> int:
    """The k of the size sweep (and of the goals, plots and files scenario): 5 if given."""
    return 5 if 5 in cfg.every else cfg.every[0]


def configs(cfg: Config) -> list[tuple[float, int]]:
    """(state GiB, every k): every k at the default size, then the size sweep at one k."""
    k_sweep = sweep_k(cfg)
    out = [(cfg.state_gib, k) for k in cfg.every]
    out += [(g, k_sweep) for g in cfg.sizes_gib if (g, k_sweep) not in out]
    return out


def n_steps(cfg: Config, every: int) -> int:
    return max(cfg.steps, 2 * every + 1)


def steps(cfg: Config) -> int:
    return len(configs(cfg)) * (1 + cfg.repeats * len(VARIANTS))


def run_one(cfg: Config, tmp: Path, progress: Progress, state_gib: float, every: int) -> dict[str, Any]:
    progress.step(f"train loop {state_gib:g} GiB, every {every}: building the model")
    model, opt, shape, nbytes, memcpy_s, batch, fb_s = bench_model(state_gib)
    x = torch.randn(batch, shape["d"], device=DEVICE)
    steps_ = n_steps(cfg, every)
    train(model, opt, x, 3, every + 3, Variant(model, opt, tmp))  # warm-up steps
    CkptVariant.close_shared()
    warm = CkptVariant(model, opt, tmp / "warm-up-pool")  # allocates and touches the pool: untimed
    warm.save(0)
    warm.finish()
    shutil.rmtree(tmp / "warm-up-pool", ignore_errors=True)

    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in VARIANTS}
    for rep in range(cfg.repeats):
        for name, cls in VARIANTS.items():
            progress.step(f"train loop {state_gib:g} GiB, every {every}: {name} (run {rep + 1})")
            root = tmp / f"{name}-{rep}"
            root.mkdir()
            gc.collect()
            os.sync()  # flush the previous run's writes before timing this one
            train(model, opt, x, 2, 3, Variant(model, opt, tmp))  # untimed warm-up steps
            v = cls(model, opt, root)
            spans: list[tuple[float, float]] = []
            loop_s, step_times, n_ckpt = train(model, opt, x, steps_, every, v, spans)
            t0 = time.perf_counter()
            extra = v.finish()  # waits for pending flushes
            flush_s = time.perf_counter() - t0
            inrun, clean = in_run_blocked(spans, v.busy, n_ckpt)
            runs[name].append({"loop_s": loop_s, "flush_after_loop_s": flush_s, "e2e_s": loop_s + flush_s,
                               "step_s": step_times, "checkpoints": n_ckpt, "call_s": v.calls,
                               "blocked_in_run_s": inrun, "clean_steps": clean, **extra})
            shutil.rmtree(root, ignore_errors=True)
            del v
    CkptVariant.close_shared()
    del model, opt, x
    gc.collect()

    base = min(r["loop_s"] for r in runs["baseline"])
    summary: dict[str, dict[str, Any]] = {}
    for name in VARIANTS:
        best = min(runs[name], key=lambda r: r["loop_s"])
        n = best["checkpoints"]
        s: dict[str, Any] = {"loop_s": best["loop_s"], "e2e_s": min(r["e2e_s"] for r in runs[name]),
                             "iter_s": best["loop_s"] / steps_, "checkpoints": n}
        if name != "baseline":
            s["blocked_per_ckpt_s"] = (best["loop_s"] - base) / n
            inrun = [r["blocked_in_run_s"] for r in runs[name] if r["blocked_in_run_s"] is not None]
            # the median over runs; None where no run had clean steps enough
            s["blocked_in_run_s"] = statistics.median(inrun) if inrun else None
            s["clean_steps"] = [r["clean_steps"] for r in runs[name]]
            s["call_s_median"] = sorted(best["call_s"])[len(best["call_s"]) // 2]
            # DataStates-LLM's "checkpoint throughput": checkpoint bytes / time the loop was blocked
            s["ckpt_throughput_gbps"] = nbytes / s["blocked_per_ckpt_s"] / 1e9 if s["blocked_per_ckpt_s"] > 0 else None
        if name == "ckpt":
            st = best["stats"]
            s["own_blocked_s_mean"] = sum(x["blocked_s"] for x in st) / n
            s["total_s_mean"] = sum(x["total_s"] for x in st) / n
            # host copy throughput: bytes / (call -> every copy waited for by the writer); on GPU the D2H
            s["staging_gbps_mean"] = sum(x["bytes"] / x["staging_s"] / 1e9 for x in st if x["staging_s"] > 0) / n
            s["persisted_gbps_mean"] = sum(x["throughput_gbps"] for x in st) / n
            s["pool_peak_bytes"] = max(x["pool_peak_bytes"] for x in st)
            s["cpu_staging"] = best.get("cpu_staging", "background")
        if name == "torch.save":
            s["gbps_mean"] = sum(best["gbps"]) / n
        if name == "dcp.async_save":
            s["call_to_durable_s_mean"] = (sum(best["call_to_durable_after_call_s"]) / n + sum(best["call_s"]) / n)
        summary[name] = s
    ck, ts, dc = summary["ckpt"], summary["torch.save"], summary["dcp.async_save"]
    ratios = {
        "ckpt_blocked_over_torch_save_time": ratio(ck["blocked_per_ckpt_s"], ts["call_s_median"]),
        "ckpt_blocked_in_run_over_torch_save_time": ratio(ck["blocked_in_run_s"], ts["call_s_median"]),
        "ckpt_blocked_over_torch_save_blocked": ratio(ck["blocked_per_ckpt_s"], ts["blocked_per_ckpt_s"]),
        "ckpt_blocked_over_dcp_blocked": ratio(ck["blocked_per_ckpt_s"], dc["blocked_per_ckpt_s"]),
        "ckpt_own_blocked_over_torch_save_time": ratio(ck["own_blocked_s_mean"], ts["call_s_median"]),
        "ckpt_own_blocked_over_dcp_call": ratio(ck["own_blocked_s_mean"], dc["call_s_median"]),
        "ckpt_e2e_over_dcp_e2e": ratio(ck["e2e_s"], dc["e2e_s"]),
        "ckpt_e2e_over_baseline_e2e": ratio(ck["e2e_s"], summary["baseline"]["e2e_s"]),
    }
    return {"device": str(DEVICE), "state_gib": state_gib, "every": every, "steps": steps_, "batch": batch, **shape, "state_bytes": nbytes,
            "memcpy_s": memcpy_s, "fwd_bwd_s": fb_s, "baseline_loop_s": base, "summary": summary, "ratios": ratios,
            "runs": runs}


def warm_up(tmp: Path) -> None:
    """One untimed checkpoint of a tiny model with every variant: imports, thread pools and
    other first-use costs of each library are paid here, not by the first timed run."""
    model, opt, _ = build(0.001)
    for name, cls in VARIANTS.items():
        root = tmp / f"warm-up-{name}"
        root.mkdir()
        v = cls(model, opt, root)
        v.save(0)
        v.finish()
        shutil.rmtree(root, ignore_errors=True)
    CkptVariant.close_shared()


def run(cfg: Config, tmp: Path, progress: Progress) -> dict[str, Any]:
    torch.set_flush_denormal(True)
    warm_up(tmp)
    results = []
    for gib, k in configs(cfg):
        r = run_one(cfg, tmp, progress, gib, k)
        s = r["summary"]
        progress.log(f"  train {gib:g} GiB every {k}: blocked/ckpt ckpt {s['ckpt']['blocked_per_ckpt_s'] * 1e3:.0f} ms "
                     f"(own {s['ckpt']['own_blocked_s_mean'] * 1e3:.1f}), torch.save "
                     f"{s['torch.save']['blocked_per_ckpt_s'] * 1e3:.0f} ms, dcp.async_save "
                     f"{s['dcp.async_save']['blocked_per_ckpt_s'] * 1e3:.0f} ms")
        results.append(r)
    out = {"scenario": "train_loop", "configs": results}
    out["markdown"] = render(out)
    return out


def render(r: dict[str, Any]) -> str:
    ms = 1e3
    first = r["configs"][0]
    lines = [
        "### Training loop with a checkpoint every k steps",
        "",
        f"Linear({first['d']}, {first['d']}) stacks + AdamW; the batch makes fwd+bwd about 1.5x a memcpy of the "
        "state. Blocked = (loop time - the same steps without checkpoints) / checkpoints: the call, hook waits and "
        "slowdown of overlapped steps; \"in-run\" = the same against the mean of the run's own clean steps (no "
        "checkpoint work in flight; median over runs; \"-\": too few clean steps). \"own\" = what ckpt itself measured as the loop's wait (call + optimizer-hook "
        "waits). Throughput = checkpoint bytes / blocked time (DataStates-LLM's metric). e2e = loop + pending "
        "flushes. Minimum of the runs. ckpt: one Snapshotter for every run of a configuration, as in a training "
        f"job (its pool first touched in an untimed save); CPU staging {first['summary']['ckpt'].get('cpu_staging', '-')} "
        f"(SaveOptions.cpu_staging=inline, torch threads {torch.get_num_threads()}).",
        "",
    ]
    rows = []
    for c in r["configs"]:
        s = c["summary"]
        head = f"{c['state_bytes'] / GIB:.2f} GiB, k={c['every']} ({c['steps']} steps, iter {c['summary']['baseline']['iter_s'] * ms:.0f} ms)"
        rows.append([head, "baseline", "-", "-", "-", "-", fmt(s["baseline"]["e2e_s"], 2)])
        for name in ("ckpt", "torch.save", "dcp.async_save"):
            v = s[name]
            blocked = fmt(v["blocked_per_ckpt_s"] * ms, 0)
            if name == "ckpt":
                blocked += f" (own {v['own_blocked_s_mean'] * ms:.1f})"
            inrun = v["blocked_in_run_s"]
            rows.append(["", name, blocked, fmt(None if inrun is None else inrun * ms, 0),
                         fmt(v["call_s_median"] * ms, 1), fmt(v["ckpt_throughput_gbps"], 2), fmt(v["e2e_s"], 2)])
    lines.append(md_table(["state, every k", "variant", "blocked / ckpt ms", "in-run ms", "call ms",
                           "ckpt throughput GB/s", "e2e s"], rows, "llrrrrr"))
    return "\n".join(lines)
