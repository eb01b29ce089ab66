"""``python -m bench.hardware``: the machine's limits, in the same run and over the same
number of bytes as the other scenarios, so their throughputs can be read against them.

* sequential write of one file under the temp dir in 64 MiB blocks from a preallocated
  buffer: buffered then ``fsync`` (the time includes the fsync), and with ``O_DIRECT``
  (page-aligned ``mmap`` buffer, also followed by an fsync for the metadata) — from
  4 KiB pages and from memory allocated as ckpt's staging pool is (2 MiB-aligned,
  ``MADV_HUGEPAGE``), with the kernel CPU each takes: an O_DIRECT write pins every page
  of its buffer, and that CPU is the training loop's on a busy host;
* sequential read of the same file: buffered after evicting it from the page cache, and
  with ``O_DIRECT``;
* host memcpy (``Tensor.copy_`` into a preallocated tensor, pages faulted in first), with
  torch's threads and with one thread;
* on CUDA only: pinned device-to-host and host-to-device, and pageable device-to-host;
* metadata: creating ``METADATA_ARRAYS`` zarr-array-like trees (a directory, zarr.json,
  one shard: what a checkpoint creates per tensor) in a fresh directory, and again right
  after deleting as many. On ext4 without a journal, allocation skips inodes freed in the
  last minutes (``recently_deleted``), scanning past them in the bitmap, so a checkpoint
  written soon after an old one was deleted pays for every inode freed.

Bandwidths are bytes moved per second in GB/s (1e9); a memcpy of N bytes counts N.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench._common import (
    GIB,
    MIB,
    Config,
    Progress,
    best_of,
    drop_page_cache,
    fmt,
    md_table,
    run_alone,
    standalone_parser,
)
from ckpt._engine._pool import _anonymous

BLOCK = 64 * MIB  # the I/O block
ALIGN = 4 * MIB  # sizes are rounded to this, so every O_DIRECT transfer is aligned
QUICK_BYTES = 32 * MIB
MEMCPY_REPEATS = 3
METADATA_ARRAYS = 200  # 600 inodes: a checkpoint of ~200 tensors


def nbytes_of(cfg: Config) -> int:
    raw = QUICK_BYTES if cfg.quick else int(cfg.state_gib * GIB)
    return max(ALIGN, raw // ALIGN * ALIGN)


def steps(cfg: Config) -> int:
    return 7 + (3 if torch.cuda.is_available() else 0)


def _gbps(nbytes: int, seconds: float | None) -> float | None:
    return None if seconds is None or seconds <= 0 else nbytes / seconds / 1e9


def _write_all(fd: int, buf: memoryview, nbytes: int) -> None:
    """``nbytes`` to ``fd`` in blocks of ``len(buf)`` (the last may be shorter)."""
    left = nbytes
    while left > 0:
        n = min(len(buf), left)
        done = 0
        while done < n:
            done += os.write(fd, buf[done:n])
        left -= n


def _read_all(fd: int, buf: memoryview) -> int:
    """Read ``fd`` to its end into ``buf``, block after block; returns the bytes read."""
    total = 0
    while True:
        n = os.readv(fd, [buf])
        if n == 0:
            return total
        total += n


def _write_file(path: Path, buf: memoryview, nbytes: int, direct: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    try:
        _write_all(fd, buf, nbytes)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_file(path: Path, buf: memoryview, nbytes: int, direct: bool) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        got = _read_all(fd, buf)
    finally:
        os.close(fd)
    if got != nbytes:
        raise OSError(f"read {got} bytes of {path}, expected {nbytes}")


def _best_with_cpu(repeats: int, fn: Callable[[], Any], before: Callable[[], Any]) -> tuple[float, float]:
    """Minimum wall time and minimum CPU time (user + system, every thread; precise, where
    ``getrusage`` counts in ticks) of ``fn`` over ``repeats`` runs; ``before`` runs untimed
    first."""
    wall = cpu = float("inf")
    for _ in range(max(1, repeats)):
        before()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def _odirect(what: str, fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """Time ``fn`` (best of, via the caller's closure); None and the reason where the
    filesystem refuses O_DIRECT."""
    try:
        return fn(), None
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return None, f"O_DIRECT {what} refused by the filesystem: {e.strerror} (errno {e.errno})"
        raise


def _storage(cfg: Config, tmp: Path, progress: Progress, nbytes: int) -> dict[str, Any]:
    path = tmp / "hardware.bin"
    mm = mmap.mmap(-1, min(BLOCK, nbytes))  # page-aligned, as O_DIRECT needs
    buf = memoryview(mm)
    try:
        torch.frombuffer(mm, dtype=torch.float32).normal_()  # incompressible, and faulted in

        def fresh() -> None:
            path.unlink(missing_ok=True)
            os.sync()

        progress.step("hardware: buffered write + fsync")
        w_buf = best_of(cfg.repeats, lambda: _write_file(path, buf, nbytes, False), before=fresh)
        progress.step("hardware: O_DIRECT write")
        w_dir_cpu, w_dir_why = _odirect("write", lambda: _best_with_cpu(
            cfg.repeats, lambda: _write_file(path, buf, nbytes, True), before=fresh))
        huge, huge_advised = _anonymous(len(buf))  # memory as ckpt's staging pool has it
        huge.copy_(torch.frombuffer(mm, dtype=torch.uint8))
        huge_buf = memoryview(huge.numpy())
        progress.step("hardware: O_DIRECT write from huge pages")
        w_huge_cpu, _ = _odirect("write", lambda: _best_with_cpu(
            cfg.repeats, lambda: _write_file(path, huge_buf, nbytes, True), before=fresh))
        huge_buf.release()
        del huge
        w_dir, w_dir_cpu_s = w_dir_cpu or (None, None)
        w_huge, w_huge_cpu_s = w_huge_cpu or (None, None)
        if not path.exists() or path.stat().st_size != nbytes:
            _write_file(path, buf, nbytes, False)

        dropped: list[bool] = []
        progress.step("hardware: buffered read (page cache dropped)")
        r_buf = best_of(cfg.repeats, lambda: _read_file(path, buf, nbytes, False),
                        before=lambda: dropped.append(drop_page_cache(path)))
        progress.step("hardware: O_DIRECT read")
        r_dir, r_dir_why = _odirect("read", lambda: best_of(
            cfg.repeats, lambda: _read_file(path, buf, nbytes, True)))
    finally:
        buf.release()
        mm.close()
        path.unlink(missing_ok=True)
    return {
        "write_fsync_s": w_buf, "write_fsync_gbps": _gbps(nbytes, w_buf),
        "write_odirect_s": w_dir, "write_odirect_gbps": _gbps(nbytes, w_dir), "write_odirect_note": w_dir_why,
        "write_odirect_cpu_s": w_dir_cpu_s, "write_odirect_huge_s": w_huge,
        "write_odirect_huge_gbps": _gbps(nbytes, w_huge), "write_odirect_huge_cpu_s": w_huge_cpu_s,
        "huge_pages_advised": huge_advised,
        "read_s": r_buf, "read_gbps": _gbps(nbytes, r_buf), "page_cache_dropped": all(dropped),
        "read_odirect_s": r_dir, "read_odirect_gbps": _gbps(nbytes, r_dir), "read_odirect_note": r_dir_why,
    }


def _create_tree(root: Path, arrays: int) -> None:
    root.mkdir()
    for i in range(arrays):
        d = root / f"{i}.zarr"
        d.mkdir()
        for name in ("zarr.json", "c.0.0"):
            os.close(os.open(d / name, os.O_WRONLY | os.O_CREAT, 0o644))


def _metadata(tmp: Path, progress: Progress) -> dict[str, Any]:
    """Wall and CPU seconds to create METADATA_ARRAYS trees fresh, then after deleting."""
    progress.step("hardware: metadata (file and directory creation)")
    out: dict[str, Any] = {"metadata_inodes": 3 * METADATA_ARRAYS, "fs": _file_system(tmp)}
    for what, before in (("fresh", None), ("after_delete", tmp / "meta-old")):
        if before is not None:
            _create_tree(before, METADATA_ARRAYS)
            shutil.rmtree(before)
        root = tmp / f"meta-{what}"
        c0, t0 = time.process_time(), time.perf_counter()
        _create_tree(root, METADATA_ARRAYS)
        out[f"metadata_{what}_s"] = time.perf_counter() - t0
        out[f"metadata_{what}_cpu_s"] = time.process_time() - c0  # user + system, every thread
    shutil.rmtree(tmp / "meta-fresh")
    shutil.rmtree(tmp / "meta-after_delete")
    return out


def _file_system(path: Path) -> str:
    """The file system type of ``path`` (from /proc/mounts), and for ext4 whether it has a
    journal; "" where that is not known."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return ""
    real = os.path.realpath(path)
    best = max((m for m in mounts if len(m) > 2 and (real == m[1] or real.startswith(m[1].rstrip("/") + "/"))),
               key=lambda m: len(m[1]), default=None)
    if best is None:
        return ""
    fs = best[2]
    if fs == "ext4":
        task = Path("/sys/fs/ext4") / os.path.basename(best[0]) / "journal_task"
        try:
            fs += " (no journal)" if task.read_text().strip() == "<none>" else " (journal)"
        except OSError:
            pass
    return fs


def _memcpy(progress: Progress, nbytes: int) -> dict[str, Any]:
    src = torch.empty(nbytes, dtype=torch.uint8)
    dst = torch.empty(nbytes, dtype=torch.uint8)
    src.fill_(7)  # fault every page in before the clock
    dst.fill_(0)
    progress.step(f"hardware: memcpy ({torch.get_num_threads()} threads)")
    t_all = best_of(MEMCPY_REPEATS, lambda: dst.copy_(src))
    threads = torch.get_num_threads()
    progress.step("hardware: memcpy (1 thread)")
    torch.set_num_threads(1)
    try:
        t_one = best_of(MEMCPY_REPEATS, lambda: dst.copy_(src))
    finally:
        torch.set_num_threads(threads)
    return {"memcpy_s": t_all, "memcpy_gbps": _gbps(nbytes, t_all), "memcpy_threads": threads,
            "memcpy_1thread_s": t_one, "memcpy_1thread_gbps": _gbps(nbytes, t_one)}


def _cuda(progress: Progress, nbytes: int) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"d2h_pinned_gbps": None, "h2d_pinned_gbps": None, "d2h_pageable_gbps": None, "gpu": None}
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(1)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(0)
    pageable = torch.empty(nbytes, dtype=torch.uint8).fill_(0)

    def timed_copy(dst: torch.Tensor, src: torch.Tensor) -> float:
        def once() -> None:
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
        once()  # warm-up
        return best_of(MEMCPY_REPEATS, once)

    progress.step("hardware: pinned device-to-host")
    d2h = timed_copy(pinned, dev)
    progress.step("hardware: pinned host-to-device")
    h2d = timed_copy(dev, pinned)
    progress.step("hardware: pageable device-to-host")
    d2h_pageable = timed_copy(pageable, dev)
    del dev, pinned, pageable
    torch.cuda.empty_cache()
    return {"gpu": torch.cuda.get_device_name(0),
            "d2h_pinned_s": d2h, "d2h_pinned_gbps": _gbps(nbytes, d2h),
            "h2d_pinned_s": h2d, "h2d_pinned_gbps": _gbps(nbytes, h2d),
            "d2h_pageable_s": d2h_pageable, "d2h_pageable_gbps": _gbps(nbytes, d2h_pageable)}


