"""What every benchmark scenario shares: sizes, machine facts, a progress line, state
builders, timing and durability helpers.

A scenario is a module with ``run(cfg: Config, tmp: Path, progress: Progress) -> dict``
that returns a JSON-able dict holding at least ``"scenario"`` (its name) and
``"markdown"`` (its section of the summary: a heading, a sentence on what was measured,
and a table). Every figure a scenario reports is also in that dict, raw.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

GIB = 1 << 30
MIB = 1 << 20


@dataclasses.dataclass
class Config:
    """Knobs shared by every scenario (``python -m bench --help`` sets them)."""

    quick: bool = False
    state_gib: float = 1.0  # the default state size of single-size scenarios
    sizes_gib: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)  # the scaling sweep
    ranks: tuple[int, ...] = (1, 2, 4)  # the rank sweep of distributed scenarios
    repeats: int = 2  # runs of each timed operation; the minimum is kept
    steps: int = 12
    every: tuple[int, ...] = (1, 5, 10)
    out: Path = Path("bench/results")

    @classmethod
    def quick_config(cls, out: Path) -> Config:
        return cls(quick=True, state_gib=0.03, sizes_gib=(0.02, 0.04), ranks=(1, 2), repeats=1, steps=4,
                   every=(2,), out=out)


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def machine_info(tmp: Path) -> dict[str, Any]:
    import ckpt

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    du = shutil.disk_usage(tmp)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "ram_gib": round(ram / GIB, 2), "platform": platform.platform(), "python": platform.python_version(),
        "gpu": gpu, "torch": torch.__version__, "tensorstore": version("tensorstore"), "zarr": version("zarr"),
        "ckpt": ckpt.__version__, "tmp_dir": str(tmp), "tmp_disk_free_gib": round(du.free / GIB, 1),
    }


class Progress:
    """A one-line progress bar on stderr when it is a terminal; plain lines otherwise."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.total, self.done = max(1, total), 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()

    def step(self, what: str, n: int = 1) -> None:
        """``what`` starts now; ``n`` units of the total are done when the next one starts."""
        el = time.perf_counter() - self.t0
        frac = self.done / self.total
        eta = f", ~{el / frac * (1 - frac):.0f} s left" if frac > 0 else ""
        if self.tty:
            bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
            self.stream.write(f"\r[{bar}] {frac:4.0%} {el:5.0f} s{eta}  {what[:60]:<60}")
        else:
            self.stream.write(f"[{frac:4.0%} {el:5.0f} s] {what}\n")
        self.stream.flush()
        self.done += n

    def log(self, line: str) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 120 + "\r")
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def make_state(nbytes: int, tensor_bytes: int = 64 * MIB, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 tensors of ``tensor_bytes`` (the last smaller), about ``nbytes`` in all."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    left, i = max(nbytes, 4096), 0
    while left > 0:
        n = max(1024, min(tensor_bytes, left) // 4)
        state[f"layer{i:03d}.weight"] = torch.randn(n // 1024, 1024, generator=g)
        left -= (n // 1024) * 1024 * 4
        i += 1
    return state


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_of(repeats: int, fn: Callable[[], Any], before: Callable[[], Any] | None = None) -> float:
    """Minimum wall time of ``fn`` over ``repeats`` runs; ``before`` runs untimed first."""
    best = math.inf
    for _ in range(max(1, repeats)):
        if before is not None:
            before()
        best = min(best, timed(fn))
    return best


def walk_files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            yield Path(dirpath) / f


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (for baselines that do not)."""
    if root.is_file():
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        root = root.parent
    for dirpath, _dirs, files in os.walk(root):
        for name in [*files, "."]:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def drop_page_cache(root: Path) -> bool:
    """Evict ``root``'s files from the page cache (POSIX_FADV_DONTNEED after a sync), so a
    following read comes from storage. Returns False where the platform cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.sync()
    for p in walk_files(root) if root.is_dir() else [root]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def tree_bytes(root: Path) -> int:
    return root.stat().st_size if root.is_file() else sum(p.stat().st_size for p in walk_files(root))


def md_table(header: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A Markdown table; ``align`` is one char per column ('l' or 'r', default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(v: float | None, nd: int = 2, unit: str = "") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}{unit}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def standalone_parser(prog: str, description: str, quick_help: str) -> Any:
    """The command line every ``python -m bench.<scenario>`` shares (add its own flags)."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--state-gib", type=float, default=None, help="state size in GiB (default 1.0)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    return p


def run_alone(run: Callable[[Config, Path, Progress], dict[str, Any]], steps: Callable[[Config], int],
              args: Any) -> int:
    """``python -m bench.<scenario>``: one scenario in a temp dir, configured by the
    :func:`standalone_parser` flags (plus ``sizes_gib`` / ``repeats`` where a parser has
    them); its markdown (or JSON) printed."""
    import json
    import tempfile

    cfg = Config.quick_config(Path("/tmp/x")) if args.quick else Config()
    if args.state_gib is not None:
        cfg.state_gib = args.state_gib
    if getattr(args, "sizes_gib", None):
        cfg.sizes_gib = tuple(args.sizes_gib)
    if getattr(args, "repeats", None) is not None:
        cfg.repeats = max(1, args.repeats)
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as d:
        progress = Progress(steps(cfg))
        t0 = time.perf_counter()
        try:
            r = run(cfg, Path(d), progress)
        finally:
            progress.close()
    print(json.dumps(r, indent=1) if args.json else r["markdown"])
    print(f"\n({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0
