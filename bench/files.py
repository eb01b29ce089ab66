"""``python -m bench.files``: what writing a checkpoint's *files* costs the training loop,
apart from ckpt — the floor its file layout sets on this machine.

The training loop of :mod:`bench.train_loop` (same model, batch rule and step), a
checkpoint every k steps, each run's cost per checkpoint estimated against the run's own
clean steps (:func:`bench.train_loop.in_run_blocked`). Three ways of writing, interleaved
in every repeat, each run's output deleted after it (as in the train scenario):

1. ``ckpt``: ``Snapshotter.save_async`` (the call, hook waits and background writes);
2. ``ckpt's files, raw``: one background thread recreates the directories and files of a
   ckpt checkpoint of this state (taken once, untimed) with their sizes — ``O_DIRECT``
   from huge-page memory where the size allows, each file and directory fsync'd — and
   nothing else: no copy, no checksum, no Python per byte;
3. ``same bytes, one file``: one background thread writes the state's bytes to one file
   (16 MiB ``O_DIRECT`` writes, then fsync), as a single-file format would;
4. ``copy+crc, one file``: the floor of any design that snapshots CPU state exactly at the
   call and checksums what it writes — the call copies every tensor into huge-page memory
   and checksums it as ckpt's inline staging does (crc32c fused with the copy in L2-sized
   pieces, one thread per core), then one background thread writes that copy as one file.

(2) - (3) is the cost of the layout's file count on this file system; (1) - (2) is what
ckpt adds to writing its files (its copy in the call, included in (1), is the rest);
(4) is what no file layout can go below here. (5) and (6) are ckpt as a training job
runs it, ``CheckpointManager(keep=2)``: retention after every commit, the retired
checkpoint's tree recycled by the next save (recycle=True) or deleted (the default); busy runs from the
call until retention is done. ``torch.save`` of the same state is timed
once per repeat (its call, as in the train scenario), so every row has its ratio to it in
the same run.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

import ckpt
from bench._common import GIB, Config, Progress, fmt, md_table, ratio, run_alone, standalone_parser
from bench.train_loop import (
    DEVICE,
    CkptVariant,
    Variant,
    build,
    in_run_blocked,
    memcpy_seconds,
    pick_batch,
    state_tensors,
    sweep_k,
    train,
)
from ckpt._crc32c import crc32c_extend
from ckpt._engine._pool import _anonymous
from ckpt._engine._staging import copy_crc, staging_threads
from ckpt.storage._file import fsync_dir

BUF = 16 << 20  # the raw writers' buffer and write size
ALIGN = 4096
NAMES = ("ckpt", "ckpt's files, raw", "same bytes, one file", "copy+crc, one file",
         "ckpt, keep=2", "ckpt, keep=2, no recycling")


def repeats(cfg: Config) -> int:
    return 1 if cfg.quick else max(3, cfg.repeats)


def steps(cfg: Config) -> int:
    return 1 + repeats(cfg) * (len(NAMES) + 1)  # + torch.save once per repeat


class _Raw(Variant):
    """Writes in one background thread per checkpoint; ``busy`` from the call to durable."""

    def __init__(self, model: Any, opt: Any, root: Path, write: Any) -> None:
        super().__init__(model, opt, root)
        self.write = write
        self.threads: list[threading.Thread] = []
        self.error: BaseException | None = None

    def before_write(self) -> None:
        """Work of the call before the background write starts (none here)."""

    def save(self, step: int) -> None:
        t0 = time.perf_counter()
        self.before_write()
        target = self.root / f"step-{step:09d}"

        def work() -> None:
            try:
                self.write(target)
            except BaseException as e:  # noqa: BLE001 - reported by finish
                self.error = e
            self.busy.append((t0, time.perf_counter()))

        th = threading.Thread(target=work, name="bench-raw-write", daemon=True)
        th.start()
        self.threads.append(th)
        self.calls.append(time.perf_counter() - t0)

    def finish(self) -> dict[str, Any]:
        for th in self.threads:
            th.join()
        if self.error is not None:
            raise self.error
        return {}


class _CopyOneFile(_Raw):
    """(4): the call copies and checksums every tensor into ``mem`` (fused piece by piece,
    ckpt's ``copy_crc``, on ckpt's inline thread count); a background thread writes the copy as one
    file. A save first waits for the previous write (the copy would overwrite its bytes)."""

    def __init__(self, model: Any, opt: Any, root: Path, tensors: list[torch.Tensor], mem: torch.Tensor) -> None:
        self.mem = mem.numpy()
        self.size = -(-sum(t.numel() * t.element_size() for t in tensors) // ALIGN) * ALIGN
        super().__init__(model, opt, root, self._write_copy)
        self.crc = crc32c_extend()
        if self.crc is None:
            raise RuntimeError("google-crc32c's C library is missing: ckpt's own install has it")
        self.parts = _split(tensors, staging_threads(len(tensors)))

    def _copy(self, part: list[tuple[torch.Tensor, int]]) -> None:
        assert self.crc is not None
        for t, off in part:
            copy_crc(self.mem, off, t.detach().reshape(-1).numpy().view("uint8"), self.crc)

    def _write_copy(self, target: Path) -> None:
        target.mkdir(parents=True)
        mv = memoryview(self.mem)
        fd = os.open(target / "state.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o644)
        try:
            off = 0
            while off < self.size:
                off += os.pwritev(fd, [mv[off:min(self.size, off + BUF)]], off)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(target)

    def before_write(self) -> None:
        if self.threads:
            self.threads[-1].join()
        helpers = [threading.Thread(target=self._copy, args=(p,)) for p in self.parts[1:]]
        for h in helpers:
            h.start()
        self._copy(self.parts[0])
        for h in helpers:
            h.join()


class _Managed(Variant):
    """(5)/(6): ``CheckpointManager(keep=2)``, recycling on or off. An untimed save of
    step 0 first allocates and touches the manager's pool (and is the first retired)."""

    def __init__(self, model: Any, opt: Any, root: Path, *, recycle: bool) -> None:
        super().__init__(model, opt, root)
        self.state = {"model": model, "optim": opt}
        self.mgr = ckpt.CheckpointManager(root, keep=2, preemption=ckpt.PreemptionOptions(signals=()),
                                          save_on_close=False, recycle=recycle)
        self.mgr.save(0, self.state).result()
        self.handles: list[ckpt.SaveHandle] = []
        self.starts: list[float] = []
        self.ends: dict[int, float] = {}

    def save(self, step: int) -> None:
        t0 = time.perf_counter()
        h = self.mgr.save(step + 1, self.state)
        self.calls.append(time.perf_counter() - t0)
        i = len(self.handles)
        self.handles.append(h)
        self.starts.append(t0)
        # registered after the manager's own callback, so this runs once retention is done
        h.add_done_callback(lambda _h, i=i: self.ends.__setitem__(i, time.perf_counter()))

    def finish(self) -> dict[str, Any]:
        for h in self.handles:
            h.result()
        self.mgr.wait()
        self.busy = [(t0, self.ends.get(i, time.perf_counter())) for i, t0 in enumerate(self.starts)]
        self.mgr.close()
        return {}


