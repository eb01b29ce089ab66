"""Every reader of a checkpoint, run on one checkpoint in a child process under a memory
limit (``RLIMIT_AS``), so an absurd allocation (tensorstore's ``std::bad_alloc`` aborts
the process) shows as a dead child instead of passing unnoticed on a large machine.

``python -m tests.reliability._readers LIMIT_BYTES URL...`` prints one JSON line: per
URL, per reader, ``ok``, ``typed:<ckpt error class>`` or ``untyped:<class>: <message>``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

READERS = ("load", "verify", "info", "export", "reshard", "cp")


def limit_memory(nbytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))


def outcome(fn: Callable[[], Any]) -> str:
    from ckpt.errors import CheckpointError

    try:
        fn()
        return "ok"
    except CheckpointError as e:
        return f"typed:{type(e).__name__}"
    except Exception as e:  # noqa: BLE001 - what the tests look for
        return f"untyped:{type(e).__name__}: {str(e)[:300]}"


def readers(url: str, state: Callable[[], dict[str, Any]], scratch: str) -> dict[str, Callable[[], Any]]:
    """name -> a call of that reader on ``url`` (outputs under ``scratch``)."""
    import ckpt
    from ckpt import tools

    def verify() -> None:
        tools.verify(url)

    return {
        "load": lambda: ckpt.load(state(), url),
        "verify": verify,
        "info": lambda: tools.info(url),
        "export": lambda: tools.export(url, os.path.join(scratch, "export"), format="torch"),
        "reshard": lambda: tools.reshard(url, os.path.join(scratch, "resharded"), 2, overwrite=True),
        "cp": lambda: tools.cp(url, os.path.join(scratch, "copy"), overwrite=True),
    }


def run_all(url: str, state: Callable[[], dict[str, Any]]) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as scratch:
        return {name: outcome(fn) for name, fn in readers(url, state, scratch).items()}


def in_child(urls: list[str], limit: int, timeout: float = 300) -> tuple[int, list[dict[str, str]] | None, str]:
    """Run every reader on ``urls`` in a fresh interpreter limited to ``limit`` bytes of
    address space: (exit status, results or None, output tail)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "tests.reliability._readers", str(limit), *urls],
                       capture_output=True, text=True, timeout=timeout, cwd=root, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("[")]
    return p.returncode, json.loads(lines[-1]) if lines else None, (p.stdout + p.stderr)[-3000:]


def main(argv: list[str]) -> None:
    limit_memory(int(argv[0]))
    from tests.reliability import blank_state

    out = [run_all(u, blank_state) for u in argv[1:]]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
