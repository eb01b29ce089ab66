"""Issue #36, case 6: a script that ends right after ``save_async`` (or ``mgr.step``
without ``mgr.close()``) still gets its checkpoint: interpreter exit waits for every save
in flight, says so on stderr, and exits normally."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.reliability import assert_bit_exact

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPTS = {
    "save_async": """
        ckpt.save_async(make_state(3), f"{run}/step-000000003", step=3)
    """,
    "manager": """
        mgr = ckpt.CheckpointManager(run, save=1)
        mgr.step(3, make_state(3))
    """,
    "sys_exit": """
        ckpt.save_async(make_state(3), f"{run}/step-000000003", step=3)
        sys.exit(0)
    """,
}


@pytest.mark.parametrize("how", sorted(SCRIPTS))
def test_exit_right_after_a_save_waits_for_it(tmp_path, how):
    run = str(tmp_path / "run")
    code = textwrap.dedent("""
        import sys
        import ckpt
        from tests.reliability import make_state
        run = sys.argv[1]
    """) + textwrap.dedent(SCRIPTS[how])
    env = {**os.environ, "PYTHONPATH": ROOT, "CKPT_MAX_SHARD_BYTES": str(1 << 20)}
    p = subprocess.run([sys.executable, "-c", code, run], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "waiting for 1 checkpoint save(s) in flight" in p.stderr
    assert_bit_exact(f"{run}/step-000000003", 3)
