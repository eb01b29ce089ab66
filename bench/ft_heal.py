"""Heal a torchft replica group through ckpt's transport and through torchft's own HTTP
transport, same run, same harness (tests/integrations/test_torchft.py's real processes).

``python -m bench.ft_heal [--width N] [--repeats K]``: a 2-rank FSDP2 source group heals a
joining group of 2 ranks (both transports) and of 1 rank (ckpt only: torchft's transports
need the same sharding), the cases interleaved ``repeats`` times. Prints, per case, the
medians over the healing ranks and repeats of: the quorum time (the transfer happens inside
torchft's sync quorum, which also waits for the source group's step), the transport's
``recv_checkpoint`` alone, the time torchft took to apply the state, and bytes moved
against the rank's own share; then the ratio of the two transports' transfer times.
Figures are one run's; compare them as ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from tests.integrations.test_torchft import _heal

CASES = [("same shape, torchft HTTP", 2, 2, "http"), ("same shape, ckpt", 2, 2, "ckpt"),
         ("2 -> 1 ranks, ckpt", 2, 1, "ckpt")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1 << 17, help="hidden width (params ~ 24 x width)")
    ap.add_argument("--chunk", type=int, default=4 << 20, help="ckpt's request size, bytes")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    os.environ["FT_WIDTH"], os.environ["FT_CHUNK"] = str(a.width), str(a.chunk)
    runs: dict[str, list[dict]] = {name: [] for name, *_ in CASES}
    for k in range(a.repeats):
        for name, src, dst, kind in CASES:
            with tempfile.TemporaryDirectory() as d:
                runs[name] += _heal(Path(d), src, dst, kind)
            times = ", ".join(f"{s['transfer_s']:.3f}" for s in runs[name][-dst:])
            print(f"  [{k + 1}/{a.repeats}] {name}: transfer {times} s", flush=True)
    med: dict[str, float] = {}
    for name, *_ in CASES:
        rs = runs[name]
        med[name] = statistics.median(s["transfer_s"] for s in rs)
        moved = ""
        if "bytes" in rs[0]:
            moved = (f"  bytes {rs[0]['bytes'] / 2**20:.1f} MiB = "
                     f"{max(s['bytes'] / s['share_bytes'] for s in rs):.3f} x share (worst)")
        print(f"{name:26s} quorum {statistics.median(s['quorum_s'] for s in rs):.3f} s  transfer "
              f"{med[name]:.3f} s  apply {statistics.median(s['apply_s'] for s in rs):.3f} s{moved}")
    print(f"same-shape transfer, torchft HTTP / ckpt: {med[CASES[0][0]] / med[CASES[1][0]]:.2f} "
          "(> 1: ckpt faster)")


if __name__ == "__main__":
    main()
