"""Hypothesis fuzz of manifests against every reader, under a memory limit (issue #36):
only typed ckpt errors or bit-exact success, never an abort or an absurd allocation.
The fuzz runs in a child process (``_fuzz_manifests``) so that ``RLIMIT_AS`` binds it
alone; a bounded number of examples keeps it well under a minute."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = int(os.environ.get("CKPT_TEST_FUZZ_EXAMPLES", "40"))
LIMIT = 3 << 30


def test_manifest_fuzz_every_reader_under_a_memory_limit(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-m", "tests.reliability._fuzz_manifests", str(LIMIT), str(EXAMPLES),
                        str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"rc {p.returncode} (negative: killed by a signal):\n{out[-6000:]}"
    assert f"fuzz: {EXAMPLES} manifests" in out or "manifests, every reader typed or exact" in out
    print(f"\n[reliability] manifest fuzz: {out.strip().splitlines()[-1]}")