def _cpu_note(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.0f} ms CPU (nearly all the kernel's)"


def _markdown(r: dict[str, Any]) -> str:
    n = r["bytes"]
    rows: list[list[Any]] = [
        ["write, buffered + fsync", fmt(r["write_fsync_gbps"]), fmt(r["write_fsync_s"], 3), ""],
        ["write, O_DIRECT (+ fsync), 4 KiB pages", fmt(r["write_odirect_gbps"]), fmt(r["write_odirect_s"], 3),
         r["write_odirect_note"] or _cpu_note(r["write_odirect_cpu_s"])],
        ["write, O_DIRECT (+ fsync), ckpt's pool memory", fmt(r["write_odirect_huge_gbps"]),
         fmt(r["write_odirect_huge_s"], 3), r["write_odirect_note"] or (
             _cpu_note(r["write_odirect_huge_cpu_s"]) + ("" if r["huge_pages_advised"] else
                                                           "; MADV_HUGEPAGE not available"))],
        ["read, buffered", fmt(r["read_gbps"]), fmt(r["read_s"], 3),
         "page cache dropped" if r["page_cache_dropped"] else "page cache NOT dropped: may be a cached read"],
        ["read, O_DIRECT", fmt(r["read_odirect_gbps"]), fmt(r["read_odirect_s"], 3), r["read_odirect_note"] or ""],
        ["memcpy", fmt(r["memcpy_gbps"]), fmt(r["memcpy_s"], 3), f"{r['memcpy_threads']} torch threads"],
        ["memcpy, 1 thread", fmt(r["memcpy_1thread_gbps"]), fmt(r["memcpy_1thread_s"], 3), ""],
    ]
    if r["gpu"] is not None:
        rows += [["device-to-host, pinned", fmt(r["d2h_pinned_gbps"]), fmt(r["d2h_pinned_s"], 3), r["gpu"]],
                 ["host-to-device, pinned", fmt(r["h2d_pinned_gbps"]), fmt(r["h2d_pinned_s"], 3), ""],
                 ["device-to-host, pageable", fmt(r["d2h_pageable_gbps"]), fmt(r["d2h_pageable_s"], 3), ""]]
    else:
        rows.append(["device-to-host / host-to-device", "-", "-", "no CUDA device"])
    if "metadata_fresh_s" in r:
        k = r["metadata_inodes"]
        for what, label in (("fresh", "fresh directory"), ("after_delete", f"right after deleting {k}")):
            s, cpu = r[f"metadata_{what}_s"], r[f"metadata_{what}_cpu_s"]
            rows.append([f"create {k} inodes, {label}", "-", fmt(s, 3),
                         f"{s / k * 1e6:.0f} us per inode, {cpu / k * 1e6:.0f} us CPU; {r['fs'] or 'file system ?'}"])
    return "\n".join([
        "### Hardware limits",
        "",
        f"Sequential I/O on one {n / MIB:.0f} MiB file in the benchmark's temp dir ({r['tmp_dir']}), in "
        f"{BLOCK // MIB} MiB blocks from a preallocated buffer (best of {r['repeats']}; writes include the "
        f"fsync), and memory bandwidth over the same bytes (best of {MEMCPY_REPEATS}). GB/s = 1e9 bytes/s; "
        "a copy of N bytes counts N. Metadata: a directory + 2 empty files per array, as a checkpoint "
        "creates per tensor (one pass each, CPU = the process's user + system time).",
        "",
        md_table(["what", "GB/s", "s", "note"], rows, "lrrl"),
    ])


def run(cfg: Config, tmp: Path, progress: Progress) -> dict[str, Any]:
    nbytes = nbytes_of(cfg)
    tmp.mkdir(parents=True, exist_ok=True)
    r: dict[str, Any] = {"scenario": "hardware", "bytes": nbytes, "repeats": max(1, cfg.repeats),
                         "tmp_dir": str(tmp), "block_bytes": BLOCK}
    r.update(_storage(cfg, tmp, progress, nbytes))
    r.update(_memcpy(progress, nbytes))
    r.update(_cuda(progress, nbytes))
    r.update(_metadata(tmp, progress))
    r["markdown"] = _markdown(r)
    return r


def main(argv: list[str] | None = None) -> int:
    p = standalone_parser("python -m bench.hardware", "the machine's storage, memory and PCIe limits",
                          f"{QUICK_BYTES // MIB} MiB instead of --state-gib")
    return run_alone(run, steps, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
