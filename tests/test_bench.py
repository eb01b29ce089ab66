"""Smoke test of the benchmark harness: ``python -m bench --quick`` runs every scenario and
writes sane results, the summary and the plots (no timing assertions: speed is what the
harness reports, not what tests check)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _finite_positive(x: object) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.timeout(300)
def test_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out), "--tmp-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    summary = (out / "summary.md").read_text()
    assert summary.startswith("## ckpt benchmark") and "### Goals" in summary
    for key in ("cpu_count", "ram_gib", "torch", "tensorstore", "zarr", "date"):
        assert r["machine"][key]
    assert r["scenarios"] == ["hardware", "train", "files", "durable", "restore", "memory", "s3", "tier"]
    res = r["results"]
    for name in r["scenarios"]:
        assert res[name]["markdown"].startswith("### "), name
        assert res[name]["markdown"] in summary

    hw = res["hardware"]
    assert _finite_positive(hw["write_fsync_gbps"]) and _finite_positive(hw["read_gbps"])
    assert _finite_positive(hw["memcpy_gbps"])
    assert _finite_positive(hw["metadata_fresh_s"]) and hw["metadata_after_delete_cpu_s"] >= 0
    assert f"create {hw['metadata_inodes']} inodes" in hw["markdown"]
    assert "O_DIRECT (+ fsync), ckpt's pool memory" in hw["markdown"]
    if hw["write_odirect_note"] is None:  # O_DIRECT accepted: both buffers' writes were timed
        assert _finite_positive(hw["write_odirect_huge_gbps"]) and hw["write_odirect_huge_cpu_s"] >= 0

    (c, *_rest) = res["train"]["configs"]
    s = c["summary"]
    assert set(s) == {"baseline", "ckpt", "torch.save", "dcp.async_save"}
    for name, fig in s.items():
        assert fig["loop_s"] > 0 and fig["checkpoints"] >= 1 and fig["e2e_s"] >= fig["loop_s"]
        if name != "baseline":
            assert fig["call_s_median"] > 0 and math.isfinite(fig["blocked_per_ckpt_s"])  # a delta: may be < 0
    assert s["ckpt"]["own_blocked_s_mean"] > 0 and s["ckpt"]["persisted_gbps_mean"] > 0
    for name in ("ckpt", "torch.save", "dcp.async_save"):  # every run counted its clean steps
        assert s[name]["clean_steps"] and all(0 <= n <= c["steps"] for n in s[name]["clean_steps"])
        assert s[name]["blocked_in_run_s"] is None or math.isfinite(s[name]["blocked_in_run_s"])

    fl = res["files"]
    assert fl["files"] > 0 and fl["dirs"] > 0 and set(fl["summary"]) == {"ckpt", "ckpt's files, raw",
                                                                         "same bytes, one file", "copy+crc, one file",
                                                                         "ckpt, keep=2", "ckpt, keep=2, no recycling"}
    assert fl["torch_save_s"] > 0 and fl["summary"]["copy+crc, one file"]["call_s"] > 0
    for fig in fl["summary"].values():
        assert fig["busy_s"] > 0 and (fig["blocked_in_run_s"] is None or math.isfinite(fig["blocked_in_run_s"]))

    for size in res["durable"]["sizes"]:
        for name in ("ckpt", "torch.save", "dcp.save"):
            assert _finite_positive(size[name]["gbps"]), (size["gib"], name)

    assert res["restore"]["ratios"], res["restore"]
    assert any(_finite_positive(v) for v in res["restore"]["ratios"].values())

    mem = res["memory"]
    ck = next(row for row in mem["rows"] if row["variant"].startswith("ckpt"))
    assert ck["pool_bytes"] > 0 and 0 < ck["pool_peak_bytes"] <= ck["pool_bytes"]  # the pool never exceeds itself

    assert {row["variant"] for row in res["s3"]["rows"]} == {"ckpt", "dcp", "s3fs"}

    ti = res["tier"]
    assert ti["step_cost"]["taken"] >= 1 and math.isfinite(ti["step_cost"]["blocked_over_step"])
    assert _finite_positive(ti["replication"]["swap_gbps"]) and _finite_positive(ti["replication"]["raw_gbps"])
    assert _finite_positive(ti["restore"]["tier_s"])
    assert _finite_positive(ti["replication"]["new_file_write_gbps"])

    goals = r["goals"]
    assert any(g["goal"].startswith("blocked / torch.save") for g in goals)
    for g in goals:
        assert g["met"] in (True, False, None)
    for png in r["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(r["plots"]) == {"blocked_vs_size.png", "throughput_vs_size.png"}


def test_in_run_blocked_counts_only_steps_touched_by_checkpoint_work() -> None:
    """Steps of 1 s; checkpoint work at 2-3.5 s adds 0.25 s to each of the two steps it
    overlaps, at 6.5-6.7 s 0.25 s to one: 0.375 s per checkpoint against the mean of the
    clean steps (a step that only touches an interval's end is clean)."""
    from bench.train_loop import MIN_CLEAN, in_run_blocked

    lengths = [1.0, 1.0, 1.25, 1.25, 1.0, 1.0, 1.25, 1.0, 1.0]
    spans, t = [], 0.0
    for n in lengths:
        spans.append((t, t + n))
        t += n
    busy = [(2.0, 3.5), (6.5, 6.7)]
    blocked, clean = in_run_blocked(spans, busy, 2)
    assert clean == 6 and blocked == pytest.approx((0.25 + 0.25 + 0.25) / 2)
    assert in_run_blocked(spans, [(0.0, t)], 1) == (None, 0)  # nothing clean: no estimate
    assert in_run_blocked(spans[:MIN_CLEAN - 1], [], 1)[0] is None


def test_bench_rejects_bad_arguments(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--only", "nonsense", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown scenario" in proc.stderr
