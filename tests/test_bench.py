"""Smoke test of the benchmark harness: it runs and writes sane results (no timing checks)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| ckpt save_async |" in proc.stdout
    r = json.loads((out / "results.json").read_text())
    assert (out / "summary.md").read_text().startswith("### Training loop")
    for key in ("cpu_count", "ram_gib", "torch", "tensorstore", "date"):
        assert r["machine"][key]
    assert r["config"]["state_bytes"] > 0 and r["config"]["batch"] >= 1
    s = r["summary"]
    assert set(s) == {"baseline", "ckpt", "torch.save", "dcp.async_save"}
    for name, fig in s.items():
        assert fig["loop_s"] > 0 and fig["checkpoints"] == 1
        if name != "baseline":
            assert fig["call_s_median"] > 0
            assert math.isfinite(fig["blocked_per_ckpt_s"])  # a loop-time delta: may be < 0 (noise)
    assert s["ckpt"]["total_s_mean"] > 0 and s["ckpt"]["persisted_gbps_mean"] > 0
    assert s["ckpt"]["own_blocked_s_mean"] > 0 and s["ckpt"]["bytes"] > 0
    assert s["torch.save"]["gbps_mean"] > 0 and s["torch.save"]["bytes"] > 0
    assert s["dcp.async_save"]["call_to_durable_s_mean"] > 0
    assert set(r["ratios"]) >= {"ckpt_blocked_over_torch_save_blocked", "ckpt_blocked_over_dcp_blocked"}
    for name, runs in r["runs"].items():
        assert len(runs) == 2, name
