"""``python -m bench``: the benchmark harness's command line."""

from __future__ import annotations

import argparse
import sys

from bench.train_loop import run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench",
                                description="Training loop with a checkpoint every k steps: "
                                            "baseline vs ckpt vs torch.save vs DCP async_save.")
    p.add_argument("--quick", action="store_true", help="a small, fast run (smoke test)")
    p.add_argument("--out", default="bench/results", help="directory for results.json and summary.md")
    p.add_argument("--state-gib", type=float, default=None,
                   help="parameters + AdamW state in GiB (default 1.0; --quick: 0.03)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 12; --quick: 4)")
    p.add_argument("--every", type=int, default=3, help="checkpoint every k steps (default 3)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each variant; the minimum is kept")
    p.add_argument("--tmp-dir", default=None, help="where checkpoints are written (default: system temp dir)")
    a = p.parse_args(argv)
    state_gib = a.state_gib if a.state_gib is not None else (0.03 if a.quick else 1.0)
    steps = a.steps if a.steps is not None else (4 if a.quick else 12)
    if a.every < 1 or steps <= a.every:
        p.error("--steps must be larger than --every (a checkpoint needs at least one step after it)")
    run(state_gib=state_gib, steps=steps, every=a.every, repeats=max(1, a.repeats), out=a.out,
        tmp_dir=a.tmp_dir, quick=a.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
