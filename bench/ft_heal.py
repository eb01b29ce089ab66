"""Heal a torchft replica group through ckpt's transport and through torchft's own HTTP
transport, same run, same harness (tests/integrations/test_torchft.py's real processes).

``python -m bench.ft_heal [--width N]``: a 2-rank FSDP2 source group heals a joining group
of 2 ranks (both transports) and of 1 rank (ckpt only: torchft's transports need the same
sharding). Prints, per case, the healing rank 0's quorum time (the transfer happens inside
torchft's sync quorum), the time torchft took to apply the state, and bytes moved against
the rank's own share. Figures are one run's; compare them as ratios.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from tests.integrations.test_torchft import _heal


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1 << 17, help="hidden width (params ~ 24 x width)")
    ap.add_argument("--chunk", type=int, default=4 << 20, help="ckpt's request size, bytes")
    a = ap.parse_args()
    os.environ["FT_WIDTH"], os.environ["FT_CHUNK"] = str(a.width), str(a.chunk)
    for name, src, dst, kind in [("same shape, torchft HTTP", 2, 2, "http"),
                                 ("same shape, ckpt", 2, 2, "ckpt"),
                                 ("2 -> 1 ranks, ckpt", 2, 1, "ckpt")]:
        with tempfile.TemporaryDirectory() as d:
            s = _heal(Path(d), src, dst, kind)[0]
        moved = (f"  bytes {s['bytes'] / 2**20:.1f} MiB = {s['bytes'] / s['share_bytes']:.3f} x share"
                 if "bytes" in s else "")
        print(f"{name:28s} quorum+transfer {s['quorum_s']:.3f} s  apply {s['apply_s']:.3f} s{moved}")


if __name__ == "__main__":
    main()