def _split(tensors: list[torch.Tensor], n: int) -> list[list[tuple[torch.Tensor, int]]]:
    """The tensors at their offsets in one buffer, dealt to ``n`` threads by bytes."""
    parts: list[list[tuple[torch.Tensor, int]]] = [[] for _ in range(max(1, n))]
    loads = [0] * len(parts)
    off = 0
    for t in sorted(tensors, key=lambda t: -t.numel() * t.element_size()):
        i = loads.index(min(loads))
        parts[i].append((t, off))
        nb = t.numel() * t.element_size()
        loads[i] += nb
        off += -(-nb // 64) * 64
    return [p for p in parts if p] or [[]]


def _write(path: Path, buf: memoryview, size: int) -> None:
    """``size`` bytes from ``buf`` (repeated), O_DIRECT where the size is a whole block
    (else O_DIRECT for the aligned part is not worth it: buffered), then fsync."""
    direct = size >= ALIGN and hasattr(os, "O_DIRECT")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    try:
        n = -(-size // ALIGN) * ALIGN if direct else size
        off = 0
        while off < n:
            m = min(n - off, len(buf))
            off += os.pwritev(fd, [buf[:m]], off)
        if n != size:
            os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _layout(proto: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The directories (parents first) and files (with sizes) of a checkpoint."""
    dirs: list[str] = []
    files: list[tuple[str, int]] = []
    for dp, _dn, fn in os.walk(proto):
        rel = os.path.relpath(dp, proto)
        dirs.append(rel)
        files += [(os.path.join(rel, f), os.path.getsize(os.path.join(dp, f))) for f in fn]
    return dirs, files


def run(cfg: Config, tmp: Path, progress: Progress) -> dict[str, Any]:
    gib, k = cfg.state_gib, sweep_k(cfg)
    progress.step(f"files {gib:g} GiB, every {k}: building the model and a prototype checkpoint")
    model, opt, shape = build(gib)
    tensors = state_tensors(model, opt)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    batch, _ = pick_batch(model, shape["d"], 1.5 * memcpy_seconds(tensors))
    del tensors
    x = torch.randn(batch, shape["d"], device=DEVICE)
    train(model, opt, x, 3, k + 3, Variant(model, opt, tmp))  # warm-up steps (AdamW state exists)
    CkptVariant.close_shared()
    warm = CkptVariant(model, opt, tmp / "proto")  # the prototype; also first-touches the pool
    warm.save(0)
    warm.finish()
    dirs, files = _layout(tmp / "proto" / "step-000000000")
    shutil.rmtree(tmp / "proto")
    mem, _ = _anonymous(BUF)
    mem.fill_(7)
    buf = memoryview(mem.numpy())
    tensors = state_tensors(model, opt)  # the live state: AdamW updates it in place
    copy_mem, _ = _anonymous(-(-nbytes // ALIGN) * ALIGN + 64 * len(tensors))
    copy_mem.fill_(0)  # first touch, untimed (as ckpt's pool in the prototype save)
    saves: list[float] = []

    def layout(target: Path) -> None:
        for d in dirs:
            (target / d).mkdir(parents=True, exist_ok=True)
        for f, size in files:
            _write(target / f, buf, size)
        for d in sorted(dirs, key=len, reverse=True):
            fsync_dir(target / d)

    def one_file(target: Path) -> None:
        target.mkdir(parents=True)
        _write(target / "state.bin", buf, -(-nbytes // ALIGN) * ALIGN)
        fsync_dir(target)

    steps_ = max(cfg.steps, 3 * k + 1)  # three checkpoints, each followed by clean steps
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in NAMES}
    try:
        for rep in range(repeats(cfg)):
            for name in NAMES:
                progress.step(f"files {gib:g} GiB, every {k}: {name} (run {rep + 1})")
                root = tmp / f"run-{rep}-{NAMES.index(name)}"
                root.mkdir()
                train(model, opt, x, 2, 3, Variant(model, opt, tmp))  # untimed warm-up steps
                v: Variant = (CkptVariant(model, opt, root) if name == "ckpt" else
                              _CopyOneFile(model, opt, root, tensors, copy_mem) if name == NAMES[3] else
                              _Managed(model, opt, root, recycle=name == NAMES[4]) if name in NAMES[4:] else
                              _Raw(model, opt, root, layout if name == NAMES[1] else one_file))
                spans: list[tuple[float, float]] = []
                _, _, n_ckpt = train(model, opt, x, steps_, k, v, spans)
                v.finish()
                blocked, clean = in_run_blocked(spans, v.busy, n_ckpt)
                runs[name].append({"blocked_in_run_s": blocked, "clean_steps": clean, "checkpoints": n_ckpt,
                                   "call_s": v.calls, "busy_s": [e - s for s, e in v.busy]})
                shutil.rmtree(root, ignore_errors=True)
                del v
            progress.step(f"files {gib:g} GiB: torch.save of the same state (run {rep + 1})")
            path = tmp / "torch-save.pt"
            t0 = time.perf_counter()
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
            saves.append(time.perf_counter() - t0)
            path.unlink()
    finally:
        buf.release()
        CkptVariant.close_shared()
    summary: dict[str, dict[str, Any]] = {}
    for name, rs in runs.items():
        est = [r["blocked_in_run_s"] for r in rs if r["blocked_in_run_s"] is not None]
        summary[name] = {"blocked_in_run_s": statistics.median(est) if est else None,
                         "busy_s": statistics.median(b for r in rs for b in r["busy_s"]),
                         "call_s": statistics.median(c for r in rs for c in r["call_s"]),
                         "runs_with_estimate": len(est)}
    ck, lay, one, floor, kept, kept_fresh = (summary[n]["blocked_in_run_s"] for n in NAMES)
    ts = statistics.median(saves)
    r: dict[str, Any] = {
        "scenario": "files", "state_gib": gib, "state_bytes": nbytes, "every": k, "steps": steps_,
        "repeats": repeats(cfg), "dirs": len(dirs), "files": len(files), "summary": summary, "runs": runs,
        "torch_save_s": ts, "torch_save_runs_s": saves,
        "ratios": {"ckpt_over_its_files_raw": ratio(ck, lay), "its_files_raw_over_one_file": ratio(lay, one),
                   "ckpt_over_torch_save": ratio(ck, ts), "floor_over_torch_save": ratio(floor, ts),
                   "ckpt_over_floor": ratio(ck, floor), "recycled_over_deleted": ratio(kept, kept_fresh)},
        "fs_path": str(tmp),
    }
    r["markdown"] = _markdown(r)
    return r


def _markdown(r: dict[str, Any]) -> str:
    ms = 1e3
    rows = []
    for name in NAMES:
        s = r["summary"][name]
        what = {"ckpt": "Snapshotter.save_async", NAMES[1]: f"{r['dirs']} directories, {r['files']} files",
                NAMES[2]: f"{r['state_bytes'] / GIB:.2f} GiB",
                NAMES[3]: f"copy + crc32c in the call, {r['state_bytes'] / GIB:.2f} GiB as one file",
                NAMES[4]: "CheckpointManager: the retired tree overwritten in place",
                NAMES[5]: "CheckpointManager(recycle=False): a new tree, the retired one deleted"}[name]
        b = s["blocked_in_run_s"]
        rows.append([name, what, fmt(None if b is None else b * ms, 0),
                     fmt(ratio(b, r["torch_save_s"]), 3), fmt(s["call_s"] * ms, 1), fmt(s["busy_s"] * ms, 0)])
    return "\n".join([
        "### What the checkpoint's files cost the loop",
        "",
        f"The train scenario's loop at {r['state_bytes'] / GIB:.2f} GiB, a checkpoint every {r['every']} steps "
        f"({r['steps']} steps, {r['repeats']} interleaved runs each, median): blocked per checkpoint against "
        "each run's clean steps (no checkpoint work in flight). \"raw\" rows write in one background thread "
        "and do nothing else: ckpt's directories and files of this state with their sizes (O_DIRECT where "
        "whole blocks, every file and directory fsync'd), or the same bytes as one file. busy = call to "
        "durable. Their difference is what the file count costs on this file system. The copy+crc row is "
        "the floor of any format that snapshots the state exactly at the call and checksums it: the copy and "
        "crc32c in the call (as ckpt's inline staging), then one file. The keep_last rows are ckpt as a "
        "training job runs it, with retention after every commit (busy until retention is done). "
        f"torch.save of the same state: {r['torch_save_s']:.2f} s (median of {len(r['torch_save_runs_s'])}, "
        "this run); \"/ torch.save\" is blocked over that.",
        "",
        md_table(["writer", "writes", "blocked / ckpt ms (in-run)", "/ torch.save", "call ms", "busy ms"], rows,
                 "llrrrr"),
    ])


def main(argv: list[str] | None = None) -> int:
    p = standalone_parser("python -m bench.files", "what writing a checkpoint's files costs the training loop",
                          "a tiny state, one run each")
    p.add_argument("--repeats", type=int, default=None, help="interleaved runs of each writer (at least 3)")
    return run_alone(run, steps, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
