"""``python -m bench.compare REF``: the benchmark of an earlier commit and of this tree, in
one run, scenario by scenario (REF's, then this tree's, then the next scenario), so both
meet the same machine. Every goal is a ratio within its own run; the table sets REF's
ratio beside this tree's.

REF is checked out into a temporary git worktree and benchmarked with its own ``bench``
and ``ckpt`` (the same Python, the same installed dependencies). Scenarios REF lacks run
for this tree only. Other arguments go to ``python -m bench`` (``--quick``,
``--state-gib``...). Writes ``compare.md`` and ``compare.json`` plus each run's
``results.json``/``summary.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import fmt, md_table

# Scenarios that share a goal run together (durable's bandwidth goal reads the hardware run).
GROUPS = (("hardware", "durable"), ("train",), ("files",), ("restore",), ("memory",), ("s3",), ("tier",))
ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _scenarios(tree: Path) -> set[str]:
    """The scenarios a tree's ``bench`` knows, read from its source (no import: REF may differ)."""
    src = (tree / "bench" / "__main__.py").read_text()
    line = next(ln for ln in src.splitlines() if ln.startswith("SCENARIOS = "))
    return {s.strip(" '\"") for s in line.split("=", 1)[1].strip(" ()").split(",") if s.strip(" '\"")}


def _run(tree: Path, group: list[str], out: Path, extra: list[str]) -> dict[str, Any]:
    """One ``python -m bench`` in ``tree``, importing that tree's ckpt and bench."""
    env = dict(os.environ, PYTHONPATH=os.fspath(tree))
    check = subprocess.run([sys.executable, "-c", "import ckpt; print(ckpt.__file__)"], cwd=tree, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    if not Path(check).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"bench.compare: {tree} imports ckpt from {check}, not its own tree")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bench", "--only", ",".join(group), "--out", os.fspath(out), *extra],
                   cwd=tree, env=env, check=True)
    results = json.loads((out / "results.json").read_text())
    results["wall_s"] = time.perf_counter() - t0
    return results


def _table(ref: str, pairs: list[tuple[list[str], dict[str, Any] | None, dict[str, Any]]]) -> str:
    rows = []
    for group, before, after in pairs:
        old = {g["goal"]: g for g in (before or {}).get("goals", [])}
        for g in after["goals"]:
            b = old.get(g["goal"])
            bv, av = (b or {}).get("value"), g["value"]
            change = av / bv if isinstance(av, (int, float)) and isinstance(bv, (int, float)) and bv else None
            target = "" if g["target"] is None else f"{g['op']} {g['target']:g}"
            status = {True: "met", False: "NOT met", None: "-"}
            rows.append([g["goal"], target, fmt(bv, 3), status[(b or {}).get("met")], fmt(av, 3),
                         status[g["met"]], fmt(change, 2), "+".join(group)])
    head = (f"### Goals before ({ref}) and after (this tree), one run\n\n"
            "Each figure is a ratio of its own run; `after/before` divides the two ratios "
            "(for a `<=` goal lower is better, for `>=` higher is better).")
    walls = md_table(["scenarios", f"{ref} s", "this tree s"],
                     [["+".join(g), fmt((b or {}).get("wall_s"), 0), fmt(a.get("wall_s"), 0)] for g, b, a in pairs], "lrr")
    return "\n\n".join([head, md_table(["goal", "target", "before", "", "after", "", "after/before", "scenarios"],
                                       rows, "lrrlrlrl"), "### Wall time per scenario group", walls]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("ref", help="the earlier commit (any git revision)")
    p.add_argument("--out", default="bench/compare", help="directory for compare.md, compare.json and the runs")
    p.add_argument("--only", default=None, help="comma-separated scenarios (default: every group)")
    a, extra = p.parse_known_args(argv)
    sha = _git("rev-parse", "--short", a.ref)
    out = Path(a.out).resolve()
    only = set(a.only.split(",")) if a.only else None
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-ref-") as tmp:
        ref_tree = Path(tmp) / sha
        _git("worktree", "add", "--detach", os.fspath(ref_tree), sha)
        try:
            known = _scenarios(ref_tree)
            pairs = []
            for group in GROUPS:
                chosen = [s for s in group if only is None or s in only]
                if not chosen:
                    continue
                before = None
                if all(s in known for s in chosen):
                    before = _run(ref_tree, chosen, out / sha / "+".join(chosen), extra)
                after = _run(ROOT, chosen, out / "this" / "+".join(chosen), extra)
                pairs.append((chosen, before, after))
        finally:
            _git("worktree", "remove", "--force", os.fspath(ref_tree))
    md = _table(sha, pairs)
    (out / "compare.md").write_text(md)
    (out / "compare.json").write_text(json.dumps(
        {"ref": sha, "head": _git("rev-parse", "--short", "HEAD"), "groups": [
            {"scenarios": g, "before": b and {"goals": b["goals"], "wall_s": b["wall_s"]},
             "after": {"goals": a_["goals"], "wall_s": a_["wall_s"]}} for g, b, a_ in pairs]}, indent=2, default=str))
    print(md)
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
